"""Weight sync by collective broadcast (issue #25, `grpo.weight_sync.method: broadcast`): learner 0 broadcasts its
trainable weights (all of them, or the LoRA adapter) straight to every rollout worker, with neither the driver nor
Ray's object store in the path; on CPU over gloo, on CUDA over NCCL.

The group is not the learners' data-parallel one: it is built on a `TCPStore` at learner 0's node
(`ProcessGroupGloo` / `ProcessGroupNCCL` made directly, as vLLM's `StatelessProcessGroup` and OpenRLHF's
`init_process_group` helper do), so that actors which already belong to another group can join it. Ranks:
0 = learner 0 (the sender), 1..n = the rollout workers.

One sync (`BroadcastSender.broadcast_weights` on learner 0, `BroadcastReceiver.receive_weights` on every rollout
worker, called at once by the driver):

    header  <- int64[2] from rank 0: (1 = go | 0 = abort, the number of buckets)
    buckets <- the tensors, in the order of their specs (name, shape, dtype), cut into runs of one dtype of at most
               `bucket_bytes` each (a larger tensor goes alone), each flattened into one buffer and broadcast

A receiver applies the update (`update_weights`) only after every bucket has arrived, so a sync that fails part way
leaves its weights as they were. A failed collective (a peer died, the timeout passed) is reported, not raised:
the sender returns `ok: False`, a receiver -1, and each closes its group, so the others' collectives end too; the
driver then sends the weights through the object store and builds a new group before the next sync
(`stages/rl_sync.py`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from datetime import timedelta

import torch

Spec = tuple[str, tuple[int, ...], str]  # (name, shape, dtype name)


def specs_of(named: Mapping[str, torch.Tensor]) -> list[Spec]:
    """The (name, shape, dtype) of every tensor, in the mapping's order."""
    return [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in named.items()]


def buckets(specs: list[Spec], bucket_bytes: int) -> list[list[int]]:
    """Indices of `specs` cut into buckets: consecutive tensors of one dtype, at most `bucket_bytes` in all (a
    tensor larger than that forms a bucket of its own). Every index appears once, in order."""
    out: list[list[int]] = []
    size, dtype = 0, None
    for i, (_, shape, dt) in enumerate(specs):
        nbytes = math.prod(shape) * getattr(torch, dt).itemsize
        if not out or dt != dtype or size + nbytes > bucket_bytes:
            out.append([])
            size, dtype = 0, dt
        out[-1].append(i)
        size += nbytes
    return out


def pack(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One flat buffer on `device` holding `tensors` (one dtype) one after another."""
    return torch.cat([t.detach().reshape(-1).to(device) for t in tensors])


def unpack(flat: torch.Tensor, specs: list[Spec]) -> list[torch.Tensor]:
    """The tensors of `specs` (in order) as views of `flat`, `pack`'s inverse."""
    out, at = [], 0
    for _, shape, _ in specs:
        n = math.prod(shape)
        out.append(flat[at:at + n].view(shape))
        at += n
    if at != flat.numel():
        raise ValueError(f"weight sync: a bucket of {flat.numel()} elements holds {at} by its specs")
    return out


class BroadcastGroup:
    """A process group of its own: `world_size` ranks meeting at `url` (tcp://host:port, rank 0 listens).

    backend: `gloo` (CPU tensors) or `nccl` (CUDA tensors, one device per rank); `timeout_s` bounds the meeting and
    every collective."""

    def __init__(self, url: str, rank: int, world_size: int, backend: str, timeout_s: float):
        import torch.distributed as dist

        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, int(port), world_size, is_master=rank == 0, timeout=timeout)
        self.store = dist.PrefixStore("posttrain_weight_sync/", store)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            raise ValueError(f"weight sync: unknown backend {backend!r} (gloo, nccl)")

    def broadcast(self, tensor: torch.Tensor) -> None:
        """`tensor` from rank 0 into every other rank's `tensor`, in place."""
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def send(self, named: Mapping[str, torch.Tensor], specs: list[Spec], bucket_bytes: int) -> int:
        """Rank 0: the tensors of `specs` from `named`; returns the bytes sent to each receiver. When `named` does
        not match `specs`, every rank is told to abort (nothing sent) and ValueError names the first difference."""
        mismatch = _mismatch(named, specs)
        plan = buckets(specs, bucket_bytes)
        self.broadcast(torch.tensor([0 if mismatch else 1, len(plan)], dtype=torch.int64, device=self.device))
        if mismatch:
            raise ValueError(f"weight sync: the learner's weights no longer match the group's specs: {mismatch}")
        sent = 0
        for idx in plan:
            flat = pack([named[specs[i][0]] for i in idx], self.device)
            self.broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def recv(self, specs: list[Spec], bucket_bytes: int) -> dict[str, torch.Tensor] | None:
        """Rank > 0: the tensors of `specs` (on this group's device), or None when rank 0 aborted."""
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.broadcast(header)
        plan = buckets(specs, bucket_bytes)
        if int(header[0]) == 0:
            return None
        if int(header[1]) != len(plan):
            raise ValueError(f"weight sync: the sender cut {int(header[1])} buckets, the receiver {len(plan)}")
        out = {}
        for idx in plan:
            part = [specs[i] for i in idx]
            flat = torch.empty(sum(math.prod(s[1]) for s in part), dtype=getattr(torch, part[0][2]), device=self.device)
            self.broadcast(flat)
            out.update({s[0]: t for s, t in zip(part, unpack(flat, part))})
        return out


