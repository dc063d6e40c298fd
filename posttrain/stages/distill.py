"""`distill` stage: distil a teacher (an earlier stage's model, or a checkpoint) into a smaller MoE student.

1. Teacher: `distill.teacher`, a model-producing stage run before this one (its checkpoint in this run directory),
   a checkpoint directory, or by default the model of the stage before.
2. Student: `distill.student`, the teacher's architecture with fewer layers / experts (initialised from the
   teacher's first layers and experts by default: `posttrain.distill_student`), or a checkpoint directory with the
   teacher's tokenizer.
3. Data: one teacher sample per training problem under the SFT budget mix, and the teacher's top-k distribution at
   every response position, computed once into RUN/distill/targets/ and reused by a rerun
   (`posttrain.distill_targets`).
4. Training: `distill.loss` on the response positions (`posttrain.algo.distill`: forward KL to the k-sparse
   target, to the full distribution computed on the fly, or cross-entropy of the sampled tokens; all three train
   on the same stored sequences, so they compare on equal data), AdamW with linear warmup and cosine decay, the MoE
   router's balancing loss added as in pretraining.
5. Resume: every `distill.save_every` steps the student's weights, the optimizer and the loop's place (the step,
   the shuffled order and its generator, the losses so far) are saved atomically into RUN/distill/state/
   (`posttrain.rlstate`). A run killed mid-distillation and started again reuses the stored targets and continues
   from the newest good save; what it then trains is what the uninterrupted run trains, bit for bit on the same
   machine and threads (`tests/test_distill_resume.py`). A save made under other training settings is ignored.

The stage returns the student's `checkpoint`, so later stages take it as their model, and `sweep` overlays it with
the teacher (`sweep.models: [grpo, distill]`). Its done.json `summary` has the storage (bytes per target position,
k-sparse against fp16 full logits), the student's training throughput (tokens/s, the teacher's forward included
with `full_kl`), both parameter counts, the final loss and the step a resumed run started from.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.runlog import log


def resolve_teacher(ctx) -> Path:
    """The teacher checkpoint: `distill.teacher`'s stage's (in this run directory), its path, or the latest model."""
    from posttrain.config_distill import TEACHER_STAGES
    from posttrain.recipe import RecipeError
    from posttrain.rounds import kind_of
    from posttrain.runlog import StageDir

    name = ctx.cfg.distill.teacher
    if name is None:
        if ctx.model_path is None:
            raise RecipeError("distill.teacher: no model before the distill stage; name a stage or a checkpoint")
        return Path(ctx.model_path)
    if name in ctx.cfg.stages and kind_of(name) in TEACHER_STAGES:
        ckpt = StageDir(ctx.run_dir, name).finished_checkpoint()
        if ckpt is None or not (ckpt / "config.json").is_file():
            raise RecipeError(f"distill.teacher: stage {name!r} has no finished checkpoint in {ctx.run_dir / name}")
        return ckpt
    return Path(name).expanduser()


def targets_key(rc, teacher: Path) -> dict:
    """What the stored targets depend on (`distill_targets.prepare_targets` resamples when it changes)."""
    from posttrain.distill_targets import FORMAT, teacher_fingerprint

    cfg = rc.distill
    return {"format": FORMAT, "teacher": teacher_fingerprint(teacher), "k": cfg.k, "n_examples": cfg.n_examples,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": rc.seed,
            "sft_budgets": rc.sft.model_dump(mode="json")["budgets"], "sft_mix": rc.sft.mix.model_dump(mode="json"),
            "task": rc.task.model_dump(mode="json"), "data": rc.data.model_dump(mode="json")}


def _batch_inputs(kind: str, batch, ids, mask, positions, teacher) -> dict:
    """The targets `algo.distill.distill_loss(kind, ...)` needs for this batch's N response positions."""
    if kind == "sparse_kl":
        device = ids.device
        return {"ids": torch.cat([s.topk_ids for s in batch]).to(device),
                "logp": torch.cat([s.topk_logp for s in batch]).to(device),
                "tail_logp": torch.cat([s.tail_logp for s in batch]).to(device)}
    if kind == "full_kl":
        with torch.no_grad():
            return {"teacher_logits": teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[positions]}
    return {"target_ids": torch.roll(ids, -1, dims=1)[positions]}  # position t predicts token t + 1


@dataclass
class Progress:
    """Where the training loop stands after `step` steps: what a saved state holds besides the weights and the
    optimizer (`save_progress` / `resume`), so that a resumed run continues the uninterrupted one exactly."""

    step: int = 0
    order: list[int] = field(default_factory=list)  # the current pass's sequence indices not yet drawn
    rng: tuple = ()  # the shuffling generator's `random.Random.getstate()`
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


