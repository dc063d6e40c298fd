"""Issue #29: the off-policy corrections (`posttrain.algo.offpolicy`) equal verl 0.9.1's rollout-correction code to
1e-6 on random tensors. verl is not installed (its dependencies conflict with this project's pins): its functions
are vendored verbatim in tests/reference/verl_rollout_corr.py (`compute_rollout_correction_weights`,
`compute_rollout_rejection_mask`, `compute_offpolicy_metrics`; provenance in that file).

The mapping, ours -> verl (rho = pi_old / mu = exp(old_logp - rollout_logp), our thresholds [lower, cap] on rho):

* tis(cap)              -> rollout_is="token",    rollout_is_threshold=cap (a float: truncation)
* seq_tis(cap)          -> rollout_is="sequence", rollout_is_threshold=cap
* icepop(cap, lower)    -> rollout_is="token",    rollout_is_threshold="{lower}_{cap}" (lower default 1/cap)
* mis(cap, lower)       -> rollout_rs="token_k1",    rollout_rs_threshold=cap, or "{1/cap}_{1/lower}" with a lower:
* seq_mis(cap, lower)   -> rollout_rs="seq_sum_k1",  verl's K1 bounds are on -log rho, i.e. on 1/rho = mu / pi_old
* geo_mis(cap, lower)   -> rollout_rs="seq_mean_k1"
* decoupled(cap)        -> not a verl correction (AReaL's): its weight is verl's IcePop weight with no lower bound,
                           rollout_is_threshold="1e-30_{cap}" (checked below), and tests/test_rl_async.py keeps its
                           loop reference.
* tis / seq_tis with `lower` (TRL's floor clamp): verl has none (its "a_b" string is IcePop), not compared here.

What is compared: our ``weights`` on the loss mask with verl's weights there (ours are 1 off the mask, verl's 0,
and the learner multiplies both by the mask), and ``keep & mask`` with verl's modified response mask. A NaN rollout
log-prob on a loss token is ratio 1 here and spreads in verl (a deliberate difference, offpolicy.py's docstring):
tested as verl on the learner's own log-prob there.
"""

import math

import pytest
import torch
from reference.verl_rollout_corr import (
    compute_offpolicy_metrics,
    compute_rollout_correction_weights,
    compute_rollout_rejection_mask,
)

from posttrain.algo.registry import get_correction

SEEDS = [0, 1, 2, 3, 4]
DTYPES = [torch.float32, torch.float64]
# (cap, lower): symmetric default, asymmetric intervals, one around 1 on one side only
THRESHOLDS = [(2.0, None), (1.5, None), (5.0, 0.5), (1.2, 0.3), (3.0, 0.9), (1.25, 1.05)]
RS_OPTION = {"mis": "token_k1", "seq_mis": "seq_sum_k1", "geo_mis": "seq_mean_k1"}
IS_LEVEL = {"tis": "token", "seq_tis": "sequence"}


def _inputs(seed, dtype=torch.float32, extreme=False):
    """(rollout_logp, old_logp, mask) (12, 33): ragged rows (one empty, one of a single token, one full), per-row
    log-ratio scales from 0.02 to 4 nats with a per-row bias, garbage (NaN, +-inf, 1e4) off the mask. `extreme`: some
    loss tokens at |log rho| of 25 to 300, among them rows where a token's +-20 clamp changes the row's sum and mean
    (+30 next to -25) and rows pinned near the bounds."""
    g = torch.Generator().manual_seed(seed)
    B, T = 12, 33
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[3], lengths[5], lengths[7] = 0, T, 1
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 6
    scale = torch.tensor([0.02, 0.1, 0.3, 0.7, 1.5, 4.0] * 2, dtype=torch.float64)[:, None]
    bias = (torch.rand(B, 1, generator=g, dtype=torch.float64) - 0.5) * 0.4
    lr = bias + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    if extreme:
        lr[0, 2:] -= bias[0]  # row 0: +30 and -25 among tiny ratios: unclamped sum ~5, clamped ~0
        lr[0, 0], lr[0, 1] = 30.0, -25.0
        lr[1, 0], lr[1, 1] = -40.0, 39.9
        lr[2, 3] = 300.0
        lr[4, 2] = -300.0
        lr[5, :] = 25.0 * torch.sign(torch.randn(T, generator=g, dtype=torch.float64))
        lr[7, 0] = -60.0
        lr[8, :4] = torch.tensor([21.0, -21.0, 22.5, -19.0])
    rollout = old - lr
    off = ~mask.bool()
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4], dtype=torch.float64)
    pick = torch.randint(0, 4, (B, T), generator=g)
    rollout = torch.where(off, garbage[pick], rollout)
    return rollout.to(dtype), old.to(dtype), mask


