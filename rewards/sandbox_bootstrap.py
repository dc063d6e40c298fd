"""Runs inside the sandboxed interpreter (`python -I -c <this source> <config.json>`); see `sandbox.py`.

Order matters: read and delete the config, lower the rlimits, install the audit hook, then run the untrusted
code. Exit codes the parent reads: `EXIT_MEMORY` (MemoryError), `EXIT_VIOLATION` (the audit hook refused an
event; the process exits at once so the code under test cannot catch the refusal).
"""

import os
import sys

EXIT_MEMORY = 86
EXIT_VIOLATION = 87

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
        ("RLIMIT_NPROC", lim["nproc"], lim["nproc"]),
        ("RLIMIT_CORE", 0, 0),
    ):
        resource.setrlimit(getattr(resource, name), (soft, hard))


def _main():
    import builtins
    import json
    import traceback  # noqa: F401  (imported before the hook: printing a traceback needs it)
    import _posixsubprocess

    cfg_path = sys.argv[1]
    with open(cfg_path) as f:
        cfg = json.load(f)
    os.unlink(cfg_path)  # the tests never sit where the code under test could read them
    sys.argv = ["solution.py"]
    # `subprocess` stays importable but cannot start anything (the audit hook also refuses subprocess.Popen).
    _posixsubprocess.fork_exec = None
    res_fd, nonce, mode = cfg["results_fd"], cfg["nonce"], cfg["mode"]

    def report(i, ok):
        os.write(res_fd, f"{nonce} {i} {int(ok)}\n".encode())

    def memory_exit():
        os.write(2, b"\n__SANDBOX_MEMORY__\n")
        os._exit(EXIT_MEMORY)

    try:
        compiled = compile(cfg["code"], "solution.py", "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os.chdir(cfg["workdir"])
    _set_limits(cfg["limits"])
    if cfg["audit"]:
        roots = {os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path] if p}
        roots |= {os.path.realpath(p) for p in cfg["read_paths"]} | {cfg["workdir"]}
        _install_audit_hook(cfg["workdir"], tuple(sorted(roots)), ("/dev/null", "/dev/urandom"),
                            tuple(cfg["forbidden"]))
    ns = {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"}
    code = 0
    try:
        exec(compiled, ns)
    except SystemExit as e:
        if mode == "stdin":
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except MemoryError:
        memory_exit()
    except BaseException:
        traceback.print_exc()
        code = 1
    if mode == "asserts":
        for i, test in enumerate(cfg["tests"]):
            try:
                exec(compile(test, f"<test {i}>", "exec"), ns)
                report(i, True)
            except MemoryError:
                memory_exit()
            except BaseException:
                report(i, False)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except MemoryError:
        memory_exit()
    except BaseException:
        pass
    os._exit(code)


if __name__ == "__main__":
    _main()
