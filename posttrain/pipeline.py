"""Running a recipe: its stages in order into the run directory, skipping stages that already finished."""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import RecipeConfig
from posttrain.recipe import dump_recipe
from posttrain.runlog import read_json
from posttrain.runlock import RunLock
from posttrain.runlog import MetricsWriter, StageDir, log, setup_logging


@dataclass
class StageContext:
    cfg: RecipeConfig
    run_dir: Path
    stage: StageDir
    metrics: MetricsWriter
    device: object
    dtype: object
    model_path: Path | None  # checkpoint produced by the latest model-producing stage (or model.path)
    name: str = ""  # the stage's name in `stages` (`sft@2` in a later flywheel round: `posttrain.rounds`)

    @property
    def round(self) -> int:
        from posttrain.rounds import split_stage

        return split_stage(self.name)[1] if self.name else 1

    def latest(self, kind: str) -> str | None:
        """The name of the last stage of `kind` (any round) before this one; None when there is none, or when this
        context is no stage of the recipe (the benchmark's)."""
        from posttrain.rounds import latest

        return latest(self.cfg.stages, self.name, kind) if self.name in self.cfg.stages else None


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_recipe(cfg: RecipeConfig) -> dict:
    """Run every stage of `cfg`; returns {stage: info}. A finished stage is skipped and says so. The run
    directory is locked for the duration (`posttrain.runlock`)."""
    run_dir = Path(cfg.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    ray_before = _ray_running()
    with RunLock(run_dir):
        try:
            return _run_stages(cfg, run_dir)
        finally:
            if not ray_before and _ray_running():  # a stage started Ray (`init_ray`): stop what we started only
                from posttrain.workers.ray_cluster import shutdown_ray

                shutdown_ray()


def _ray_running() -> bool:
    """Whether Ray is initialised in this process (without importing it when nothing has)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


# What a stage's result depends on besides its own recipe section: these sections are shared by every stage.
# How a stage runs (device, dtype, threads, ray) and which stages run are not compared.
SHARED_SECTIONS = ("seed", "model", "data", "task")
HOW_NOT_WHAT = ("base.cache_dir", "sweep.workers", "sweep.backend",  # where or how fast, not the result
                "model.experts_implementation", "model.trust_remote_code", "model.allow_pickle")


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def stage_settings(recipe: dict, name: str) -> dict:
    """The recipe keys a stage's result depends on (flattened `key.path: value`): its own section (a later round's
    `sft@2` that of `sft`) and the shared ones, without what only changes how it runs; `data.*` besides
    `data.source` only when a data file is read, and then also which rows the RL stages hold out
    (`held_out.grpo`/`.ppo`: their eval budgets and size); `distill` also depends on `sft.budgets` and `sft.mix`
    (its teacher samples under them), a later round's sft on the `flywheel` section (its data)."""
    from posttrain.rounds import split_stage

    stage, rnd = split_stage(name)
    flat = {}
    for section in SHARED_SECTIONS + (stage,):
        flat.update(_flatten(recipe.get(section), f"{section}."))
    if stage == "sft" and rnd > 1:
        fw = _flatten(recipe.get("flywheel"), "flywheel.")
        flat.update({k: v for k, v in fw.items() if k != "flywheel.rounds"})
    if stage == "distill":  # the teacher samples under the SFT stage's budget mix
        sft = recipe.get("sft") or {}
        flat.update(_flatten({"budgets": sft.get("budgets"), "mix": sft.get("mix")}, "sft."))
    from posttrain.tasks.task import task_class

    embedded = not task_class(flat.get("data.source") or "arithmetic").holds_out_rows  # reads no data.* key
    if not embedded and stage not in ("base", "export"):
        # a data file's rows that the RL stages hold out: what sft, rm and RL leave out, what eval and sweep
        # evaluate; rm also samples first the rows sft does not train on
        if stage == "rm":
            flat["sft.n_examples"] = (recipe.get("sft") or {}).get("n_examples")
        for algo in ("grpo", "ppo"):
            if algo in (recipe.get("stages") or []):
                sec = recipe.get(algo) or {}
                flat[f"held_out.{algo}"] = [sec.get("eval_budgets"), sec.get("eval_n_per_difficulty"),
                                            sec.get("eval_rows")]
    return {k: v for k, v in flat.items()
            if k not in HOW_NOT_WHAT and not (embedded and k.startswith("data.") and k != "data.source")}


def _changes(old: dict, new: dict, stage: str | None = None) -> list[str]:
    """The settings that differ, as `key: old -> new`. A key the old settings lack (a recipe key added since) is no
    change while its new value is the key's default: the result did not depend on it then either. A recipe key the
    new settings lack has left the schema, and is no change either; the derived keys (`held_out.*`, and `data.*`
    when `data.source` changes) still are."""
    defaults = stage_settings(RecipeConfig().model_dump(mode="json"), stage) if stage else {}

    def same(k) -> bool:
        if old.get(k) == new.get(k):
            return True
        if k not in old:
            return k in defaults and new.get(k) == defaults[k]
        return k not in new and not k.startswith(("held_out.", "data.", "sft.n_examples"))

    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if not same(k)]


