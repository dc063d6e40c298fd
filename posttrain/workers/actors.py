"""Thin Ray wrapper for the plain worker classes, and the typed proxies the driver calls them through.

Every worker (rollout, learner, reference, critic, reward) is a plain class that knows nothing of Ray. `spawn`
runs one inside a Ray actor (`backend="ray"`) or in this process (`backend="local"`, for tests and debugging) and
returns a `Proxy[W]`. The driver names methods by the unbound function, not by a string:

    rollout = spawn(RolloutWorker, model_path, name="rollout0", options=ActorOptions(cpus=1))
    batch = rollout.call(RolloutWorker.generate, prompts, budgets, 8, 128)        # typed: (prompts, budgets, ...)
    pending = [w.submit(RolloutWorker.generate, ...) for w in rollouts]            # in parallel
    batches = [p.result() for p in pending]

Failure handling (issue #7): a call that raises inside the worker re-raises here as-is (a bug is not retried);
a dead actor process or a call that exceeds `timeout_s` (its actor's start not counted: a new actor's first call
waits for the constructor first, at most `start_timeout_s`) is a *failure*: the actor is killed if it hangs, Ray
restarts it (re-running the worker's constructor), the proxy's `on_restart` hook restores its state (the driver
pushes the current weights), and the call is retried. An actor that died *between* calls is restarted by Ray
before the next call reaches it, so no call fails; every result carries the actor's incarnation (a fresh id per
constructor run) and a changed one is handled like a death: restore, then run the call again on restored state. After `max_restarts` restarts the proxy raises
`WorkerFailed`, naming the actor and the cause.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

W = TypeVar("W")
R = TypeVar("R")
P = ParamSpec("P")


class WorkerFailed(RuntimeError):
    """An actor died or hung more often than its restart limit allows."""

    def __init__(self, actor: str, cause: str):
        super().__init__(f"actor {actor!r} failed: {cause}")
        self.actor, self.cause = actor, cause


@dataclass(frozen=True)
class ActorOptions:
    """Resources and fault limits of one actor (from the recipe's `ray` section)."""

    cpus: float = 1.0
    gpus: float = 0.0
    threads: int | None = None  # torch threads in the actor; default: the CPUs it was given (at least 1)
    resources: Mapping[str, float] = field(default_factory=dict)  # custom Ray resources: the nodes it may run on
    max_restarts: int = 2
    timeout_s: float | None = None  # per call, not counting the actor's start; None waits forever
    start_timeout_s: float = 600.0  # how long a new or restarted actor may take to construct its worker

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.cpus))


@dataclass(frozen=True)
class Shared:
    """A call's result left in the Ray object store by the actor that computed it (`Proxy.share`). Passed as an
    argument (top level) to other actors' calls, it reaches them straight from that actor's node: the driver holds
    only the reference. `nbytes`: the bytes of the tensors in it."""

    ref: Any
    nbytes: int


def tensor_bytes(value) -> int:
    """Bytes of the tensors in `value` (a tensor, or a dict / list / tuple of them, nested)."""
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return value.element_size() * value.numel()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _resolve(value):
    """A `Shared` argument fetched from the object store (by this actor, not the driver); others as they are."""
    if isinstance(value, Shared):
        import ray

        return ray.get(value.ref)
    return value


