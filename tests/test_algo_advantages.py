"""Advantage estimators and batch filters against slow per-element references and hand-worked examples."""

import math
import random
import statistics

import pytest
import torch

from posttrain.algo.advantages import (
    compute_gae,
    compute_grpo_advantages,
    dynamic_sampling_mask,
    group_index,
    masked_whiten,
)
from posttrain.algo.registry import get_adv_estimator

torch.set_num_threads(1)


def _grpo_loop(rewards, ids, norm_by_std, eps):
    out = []
    for i, r in enumerate(rewards):
        group = [rewards[j] for j in range(len(rewards)) if ids[j] == ids[i]]
        if len(group) == 1:
            out.append(0.0)
            continue
        a = r - statistics.fmean(group)
        out.append(a / (statistics.stdev(group) + eps) if norm_by_std else a)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_loop_shuffled_ids(seed, norm_by_std):
    rng = random.Random(seed)
    n_groups, size = rng.randint(1, 5), rng.randint(2, 6)
    ids = [f"prompt{k}" for k in range(n_groups) for _ in range(size)]
    rng.shuffle(ids)
    rewards = [float(rng.choice([0, 0.5, 1])) if seed % 2 else rng.gauss(0, 2) for _ in ids]
    want = _grpo_loop(rewards, ids, norm_by_std, 1e-6)
    r = torch.tensor(rewards)
    for group_ids in (ids, torch.tensor([int(s[6:]) * 7 for s in ids])):  # strings and (non-dense) int tensors
        got = compute_grpo_advantages(r, group_ids, norm_by_std=norm_by_std)
        assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_grpo_group_size_layout_and_registry():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0])
    got = compute_grpo_advantages(r, group_size=4)
    want = _grpo_loop(r.tolist(), [0, 0, 0, 0, 1, 1, 1, 1], True, 1e-6)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    # hand-worked: group 1 = [1, 0, 1, 1], mean 0.75, unbiased std 0.5 -> [0.5, -1.5, 0.5, 0.5]
    assert got[:4].tolist() == pytest.approx([0.5, -1.5, 0.5, 0.5], abs=1e-5)
    assert torch.equal(get_adv_estimator("grpo")(r, group_size=4), got)
    assert get_adv_estimator("dr_grpo")(r, group_size=4)[:4].tolist() == pytest.approx([0.25, -0.75, 0.25, 0.25])


def test_grpo_singleton_and_equal_groups_are_zero():
    got = compute_grpo_advantages(torch.tensor([5.0, 2.0, 2.0]), ["a", "b", "b"])
    assert got.tolist() == [0.0, 0.0, 0.0]


def _grpo_exact(rewards, ids, norm_by_std, eps):
    """Reference: one group at a time, the mean and the squared deviations in exact rational arithmetic."""
    from fractions import Fraction

    out = []
    for i, r in enumerate(rewards):
        group = [Fraction(rewards[j]) for j in range(len(rewards)) if ids[j] == ids[i]]
        if len(group) == 1:
            out.append(0.0)
            continue
        mean = sum(group) / len(group)
        a = Fraction(r) - mean
        if norm_by_std:
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
            out.append(float(a) / (std + eps))
        else:
            out.append(float(a))
    return out


