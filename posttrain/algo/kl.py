"""Per-token KL estimators between the policy and a reference policy, as a loss term and as a reward penalty.

Schulman, "Approximating KL divergence" (2020, http://joschu.net/blog/kl-approx.html). With tokens sampled from the
policy and ``log_r = ref_logp - logp`` (the log of ref/policy), the estimators of KL(policy || ref) are

* ``k1`` = ``-log_r`` = ``logp - ref_logp``: unbiased, high variance, can be negative;
* ``k2`` = ``0.5 * log_r**2``: biased, low variance, non-negative;
* ``k3`` (``low_var_kl``) = ``exp(log_r) - log_r - 1``: unbiased, low variance, non-negative (GRPO's KL term,
  Shao et al. 2024, and TRL's ``beta`` term).

Differences from upstream: verl clamps ``log_r`` to [-20, 20] and k3 to [-10, 10]; TRL and this module do not
clamp, so a diverged policy shows up as a large KL instead of a silently capped one.
"""

from __future__ import annotations

import torch

from posttrain.algo.losses import agg_loss, masked_mean
from posttrain.algo.registry import get_kl_estimator, register_kl


@register_kl("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp, per token; shapes (B, T) -> (B, T)."""
    return logp - ref_logp


@register_kl("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (logp - ref_logp)**2, per token; shapes (B, T) -> (B, T)."""
    return 0.5 * (logp - ref_logp).square()


@register_kl("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1, per token; shapes (B, T) -> (B, T)."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


register_kl("low_var_kl")(kl_k3)  # verl's name for k3


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(policy || ref) estimate of the given `kind` (a registered name); (B, T) -> (B, T)."""
    return get_kl_estimator(kind)(logp, ref_logp)


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "k3",
    agg: str = "token_mean",
    max_len: int | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL to the reference as a loss term (GRPO's ``beta * KL``; multiply the returned loss by ``beta``).

    Args:
        logp, ref_logp: (B, T) log-probs of the sampled tokens under the policy (with grad) and the reference.
        mask: (B, T) 1 on response tokens.
        kind: ``k1`` | ``k2`` | ``k3`` (``low_var_kl``).
        agg, max_len, num_tokens: as in `losses.agg_loss`; use the policy loss's `agg` so that
            ``pg_loss + beta * kl_loss`` equals aggregating ``per_token_pg + beta * per_token_kl`` (TRL's order).

    Returns:
        (scalar loss, ``{"actor/kl_loss": masked token mean of the estimate}``).
    """
    kl = kl_estimate(logp, ref_logp, kind)
    loss = agg_loss(kl, mask, agg=agg, max_len=max_len, num_tokens=num_tokens)
    return loss, {"actor/kl_loss": float(masked_mean(kl.detach(), mask))}


def kl_penalty_rewards(
    token_rewards: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level rewards minus ``coef * KL`` (the InstructGPT/PPO in-reward KL penalty, Ouyang et al. 2022).

    Args:
        token_rewards: (B, T) token-level rewards (an outcome reward sits on the last response token).
        logp, ref_logp: (B, T) rollout-policy and reference log-probs (treated as constants: detached here).
        mask: (B, T) 1 on response tokens; the penalty is zero elsewhere.
        coef: the KL coefficient (beta).
        kind: estimator name; ``k1`` is the classic choice for the in-reward penalty.

    Returns:
        ((B, T) penalised rewards, ``{"actor/reward_kl_penalty": masked mean KL, "actor/reward_kl_coef": coef}``).

    Unlike verl's ``apply_kl_penalty`` there is no KL controller here: an adaptive coefficient is the caller's state.
    """
    mask = mask.to(token_rewards.dtype)
    kl = kl_estimate(logp.detach(), ref_logp.detach(), kind) * mask
    return token_rewards - coef * kl, {
        "actor/reward_kl_penalty": float(masked_mean(kl, mask)),
        "actor/reward_kl_coef": float(coef),
    }
