"""The `distill` stage's training data: teacher samples and the teacher's k-sparse distributions over them, computed
once into RUN/distill/targets/ and reused by a rerun (`prepare_targets`).

Sequences: one teacher sample per training problem (`Task.train_examples`, the problems SFT draws), each in a mode
drawn from `sft.mix` (budgeted with a budget from `sft.budgets`, autonomous, or budget 0), sampled at
`distill.temperature` with the budget only in the prompt (no forcing: the student learns what the teacher does).
Targets: at every position that predicts a response token, the teacher's top-k ids and log-probs (temperature 1)
and the log of the mass left outside them (`algo.distill.topk_targets`).

    targets/key.json                 what the targets depend on: another key empties the folder first
    targets/shard-00000.safetensors  `SHARD_SEQUENCES` sequences each, written atomically (whole or absent)
    targets/index.json               written last: every shard is there

A shard of n sequences, T tokens and R target positions (each sequence's response tokens) holds:

    input_ids   (T,) int32        prompt then response of each sequence, concatenated
    seq_offsets (n + 1,) int64    where each sequence starts in input_ids
    prompt_len  (n,) int32        its prompt's length (the response follows)
    budget      (n,) int32        the budget in its prompt, -1 for none (autonomous)
    topk_ids    (R, k) int32      the teacher's top-k ids at positions prompt_len - 1 .. len - 2
    topk_logp   (R, k) float16    their log-probs
    tail_logp   (R,) float16      log of the teacher's mass outside them (-inf when k is the vocabulary)

so a target position costs k * (4 + 2) + 2 bytes (`bytes_per_position`), against V * 2 for fp16 full logits. A
killed run keeps its finished shards: the next one samples only the missing ones (each shard's samples are drawn
from its own seed, so the result does not depend on where the run stopped).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.runlog import log, read_json, write_bytes_atomic, write_json_atomic

SHARD_SEQUENCES = 256
FORMAT = "posttrain-distill-targets/1"


@dataclass
class Sequence:
    """One training sequence and its targets; L tokens, R = L - prompt_len target positions."""

    input_ids: torch.Tensor  # (L,) long
    prompt_len: int
    budget: int | None
    topk_ids: torch.Tensor  # (R, k) int32
    topk_logp: torch.Tensor  # (R, k) float16
    tail_logp: torch.Tensor  # (R,) float16


def bytes_per_position(k: int) -> int:
    """Stored bytes per target position: k int32 ids, k fp16 log-probs and one fp16 tail."""
    return k * (4 + 2) + 2


def teacher_fingerprint(path: Path) -> str:
    """A digest of the teacher checkpoint's files: its manifest when it has one, else names, sizes and config."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        blob = (path / "manifest.json").read_bytes()
    else:
        files = sorted((f.name, f.stat().st_size) for f in path.iterdir() if f.is_file())
        blob = json.dumps(files).encode() + (path / "config.json").read_bytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan_samples(examples: list, budgets: list, mix, seed: int) -> list[tuple[str, int | None]]:
    """(prompt, budget) per example: a mode drawn from `mix`, then its budget (None: autonomous; 0: no thinking)."""
    from posttrain.budgets import draw_budget
    from posttrain.sft_data import sample_mode

    rng = random.Random(seed)
    plan = []
    for ex in examples:
        mode = sample_mode(rng, mix)
        budget = 0 if mode == "zero" else None if mode == "autonomous" else draw_budget(rng, budgets)
        plan.append((ex.prompt, budget))
    return plan


@torch.no_grad()
def teacher_topk(teacher, seqs: list[tuple[list[int], int]], k: int, batch_size: int, pad_id: int):
    """The teacher's (topk_ids int32, topk_logp fp16, tail_logp fp16) at the response positions of each (ids,
    prompt_len) in `seqs`, in order: (R_i, k), (R_i, k), (R_i,) per sequence. Batches of `batch_size` sequences
    of similar length, right-padded."""
    from posttrain.algo.distill import topk_targets

    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    out = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        ids, mask, positions = pad_batch([seqs[i][0] for i in idx], [seqs[i][1] for i in idx], pad_id)
        logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        top_ids, top_logp, tail = topk_targets(logits[positions.to(device)], k)
        lengths = [len(seqs[i][0]) - seqs[i][1] for i in idx]
        for i, a, b, c in zip(idx, top_ids.split(lengths), top_logp.split(lengths), tail.split(lengths)):
            out[i] = (a.to(torch.int32).cpu(), b.half().cpu(), c.half().cpu())
    teacher.train(was_training)
    return out