class Host:
    """What runs inside an actor process: sets the thread count, builds the worker, dispatches calls."""

    def __init__(self, cls: type, args: tuple, kwargs: dict, threads: int):
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
        self.worker = cls(*args, **kwargs)
        self.incarnation = uuid.uuid4().hex  # new after every restart: tells the proxy its state was lost

    def node(self) -> str:
        """The id of the Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def call(self, method: str, args: tuple, kwargs: dict, share: bool = False) -> tuple[Any, float, str]:
        """(the method's result, seconds it ran inside the actor, incarnation): the rest of a call's wall time is
        dispatch. `Shared` arguments are fetched here; with `share` the result is put in the object store and only
        its `Shared` reference returns."""
        t0 = time.perf_counter()
        args = tuple(_resolve(a) for a in args)
        kwargs = {k: _resolve(v) for k, v in kwargs.items()}
        out = getattr(self.worker, method)(*args, **kwargs)
        if share:
            import ray

            out = Shared(ray.put(out), tensor_bytes(out))
        return out, time.perf_counter() - t0, self.incarnation

    def pid(self) -> int:
        return os.getpid()

    def ident(self) -> str:
        return self.incarnation


def _method_name(cls: type, method: Callable) -> str:
    """The name to dispatch `method` by: a function `cls` defines or inherits (a base class's method called on a
    subclass runs the subclass's override, as a plain call would)."""
    name = getattr(method, "__name__", None)
    if name is None or not any(vars(base).get(name) is method for base in cls.__mro__):
        raise TypeError(f"{method!r} is not a method of {cls.__name__}")
    return name


class Pending(Generic[R]):
    """The result of a submitted call; `result()` waits (with the proxy's timeout) and retries on failure."""

    def __init__(self, proxy: "Proxy", name: str, args: tuple, kwargs: dict, share: bool = False):
        self.proxy, self.name, self.args, self.kwargs, self.share = proxy, name, args, kwargs, share
        t0 = time.perf_counter()
        self._ref = proxy._start(name, args, kwargs, share)
        self.started = time.monotonic()  # after a new actor's start: what `timeout_s` counts from
        # seconds the call ran inside the worker: known at once in process (it ran in `_start`), once the result is
        # in for an actor (the driver's overlap metrics compare it with the time it waited)
        self.busy: float | None = time.perf_counter() - t0 if proxy.local is not None else None

    def result(self, timeout_s: float | None = None) -> R:
        """Wait for the result (`timeout_s` for this first wait instead of the proxy's own), retrying on failure."""
        return self.proxy._finish(self, timeout_s)


class Proxy(Generic[W]):
    """A typed handle on one worker of class W, in a Ray actor or in this process."""

    def __init__(self, cls: type[W], name: str, options: ActorOptions, handle=None, local: W | None = None):
        self.cls, self.name, self.options = cls, name, options
        self.handle, self.local = handle, local
        self.restarts = 0
        self.incarnation: str | None = None  # the Host incarnation whose state this proxy knows
        self.on_restart: Callable[[Proxy[W]], None] | None = None
        self.seconds = 0.0  # wall time the driver spent waiting on this actor's results
        self.busy = 0.0  # time the actor spent running the calls (seconds - busy ~ Ray dispatch and transfer)

    # the typed surface -------------------------------------------------------------------------------------
    def submit(self, method: Callable[Concatenate[W, P], R], *args: P.args, **kwargs: P.kwargs) -> Pending[R]:
        """Start `method(*args, **kwargs)` on the worker; returns at once (Ray) with a `Pending`."""
        return Pending(self, _method_name(self.cls, method), args, kwargs)

    def call(self, method: Callable[Concatenate[W, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`submit(...).result()`."""
        return self.submit(method, *args, **kwargs).result()

    def submit_shared(self, method: Callable[Concatenate[W, P], R], *args: P.args,
                      **kwargs: P.kwargs) -> Pending[Shared | R]:
        """`submit`, but the result stays in the Ray object store, put there by this actor: a `Shared` to pass to
        other actors' calls (weights learner -> rollout workers without the driver, issue #25). In this process
        (local backend): the result itself."""
        return Pending(self, _method_name(self.cls, method), args, kwargs, share=True)

    def share(self, method: Callable[Concatenate[W, P], R], *args: P.args, **kwargs: P.kwargs) -> Shared | R:
        """`submit_shared(...).result()`."""
        return self.submit_shared(method, *args, **kwargs).result()

    # the machinery -----------------------------------------------------------------------------------------
    def _start(self, name: str, args: tuple, kwargs: dict, share: bool = False):
        if self.local is not None:
            t0 = time.perf_counter()
            try:
                return ("ok", getattr(self.local, name)(*args, **kwargs))
            finally:
                self.seconds += time.perf_counter() - t0
                self.busy += time.perf_counter() - t0
        if self.incarnation is None:  # a new actor: its start (imports, model load) is not part of a call's timeout
            self._wait_started()
        return self.handle.call.remote(name, args, kwargs, share)

    def _wait_started(self) -> None:
        """Block until a new actor's worker is constructed, at most `start_timeout_s`; a constructor that raises
        (or an actor that cannot start) ends it with `WorkerFailed`."""
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        try:
            self._wait_alive(deadline=time.monotonic() + self.options.start_timeout_s)
        except (ActorUnavailableError, GetTimeoutError) as e:
            self.kill()
            raise WorkerFailed(self.name, f"did not start within start_timeout_s={self.options.start_timeout_s}") from e
        except RayActorError as e:
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]  # the constructor's error is last
            raise WorkerFailed(self.name, f"could not start: {lines[-1] if lines else type(e).__name__}") from e

    def _finish(self, pending: Pending, first_timeout_s: float | None = None) -> Any:
        if self.local is not None:
            return pending._ref[1]
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        timeout = self.options.timeout_s if first_timeout_s is None else first_timeout_s
        while True:
            t0 = time.perf_counter()
            try:
                value, busy, incarnation = ray.get(pending._ref, timeout=timeout)
                self.busy += busy
                pending.busy = busy
                if self.incarnation in (None, incarnation):
                    self.incarnation = incarnation
                    return value
                # Ray restarted the actor after it died between calls: the call ran on a fresh worker (initial
                # weights), so its result is discarded and the call runs again once the state is restored
                cause = f"{pending.name}(): the actor was restarted since its last call (its process died while idle)"
            except GetTimeoutError:
                cause = f"{pending.name}() took longer than timeout_s={self.options.timeout_s}"
                ray.kill(self.handle, no_restart=False)  # a hung actor is killed and restarted like a dead one
            except RayActorError as e:
                cause = f"{pending.name}(): the actor process died ({_first_line(e)})"
            finally:
                self.seconds += time.perf_counter() - t0
            self._recover(cause)
            pending._ref = self._start(pending.name, pending.args, pending.kwargs, pending.share)
            timeout = self.options.timeout_s

    def _recover(self, cause: str) -> None:
        """Wait for Ray to restart the actor and restore its state, or raise `WorkerFailed`."""
        self.restarts += 1
        if self.restarts > self.options.max_restarts:
            n = self.options.max_restarts  # this actor's own restarts by Ray (0 for a learner or critic, whose
            # recipe max_restarts counts the driver's recoveries of the whole step loop instead)
            spent = f"restarted {n} time{'s' if n > 1 else ''} already" if n else "the actor alone is not restarted"
            raise WorkerFailed(self.name, f"{cause}; restart limit max_restarts={n} reached ({spent})")
        from posttrain.runlog import log

        log.warning("actor %s: %s; restart %d of %d, retrying", self.name, cause, self.restarts,
                    self.options.max_restarts)
        try:
            self._wait_alive(deadline=time.monotonic() + self.options.start_timeout_s)
            if self.on_restart is not None:
                self.on_restart(self)
        except Exception as e:  # noqa: BLE001 - any failure here ends the actor for good
            raise WorkerFailed(self.name, f"{cause}; the restarted actor did not come back: {_first_line(e)}") from e

    def _wait_alive(self, deadline: float) -> None:
        """Block until the restarted actor answers (its constructor has run); Ray reports it unavailable until then."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError

        while True:
            try:
                self.incarnation = ray.get(self.handle.ident.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except (ActorUnavailableError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def pid(self) -> int:
        """The process id of the worker (this process for local workers)."""
        if self.local is not None:
            return os.getpid()
        import ray

        return ray.get(self.handle.pid.remote(), timeout=300)

    def node_id(self) -> str | None:
        """The Ray node the actor runs on, once it has started (as a first call waits for it; `WorkerFailed` if it
        cannot start); None for a worker in this process."""
        if self.local is not None:
            return None
        import ray

        if self.incarnation is None:
            self._wait_started()
        return ray.get(self.handle.node.remote(), timeout=300)

    def kill(self) -> None:
        """End the actor for good (no restart)."""
        if self.handle is not None:
            import ray

            ray.kill(self.handle, no_restart=True)


def gather(pending: list[Pending[R]]) -> list[R]:
    """The results of calls submitted to several actors, in submission order. They are collected as they finish,
    so a call that fails for good (`WorkerFailed`) is raised at once rather than after the calls listed before it:
    a data-parallel learner waits in a collective for a rank that died until its own timeout."""
    done: dict[int, Any] = {}
    t0 = time.monotonic()  # a call's timeout counts from here at the earliest, as `result()` counts from its wait
    remote = {i: p for i, p in enumerate(pending) if p.proxy.local is None}
    for i, p in enumerate(pending):
        if i not in remote:
            done[i] = p.result()
    if remote:
        import ray

        while len(done) < len(pending):
            waiting = {id(p._ref): i for i, p in remote.items() if i not in done}
            deadlines = {i: max(remote[i].started, t0) + remote[i].proxy.options.timeout_s for i in waiting.values()
                         if remote[i].proxy.options.timeout_s is not None}
            wait = max(0.0, min(deadlines.values()) - time.monotonic()) if deadlines else None
            ready, _ = ray.wait([remote[i]._ref for i in waiting.values()], num_returns=1, timeout=wait)
            if ready:
                i = waiting[id(ready[0])]
                done[i] = remote[i].result()  # returns, or recovers (restart, retry), or raises WorkerFailed
            else:  # the earliest deadline passed: that call hangs; its actor is killed and the call retried
                i = min(deadlines, key=deadlines.get)
                done[i] = remote[i].result(timeout_s=0.0)
    return [done[i] for i in range(len(pending))]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def spawn(cls: type[W], *args, name: str, options: ActorOptions = ActorOptions(), backend: str = "ray",
          **kwargs) -> Proxy[W]:
    """Build `cls(*args, **kwargs)` in a new Ray actor (or in this process) and return its typed proxy.

    The constructor runs with `options.torch_threads` torch threads. Ray must already be initialised
    (`posttrain.workers.ray_cluster.init_ray`). The actor is scheduled with `options.cpus` / `options.gpus` on a
    node that has `options.resources` (custom labels) and restarted by Ray up to `options.max_restarts` times.
    """
    if backend == "local":
        import torch

        torch.set_num_threads(options.torch_threads)
        return Proxy(cls, name, options, local=cls(*args, **kwargs))
    if backend != "ray":
        raise ValueError(f"unknown backend {backend!r}; expected 'ray' or 'local'")
    import ray

    actor_cls = ray.remote(Host).options(
        name=None, num_cpus=options.cpus, num_gpus=options.gpus, resources=dict(options.resources) or None,
        max_restarts=options.max_restarts, max_task_retries=0, max_concurrency=1,
    )
    handle = actor_cls.remote(cls, args, kwargs, options.torch_threads)
    return Proxy(cls, name, options, handle=handle)