def _previous_recipe(path: Path) -> dict | None:
    """The recipe the run directory recorded last, defaults filled in (not validated: its paths may be gone)."""
    import yaml

    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None

    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            return {k: merge(base.get(k), over[k]) if k in over else base[k] for k in {**base, **over}}
        return over

    return merge(RecipeConfig().model_dump(mode="json"), raw) if isinstance(raw, dict) else None


def check_unchanged(cfg: RecipeConfig, run_dir: Path) -> None:
    """Running a run directory again with settings that a finished stage depends on (`stage_settings`, recorded in
    its done.json when it finished) would skip that stage and leave results that no longer match the recipe, so it
    stops, naming the keys; a stage that is part way through resumes with the new settings and says which changed
    (against the recipe.yaml the run directory recorded last)."""
    from posttrain.recipe import RecipeError

    new = cfg.model_dump(mode="json")
    old = _previous_recipe(run_dir / "recipe.yaml")
    for name in cfg.stages:
        stage_dir, now = run_dir / name, stage_settings(new, name)
        if (stage_dir / "done.json").is_file():
            recorded = read_json(stage_dir / "done.json", f"that stage {name} finished").get("settings")
            if recorded is None and old is not None:  # finished before settings were recorded
                recorded = stage_settings(old, name)
            changes = _changes(recorded, now, name) if recorded is not None else []
            if changes:
                raise RecipeError(
                    f"{run_dir}: stage {name} finished with other settings than this recipe's:\n  "
                    + "\n  ".join(changes)
                    + f"\nits results would not match the recipe. Run into a new directory (--run-dir), put those "
                      f"values back, or delete {stage_dir} (and the stages after it) to run it again")
        elif old is not None and stage_dir.is_dir() and any(stage_dir.iterdir()):
            changes = _changes(stage_settings(old, name), now, name)
            if changes:
                log.warning("stage %s resumes with changed settings: %s", name, "; ".join(changes))


def _run_stages(cfg: RecipeConfig, run_dir: Path) -> dict:
    import torch

    from posttrain.model import pick_device, pick_dtype
    from posttrain.rounds import kind_of
    from posttrain.stages import get_stage

    setup_logging(run_dir / "run.log")
    check_unchanged(cfg, run_dir)
    from posttrain.tasks.task import build_task

    build_task(cfg).record(run_dir)  # every bad row named at once, before any stage loads a model
    tmp = run_dir / "recipe.yaml.tmp"  # written whole or not at all: the next run compares against it
    tmp.write_text(dump_recipe(cfg))
    tmp.replace(run_dir / "recipe.yaml")
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    log.info("run %s: stages %s on %s (%s)", run_dir, " -> ".join(cfg.stages), device, str(dtype).removeprefix("torch."))
    model_path = Path(cfg.model.path).expanduser() if cfg.model.path else None
    results = {}
    for name in cfg.stages:
        stage = StageDir(run_dir, name)
        if stage.is_done():
            info = stage.done_info()
            log.info("stage %s already finished (%s); nothing to do", name, stage.done_file)
        else:
            seed_everything(cfg.seed)
            metrics = MetricsWriter(stage.path)
            t0 = time.time()
            ctx = StageContext(cfg, run_dir, stage, metrics, device, dtype, model_path, name)
            try:
                info = get_stage(kind_of(name))(ctx)
            finally:
                metrics.close()
            info["seconds"] = round(time.time() - t0, 1)
            info["settings"] = stage_settings(cfg.model_dump(mode="json"), name)  # what `check_unchanged` compares
            stage.mark_done(info)
            log.info("stage %s finished in %.0fs", name, info["seconds"])
        if "checkpoint" in info:  # the stage's own folder: done.json's path is relative to where the run began
            model_path = stage.checkpoint
        results[name] = info
    _write_round_summary(cfg, run_dir)
    return results


def _write_round_summary(cfg: RecipeConfig, run_dir: Path) -> None:
    """With flywheel rounds: each round's SFT and RL model side by side (`posttrain.rounds.round_summary`), logged
    and written to RUN/rounds.json and RUN/rounds.txt."""
    from posttrain.stages.rounds_report import format_rounds, round_summary
    from posttrain.runlog import write_json_atomic

    summary = round_summary(run_dir, cfg.stages)
    if summary is None:
        return
    text = format_rounds(summary)
    write_json_atomic(run_dir / "rounds.json", summary)
    (run_dir / "rounds.txt").write_text(text + "\n")
    log.info("flywheel rounds (%s):\n%s", run_dir / "rounds.json", text)
