"""KL estimators against scalar formulas, the loss helper and the reward-penalty helper."""

import math

import pytest
import torch

from posttrain.algo.kl import kl_estimate, kl_loss, kl_penalty_rewards

torch.set_num_threads(1)

def _k3(lp, ref):
    """verl's k3: log(ref / policy) clamped to [-20, 20], the estimate to [-10, 10]."""
    lr = min(max(ref - lp, -20.0), 20.0)
    return min(max(math.exp(lr) - lr - 1, -10.0), 10.0)


FORMULAS = {
    "k1": lambda lp, ref: lp - ref,
    "k2": lambda lp, ref: 0.5 * (lp - ref) ** 2,
    "k3": _k3,
    "low_var_kl": _k3,
}


def _batch(seed, b, t):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    ref = logp + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    return logp, ref, mask


@pytest.mark.parametrize("kind", sorted(FORMULAS))
@pytest.mark.parametrize("seed,b,t", [(0, 1, 1), (1, 3, 7), (2, 5, 4)])
def test_kl_estimate_matches_formula(kind, seed, b, t):
    logp, ref, _ = _batch(seed, b, t)
    got = kl_estimate(logp, ref, kind)
    for i in range(b):
        for j in range(t):
            assert got[i, j].item() == pytest.approx(FORMULAS[kind](logp[i, j].item(), ref[i, j].item()), abs=1e-12)


def test_k3_nonnegative_and_zero_at_equality():
    logp, ref, _ = _batch(3, 4, 6)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert torch.equal(kl_estimate(logp, logp, "k3"), torch.zeros_like(logp))


def test_k3_clamps_hand_worked():
    """log_r = ref - logp: 2 -> e^2 - 3 (inside every bound); 3 -> e^3 - 4 = 16.1, clamped to 10; -30 -> log_r
    clamped to -20, e^-20 + 19, clamped to 10; 500 -> 10 (exp(500) would overflow)."""
    ref = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.tensor([[-2.0, -3.0, 30.0, -500.0]], dtype=torch.float64)
    assert kl_estimate(logp, ref, "k3")[0].tolist() == pytest.approx([math.exp(2) - 3, 10.0, 10.0, 10.0], rel=1e-12)


@pytest.mark.parametrize("kind", ["k3", "k1", "k2"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_huge_log_ratio_gives_finite_kl_loss_and_gradients(kind, agg):
    """A policy that gives sampled tokens e^-1000 of the reference's probability, or e^+1000, and -inf in a masked
    position: the KL loss and its gradients are finite (k3 clamped as verl does; k1 and k2 need no clamp), and the
    clamped tokens pass no gradient."""
    logp = torch.tensor([[-1000.0, -1.0, float("-inf")], [1000.0, -0.5, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.2, -1.0], [-1.0, -0.7, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, metrics = kl_loss(logp, ref, mask, kind=kind, agg=agg)
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(metrics["actor/kl_loss"])
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    if kind == "k3":
        assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0 and logp.grad[0, 1] != 0


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_loss_token_mean_loop(seed):
    logp, ref, mask = _batch(seed, 4, 5)
    mask[0, 0] = 1.0
    loss, metrics = kl_loss(logp, ref, mask, kind="k3")
    vals = [FORMULAS["k3"](logp[i, j].item(), ref[i, j].item()) for i in range(4) for j in range(5) if mask[i, j]]
    assert loss.item() == pytest.approx(sum(vals) / len(vals), rel=1e-12)
    assert metrics["actor/kl_loss"] == pytest.approx(sum(vals) / len(vals), rel=1e-12)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_penalty_rewards_loop(kind):
    logp, ref, mask = _batch(4, 3, 6)
    rewards = torch.randn(3, 6, dtype=torch.float64)
    out, metrics = kl_penalty_rewards(rewards, logp, ref, mask, coef=0.1, kind=kind)
    for i in range(3):
        for j in range(6):
            pen = 0.1 * FORMULAS[kind](logp[i, j].item(), ref[i, j].item()) if mask[i, j] else 0.0
            assert out[i, j].item() == pytest.approx(rewards[i, j].item() - pen, abs=1e-12)
    assert metrics["actor/reward_kl_coef"] == 0.1
