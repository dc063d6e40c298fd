"""One grader per task (`data.grader`), used by the RL rewards' correctness, the RM labels and every evaluation.

The regression this pins: on a data file the default GRPO rewards graded correctness with `exact_int`, so a correct
`\\frac{3}{4}` scored below a wrong integer while the progress line's accuracy (graded by `math`) looked healthy.
"""

import json

import pytest

from posttrain.recipe import load_recipe


def _defaults() -> list[dict]:
    from posttrain.config_rl import _default_rl_rewards

    return [r.model_dump() for r in _default_rl_rewards()]


def test_default_rl_rewards_grade_a_file_by_its_grader():
    from posttrain.workers.reward import RLRewardWorker

    texts = ["1234</think>\n\n\\frac{3}{4}", "1234</think>\n\n1", "1234</think>\n\n0.75", "12</think>\n\n3/4"]
    answers, budgets = ["3/4", "3/4", "0.75", "3/4"], [4, 4, 4, None]
    scores, correct, metrics = RLRewardWorker(_defaults(), "math").score(
        ["q"] * 4, texts, answers, budgets, n_think=[4, 4, 4, 2], groups=[0, 0, 1, 2], forced=[False] * 4)
    assert correct == [True, False, True, True]
    assert scores[0] == pytest.approx(1.0) and scores[2] == pytest.approx(1.0)  # full correctness, on budget
    assert scores[1] == pytest.approx(0.0) and scores[1] < scores[0]  # a wrong integer gets none
    assert metrics["reward/budgeted/correct_l1/accuracy"] == pytest.approx(2 / 3)
    # the same rewards under the integer grader are what the bug was: a right fraction below a wrong integer
    wrong, _, _ = RLRewardWorker(_defaults(), "exact_int").score(
        ["q"] * 2, texts[:2], ["3/4", "1"], [4, 4], n_think=[4, 4], groups=[0, 0], forced=[False] * 2)
    assert wrong[0] < wrong[1]


def test_a_reward_given_its_own_grader_keeps_it():
    from posttrain.workers.reward import with_grader

    spec = {"name": "budget_l1_exact", "params": {"grader": "exact_int"}}
    assert with_grader(spec, "math")["params"]["grader"] == "exact_int"
    assert with_grader({"name": "budget_l1_exact", "params": {}}, "exact")["params"]["grader"] == "exact"
    assert "grader" not in with_grader({"name": "format", "params": {}}, "math")["params"]  # takes none


@pytest.mark.parametrize("grader, source, label", [("auto", "arithmetic", "exact_int"), ("auto", "file", "math"),
                                                    ("exact", "file", "exact"), ("math", "arithmetic", "math")])
def test_data_grader_resolves_and_labels_the_rm_samples(tmp_path, grader, source, label):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "answer": "a"}\n')
    over = [f"data.grader={grader}", f"data.source={source}", "stages=[base]"]
    if source == "file":
        over.append(f"data.path={tmp_path / 'd.jsonl'}")
    rc = load_recipe(None, over)
    assert rc.data.grader_name == label and rc.rm.label_reward == label
    assert rc.data.grader == grader  # the recipe records what was asked; the resolution is deterministic


def _small_run(tmp_path, model_dir, data_file: str, stages: str, max_new_tokens: int, extra: list) -> list[str]:
    """Overrides of a few-second run on the tiny model: SFT long enough to memorise a small file, then short rm and
    grpo stages (in this process)."""
    return [f"run_dir={tmp_path / 'run'}", f"model.path={model_dir}", "threads=1", "data.source=file",
            f"data.path={tmp_path / data_file}", f"stages={stages}", "sft.steps=300", "sft.batch_size=16",
            "sft.learning_rate=3e-3", "rm.samples_per_prompt=2", "rm.budgets=[auto]",
            f"rm.max_new_tokens={max_new_tokens}", "rm.genrm.steps=2", "grpo.steps=2", "grpo.group_size=2",
            f"grpo.max_new_tokens={max_new_tokens}", "grpo.eval_n_per_difficulty=1",
            f"grpo.eval_max_new_tokens={max_new_tokens}", "ray.backend=local", *extra]


