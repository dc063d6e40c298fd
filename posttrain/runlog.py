"""Run directories: one folder per stage with its checkpoint, metrics (JSONL + TensorBoard) and log.

    RUN_DIR/recipe.yaml              the fully resolved recipe
    RUN_DIR/run.log                  everything the run logged
    RUN_DIR/<stage>/checkpoint/      HF-format checkpoint (safetensors), when the stage produces a model
    RUN_DIR/<stage>/metrics.jsonl    one JSON object per logged step
    RUN_DIR/<stage>/tb/              TensorBoard events
    RUN_DIR/<stage>/done.json        written last: the stage finished (a rerun skips it)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("posttrain")


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    log.setLevel(level)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        log.addHandler(h)
    if log_file is not None:
        for h in list(log.handlers):
            if isinstance(h, logging.FileHandler):
                log.removeHandler(h)
                h.close()
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_finite(obj), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finite(obj):
    """NaN/inf become None, so the files stay strict JSON (a metric that is undefined, e.g. AUC with one class)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, stage_dir: Path):
        self.path = stage_dir / "metrics.jsonl"
        self._tb_dir = stage_dir / "tb"
        self._tb = self._open_tb()

    def _open_tb(self, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; degrade only if someone removed it
            log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
            return None
        return SummaryWriter(str(self._tb_dir), purge_step=purge_step)

    def resume_at(self, step: int) -> None:
        """A stage resumed from the state saved before `step`: drop what the killed run logged from `step` on,
        the metrics.jsonl lines and, through TensorBoard's `purge_step`, the events (hidden when read)."""
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) < step]
            if len(keep) != len(lines):
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(ln + "\n" for ln in keep))
                os.replace(tmp, self.path)
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open_tb(purge_step=step)

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(_finite({"step": step, "time": time.time(), **clean})) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def latest_checkpoint(run_dir: Path, skip: tuple[str, ...] = ()) -> tuple[str, Path] | None:
    """(stage, checkpoint) of the stage that finished last with a model (its done.json has a `checkpoint`; by the
    `finished` time, then by the order of the run's `recipe.yaml`), the checkpoint taken from this run directory:
    done.json's own path is relative to where the run began, so a run resumed, copied or read from elsewhere would
    point at another run's files. Every stage folder counts, not only those of the last recipe (a rerun of some
    stages rewrites it). Stages in `skip` are passed over; None when no stage qualifies. A finished stage whose
    checkpoint is gone raises FileNotFoundError rather than answer with an earlier stage's model. Reads only."""
    import yaml

    recipe = run_dir / "recipe.yaml"
    order = ((yaml.safe_load(recipe.read_text()) or {}).get("stages") or []) if recipe.is_file() else []
    found = []
    for done in run_dir.glob("*/done.json"):
        stage = done.parent.name
        info = json.loads(done.read_text())
        if stage in skip or "checkpoint" not in info:
            continue
        rank = order.index(stage) if stage in order else len(order)
        found.append((float(info.get("finished") or 0.0), rank, stage))
    if not found:
        return None
    stage = max(found)[2]
    ckpt = run_dir / stage / "checkpoint"
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"run directory {run_dir}: stage {stage!r} finished with a model "
                                f"({run_dir / stage / 'done.json'}) but its checkpoint {ckpt} has no config.json")
    return stage, ckpt


class StageDir:
    def __init__(self, run_dir: Path, name: str):
        self.name = name
        self.path = run_dir / name
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def done_file(self) -> Path:
        return self.path / "done.json"

    def is_done(self) -> bool:
        return self.done_file.is_file()

    def done_info(self) -> dict:
        return json.loads(self.done_file.read_text())

    def finished_checkpoint(self) -> Path | None:
        """The checkpoint of a finished stage that produced a model, found under this run directory (done.json's
        path was written relative to the directory the run started in, which a resume from elsewhere does not
        share); None when the stage is not done or made no model."""
        if not self.is_done() or "checkpoint" not in self.done_info():
            return None
        return self.checkpoint

    def mark_done(self, info: dict) -> None:
        write_json_atomic(self.done_file, {"stage": self.name, "finished": time.time(), **info})
