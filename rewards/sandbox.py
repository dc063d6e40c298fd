"""Run untrusted Python (a model's code answer) in a separate, limited process and report what happened.

Layers, from kernel-enforced to best-effort:

- a child `sys.executable -I` (isolated mode: no PYTHON* env vars, no user site, no script dir on sys.path) in its
  own session / process group, killed as a group (SIGKILL) at the wall-clock limit; never waited on unbounded;
- rlimits set by the child before running the code: RLIMIT_CPU (SIGXCPU), RLIMIT_AS (MemoryError), RLIMIT_FSIZE
  (stdout/stderr are regular files, so unbounded printing hits it too: SIGXFSZ), RLIMIT_NOFILE, RLIMIT_CORE=0,
  RLIMIT_NPROC (note: NPROC does not bind root, nor processes with CAP_SYS_RESOURCE); Python ignores SIGXFSZ, so
  a write past the size limit raises OSError and the parent reports "output_limit" from the file's size;
- a fresh temporary working directory (deleted afterwards) and a scrubbed environment;
- a new network namespace (`unshare -n` as root, `unshare -rn` otherwise), where only a downed loopback exists,
  when the kernel allows it (probed once, see `network_isolation_available`);
- an audit hook (PEP 578) installed before the code runs that ends the process with `EXIT_VIOLATION` on: any
  `socket.*` event, process creation (os.fork/exec/spawn/posix_spawn/system, subprocess.Popen), os.kill,
  ctypes, resource.setrlimit, heap walking (gc.get_*), opening for reading outside the Python installation /
  sys.path / the working dir / `read_paths`, any write outside the working dir, and anything under
  `forbidden_paths`. As root this hook is what stops a fork bomb. An audit hook is not a security boundary against
  code written to defeat it (it can monkeypatch `os.path`, which the hook uses, or pass `dir_fd` to `os.open`);
  it stops accidental and naive escapes, and the kernel-enforced layers bound the rest.

Statuses: "ok" (exit 0), "runtime_error" (non-zero exit: an exception, a failed assert), and the error statuses
`ERROR_STATUSES` ("timeout", "memory", "violation", "output_limit", "crash", "sandbox_error").
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .sandbox_bootstrap import EXIT_MEMORY, EXIT_VIOLATION

ERROR_STATUSES = ("timeout", "memory", "violation", "output_limit", "crash", "sandbox_error")
_BOOTSTRAP = (Path(__file__).parent / "sandbox_bootstrap.py").read_text()


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run."""

    timeout_s: float = 2.0  # wall clock; the process group is SIGKILLed past it
    cpu_s: float | None = None  # RLIMIT_CPU; None: ceil(timeout_s)
    memory_mb: int = 512  # RLIMIT_AS (address space: keep it well above the ~30 MB an interpreter maps)
    fsize_mb: int = 16  # RLIMIT_FSIZE: largest file (stdout included) the code may write
    nofile: int = 64
    nproc: int = 1  # RLIMIT_NPROC (not binding for root: there the audit hook refuses process creation)
    max_output_bytes: int = 1 << 20  # how much of stdout/stderr is read back


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "ok", "runtime_error", or one of ERROR_STATUSES
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    passed: tuple[int, ...] = field(default=())  # asserts mode: indices of the tests that passed

    @property
    def is_error(self) -> bool:
        return self.status in ERROR_STATUSES


