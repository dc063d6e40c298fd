"""HERO gating of a generative score behind a verifier, from the recipe (`grpo.reward_combine`), in a real stage."""

import json

import pytest

from posttrain.recipe import load_recipe
from posttrain.rewards.registry import RewardOutput, register_reward


@register_reward("_test_half_judge")
class HalfJudge:
    """A judge that rates every answer 0.5 (the stage runs in this process: `ray.backend=local`)."""

    def __call__(self, prompts, completions, **fields):
        return RewardOutput([0.5] * len(completions), {})


REWARDS = "grpo.rewards=[{name: exact_int, key: v}, {name: _test_half_judge, key: j}]"


def test_gated_rewards_from_the_recipe_reach_the_rollout_scores(tiny_model_dir, tmp_path):
    from posttrain.pipeline import run_recipe

    over = [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "stages=[grpo]", "threads=1",
            "task.max_difficulty=2", "grpo.steps=2", "grpo.prompts_per_step=3", "grpo.group_size=2",
            "grpo.budgets=[auto]", "grpo.max_new_tokens=8", "grpo.eval_budgets=[auto]", "grpo.eval_n_per_difficulty=1",
            "grpo.eval_max_new_tokens=8", "ray.backend=local", REWARDS,
            "grpo.reward_combine={mode: gated, verifier: v, judge: j, beta: 0.2}"]
    run_recipe(load_recipe(None, over))
    lines = [json.loads(s) for s in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        assert m["reward/auto/v/mean"] == 0.0  # the random tiny model is never right: every row in the low band
        assert m["reward/auto/j/mean"] == pytest.approx(0.5)
        assert m["reward/mean"] == pytest.approx(0.2 * 0.5)  # hero_gate(0, 0.5, beta 0.2); a plain sum gives 0.5


@pytest.mark.parametrize("combine, shown", [
    ("{mode: gated, verifier: v}", "reward_combine.judge"),
    ("{mode: gated, verifier: nope, judge: j}", "'nope' is not among the rewards"),
    ("{mode: gated, verifier: v, judge: j, beta: 0.6}", "beta"),
])
def test_a_gate_naming_what_is_not_there_fails_at_load(combine, shown):
    with pytest.raises(Exception, match=shown):
        load_recipe(None, ["stages=[base]", REWARDS, f"grpo.reward_combine={combine}"])
