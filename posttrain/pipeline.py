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
                from posttrain.workers.actors import shutdown_ray

                shutdown_ray()


def _ray_running() -> bool:
    """Whether Ray is initialised in this process (without importing it when nothing has)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _run_stages(cfg: RecipeConfig, run_dir: Path) -> dict:
    import torch

    from posttrain.model import pick_device, pick_dtype
    from posttrain.stages import get_stage

    setup_logging(run_dir / "run.log")
    (run_dir / "recipe.yaml").write_text(dump_recipe(cfg))
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
            ctx = StageContext(cfg, run_dir, stage, metrics, device, dtype, model_path)
            try:
                info = get_stage(name)(ctx)
            finally:
                metrics.close()
            info["seconds"] = round(time.time() - t0, 1)
            stage.mark_done(info)
            log.info("stage %s finished in %.0fs", name, info["seconds"])
        if "checkpoint" in info:  # the stage's own folder: done.json's path is relative to where the run began
            model_path = stage.checkpoint
        results[name] = info
    return results
