"""`export` stage: the run's latest model as a standard PEFT LoRA adapter in RUN/export/adapter (`posttrain.export`:
the trained adapter of a LoRA run, or one extracted by per-matrix SVD from a full fine-tune, with its errors), or
with `export.merged` a full HF checkpoint in RUN/export/merged. The tokenizer and its chat template go beside it."""

from __future__ import annotations

from posttrain.runlog import log


def run(ctx) -> dict:
    from posttrain.export import export

    cfg = ctx.cfg.export
    out = ctx.stage.path / ("merged" if cfg.merged else "adapter")
    report = export(ctx.model_path, out, merged=cfg.merged, rank=cfg.rank,
                    target_modules=tuple(cfg.target_modules), target_parameters=tuple(cfg.target_parameters),
                    modules_to_save=tuple(cfg.modules_to_save), trust_remote_code=ctx.cfg.model.trust_remote_code,
                    allow_pickle=ctx.cfg.model.allow_pickle)
    keys = ("kind", "source", "base", "rank", "max_relative_frobenius_error", "kl_tuned_vs_adapted",
            "kl_tuned_vs_base")
    info = {k: report[k] for k in keys if k in report}
    log.info("export: %s", ", ".join(f"{k} {v}" for k, v in info.items()))
    return {**info, "merged" if cfg.merged else "adapter": str(out), "report": str(out / "export.json"),
            "produces_model": False}
