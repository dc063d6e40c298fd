"""`sweep` stage: the budget-vs-accuracy sweep (`posttrain.eval.sweep`) of this run's models, into RUN/sweep/.

Models: `sweep.models` (stage names or paths), by default every sft/grpo/ppo/distill stage listed before this one,
every flywheel round's included (the SFT checkpoint, the RL checkpoints and the distilled student side by side),
labelled by stage name. One set of rollout workers (Ray actors unless `sweep.backend` is `local`) serves them all;
the run's threads are split across the workers.
Problems: the embedded task's, or with `data.source: file`/`hub` the rows the RL stages hold out for evaluation
(`rl_problems.evaluation_rows`, `n_per_difficulty` of each `data.difficulty_column` value), graded by the data's
grader (`data.grader`).
Modes: natural, capped and forced (`eval.sweep.MODES`); the paired comparison of capped against forced
(`eval/forcing.py`) goes to RUN/sweep/forcing.json and .csv, the table and done.json's `forcing`.
"""

from __future__ import annotations

import os
from pathlib import Path

from posttrain.runlog import log

MODEL_STAGES = ("sft", "grpo", "ppo", "distill")


def sweep_models(ctx) -> list:
    """ModelSpecs labelled by stage name (or path) for the sweep."""
    from posttrain.eval.sweep import ModelSpec, SweepError, resolve_model
    from posttrain.rounds import kind_of
    from posttrain.runlog import StageDir

    cfg, stages = ctx.cfg.sweep, ctx.cfg.stages
    names = list(cfg.models) or [s for s in stages[: stages.index("sweep")] if kind_of(s) in MODEL_STAGES]
    if not names:
        return [ModelSpec("model", Path(ctx.model_path))]
    specs = []
    for name in names:
        if name not in stages:
            specs.append(resolve_model(name))
            continue
        stage = StageDir(ctx.run_dir, name)
        ckpt = stage.finished_checkpoint()
        if not ckpt or not (Path(ckpt) / "config.json").is_file():
            raise SweepError(f"sweep: stage {name!r} has no finished checkpoint ({stage.done_file})")
        specs.append(ModelSpec(name, Path(ckpt)))
    return specs


def summary(rows: list[dict]) -> list[dict]:
    """The overall (difficulty "all") numbers per model, budget and mode: what done.json keeps."""
    keys = ("model", "budget", "mode", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "think_tokens_mean",
            "adherence", "forced_share")
    return [{k: r[k] for k in keys} for r in rows if r["difficulty"] == "all"]


def run(ctx) -> dict:
    from posttrain.eval.plots import plot_all
    from posttrain.eval.report import format_sweep_table, write_outputs
    from posttrain.eval.sweep import run_sweep

    cfg, rc = ctx.cfg.sweep, ctx.cfg
    specs = sweep_models(ctx)
    budgets = [None if b == "auto" else int(b) for b in cfg.budgets]
    diffs = list(range(rc.task.min_difficulty, rc.task.max_difficulty + 1))
    threads = rc.threads or os.cpu_count() or 1
    ray = getattr(rc, "ray", None)  # the recipe's `ray` section: where a cluster is, how big a local instance
    ray_init = {"address": ray.address, "num_cpus": ray.num_cpus} if ray is not None else None
    log.info("sweep: %s on %d %s worker(s), budgets %s", ", ".join(s.label for s in specs), cfg.workers,
             cfg.backend, cfg.budgets)
    from posttrain.tasks.task import build_task

    task = build_task(rc)
    problems = task.held_out(cfg.n_per_difficulty, cfg.seed)  # rows no stage trained on, or fresh problems
    log.info("sweep: %d held-out problems of %s", len(problems), task.where)
    result = run_sweep(specs, budgets, cfg.n_per_difficulty, cfg.seed, diffs, cfg.max_new_tokens, cfg.batch_size,
                       str(ctx.device), cfg.workers, cfg.backend, max(1, threads // cfg.workers), ray_init, problems,
                       rc.data.grader_name, engine=cfg.rollout_engine.model_dump())
    rows = result.rows
    out = write_outputs(rows, ctx.stage.path, result.forcing)
    plots = plot_all(rows, out)
    table = format_sweep_table(rows, result.forcing)
    (out / "table.txt").write_text(table + "\n")
    for r in summary(rows):
        key = f"{r['model']}/budget_{r['budget']}/{r['mode']}"
        ctx.metrics.log(0, {f"sweep/accuracy/{key}": r["accuracy"],
                            f"sweep/think_tokens/{key}": r["think_tokens_mean"]})
    log.info("sweep: %s\n%s", out, table)
    return {"models": {s.label: str(s.adapter or s.checkpoint) for s in specs}, "sweep": str(out / "sweep.json"),
            "plots": [str(p) for p in plots], "summary": summary(rows), "forcing": result.forcing, "table": table,
            "produces_model": False}
