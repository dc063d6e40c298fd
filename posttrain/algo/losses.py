"""Policy, value and entropy losses for PPO/GRPO-style RL on LMs, plus the non-finite guard.

Shapes: B sequences, T response positions (right-padded), V vocabulary. ``mask`` (B, T) is 1 (or True) on the
response tokens that count in the loss and 0 on padding (and on tool-output tokens in multi-turn rollouts).

How the TRL ``GRPOConfig.loss_type`` values map onto `compute_policy_loss` (``level="token"``, clip as below):

=========  ==================================================================================
grpo       ``agg="seq_mean_token_mean"``
bnpo       ``agg="token_mean"`` (over the micro-batch)
dapo       ``agg="token_mean", num_tokens=<response tokens in the whole generation batch>``
dr_grpo    ``agg="seq_mean_token_sum_norm", max_len=<max completion length>``
GSPO       ``level="sequence"`` (TRL ``importance_sampling_level="sequence"``), usually with ``grpo``'s agg
=========  ==================================================================================

TRL's ``epsilon``/``epsilon_high`` are ``clip_low``/``clip_high``; ``beta * KL`` is `kl.kl_loss` added with the same
agg; vLLM ``token_truncate`` importance sampling is `tis_weights` passed as ``is_weights``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from posttrain.algo.registry import register_policy_loss

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LEVELS = ("token", "sequence")
# bounds on log importance ratios before exp (verl's): the token log-ratio to [-20, 20] (vanilla PPO loss), GSPO's
# sequence log-ratio to at most 10; exp stays finite in float32/bfloat16 and so do the gradients
LOG_RATIO_BOUND = 20.0
SEQ_LOG_RATIO_MAX = 10.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is set (all dims, or along `dim`); 0 where nothing is set."""
    m = mask.to(torch.bool).expand_as(x)
    total = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / m.sum().clamp(min=1)
    return total.sum(dim) / m.sum(dim).clamp(min=1)


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token_mean",
    *,
    max_len: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar.

    * ``token_mean``: sum over response tokens / their count (DAPO, Yu et al. 2025). Pass `num_tokens`, the token
      count of the whole (global) batch, when one batch is split into micro-batches or ranks so that the summed
      gradients equal one global token mean (TRL's ``dapo`` normaliser, ``num_items_in_batch``).
    * ``seq_mean_token_mean``: per-sequence token mean, then mean over the B sequences (GRPO, Shao et al. 2024).
    * ``seq_mean_token_sum_norm``: sum over tokens / (B * max_len) (Dr. GRPO, Liu et al. 2025: a constant normaliser
      so that long and short answers are weighted alike). `max_len` is the maximum completion length, required;
      unlike verl it is not taken from the padded width T, which depends on the batch, and B is divided out as TRL
      and the paper's 1/G do (verl divides only by the length).

    B counts the sequences with at least one masked-in token: a row whose mask is all zero (a group dropped by
    dynamic sampling) is not in the batch, as it adds no token to ``token_mean``. This is verl's `agg_loss`
    (``seq_mask = loss_mask.sum(-1) > 0``); TRL divides by every row, which is the same value whenever no row is
    empty (TRL never has one). It makes the loss a sum of per-row terms over one count, so data-parallel ranks
    that scale by their share of that count take exactly the one-learner step (`posttrain.learner`).

    Masked positions are dropped with `torch.where`, so NaN/Inf in padding never leak into the loss.
    """
    keep = mask.to(torch.bool).expand_as(loss_mat)
    masked = torch.where(keep, loss_mat, torch.zeros_like(loss_mat))
    if agg == "token_mean":
        denom = keep.sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked.sum() / denom
    n_seqs = keep.any(-1).sum().clamp(min=1)  # sequences with a token in the loss
    if agg == "seq_mean_token_mean":
        return (masked.sum(-1) / keep.sum(-1).clamp(min=1)).sum() / n_seqs
    if agg == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError("agg='seq_mean_token_sum_norm' needs max_len (the maximum completion length)")
        return masked.sum() / (n_seqs * max_len)
    raise ValueError(f"unknown agg {agg!r}. Known: {', '.join(AGG_MODES)}")


def _importance_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log of the importance ratio, (B, T): per token, clamped to +-`LOG_RATIO_BOUND`, or the masked mean over each
    sequence (GSPO), clamped to at most `SEQ_LOG_RATIO_MAX` and broadcast. The clamps are verl's; beyond them the
    ratio is constant (no gradient), as it is once clipped."""
    keep = mask.to(torch.bool)
    log_ratio = torch.where(keep, logp - old_logp, torch.zeros_like(logp))  # padding may hold garbage log-probs
    if level == "token":
        return log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if level == "sequence":
        seq = log_ratio.sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp(min=1)
        return seq.clamp(max=SEQ_LOG_RATIO_MAX).expand_as(logp)
    raise ValueError(f"unknown importance-sampling level {level!r}. Known: {', '.join(LEVELS)}")


def compute_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = None,
    level: str = "token",
    agg: str = "token_mean",
    max_len: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate policy loss (PPO, Schulman et al. 2017) with the LM-RL variants.

    Per token, with ratio r and advantage A::

        loss = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)
        if dual_clip_c and A < 0:  loss = min(loss, -dual_clip_c * A)

    Args:
        logp: (B, T) log-probs of the sampled tokens under the current policy (carries the gradient).
        old_logp: (B, T) log-probs under the policy that generated the batch (the learner's recomputation).
        advantages: (B,) one per sequence (GRPO) or (B, T) per token (GAE).
        mask: (B, T) 1 on response tokens.
        clip_low, clip_high: the clip range; ``clip_high > clip_low`` is DAPO's clip-higher (Yu et al. 2025).
        dual_clip_c: dual clip (Ye et al. 2020, "Mastering complex control in MOBA games"): for A < 0 the loss is
            capped at ``-c * A`` so a huge ratio on a bad token cannot blow up the update. Must be > 1. None = off.
        level: ``token`` (PPO/GRPO) or ``sequence`` (GSPO, Zheng et al. 2025: r = exp(mean over the sequence's
            tokens of logp - old_logp), one ratio per sequence, clipped as a whole).
        agg, max_len, num_tokens: see `agg_loss`.
        is_weights: optional (B, T) per-token weights (e.g. `tis_weights`), applied detached after clipping, to the
            policy-gradient term only (verl's ``rollout_is_weights``, TRL's ``importance_sampling_ratio``).

    Returns:
        (scalar loss, metrics) with ``actor/pg_loss``, ``actor/clipfrac_low`` (r < 1 - clip_low, A < 0),
        ``actor/clipfrac_high`` (r > 1 + clip_high, A > 0), ``actor/clipfrac_dual`` (r > c, A < 0),
        ``actor/approx_kl`` (token-level k3 estimate of KL(old || new)) and ``actor/ratio_mean``.
        Fractions are token means over `mask`, for both levels.

    Numerical bounds (verl's): the token log-ratio is clamped to [-20, 20] and GSPO's sequence log-ratio to at most
    10 before exp, so a diverged policy (or a stale old_logp) gives a finite loss and finite gradients instead of
    inf/NaN and a skipped step; past a bound the ratio has no gradient, as a clipped one has none. TRL does not
    clamp (the same values inside the bounds).

    Differences from upstream: GSPO's ratio is exp of the mean log-ratio as in TRL; verl writes it per token as
    ``sg[s_i] * pi / sg[pi]``, which has the same value and, summed over a sequence, the same gradient. TRL's
    ``delta`` (an upper cap on r for any sign of A, INTELLECT-2) is not the dual clip and is not implemented.
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(logp)

    log_w = _importance_log_ratio(logp, old_logp, mask, level)
    ratio = torch.exp(log_w)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss_mat = -torch.min(ratio * advantages, clipped * advantages)
    if dual_clip_c is not None:
        loss_mat = torch.where(advantages < 0, torch.minimum(loss_mat, -dual_clip_c * advantages), loss_mat)
    if is_weights is not None:
        loss_mat = loss_mat * is_weights.detach()
    loss = agg_loss(loss_mat, mask, agg, max_len=max_len, num_tokens=num_tokens)

    with torch.no_grad():
        r, a = ratio.detach(), advantages.detach()
        token_lr = _importance_log_ratio(logp.detach(), old_logp, mask, "token")  # clamped: a finite metric
        metrics = {
            "actor/pg_loss": float(loss.detach()),
            "actor/clipfrac_low": float(masked_mean(((r < 1 - clip_low) & (a < 0)).float(), mask)),
            "actor/clipfrac_high": float(masked_mean(((r > 1 + clip_high) & (a > 0)).float(), mask)),
            "actor/approx_kl": float(masked_mean(torch.expm1(token_lr) - token_lr, mask)),
            "actor/ratio_mean": float(masked_mean(r, mask)),
        }
        if dual_clip_c is not None:
            metrics["actor/clipfrac_dual"] = float(masked_mean(((r > dual_clip_c) & (a < 0)).float(), mask))
    return loss, metrics


@register_policy_loss("vanilla")
def vanilla_policy_loss(logp, old_logp, advantages, mask, **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/GRPO token-level clipped loss: `compute_policy_loss` with ``level="token"``."""
    return compute_policy_loss(logp, old_logp, advantages, mask, level="token", **kwargs)


@register_policy_loss("gspo")
def gspo_policy_loss(
    logp, old_logp, advantages, mask, *, agg: str = "seq_mean_token_mean", **kwargs
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (Zheng et al. 2025): sequence-level ratio; `compute_policy_loss` with ``level="sequence"``.

    The paper clips with much smaller ranges (e.g. 3e-4 / 4e-4) than token-level PPO; pass them as clip_low/high.
    """
    return compute_policy_loss(logp, old_logp, advantages, mask, level="sequence", agg=agg, **kwargs)


def tis_weights(
    rollout_logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    *,
    floor: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance-sampling weights between the rollout engine and the learner, per token.

    Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training": the rollout engine
    (vLLM/SGLang, other kernels and precision) samples from pi_rollout, not from the learner's pi_old, so the
    gradient is reweighted by ``w = min(pi_old / pi_rollout, cap)``, detached.

    Args:
        rollout_logp: (B, T) log-probs the rollout engine reported for the sampled tokens (NaN = not available).
        old_logp: (B, T) the learner's log-probs of the same tokens before the update.
        mask: (B, T) 1 on response tokens; other positions get weight 1.
        cap: the truncation C (TRL ``vllm_importance_sampling_clip_max``).
        floor: optional lower clamp (TRL ``vllm_importance_sampling_clip_min``); the paper has none.

    Returns:
        ((B, T) detached weights, ``rollout/tis_weight_mean``, ``rollout/tis_weight_max``, ``rollout/tis_clipfrac``
        (tokens capped), ``rollout/logp_diff_abs_mean``, ``rollout/logp_diff_abs_max`` over the mask; the max are 0
        on an empty mask).
        Equals TRL's ``vllm_importance_sampling_mode="token_truncate"``, NaN rollout log-probs included (weight 1).
    """
    with torch.no_grad():
        keep = mask.to(torch.bool)
        diff = torch.where(keep, old_logp - rollout_logp, torch.zeros_like(old_logp))
        diff = torch.nan_to_num(diff, nan=0.0)
        raw = torch.exp(diff)
        weights = torch.clamp(raw, min=floor, max=cap)
        abs_diff = diff.abs()[keep]
        kept_w = weights[keep]
        metrics = {
            "rollout/tis_weight_mean": float(masked_mean(weights, keep)),
            "rollout/tis_weight_max": float(kept_w.max()) if kept_w.numel() else 0.0,
            "rollout/tis_clipfrac": float(masked_mean((raw > cap).float(), keep)),
            "rollout/logp_diff_abs_mean": float(abs_diff.mean()) if abs_diff.numel() else 0.0,
            "rollout/logp_diff_abs_max": float(abs_diff.max()) if abs_diff.numel() else 0.0,
        }
    return weights, metrics


def compute_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss of PPO (Schulman et al. 2017, as in OpenAI baselines / TRL's PPOTrainer / verl).

    ``loss = 0.5 * agg(max((v - R)^2, (old_v + clip(v - old_v, -clip, clip) - R)^2))``.

    Args:
        values: (B, T) current value predictions (with grad); old_values: (B, T) predictions at rollout time;
        returns: (B, T) targets (GAE returns); mask: (B, T) 1 on response tokens.
        clip: value clip range, in the units of the value; None turns the clipping off (plain 0.5 * MSE).

    Returns:
        (scalar loss, ``critic/vf_loss``, ``critic/vf_clipfrac`` (tokens where the clipped term is larger),
        ``critic/vpred_mean``).
    """
    err = (values - returns).square()
    if clip is None:
        loss_mat, clipfrac = err, torch.zeros((), device=values.device)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clipped = (v_clipped - returns).square()
        loss_mat = torch.maximum(err, err_clipped)
        clipfrac = masked_mean((err_clipped > err).float().detach(), mask)
    loss = 0.5 * agg_loss(loss_mat, mask, agg)
    return loss, {
        "critic/vf_loss": float(loss.detach()),
        "critic/vf_clipfrac": float(clipfrac),
        "critic/vpred_mean": float(masked_mean(values.detach(), mask)),
    }


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax of `logits` (..., V) -> (...), computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_bonus(
    logits: torch.Tensor, mask: torch.Tensor, *, coef: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked mean token entropy as a metric, and ``-coef * entropy`` as a loss term to add (an exploration bonus).

    Args:
        logits: (B, T, V) logits at the response positions; mask: (B, T).
        coef: bonus coefficient; 0 computes the metric without building a graph.

    Returns:
        (scalar loss term ``-coef * H``, ``{"actor/entropy": H}``), H the token mean over `mask` whatever the policy
        loss's agg (as TRL's ``entropy_coef``).
    """
    with torch.set_grad_enabled(coef != 0.0 and torch.is_grad_enabled()):
        h = masked_mean(entropy_from_logits(logits), mask)
    return -coef * h, {"actor/entropy": float(h.detach())}


def finite_or_skip(loss: torch.Tensor, grads: Iterable = ()) -> tuple[bool, str]:
    """Whether a step is safe to apply: the loss and every gradient finite. Returns (ok, reason).

    `grads` holds gradient tensors, ``nn.Parameter`` objects (their ``.grad`` is checked; None grads are skipped) or
    ``(name, tensor_or_parameter)`` pairs such as ``model.named_parameters()``, so the reason can name the culprit.
    All checks are reduced on device before one host sync.
    """
    if not bool(torch.isfinite(loss.detach()).all()):
        return False, f"non-finite loss ({float(loss.detach().float().sum())})"
    named = []
    for i, item in enumerate(grads):
        name, t = item if isinstance(item, tuple) else (f"#{i}", item)
        g = t.grad if isinstance(t, torch.nn.Parameter) else t
        if g is not None:
            named.append((name, g))
    if not named:
        return True, ""
    device = named[0][1].device
    flags = torch.stack([torch.isfinite(g.detach()).all().to(device) for _, g in named]).cpu()
    if bool(flags.all()):
        return True, ""
    bad = [name for (name, _), ok in zip(named, flags.tolist()) if not ok]
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return False, f"non-finite gradient in {', '.join(bad[:3])}{more}"


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the total L2 gradient norm to `max_norm` (None or <= 0: measure only); returns the norm before clipping.

    A thin passthrough to `torch.nn.utils.clip_grad_norm_`, so a non-finite norm comes back as inf/nan for
    `finite_or_skip`-style handling instead of raising.
    """
    limit = max_norm if max_norm is not None and max_norm > 0 else math.inf
    return float(torch.nn.utils.clip_grad_norm_(list(parameters), limit, error_if_nonfinite=False))
