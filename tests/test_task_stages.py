"""Features reached from a recipe, run in real stages on the tiny model (in this process: `ray.backend=local`):
reasoning-gym datasets by name, `posttrain sweep --model RUN` on their held-out rows, TIS, and the rm stage's GenRM
and scalar RM as RL reward terms."""

import argparse
import json
import math

import pytest

from posttrain.recipe import load_recipe
from posttrain.tasks.task import build_task

SMALL_RL = ["threads=1", "ray.backend=local", "sft.steps=2", "sft.batch_size=4", "sft.n_examples=40",
            "grpo.steps=2", "grpo.prompts_per_step=3", "grpo.group_size=2", "grpo.budgets=[0,8,auto]",
            "grpo.max_new_tokens=8", "grpo.eval_budgets=[8,auto]", "grpo.eval_n_per_difficulty=1",
            "grpo.eval_max_new_tokens=8", "task.max_difficulty=3"]


def _metrics(run, stage="grpo") -> list[dict]:
    return [json.loads(s) for s in (run / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain_sum_run(tmp_path_factory, tiny_model_dir):
    from posttrain.pipeline import run_recipe

    run = tmp_path_factory.mktemp("gym") / "run"
    rc = load_recipe(None, [f"run_dir={run}", f"model.path={tiny_model_dir}", "stages=[sft,grpo]",
                            "data.source=reasoning_gym", "data.dataset=chain_sum", "data.size=300",
                            "data.config={min_terms: 2, max_terms: 4, max_digits: 1}", *SMALL_RL])
    return run, rc, run_recipe(rc)


@pytest.mark.parametrize("dataset, config", [("leg_counting", "{}"), ("count_bits", "{}")])
def test_any_reasoning_gym_dataset_trains_from_a_recipe(tiny_model_dir, tmp_path, dataset, config):
    """Two more datasets besides chain_sum (the fixture): sft and grpo run on their entries, graded by their own
    `score_answer`, evaluated before and after on rows held out of training."""
    from posttrain.pipeline import run_recipe

    rc = load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "stages=[sft,grpo]",
                            "data.source=reasoning_gym", f"data.dataset={dataset}", "data.size=200",
                            f"data.config={config}", *SMALL_RL])
    info = run_recipe(rc)
    _check_gym_run(tmp_path / "run", rc, info)


def test_chain_sum_trains_from_a_recipe(chain_sum_run):
    _check_gym_run(*chain_sum_run)


def _check_gym_run(run, rc, info):
    lines = _metrics(run)
    assert len(lines) == 2 and all("rollout/accuracy" in m and "reward/mean" in m for m in lines)
    summary = info["grpo"]["summary"]
    assert set(summary["before"]) == set(summary["after"]) == {"8", "auto"} and summary["skipped_steps"] == 0
    held = {p.expression for p in build_task(rc).evaluation_rows()}
    assert len(held) == 6 and (run / "held_out.jsonl").is_file()
    assert [json.loads(x)["prompt"] for x in (run / "held_out.jsonl").read_text().splitlines()] == [
        p.expression for p in build_task(rc).evaluation_rows()]


def test_sweep_of_a_reasoning_gym_run_sweeps_the_rows_it_held_out(chain_sum_run):
    from posttrain.cli import _run_held_out_problems

    run, rc, _ = chain_sum_run
    args = argparse.Namespace(model=[str(run)], data=None, n=1)
    problems, grader = _run_held_out_problems(args, {})
    held = build_task(rc).evaluation_rows()
    assert grader == "reasoning_gym" and problems and {p.expression for p in problems} <= {p.expression for p in held}
    assert sorted(p.difficulty for p in problems) == [1, 2, 3]  # one per difficulty
    assert all(p.tests["question"] == p.expression for p in problems)  # the entry the grader reads


def test_a_data_file_changed_since_the_run_is_not_swept_as_its_held_out_rows(tmp_path):
    from posttrain.data import DataError

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = [f"run_dir={tmp_path / 'run'}", f"model.path={tmp_path}", "stages=[grpo]", "data.source=file",
            f"data.path={path}", "grpo.eval_budgets=[8]", "grpo.eval_n_per_difficulty=1"]
    (tmp_path / "run").mkdir()
    build_task(load_recipe(None, over)).record(tmp_path / "run")
    build_task(load_recipe(None, over)).check_recorded(tmp_path / "run")  # unchanged: fine
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))  # one row fewer: the spread moves
    with pytest.raises(DataError, match="the data changed since the run"):
        build_task(load_recipe(None, over)).check_recorded(tmp_path / "run")


def test_tis_from_the_recipe_weights_the_learners_update(tiny_model_dir, tmp_path, noisy_rewards):
    """grpo.tis_cap: the learner recomputes the old policy's log-probs and reports the truncated IS weights (the
    rollout worker and the learner run the same model here, so the weights are close to 1)."""
    from posttrain.pipeline import run_recipe

    run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "stages=[grpo]",
                                  *SMALL_RL, "grpo.tis_cap=2.0"]))
    for m in _metrics(tmp_path / "run"):
        assert 0.9 < m["rollout/tis_weight_mean"] <= m["rollout/tis_weight_max"] <= 2.0


def test_the_rm_stages_genrm_and_scalar_rm_are_grpo_reward_terms(tiny_model_dir, tmp_path):
    """Rewards `genrm` and `scalar_rm` without a path read this run's rm stage outputs; their scores are in the
    rollout's reward metrics and in the total."""
    from posttrain.pipeline import run_recipe

    rm = ("rm={n_prompts: 12, samples_per_prompt: 2, budgets: [0, auto], max_new_tokens: 6, holdout_fraction: 0.5, "
          "label_reward: format, genrm: {steps: 2, batch_size: 4}, scalar: {enabled: true, steps: 2, batch_size: 2}}")
    rewards = ("grpo.rewards=[{name: exact_int}, {name: genrm, weight: 0.5}, {name: scalar_rm, weight: 0.1}]")
    rc = load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "stages=[rm,grpo]",
                            *SMALL_RL, rm, rewards])
    run_recipe(rc)
    seen = 0
    for m in _metrics(tmp_path / "run"):
        for kind in ("budgeted", "auto"):
            if f"reward/{kind}/total/mean" not in m:
                continue  # no row of that kind this step
            seen += 1
            p_yes, score = m[f"reward/{kind}/genrm/p_yes"], m[f"reward/{kind}/scalar_rm/score"]
            assert 0.0 <= p_yes <= 1.0 and math.isfinite(score)
            # the random model is never right (exact_int 0): the total is the RM terms' weighted sum
            assert m[f"reward/{kind}/exact_int/mean"] == 0.0
            assert m[f"reward/{kind}/total/mean"] == pytest.approx(0.5 * p_yes + 0.1 * score)
    assert seen >= 2
