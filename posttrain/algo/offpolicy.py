"""Off-policy corrections between the rollout's log-probs and the learner's: one registry (`register_correction`),
chosen in the recipe by `grpo.async.correction` / `ppo.async.correction` (`grpo.tis_cap` is the `tis` entry).

Shapes: B sequences, T response positions (right-padded). Every correction takes

* ``rollout_logp`` (B, T): the log-probs the rollout worker recorded for the sampled tokens (the behaviour policy
  mu: an older policy version when rollouts run ahead of the learner, `grpo.async.max_staleness`, and always other
  numerics than the learner's);
* ``old_logp`` (B, T): the learner's own log-probs of the same tokens before its update (pi_old, the "proximal"
  policy of AReaL's decoupled PPO), which then is the PPO ratio's denominator;
* ``mask`` (B, T): 1 on the tokens in the loss;
* ``cap`` (C) and ``lower`` (optional, see each function),

and returns a `Correction`: detached per-token weights on the policy-gradient term (or None), a keep mask that takes
tokens or whole rows out of the loss (or None: the learner multiplies its loss mask by it, so the loss averages over
the tokens kept, as verl's rejection sampling does), and metrics. Everything is computed from the log-ratio
``log rho = old_logp - rollout_logp`` (0 off the mask and where the rollout log-prob is NaN), clamped to +-20
before any exp as verl clamps it (``SAFETY_BOUND``).

Papers and code followed, and how each maps to verl 0.9.1's rollout correction (`rollout_corr`:
verl/trainer/ppo/rollout_corr_helper.py, `compute_rollout_correction_weights` for the weights and
`compute_rollout_rejection_mask` for the masks; tests/test_offpolicy_verl.py checks each against a vendored copy of
that code to 1e-6):

* `tis`, `seq_tis`: truncated importance sampling, token and sequence level (Yao et al. 2025, "Your efficient RL
  framework secretly brings you off-policy RL training"). verl: ``rollout_is: token | sequence``,
  ``rollout_is_threshold: C`` (a float). Our optional `lower` is TRL's floor (``vllm_importance_sampling_clip_min``),
  which verl has not (its ``"a_b"`` threshold string is IcePop, below). `seq_tis`, as verl's sequence IS, clamps a
  row's sum of unclamped token log-ratios (verl's rejection, below, clamps each token first).
* `mis`, `seq_mis`, `geo_mis`: masked importance sampling / rejection sampling: tokens, sequences (product of the
  token ratios) or sequences by the geometric mean of their token ratios (Geo-RS) outside [lower, C] (lower
  default 1/C) leave the loss (Liu, Li et al. 2025, "When speed kills stability: demystifying RL collapse from the
  training-inference mismatch"). verl: ``rollout_rs: token_k1 | seq_sum_k1 | seq_mean_k1``. verl states its K1
  thresholds on -log rho, i.e. on the inverse ratio mu / pi_old: our [lower, C] on rho is verl's
  ``rollout_rs_threshold: "{1/C}_{1/lower}"``, and the default lower = 1/C is verl's single float ``C``. As verl,
  each token's log-ratio is clamped to +-20 before the sum or mean, and the bounds are compared in log space.
* `icepop`: IcePop (Ling team 2025, Ring-1T, arXiv 2510.18855): each token's weight is its ratio rho_t inside
  [lower, C] (lower default 1/C) and 0 outside; the zeroed tokens stay in the loss's token count. verl:
  ``rollout_is: token``, ``rollout_is_threshold: "{lower}_{C}"``.
* `decoupled`: AReaL's decoupled PPO objective (Fu et al. 2025, "AReaL: a large-scale asynchronous reinforcement
  learning system for language reasoning"; `ppo_actor_loss_fn` in areal/utils/functional.py): the clipped ratio
  is taken against the proximal policy (the learner's recomputation) and each token's loss is weighted by the
  behaviour weight rho = pi_prox / mu, set to 0 where rho > C (`behav_imp_weight_cap`); those tokens stay in the
  token count, as in AReaL. Not a verl correction: verl's "decoupled" mode is the same three policies (its PPO ratio
  against old_log_prob, times its ``rollout_is`` weights), and AReaL's weight is then verl's IcePop weight with no
  lower bound (``rollout_is_threshold: "{tiny}_{C}"``) up to verl's +-20 clamp (which changes a weight by < e^-20).

Deliberate differences from verl, where verl's output is not what this project wants (the tests compare on the
inputs where both are defined):

* off the mask our weights are 1 and our keep mask True (verl: weight 0, mask 0); the learner multiplies both by
  the loss mask, so only ``weights * mask`` and ``keep & mask`` mean anything, and those are what equal verl's;
* a NaN rollout log-prob on a loss token (not reported by the engine) is ratio 1 here (weight 1, kept; as TRL and
  `losses.tis_weights`); in verl the NaN spreads (a TIS weight NaN, an IcePop weight 0, the token or its whole row
  rejected);
* `tis` exponentiates without verl's +-20 clamp (the one implementation is `losses.tis_weights`, equal to TRL's):
  a weight below e^-20 differs from verl's by less than 2.1e-9;
* `geo_mis` divides a row's log-ratio sum by its token count n, verl's masked mean by n + 1e-8;
* `offpolicy/mismatch_kl` clamps log rho to +-20 (verl's ``k3_kl`` does not, and is then inf or huge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from posttrain.algo.losses import masked_mean, tis_weights
from posttrain.algo.registry import register_correction

SAFETY_BOUND = 20.0  # verl's clamp of log-ratios before exp (exp(20) ~ 4.9e8)


@dataclass(frozen=True)
class Correction:
    """What a correction does to the loss: `weights` (B, T) detached, multiplying each token's policy-gradient
    term (None: 1); `keep` (B, T) bool, False on the loss tokens taken out of the loss (None: all kept)."""

    weights: torch.Tensor | None
    keep: torch.Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)


def log_ratio(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) log(pi_old / mu) = old_logp - rollout_logp on the mask, 0 elsewhere and where it is NaN (a rollout
    log-prob not available: ratio 1, as `tis_weights` treats it)."""
    keep = mask.to(torch.bool)
    lr = torch.where(keep, old_logp - rollout_logp, torch.zeros_like(old_logp))
    return torch.nan_to_num(lr, nan=0.0)


