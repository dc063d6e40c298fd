"""`ray.address`: the same recipe that starts a local Ray instance joins a running cluster instead (issue #4), and
`ray.<role>.resources` places each role on chosen nodes of it (issue #25).

A Ray head is started here with `ray start --head` (its own processes, a CPU count this machine's local instance would
not have), and `posttrain run` in a fresh process joins it by address, runs its actors there and finishes (~40 s).
A second node on this machine (`ray start --address HEAD --resources`) makes a two-node cluster: the learners run on
one node and the rollouts on the other.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
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


@contextmanager
def _ray_node(log_path: Path, *args: str, env: dict):
    """`ray start ... --block` in its own process group; stops every process of it on exit (SIGKILL: SIGTERM drains
    for 30 s). Ray's workers start sessions of their own, but end when their node's raylet dies."""
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        node = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", *args, "--num-gpus=0",
                                 "--disable-usage-stats", "--block"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield node
    finally:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()


@contextmanager
def _ray_head(log_path: Path, *args: str):
    """A Ray head (`--include-dashboard=false`, token authentication: Ray's default, the token ~/.ray/auth_token,
    made if missing) in its own process group; yields its GCS address once it accepts connections."""
    port = _free_port()
    import ray.util

    address = f"{ray.util.get_node_ip_address()}:{port}"  # Ray's GCS listens on the node's address
    with _ray_node(log_path, "--head", f"--port={port}", "--include-dashboard=false", *args, env=_env()) as head:
        try:
            deadline = time.monotonic() + 120
            while True:  # ready once the GCS port accepts connections
                assert head.poll() is None, log_path.read_text()[-2000:]
                try:
                    socket.create_connection(tuple(address.rsplit(":", 1)), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
                    time.sleep(0.5)
            yield address
        finally:
            # `ray stop` would also remove the head's address file: do that, if no other head took it over since
            latest = Path("/tmp/ray/ray_current_cluster")
            if latest.is_file() and latest.read_text().strip() == address:
                latest.unlink()


@pytest.fixture()
def ray_head(tmp_path):
    """A Ray head with 5 CPUs; yields its GCS address, then stops every process of it."""
    with _ray_head(tmp_path / "ray_head.log", "--num-cpus=5") as address:
        yield address


_WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="warning", configure_logging=False)
deadline = time.monotonic() + float(sys.argv[3])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
for n in alive:
    print("node", n["NodeID"], *sorted(r for r in n["Resources"] if r.startswith("node_")))
"""


