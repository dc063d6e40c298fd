"""The sandbox's mechanics: statuses, limits, the audit hook layer, both isolations. The attacks are in
`test_sandbox_redteam.py`; these run under bubblewrap where it is installed, else under the weaker "process" isolation.
"""

import os
import time

import pytest

from posttrain.rewards.sandbox import (SandboxLimits, bwrap_problem, run_calls,
                                       run_inputs, run_program)
from posttrain.rewards.sandbox_values import decode

FAST = SandboxLimits(timeout_s=1.0, memory_mb=256)
ISOLATION = "process" if bwrap_problem() else "bwrap"


def run(code, **kw):
    t0 = time.monotonic()
    kw.setdefault("isolation", ISOLATION)
    result = run_program(code, kw.pop("stdin", ""), kw.pop("limits", FAST), **kw)
    assert time.monotonic() - t0 < 5, "the sandbox must return within its limits"
    return result


def test_runs_code_with_stdin():
    r = run("a, b = map(int, input().split())\nprint(a + b)", stdin="2 3\n")
    assert (r.status, r.stdout, r.returncode) == ("ok", "5\n", 0)


def test_common_stdlib_imports_work():
    r = run("import collections, heapq, math, json, itertools, functools, re, fractions, bisect, string\nprint('ok')")
    assert r.status == "ok" and r.stdout == "ok\n"


def test_runtime_error_is_not_a_sandbox_error():
    r = run("raise ValueError('bad')")
    assert r.status == "runtime_error" and not r.is_error and "ValueError: bad" in r.stderr
    assert run("def f(:\n  pass").status == "runtime_error"  # syntax error


def test_infinite_loop_times_out():
    r = run("while True: pass")
    assert r.status == "timeout" and r.is_error and r.wall_s < 2.5


def test_sleep_hits_wall_clock_limit():
    r = run("import time\ntime.sleep(60)")
    assert r.status == "timeout" and r.wall_s < 2.5


def test_cpu_limit_binds_before_wall_limit():
    r = run("while True: pass", limits=SandboxLimits(timeout_s=8.0, cpu_s=1.0, memory_mb=256))
    assert r.status == "timeout" and r.wall_s < 4.0  # RLIMIT_CPU (1 s CPU), long before the 8 s wall limit


@pytest.mark.parametrize("code", [
    "x = bytearray(10**11)",
    "x = [0] * (10**10)",
    "x = []\nwhile True: x.append(' ' * 10**6)",
])
def test_huge_allocation_is_memory(code):
    r = run(code)
    assert r.status == "memory" and r.is_error


@pytest.mark.parametrize("code", [
    "import os\nwhile True: os.fork()",
    "import os\nos.system('touch /tmp/posttrain_sandbox_pwned')",
    "import subprocess\nsubprocess.run(['touch', '/tmp/posttrain_sandbox_pwned'])",
    "import os\nos.execv('/usr/bin/touch', ['touch', '/tmp/posttrain_sandbox_pwned'])",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '/tmp/posttrain_sandbox_pwned'], {})",
    "import multiprocessing as mp\np = mp.Process(target=print)\np.start()",
    "import os\nos.kill(os.getppid(), 0)",  # signal 0: harmless even if the hook ever failed
    "import ctypes\nctypes.CDLL(None).system(b'touch /tmp/posttrain_sandbox_pwned')",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    # catching the refusal does not help: the process ends at the refused event
    "import os\ntry:\n    os.fork()\nexcept BaseException:\n    pass\nprint('survived')",
])
def test_process_creation_and_friends_are_violations(code):
    r = run(code)
    assert r.status == "violation" and r.is_error and "survived" not in r.stdout
    assert not os.path.exists("/tmp/posttrain_sandbox_pwned")


def test_raw_fork_exec_is_neutered():
    code = ("import _posixsubprocess\n"
            "_posixsubprocess.fork_exec(['/usr/bin/touch'], [b'/usr/bin/touch'], True, (), None, None,"
            " -1, -1, -1, -1, -1, -1, -1, -1, False, False, None, None, None, -1, None, False)")
    r = run(code)
    assert r.status in ("runtime_error", "violation") and "'NoneType' object is not callable" in r.stderr


@pytest.mark.parametrize("isolation", ["bwrap", "process"])
def test_fork_is_refused_by_seccomp_without_the_hook(isolation):
    if isolation == "bwrap" and bwrap_problem():
        pytest.skip(bwrap_problem())
    code = "import os\ntry:\n    os.fork()\nexcept PermissionError:\n    print('refused')"
    assert run(code, audit=False, isolation=isolation).stdout == "refused\n"  # as root too (RLIMIT_NPROC would not)
    assert run(code, isolation=isolation).status == "violation"  # the hook, an extra layer, ends the process


@pytest.mark.parametrize("code", [
    "print(open('/etc/passwd').read())",
    "import os\nprint(os.read(os.open('/etc/passwd', os.O_RDONLY), 100))",
    "import pathlib\nprint(pathlib.Path('/etc/passwd').read_text())",
    "import os\nos.symlink('/etc/passwd', 'p')\nprint(open('p').read())",
    "import os\nprint(os.listdir('/etc'))",
    "print(open('../io/config.json').read())",
])
def test_reading_outside_is_a_violation(code):
    r = run(code)
    assert r.status == "violation" and "root:" not in r.stdout