def mismatch_metrics(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The rollout-learner mismatch over the mask: ``offpolicy/mismatch_kl`` (k3 estimate of KL(mu || pi_old),
    mean of rho - log rho - 1, verl's ``rollout_corr/k3_kl``, log rho clamped to +-20) and
    ``offpolicy/mismatch_kl_k1`` (mean of log mu - log pi_old, verl's ``rollout_corr/kl``). 0 for identical
    numerics."""
    with torch.no_grad():
        lr = log_ratio(rollout_logp, old_logp, mask).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        return {"offpolicy/mismatch_kl": float(masked_mean(torch.exp(lr) - lr - 1, mask)),
                "offpolicy/mismatch_kl_k1": float(masked_mean(-lr, mask))}


def _rows(mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows with at least one loss token."""
    return mask.to(torch.bool).any(-1)


def _row_share(flags: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the rows with a loss token for which `flags` (B,) is set."""
    rows = _rows(mask)
    return float(flags[rows].float().mean()) if bool(rows.any()) else 0.0


@register_correction("tis")
def token_tis(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *, cap: float,
              lower: float | None = None) -> Correction:
    """Token-level truncated IS (Yao et al. 2025): w_t = clamp(rho_t, lower, C), detached, on each token's
    policy-gradient term; `lower` (default none) is TRL's ``vllm_importance_sampling_clip_min``. The one
    implementation is `losses.tis_weights` (what `tis_cap` has always run; it exponentiates without verl's +-20
    clamp, which changes a weight by at most e^-20 below the clamp and nothing above the cap); its metrics are
    ``rollout/tis_*``."""
    check_thresholds("tis", cap, lower)
    weights, metrics = tis_weights(rollout_logp, old_logp, mask, cap, floor=lower)
    return Correction(weights, None, metrics | mismatch_metrics(rollout_logp, old_logp, mask))


@register_correction("seq_tis")
def sequence_tis(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *, cap: float,
                 lower: float | None = None) -> Correction:
    """Sequence-level truncated IS (Yao et al. 2025; verl ``rollout_is: sequence``): one weight per row,
    w_i = clamp(exp(clamp(sum_t log rho_it, +-20)), lower, C) (the product of its token ratios), on every token of
    the row (1 off the mask). Unbiased for the sequence-level objective before truncation, high variance.
    Metrics: ``offpolicy/weight_mean`` (token mean, verl's ``rollout_is_mean``), ``offpolicy/weight_max`` and
    ``offpolicy/truncated_share`` (rows whose ratio passed C)."""
    check_thresholds("seq_tis", cap, lower)
    with torch.no_grad():
        keep = mask.to(torch.bool)
        seq = log_ratio(rollout_logp, old_logp, mask).sum(-1, keepdim=True).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        raw = torch.exp(seq)  # (B, 1)
        w = raw.clamp(min=lower, max=cap).expand_as(old_logp)
        w = torch.where(keep, w, torch.ones_like(w))
        kept = w[keep]
        metrics = {"offpolicy/weight_mean": float(masked_mean(w, keep)),
                   "offpolicy/weight_max": float(kept.max()) if kept.numel() else 0.0,
                   "offpolicy/truncated_share": _row_share(raw.squeeze(-1) > cap, mask)}
    return Correction(w, None, metrics | mismatch_metrics(rollout_logp, old_logp, mask))


def _masked(rollout_logp, old_logp, mask, cap, lower, name: str, level: str) -> Correction:
    """Rejection of tokens (`level` token) or rows (sequence: sum of log rho; geometric: its mean over the row's
    loss tokens) whose ratio lies outside [lower, C], as verl's `compute_rollout_rejection_mask` with
    ``token_k1`` / ``seq_sum_k1`` / ``seq_mean_k1``: each token's log rho clamped to +-20 first, the aggregate
    compared with log(lower) and log(C) (no exp, no overflow)."""
    check_thresholds(name, cap, lower)
    lo = 1.0 / cap if lower is None else lower
    with torch.no_grad():
        keep_t = mask.to(torch.bool)
        lr = log_ratio(rollout_logp, old_logp, mask).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        if level == "token":
            agg = lr
        elif level == "sequence":
            agg = lr.sum(-1, keepdim=True)
        else:  # geometric
            agg = lr.sum(-1, keepdim=True) / keep_t.sum(-1, keepdim=True).clamp(min=1)
        high, low = agg > math.log(cap), agg < math.log(lo)
        inside = (~high & ~low).expand_as(lr)
        keep = inside | ~keep_t
        rejected = keep_t & ~inside
        metrics = {"offpolicy/masked_token_share": float(masked_mean(rejected.float(), keep_t)),
                   "offpolicy/masked_row_share": _row_share(rejected.any(-1), mask),
                   "offpolicy/ratio_high_share": float(masked_mean(high.expand_as(lr).float(), keep_t)),
                   "offpolicy/ratio_low_share": float(masked_mean(low.expand_as(lr).float(), keep_t))}
    return Correction(None, keep, metrics | mismatch_metrics(rollout_logp, old_logp, mask))


@register_correction("mis")
def token_mis(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *, cap: float,
              lower: float | None = None) -> Correction:
    """Token-level masked IS (verl ``rollout_rs: token_k1``): tokens with exp(clamp(log rho_t, +-20)) outside
    [lower, C] (lower default 1/C) leave the loss and its token count; no weights. (IcePop's interval with its
    weight, the tokens kept in the count, is `icepop`.) Metrics:
    ``offpolicy/masked_token_share``, ``offpolicy/masked_row_share`` (rows with a token masked),
    ``offpolicy/ratio_high_share`` / ``ratio_low_share`` (tokens above C / below lower)."""
    return _masked(rollout_logp, old_logp, mask, cap, lower, "mis", "token")


@register_correction("seq_mis")
def sequence_mis(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *, cap: float,
                 lower: float | None = None) -> Correction:
    """Sequence-level masked IS (verl ``rollout_rs: seq_sum_k1``): a row whose ratio exp(sum_t clamp(log rho_it,
    +-20)) (the product of its token ratios) is outside [lower, C] (lower default 1/C) leaves the loss whole.
    Metrics as `token_mis` (the shares of tokens then count the rejected rows' tokens)."""
    return _masked(rollout_logp, old_logp, mask, cap, lower, "seq_mis", "sequence")


@register_correction("geo_mis")
def geometric_mis(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *, cap: float,
                  lower: float | None = None) -> Correction:
    """Geometric-mean sequence rejection (Geo-RS; verl ``rollout_rs: seq_mean_k1``): a row whose per-token
    geometric mean ratio exp(mean_t clamp(log rho_it, +-20)) over its loss tokens is outside [lower, C] leaves the loss
    whole: length-independent, unlike `sequence_mis`, whose product grows with the row's length."""
    return _masked(rollout_logp, old_logp, mask, cap, lower, "geo_mis", "geometric")


@register_correction("icepop")
def icepop(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *, cap: float,
           lower: float | None = None) -> Correction:
    """IcePop (Ling team 2025, Ring-1T, arXiv 2510.18855; verl ``rollout_is: token`` with
    ``rollout_is_threshold: "{lower}_{C}"``): each loss token's weight is rho_t = exp(clamp(log rho_t, +-20)) when it
    lies in [lower, C] (lower default 1/C) and 0 outside, detached; 1 off the mask. The zeroed tokens stay in the
    loss's token count (unlike `token_mis`, which takes them out and applies no weight). Metrics:
    ``offpolicy/weight_mean`` (over the mask, zeros included), ``offpolicy/masked_token_share`` (tokens zeroed),
    ``offpolicy/ratio_high_share`` / ``ratio_low_share`` (tokens above C / below lower)."""
    check_thresholds("icepop", cap, lower)
    lo = 1.0 / cap if lower is None else lower
    with torch.no_grad():
        keep_t = mask.to(torch.bool)
        rho = torch.exp(log_ratio(rollout_logp, old_logp, mask).clamp(-SAFETY_BOUND, SAFETY_BOUND))
        high, low = (rho > cap) & keep_t, (rho < lo) & keep_t
        w = torch.where(high | low, torch.zeros_like(rho), rho)
        w = torch.where(keep_t, w, torch.ones_like(w))
        metrics = {"offpolicy/weight_mean": float(masked_mean(w, keep_t)),
                   "offpolicy/masked_token_share": float(masked_mean((high | low).float(), keep_t)),
                   "offpolicy/ratio_high_share": float(masked_mean(high.float(), keep_t)),
                   "offpolicy/ratio_low_share": float(masked_mean(low.float(), keep_t))}
    return Correction(w, None, metrics | mismatch_metrics(rollout_logp, old_logp, mask))


@register_correction("decoupled")
def decoupled(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *, cap: float,
              lower: float | None = None) -> Correction:
    """AReaL's decoupled PPO (Fu et al. 2025): the behaviour weight rho_t = exp(old_logp - rollout_logp) (no clamp,
    as AReaL) on each token's loss, 0 where rho_t > C (`behav_imp_weight_cap`, > 1 in AReaL); those tokens keep
    counting in the loss's token count (AReaL divides by the unfiltered loss mask). `lower` is not used (an error
    when given). Metrics: ``offpolicy/weight_mean`` (over the mask, zeros included), ``offpolicy/masked_token_share``
    (tokens zeroed)."""
    check_thresholds("decoupled", cap, lower)
    with torch.no_grad():
        keep_t = mask.to(torch.bool)
        rho = torch.exp(log_ratio(rollout_logp, old_logp, mask))
        ok = (rho <= cap) & keep_t
        w = torch.where(ok, rho, torch.zeros_like(rho))
        w = torch.where(keep_t, w, torch.ones_like(w))
        metrics = {"offpolicy/weight_mean": float(masked_mean(w, keep_t)),
                   "offpolicy/masked_token_share": float(masked_mean((keep_t & ~ok).float(), keep_t))}
    return Correction(w, None, metrics | mismatch_metrics(rollout_logp, old_logp, mask))


def check_thresholds(name: str, cap: float, lower: float | None) -> None:
    """Raise ValueError (naming `cap`/`lower` as the recipe's keys) when `name`'s thresholds cannot work: an empty
    [lower, cap] interval, a masking correction or IcePop with cap <= 1 (its default lower 1/cap is then >= cap), the
    decoupled correction with cap <= 1 or a lower threshold. Each correction checks its own; the recipe calls it at
load."""
    if not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"cap: must be a positive number, got {cap!r}")
    if name in ("mis", "seq_mis", "geo_mis", "icepop"):
        lo = 1.0 / cap if lower is None else lower
        if not lo < cap:
            raise ValueError(f"cap: the {name} correction keeps ratios in [lower, cap] = [{lo:g}, {cap:g}], an empty "
                             f"interval; give cap > 1 (lower defaults to 1/cap) or lower < cap")
    elif name == "decoupled":
        if lower is not None:
            raise ValueError("lower: the decoupled correction has no lower threshold (AReaL filters only rho > cap)")
        if not cap > 1:
            raise ValueError(f"cap: the decoupled correction's cap (AReaL's behav_imp_weight_cap) must be > 1, "
                             f"got {cap:g}")
    elif lower is not None and not lower < cap:
        raise ValueError(f"lower: the {name} correction clamps its weights to [lower, cap] = [{lower:g}, {cap:g}]; "
                         f"lower must be < cap")
