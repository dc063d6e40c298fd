"""Budget/length shaping: hand-worked values from the papers' formulas, edges, and the ordering guarantee."""

import random

import pytest
import torch

from posttrain.rewards import build_reward
from posttrain.rewards.shaping import (L1_ALPHA, dapo_overlong_penalty, group_length_bonus, l1_exact, l1_max,
                                       length_group_combine)


def test_l1_exact_paper_default_alpha():
    assert L1_ALPHA == 0.0003  # the L1 paper's alpha
    # correct, 500 tokens over budget: 1 - 0.0003 * |1500 - 1000| = 1 - 0.15 = 0.85
    assert l1_exact(1, 1500, 1000) == pytest.approx(0.85)
    # wrong, 200 under budget: 0 - 0.0003 * 200 = -0.06 (unclipped)
    assert l1_exact(0, 800, 1000) == pytest.approx(-0.06)
    assert l1_exact(1, 1000, 1000) == 1.0
    # symmetric in over/under: |500 - 1000| = |1500 - 1000|
    assert l1_exact(1, 500, 1000) == pytest.approx(l1_exact(1, 1500, 1000))


def test_l1_max_paper_defaults():
    # 0.0003 * (1000 - 1500) + 0.5 = -0.15 + 0.5 = 0.35
    assert l1_max(1, 1500, 1000) == pytest.approx(0.35)
    # under budget: 0.0003 * 500 + 0.5 = 0.65
    assert l1_max(1, 500, 1000) == pytest.approx(0.65)
    # far under: 0.0003 * 4000 + 0.5 = 1.7 -> clipped to 1
    assert l1_max(1, 0, 4000) == 1.0
    # far over: 0.0003 * -2000 + 0.5 = -0.1 -> clipped to 0
    assert l1_max(1, 3000, 1000) == 0.0
    # a wrong answer gets nothing however short
    assert l1_max(0, 10, 1000) == 0.0


def test_l1_on_tensors_matches_floats():
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0])
    n = torch.tensor([1500.0, 800.0, 0.0, 3000.0])
    b = torch.tensor([1000.0, 1000.0, 4000.0, 1000.0])
    exact, mx = l1_exact(correct, n, b), l1_max(correct, n, b)
    assert isinstance(exact, torch.Tensor) and exact.shape == (4,)
    assert exact.tolist() == pytest.approx([l1_exact(*x) for x in zip([1, 0, 1, 1], [1500, 800, 0, 3000], [1000, 1000, 4000, 1000])])
    assert mx.tolist() == pytest.approx([0.35, 0.0, 1.0, 0.0])
    assert l1_max(torch.tensor([True, False]), torch.tensor([500.0, 500.0]), 1000).tolist() == pytest.approx([0.65, 0.0])


@pytest.mark.parametrize("length, expected", [
    (0, 0.0),
    (800, 0.0),        # L = L_max - L_cache: last free length
    (801, -0.005),     # (800 - 801) / 200
    (900, -0.5),       # (800 - 900) / 200
    (1000, -1.0),      # L = L_max: (800 - 1000) / 200
    (1001, -1.0),      # beyond L_max
    (5000, -1.0),
])
def test_dapo_buffer_edges(length, expected):
    assert dapo_overlong_penalty(length, max_len=1000, cache_len=200) == pytest.approx(expected)


def test_dapo_tensor():
    out = dapo_overlong_penalty(torch.tensor([800.0, 900.0, 1200.0]), 1000, 200)
    assert out.tolist() == pytest.approx([0.0, -0.5, -1.0])


def test_kimi_lambda_concrete_group():
    # lengths 100, 250, 400, 400: min 100, max 400, range 300
    # lambda = 0.5 - (len - 100)/300 = [0.5, 0.0, -0.5, -0.5]
    # correct ones keep lambda, wrong ones get min(0, lambda): [0.5, 0.0, -0.5, -0.5]
    assert group_length_bonus([100, 250, 400, 400], [1, 0, 1, 0], [7, 7, 7, 7]) == pytest.approx([0.5, 0.0, -0.5, -0.5])
    # a short wrong answer is not rewarded: lambda 0.5 -> min(0, 0.5) = 0
    assert group_length_bonus([100, 400], [0, 1], ["a", "a"]) == pytest.approx([0.0, -0.5])
    # all equal lengths -> 0; groups are independent
    assert group_length_bonus([5, 5, 10, 20], [1, 0, 1, 1], [0, 0, 1, 1]) == pytest.approx([0.0, 0.0, 0.5, -0.5])


def test_shortest_correct_target():
    # target = shortest correct = 200, range = 500 - 100 = 400; lambda = 0.5 - |len - 200| / 400
    # = [0.25, 0.5, 0.25, -0.25]; wrong ones (100, 500) -> min(0, .): [0, 0.5, 0.25, -0.25]
    got = group_length_bonus([100, 200, 300, 500], [0, 1, 1, 0], [0] * 4, target="shortest_correct")
    assert got == pytest.approx([0.0, 0.5, 0.25, -0.25])
    # none correct: target = mean length = (100 + 200 + 600) / 3 = 300, range 500;
    # lambda = 0.5 - [200, 100, 300] / 500 = [0.1, 0.3, -0.1]; all wrong -> min(0, .) = [0, 0, -0.1]
    got = group_length_bonus([100, 200, 600], [0, 0, 0], [0] * 3, target="shortest_correct")
    assert got == pytest.approx([0.0, 0.0, -0.1])