@functools.lru_cache(maxsize=None)
def _netns_prefix() -> tuple[str, ...] | None:
    """The command prefix that runs a program in a new network namespace, or None when the kernel refuses."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    candidates = [(unshare, "-n")] if os.geteuid() == 0 else []
    candidates.append((unshare, "-r", "-n"))
    for prefix in candidates:
        try:
            r = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return prefix
    return None


def network_isolation_available() -> bool:
    """Whether runs get their own network namespace (else only the audit hook blocks sockets)."""
    return _netns_prefix() is not None


def _scrubbed_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
        "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


def _classify(returncode: int, killed: bool) -> str:
    if killed or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"  # our wall-clock kill, or RLIMIT_CPU (SIGXCPU at the soft, SIGKILL at the hard limit)
    if returncode == -signal.SIGXFSZ:
        return "output_limit"
    if returncode == EXIT_MEMORY:
        return "memory"
    if returncode == EXIT_VIOLATION:
        return "violation"
    if returncode < 0:
        return "crash"
    return "ok" if returncode == 0 else "runtime_error"


def _wait_group(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the child up to `timeout_s`, then SIGKILL its whole process group; True when we had to kill.

    The group is killed while the leader is still an unreaped zombie (waitid WNOWAIT), so its pgid cannot have
    been reused by an unrelated process; stray members (if anything escaped the hook) die with it.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    killed = False
    while True:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # SIGCHLD ignored by the host process: the child was reaped already
            break
        if info is not None:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            killed = True
            break
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    return killed


def _read_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "replace")


def _rmtree(path: str) -> None:
    def fix_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix_and_retry)


def _run(code: str, *, mode: str, tests: list[str], stdin: str, limits: SandboxLimits, read_paths, forbidden_paths,
         network: str, audit: bool) -> SandboxResult:
    if network not in ("auto", "netns", "none"):
        raise ValueError(f"network must be 'auto', 'netns' or 'none', got {network!r}")
    prefix = _netns_prefix() if network != "none" else None
    if network == "netns" and prefix is None:
        raise RuntimeError("network='netns' but this kernel refuses new network namespaces (unshare -n / -rn)")
    outer = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    t0 = time.monotonic()
    try:
        io_dir, workdir = Path(outer, "io"), Path(outer, "work")
        io_dir.mkdir()
        workdir.mkdir()
        workdir = Path(os.path.realpath(workdir))
        nonce = secrets.token_hex(16)
        cpu_s = limits.cpu_s if limits.cpu_s is not None else limits.timeout_s
        cfg = {
            "mode": mode, "code": code, "tests": tests, "nonce": nonce, "workdir": str(workdir), "audit": audit,
            "read_paths": [os.path.realpath(p) for p in read_paths],
            "forbidden": [os.path.realpath(p) for p in forbidden_paths],
            "limits": {"as": limits.memory_mb << 20, "cpu": max(1, math.ceil(cpu_s)), "fsize": limits.fsize_mb << 20,
                       "nofile": limits.nofile, "nproc": limits.nproc},
        }
        cfg_path = io_dir / "config.json"
        (io_dir / "stdin").write_text(stdin)
        with open(io_dir / "results", "wb") as res, open(io_dir / "stdin", "rb") as fin, \
                open(io_dir / "stdout", "wb") as fout, open(io_dir / "stderr", "wb") as ferr:
            cfg["results_fd"] = res.fileno()
            cfg_path.write_text(json.dumps(cfg))
            cmd = [*(prefix or ()), sys.executable, "-I", "-c", _BOOTSTRAP, str(cfg_path)]
            try:
                proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=workdir,
                                        env=_scrubbed_env(str(workdir)), start_new_session=True,
                                        pass_fds=(res.fileno(),), close_fds=True)
            except OSError as e:
                return SandboxResult("sandbox_error", None, "", f"{type(e).__name__}: {e}", 0.0)
            killed = _wait_group(proc, limits.timeout_s)
        status = _classify(proc.returncode, killed)
        fsize = limits.fsize_mb << 20  # Python ignores SIGXFSZ: a write past RLIMIT_FSIZE raises OSError(EFBIG)
        if status in ("ok", "runtime_error") and max(
                os.path.getsize(io_dir / "stdout"), os.path.getsize(io_dir / "stderr")) >= fsize:
            status = "output_limit"
        passed = []
        for line in (io_dir / "results").read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == nonce and parts[2] == "1" and parts[1].isdigit():
                passed.append(int(parts[1]))
        return SandboxResult(
            status=status, returncode=proc.returncode,
            stdout=_read_head(io_dir / "stdout", limits.max_output_bytes),
            stderr=_read_head(io_dir / "stderr", limits.max_output_bytes),
            wall_s=time.monotonic() - t0, passed=tuple(sorted(set(passed))),
        )
    finally:
        _rmtree(outer)


def run_program(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(), *, read_paths=(),
                forbidden_paths=(), network: str = "auto", audit: bool = True) -> SandboxResult:
    """Run `code` as ``__main__`` with `stdin`; stdout/stderr come back (truncated to `max_output_bytes`).

    network: "auto" (own network namespace when available), "netns" (require it), "none" (audit hook only).
    audit: False skips the audit hook (only to test the other layers; never for untrusted code as root).
    """
    return _run(code, mode="stdin", tests=[], stdin=stdin, limits=limits, read_paths=read_paths,
                forbidden_paths=forbidden_paths, network=network, audit=audit)


def run_asserts(code: str, tests: list[str], limits: SandboxLimits = SandboxLimits(), *, read_paths=(),
                forbidden_paths=(), network: str = "auto", audit: bool = True) -> SandboxResult:
    """Run `code`, then each test snippet (e.g. ``assert f(2) == 4``) in its namespace, in one process.

    `passed` lists the tests that ran without raising. Results are reported through a private file descriptor
    tagged with a per-run random nonce, so printing "passed" does not pass; a test run cut short by the timeout
    keeps the results of the tests that finished.
    """
    return _run(code, mode="asserts", tests=list(tests), stdin="", limits=limits, read_paths=read_paths,
                forbidden_paths=forbidden_paths, network=network, audit=audit)
