"""`ray.address`: the same recipe that starts a local Ray instance joins a running cluster instead (issue #4).

A Ray head is started here with `ray start --head` (its own processes, a CPU count this machine's local instance would
not have), and `posttrain run` in a fresh process joins it by address, runs its actors there and finishes (~40 s).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["stages=[grpo]", "threads=1", "task.max_difficulty=2", "grpo.steps=2", "grpo.prompts_per_step=2",
        "grpo.group_size=2", "grpo.budgets=[0,4,auto]", "grpo.max_new_tokens=8", "grpo.eval_budgets=[4]",
        "grpo.eval_n_per_difficulty=1", "grpo.eval_max_new_tokens=8", "ray.backend=ray"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head(tmp_path):
    """A Ray head with 5 CPUs in its own process group; yields its GCS address, then stops every process of it."""
    port = _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = _env()  # token authentication on (Ray's default): the token is ~/.ray/auth_token, made if missing
    with open(tmp_path / "ray_head.log", "w") as log:  # the child keeps its own copy of the descriptor
        head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=5", "--num-gpus=0",
                                 "--include-dashboard=false", "--disable-usage-stats", "--block"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    import ray.util

    address = f"{ray.util.get_node_ip_address()}:{port}"  # Ray's GCS listens on the node's address
    try:
        deadline = time.monotonic() + 120
        while True:  # ready once the GCS port accepts connections
            assert head.poll() is None, (tmp_path / "ray_head.log").read_text()[-2000:]
            try:
                socket.create_connection(tuple(address.rsplit(":", 1)), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
                time.sleep(0.5)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # every process of the head (SIGTERM drains for 30 s)
        head.wait()
        # `ray stop` would also remove the head's address file: do that, if no other head took it over since
        latest = Path("/tmp/ray/ray_current_cluster")
        if latest.is_file() and latest.read_text().strip() == address:
            latest.unlink()


@pytest.mark.ray
def test_grpo_joins_a_running_cluster_by_address(ray_head, tiny_model_dir, tmp_path):
    """With the cluster's token (Ray wants RAY_AUTH_MODE=token for an explicit address) the run joins the head,
    runs its actors there and finishes; without it, it stops at once naming
    `ray.address` and what to set. With no address, a new local instance starts although the head runs."""
    gcs = ray_head
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  path: {tiny_model_dir}\nray:\n  address: {gcs}\n")
    cmd = [str(Path(sys.executable).parent / "posttrain"), "run", str(recipe), *TINY]

    # with no address, a new local instance, not the head that `ray start` just recorded as this machine's latest
    local = subprocess.run([sys.executable, "-c", "from posttrain.workers.actors import init_ray; "
                            "print(init_ray(num_cpus=2)['CPU'])"], capture_output=True, text=True, timeout=300,
                           env=_env(RAY_AUTH_MODE="token"))
    assert local.returncode == 0 and local.stdout.split()[-1] == "2.0", local.stderr[-3000:]

    res = subprocess.run([*cmd, "--run-dir", str(tmp_path / "no_token")], capture_output=True, text=True,
                         timeout=300, env=_env(RAY_AUTH_MODE="disabled"))
    assert res.returncode != 0
    assert f"ray.address: the Ray cluster at {gcs} requires token authentication" in res.stderr, res.stderr[-3000:]
    assert "RAY_AUTH_MODE=token" in res.stderr

    # the GCS address, as `ray start` prints it (Ray Client's ray:// is not tested: its server on the head failed
    # to start its per-client process in one full-suite run of two on 2 cores)
    run_dir = tmp_path / "run"
    res = subprocess.run([*cmd, "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300,
                         env=_env(RAY_AUTH_MODE="token"))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    # it joined the head (5 CPUs: the local instance it would otherwise start gets this machine's count)
    assert f"grpo: Ray {gcs} with 5 CPUs" in out, out[-3000:]
    assert (run_dir / "grpo" / "done.json").is_file()
    lines = (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [0, 1]
