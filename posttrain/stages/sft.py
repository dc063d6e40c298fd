"""`sft` stage: teach the thinking format and rough budget following with TRL's SFTTrainer.

Loss on the assistant part only (`completion_mask`). Full fine-tune, or LoRA (PEFT) on the attention projections
and, through `target_parameters`, the fused 3-D expert weights. A LoRA run saves the adapter (`adapter/`) and
the merged model (`checkpoint/`), so later stages load one kind of checkpoint either way.

A later flywheel round (`sft@2`, ...: `posttrain.rounds`) trains on the previous round's model's own accepted
samples mixed with the task's demonstrations (`posttrain.flywheel`), from that model or round 1's starting point
(`flywheel.init`), for `flywheel.steps` at `flywheel.learning_rate` when they are set.
"""

from __future__ import annotations

import shutil
from collections import Counter

import torch

from posttrain.runlog import log


def _metrics_callback(metrics):
    from transformers import TrainerCallback

    class JsonlMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                metrics.log(state.global_step, {f"train/{k}": v for k, v in logs.items() if isinstance(v, (int, float))})

    return JsonlMetrics()


def run(ctx) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from posttrain.model import check_chat_template, load_model, load_tokenizer, peft_config, save_model
    from posttrain.prepare import check_added_tokens
    from posttrain.tasks.task import build_task

    cfg, rc = ctx.cfg.sft, ctx.cfg
    tok = load_tokenizer(ctx.model_path, rc.model.trust_remote_code)
    check_chat_template(tok, ctx.model_path)
    check_added_tokens(ctx.model_path, cfg.lora, "sft.lora", rc.model.trust_remote_code)
    model = load_model(ctx.model_path, ctx.device, ctx.dtype, rc.model.trust_remote_code, rc.model.allow_pickle,
                       rc.model.experts_implementation)
    task = build_task(rc)
    steps, lr, flywheel = cfg.steps, cfg.learning_rate, None
    if ctx.round > 1:
        fw = rc.flywheel
        rows, flywheel = round_rows(ctx, tok, model, task)
        steps, lr = fw.steps or steps, fw.learning_rate or lr
        if fw.init == "base":
            del model
            model = load_model(round_one_input(ctx), ctx.device, ctx.dtype, rc.model.trust_remote_code,
                               rc.model.allow_pickle, rc.model.experts_implementation)
    else:
        rows = demonstrations(ctx, tok, task, cfg.n_examples)
    if not rows:
        raise ValueError(f"sft: every example is longer than sft.max_length={cfg.max_length} tokens")
    modes = Counter(r["mode"] for r in rows)
    log.info("%s: %d examples (%s)", ctx.name or "sft", len(rows),
             ", ".join(f"{k} {v}" for k, v in sorted(modes.items())))
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows])

    out = ctx.stage.path / "trainer"
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(cfg.warmup_ratio * steps),
        weight_decay=0.0,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=rc.seed,
        data_seed=rc.seed,
        max_length=cfg.max_length,
        completion_only_loss=True,
        bf16=ctx.dtype == torch.bfloat16,
        use_cpu=ctx.device.type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_config(cfg.lora, model) if cfg.lora.enabled else None,
        callbacks=[_metrics_callback(ctx.metrics)],
    )
    result = trainer.train()
    trained = trainer.model
    info = {"train_loss": result.training_loss, "examples": len(rows), "modes": dict(modes), "lora": cfg.lora.enabled}
    if flywheel is not None:
        info["flywheel"] = flywheel
    if cfg.lora.enabled:
        # the adapter export ships as it is (`adapter`) holds only on the run's starting model; a later round's on
        # the previous round's model is kept as `round_adapter`, and export extracts one from the merged checkpoint
        key = adapter_key(ctx.round, rc.flywheel.init)
        trained.save_pretrained(ctx.stage.path / key, safe_serialization=True)
        tok.save_pretrained(ctx.stage.path / key)
        trained = trained.merge_and_unload()
        info[key] = str(ctx.stage.path / key)
    trained.eval()
    save_model(trained, tok, ctx.stage.checkpoint)
    shutil.rmtree(out, ignore_errors=True)
    info["checkpoint"] = str(ctx.stage.checkpoint)
    return info


