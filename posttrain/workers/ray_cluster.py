"""The Ray session the actors run in (`posttrain.workers.actors` spawns them): a local instance or a cluster joined by
address (`init_ray`), the check that the recipe's actors fit its nodes (CPUs, GPUs, custom resources:
`placement_problem`), and its end (`shutdown_ray`; a local instance is watched by `ray_guard.py`, so that it ends
with this process even when it is killed)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from posttrain.workers.actors import ActorOptions


def init_ray(address: str | None = None, num_cpus: float | None = None, num_gpus: float | None = None,
             required_cpus: float = 0.0, required_gpus: float = 0.0,
             actors: Mapping[str, tuple[int, ActorOptions]] | None = None) -> dict:
    """Start a local Ray instance (address None) or join a cluster; returns its resources.

    With no address, `RAY_ADDRESS` (which `ray job submit` sets for its entrypoint) is joined when set; otherwise a
    new local instance starts even if another Ray runs on this machine (Ray itself would join the last one that
    `ray start` made, or a dead one whose address file was left behind). A local instance gets `num_cpus` CPUs
    (default: this machine's count), and its processes end with this one even when it is killed (`ray_guard`; a
    cluster joined by address is left alone). Checks that the actors the recipe asks for fit (`required_cpus` /
    `required_gpus`, plus `actors`: how many of each recipe key's actors, e.g. `{"ray.learner": (2, options)}`, whose
    custom resources must be on the nodes, `placement_problem`): Ray would otherwise wait forever for resources
    that never come. Returns the cluster's CPUs, GPUs, address and number of live nodes.
    """
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": "warning",
                                  "configure_logging": False}
        source = "ray.address" if address else "RAY_ADDRESS"
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            _check_reachable(source, address)
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as e:
                raise ConnectionError(_join_failure(source, address, e)) from e
        else:
            # Ray's worker processes import torch and would each start one thread per core; the Host sets the real
            # count, this keeps the import itself from oversubscribing a small machine.
            env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            guard = _start_guard()  # before Ray starts: a driver killed while it starts leaves nothing either
            try:
                ray.init(address="local", num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
                         num_gpus=num_gpus, object_store_memory=256 * 2**20, runtime_env={"env_vars": env}, **kwargs)
            except BaseException:
                _stop_guard()  # the guard ends what a failed start left
                raise
            _name_session(guard)
    res = ray.cluster_resources()
    have_cpu, have_gpu = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    actors = dict(actors or {})
    required_cpus += sum(n * o.cpus for n, o in actors.values())
    required_gpus += sum(n * o.gpus for n, o in actors.values())
    if required_cpus > have_cpu + 1e-9 or required_gpus > have_gpu + 1e-9:
        raise ValueError(
            f"the recipe's actors need {required_cpus:g} CPUs and {required_gpus:g} GPUs but Ray has {have_cpu:g} "
            f"CPUs and {have_gpu:g} GPUs; lower the `ray.*.cpus` / `ray.*.gpus` keys or raise `ray.num_cpus`"
        )
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problem = placement_problem(actors, nodes)
    if problem:
        raise ValueError(problem)
    return {"CPU": have_cpu, "GPU": have_gpu, "address": address or "local", "nodes": len(nodes)}


def custom_resources(resources: Mapping[str, float]) -> list[str]:
    """The labels given by `ray start --resources` among a node's resources, not those Ray gives every node (CPU,
    memory, node:<ip>, ...)."""
    return sorted(r for r in resources if r not in ("CPU", "GPU", "memory", "object_store_memory")
                  and not r.startswith(("node:", "accelerator_type:")))


def placement_problem(actors: Mapping[str, tuple[int, ActorOptions]], nodes: list[Mapping[str, float]]) -> str | None:
    """Why `actors` (recipe key -> (how many, options)) cannot all run on `nodes` (each live node's resources, as
    `ray.nodes()` gives them), or None. What can be told without Ray's scheduler: every custom label an actor asks
    for is on some node; one actor of each key fits one node; and the actors asking for a label fit, in each
    resource they ask for, within the nodes that have it. (Actors without a label may still take the CPUs of a
    labelled node first: labelling every role rules that out.)"""

    def demand(o: ActorOptions) -> dict[str, float]:
        return {r: a for r, a in {"CPU": o.cpus, "GPU": o.gpus, **o.resources}.items() if a > 0}

    def show(d: Mapping[str, float]) -> str:
        return ", ".join(f"{a:g} {r}" for r, a in d.items())

    for key, (n, o) in actors.items():
        if n < 1:
            continue
        for label in o.resources:
            if not any(node.get(label, 0) > 0 for node in nodes):
                offered = sorted({r for node in nodes for r in custom_resources(node)})
                return (f"{key}.resources: no node of the Ray cluster has the resource {label!r} (its nodes' custom "
                        f"resources: {', '.join(offered) or 'none'}); start a node with it (`ray start --address "
                        f"HEAD --resources '{{\"{label}\": 4}}'`), or remove the key")
        if not any(all(node.get(r, 0) + 1e-9 >= a for r, a in demand(o).items()) for node in nodes):
            return (f"{key}: one actor needs {show(demand(o))} on one node, and no node of the Ray cluster has them "
                    f"all (`ray status` lists its nodes); lower `{key}.cpus` / `gpus` / `resources`")
    for label in sorted({r for _, o in actors.values() for r in o.resources}):
        users = [(key, n, demand(o)) for key, (n, o) in actors.items() if label in o.resources and n > 0]
        hosts = [node for node in nodes if node.get(label, 0) > 0]
        for r in dict.fromkeys(r for _, _, d in users for r in d):
            need, have = sum(n * d.get(r, 0) for _, n, d in users), sum(node.get(r, 0) for node in hosts)
            if need > have + 1e-9:
                keys = " and ".join(f"{key}.resources" for key, _, _ in users)
                counts = ", ".join(f"{n} {key.rsplit('.', 1)[-1]}" for key, n, _ in users)
                return (f"{keys}: the actors that need {label!r} ({counts}) "
                        f"need {need:g} {r} in all, and the nodes that have {label!r} have {have:g}; lower "
                        f"`num` / `cpus` / `gpus` / `resources` of those keys, or start more such nodes")
    return None


def _check_reachable(source: str, address: str, timeout_s: float = 10.0) -> None:
    """For a `host:port` (or `ray://host:port`) address, fail at once when nothing accepts a connection there: Ray
    itself retries an unreachable head for about 14 minutes before it gives up."""
    import re
    import socket

    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address)
    if m is None:  # `auto`, `local`: Ray finds (or starts) the instance itself
        return
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"{source}: nothing answers at {address} ({e.strerror or e}); is the Ray head running "
                              "(`ray start --head` prints its address) and reachable from here?") from None


def _join_failure(source: str, address: str, err: BaseException) -> str:
    """The message for a failed `ray.init(address=...)`: names where the address came from (`source`) and, when the
    cluster refused this process, what to set (Ray turns token authentication on by itself only for `auto`)."""
    chain, e = [], err
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(type(c).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(c) for c in chain):
        return (f"{source}: the Ray cluster at {address} requires token authentication and refused this "
                "process; set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN, in the file named "
                "by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (`ray get-auth-token` on the head prints it)")
    return f"{source}: could not join the Ray cluster at {address}: {err}"


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _stop_guard()


_guard = None  # (driver pid, Popen) of the ray_guard process watching the local instance this process started


def _start_guard():
    """Start `ray_guard.py` (see there): when this process ends, even by SIGKILL, it kills what is left of the local
    Ray instance it is then told of (Ray's agents outlive a killed driver). None where there is no /proc."""
    import subprocess
    import sys
    from datetime import datetime

    global _guard
    _stop_guard()
    if not os.path.isdir("/proc/self/fd"):
        return None
    stamp = datetime.today().strftime("%Y-%m-%d_%H-%M-%S_%f")  # as Ray stamps a session directory's name
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_guard.py")
    proc = subprocess.Popen([sys.executable, "-I", script, str(os.getpid()), stamp], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    _guard = (os.getpid(), proc)
    return proc


def _name_session(guard) -> None:
    """Tell the guard the session directory of the instance just started (Ray keeps it on its private node object;
    without it the guard finds the session by this process's id, as Ray names it)."""
    import ray

    try:
        session = ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:
        return
    if guard is not None and session:
        try:
            guard.stdin.write(session + "\n")
            guard.stdin.flush()
        except OSError:  # the guard died: nothing to tell
            pass


def _stop_guard() -> None:
    """Close the guard's pipe (it then ends what is left of the instance, which `ray.shutdown` stopped already) and
    wait for it. A forked child's copy of `_guard` is its parent's: left alone."""
    import subprocess

    global _guard
    if _guard is None or _guard[0] != os.getpid():
        return
    proc, _guard = _guard[1], None
    try:
        proc.stdin.close()
        proc.wait(timeout=15)
    except (OSError, subprocess.TimeoutExpired):  # a broken pipe (the guard is gone), or it ends on its own later
        pass


def recipe_actor_options(group, stateful: bool = False) -> ActorOptions:
    """ActorOptions of a recipe `ray.*` group. A stateful actor (learner, critic) is never restarted by Ray alone:
    it would come back with the input model's weights and a fresh optimizer. Its `max_restarts` are the driver's
    recoveries instead (`posttrain.stages.rl.RLDriver.fit`: every actor restarted, the loop resumed from the last saved state)."""
    return ActorOptions(cpus=group.cpus, gpus=group.gpus, threads=group.threads, resources=dict(group.resources),
                        max_restarts=0 if stateful else group.max_restarts, timeout_s=group.timeout_s)


def log_placement(algo: str, proxies: list) -> None:
    """On a cluster of several nodes, log which actors run on which node (its id, address and custom resources),
    once every actor has started."""
    import ray

    from posttrain.runlog import log

    where = {p.name: p.node_id() for p in proxies}
    nodes = {n["NodeID"]: n for n in ray.nodes()}
    for node_id in dict.fromkeys(where.values()):
        n = nodes.get(node_id, {})
        labels = "".join(f", {r}" for r in custom_resources(n.get("Resources", {})))
        log.info("%s: node %s (%s%s): %s", algo, node_id, n.get("NodeManagerAddress", "?"), labels,
                 ", ".join(k for k, v in where.items() if v == node_id))
