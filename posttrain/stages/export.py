"""`export` stage: the run's latest model as a standard PEFT LoRA adapter in RUN/export/adapter (`posttrain.export`:
the trained adapter of a LoRA run, or one extracted by per-matrix SVD from a full fine-tune, with its errors), or
with `export.merged` a full HF checkpoint in RUN/export/merged. The tokenizer and its chat template go beside it.
An extracted adapter carries the embedding rows training changed (`export.carry_embeddings`) and its changed norms and
biases (`export.carry_small_tensors`), and fails the stage when, loaded in plain PEFT, its KL to the trained model
exceeds `export.max_kl`, unless `export.allow_lossy`."""

from __future__ import annotations

from posttrain.runlog import log


def run(ctx) -> dict:
    from posttrain.export import export

    cfg = ctx.cfg.export
    out = ctx.stage.path / ("merged" if cfg.merged else "adapter")
    # modules a LoRA stage of this run trained whole (`lora.modules_to_save`: the embedding rows of added tokens)
    # are carried whole too, or the adapter would put their untrained weights back
    trained = [m for name in ("sft", "grpo", "ppo") if name in ctx.cfg.stages and getattr(ctx.cfg, name).lora.enabled
               for m in getattr(ctx.cfg, name).lora.modules_to_save]
    save = tuple(dict.fromkeys([*cfg.modules_to_save, *trained]))
    if len(save) > len(cfg.modules_to_save) and not cfg.merged:
        log.info("export: %s, trained whole by this run's LoRA stages, go whole into an extracted adapter",
                 save[len(cfg.modules_to_save):])
    report = export(ctx.model_path, out, merged=cfg.merged, rank=cfg.rank,
                    target_modules=cfg.target_modules, target_parameters=cfg.target_parameters,
                    modules_to_save=save, trust_remote_code=ctx.cfg.model.trust_remote_code,
                    allow_pickle=ctx.cfg.model.allow_pickle, carry_embeddings=cfg.carry_embeddings,
                    carry_small_tensors=cfg.carry_small_tensors, max_kl=cfg.max_kl, allow_lossy=cfg.allow_lossy,
                    probe_prompts=_probe_prompts(ctx.cfg))
    if report.get("uncovered_changed_params"):
        log.warning("export: training changed %d parameter tensors the adapter does not carry (e.g. %s); to ship "
                    "them, add matrices to export.target_modules / export.target_parameters and other modules to "
                    "export.modules_to_save", len(report["uncovered_changed_params"]),
                    list(report["uncovered_changed_params"])[:3])
    keys = ("kind", "source", "base", "rank", "max_relative_frobenius_error", "kl_tuned_vs_adapted",
            "kl_tuned_vs_base", "trainable_token_rows", "lossy")
    info = {k: report[k] for k in keys if k in report}
    log.info("export: %s", ", ".join(f"{k} {v}" for k, v in info.items()))
    return {**info, "merged" if cfg.merged else "adapter": str(out), "report": str(out / "export.json"),
            "produces_model": False}


def _probe_prompts(rc) -> list[str] | None:
    """The KL check's prompts: the recipe's task's held-out problems (a few of each difficulty), so an adapter is
    judged on the task it was trained for; None (embedded-task problems) where the task has none to give."""
    from posttrain.data import DataError
    from posttrain.tasks.task import build_task

    task = build_task(rc)
    try:
        problems = task.held_out(max(1, 32 // max(1, len(task.difficulties))), rc.eval.seed)
    except DataError:  # a file too small to hold rows out: the embedded task's problems
        return None
    return [p.expression for p in problems] or None