def demonstrations(ctx, tok, task, n: int) -> list[dict]:
    """`n` SFT rows of the task's demonstrations under the sft budgets and mix; a later round draws its own (the
    seeds shifted by the round)."""
    from posttrain.sft_data import build_sft_examples

    rc, cfg = ctx.cfg, ctx.cfg.sft
    shift = 7919 * (ctx.round - 1)
    examples = task.train_examples(n, rc.seed + 1 + shift, ctx.run_dir / "bad_rows.jsonl")
    return build_sft_examples(tok, examples, cfg.budgets, cfg.mix, rc.seed + 2 + shift, cfg.max_length,
                              fit=task.budget_demonstration)


def adapter_key(round_: int, init: str) -> str:
    """Where a LoRA sft stage saves its adapter: `adapter` (what export ships) when it trained on the run's starting
    model (round 1, or a later round with `flywheel.init: base`), else `round_adapter`.

    >>> adapter_key(1, "previous"), adapter_key(2, "base"), adapter_key(2, "previous")
    ('adapter', 'adapter', 'round_adapter')
    """
    return "adapter" if round_ == 1 or init == "base" else "round_adapter"


def round_one_input(ctx):
    """The model round 1's sft started from: the base stage's checkpoint, or `model.path`."""
    from pathlib import Path

    from posttrain.runlog import StageDir

    stages = ctx.cfg.stages
    if "base" in stages and stages.index("base") < stages.index("sft"):
        return StageDir(ctx.run_dir, "base").finished_checkpoint()
    return Path(ctx.cfg.model.path).expanduser()


def round_rows(ctx, tok, model, task) -> tuple[list[dict], dict]:
    """A later round's SFT rows: `model` (the previous round's, at `ctx.model_path`) samples `flywheel.n_prompts`
    fresh problems (`posttrain.flywheel`), its accepted samples become rows, and the task's demonstrations are mixed
    in at `flywheel.demo_share`. Returns (rows, the round's data report)."""
    from posttrain.distill_targets import teacher_fingerprint
    from posttrain.flywheel import demo_count, report_of, sample_round_data, sample_rows
    from posttrain.recipe import RecipeError

    rc, cfg, fw = ctx.cfg, ctx.cfg.sft, ctx.cfg.flywheel
    seed = rc.seed + 7919 * ctx.round  # fresh problems and samples each round
    problems = task.rm_problems(fw.n_prompts, seed)
    genrm = None
    if fw.genrm:
        rm = ctx.latest("rm")
        genrm = ctx.run_dir / rm / "genrm" if rm else None
        if genrm is None or not (genrm / "config.json").is_file():
            raise RecipeError(f"flywheel.genrm: {ctx.name} filters its samples by the GenRM of the latest rm stage "
                              f"before it, and {'there is none' if rm is None else f'{genrm} holds none'}; run rm "
                              "(with rm.genrm.enabled) before it, or set flywheel.genrm: false")
    key = {"model": teacher_fingerprint(ctx.model_path), "seed": seed, "problems": len(problems),
           "sft": cfg.model_dump(mode="json", include={"budgets", "mix"}),
           "flywheel": fw.model_dump(mode="json", include={"n_prompts", "samples_per_prompt", "keep_per_prompt",
                                                           "temperature", "max_new_tokens", "genrm",
                                                           "genrm_threshold"})}
    samples = sample_round_data(model, tok, problems, fw, cfg, seed, task.grader, genrm,
                                ctx.stage.path / "flywheel_samples.json", key)
    sampled = sample_rows(tok, samples, cfg.max_length)
    if not sampled:
        raise ValueError(f"{ctx.name}: none of the {len(samples)} samples of {ctx.model_path} was accepted (graded "
                         "correct and within its budget); nothing to train the round on. Raise flywheel.n_prompts or "
                         "flywheel.samples_per_prompt")
    n_demo = demo_count(len(sampled), fw.demo_share)
    demos = []
    if n_demo:
        demos = demonstrations(ctx, tok, task, n_demo)
    report = report_of(samples) | {"sampled_by": str(ctx.model_path), "sampled_rows": len(sampled),
                                   "demo_rows": len(demos)}
    log.info("%s: %d of %d samples of %s kept (%d problems); %d demonstrations mixed in; by mode %s", ctx.name,
             report["kept"], report["samples"], ctx.model_path, report["problems_kept"], len(demos),
             {m: f"{c['kept']}/{c['samples']}" for m, c in report["by_mode"].items()})
    return sampled + demos, report
