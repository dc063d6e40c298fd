"""Typed proxies over plain workers, in-process and as Ray actors, and what happens when an actor dies or hangs."""

import os
import sys
import time

import pytest

from posttrain.workers.actors import ActorOptions, WorkerFailed, spawn


class Probe:
    """A worker whose calls can crash or hang its process the first `n` times (counted in a file, so the count
    survives restarts)."""

    def __init__(self, counter_file: str, tag: str = "probe"):
        self.counter_file, self.tag = counter_file, tag
        self.state = "fresh"

    def _bump(self) -> int:
        n = int(open(self.counter_file).read() or 0) if os.path.exists(self.counter_file) else 0
        with open(self.counter_file, "w") as f:
            f.write(str(n + 1))
        return n + 1

    def echo(self, x: int, *, plus: int = 0) -> tuple[int, str]:
        return x + plus, self.state

    def set_state(self, s: str) -> None:
        self.state = s

    def die_first(self, times: int) -> str:
        if self._bump() <= times:
            os._exit(1)  # the process dies mid-call, like an OOM kill
        return self.state

    def hang_first(self, times: int) -> str:
        if self._bump() <= times:
            time.sleep(600)
        return self.state

    def fail(self) -> None:
        raise ValueError("a bug in the worker")

    def tensors(self, n: int) -> dict:
        import torch

        return {"a": torch.arange(n, dtype=torch.float32), "b": torch.ones(2, 3, dtype=torch.float16)}

    def total(self, named: dict, *, scale: float = 1.0) -> float:
        return scale * float(sum(v.float().sum() for v in named.values()))


@pytest.fixture(autouse=True)
def _pickle_probe_by_value():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import the tests folder
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_local_proxy_calls_typed_methods(tmp_path):
    p = spawn(Probe, str(tmp_path / "n"), name="probe", backend="local")
    assert p.call(Probe.echo, 2, plus=3) == (5, "fresh")
    pend = p.submit(Probe.echo, 1)
    assert pend.result() == (1, "fresh")
    with pytest.raises(TypeError, match="not a method of Probe"):
        p.call(len, [1])

    class Louder(Probe):  # a base-class method called on a subclass runs the override, as a plain call would
        def echo(self, x, plus=0):
            return (10 * (x + plus), self.state)

    q = spawn(Louder, str(tmp_path / "m"), name="louder", backend="local")
    assert q.call(Probe.echo, 2, plus=3) == q.call(Louder.echo, 2, plus=3) == (50, "fresh")
    with pytest.raises(ValueError, match="a bug in the worker"):
        p.call(Probe.fail)


def test_ray_actor_restarts_after_its_process_dies(tmp_path, ray_session):
    p = spawn(Probe, str(tmp_path / "n"), name="rollout7", options=ActorOptions(cpus=0, max_restarts=2))
    p.call(Probe.set_state, "updated")
    restored = []
    p.on_restart = lambda proxy: (restored.append(proxy.name), proxy.call(Probe.set_state, "restored"))
    pid = p.pid()
    assert p.call(Probe.die_first, 1) == "restored"  # died once, restarted, state restored, retried
    assert restored == ["rollout7"] and p.restarts == 1 and p.pid() != pid
    p.kill()


def test_ray_actor_that_hangs_is_timed_out_restarted_and_retried(tmp_path, ray_session):
    p = spawn(Probe, str(tmp_path / "n"), name="reward", options=ActorOptions(cpus=0, max_restarts=1, timeout_s=10))
    t0 = time.time()
    assert p.call(Probe.hang_first, 1) == "fresh"
    assert p.restarts == 1 and time.time() - t0 < 60
    p.kill()


class SlowStart(Probe):
    """A worker whose constructor takes longer than a call may (a model load)."""

    def __init__(self, counter_file: str, seconds: float):
        time.sleep(seconds)
        super().__init__(counter_file)


class BrokenStart(Probe):
    def __init__(self, counter_file: str):
        raise OSError(f"no checkpoint at {counter_file}")


def test_ray_actor_start_is_not_counted_in_the_call_timeout(tmp_path, ray_session):
    p = spawn(SlowStart, str(tmp_path / "n"), 4.0, name="learner",
              options=ActorOptions(cpus=0, max_restarts=1, timeout_s=2))
    assert p.call(Probe.echo, 1) == (1, "fresh")  # the 4 s constructor did not make the 2 s call time out
    assert p.restarts == 0
    with pytest.raises(WorkerFailed, match=r"actor 'slow' failed: did not start within start_timeout_s=1"):
        spawn(SlowStart, str(tmp_path / "m"), 30.0, name="slow",
              options=ActorOptions(cpus=0, max_restarts=0, start_timeout_s=1)).call(Probe.echo, 1)
    p.kill()


def test_ray_actor_whose_constructor_fails_names_the_cause(tmp_path, ray_session):
    p = spawn(BrokenStart, str(tmp_path / "ckpt"), name="rollout0", options=ActorOptions(cpus=0, max_restarts=2))
    with pytest.raises(WorkerFailed, match=r"actor 'rollout0' failed: could not start: .*no checkpoint at"):
        p.call(Probe.echo, 1)