def _on_mask(w, mask):
    return torch.where(mask.bool(), w, torch.zeros_like(w))


def _verl_rs_threshold(cap, lower):
    """Our [lower, cap] on rho as verl's K1 threshold, which bounds -log rho (the ratio mu / pi_old)."""
    return cap if lower is None else f"{1.0 / cap!r}_{1.0 / lower!r}"


def _assert_weights(ours, verl_w, mask):
    assert ours is not None
    assert not ours.requires_grad
    torch.testing.assert_close(_on_mask(ours, mask), _on_mask(verl_w, mask), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ the weights
@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["tis", "seq_tis"])
def test_truncated_is_weights_equal_verls(name, seed, dtype, extreme):
    rollout, old, mask = _inputs(seed, dtype, extreme)
    for cap in (0.8, 1.5, 2.0, 5.0):
        out = get_correction(name)(rollout, old, mask, cap=cap)
        w, m = compute_rollout_correction_weights(old - rollout, mask, rollout_is=IS_LEVEL[name],
                                                  rollout_is_threshold=cap)
        _assert_weights(out.weights, w, mask)
        assert out.keep is None
        mean = out.metrics["rollout/tis_weight_mean" if name == "tis" else "offpolicy/weight_mean"]
        assert mean == pytest.approx(m["rollout_is_mean"], rel=1e-5, abs=1e-6)
        if name == "tis":
            assert out.metrics["rollout/tis_clipfrac"] == pytest.approx(m["rollout_is_ratio_fraction_high"], abs=1e-6)


@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("seed", SEEDS)
def test_icepop_weights_equal_verls(seed, dtype, extreme):
    rollout, old, mask = _inputs(seed, dtype, extreme)
    engaged = 0
    for cap, lower in THRESHOLDS:
        out = get_correction("icepop")(rollout, old, mask, cap=cap, lower=lower)
        lo = 1.0 / cap if lower is None else lower
        w, m = compute_rollout_correction_weights(old - rollout, mask, rollout_is="token",
                                                  rollout_is_threshold=f"{lo!r}_{cap!r}")
        _assert_weights(out.weights, w, mask)
        assert out.keep is None  # the zeroed tokens stay in the loss's token count, as verl's IcePop
        assert out.metrics["offpolicy/masked_token_share"] == pytest.approx(m["rollout_is_oob_ratio"], abs=1e-6)
        engaged += int(((out.weights == 0) & mask.bool()).sum())
    assert engaged, "the inputs must zero some weights"


@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("seed", SEEDS)
def test_decoupled_weight_is_verls_icepop_weight_without_a_lower_bound(seed, dtype, extreme):
    """AReaL's decoupled objective is not in verl. Its behaviour weight (rho, 0 above cap, unclamped) is verl's
    token IcePop weight with a lower bound below e^-20 (verl's clamp keeps every ratio above it), within verl's
    clamp of rho at e^-20 (< 2.1e-9)."""
    rollout, old, mask = _inputs(seed, dtype, extreme)
    for cap in (1.2, 2.0, 5.0):
        out = get_correction("decoupled")(rollout, old, mask, cap=cap)
        w, _ = compute_rollout_correction_weights(old - rollout, mask, rollout_is="token",
                                                  rollout_is_threshold=f"1e-30_{cap!r}")
        _assert_weights(out.weights, w, mask)
        assert out.keep is None


# ------------------------------------------------------------------------------------------------ the masks
@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["mis", "seq_mis", "geo_mis"])
def test_rejection_masks_equal_verls(name, seed, dtype, extreme):
    rollout, old, mask = _inputs(seed, dtype, extreme)
    rejected = 0
    for cap, lower in THRESHOLDS:
        out = get_correction(name)(rollout, old, mask, cap=cap, lower=lower)
        option = RS_OPTION[name]
        vmask, m = compute_rollout_rejection_mask(old - rollout, mask, rollout_rs=option,
                                                  rollout_rs_threshold=_verl_rs_threshold(cap, lower))
        assert out.weights is None
        ours = out.keep & mask.bool()
        assert ours.tolist() == vmask.bool().tolist(), (cap, lower)
        assert not bool(ours[3].any())  # the empty row
        assert out.metrics["offpolicy/masked_token_share"] == pytest.approx(m["rollout_rs_masked_fraction"], abs=1e-6)
        assert out.metrics["offpolicy/masked_row_share"] == pytest.approx(
            m[f"rollout_rs_{option}_seq_masked_fraction"], abs=1e-6)
        rejected += int((mask.bool() & ~ours).sum())
    assert rejected, "the inputs must make the masks do something"