@pytest.mark.parametrize("value,size", [(0.895, 16), (100.1, 8), (0.895, 6), (-3.7, 5), (1e6 + 0.1, 3)])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo"])
def test_all_equal_group_gets_exactly_zero_advantage(value, size, estimator):
    """A float32 group mean is one ulp off (16 x 0.895 summed gives 0.89500022), and the std division turned that
    into advantages of 0.19 (0.895 at group 16) and 0.83 (100.1 at group 8). Now exact zeros, beside a varied
    group, in either layout, and whatever dynamic sampling does with the group afterwards."""
    from types import SimpleNamespace

    from posttrain.stages.rl_step import compute_advantages

    r = torch.tensor([value] * size + [0.0, 1.0] * (size // 2) + [0.5] * (size % 2))
    est = get_adv_estimator(estimator)
    assert torch.equal(est(r, group_size=size)[:size], torch.zeros(size))
    ids = [1] * size + [0] * size
    assert torch.equal(est(r, ids)[:size], torch.zeros(size))
    assert est(r, group_size=size)[size:].abs().max() > 0.1
    for dynamic in (False, True):
        cfg = SimpleNamespace(kl_in_reward=False, kl_coef=0.0, adv_estimator=estimator, dynamic_sampling=dynamic)
        batch = SimpleNamespace(loss_mask=torch.ones(2 * size, 3, dtype=torch.long), group_index=ids)
        adv, mask, _, _ = compute_advantages(cfg, batch, r.tolist())
        assert torch.equal(adv[:size], torch.zeros(size))
        assert bool(mask[:size].any()) is not dynamic


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_exact_per_group_loop_on_random_rewards(seed, norm_by_std):
    """Random float32 rewards of any scale, shuffled ids, some groups all equal: equal to a per-group loop in exact
    arithmetic to float32 precision, and exactly 0 on the all-equal groups."""
    rng = random.Random(seed)
    groups = []
    for k in range(rng.randint(2, 7)):
        size, scale = rng.randint(2, 9), 10 ** rng.uniform(-3, 4)
        if k == 0 or rng.random() < 0.4:
            groups.append([rng.uniform(-scale, scale)] * size)
        else:
            groups.append([rng.choice([rng.uniform(-scale, scale), 0.1 * k]) for _ in range(size)])
    ids = [k for k, g in enumerate(groups) for _ in g]
    order = list(range(len(ids)))
    rng.shuffle(order)
    ids = [ids[i] for i in order]
    r = torch.tensor([x for g in groups for x in g])[order]  # float32, as the RL stage builds them
    rewards = r.tolist()
    got = compute_grpo_advantages(r, ids, norm_by_std=norm_by_std)
    want = _grpo_exact(rewards, ids, norm_by_std, 1e-6)
    assert got.tolist() == pytest.approx(want, rel=1e-6, abs=1e-6)
    equal = [len({rewards[j] for j in range(len(ids)) if ids[j] == ids[i]}) == 1 for i in range(len(ids))]
    assert any(equal)
    assert all(got[i].item() == 0.0 for i in range(len(ids)) if equal[i])


def test_group_index_errors():
    with pytest.raises(ValueError):
        group_index(4)
    with pytest.raises(ValueError):
        group_index(5, group_size=2)
    with pytest.raises(ValueError):
        group_index(3, ["a", "b"])


def _gae_loop(rewards, values, mask, gamma, lam):
    """Reference: compact each row to its response tokens, run the textbook recursion, scatter back."""
    b, t = len(rewards), len(rewards[0])
    adv = [[0.0] * t for _ in range(b)]
    ret = [[0.0] * t for _ in range(b)]
    for i in range(b):
        pos = [j for j in range(t) if mask[i][j]]
        last = 0.0
        for k in reversed(range(len(pos))):
            j = pos[k]
            v_next = values[i][pos[k + 1]] if k + 1 < len(pos) else 0.0
            delta = rewards[i][j] + gamma * v_next - values[i][j]
            last = delta + gamma * lam * last
            adv[i][j] = last
            ret[i][j] = last + values[i][j]
    return adv, ret


@pytest.mark.parametrize("seed,b,t", [(0, 1, 1), (1, 2, 5), (2, 4, 9), (3, 3, 12)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_loop(seed, b, t, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) > 0.3).double()  # holes inside rows (multi-turn tool tokens)
    mask[:, t // 2 + 1:] *= (torch.rand(b, 1, generator=g) > 0.5).double()  # and right padding
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = _gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    for i in range(b):
        assert adv[i].tolist() == pytest.approx(want_adv[i], abs=1e-10)
        assert ret[i].tolist() == pytest.approx(want_ret[i], abs=1e-10)


def test_gae_hand_worked_outcome_reward():
    # gamma = lam = 1, outcome reward 1 on the last token: A_t = 1 - V_t, returns = 1 everywhere on the mask
    values = torch.tensor([[0.2, 0.5, 0.9, 7.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.8, 0.5, 0.1, 0.0])
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert get_adv_estimator("gae") is compute_gae


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(seed, shift_mean):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.rand(3, 7, generator=g) > 0.4
    vals = [x[i, j].item() for i in range(3) for j in range(7) if mask[i, j]]
    mean, std = statistics.fmean(vals), statistics.stdev(vals)
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    for i in range(3):
        for j in range(7):
            whitened = (x[i, j].item() - mean) / math.sqrt(std**2 + 1e-8) + (0 if shift_mean else mean)
            want = whitened if mask[i, j] else 0.0
            assert out[i, j].item() == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_sampling_matches_loop(seed):
    rng = random.Random(seed)
    ids = [k for k in range(rng.randint(1, 6)) for _ in range(rng.randint(1, 4))]
    rng.shuffle(ids)
    rewards = [float(rng.choice([0, 1])) for _ in ids]
    keep, metrics = dynamic_sampling_mask(torch.tensor(rewards), torch.tensor(ids))
    want = [len({rewards[j] for j in range(len(ids)) if ids[j] == ids[i]}) > 1 for i in range(len(ids))]
    assert keep.tolist() == want
    dropped = {g for g in ids if len({rewards[j] for j in range(len(ids)) if ids[j] == g}) == 1}
    assert metrics["rollout/dropped_groups"] == len(dropped)
    assert metrics["rollout/dropped_samples"] == want.count(False)
    assert metrics["rollout/kept_groups"] == len(set(ids)) - len(dropped)


def test_dynamic_sampling_hand_worked():
    keep, metrics = dynamic_sampling_mask(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), group_size=2)
    assert keep.tolist() == [False, False, True, True, False, False]
    assert metrics["rollout/dropped_groups"] == 2.0
