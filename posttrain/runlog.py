"""Run directories: one folder per stage with its checkpoint, metrics (JSONL + TensorBoard) and log.

    RUN_DIR/recipe.yaml              the fully resolved recipe
    RUN_DIR/run.log                  everything the run logged
    RUN_DIR/<stage>/checkpoint/      HF-format checkpoint (safetensors), when the stage produces a model
    RUN_DIR/<stage>/metrics.jsonl    one JSON object per logged step
    RUN_DIR/<stage>/tb/              TensorBoard events
    RUN_DIR/<stage>/done.json        written last: the stage finished (a rerun skips it)

A run directory outlives crashes and full disks: a write that fails for lack of space raises `SaveFailed`, which
names the file or directory, what went wrong and the free space, after taking back what was half-written; a torn
last line of metrics.jsonl (what a crash or a full disk leaves) is dropped when the file is opened again.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("posttrain")


class RunFileError(Exception):
    """A file of a run directory that cannot be read (a corrupt record) or written (a full disk); the message names
    the file, what is wrong and what to do. `posttrain` prints it as one `error:` line."""


class SaveFailed(RunFileError, OSError):
    """A write that failed on the OS's side (a full disk, a quota, a file-size limit, an I/O error). What was
    half-written has been removed; the message says what was being written, why it failed, how much space is free
    there, and what is still intact. `errno` is the OS error's, when one was found."""


# what a failed write ran into, by errno: a full disk above all (the OS error may be wrapped by torch or safetensors)
_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
         errno.EFBIG: "a file grew past the file-size limit (`ulimit -f`) or the largest file the filesystem holds"}
_FAILED = (errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM)
# how Rust (safetensors) and C++ (torch's zip writer) report the same when no OSError is chained to their error
_IN_TEXT = {"os error 28": errno.ENOSPC, "No space left on device": errno.ENOSPC, "os error 122": errno.EDQUOT,
            "Disk quota exceeded": errno.EDQUOT, "os error 27": errno.EFBIG, "File too large": errno.EFBIG}
_TORCH_WRITE = ("file write failed", "unexpected pos", "PytorchStreamWriter failed")


def _chain(exc: BaseException):
    """`exc` and every error chained to it: `__cause__`, `__context__`, and Ray's `cause` (a worker's error)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]


def write_failure(exc: BaseException) -> tuple[str, int | None] | None:
    """(what a failed write ran into, its errno or None) when `exc` (or an error chained to it) is a failed write:
    a full disk, a quota, a file-size limit (EFBIG, reported like a full disk), an I/O or permission error, or
    torch's zip writer giving up; None for any other error."""
    errors = list(_chain(exc))
    for e in errors:
        if isinstance(e, OSError) and e.errno in _FULL:
            return f"{os.strerror(e.errno)}: {_FULL[e.errno]}", e.errno
    for e in errors:
        for text, code in _IN_TEXT.items():
            if text in str(e):
                return f"{os.strerror(code)}: {_FULL[code]}", code
    for e in errors:
        if isinstance(e, OSError) and e.errno in _FAILED:
            return f"the write failed ({os.strerror(e.errno)})", e.errno
    for e in errors:
        if isinstance(e, RuntimeError) and any(t in str(e) for t in _TORCH_WRITE):
            return f"the write failed ({str(e).splitlines()[0].strip()})", None
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_space(path: Path) -> str:
    """Free space on the filesystem of `path` (or of its nearest existing parent), for messages."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{human_bytes(shutil.disk_usage(path).free)} free"
    except OSError:
        return "free space unknown"


def tree_size(path: Path) -> int:
    """Bytes in the files under `path` (0 when it is gone)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def raise_save_failed(exc: BaseException, what: str, where: Path, intact: str,
                      then: str = "run the same command again") -> None:
    """Raise, from inside the `except` that caught `exc`, the `SaveFailed` for it ("could not write {what}: {why};
    {free space} on the filesystem of {where}. {intact}: {remedy} and {then}."), or `exc` itself when it is not a
    failed write. Call it after removing what was half-written, so the free space it reports is what the user has. A
    `SaveFailed` already in `exc`'s chain (raised by an inner save, or in a Ray worker) is raised as it is."""
    for e in _chain(exc):
        if isinstance(e, SaveFailed):
            if e is exc:
                raise exc
            raise e from exc
    found = write_failure(exc)
    if found is None:
        raise exc
    reason, code = found
    remedy = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
              errno.EFBIG: "raise the file-size limit"}.get(code, "check the disk")
    err = SaveFailed(f"could not write {what}: {reason}; {free_space(where)} on the filesystem of {where}. "
                     f"{intact}: {remedy} and {then}.")
    err.errno = code
    raise err from exc


