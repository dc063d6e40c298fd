"""KL estimators against scalar formulas, the loss helper and the reward-penalty helper."""

import math

import pytest
import torch

from posttrain.algo.kl import kl_estimate, kl_loss, kl_penalty_rewards

torch.set_num_threads(1)

FORMULAS = {
    "k1": lambda lp, ref: lp - ref,
    "k2": lambda lp, ref: 0.5 * (lp - ref) ** 2,
    "k3": lambda lp, ref: math.exp(ref - lp) - (ref - lp) - 1,
    "low_var_kl": lambda lp, ref: math.exp(ref - lp) - (ref - lp) - 1,
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
