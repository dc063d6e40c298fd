"""One run per directory: `RUN_DIR/.lock` holds the owning process's pid and host.

A second `posttrain run` on a directory in use fails at once naming the other process; a lock left by a process
that no longer exists (killed, crashed) is taken over with a warning. The lock is created with O_EXCL, so two
processes racing for a free directory cannot both win.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from posttrain.runlog import log


class RunDirLocked(RuntimeError):
    """Another live process owns the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale(me["host"])
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunDirLocked(f"could not take the lock {self.path}")

    def _check_stale(self, host: str) -> None:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            owner = {}
        pid, where = owner.get("pid"), owner.get("host")
        if isinstance(pid, int) and where == host and not _alive(pid):
            log.warning("run directory lock %s was left by process %d, which no longer exists: taking it over",
                        self.path, pid)
            self.path.unlink(missing_ok=True)
            return
        if isinstance(pid, int) and where != host:
            raise RunDirLocked(f"run directory {self.path.parent} is in use by process {pid} on host {where} "
                               f"(lock {self.path}); if that run is gone, delete the lock file")
        if not isinstance(pid, int):
            log.warning("run directory lock %s is unreadable: taking it over", self.path)
            self.path.unlink(missing_ok=True)
            return
        raise RunDirLocked(f"run directory {self.path.parent} is in use by process {pid} (lock {self.path}); "
                           "wait for it to finish or stop it, or choose another run_dir")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
