"""One run per directory: a live owner blocks a second run, a dead owner's lock is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from posttrain.runlock import RunDirLocked, RunLock


def test_second_lock_on_live_directory_names_the_owner(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirLocked) as ei:
            RunLock(tmp_path).acquire()
        assert f"process {os.getpid()}" in str(ei.value) and str(tmp_path) in str(ei.value)
    assert not (tmp_path / ".lock").exists()  # released
    RunLock(tmp_path).acquire().release()


def test_stale_lock_from_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_cli_refuses_a_directory_in_use(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"run_dir: {run_dir}\nstages: [base]\nbase: {{steps: 1}}\n")
        from posttrain.cli import main

        assert main(["run", str(recipe)]) == 2
        assert f"is in use by process {holder.pid}" in capsys.readouterr().err
        assert not (run_dir / "base").exists()  # nothing was written
    finally:
        holder.kill()


def test_sigterm_stops_the_run_and_releases_the_lock(tmp_path):
    import signal
    import time
    from pathlib import Path

    run_dir = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {run_dir}\nstages: [base]\nthreads: 1\n"
                      "base: {hidden_size: 32, num_layers: 1, num_experts: 4, moe_intermediate_size: 32, "
                      "num_heads: 2, steps: 100000, batch_size: 4, seq_len: 32}\n")
    env = {**os.environ, "POSTTRAIN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("posttrain")), "run", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "base" / "metrics.jsonl").exists():
        time.sleep(0.5)  # wait until training is under way
    assert (run_dir / ".lock").exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert not (run_dir / ".lock").exists() and not (run_dir / "base" / "done.json").exists()