def test_ray_actor_out_of_restarts_names_actor_and_cause(tmp_path, ray_session):
    p = spawn(Probe, str(tmp_path / "n"), name="rollout3", options=ActorOptions(cpus=0, max_restarts=1))
    with pytest.raises(WorkerFailed, match=r"actor 'rollout3' failed: die_first\(\): the actor process died.*"
                                           r"max_restarts=1"):
        p.call(Probe.die_first, 5)
    with pytest.raises(ValueError, match="a bug in the worker"):  # exceptions raised by the worker are not retried
        q = spawn(Probe, str(tmp_path / "m"), name="ok", options=ActorOptions(cpus=0))
        q.call(Probe.fail)
    assert q.restarts == 0


def test_init_ray_refuses_actors_that_cannot_fit(ray_session):
    from posttrain.workers.ray_cluster import init_ray

    with pytest.raises(ValueError, match="need 64 CPUs.*ray.num_cpus"):
        init_ray(required_cpus=64)


def test_unreachable_ray_address_fails_at_once_naming_it():
    """Ray retries an unreachable head for ~14 minutes; a host:port nobody listens on is refused in seconds."""
    import socket

    from posttrain.workers.ray_cluster import _check_reachable

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConnectionError, match=f"ray.address: nothing answers at {address}"):
            _check_reachable("ray.address", address, timeout_s=5)
    assert time.monotonic() - t0 < 10
    _check_reachable("ray.address", "auto")  # Ray's own lookup: nothing to check here
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        _check_reachable("ray.address", f"127.0.0.1:{s.getsockname()[1]}")


def test_gather_raises_a_failure_at_once_not_after_the_calls_before_it(tmp_path, ray_session):
    """Two actors: the first blocks (as a data-parallel learner does in a collective when another rank died), the
    second dies for good. `gather` raises the second's failure without waiting for the first; results otherwise
    come back in submission order, local proxies included."""
    from posttrain.workers.actors import gather

    slow = spawn(Probe, str(tmp_path / "a"), name="slow", options=ActorOptions(cpus=0.5, max_restarts=0))
    dead = spawn(Probe, str(tmp_path / "b"), name="dead", options=ActorOptions(cpus=0.5, max_restarts=0))
    local = spawn(Probe, str(tmp_path / "c"), name="local", backend="local")
    assert gather([dead.submit(Probe.echo, 1), local.submit(Probe.echo, 2), slow.submit(Probe.echo, 3)]) == [
        (1, "fresh"), (2, "fresh"), (3, "fresh")]
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match="actor 'dead' failed"):
        gather([slow.submit(Probe.hang_first, 1), dead.submit(Probe.die_first, 1)])
    assert time.monotonic() - t0 < 60  # the hang is 600 s
    slow.kill()


def test_gather_times_out_a_hung_call_and_retries_it_on_the_restarted_actor(tmp_path, ray_session):
    """`timeout_s` holds for gathered calls as for single ones: the hung call's actor is killed, restarted and the
    call retried, while the other call's result is kept."""
    from posttrain.workers.actors import gather

    hung = spawn(Probe, str(tmp_path / "a"), name="hung", options=ActorOptions(cpus=0.5, max_restarts=1, timeout_s=3))
    fine = spawn(Probe, str(tmp_path / "b"), name="fine", options=ActorOptions(cpus=0.5))
    t0 = time.monotonic()
    assert gather([hung.submit(Probe.hang_first, 1), fine.submit(Probe.echo, 7)]) == ["fresh", (7, "fresh")]
    assert time.monotonic() - t0 < 60 and hung.restarts == 1
    for p in (hung, fine):
        p.kill()


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_shared_result_goes_actor_to_actor_with_the_driver_holding_a_reference(tmp_path, backend, request):
    """`Proxy.share` (issue #25: weight sync without the driver): on Ray the result stays in the object store,
    put by the actor that computed it; the driver gets a `Shared` (reference + tensor bytes) and another actor's
    call receives the value itself, as an argument or keyword. In process: the value itself."""
    from posttrain.workers.actors import Shared, tensor_bytes

    if backend == "ray":
        request.getfixturevalue("ray_session")
    src = spawn(Probe, str(tmp_path / "n"), name="src", backend=backend)
    dst = spawn(Probe, str(tmp_path / "m"), name="dst", backend=backend)
    try:
        shared = src.share(Probe.tensors, 5)
        expected = 10.0 + 6.0
        if backend == "ray":
            assert isinstance(shared, Shared) and shared.nbytes == 5 * 4 + 6 * 2
        else:
            assert not isinstance(shared, Shared) and tensor_bytes(shared) == 5 * 4 + 6 * 2
        assert dst.call(Probe.total, shared) == expected
        assert dst.call(Probe.total, named=shared, scale=2.0) == 2 * expected
    finally:
        src.kill()
        dst.kill()