def _fraction_rows(path) -> None:
    answers = ["3/4", "0.25", "1.5", "\\frac{2}{3}", "2.75", "5/8", "0.125", "7/2", "4.5", "1/3", "0.6", "9/4"]
    names = ["three quarters", "a quarter as a decimal", "one and a half", "two thirds", "two and three quarters",
             "five eighths", "an eighth as a decimal", "seven halves", "four and a half", "one third",
             "three fifths as a decimal", "nine quarters"]
    rows = [{"q": f"Write {names[i % 12]} (case {i // 12}).", "a": answers[i % 12], "lvl": 1 + i % 2}
            for i in range(48)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_whole_pipeline_on_fractions_and_decimals_rewards_right_answers(tiny_model_dir, tmp_path):
    """sft -> rm -> grpo -> sweep -> export on a file of fraction and decimal answers: SFT memorises them, so the
    rollouts hold right non-integer answers, and the budget reward's own correctness (graded by the task's grader)
    must agree with the rollout's, row for row: full credit for a right answer, none for a wrong one."""
    from posttrain.pipeline import run_recipe

    _fraction_rows(tmp_path / "d.jsonl")
    over = _small_run(tmp_path, tiny_model_dir, "d.jsonl", "[sft,rm,grpo,sweep,export]", 12, [
        "data.prompt_column=q", "data.answer_column=a", "data.difficulty_column=lvl", "sft.n_examples=200",
        "rm.n_prompts=8", "grpo.prompts_per_step=4", "grpo.budgets=[4,auto]", "grpo.eval_budgets=[4]",
        "sweep.backend=local", "sweep.budgets=[4,auto]", "sweep.n_per_difficulty=1", "sweep.max_new_tokens=12"])
    rc = load_recipe(None, over)
    assert rc.data.grader_name == "math" and rc.rm.label_reward == "math"
    info = run_recipe(rc)
    lines = [json.loads(s) for s in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["budget/4/accuracy"] for m in lines) > 0  # right fractions and decimals were sampled
    for m in lines:
        # every budgeted row has budget 4: the reward's correctness is the rollout's, and its score is exactly
        # correctness minus L1's length term (1 for a right answer, 0 for a wrong one, before that term)
        assert m["reward/budgeted/correct_l1/accuracy"] == pytest.approx(m["budget/4/accuracy"])
        alpha = 0.005  # the default budget_l1_exact's
        assert m["reward/budgeted/correct_l1/mean"] == pytest.approx(
            m["budget/4/accuracy"] - alpha * m["reward/budgeted/correct_l1/abs_budget_error"])
    report = json.loads((tmp_path / "run" / "rm" / "rm_report.json").read_text())
    assert report["label_reward"] == "math"
    assert (tmp_path / "run" / "export" / "adapter" / "adapter_config.json").is_file()
    assert {r["model"] for r in json.loads((tmp_path / "run" / "sweep" / "sweep.json").read_text())} == {"sft", "grpo"}
    assert info["grpo"]["summary"]["skipped_steps"] == 0


def test_the_readme_recipe_for_your_own_data_loads(tmp_path, monkeypatch):
    """The README's copy-me recipe is valid as printed (with its files present)."""
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Your own checkpoint and data", 1)[1]
    body = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt-prepared").mkdir()
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "r #### 1", "level": 1}\n')
    (tmp_path / "r.yaml").write_text(body)
    rc = load_recipe(tmp_path / "r.yaml")
    assert rc.data.grader_name == "math" and rc.rm.label_reward == "math" and rc.sft.lora.enabled
    assert yaml.safe_load(body)["stages"] == list(rc.stages)


def test_code_data_reaches_the_code_reward_and_grader_in_every_stage(tiny_model_dir, tmp_path):
    """data.tests_column + data.grader: code: SFT imitates the reference solutions (the answer column), the rm stage
    labels samples by running them, and GRPO's `code` reward and its correctness run each row's tests."""
    import os

    from posttrain.pipeline import run_recipe
    from posttrain.rewards.sandbox import bwrap_problem

    if bwrap_problem():
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the code grader with its sandbox: {bwrap_problem()}")
        pytest.skip(bwrap_problem())
    ops = [("add", "+"), ("sub", "-"), ("mul", "*")]
    rows = [{"q": f"Write {name} (v{i}).", "solution": f"def {name}(a, b):\n    return a {op} b",
             "tests": [f"assert {name}(2, 3) == {eval(f'2 {op} 3')}", f"assert {name}(4, 1) == {eval(f'4 {op} 1')}"]}
            for i in range(8) for name, op in ops]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = _small_run(tmp_path, tiny_model_dir, "c.jsonl", "[sft,rm,grpo]", 40, [
        "data.prompt_column=q", "data.answer_column=solution", "data.tests_column=tests", "data.grader=code",
        "rm.n_prompts=6", "grpo.prompts_per_step=3", "grpo.budgets=[auto]", "grpo.eval_budgets=[auto]",
        "grpo.rewards=[{name: code, on: all}]"])
    rc = load_recipe(None, over)
    assert rc.rm.label_reward == "code"
    run_recipe(rc)
    lines = [json.loads(s) for s in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        assert m["reward/auto/code/errors"] == 0.0  # the sandbox ran every answer
        # the reward's all-pass rate is the rollout's correctness by the code grader
        assert m["reward/auto/code/all_pass"] == pytest.approx(m["rollout/accuracy"])
    assert sum(m["rollout/accuracy"] for m in lines) > 0  # the imitated solutions pass their tests
    report = json.loads((tmp_path / "run" / "rm" / "rm_report.json").read_text())
    assert report["label_reward"] == "code" and report["sample_accuracy"] > 0


def test_bad_tests_are_bad_rows_named_before_any_model_loads(tmp_path):
    from posttrain.data import DataError, file_examples

    rows = [{"q": "a", "s": "x", "t": ["assert f(1) == 1"]}, {"q": "b", "s": "x", "t": []},
            {"q": "c", "s": "x", "t": ["x = 1"]}, {"q": "d", "s": "x", "t": "not json"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = load_recipe(None, ["stages=[base]", "data.source=file", f"data.path={tmp_path / 'c.jsonl'}",
                            "data.prompt_column=q", "data.answer_column=s", "data.tests_column=t"])
    with pytest.raises(DataError) as e:
        file_examples(rc.data)
    msg = str(e.value)
    assert "line 2" in msg and "line 3" in msg and "line 4" in msg and "line 1:" not in msg
    with pytest.raises(Exception, match="set data.tests_column"):
        load_recipe(None, ["stages=[base]", "data.source=file", f"data.path={tmp_path / 'c.jsonl'}",
                           "data.grader=code"])
