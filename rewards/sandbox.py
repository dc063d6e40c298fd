"""Run untrusted Python (a model's code answer) confined by the kernel, and bring back only plain data.

Isolation ``"bwrap"`` (the default; `bubblewrap`, Debian package ``bubblewrap``) runs the interpreter in new user,
mount, PID, network, IPC, UTS and cgroup namespaces:

- the filesystem is an empty root with read-only binds of only what the interpreter needs (the system's shared
  libraries, the base interpreter's binary and standard library (a virtualenv's site-packages never, the base's
  hidden under an empty tmpfs), and any
  `packages` or `read_paths` the caller allows), a minimal read-only ``/dev``, no ``/proc``, no ``/etc``, no home or run
  directory, and one writable size-limited tmpfs (``/sandbox``, the working directory and $TMPDIR): writes elsewhere fail with EROFS
  whatever the code does, so there is no site-packages or ``.pth`` file to plant and no file of the caller to touch;
- an unprivileged uid (65534) with every capability dropped and no-new-privs; no further user namespaces;
- its own PID namespace (the caller, its siblings and every other process are invisible and unreachable), killed as
  a whole at the deadline: bubblewrap's PID 1 dies with the sandbox (``--die-with-parent``), and the kernel then
  kills everything left in the namespace, so no detached child outlives the run;
- its own network namespace (a loopback of its own, nothing outside);
- an empty environment (``--clearenv`` and a few fixed variables);
- two seccomp filters (`sandbox_seccomp.py`): bubblewrap loads one refusing dangerous calls (ptrace, mount,
  namespaces, bpf, keyrings, io_uring, sockets...) before the interpreter starts; the harness adds one refusing
  fork, exec and signals to others before the untrusted code runs;
- rlimits: address space (MemoryError), CPU time, file size (stdout and stderr are files of the caller, bounded too),
  open files, no core dumps; the tmpfs size bounds the disk used in total.

Isolation ``"process"`` is the weaker fallback for a machine without bubblewrap, used only when asked for by name:
the same harness, seccomp filters, rlimits, fresh working directory and scrubbed environment, and a network
namespace when ``unshare -n`` is allowed, but no mount or PID namespace and the caller's uid: what the code may read
and write on the filesystem is then guarded only by the audit hook, which code written to defeat it can switch off.
`require_isolation` says so in its warning.

What comes back is plain data only (`sandbox_bootstrap.py`): per call expression the encoded value it evaluated to
(`run_calls`, decoded here by `sandbox_values.decode` into fresh builtins), or per input the program's stdout (`run_inputs`). Expected
values never enter the sandbox: the caller (`code.py`, `code_tests.py`) compares with its own equality.

Statuses: "ok" (the harness finished), "runtime_error" (the code does not compile), and the error statuses
`ERROR_STATUSES` ("timeout", "memory", "violation", "output_limit", "crash", "sandbox_error").
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import sandbox_seccomp
from .sandbox_bootstrap import EXIT_MEMORY, EXIT_SANDBOX, EXIT_VIOLATION
from .sandbox_values import decode

ERROR_STATUSES = ("timeout", "memory", "violation", "output_limit", "crash", "sandbox_error")
ISOLATIONS = ("bwrap", "process")
_BOOTSTRAP = (Path(__file__).parent / "sandbox_bootstrap.py").read_text()
_SANDBOX_UID = 65534  # nobody
_WORKDIR = "/sandbox"  # inside a bwrap sandbox: the size-limited tmpfs (a path no host directory aliases)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run (one candidate program and all its tests)."""

    timeout_s: float = 2.0  # wall clock per test (call or input); the run's deadline is this times their number
    max_total_s: float = 30.0  # ... and never more than this in total
    cpu_s: float | None = None  # RLIMIT_CPU for the whole run; None: the deadline
    memory_mb: int = 512  # RLIMIT_AS (address space: keep it well above the ~30 MB an interpreter maps)
    fsize_mb: int = 16  # RLIMIT_FSIZE: the largest file the code may write (its stdout and stderr included)
    disk_mb: int = 32  # size of the writable tmpfs (bwrap): everything the code writes, in total
    nofile: int = 64
    max_output_bytes: int = 1 << 20  # how much of each output (and of stdout/stderr) is read back

    def deadline(self, n_tests: int) -> float:
        return min(self.max_total_s, self.timeout_s * max(1, n_tests))


@dataclass(frozen=True)
class CaseOutput:
    """One input's run (`run_inputs`): "ok", "runtime_error" (an exception or a non-zero exit) or "missing"."""

    status: str
    stdout: str = ""


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "ok", "runtime_error", or one of ERROR_STATUSES
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    values: tuple = field(default=())  # run_calls: per expression ("ok", value) | ("error", exception name) | ("missing",)
    outputs: tuple[CaseOutput, ...] = field(default=())  # run_inputs: per input

    @property
    def is_error(self) -> bool:
        return self.status in ERROR_STATUSES