def _mismatch(named: Mapping[str, torch.Tensor], specs: list[Spec]) -> str | None:
    if len(named) != len(specs):
        return f"{len(named)} tensors against {len(specs)} specs"
    for spec, got in zip(specs, specs_of(named)):
        if spec != got:
            return f"{got} against {spec}"
    return None


class BroadcastSender:
    """The sending side, mixed into `LearnerWorker` (rank 0 of the group); needs `weights()` and `rendezvous()`."""

    _wsync: BroadcastGroup | None = None

    def weight_specs(self) -> list[Spec]:
        """The specs of what `weights()` returns (what the receivers allocate)."""
        return specs_of(self.weights())

    def join_weight_sync(self, url: str, world_size: int, backend: str, timeout_s: float, generation: int,
                         bucket_bytes: int, specs: list) -> None:
        """Open group `generation` as rank 0 (returns once every rank has joined); `specs`: `weight_specs()`, which
        every rank of the group holds."""
        self.close_weight_sync()
        self._wsync = BroadcastGroup(url, 0, world_size, backend, timeout_s)
        self._wsync_gen, self._wsync_bucket = generation, bucket_bytes
        self._wsync_specs = [(n, tuple(s), d) for n, s, d in specs]

    def broadcast_weights(self, generation: int) -> dict:
        """Broadcast `weights()` to the group `generation`. Returns {"ok", "bytes", "seconds", "error"}; a failed
        collective closes the group (so that the receivers' collectives end too) and is reported, not raised."""
        if self._wsync is None or self._wsync_gen != generation:
            return {"ok": False, "bytes": 0, "seconds": 0.0, "error": f"not in weight-sync group {generation}"}
        t0 = time.perf_counter()
        try:
            sent = self._wsync.send(self.weights(), self._wsync_specs, self._wsync_bucket)
        except (RuntimeError, ValueError) as e:  # torch.distributed.DistError is a RuntimeError
            self.close_weight_sync()
            return {"ok": False, "bytes": 0, "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}
        return {"ok": True, "bytes": sent, "seconds": time.perf_counter() - t0, "error": None}

    def close_weight_sync(self) -> None:
        self._wsync = None  # the process group closes its connections when it is collected


class BroadcastReceiver:
    """The receiving side, mixed into `RolloutWorker` (and so the vllm engine's worker); applies what arrives with
    its own `update_weights`."""

    _wsync: BroadcastGroup | None = None

    def join_weight_sync(self, url: str, rank: int, world_size: int, backend: str, timeout_s: float, generation: int,
                         bucket_bytes: int, specs: list) -> None:
        """Open group `generation` as `rank` (returns once every rank has joined)."""
        self.close_weight_sync()
        self._wsync = BroadcastGroup(url, rank, world_size, backend, timeout_s)
        self._wsync_gen, self._wsync_bucket = generation, bucket_bytes
        self._wsync_specs = [(n, tuple(s), d) for n, s, d in specs]

    def receive_weights(self, version: int, generation: int) -> int:
        """Take the broadcast of group `generation` and apply it as policy `version`; returns the tensors applied,
        or -1 when nothing was (not in that group, e.g. restarted since; the sender aborted; the collective
        failed, which closes this side of the group). A bad name or shape raises, as `update_weights` does."""
        if self._wsync is None or self._wsync_gen != generation:
            return -1
        try:
            got = self._wsync.recv(self._wsync_specs, self._wsync_bucket)
        except RuntimeError:
            self.close_weight_sync()
            return -1
        if got is None:
            return -1
        return self.update_weights(got, version)

    def close_weight_sync(self) -> None:
        self._wsync = None
