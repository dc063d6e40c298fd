"""Advantage estimators (group-relative for outcome rewards, GAE for token-level rewards) and batch filters.

Registered estimators (`registry.get_adv_estimator`):

* ``grpo``: `compute_grpo_advantages` (group mean baseline, divided by the group std);
* ``dr_grpo``: the same without the std division (Dr. GRPO);
* ``gae``: `compute_gae` (needs a critic).

Outcome estimators take ``rewards`` (N,) and return (N,) advantages, one per sequence, which
`losses.compute_policy_loss` broadcasts over the sequence's tokens; ``gae`` takes token-level (B, T) tensors and
returns ``(advantages, returns)``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from posttrain.algo.registry import register_adv_est


def group_index(
    n: int, group_ids: torch.Tensor | Sequence | None = None, group_size: int | None = None, device=None
) -> tuple[torch.Tensor, int]:
    """Dense group index (N,) in [0, G) and G, from ids (any hashables, e.g. prompt uids) or a contiguous size.

    Exactly one of `group_ids` (N,) and `group_size` must be given; `group_size` means samples
    ``[k * group_size, (k + 1) * group_size)`` share a prompt (TRL's layout, ``num_generations``).
    """
    if (group_ids is None) == (group_size is None):
        raise ValueError("pass exactly one of group_ids and group_size")
    if group_size is not None:
        if group_size < 1 or n % group_size:
            raise ValueError(f"{n} samples do not split into groups of {group_size}")
        return torch.arange(n, device=device) // group_size, n // group_size
    if isinstance(group_ids, torch.Tensor):
        if group_ids.shape != (n,):
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({n},)")
        _, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse.to(device), int(inverse.max()) + 1 if n else 0
    ids = list(group_ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} group ids for {n} samples")
    first: dict = {}
    index = [first.setdefault(g, len(first)) for g in ids]
    return torch.tensor(index, dtype=torch.long, device=device), len(first)


def _group_stats(rewards: torch.Tensor, index: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, ...]:
    """Per-sample group count, mean and unbiased std (0 for singleton groups), each (N,), in `rewards`' dtype."""
    zeros = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device)
    count = zeros.index_add(0, index, torch.ones_like(rewards))
    mean = zeros.index_add(0, index, rewards) / count.clamp(min=1)
    sq = zeros.index_add(0, index, (rewards - mean[index]).square())
    std = torch.sqrt(sq / (count - 1).clamp(min=1))  # Bessel-corrected, like torch.std, verl and TRL's nanstd
    return count[index], mean[index], std[index]


