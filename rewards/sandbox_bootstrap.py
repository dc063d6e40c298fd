"""The harness that runs inside the sandbox (`python -I -S -c <this source> <config fd> <results fd>`); see `sandbox.py`.

It is trusted only until the untrusted code starts: it reads its configuration from a file descriptor (and closes it),
compiles the code, lowers the rlimits, loads the process seccomp filter (no new processes, no exec, no signals to
others: `sandbox_seccomp.py`), installs the audit hook (an extra layer, never the wall), and then runs the code. From
then on everything in this process, this harness included, is the attacker's: so it holds no secret. It never sees
an expected output; it only reports, as JSON lines on the results descriptor, *values*: what each call expression
evaluated to (mode "calls", encoded as plain data by `encode`) or what the program printed for each input (mode
"stdin"). The trusted parent decides every verdict. Forging these lines gains nothing the code could not get by
returning or printing the same values itself.

Exit codes the parent reads: `EXIT_MEMORY` (MemoryError), `EXIT_VIOLATION` (the audit hook refused an event),
`EXIT_SANDBOX` (the harness could not set the sandbox up: the run is refused, never run unconfined).
"""

import os
import sys

_EXIT = os._exit  # the real one: stdin mode replaces os._exit for the code (one input ends, not the harness)
EXIT_MEMORY = 86
EXIT_VIOLATION = 87
EXIT_SANDBOX = 88
MAX_DEPTH = 64

# Audit events refused outright (process creation, signals to other processes, raw foreign calls, raising our
# limits, walking the heap to reach this hook's state). Prefix matches end with ".".
_DENY_PREFIXES = ("socket.", "ctypes.", "gc.get_", "_winapi.", "winreg.")
_DENY_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "subprocess.Popen", "pty.spawn", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
    "os.setuid", "os.setgid", "os.setgroups", "os.chroot",
    "urllib.Request", "ftplib.connect", "smtplib.connect", "http.client.connect", "webbrowser.open",
})
# Events whose path arguments must all lie inside the working directory.
_WRITE_EVENTS = frozenset({
    "os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown", "os.link", "os.truncate",
    "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod",
    "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree", "shutil.move", "shutil.rmtree",
    "shutil.chown", "shutil.make_archive", "shutil.unpack_archive",
})
_READ_EVENTS = frozenset({"os.listdir", "os.scandir", "glob.glob", "os.listxattr", "os.getxattr"})
_DENY_IMPORTS = frozenset({"_posixsubprocess"})  # a re-import would undo the neutering in `_main`
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install_audit_hook(workdir, read_roots, read_files, forbidden):
    realpath, fsdecode, write, exit_ = os.path.realpath, os.fsdecode, os.write, os._exit
    busy = []

    def under(path, roots):
        return any(path == r or path.startswith(r + "/") for r in roots)

    def resolve(p):
        if isinstance(p, int) or p is None:
            return None
        return realpath(fsdecode(p))

    def deny(event, detail=""):
        write(2, f"\n__SANDBOX_VIOLATION__ {event} {detail}\n".encode("utf-8", "replace"))
        exit_(EXIT_VIOLATION)

    def check_read(event, p):
        path = resolve(p)
        if path is None:
            return
        if under(path, forbidden) or not (under(path, read_roots) or path in read_files):
            deny(event, path)

    def check_write(event, p):
        path = resolve(p)
        if path is None:
            return
        if under(path, forbidden) or not under(path, (workdir,)):
            deny(event, path)

    def hook(event, args):
        if busy:  # events raised by the hook's own calls
            return
        busy.append(1)
        try:
            if event == "ctypes.dlopen" and tuple(args) == (None,):
                return  # `import ctypes` (numpy imports it) opens the main program; calling into it is refused
            if event in _DENY_EVENTS or event.startswith(_DENY_PREFIXES):
                deny(event)
            elif event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & _WRITE_FLAGS)
                (check_write if writing else check_read)(event, path)
            elif event == "import" and args and args[0] in _DENY_IMPORTS:
                deny(event, args[0])
            elif event == "os.symlink":
                check_write(event, args[1])  # the link may point anywhere; reading through it resolves it
            elif event in _WRITE_EVENTS:
                for a in args:
                    if isinstance(a, (str, bytes)) or hasattr(a, "__fspath__"):
                        check_write(event, a)
            elif event in _READ_EVENTS and args:
                if isinstance(args[0], (str, bytes)) or hasattr(args[0], "__fspath__"):
                    check_read(event, args[0])
        except BaseException as e:  # a hook that cannot decide refuses
            deny(event, f"hook error {type(e).__name__}")
        finally:
            busy.clear()

    sys.addaudithook(hook)


