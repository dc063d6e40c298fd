"""`export` stage: the run's latest model as a standard PEFT LoRA adapter in RUN/export/adapter (`posttrain.export`:
the trained adapter of a LoRA run, or one extracted by per-matrix SVD from a full fine-tune, with its errors), or
with `export.merged` a full HF checkpoint in RUN/export/merged. The tokenizer and its chat template go beside it."""

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
                    target_modules=tuple(cfg.target_modules), target_parameters=tuple(cfg.target_parameters),
                    modules_to_save=save, trust_remote_code=ctx.cfg.model.trust_remote_code,
                    allow_pickle=ctx.cfg.model.allow_pickle)
    if report.get("uncovered_changed_params"):
        log.warning("export: training changed %d parameter tensors the adapter does not carry (e.g. %s); to ship "
                    "them, add linear layers to export.target_modules and norms or embeddings to "
                    "export.modules_to_save", len(report["uncovered_changed_params"]),
                    list(report["uncovered_changed_params"])[:3])
    keys = ("kind", "source", "base", "rank", "max_relative_frobenius_error", "kl_tuned_vs_adapted",
            "kl_tuned_vs_base")
    info = {k: report[k] for k in keys if k in report}
    log.info("export: %s", ", ".join(f"{k} {v}" for k, v in info.items()))
    return {**info, "merged" if cfg.merged else "adapter": str(out), "report": str(out / "export.json"),
            "produces_model": False}