class _RunLogHandler(logging.FileHandler):
    """run.log: a write that fails (a full disk) is reported once on stderr, not as a traceback per record."""

    _warned = False

    def handleError(self, record) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            return super().handleError(record)
        if not self._warned:
            self._warned = True
            print(f"warning: could not write to {self.baseFilename} ({err.strerror or err}); messages go to this "
                  "terminal only", file=sys.stderr)


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    log.setLevel(level)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for h in list(log.handlers):  # ours, on an earlier sys.stderr (a run before in this process): it may be closed
        if getattr(h, "posttrain_stderr", False) and h.stream is not sys.stderr:
            log.removeHandler(h)
    if not any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.posttrain_stderr = True
        h.setFormatter(fmt)
        log.addHandler(h)
    if log_file is not None:
        for h in list(log.handlers):
            if isinstance(h, logging.FileHandler):
                log.removeHandler(h)
                h.close()
        fh = _RunLogHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, json.dumps(_finite(obj), indent=2).encode(), str(path))


def write_bytes_atomic(path: Path, data: bytes, what: str) -> None:
    """`path` holds `data` whole (a temporary sibling, fsynced, then renamed over it) or stays as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise_save_failed(e, what, path.parent, f"{path} is as it was")
    os.replace(tmp, path)


def read_json(path: Path, what: str):
    """The JSON document in `path`; RunFileError naming the file, where it is broken and `what` it records."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path} is damaged ({e}); it records {what}") from None


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
        self._drop_torn_tail()
        self._tb = self._open_tb()

    def _drop_torn_tail(self) -> None:
        """A last line without its newline is what a crash or a full disk leaves mid-append: drop it (with a
        warning), so the next line starts on a line of its own."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropped a torn last line (%d bytes, what a crash or a full disk leaves mid-write): %r",
                    self.path, len(data) - keep, data[keep:keep + 60])
        self._rewrite(data[:keep])

    def _rewrite(self, data: bytes) -> None:
        write_bytes_atomic(self.path, data, f"a shortened copy of {self.path}")

    def _records(self) -> list[tuple[str, int]]:
        """(line, step) of every record. A last line that is not a JSON object is torn (a crash or a full disk
        mid-write): dropped from the file with a warning. Any other such line is damage the writer cannot have left:
        RunFileError naming the file and the line."""
        lines = self.path.read_text(errors="replace").splitlines()
        numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
        out = []
        for i, ln in numbered:
            try:
                rec = json.loads(ln)
                if not isinstance(rec, dict):
                    raise ValueError(f"a JSON {type(rec).__name__}, not an object")
                out.append((ln, int(rec.get("step", 0))))
            except (ValueError, TypeError) as e:
                if i == numbered[-1][0]:
                    log.warning("%s: dropped its torn last line %d (%s): %r", self.path, i, e, ln[:60])
                    self._rewrite("".join(kept + "\n" for kept, _ in out).encode())
                    break
                raise RunFileError(
                    f"{self.path}, line {i} of {len(lines)}, is not a metrics record ({e}): {ln[:60]!r}. Only the last "
                    f"line can be torn by a crash, so the file was damaged otherwise; delete that line (or the file: "
                    f"only these metrics are lost, not the training state) and run again") from None
        return out

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
            records = self._records()
            keep = [ln for ln, s in records if s < step]
            if len(keep) != len(records):
                self._rewrite("".join(ln + "\n" for ln in keep).encode())
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open_tb(purge_step=step)

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        line = json.dumps(_finite({"step": step, "time": time.time(), **clean})) + "\n"
        size = self.path.stat().st_size if self.path.is_file() else 0
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as e:
            try:  # take back a partial line: the file keeps whole lines only
                os.truncate(self.path, size)
            except OSError:
                pass
            raise_save_failed(e, f"step {step}'s metrics to {self.path}", self.path.parent,
                              "The lines before it are intact")
        if self._tb is not None:
            try:
                for k, v in clean.items():
                    if isinstance(v, float) and math.isfinite(v):
                        self._tb.add_scalar(k, v, step)
            except OSError as e:  # metrics.jsonl is the record; TensorBoard is a view of it
                log.warning("TensorBoard events in %s could not be written (%s); they stop here, metrics.jsonl goes "
                            "on", self._tb_dir, e.strerror or e)
                self._tb = None

    def close(self) -> None:
        """Flush and close the TensorBoard writer. Its events are a view of metrics.jsonl: a full disk at this last
        flush (the writer buffers asynchronously, so ENOSPC may surface only here) is a warning, not a failure of
        the stage whose state is already saved."""
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except OSError as e:
                log.warning("TensorBoard events in %s could not be flushed (%s); metrics.jsonl is complete",
                            self._tb_dir, e.strerror or e)


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
        info = read_json(done, f"that stage {stage} finished: delete it to run the stage again")
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
        return read_json(self.done_file, f"that stage {self.name} finished: delete it to run the stage again")

    def finished_checkpoint(self) -> Path | None:
        """The checkpoint of a finished stage that produced a model, found under this run directory (done.json's
        path was written relative to the directory the run started in, which a resume from elsewhere does not
        share); None when the stage is not done or made no model."""
        if not self.is_done() or "checkpoint" not in self.done_info():
            return None
        return self.checkpoint

    def mark_done(self, info: dict) -> None:
        write_json_atomic(self.done_file, {"stage": self.name, "finished": time.time(), **info})
