"""Periodic training state of the RL stages: written atomically, verified on load, pruned to the last few.

Layout: ``STAGE/state/step_000040/`` holds what the workers wrote (learner weights + optimizer + RNG, critic),
``driver.json`` (the next step, the driver's RNG, the data position) and ``manifest.json`` (size and sha256 of
every file). A save goes to ``state/.tmp-step_000040``; every file is fsynced, then the directory is renamed into
place, so a crash or a full disk mid-save leaves only a temporary directory: a save that fails with an error
removes it at once, one killed mid-write leaves it for the next save to remove. Either way no ``step_*`` directory
is ever half-written. A save that fails for lack of space (or any failed write, in this process or in a worker)
raises `runlog.SaveFailed` naming the save, the free space and the previous save, which is intact.
`latest` walks the saved steps from the newest and returns the first whose manifest checks out, warning about
each one it skips (truncated, corrupted, missing files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from posttrain.model import verify_manifest, write_manifest
from posttrain.runlog import human_bytes, log, raise_save_failed, tree_size

_STEP = re.compile(r"^step_(\d{6,})$")


def step_dirs(state_root: Path) -> list[tuple[int, Path]]:
    """[(step, dir)] of complete (renamed) saves, oldest first."""
    if not state_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in state_root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_state(state_root: Path, step: int, write: Callable[[Path], None], driver: dict, keep: int = 2) -> Path:
    """Write one save for `step` (the number of finished steps): `write(tmp_dir)` lets the workers write their
    files, then driver.json and the manifest; fsync, rename, prune to the newest `keep`. Returns the directory."""
    state_root.mkdir(parents=True, exist_ok=True)
    for stale in state_root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = state_root / f"step_{step:06d}"
    tmp = state_root / f".tmp-{final.name}"
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / "driver.json").write_text(json.dumps({"step": step, **driver}))
        write_manifest(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException as e:  # a full disk, a file-size limit, a worker that died: free the space, keep the old saves
        written = tree_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = step_dirs(state_root)
        intact, then = ((f"The previous save {previous[-1][1]} is intact", "resume from it") if previous
                        else ("There is no earlier save", "start over"))
        raise_save_failed(e, f"the training state after step {step} to {final} ({human_bytes(written)} written "
                             "before it failed, then removed)", state_root, intact, f"run the same command again to {then}")
    if final.exists():  # a save of the same step from an earlier attempt: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fd = os.open(state_root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for _, old in step_dirs(state_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(state_root: Path) -> tuple[Path, dict] | None:
    """(directory, driver state) of the newest save that verifies, or None. Bad saves are skipped with a warning."""
    for step, d in reversed(step_dirs(state_root)):
        problems = verify_manifest(d) if (d / "manifest.json").is_file() else [f"{d / 'manifest.json'} is missing"]
        if not problems:
            try:
                driver = json.loads((d / "driver.json").read_text())
                if isinstance(driver, dict) and isinstance(driver.get("step"), int):
                    return d, driver
                problems = [f"{d / 'driver.json'} holds no step"]
            except (OSError, ValueError) as e:
                problems = [f"{d / 'driver.json'}: {e}"]
        log.warning("checkpoint %s is damaged and is skipped (%s); trying the previous one", d, "; ".join(problems))
    return None