def test_forbidden_dir_inside_an_allowed_one(tmp_path):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.txt").write_text("hunter2")
    (tmp_path / "public.txt").write_text("hello")
    kw = dict(read_paths=[str(tmp_path)], forbidden_paths=[str(tmp_path / "secret")])
    ok = run(f"print(open({str(tmp_path / 'public.txt')!r}).read())", **kw)
    assert ok.status == "ok" and ok.stdout == "hello\n"
    bad = run(f"print(open({str(tmp_path / 'secret' / 'key.txt')!r}).read())", **kw)
    assert bad.status == "violation" and "hunter2" not in bad.stdout


def test_writing_outside_the_workdir_is_a_violation(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in (f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
                 f"import os\nos.remove({str(victim)!r})",
                 f"open({str(victim)!r}, 'a').write('x')",
                 f"import os\nos.rename({str(victim)!r}, 'stolen')"):
        assert run(code).status == "violation", code
    assert victim.read_text() == "keep me" and not (tmp_path / "new.txt").exists()


def test_fresh_workdir_is_writable_and_not_shared():
    r = run("import os\nopen('f.txt', 'w').write('hi')\nprint(open('f.txt').read())")
    assert r.status == "ok" and r.stdout == "hi\n"
    assert run("import os\nprint(os.path.exists('f.txt'))").stdout == "False\n"  # the next run starts empty


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SECRET_TOKEN", "abc123")
    r = run("import os\nprint(sorted(os.environ))")
    assert r.status == "ok" and "POSTTRAIN_SECRET_TOKEN" not in r.stdout and "abc123" not in r.stdout


def test_output_flood_is_bounded():
    limits = SandboxLimits(timeout_s=2.0, memory_mb=256, fsize_mb=1, max_output_bytes=1000)
    r = run("while True: print('x' * 10000)", limits=limits)
    assert r.status == "output_limit" and r.is_error and len(r.stdout) <= 1000


def test_socket_is_a_violation():
    r = run("import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))\nprint('connected')")
    assert r.status == "violation" and "connected" not in r.stdout


def test_calls_bring_back_plain_values_only():
    code = ("class A:\n    def __eq__(self, o):\n        return True\n"
            "def f(x):\n    return {'k': (x, [1.5, None]), 2: {x}}\n"
            "def g():\n    return A()\n"
            "def h():\n    yield 1\n    yield 2\n")
    r = run_calls(code, ["f(3)", "g()", "h()", "__pt_list(h())", "undefined()", "f(b'x')"], FAST, isolation=ISOLATION)
    assert r.status == "ok"
    assert r.values[0] == ("ok", {"k": (3, [1.5, None]), 2: {3}}) and type(r.values[0][1]["k"]) is tuple
    assert r.values[1] == ("error", "TypeError") and r.values[2] == ("error", "TypeError")  # not plain data
    assert r.values[3] == ("ok", [1, 2]) and r.values[4] == ("error", "NameError")
    assert r.values[5] == ("ok", {"k": (b"x", [1.5, None]), 2: {b"x"}})


def test_decode_refuses_malformed_trees():
    for bad in (["x"], ["i"], ["i", 3], ["l", "ab"], ["d", [[["s", "a"]]]], "s", ["b", 1], ["t", [["q"]]]):
        with pytest.raises(ValueError):
            decode(bad)
    assert decode(["i", "123456789012345678901234567890"]) == 123456789012345678901234567890


def test_inputs_run_in_one_sandbox_with_their_own_stdin():
    code = "import sys\nn = int(open(0).read())\nprint(n * 2)\nif n == 3:\n    sys.exit(1)"
    r = run_inputs(code, ["1", "2", "3", "4"], FAST, isolation=ISOLATION)
    assert [(o.status, o.stdout) for o in r.outputs] == [("ok", "2\n"), ("ok", "4\n"), ("runtime_error", "6\n"),
                                                          ("ok", "8\n")]


def test_an_input_that_hangs_leaves_the_rest_missing():
    code = "n = int(input())\nwhile n == 2:\n    pass\nprint(n)"
    r = run_inputs(code, ["1", "2", "3"], SandboxLimits(timeout_s=0.5, memory_mb=256), isolation=ISOLATION)
    assert r.status == "timeout" and [o.status for o in r.outputs] == ["ok", "missing", "missing"]


def test_allowed_packages_import_read_only_and_others_do_not():
    pytest.importorskip("numpy")
    code = "import numpy as np\ndef f(n):\n    return int(np.arange(n).sum())"
    assert run_calls(code, ["f(10)"], FAST, isolation=ISOLATION).values == (("error", "NameError"),)  # stdlib only
    r = run_calls(code, ["f(10)"], SandboxLimits(timeout_s=5.0, memory_mb=1024), isolation=ISOLATION,
                  packages=("numpy",))
    assert r.values == (("ok", 45),), r.stderr
