"""Per-token KL estimators between the policy and a reference policy, as a loss term and as a reward penalty.

Schulman, "Approximating KL divergence" (2020, http://joschu.net/blog/kl-approx.html). With tokens sampled from the
policy and ``log_r = ref_logp - logp`` (the log of ref/policy), the estimators of KL(policy || ref) are

* ``k1`` = ``-log_r`` = ``logp - ref_logp``: unbiased, high variance, can be negative;
* ``k2`` = ``0.5 * log_r**2``: biased, low variance, non-negative;
* ``k3`` (``low_var_kl``) = ``exp(log_r) - log_r - 1``: unbiased, low variance, non-negative (GRPO's KL term,
  Shao et al. 2024, and TRL's ``beta`` term).

k3 is clamped as verl clamps it: ``log_r`` to [-20, 20] before the exp and k3 to [-10, 10] after. Unclamped (TRL),
``exp(log_r)`` overflows float32 once the policy gives a sampled token e^-88 of the reference's probability, and
the inf/NaN (in the loss, or in the gradient even of a masked token: ``torch.where`` sends 0 * inf = NaN back)
skips the whole step. With the clamps the loss and its gradients are always finite; the price is that a token
whose k3 passes 10 (log_r > ~2.6: the reference ~13x likelier than the policy; or log_r < -11) adds 10 and no
gradient, as the clip range does to the policy ratio. A diverged policy still shows: `actor/kl_loss` sits near
10. k1 and k2 stay unclamped (finite wherever their inputs are), as in verl.
"""

from __future__ import annotations

import torch

from posttrain.algo.losses import agg_loss, masked_mean
from posttrain.algo.registry import get_kl_estimator, register_kl

K3_LOG_RATIO_BOUND = 20.0  # verl's clamp of log(ref / policy) before the exp
K3_BOUND = 10.0  # verl's clamp of the k3 estimate


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
    """k3 = exp(log_r) - log_r - 1 with log_r = ref_logp - logp clamped to [-20, 20], then clamped to [-10, 10]
    (verl's bounds; see the module docstring); shapes (B, T) -> (B, T)."""
    log_r = (ref_logp - logp).clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
    return (torch.exp(log_r) - log_r - 1).clamp(-K3_BOUND, K3_BOUND)


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
        (scalar loss, ``{"actor/kl_loss": masked token mean of the estimate}``); finite, with finite gradients,
        whatever the log-probs off the mask hold.
    """
    keep = mask.to(torch.bool)
    zero = torch.zeros_like(logp)
    # off the mask both log-probs are 0 before the estimate: garbage there (inf, NaN) would otherwise send NaN
    # gradients back through agg_loss's where (0 * inf)
    kl = kl_estimate(torch.where(keep, logp, zero), torch.where(keep, ref_logp, zero), kind)
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
