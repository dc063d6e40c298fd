"""Ends what is left of a local Ray instance when the driver that started it ends, even by SIGKILL.

Ray 2.60 starts a local instance's gcs_server, raylet, dashboard and monitors with PR_SET_PDEATHSIG, so they die
with the driver; but the dashboard agent and the runtime-env agent, which the raylet starts, notice the raylet's
death and then hang reporting it to the dead GCS, and stay alive for good. `posttrain.workers.ray_cluster.init_ray` runs
this file (standard library only) as a process in a session of its own, so that a signal to the driver's process
group or a Ctrl-C spares it. It reads a pipe that only the driver holds: a line naming the session directory of each
local instance the driver started, then end of file when the driver exits, is killed or calls `shutdown_ray`. Then
it kills every process left of those sessions and exits. Without a line (the driver died while Ray was starting) it
takes the sessions Ray names after the driver (`session_<time>_<driver pid>`) started since the guard did. A cluster
the driver joined by address is never named to it, so never touched.

    python ray_guard.py DRIVER_PID START_STAMP   (START_STAMP as Ray stamps a session: %Y-%m-%d_%H-%M-%S_%f)
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time


def session_matcher(sessions: list[str], driver_pid: int, start_stamp: str):
    """A predicate on a path or command-line argument: does it lie in one of `sessions` (session directories), or,
    with none, in a session Ray named after `driver_pid` at `start_stamp` or later."""
    if sessions:
        dirs = {d for s in sessions for d in (s.rstrip("/"), os.path.realpath(s))}
        pattern = re.compile("(?:" + "|".join(re.escape(d) for d in sorted(dirs)) + ")(?:/|$)")
        return lambda text: pattern.search(text) is not None
    named = re.compile(r"/session_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6})_" + str(driver_pid) + r"(?:/|$)")
    return lambda text: any(m.group(1) >= start_stamp for m in named.finditer(text))


def _open_file_in(pid: int, is_ours) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if is_ours(os.readlink(f"/proc/{pid}/fd/{fd}")):
                return True
        except OSError:
            continue
    return False


def session_processes(is_ours) -> list[int]:
    """Live processes of the sessions `is_ours` accepts: a command-line argument in the session directory (gcs_server,
    raylet, dashboard, monitors), or a `ray::` process title (agents, workers) with a file open there (its logs)."""
    me, found = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a.strip()]
        except OSError:
            continue
        if any(is_ours(a) for a in args) or (args and args[0].startswith("ray::") and _open_file_in(pid, is_ours)):
            found.append(pid)
    return found


def end_sessions(is_ours, deadline_s: float = 10.0) -> int:
    """SIGKILL every process of the sessions until none is left (or `deadline_s` passed); how many were killed."""
    killed, deadline = set(), time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        pids = session_processes(is_ours)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:  # gone already, or not ours to kill
                pass
        time.sleep(0.2)
    return len(killed)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the driver; the guard waits for it to end
    driver_pid, start_stamp = int(argv[0]), argv[1]
    sessions = [line.strip() for line in sys.stdin if line.strip()]  # blocks until the driver's end closes the pipe
    end_sessions(session_matcher(sessions, driver_pid, start_stamp))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
