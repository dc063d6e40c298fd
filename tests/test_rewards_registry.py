"""The reward registry: names are YAML strings, unknown names/params fail loudly, every reward pickles."""

import pickle

import pytest

from posttrain.rewards import UnknownRewardError, build_reward, get_reward_cls, list_rewards
from posttrain.rewards.registry import COUNT_METRICS, RewardOutput, merge_metrics, register_reward

BUILTIN = ["budget_l1_exact", "budget_l1_max", "code", "exact_int", "format", "length_group", "math", "overlong"]


def test_builtins_registered():
    assert set(BUILTIN) <= set(list_rewards())


def test_unknown_name_lists_known_and_nearest():
    with pytest.raises(UnknownRewardError) as info:
        get_reward_cls("exact_in")
    msg = str(info.value)
    assert "unknown reward 'exact_in'" in msg
    assert "Did you mean 'exact_int'?" in msg
    for name in BUILTIN:
        assert name in msg
    # catchable as either kind
    with pytest.raises(KeyError):
        build_reward("no_such_reward_at_all")
    with pytest.raises(ValueError):
        build_reward("no_such_reward_at_all")


def test_unknown_param_names_reward_and_param():
    with pytest.raises(TypeError, match=r"reward 'budget_l1_exact' got an unknown parameter 'alpah'\. Did you mean 'alpha'"):
        build_reward("budget_l1_exact", alpah=0.1)
    with pytest.raises(ValueError, match="'exact_int' got an unknown parameter 'grader'"):
        build_reward("exact_int", grader="math")


def test_bad_param_values_fail_at_build():
    with pytest.raises(ValueError, match="unknown grader 'exactint'"):
        build_reward("budget_l1_max", grader="exactint")
    with pytest.raises(ValueError, match="weight"):
        build_reward("length_group", weight=2.0)
    with pytest.raises(ValueError, match="cache_len"):
        build_reward("overlong", max_len=100, cache_len=200)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_pickles(name):
    reward = build_reward(name)
    clone = pickle.loads(pickle.dumps(reward))
    assert type(clone) is type(reward) and vars(clone) == vars(reward)


def test_reregistering_a_name_to_another_class_fails():
    with pytest.raises(ValueError, match="already registered"):
        @register_reward("exact_int")
        class Other:  # noqa: F841
            pass


def test_merge_metrics_counts_add_means_weight():
    assert "errors" in COUNT_METRICS
    # errors: 1 + 2 = 3 ; acc: (1.0*1 + 0.5*3) / 4 = 2.5/4 = 0.625
    merged = merge_metrics([{"errors": 1, "acc": 1.0}, {"errors": 2, "acc": 0.5}], [1, 3])
    assert merged == {"errors": 3.0, "acc": 0.625}


def test_missing_field_is_a_clear_error():
    with pytest.raises(ValueError, match="'exact_int' needs the per-example field 'answer'"):
        build_reward("exact_int")(["p"], ["1</think>1"])
    with pytest.raises(ValueError, match="field 'answer' has 2 values for 1 completions"):
        build_reward("exact_int")(["p"], ["1</think>1"], answer=[1, 2])


def test_reward_output_defaults():
    assert RewardOutput([1.0]).metrics == {}
