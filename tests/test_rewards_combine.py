"""CombinedReward: weighted sums, the HERO gate's ordering guarantee, and failure isolation."""

import math
import random

import pytest

from posttrain.rewards.combine import CombinedReward, RewardSpec, as_spec, hero_gate
from posttrain.rewards.registry import RewardOutput, register_reward


@register_reward("_test_fake_judge")
class FakeJudge:
    """Stands in for `genrm` only to test the combiner's arithmetic: returns the `judge_score` field as P(Yes)."""

    def __call__(self, prompts, completions, **fields):
        return RewardOutput([float(s) for s in fields["judge_score"]], {"p_yes": 0.0})


@register_reward("_test_flaky")
class Flaky:
    """Raises on any batch holding a completion with "BOOM"; returns NaN for "NAN"; else 0.5."""

    def __call__(self, prompts, completions, **fields):
        if any("BOOM" in c for c in completions):
            raise RuntimeError("boom")
        return RewardOutput([math.nan if "NAN" in c else 0.5 for c in completions], {"errors": 0.0})


@register_reward("_test_always_raises")
class AlwaysRaises:
    def __call__(self, prompts, completions, **fields):
        raise ValueError("broken reward")


def test_hero_gate_values():
    # v=1, s=0: 1 - 0.2 + 0 = 0.8 ; v=1, s=1: 1 ; v=0, s=1: 0.2 ; v=0, s=0: 0
    assert hero_gate(1, 0.0, 0.2) == pytest.approx(0.8)
    assert hero_gate(1, 1.0, 0.2) == pytest.approx(1.0)
    assert hero_gate(0, 1.0, 0.2) == pytest.approx(0.2)
    assert hero_gate(0, 0.0, 0.2) == 0.0
    for bad in (0.5, 0.7, -0.01):
        with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
            hero_gate(1, 0.5, bad)
    with pytest.raises(ValueError, match="beta"):
        CombinedReward([("exact_int",), ("_test_fake_judge",)], mode="gated", verifier="exact_int",
                       judge="_test_fake_judge", beta=0.5)


def test_gated_never_ranks_wrong_above_right_random():
    rng = random.Random(1)
    for _ in range(200):
        beta = rng.choice([0.0, 0.49, rng.uniform(0, 0.4999)])
        n = rng.randint(2, 12)
        correct = [rng.random() < 0.5 for _ in range(n)]
        comps = [f"t</think>{3 if c else 4}" for c in correct]
        judge = [rng.choice([0.0, 1.0, rng.random(), rng.uniform(-1, 2)]) for _ in range(n)]  # even out-of-range s
        reward = CombinedReward([{"name": "exact_int"}, {"name": "_test_fake_judge", "key": "judge"}], mode="gated",
                                verifier="exact_int", judge="judge", beta=beta)
        scores = reward([""] * n, comps, answer=[3] * n, judge_score=judge).scores
        right = [s for s, c in zip(scores, correct) if c]
        wrong = [s for s, c in zip(scores, correct) if not c]
        assert all(1 - beta - 1e-12 <= s <= 1 for s in right) and all(0 <= s <= beta + 1e-12 for s in wrong)
        if right and wrong:
            assert min(right) > max(wrong)


