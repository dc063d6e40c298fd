"""Data-parallel and FSDP2 helpers of the learners (`posttrain.learner`, `posttrain.workers.learner`): whether a model
is sharded, a DTensor's local shard or whole tensor, the gradient norm over shards, and a sum across ranks (a no-op
without a process group of several ranks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def is_sharded(model) -> bool:
    """Whether the model's parameters are FSDP2 DTensors (`workers.learner.shard_model`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (collective: every rank must call it); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sharded_clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float | None) -> float:
    """`clip_grad_norm` over DTensor gradients: the squared norms of the local shards summed across ranks."""
    grads = [local_shard(p.grad) for p in params if p.grad is not None]
    sq = torch.stack([g.detach().pow(2).sum(dtype=torch.float64) for g in grads]).sum() if grads else None
    sq = torch.zeros(1, dtype=torch.float64) if sq is None else sq.reshape(1).cpu()
    norm = float(all_reduce_sum(sq).sqrt())
    limit = max_norm if max_norm is not None and max_norm > 0 else math.inf
    coef = limit / (norm + 1e-6)
    if math.isfinite(norm) and coef < 1:
        for g in grads:
            g.mul_(coef)
    return norm


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(n: int) -> int:
    """The largest `n` over the ranks (this one's `n` without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = torch.tensor([n], dtype=torch.long)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return int(x.item())
    return n