def training_key(cfg, targets: dict) -> dict:
    """What a saved training state depends on: the stored targets' key and the `distill` keys that change the
    student's training (not how often it logs or saves). A state saved under another key is not resumed."""
    own = cfg.model_dump(mode="json", exclude={"teacher", "logging_steps", "save_every", "keep_checkpoints"})
    return {"targets": targets, "distill": own}


def save_progress(state_root: Path, student, opt, progress: Progress, key: dict, keep: int) -> Path:
    """The student's weights, the optimizer and `progress` into state_root/step_NNNNNN/, atomically and verified on
    load (`posttrain.rlstate`: a SIGKILL mid-save leaves the previous save as it was)."""
    from safetensors.torch import save_model as save_weights

    from posttrain.rlstate import save_state

    def write(d: Path) -> None:
        save_weights(student, str(d / "model.safetensors"))
        with open(d / "optimizer.pt", "wb") as f:
            torch.save({"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}, f)

    driver = {"key": key, "order": progress.order, "rng": progress.rng, "losses": progress.losses,
              "tokens": progress.tokens, "seconds": progress.seconds}
    return save_state(state_root, progress.step, write, driver, keep=keep)


def resume(state_root: Path, student, opt, key: dict, steps: int, metrics) -> Progress | None:
    """Load the newest good save under `state_root` into `student` and `opt`; its `Progress`, or None (train from
    the start) when there is none or it was saved under another `training_key` (with a warning naming the keys)."""
    from safetensors.torch import load_model as load_weights

    from posttrain.rlstate import latest

    found = latest(state_root)
    if found is None:
        return None
    d, driver = found
    if driver.get("key") != key:
        old = driver.get("key") or {}
        changed = sorted(k for part in ("targets", "distill") for k in set(old.get(part, {})) | set(key[part])
                         if old.get(part, {}).get(k) != key[part].get(k))
        log.warning("distill: the saved state %s is of other settings (%s); training the student from the start", d,
                    ", ".join(changed) or "an older format")
        return None
    load_weights(student, str(d / "model.safetensors"))
    saved = torch.load(d / "optimizer.pt", weights_only=True)
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    version, internal, gauss = driver["rng"]
    progress = Progress(int(driver["step"]), list(driver["order"]), (version, tuple(internal), gauss),
                        list(driver["losses"]), int(driver["tokens"]), float(driver["seconds"]))
    metrics.resume_at(progress.step)  # what the killed run logged after this save
    log.info("distill: resuming the student from %s (step %d of %d)", d, progress.step, steps)
    return progress


def train_student(student, teacher, seqs: list, cfg, seed: int, pad_id: int, metrics, state_root: Path,
                  key: dict) -> dict:
    """`cfg.steps` AdamW steps of `cfg.loss` on batches of `seqs` (`distill_targets.Sequence`, reshuffled each
    pass), resumed from the newest save under `state_root` made under `key` and saved there every `cfg.save_every`
    steps; returns the losses and the throughput (sequence tokens per second of training steps)."""
    from posttrain.algo.distill import distill_loss
    from posttrain.distill_targets import pad_batch
    from posttrain.model import is_moe_config
    from posttrain.stages.base import lr_at

    device = next(student.parameters()).device
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    aux_coef = float(getattr(student.config, "router_aux_loss_coef", 0.0) or 0.0)
    aux_coef = aux_coef if is_moe_config(student.config) else 0.0
    warmup = int(cfg.warmup_ratio * cfg.steps)
    p = resume(state_root, student, opt, key, cfg.steps, metrics)
    resumed_at = p.step if p is not None else 0
    if p is None:
        metrics.resume_at(0)  # what a run killed before its first save logged
        p = Progress(rng=random.Random(seed).getstate())
    rng = random.Random()
    rng.setstate(p.rng)
    student.train()
    while p.step < cfg.steps:
        step = p.step
        while len(p.order) < cfg.batch_size:
            fresh = list(range(len(seqs)))
            rng.shuffle(fresh)
            p.order += fresh
        batch, p.order = [seqs[i] for i in p.order[: cfg.batch_size]], p.order[cfg.batch_size:]
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, warmup, cfg.learning_rate)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, mask, positions = (t.to(device) for t in pad_batch([s.input_ids for s in batch],
                                                                 [s.prompt_len for s in batch], pad_id))
        out = student(input_ids=ids, attention_mask=mask, use_cache=False, output_router_logits=aux_coef > 0)
        loss, m = distill_loss(cfg.loss, out.logits[positions], tail=cfg.tail,
                               **_batch_inputs(cfg.loss, batch, ids, mask, positions, teacher))
        total = loss + aux_coef * out.aux_loss if aux_coef > 0 else loss
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        p.seconds += time.perf_counter() - t0
        p.tokens += int(mask.sum())
        p.losses.append(m["distill/loss"])
        p.step += 1
        if step % cfg.logging_steps == 0 or p.step == cfg.steps:
            metrics.log(step, {**m, "train/lr": lr, "train/grad_norm": float(gnorm),
                               "train/tokens_per_s": p.tokens / p.seconds})
            log.info("distill: step %d/%d loss %.4f top1 %.3f", p.step, cfg.steps, m["distill/loss"],
                     m["distill/top1_match"])
        if cfg.save_every and p.step % cfg.save_every == 0 and p.step < cfg.steps:
            p.rng = rng.getstate()
            save_progress(state_root, student, opt, p, key, cfg.keep_checkpoints)
    student.eval()
    tail = p.losses[-min(10, len(p.losses)):]
    return {"first_loss": p.losses[0], "final_loss": sum(tail) / len(tail), "tokens_per_s": p.tokens / p.seconds,
            "train_seconds": round(p.seconds, 2), "train_tokens": p.tokens, "resumed_at_step": resumed_at}


def run(ctx) -> dict:
    from posttrain.distill_student import build_student
    from posttrain.distill_targets import bytes_per_position, plan_samples, prepare_targets
    from posttrain.model import check_chat_template, count_parameters, load_model, load_tokenizer, save_model
    from posttrain.recipe import RecipeError
    from posttrain.tasks.task import build_task

    cfg, rc = ctx.cfg.distill, ctx.cfg
    teacher_path = resolve_teacher(ctx)
    tok = load_tokenizer(teacher_path, rc.model.trust_remote_code)
    check_chat_template(tok, teacher_path)
    load_kwargs = {"trust_remote_code": rc.model.trust_remote_code, "allow_pickle": rc.model.allow_pickle,
                   "experts_implementation": rc.model.experts_implementation}
    teacher = load_model(teacher_path, ctx.device, ctx.dtype, **load_kwargs)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if cfg.k > vocab:
        raise RecipeError(f"distill.k: {cfg.k} is more than the teacher's vocabulary ({vocab} ids)")
    student, described = build_student(cfg.student, teacher, tok, ctx.device, ctx.dtype, load_kwargs)  # refused early
    n_teacher, n_student = count_parameters(teacher), count_parameters(student)
    log.info("distill: teacher %s (%.2fM parameters) -> student %s (%.2fM), loss %s", teacher_path, n_teacher / 1e6,
             described, n_student / 1e6, cfg.loss)
    examples = build_task(rc).train_examples(cfg.n_examples, rc.seed + 1, ctx.run_dir / "bad_rows.jsonl")
    plan = plan_samples(examples, rc.sft.budgets, rc.sft.mix, rc.seed + 2)
    key = targets_key(rc, teacher_path)
    seqs, stats = prepare_targets(ctx.stage.path / "targets", key, teacher, tok, plan, cfg.k, cfg.max_new_tokens,
                                  cfg.temperature, cfg.batch_size, rc.seed + 3)
    log.info("distill: %d sequences, %d target positions (%d of %d shards reused)", stats["sequences"],
             stats["target_positions"], stats["reused_shards"], stats["shards"])
    if cfg.loss != "full_kl":
        del teacher  # only full_kl asks the teacher during training
        teacher = None
    trained = train_student(student, teacher, seqs, cfg, rc.seed, tok.pad_token_id, ctx.metrics,
                            ctx.stage.path / "state", training_key(cfg, key))
    save_model(student, tok, ctx.stage.checkpoint)
    sparse = bytes_per_position(cfg.k)
    summary = {
        "loss": cfg.loss, "tail": cfg.tail, "k": cfg.k, "vocab": vocab,
        "bytes_per_token_sparse": sparse, "bytes_per_token_full": 2 * vocab,
        "storage_fraction": sparse / (2 * vocab),
        "bytes_on_disk_per_token": stats["bytes_on_disk"] / max(1, stats["target_positions"]),
        "targets": {**stats, "reused": stats["reused_shards"] == stats["shards"]},
        "teacher_parameters": n_teacher, "student_parameters": n_student, "student": described,
        **trained,
    }
    return {"checkpoint": str(ctx.stage.checkpoint), "teacher": str(teacher_path), "summary": summary}