def test_gated_concrete_and_modes():
    comps = ["t</think>3", "t</think>4", "t</think>3"]
    fields = dict(answer=[3, 3, 3], judge_score=[0.1, 0.9, 1.0])
    specs = [("exact_int", 1.0), RewardSpec("_test_fake_judge", key="judge"), ("format", 0.1)]
    gated = CombinedReward(specs, mode="gated", verifier="exact_int", judge="judge", beta=0.2)
    # v=[1,0,1]: [0.8 + 0.2*0.1, 0.2*0.9, 0.8 + 0.2*1.0] = [0.82, 0.18, 1.0], plus 0.1 * format(=1) each
    assert gated([""] * 3, comps, **fields).scores == pytest.approx([0.92, 0.28, 1.1])
    ver = CombinedReward(specs, mode="verifiable", verifier="exact_int", judge="judge")
    out = ver([""] * 3, comps, answer=[3, 3, 3])  # no judge_score needed: the judge is not called
    assert out.scores == pytest.approx([1.1, 0.1, 1.1])
    assert "reward/judge/mean" not in out.metrics
    gen = CombinedReward(specs, mode="generative", verifier="exact_int", judge="judge")  # verifier named: not called
    # judge + 0.1 * format: [0.1 + 0.1, 0.9 + 0.1, 1.0 + 0.1]
    assert gen([""] * 3, comps, **fields).scores == pytest.approx([0.2, 1.0, 1.1])
    total = CombinedReward([("exact_int", 2.0), ("format", -0.5)])
    # 2 * correct - 0.5 * format: [2 - 0.5, 0 - 0.5, 2 - 0.5]
    assert total([""] * 3, comps, answer=[3, 3, 3]).scores == pytest.approx([1.5, -0.5, 1.5])


def test_metrics_are_prefixed():
    out = CombinedReward([("exact_int", 1.0), ("format", 1.0)])([""] * 2, ["t</think>1", "t</think>2"], answer=[1, 1])
    assert out.metrics["reward/exact_int/mean"] == 0.5
    assert out.metrics["reward/exact_int/accuracy"] == 0.5
    assert out.metrics["reward/exact_int/errors"] == 0.0
    assert out.metrics["reward/format/mean"] == 1.0
    assert out.metrics["reward/total/mean"] == pytest.approx((2 + 1) / 2)


def test_failing_samples_score_zero_and_are_counted():
    comps = ["t</think>1", "BOOM</think>1", "t</think>1", "NAN</think>1"]
    reward = CombinedReward([("exact_int", 1.0), ("_test_flaky", 1.0)])
    out = reward([""] * 4, comps, answer=[1, 1, 1, 1])
    # flaky: batch raises -> per sample: [0.5, raise->0, 0.5, nan->0]; exact_int: all 1
    assert out.scores == pytest.approx([1.5, 1.0, 1.5, 1.0])
    assert out.metrics["reward/_test_flaky/errors"] == 2.0
    assert out.metrics["reward/_test_flaky/mean"] == pytest.approx(0.25)
    assert out.metrics["reward/exact_int/errors"] == 0.0


def test_a_reward_that_always_raises_never_raises_the_call():
    reward = CombinedReward([("exact_int", 1.0), ("_test_always_raises", 1.0)])
    out = reward([""] * 3, ["t</think>1"] * 3, answer=[1, 1, "not an int"])  # the bad gold makes exact_int raise too
    assert out.scores == [1.0, 1.0, 0.0]
    assert out.metrics["reward/_test_always_raises/errors"] == 3.0
    assert out.metrics["reward/exact_int/errors"] == 1.0


def test_config_errors_are_raised_at_build():
    with pytest.raises(ValueError, match="unknown reward 'exact_in'"):
        CombinedReward([("exact_in", 1.0)])
    with pytest.raises(ValueError, match="needs `judge`"):
        CombinedReward([("exact_int", 1.0)], mode="gated", verifier="exact_int")
    with pytest.raises(ValueError, match="not one of the rewards"):
        CombinedReward([("exact_int", 1.0)], mode="verifiable", verifier="math")
    with pytest.raises(ValueError, match="unique"):
        CombinedReward([("exact_int", 1.0), ("exact_int", 2.0)])
    with pytest.raises(ValueError, match="unknown combine mode 'hero'"):
        CombinedReward([("exact_int", 1.0)], mode="hero")
    with pytest.raises(ValueError, match="unknown keys"):
        as_spec({"name": "exact_int", "wieght": 2})
    with pytest.raises(TypeError, match="unknown parameter 'alpah'"):
        CombinedReward([{"name": "budget_l1_exact", "params": {"alpah": 1}}])