def _shift_by_group_first(rewards: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(N,) rewards minus the first reward of their group: the same advantages, and an all-equal group becomes
    exact zeros, so its mean is exactly 0 (a float sum of 16 x 0.895 divided by 16 is not 0.895, and
    ``(r - mean) / (std + eps)`` turns that ulp into advantages of 0.19)."""
    n = rewards.shape[0]
    pos = torch.arange(n, device=rewards.device)
    first = torch.full((n_groups,), n, dtype=pos.dtype, device=pos.device).scatter_reduce(0, index, pos, "amin")
    return rewards - rewards[first[index]]


def compute_grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence | None = None,
    *,
    group_size: int | None = None,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages for outcome rewards (GRPO, Shao et al. 2024, "DeepSeekMath").

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` over the samples g of the same prompt; with ``norm_by_std=False``
    ``A_i = r_i - mean_g(r)`` (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-like training": the std division
    up-weights prompts that are nearly always solved or nearly never).

    Args:
        rewards: (N,) one scalar reward per sample.
        group_ids: (N,) prompt id per sample (tensor or list of hashables), in any order; or
        group_size: G, for samples laid out in contiguous groups of G.
        norm_by_std: divide by the group's unbiased std.
        eps: added to the std (verl uses 1e-6, TRL 1e-4).

    Returns:
        (N,) advantages, no grad.

    Differences: a singleton group gets advantage 0 (it has no baseline but itself); verl instead uses mean 0 and
    std 1 there (advantage = raw reward) and TRL yields NaN. A group whose rewards are all equal gets exactly 0,
    whatever the values (0.895 x 16, 100.1 x 8): the statistics are computed in float64 on the rewards minus
    their group's first reward, so such a group is all zeros before any rounding (verl and TRL take a float32
    mean, one ulp off, which the std division blows up to advantages of 0.2-0.8). A NaN or inf reward makes its
    whole group non-finite (the learner then skips the step).
    """
    with torch.no_grad():
        r = rewards.detach().double()
        index, n_groups = group_index(r.shape[0], group_ids, group_size, device=r.device)
        r = _shift_by_group_first(r, index, n_groups)
        _, mean, std = _group_stats(r, index, n_groups)
        adv = r - mean
        if norm_by_std:
            adv = adv / (std + eps)
    return adv.float()


@register_adv_est("grpo")
def grpo_advantages(rewards, group_ids=None, **kwargs) -> torch.Tensor:
    """``grpo``: `compute_grpo_advantages` with std normalisation (the default)."""
    return compute_grpo_advantages(rewards, group_ids, **kwargs)


@register_adv_est("dr_grpo")
def dr_grpo_advantages(rewards, group_ids=None, **kwargs) -> torch.Tensor:
    """``dr_grpo``: `compute_grpo_advantages` with ``norm_by_std=False`` (Dr. GRPO)."""
    return compute_grpo_advantages(rewards, group_ids, norm_by_std=False, **kwargs)


@register_adv_est("gae")
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-dimensional continuous control using GAE").

    Over the response tokens of each row, in order, with V = 0 after the last one::

        delta_t = r_t + gamma * V_{t+1} - V_t;   A_t = delta_t + gamma * lam * A_{t+1};   R_t = A_t + V_t

    Args:
        rewards: (B, T) token-level rewards (outcome reward on the last response token, KL penalty per token).
        values: (B, T) critic values at rollout time.
        mask: (B, T) 1 on response tokens. Masked positions inside a row (tool output in multi-turn rollouts) are
            skipped: "next" means the next response token, as in verl.
        gamma, lam: discount and GAE lambda (1.0, 1.0 is the usual LM setting: A_t = return - V_t).

    Returns:
        (advantages, returns), each (B, T), zero off the mask, no grad. Unlike verl the advantages are not
        whitened here: call `masked_whiten` if the recipe wants it.
    """
    with torch.no_grad():
        m = mask.to(values.dtype)
        next_value = torch.zeros_like(values[:, 0])
        next_adv = torch.zeros_like(values[:, 0])
        adv = torch.zeros_like(values)
        for t in reversed(range(values.shape[1])):  # the recursion runs over time; rows are vectorised
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            a_t = delta + gamma * lam * next_adv
            keep = m[:, t]
            next_value = keep * values[:, t] + (1 - keep) * next_value  # a masked position passes its next on
            next_adv = keep * a_t + (1 - keep) * next_adv
            adv[:, t] = a_t * keep
        returns = (adv + values) * m
    return adv, returns


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` (B, T) to zero mean and unit variance over the masked positions (unbiased variance, as verl).

    ``shift_mean=False`` keeps the original mean (only scales). Positions off the mask are returned as 0.
    """
    keep = mask.to(torch.bool)
    vals = x[keep]
    mean = vals.mean() if vals.numel() else x.new_zeros(())
    var = vals.var(unbiased=True) if vals.numel() > 1 else x.new_zeros(())
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, torch.zeros_like(out))


def dynamic_sampling_mask(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence | None = None,
    *,
    group_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO's dynamic sampling filter (Yu et al. 2025): drop groups whose rewards are all equal.

    Such groups have zero group-relative advantage, so they only dilute the batch. DAPO then samples more prompts
    until the batch is full; that loop belongs to the driver, this function only decides what to keep.

    Args:
        rewards: (N,) per-sample rewards; group_ids / group_size as in `compute_grpo_advantages`.

    Returns:
        (keep (N,) bool, ``rollout/dropped_groups``, ``rollout/dropped_samples``, ``rollout/kept_groups``).
        A singleton group counts as all-equal and is dropped (as verl's std == 0 test does). Equality is exact.
    """
    with torch.no_grad():
        index, n_groups = group_index(rewards.shape[0], group_ids, group_size, device=rewards.device)
        r = rewards.detach().float()
        g_max = torch.full((n_groups,), -torch.inf, device=r.device).scatter_reduce(0, index, r, "amax")
        g_min = torch.full((n_groups,), torch.inf, device=r.device).scatter_reduce(0, index, r, "amin")
        varied = g_max > g_min  # (G,)
        keep = varied[index]
    n_drop_groups = int((~varied).sum())
    return keep, {
        "rollout/dropped_groups": float(n_drop_groups),
        "rollout/dropped_samples": float((~keep).sum()),
        "rollout/kept_groups": float(n_groups - n_drop_groups),
    }
