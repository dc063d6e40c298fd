"""`base` stage: build and pretrain the embedded tiny Qwen3-MoE model on a synthetic corpus of the task.

Stands in for the pretrained MoE checkpoint a user would bring (no model hub is reachable here). The corpus is
a problem with a thinking trace in one of the styles of the task (verbose, terse) and the answer; or the problem
and its answer directly; or the problem copied verbatim (which trains the lookup of the next operand that every
trace step needs); one document per row, framed as plain text, with a preamble, or as a chat turn (see
`tasks.corpus.FRAMES`): like the instruction data in real pretraining corpora, and so the model finds operands by
content. A task with its own `corpus` hook (reasoning-gym) supplies the documents, and its texts join the
tokenizer's training corpus; the cache key then names the task's corpus.
Budgets in the framing are not tied to trace length: following them is SFT's and RL's job. The router
load-balancing loss (Switch/Mixtral style, `router_aux_loss_coef`) is included so experts stay in use.

The result is cached by its settings (`base.cache_dir`); a second run with the same settings reuses it. It is
saved with `save_pretrained` and read back through `posttrain.model.load_model`, the same path as any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from posttrain.config import BaseStageConfig
from posttrain.runlog import log
from posttrain.tasks.embedded import ArithmeticTask
from posttrain.tasks.task import build_task

CORPUS_VERSION = 2  # bump when the corpus or tokenizer changes, so stale caches are not reused


def cache_key(cfg: BaseStageConfig, seed: int, task_corpus: dict | None = None) -> str:
    """The cached base model's name: its settings, seed and corpus (`task_corpus`: the task's `corpus_key`, None
    for the embedded task's corpus)."""
    settings = cfg.model_dump(exclude={"cache_dir"})
    key = {"settings": settings, "seed": seed, "corpus": CORPUS_VERSION}
    if task_corpus is not None:
        key["task"] = task_corpus
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root(cfg: BaseStageConfig) -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE") or cfg.cache_dir).expanduser()


class DocumentBatches:
    """An endless stream of batches of whole documents, one per row, reproducible from a seed.

    Each row is `<|endoftext|> document <|endoftext|>`, right-padded; documents are bucketed by length so little
    compute goes to padding. One document per row (rather than packing several) means the problem a trace refers
    to is the only one in view, as it is at inference time: the lookup of the next operand pair has no
    distractors from other problems.

    Yields (input_ids, attention_mask, labels), each (batch_size, T); labels are -100 on padding.
    """

    def __init__(self, tokenizer, max_len: int, batch_size: int, seed: int, direct_share: float = 0.1,
                 document=None):
        self.tok, self.max_len, self.batch_size = tokenizer, max_len, batch_size
        self.rng = random.Random(seed)
        self.direct_share = direct_share
        self.document = document or ArithmeticTask.corpus_document_of  # (rng, direct_share) -> one document
        self.sep = tokenizer.pad_token_id  # <|endoftext|>
        self.ready: list[list[list[int]]] = []

    def _refill(self) -> None:
        docs = [self.document(self.rng, self.direct_share) for _ in range(8 * self.batch_size)]
        rows = [[self.sep] + ids[: self.max_len - 2] + [self.sep] for ids in self.tok(docs, add_special_tokens=False)["input_ids"]]
        rows.sort(key=len)
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        self.rng.shuffle(batches)
        self.ready.extend(batches)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.ready:
            self._refill()
        rows = self.ready.pop()
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.sep, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return ids, mask, labels


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup, then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(cfg: BaseStageConfig, seed: int, out_dir: Path, metrics=None, device="cpu", task=None) -> Path:
    """Build tokenizer + model, pretrain on the corpus of `task` (its `corpus` hook; None: the embedded task's),
    and save an HF checkpoint to `out_dir` (atomically)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from posttrain.model import count_parameters, save_model, tiny_moe_config
    from posttrain.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(cfg.vocab_size, seed, task.tokenizer_texts(seed) if task is not None else ())
    mcfg = tiny_moe_config(
        len(tok),
        tok.pad_token_id,
        tok.eos_token_id,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate_size,
        intermediate_size=2 * cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=max(1, cfg.num_heads // 2),
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=max(512, cfg.seq_len),
    )
    mcfg._experts_implementation = "grouped_mm"
    model = AutoModelForCausalLM.from_config(mcfg).to(device)
    log.info("base: Qwen3-MoE %.2fM parameters, %d experts top-%d", count_parameters(model) / 1e6,
             cfg.num_experts, cfg.top_k)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95),
    )
    corpus = DocumentBatches(tok, cfg.seq_len, cfg.batch_size, seed,
                             document=task.corpus_document if task is not None else None)
    model.train()
    bar = tqdm(range(cfg.steps), desc="base pretrain", dynamic_ncols=True, mininterval=2.0)
    t0 = time.time()
    for step in bar:
        lr = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.learning_rate)
        for g in opt.param_groups:
            g["lr"] = lr
        x, mask, labels = (t.to(device) for t in corpus.next_batch())
        out = model(input_ids=x, attention_mask=mask, labels=labels, output_router_logits=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == cfg.steps - 1:
            m = {"train/loss": out.loss.item(), "train/aux_loss": float(out.aux_loss.detach()), "train/lr": lr,
                 "train/grad_norm": float(gnorm),
                 "train/tokens_per_s": (step + 1) * cfg.batch_size * x.shape[1] / (time.time() - t0)}
            bar.set_postfix(loss=f"{m['train/loss']:.3f}")
            if metrics is not None:
                metrics.log(step, m)
    bar.close()
    model.eval()
    return save_model(model, tok, out_dir)


def run(ctx) -> dict:
    """Stage entry: reuse the cached base model for these settings, or build it; copy it into the run dir."""
    cfg: BaseStageConfig = ctx.cfg.base
    task = build_task(ctx.cfg)
    if "corpus" not in task.hooks_for(ctx.cfg):
        log.info("base: the task %s has no corpus; pretraining on the embedded task's", task.name)
        task = None
    key = cache_key(cfg, ctx.cfg.seed, task.corpus_key() if task is not None else None)
    cached = cache_root(cfg) / key
    if (cached / "config.json").is_file():
        log.info("base: reusing cached model %s", cached)
        reused = True
    else:
        cached.parent.mkdir(parents=True, exist_ok=True)
        log.info("base: building and pretraining the tiny MoE (cache key %s)", key)
        pretrain(cfg, ctx.cfg.seed, cached, ctx.metrics, ctx.device, task)
        reused = False
    if ctx.stage.checkpoint.exists():
        shutil.rmtree(ctx.stage.checkpoint)
    shutil.copytree(cached, ctx.stage.checkpoint)
    return {"checkpoint": str(ctx.stage.checkpoint), "cache": str(cached), "reused_cache": reused}