def _set_limits(lim):
    import resource

    for name, soft, hard in (
        ("RLIMIT_AS", lim["as"], lim["as"]),
        ("RLIMIT_CPU", lim["cpu"], lim["cpu"] + 1),
        ("RLIMIT_FSIZE", lim["fsize"], lim["fsize"]),
        ("RLIMIT_NOFILE", lim["nofile"], lim["nofile"]),
        ("RLIMIT_CORE", 0, 0),
    ):
        resource.setrlimit(getattr(resource, name), (soft, hard))


def _load_seccomp(program: bytes) -> None:
    """Load a seccomp filter on this process (PR_SET_NO_NEW_PRIVS first, as an unprivileged process must)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def _make_encoder():
    """`encode(value) -> JSON-able tree` for plain data only, bound to references taken before the code runs.

    Builtin types and their subclasses (a `Counter` is a dict, a namedtuple a tuple, an IntEnum an int), read
    through the base types' own methods, so that no override of the code's (``__eq__``, ``__iter__``, ``items``)
    takes part: what comes back is the plain value underneath. None, bool, int, float, complex, str, bytes, list,
    tuple, dict, set, frozenset; anything else fails the call. Tags keep tuples apart from lists, ints exact.
    """
    type_, sub = type, issubclass
    repr_int, repr_float, items, len_, list_ = int.__repr__, float.__repr__, dict.items, len, list
    str_copy, bytes_hex, real, imag = str.__getitem__, bytes.hex, complex.real.__get__, complex.imag.__get__
    iters = ((list, "l", list.__iter__), (tuple, "t", tuple.__iter__), (set, "S", set.__iter__),
             (frozenset, "F", frozenset.__iter__))
    everything = slice(None)

    def encode(x, depth=0):
        if depth > MAX_DEPTH:
            raise ValueError("nested too deeply")
        t = type_(x)
        if x is None:
            return ["n"]
        if t is bool:
            return ["b", x is True]
        if sub(t, int):
            return ["i", repr_int(x)]
        if sub(t, float):
            return ["f", repr_float(x)]
        if sub(t, complex):
            return ["c", [repr_float(real(x)), repr_float(imag(x))]]
        if sub(t, str):
            return ["s", str_copy(x, everything)]
        if sub(t, bytes):
            return ["y", bytes_hex(x)]
        for base, tag, it in iters:
            if sub(t, base):
                out = [encode(e, depth + 1) for e in list_(it(x))]
                if len_(out) > 1_000_000:
                    raise ValueError("too long")
                return [tag, out]
        if sub(t, dict):
            return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in list_(items(x))]]
        raise TypeError(f"{t.__name__} is not plain data")

    return encode


def _run_calls(compiled, cfg, ns, report):
    """Run the code once, then evaluate each call expression in its namespace and report the encoded value."""
    import builtins
    import traceback

    encode, dumps = _make_encoder(), __import__("json").dumps
    helpers = {f"__pt_{name}": getattr(builtins, name) for name in ("list", "tuple", "sorted", "set", "frozenset")}
    exprs = []
    for i, src in enumerate(cfg["exprs"]):
        exprs.append(compile(src, f"<test {i}>", "eval"))
    try:
        exec(compiled, ns)
    except MemoryError:
        _memory_exit()
    except BaseException:  # noqa: BLE001 - the code's own failure; its calls are still tried (they fail if undefined)
        traceback.print_exc()
    for i, expr in enumerate(exprs):
        try:
            line = dumps({"i": i, "v": encode(eval(expr, ns, dict(helpers)))})
        except MemoryError:
            _memory_exit()
        except BaseException as e:  # noqa: BLE001 - any failure of the code under test is this call's failure
            try:
                line = dumps({"i": i, "error": str(type(e).__name__)[:100]})
            except BaseException:  # noqa: BLE001
                line = dumps({"i": i, "error": "?"})
        report(line)


def _run_stdin(compiled, cfg, report):
    """Run the code once per input, with file descriptors 0 and 1 on fresh files of the working directory (so its
    size limit counts them); report each output. Per input, as a process of its own would: the program's threads
    are joined, its atexit functions run, ``os._exit`` ends that input only."""
    import atexit
    import builtins
    import traceback

    dumps, o_open, dup2, read, write, close, unlink = (__import__("json").dumps, os.open, os.dup2, os.read, os.write,
                                                       os.close, os.unlink)
    exec_, open_, enumerate_threads = exec, open, None
    wr, rd = os.O_WRONLY | os.O_CREAT | os.O_TRUNC, os.O_RDONLY
    limit = cfg["max_output_bytes"]

    def soft_exit(code=0):
        raise SystemExit(code)

    os._exit = soft_exit
    for i, text in enumerate(cfg["inputs"]):
        in_path, out_path = f".posttrain_in_{i}", f".posttrain_out_{i}"
        fd, data = o_open(in_path, wr, 0o600), text.encode("utf-8")
        while data:
            data = data[write(fd, data):]
        close(fd)
        fin, fout = o_open(in_path, rd), o_open(out_path, wr, 0o600)
        for fd, target in ((fin, 0), (fout, 1)):  # the previous program may have closed 0 or 1
            if fd != target:
                dup2(fd, target)
        for fd in {fin, fout} - {0, 1}:
            close(fd)
        unlink(in_path)
        sys.stdin = sys.__stdin__ = open_(0, "r", closefd=False, encoding="utf-8", errors="replace")
        sys.stdout = sys.__stdout__ = open_(1, "w", closefd=False, encoding="utf-8", errors="replace")
        status = "ok"
        try:
            exec_(compiled, {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"})
            if "threading" in sys.modules:  # `threading.Thread(target=main).start()` is a common idiom
                import threading

                enumerate_threads = enumerate_threads or threading.enumerate
                for t in enumerate_threads():
                    if t is not threading.main_thread() and not t.daemon:
                        t.join()
            atexit._run_exitfuncs()
        except SystemExit as e:
            status = "ok" if e.code in (None, 0) else "runtime_error"
        except MemoryError:
            _memory_exit()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            status = "runtime_error"
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001 - the code closed or broke its stdout
            pass
        try:  # read back by name: the program may have closed or replaced file descriptor 1
            fd = o_open(out_path, rd)
            out = read(fd, limit + 1)
            close(fd)
            unlink(out_path)
        except OSError:
            out, status = b"", "runtime_error"
        report(dumps({"i": i, "status": status, "out": out[:limit].decode("utf-8", "replace"),
                      "truncated": len(out) > limit}))


def _memory_exit():
    os.write(2, b"\n__SANDBOX_MEMORY__\n")
    _EXIT(EXIT_MEMORY)


def _fail_setup(what):
    os.write(2, f"\n__SANDBOX_SETUP_FAILED__ {what}\n".encode("utf-8", "replace"))
    _EXIT(EXIT_SANDBOX)


def _main():
    import builtins
    import json
    import traceback  # noqa: F401  (imported before the hook: printing a traceback needs it)
    import _posixsubprocess

    cfg_fd, res_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(cfg_fd, "rb") as f:  # read and closed: the code never sees its inputs' source or settings
        cfg = json.loads(f.read())
    sys.argv = ["solution.py"]
    write = os.write

    max_line = cfg["max_report_bytes"]

    def report(line):
        data = (line + "\n").encode("utf-8", "replace")
        if len(data) > max_line:  # one huge value must not take the others' room: that call fails alone
            data = (json.dumps({"i": json.loads(line)["i"], "error": "value too large"}) + "\n").encode()
        try:
            write(res_fd, data)
        except OSError:  # past RLIMIT_FSIZE (or closed by the code): the rest are missing, never mis-reported
            pass

    try:
        compiled = compile(cfg["code"], "solution.py", "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc()
        sys.stderr.flush()
        _EXIT(1)
    os.chdir(cfg["workdir"])
    # `exit` and `quit` come from `site`, which -S skips; programs written for `python` expect them
    builtins.exit = builtins.quit = sys.exit
    try:
        _set_limits(cfg["limits"])
        _load_seccomp(bytes.fromhex(cfg["seccomp"]))
    except BaseException as e:  # noqa: BLE001 - never run the code unconfined
        _fail_setup(f"{type(e).__name__}: {e}")
    if cfg["audit"]:
        roots = {os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path] if p}
        roots |= {os.path.realpath(p) for p in cfg["read_paths"] + cfg["sys_path"]} | {cfg["workdir"]}
        _install_audit_hook(cfg["workdir"], tuple(sorted(roots)), ("/dev/null", "/dev/urandom"),
                            tuple(cfg["forbidden"]))
    sys.path[:0] = cfg["sys_path"]  # the allowed packages' directories (read-only binds)
    # `subprocess` stays importable but cannot start anything (seccomp refuses fork and exec in any case).
    _posixsubprocess.fork_exec = None
    if cfg["mode"] == "calls":
        _run_calls(compiled, cfg, {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"},
                   report)
    else:
        _run_stdin(compiled, cfg, report)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    _EXIT(0)


if __name__ == "__main__":
    _main()