def test_extreme_rows_are_decided_as_verl_decides_them():
    """The rows the per-token clamp decides: row 0 (log-ratios +30 and -25 among small ones: unclamped sum ~5, verl's
    clamped sum ~0) is kept by `seq_mis` at cap 2 as in verl; summing unclamped log-ratios would reject it."""
    rollout, old, mask = _inputs(0, torch.float64, extreme=True)
    small = (old - rollout)[0, 2:int(mask[0].sum())].sum()
    assert abs(float(small)) < math.log(2.0)
    out = get_correction("seq_mis")(rollout, old, mask, cap=2.0)
    vmask, _ = compute_rollout_rejection_mask(old - rollout, mask, rollout_rs="seq_sum_k1", rollout_rs_threshold=2.0)
    assert bool(out.keep[0].all()) and bool(vmask[0].bool()[mask[0].bool()].all())


# ------------------------------------------------------------------------------------- NaN and the metrics
@pytest.mark.parametrize("name", ["tis", "seq_tis", "icepop", "mis", "seq_mis", "geo_mis"])
def test_a_nan_rollout_log_prob_is_verl_on_ratio_one(name):
    """Deliberate difference: a NaN rollout log-prob on a loss token (not reported) is ratio 1 here; verl on that
    input spreads the NaN (a TIS weight NaN, an IcePop weight 0, the token or its row rejected). Ours equals verl given
    the learner's own log-prob at that token."""
    rollout, old, mask = _inputs(1, torch.float64)
    rollout[1, 2] = rollout[4, 0] = float("nan")
    fixed = torch.where(torch.isnan(rollout) & mask.bool(), old, rollout)
    out = get_correction(name)(rollout, old, mask, cap=2.0)
    if name in IS_LEVEL or name == "icepop":
        spec = 2.0 if name in IS_LEVEL else "0.5_2.0"
        level = IS_LEVEL.get(name, "token")
        w, _ = compute_rollout_correction_weights(old - fixed, mask, rollout_is=level, rollout_is_threshold=spec)
        _assert_weights(out.weights, w, mask)
        raw, _ = compute_rollout_correction_weights(old - rollout, mask, rollout_is=level, rollout_is_threshold=spec)
        if name == "icepop":  # what verl gives instead: NaN fails both bounds, weight 0
            assert float(raw[1, 2]) == 0.0
        else:  # NaN, on the token (tis) or on the whole row (seq_tis)
            assert bool(torch.isnan(raw[1, 2])) and (name == "tis" or bool(torch.isnan(raw[1, 0])))
    else:
        vmask, _ = compute_rollout_rejection_mask(old - fixed, mask, rollout_rs=RS_OPTION[name],
                                                  rollout_rs_threshold=2.0)
        assert (out.keep & mask.bool()).tolist() == vmask.bool().tolist()
        raw, _ = compute_rollout_rejection_mask(old - rollout, mask, rollout_rs=RS_OPTION[name],
                                                rollout_rs_threshold=2.0)
        assert not bool(raw[1, 2])  # verl rejects the token (or its row)


@pytest.mark.parametrize("seed", SEEDS)
def test_mismatch_metrics_equal_verls_kl_estimates(seed):
    """`offpolicy/mismatch_kl` is verl's ``k3_kl`` and `offpolicy/mismatch_kl_k1` its ``kl``, over the loss tokens;
    on |log rho| <= 20 (ours clamps there, verl's k3 does not), garbage off the mask."""
    rollout, old, mask = _inputs(seed, torch.float64)
    out = get_correction("tis")(rollout, old, mask, cap=2.0)
    m = compute_offpolicy_metrics(old, rollout, mask)
    assert out.metrics["offpolicy/mismatch_kl"] == pytest.approx(m["k3_kl"], rel=1e-6, abs=1e-6)
    assert out.metrics["offpolicy/mismatch_kl_k1"] == pytest.approx(m["kl"], rel=1e-6, abs=1e-6)