def pad_batch(rows: list, prompt_lens: list[int], pad_id: int):
    """Right-padded (B, T) ids and attention mask of `rows` (lists or 1-D tensors), and the (B, T) bool mask of the
    positions that predict a response token (prompt_len - 1 .. len - 2), row-major as the targets are stored."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, prompt_lens)):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
        positions[i, p - 1: len(r) - 1] = True
    return ids, mask, positions


def sample_shard(teacher, tokenizer, plan: list, k: int, max_new_tokens: int, temperature: float, batch_size: int,
                 seed: int) -> dict[str, torch.Tensor]:
    """One shard's tensors (see the module docstring): the teacher's samples of `plan`'s (prompt, budget) pairs,
    drawn from `seed`, and its top-k at their response positions."""
    from posttrain.generate import generate, render_prompts

    prompts, budgets = [p for p, _ in plan], [b for _, b in plan]
    responses = generate(teacher, tokenizer, prompts, budgets, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         do_sample=True, temperature=temperature, seed=seed)
    texts = render_prompts(tokenizer, prompts, budgets)  # the prompts exactly as the decoder tokenized them
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    seqs = [(p + r.ids, len(p)) for p, r in zip(prompt_ids, responses)]
    targets = teacher_topk(teacher, seqs, k, batch_size, tokenizer.pad_token_id)
    lengths = torch.tensor([len(s) for s, _ in seqs])
    return {
        "input_ids": torch.tensor([t for s, _ in seqs for t in s], dtype=torch.int32),
        "seq_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "prompt_len": torch.tensor([p for _, p in seqs], dtype=torch.int32),
        "budget": torch.tensor([-1 if b is None else b for b in budgets], dtype=torch.int32),
        "topk_ids": torch.cat([t[0] for t in targets]),
        "topk_logp": torch.cat([t[1] for t in targets]),
        "tail_logp": torch.cat([t[2] for t in targets]),
    }


def shard_sequences(tensors: dict[str, torch.Tensor]) -> list[Sequence]:
    """The `Sequence`s a shard's tensors hold."""
    offsets, plens = tensors["seq_offsets"].tolist(), tensors["prompt_len"].tolist()
    out, r0 = [], 0
    for i, p in enumerate(plens):
        ids = tensors["input_ids"][offsets[i]: offsets[i + 1]].long()
        r1 = r0 + len(ids) - p
        b = int(tensors["budget"][i])
        out.append(Sequence(ids, p, None if b < 0 else b, tensors["topk_ids"][r0:r1], tensors["topk_logp"][r0:r1],
                            tensors["tail_logp"][r0:r1]))
        r0 = r1
    return out


def write_shard(path: Path, tensors: dict[str, torch.Tensor], k: int) -> None:
    from safetensors.torch import save

    write_bytes_atomic(path, save(tensors, metadata={"format": FORMAT, "k": str(k)}), f"distillation targets {path}")


def read_shard(path: Path) -> dict[str, torch.Tensor] | None:
    """A shard's tensors, or None (with a warning) when the file cannot be read as one."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        log.warning("distill: %s is unreadable (%s); sampling it again", path, e)
        return None


def prepare_targets(out: Path, key: dict, teacher, tokenizer, plan: list, k: int, max_new_tokens: int,
                    temperature: float, batch_size: int, seed: int) -> tuple[list[Sequence], dict]:
    """The training sequences of `plan` with the teacher's top-k targets, from `out` where they are already there
    under `key`, else sampled (shard by shard, each from seed + its index) and written there. Returns (sequences,
    stats: sequences, target positions, tokens, shards, reused shards, bytes on disk, and the teacher's mass outside
    its top k, mean and max over the positions)."""
    out.mkdir(parents=True, exist_ok=True)
    key_file = out / "key.json"
    if key_file.is_file() and read_json(key_file, "what the distillation targets depend on") != key:
        log.warning("distill: %s holds targets of other settings (teacher, k or sampling); sampling them again", out)
        shutil.rmtree(out)
        out.mkdir(parents=True)
    write_json_atomic(key_file, key)
    sequences, reused, shards = [], 0, []
    for n, lo in enumerate(range(0, len(plan), SHARD_SEQUENCES)):
        path = out / f"shard-{n:05d}.safetensors"
        tensors = read_shard(path) if path.is_file() else None
        if tensors is not None and tensors["topk_ids"].shape[-1] == k:
            reused += 1
        else:
            chunk = plan[lo: lo + SHARD_SEQUENCES]
            log.info("distill: teacher samples %d-%d of %d", lo, lo + len(chunk), len(plan))
            tensors = sample_shard(teacher, tokenizer, chunk, k, max_new_tokens, temperature, batch_size, seed + n)
            write_shard(path, tensors, k)
        sequences += shard_sequences(tensors)
        shards.append({"file": path.name, "sequences": len(tensors["prompt_len"]),
                       "positions": int(tensors["topk_ids"].shape[0]), "bytes": path.stat().st_size})
    tail_mass = torch.cat([s.tail_logp.float().exp() for s in sequences])
    stats = {"sequences": len(sequences), "target_positions": sum(s["positions"] for s in shards),
             "tokens": sum(len(s.input_ids) for s in sequences), "shards": len(shards), "reused_shards": reused,
             "bytes_on_disk": sum(s["bytes"] for s in shards), "tail_mass_mean": float(tail_mass.mean()),
             "tail_mass_max": float(tail_mass.max())}
    write_json_atomic(out / "index.json", {"format": FORMAT, "k": k, "key": key, **stats, "files": shards})
    return sequences, stats
