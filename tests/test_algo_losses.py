"""Policy/value/entropy losses and the non-finite guard against per-element loops and hand-worked examples."""

import math

import pytest
import torch

from posttrain.algo.losses import (
    agg_loss,
    clip_grad_norm,
    compute_policy_loss,
    compute_value_loss,
    entropy_bonus,
    entropy_from_logits,
    finite_or_skip,
    tis_weights,
)
from posttrain.algo.registry import get_policy_loss

torch.set_num_threads(1)
LN = math.log


def _batch(seed, b, t, seq_adv=True, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios well outside [0.8, 1.2]
    adv = torch.randn(b, generator=g, dtype=torch.float64) if seq_adv else torch.randn(b, t, generator=g,
                                                                                         dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    if empty_row:
        lengths[0] = 0
    mask = torch.arange(t)[None] < lengths[:, None]
    logp = torch.where(mask, logp, torch.full_like(logp, 80.0))  # garbage in padding must not leak (exp(80) -> inf)
    return logp, old, adv, mask


def _loss_loop(logp, old, adv, mask, *, clip_low, clip_high, dual, level, agg, max_len):
    """Reference: plain floats, one token at a time."""
    b, t = logp.shape
    per_tok = [[0.0] * t for _ in range(b)]
    for i in range(b):
        toks = [j for j in range(t) if mask[i, j]]
        seq_lr = sum(logp[i, j].item() - old[i, j].item() for j in toks) / max(len(toks), 1)
        for j in toks:
            a = adv[i].item() if adv.dim() == 1 else adv[i, j].item()
            r = math.exp(seq_lr if level == "sequence" else logp[i, j].item() - old[i, j].item())
            loss = max(-r * a, -min(max(r, 1 - clip_low), 1 + clip_high) * a)
            if dual is not None and a < 0:
                loss = min(loss, -dual * a)
            per_tok[i][j] = loss
    n_tok = sum(int(mask[i, j]) for i in range(b) for j in range(t))
    n_seq = max(sum(1 for i in range(b) if mask[i].any()), 1)  # rows with no token are not in the batch (verl)
    if agg == "token_mean":
        return sum(map(sum, per_tok)) / max(n_tok, 1)
    if agg == "seq_mean_token_mean":
        return sum(sum(per_tok[i]) / max(int(mask[i].sum()), 1) for i in range(b)) / n_seq
    return sum(map(sum, per_tok)) / (n_seq * max_len)


CASES = [
    dict(clip_low=0.2, clip_high=0.2, dual=None),
    dict(clip_low=0.2, clip_high=0.28, dual=None),  # DAPO clip-higher
    dict(clip_low=0.2, clip_high=0.2, dual=3.0),
    dict(clip_low=0.1, clip_high=0.3, dual=1.5),
]


@pytest.mark.parametrize("seed,b,t", [(0, 1, 1), (1, 3, 6), (2, 6, 11)])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_policy_loss_matches_loop(seed, b, t, case, level, agg):
    for seq_adv in (True, False):
        logp, old, adv, mask = _batch(seed, b, t, seq_adv=seq_adv, empty_row=b > 2)
        loss, metrics = compute_policy_loss(
            logp, old, adv, mask, clip_low=case["clip_low"], clip_high=case["clip_high"], dual_clip_c=case["dual"],
            level=level, agg=agg, max_len=t + 3)
        want = _loss_loop(logp, old, adv, mask, clip_low=case["clip_low"], clip_high=case["clip_high"],
                          dual=case["dual"], level=level, agg=agg, max_len=t + 3)
        assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
        assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in metrics.values())


def test_clip_metrics_match_loop():
    logp, old, adv, mask = _batch(5, 4, 9)
    _, m = compute_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip_c=1.3)
    low = high = dual = n = 0
    ratio_sum = kl_sum = 0.0
    for i in range(4):
        for j in range(9):
            if not mask[i, j]:
                continue
            lr = logp[i, j].item() - old[i, j].item()
            r, a = math.exp(lr), adv[i].item()
            n += 1
            low += r < 0.8 and a < 0
            high += r > 1.28 and a > 0
            dual += r > 1.3 and a < 0
            ratio_sum += r
            kl_sum += (r - 1) - lr
    assert m["actor/clipfrac_low"] == pytest.approx(low / n)
    assert m["actor/clipfrac_high"] == pytest.approx(high / n)
    assert m["actor/clipfrac_dual"] == pytest.approx(dual / n)
    assert m["actor/ratio_mean"] == pytest.approx(ratio_sum / n)
    assert m["actor/approx_kl"] == pytest.approx(kl_sum / n)
    assert low > 0 and high > 0 and dual > 0  # the batch exercises every branch