@pytest.fixture()
def ray_two_nodes(tmp_path):
    """Two Ray nodes on this machine: a head with 2 CPUs and the resource `node_a`, and a second node joined to it
    (`ray start --address`) with 2 CPUs and `node_b`. Yields (GCS address, {label: node id}); stops both."""
    with _ray_head(tmp_path / "ray_head.log", "--num-cpus=2", '--resources={"node_a": 4}') as address:
        # the second raylet on one host: its own dashboard agent port (the head's, 52365, is taken); the rest of
        # its ports are picked free by Ray. It joins with the cluster's token (RAY_AUTH_MODE=token).
        with _ray_node(tmp_path / "ray_node_b.log", f"--address={address}", "--num-cpus=2",
                       '--resources={"node_b": 4}', f"--dashboard-agent-listen-port={_free_port()}",
                       env=_env(RAY_AUTH_MODE="token")) as node_b:
            res = subprocess.run([sys.executable, "-c", _WAIT_FOR_NODES, address, "2", "120"], capture_output=True,
                                 text=True, timeout=300, env=_env(RAY_AUTH_MODE="token"))
            rows = [ln.split() for ln in res.stdout.splitlines() if ln.startswith("node ")]  # node <id> <label>
            nodes = {row[2]: row[1] for row in rows if len(row) == 3}
            assert node_b.poll() is None, (tmp_path / "ray_node_b.log").read_text()[-2000:]
            assert set(nodes) == {"node_a", "node_b"}, res.stdout + res.stderr[-2000:]
            yield address, nodes


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
    local = subprocess.run([sys.executable, "-c", "from posttrain.workers.ray_cluster import init_ray; "
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


def test_placement_problem_names_the_recipe_key():
    """What `init_ray` checks against the cluster's nodes before any actor starts (Ray would wait forever)."""
    from posttrain.workers.actors import ActorOptions
    from posttrain.workers.ray_cluster import placement_problem

    head = {"CPU": 2.0, "node_a": 4.0, "node:10.0.0.5": 1.0, "memory": 1e9}
    node_b = {"CPU": 2.0, "node_b": 4.0, "node:10.0.0.6": 1.0, "memory": 1e9}

    def actors(**learner):
        return {"ray.rollout": (1, ActorOptions(cpus=1, resources={"node_a": 1})), "ray.reward": (1, ActorOptions(0)),
                "ray.learner": (learner.pop("num", 2), ActorOptions(**{"cpus": 1, "resources": {"node_b": 1},
                                                                       **learner}))}

    assert placement_problem(actors(), [head, node_b]) is None
    msg = placement_problem(actors(resources={"node_c": 1}), [head, node_b])
    assert msg.startswith("ray.learner.resources: no node of the Ray cluster has the resource 'node_c'"), msg
    assert "node_a, node_b" in msg and "ray start --address HEAD --resources" in msg
    msg = placement_problem(actors(num=3), [head, node_b])  # 3 CPUs on nodes with node_b, which have 2
    assert msg.startswith("ray.learner.resources: the actors that need 'node_b' (3 learner) need 3 CPU in all, and "
                          "the nodes that have 'node_b' have 2"), msg
    msg = placement_problem(actors(num=5, cpus=0), [head, node_b])  # 5 node_b of 4
    assert "need 5 node_b in all" in msg, msg
    msg = placement_problem(actors(num=1, cpus=0, gpus=1), [head, node_b])  # no node has a GPU and node_b
    assert msg.startswith("ray.learner: one actor needs 1 GPU, 1 node_b on one node"), msg
    # two roles on one label share its nodes' CPUs
    both = {**actors(num=1), "ray.reference": (1, ActorOptions(cpus=2, resources={"node_b": 1}))}
    msg = placement_problem(both, [head, node_b])
    assert msg.startswith("ray.learner.resources and ray.reference.resources: the actors that need 'node_b' "
                          "(1 learner, 1 reference) need 3 CPU"), msg
    assert placement_problem(both, [head, node_b, {**node_b, "node:10.0.0.7": 1.0}]) is None


def test_resources_without_a_cluster_are_refused_at_recipe_load(monkeypatch):
    """A local Ray instance has no custom resources: a recipe that asks for one without a cluster address is refused
    when it is read, naming the key; with an address (or RAY_ADDRESS), or `backend: local`, it loads."""
    from pydantic import ValidationError

    from posttrain.config_rl import RayConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValidationError, match=r"ray.learner.resources: 'node_b' would place .* no `ray.address`"):
        RayConfig(learner={"resources": {"node_b": 1}})
    with pytest.raises(ValidationError, match=r"'CPU': give CPUs and GPUs as `cpus` / `gpus`"):
        RayConfig(address="10.0.0.5:6379", rollout={"resources": {"CPU": 1}})
    with pytest.raises(ValidationError, match=r"node_b: 0.0 is not a positive amount"):
        RayConfig(address="10.0.0.5:6379", rollout={"resources": {"node_b": 0}})
    assert RayConfig(address="10.0.0.5:6379", learner={"resources": {"node_b": 1}}).learner.resources == {"node_b": 1}
    assert RayConfig(backend="local", learner={"resources": {"node_b": 1}}).learner.resources == {"node_b": 1}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert RayConfig(reward={"resources": {"node_b": 0.5}}).reward.resources == {"node_b": 0.5}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.ci_extra
def test_grpo_across_two_nodes_with_learners_placed_by_resource(ray_two_nodes, tiny_model_dir, tmp_path):
    """A GRPO stage on a two-node cluster (both nodes on this machine): the rollout worker is placed on the head
    (`node_a`) and two data-parallel learners on the second node (`node_b`), where they meet by the node's IP (not
    127.0.0.1) and reduce gradients over gloo. The run finishes with every step, and the node ids the actors report
    from inside (Ray's runtime context) are the nodes their labels name. A label no node has stops the run at once."""
    gcs, nodes = ray_two_nodes
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  path: {tiny_model_dir}\nray:\n  address: {gcs}\n")
    cmd = [str(Path(sys.executable).parent / "posttrain"), "run", str(recipe), *TINY, "ray.learner.num=2",
           "ray.rollout.resources={node_a: 1}"]
    env = _env(RAY_AUTH_MODE="token")

    res = subprocess.run([*cmd, "ray.learner.resources={node_c: 1}", "--run-dir", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0
    assert "ray.learner.resources: no node of the Ray cluster has the resource 'node_c'" in res.stderr, \
        res.stderr[-3000:]

    run_dir = tmp_path / "run"
    res = subprocess.run([*cmd, "ray.learner.resources={node_b: 1}", "--run-dir", str(run_dir)],
                         capture_output=True, text=True, timeout=600, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"grpo: Ray {gcs} with 4 CPUs" in out, out[-3000:]
    assert "grpo: 2 data-parallel learners joined" in out, out[-3000:]
    placed = {m.group(1): m.group(2).split(", ") for m in re.finditer(r"grpo: node (\w+) \([^)]*\): (.*)", out)}
    assert set(placed) <= set(nodes.values()), out[-3000:]
    on_a, on_b = set(placed.get(nodes["node_a"], [])), set(placed.get(nodes["node_b"], []))
    assert {"learner0", "learner1"} <= on_b and "rollout0" in on_a, out[-3000:]
    assert not on_a & {"learner0", "learner1"} and "rollout0" not in on_b  # unlabelled roles (reward) go anywhere
    assert (run_dir / "grpo" / "done.json").is_file()
    lines = (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [0, 1]


def test_the_readme_cluster_recipe_is_valid():
    """The `ray` section the README's "On a cluster" shows loads as printed."""
    import yaml

    from posttrain.config_rl import RayConfig

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### On a cluster", 1)[1].split("\n## ", 1)[0]
    ray_cfg = RayConfig(**yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1))["ray"])
    assert ray_cfg.learner.resources == {"learner_node": 1} and ray_cfg.address == "10.0.0.5:6379"