def test_group_bonus_tensor_matches_list():
    lengths, correct, groups = [3.0, 9.0, 4.0, 4.0, 1.0], [1, 0, 0, 1, 1], [0, 0, 1, 1, 0]
    t = group_length_bonus(torch.tensor(lengths), torch.tensor(correct), torch.tensor(groups))
    assert isinstance(t, torch.Tensor)
    assert t.tolist() == pytest.approx(group_length_bonus(lengths, correct, groups))


@pytest.mark.parametrize("target", ["kimi", "shortest_correct"])
def test_wrong_never_outscores_right_over_random_groups(target):
    rng = random.Random(0)
    for _ in range(500):
        n_groups, size = rng.randint(1, 4), rng.randint(2, 8)
        groups = [g for g in range(n_groups) for _ in range(size)]
        lengths = [rng.choice([rng.randint(1, 50), rng.randint(1, 5000)]) for _ in groups]
        correct = [rng.random() < 0.5 for _ in groups]
        weight = rng.choice([0.0, 0.5, 1.0, 1.99, rng.uniform(0, 1.999)])
        scores = length_group_combine(correct, group_length_bonus(lengths, correct, groups, target), weight)
        right = [s for s, c in zip(scores, correct) if c]
        wrong = [s for s, c in zip(scores, correct) if not c]
        if right and wrong:
            assert min(right) > max(wrong), (lengths, correct, groups, weight)


def test_group_weight_bound_enforced():
    for bad in (2.0, 3.0, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 2.0\)"):
            length_group_combine([1], [0.0], bad)


def test_budget_rewards_on_completions():
    comps = ["t</think>\n\n10", "t</think>\n\n10", "t</think>\n\n11", "t</think>\n\n10"]
    fields = dict(answer=[10, 10, 10, 10], budget=[1000, 1000, 1000, None], n_think=[1500, 500, 500, 9999])
    exact = build_reward("budget_l1_exact")([""] * 4, comps, **fields)
    # [1 - 0.15, 1 - 0.15, 0 - 0.15, plain correctness 1 (autonomous)]
    assert exact.scores == pytest.approx([0.85, 0.85, -0.15, 1.0])
    assert exact.metrics["abs_budget_error"] == pytest.approx(500.0)
    assert exact.metrics["over_budget"] == pytest.approx(1 / 3)
    mx = build_reward("budget_l1_max")([""] * 4, comps, **fields)
    assert mx.scores == pytest.approx([0.35, 0.65, 0.0, 1.0])
    # alpha as a parameter: 1 - 0.001 * 500 = 0.5
    assert build_reward("budget_l1_exact", alpha=0.001)([""], comps[:1], answer=[10], budget=[1000],
                                                        n_think=[1500]).scores == pytest.approx([0.5])


def test_budget_rewards_need_n_think_only_when_budgeted():
    r = build_reward("budget_l1_exact")
    assert r([""], ["t</think>3"], answer=[3], budget=[None]).scores == [1.0]
    with pytest.raises(ValueError, match="'n_think'"):
        r([""], ["t</think>3"], answer=[3], budget=[100])


def test_budget_reward_math_grader():
    out = build_reward("budget_l1_exact", grader="math")([""], [r"t</think>\boxed{\frac{1}{2}}"], answer=["0.5"],
                                                         budget=[100], n_think=[100])
    assert out.scores == [1.0]


def test_overlong_reward():
    comps = ["t</think>5", "t</think>5", "t</think>6"]
    out = build_reward("overlong", max_len=1000, cache_len=200)([""] * 3, comps, answer=[5, 5, 5],
                                                               n_think=[100, 900, 1200])
    # correct + penalty: [1 + 0, 1 - 0.5, 0 - 1]
    assert out.scores == pytest.approx([1.0, 0.5, -1.0])
    only = build_reward("overlong", max_len=1000, cache_len=200, include_correctness=False)
    assert only([""] * 3, comps, n_think=[100, 900, 1200]).scores == pytest.approx([0.0, -0.5, -1.0])


def test_length_group_reward():
    comps = ["t</think>4", "t</think>4", "t</think>9", "t</think>4"]
    out = build_reward("length_group", weight=0.5)([""] * 4, comps, answer=[4] * 4, n_think=[100, 400, 100, 50],
                                                    group=[0, 0, 0, 1])
    # group 0: range 300; lambda = [0.5, -0.5, 0.5]; wrong third -> 0. group 1 alone -> 0.
    # scores = correct + 0.5 * bonus = [1.25, 0.75, 0.0, 1.0]
    assert out.scores == pytest.approx([1.25, 0.75, 0.0, 1.0])