def _one_token(ratio, adv, **kw):
    logp = torch.tensor([[LN(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, m = compute_policy_loss(logp, old, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), m


def test_hand_worked_clip():
    # A > 0, r = 1.5 > 1 + 0.2: clipped to 1.2, no gradient
    loss, grad, m = _one_token(1.5, 1.0)
    assert (loss, grad, m["actor/clipfrac_high"]) == (pytest.approx(-1.2), 0.0, 1.0)
    # clip-higher: the cap moves to 1.28
    assert _one_token(1.5, 1.0, clip_high=0.28)[0] == pytest.approx(-1.28)
    # A > 0, r = 0.5 < 0.8: the unclipped term is the min (pessimistic), gradient d(-r)/dlogp = -r
    loss, grad, m = _one_token(0.5, 1.0)
    assert (loss, grad, m["actor/clipfrac_low"]) == (pytest.approx(-0.5), pytest.approx(-0.5), 0.0)
    # A < 0, r = 0.5: clipped at 0.8 -> loss 0.8, no gradient, counted as low-clipped
    loss, grad, m = _one_token(0.5, -1.0)
    assert (loss, grad, m["actor/clipfrac_low"]) == (pytest.approx(0.8), 0.0, 1.0)


def test_hand_worked_dual_clip():
    # A = -1, r = 5: PPO loss 5 (unbounded in r); dual clip with c = 3 caps it at 3 with zero gradient
    assert _one_token(5.0, -1.0)[0] == pytest.approx(5.0)
    loss, grad, m = _one_token(5.0, -1.0, dual_clip_c=3.0)
    assert (loss, grad, m["actor/clipfrac_dual"]) == (pytest.approx(3.0), 0.0, 1.0)
    # below c it is plain PPO, and positive advantages are untouched
    assert _one_token(2.0, -1.0, dual_clip_c=3.0)[:2] == (pytest.approx(2.0), pytest.approx(2.0))
    assert _one_token(5.0, 1.0, dual_clip_c=3.0)[0] == pytest.approx(-1.2)
    with pytest.raises(ValueError):
        _one_token(1.0, 1.0, dual_clip_c=1.0)


def test_hand_worked_gspo():
    # two tokens with ratios 2 and 1: sequence ratio = exp((ln 2 + 0) / 2) = sqrt(2)
    logp = torch.tensor([[LN(2.0), 0.0, 9.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.tensor([1.0], dtype=torch.float64)
    loss, m = get_policy_loss("gspo")(logp, old, adv, mask, clip_low=0.5, clip_high=0.5)
    assert loss.item() == pytest.approx(-math.sqrt(2)) and m["actor/ratio_mean"] == pytest.approx(math.sqrt(2))
    loss.backward()  # d(-s)/dlogp_t = -s / |y| on each response token, 0 on padding
    assert logp.grad[0].tolist() == pytest.approx([-math.sqrt(2) / 2, -math.sqrt(2) / 2, 0.0])
    assert get_policy_loss("gspo")(logp, old, adv, mask)[0].item() == pytest.approx(-1.2)  # whole sequence clipped
    # token level on the same batch: -(min(2, 1.2) + 1) / 2
    assert get_policy_loss("vanilla")(logp, old, adv, mask)[0].item() == pytest.approx(-1.1)


def test_agg_errors():
    x, m = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_len"):
        agg_loss(x, m, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="token_mean"):
        agg_loss(x, m, "token-mean")
    with pytest.raises(ValueError, match="sequence"):
        compute_policy_loss(x, x, torch.ones(2), m, level="seq")
    assert agg_loss(x, m, "token_mean", num_tokens=12).item() == 0.5


def test_rows_without_tokens_are_not_in_the_sequence_count():
    """A row whose mask is all zero (a dropped group) adds nothing to either sequence mode's count, as it adds no
    token to token_mean (verl's agg_loss); TRL divides by every row, which only differs when a row is empty."""
    x = torch.tensor([[1.0, 3.0], [5.0, 5.0], [2.0, 0.0]])
    m = torch.tensor([[1, 1], [0, 0], [1, 0]])
    assert agg_loss(x, m, "seq_mean_token_mean").item() == pytest.approx((2.0 + 2.0) / 2)
    assert agg_loss(x, m, "seq_mean_token_sum_norm", max_len=4).item() == pytest.approx(6.0 / (2 * 4))
    assert agg_loss(x, m, "token_mean").item() == pytest.approx(6.0 / 3)
    assert agg_loss(x, torch.zeros_like(m), "seq_mean_token_mean").item() == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("adv", [1.0, -1.0])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_huge_log_ratio_gives_finite_loss_and_gradients(level, adv, dual):
    """A policy far from the one that sampled (log-ratios of +-500, which overflow exp in any float type), with
    garbage (inf, NaN) in padding: the loss and every gradient are finite (verl's clamps: token log-ratio to
    [-20, 20], GSPO's sequence log-ratio to at most 10)."""
    logp = torch.tensor([[0.0, -1.0, float("inf")], [-600.0, -2.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[-500.0, -500.0, 0.0], [-100.0, -1.0, float("-inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, metrics = compute_policy_loss(logp, old, torch.tensor([adv, adv]), mask, level=level, dual_clip_c=dual)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    assert logp.grad[:, 2].tolist() == [0.0, 0.0]


def test_log_ratio_bounds_hand_worked():
    # token level, A = -1, log-ratio 30: the ratio is e^20 (clamped), the loss e^20, and no gradient past the bound
    loss, grad, _ = _one_token(math.exp(30.0), -1.0)
    assert (loss, grad) == (pytest.approx(math.exp(20.0), rel=1e-9), 0.0)
    # inside the bound, unchanged: log-ratio 19, loss e^19, gradient -A * r
    loss, grad, _ = _one_token(math.exp(19.0), -1.0)
    assert (loss, grad) == (pytest.approx(math.exp(19.0), rel=1e-9), pytest.approx(math.exp(19.0), rel=1e-9))
    # GSPO: a mean log-ratio of 12 is clamped to 10; of 9, kept
    mask = torch.ones(1, 2)
    for mean_lr, want in ((12.0, math.exp(10.0)), (9.0, math.exp(9.0))):
        logp = torch.tensor([[mean_lr - 1.0, mean_lr + 1.0]], dtype=torch.float64)
        out, _ = get_policy_loss("gspo")(logp, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([-1.0]), mask)
        assert out.item() == pytest.approx(want, rel=1e-9)


def test_is_weights_scale_per_token_and_are_detached():
    logp, old, adv, mask = _batch(7, 3, 5)
    w = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    logp.requires_grad_(True)
    loss_w, _ = compute_policy_loss(logp, old, adv, mask, is_weights=w)
    b, t = logp.shape
    want = 0.0
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                want += w[i, j].item() * _loss_loop(logp[i:i + 1, j:j + 1], old[i:i + 1, j:j + 1], adv[i:i + 1],
                                                    mask[i:i + 1, j:j + 1], clip_low=0.2, clip_high=0.2, dual=None,
                                                    level="token", agg="token_mean", max_len=1)
    assert loss_w.item() == pytest.approx(want / mask.sum().item())
    loss_w.backward()
    assert w.grad is None and logp.grad is not None


@pytest.mark.parametrize("seed", range(3))
def test_tis_weights_loop(seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 3
    rollout = old + 0.8 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    rollout[0, 0] = float("nan")
    mask = torch.rand(3, 6, generator=g) > 0.3
    mask[0, 0] = True
    w, m = tis_weights(rollout, old, mask, 2.0)
    capped = n = 0
    for i in range(3):
        for j in range(6):
            d = old[i, j].item() - rollout[i, j].item()
            raw = 1.0 if not mask[i, j] or math.isnan(d) else math.exp(d)
            assert w[i, j].item() == pytest.approx(min(raw, 2.0))
            if mask[i, j]:
                n += 1
                capped += raw > 2.0
    assert m["rollout/tis_clipfrac"] == pytest.approx(capped / n)
    assert m["rollout/tis_weight_max"] == pytest.approx(max(w[i, j].item() for i in range(3) for j in range(6)
                                                            if mask[i, j]))
    assert not w.requires_grad


@pytest.mark.parametrize("seed,clip", [(0, 0.2), (1, 0.05), (2, None)])
def test_value_loss_matches_loop(seed, clip):
    g = torch.Generator().manual_seed(seed)
    v, old, ret = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(4, 6, generator=g) > 0.3
    loss, m = compute_value_loss(v, old, ret, mask, clip=clip)
    total = n = clipped = 0
    for i in range(4):
        for j in range(6):
            if not mask[i, j]:
                continue
            vi, oi, ri = v[i, j].item(), old[i, j].item(), ret[i, j].item()
            e1 = (vi - ri) ** 2
            e2 = e1 if clip is None else (oi + min(max(vi - oi, -clip), clip) - ri) ** 2
            total, n, clipped = total + max(e1, e2), n + 1, clipped + (e2 > e1)
    assert loss.item() == pytest.approx(0.5 * total / n)
    assert m["critic/vf_clipfrac"] == pytest.approx(clipped / n)


@pytest.mark.parametrize("seed", range(2))
def test_entropy_loop_and_bonus(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    ent = entropy_from_logits(logits)
    hs = []
    for i in range(2):
        for j in range(4):
            z = [math.exp(x) for x in logits[i, j].tolist()]
            p = [x / sum(z) for x in z]
            h = -sum(q * math.log(q) for q in p)
            assert ent[i, j].item() == pytest.approx(h, rel=1e-6)
            if mask[i, j]:
                hs.append(h)
    term, m = entropy_bonus(logits, mask, coef=0.01)
    assert m["actor/entropy"] == pytest.approx(sum(hs) / len(hs), rel=1e-6)
    assert term.item() == pytest.approx(-0.01 * sum(hs) / len(hs), rel=1e-6)
    logits.requires_grad_(True)
    assert not entropy_bonus(logits, mask)[0].requires_grad  # coef 0: metric only, no graph
    assert entropy_bonus(logits, mask, coef=0.1)[0].requires_grad


def test_finite_or_skip():
    w = torch.nn.Parameter(torch.ones(3))
    unused = torch.nn.Parameter(torch.ones(2))  # .grad None: skipped
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    assert finite_or_skip(torch.tensor(1.0), [w, unused]) == (True, "")
    assert finite_or_skip(torch.tensor(1.0)) == (True, "")
    ok, reason = finite_or_skip(torch.tensor(float("nan")), [w])
    assert not ok and "loss" in reason
    w.grad[1] = float("inf")
    ok, reason = finite_or_skip(torch.tensor(1.0), [("layer.w", w), ("layer.u", unused)])
    assert not ok and "layer.w" in reason and "layer.u" not in reason
    ok, reason = finite_or_skip(torch.tensor(1.0), [torch.ones(2), torch.tensor([float("nan")])])
    assert not ok and "#1" in reason


def test_clip_grad_norm_passthrough():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_grad_norm([a, b], None) == pytest.approx(5.0)
    assert a.grad.tolist() == [3.0, 0.0]  # measure only
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    assert a.grad.tolist() == pytest.approx([0.6, 0.0], rel=1e-5) and b.grad.item() == pytest.approx(0.8, rel=1e-5)
    b.grad[0] = float("nan")
    assert math.isnan(clip_grad_norm([a, b], 1.0))