class IsolationUnavailable(RuntimeError):
    """The requested isolation cannot run on this machine."""


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
    """Whether "process" runs get their own network namespace (bwrap runs always do)."""
    return _netns_prefix() is not None


@functools.lru_cache(maxsize=None)
def bwrap_problem() -> str | None:
    """Why bubblewrap cannot confine code here (None when it can): probed once by running a trivial sandbox."""
    if not sandbox_seccomp.supported():
        return f"no seccomp filter for this architecture ({os.uname().machine})"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    r = _probe(_bwrap_argv(SandboxLimits(), (), ()) + ["-c", "pass"])
    if r is not None:
        return f"bubblewrap is installed but cannot create a sandbox here: {r}"
    return None


def require_isolation(isolation: str, warn: bool = True) -> None:
    """Raise `IsolationUnavailable` unless `isolation` runs here; warn what "process" leaves unprotected (once, when
    the reward is built: `warn=False` for each run)."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "bwrap":
        problem = bwrap_problem()
        if problem:
            raise IsolationUnavailable(
                f"the code sandbox needs bubblewrap: {problem}. Install it, or opt into the weaker isolation with "
                "isolation: process (no filesystem, PID or uid isolation: see rewards/sandbox.py)")
    elif warn:
        warnings.warn(
            "code sandbox: isolation 'process' is NOT a security boundary against code written to escape it: the code "
            "runs as your uid, sees your whole filesystem (reads and writes are refused only by an in-process audit "
            "hook that code can switch off), and shares the PID namespace"
            + ("" if network_isolation_available() else " and the network") + ". Process creation, exec, signals "
            "and sockets are refused by seccomp, and CPU, memory and each file's size are limited (not the disk used in "
            "total). Use it only for trusted "
            "models or on a throwaway machine.", stacklevel=2)


def _system_lib_args() -> list[str]:
    args = []
    for p in ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32"):
        if os.path.islink(p):
            args += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            args += ["--ro-bind", p, p]
    return args


def _interpreter() -> str:
    return os.path.realpath(sys.executable)


def _python_paths() -> tuple[list[str], list[str]]:
    """(paths to bind read-only, site-packages directories inside them to hide) for the interpreter.

    The base interpreter's standard library (never a virtualenv's lib directory, whose site-packages would come
    along), its extension modules and its shared library.
    """
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    binds = {_interpreter(), stdlib}
    dynload = sysconfig.get_config_var("DESTSHARED")
    if dynload and os.path.isdir(dynload):
        binds.add(os.path.realpath(dynload))
    libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlib and os.path.exists(os.path.join(libdir, ldlib)):
        binds.add(os.path.realpath(os.path.join(libdir, ldlib)))
    hide = [p for p in (os.path.join(stdlib, "site-packages"), os.path.join(stdlib, "dist-packages"))
            if os.path.isdir(p)]
    return sorted(binds), hide


def package_paths(packages) -> list[tuple[str, str]]:
    """(source, directory to add to sys.path) for each allowed top-level package (and its bundled `.libs`)."""
    out = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"code sandbox: package {name!r} is not an installed package directory")
        pkg = os.path.realpath(list(spec.submodule_search_locations)[0])
        parent = os.path.dirname(pkg)
        out.append((pkg, parent))
        libs = os.path.join(parent, f"{name}.libs")
        if os.path.isdir(libs):
            out.append((os.path.realpath(libs), parent))
    return out


def _bwrap_argv(limits: SandboxLimits, read_paths, packages) -> list[str]:
    binds, hide = _python_paths()
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--uid", str(_SANDBOX_UID), "--gid", str(_SANDBOX_UID),
            "--cap-drop", "ALL", "--clearenv", "--dev", "/dev", "--size", str(limits.disk_mb << 20),
            "--tmpfs", _WORKDIR, *_system_lib_args()]
    for p in binds:
        argv += ["--ro-bind", p, p]
    for p in hide:  # an empty tmpfs over site-packages, read-only: it has no size limit
        argv += ["--tmpfs", p, "--remount-ro", p]
    for src, _ in package_paths(packages):
        argv += ["--ro-bind", src, src]
    for p in read_paths:
        argv += ["--ro-bind", os.path.realpath(p), os.path.realpath(p)]
    # bubblewrap's own root and /dev are unbounded tmpfs owned by the sandbox's uid: read-only, so the size-limited
    # /sandbox is the only place anything can be written
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", _WORKDIR]
    for k, v in _env(_WORKDIR).items():
        argv += ["--setenv", k, v]
    return argv + ["--", _interpreter(), "-I", "-S"]


def _env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/nonexistent", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
        "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)  # not CLOEXEC: handed to the child by number
    while data:
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _probe(argv: list[str]) -> str | None:
    """Run a trivial sandbox (argv ends with the interpreter's arguments); the problem it hit, or None."""
    fd = _memfd("seccomp", sandbox_seccomp.build_filter(sandbox_seccomp.DANGEROUS))
    argv = argv[:1] + ["--seccomp", str(fd)] + argv[1:]
    try:
        r = subprocess.run(argv, capture_output=True, timeout=30, pass_fds=(fd,), start_new_session=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        os.close(fd)
    return None if r.returncode == 0 else (r.stderr.decode("utf-8", "replace").strip()[-500:] or f"rc {r.returncode}")


def _classify(returncode: int, killed: bool, bwrap: bool = False) -> str:
    if bwrap and returncode > 128:
        returncode = 128 - returncode  # bubblewrap exits 128 + N for a sandboxed process killed by signal N
    if killed or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"  # our wall-clock kill, or RLIMIT_CPU (SIGXCPU at the soft, SIGKILL at the hard limit)
    if returncode == -signal.SIGXFSZ:
        return "output_limit"
    if returncode == EXIT_MEMORY:
        return "memory"
    if returncode == EXIT_VIOLATION:
        return "violation"
    if returncode == EXIT_SANDBOX:
        return "sandbox_error"
    if returncode == -signal.SIGSYS:
        return "violation"  # a system call from a foreign ABI: seccomp killed the process
    if returncode < 0:
        return "crash"
    return "ok" if returncode == 0 else "runtime_error"


def _wait_group(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the child up to `timeout_s`, then SIGKILL its whole process group; True when we had to kill.

    The group is killed while the leader is still an unreaped zombie (waitid WNOWAIT), so its pgid cannot have
    been reused by an unrelated process. Under bwrap, killing the group kills bwrap, whose PID 1 then dies
    (``--die-with-parent``), and with it the whole PID namespace.
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


def _run(code: str, cfg: dict, n_tests: int, limits: SandboxLimits, *, isolation: str, read_paths=(),
         forbidden_paths=(), packages=(), network: str = "auto", audit: bool = True) -> tuple[SandboxResult, list]:
    """Run the harness once; (result without values/outputs, the decoded report lines)."""
    require_isolation(isolation, warn=False)
    if network not in ("auto", "netns", "none"):
        raise ValueError(f"network must be 'auto', 'netns' or 'none', got {network!r}")
    deadline = limits.deadline(n_tests)
    cpu_s = limits.cpu_s if limits.cpu_s is not None else deadline
    pkgs = package_paths(packages)
    with tempfile.TemporaryDirectory(prefix="posttrain-sandbox-") as outer:
        outer_path = Path(outer)
        if isolation == "bwrap":
            workdir, prefix = _WORKDIR, []
        else:
            workdir = os.path.realpath(outer_path / "work")
            os.mkdir(workdir)
            prefix = list(_netns_prefix() or ()) if network != "none" else []
            if network == "netns" and not prefix:
                raise IsolationUnavailable("network='netns' but this kernel refuses new network namespaces")
        cfg = {**cfg, "code": code, "workdir": workdir, "audit": audit,
               "read_paths": [os.path.realpath(p) for p in read_paths] + [s for s, _ in pkgs],
               "forbidden": [os.path.realpath(p) for p in forbidden_paths],
               "sys_path": sorted({d for _, d in pkgs}), "max_report_bytes": max(4096, (limits.fsize_mb << 20) // 4),
               "seccomp": sandbox_seccomp.build_filter(sandbox_seccomp.DANGEROUS + sandbox_seccomp.NO_PROCESSES,
                                                       threads_only_clone=True).hex(),
               "limits": {"as": limits.memory_mb << 20, "cpu": max(1, math.ceil(cpu_s)),
                          "fsize": limits.fsize_mb << 20, "nofile": limits.nofile}}
        fds = [_memfd("config", json.dumps(cfg).encode()),
               _memfd("seccomp", sandbox_seccomp.build_filter(sandbox_seccomp.DANGEROUS))]
        t0 = time.monotonic()
        with open(outer_path / "results", "wb") as res, open(os.devnull, "rb") as fin, \
                open(outer_path / "stdout", "wb") as fout, open(outer_path / "stderr", "wb") as ferr:
            fds.append(res.fileno())
            harness = ["-c", _BOOTSTRAP, str(fds[0]), str(res.fileno())]
            if isolation == "bwrap":
                argv = _bwrap_argv(limits, read_paths, packages)
                argv = argv[:1] + ["--seccomp", str(fds[1])] + argv[1:] + harness
                cwd, env = "/", {}
            else:
                argv, cwd, env = [*prefix, _interpreter(), "-I", "-S", *harness], workdir, _env(workdir)
            try:
                proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd, env=env,
                                        start_new_session=True, pass_fds=tuple(fds), close_fds=True)
            except OSError as e:
                return SandboxResult("sandbox_error", None, "", f"{type(e).__name__}: {e}", 0.0), []
            finally:
                for fd in fds[:2]:
                    os.close(fd)
            killed = _wait_group(proc, deadline)
        status = _classify(proc.returncode, killed, bwrap=isolation == "bwrap")
        fsize = limits.fsize_mb << 20  # Python ignores SIGXFSZ: a write past RLIMIT_FSIZE raises OSError(EFBIG)
        if status in ("ok", "runtime_error") and max(
                os.path.getsize(outer_path / "stdout"), os.path.getsize(outer_path / "stderr")) >= fsize:
            status = "output_limit"
        lines = _report_lines(outer_path / "results", fsize)
        result = SandboxResult(status=status, returncode=proc.returncode,
                               stdout=_read_head(outer_path / "stdout", limits.max_output_bytes),
                               stderr=_read_head(outer_path / "stderr", limits.max_output_bytes),
                               wall_s=time.monotonic() - t0)
    return result, lines


def _report_lines(path: Path, limit: int) -> dict[int, dict]:
    """The harness's JSON lines by index; the first line for an index wins, malformed lines are ignored."""
    out: dict[int, dict] = {}
    with open(path, "rb") as f:
        data = f.read(limit)
    for raw in data.split(b"\n"):
        try:
            line = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if type(line) is dict and type(line.get("i")) is int and line["i"] not in out:
            out[line["i"]] = line
    return out


def run_calls(code: str, exprs: list[str], limits: SandboxLimits = SandboxLimits(), *, isolation: str = "bwrap",
              **kw) -> SandboxResult:
    """Run `code` once, then evaluate each expression (e.g. ``f(2)``) in its namespace, in one sandbox.

    `values[i]` is ("ok", value) with the value rebuilt here from plain data (anything that is not plain data is
    ("error", "TypeError")), ("error", name of the exception it raised) or ("missing",) when the run ended first.
    The names ``__pt_list``, ``__pt_tuple``, ``__pt_sorted``, ``__pt_set`` and ``__pt_frozenset`` are the builtins,
    as they were before the code ran.
    """
    result, lines = _run(code, {"mode": "calls", "exprs": list(exprs)}, len(exprs), limits, isolation=isolation,
                         **kw)
    values = []
    for i in range(len(exprs)):
        line = lines.get(i)
        if line is None:
            values.append(("missing",))
        elif "v" in line:
            try:
                values.append(("ok", decode(line["v"])))
            except (ValueError, TypeError, RecursionError):
                values.append(("error", "malformed"))
        else:
            values.append(("error", str(line.get("error", "?"))[:100]))
    return replace(result, values=tuple(values))


def run_inputs(code: str, inputs: list[str], limits: SandboxLimits = SandboxLimits(), *, isolation: str = "bwrap",
               **kw) -> SandboxResult:
    """Run `code` as ``__main__`` once per input, on that input as stdin (file descriptor 0); outputs[i] is its stdout.

    One sandbox for all of one program's inputs: they share the working directory (the program's own files), but no
    other program's. An output longer than `max_output_bytes` makes the run "output_limit".
    """
    result, lines = _run(code, {"mode": "stdin", "inputs": [str(x) for x in inputs],
                                "max_output_bytes": limits.max_output_bytes}, len(inputs), limits,
                         isolation=isolation, **kw)
    outputs, status = [], result.status
    for i in range(len(inputs)):
        line = lines.get(i)
        if line is None or type(line.get("out")) is not str or line.get("status") not in ("ok", "runtime_error"):
            outputs.append(CaseOutput("missing"))
            continue
        outputs.append(CaseOutput(line["status"], line["out"]))
        if line.get("truncated") is True and status == "ok":
            status = "output_limit"
    return replace(result, status=status, outputs=tuple(outputs))


def run_program(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(), **kw) -> SandboxResult:
    """`run_inputs` with one input; `stdout` is that input's output and `status` "runtime_error" when it failed."""
    r = run_inputs(code, [stdin], limits, **kw)
    case = r.outputs[0]
    status = "runtime_error" if r.status == "ok" and case.status == "runtime_error" else r.status
    return replace(r, status=status, stdout=case.stdout if case.status != "missing" else r.stdout)


