"""The `rm` stage and the GenRM verifier: AUC against a slow pairwise reference, the Yes/No example format, and a
tiny end-to-end stage run through the pipeline whose saved verifier the `genrm` reward loads and scores with."""

import json
import math
import pickle
import random

import pytest

from posttrain import verifier


def slow_auc(scores, labels):
    """P(pos > neg) + 0.5 P(tie) over every (positive, negative) pair: the definition, O(n^2)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_reference_with_ties():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(2, 40)
        levels = rng.choice([2, 3, 5, 1000])  # few levels: many ties
        scores = [rng.randrange(levels) / levels for _ in range(n)]
        labels = [rng.random() < 0.4 for _ in range(n)]
        if all(labels) or not any(labels):
            assert math.isnan(verifier.roc_auc(scores, labels))
            continue
        assert verifier.roc_auc(scores, labels) == pytest.approx(slow_auc(scores, labels), abs=1e-12), trial


def test_auc_edge_cases():
    assert verifier.roc_auc([0.1, 0.9], [0, 1]) == 1.0
    assert verifier.roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert verifier.roc_auc([0.3] * 5, [0, 1, 0, 1, 1]) == 0.5
    assert verifier.accuracy([0.5, 0.49, 0.9], [1, 0, 0]) == pytest.approx(2 / 3)


def test_yes_no_are_single_distinct_tokens(tokenizer):
    yes, no = verifier.answer_token_ids(tokenizer)
    assert yes != no
    assert tokenizer.convert_ids_to_tokens([yes, no]) == ["Yes", "No"]


@pytest.mark.parametrize("correct", [True, False])
def test_genrm_example_masks_exactly_the_answer_and_eos(tokenizer, correct):
    row = verifier.tokenize_example(tokenizer, "7+3*2", "7+3=10\n+3*2=20</think>\n\n20", correct)
    ids, mask = row["input_ids"], row["completion_mask"]
    assert len(ids) == len(mask) and mask[-2:] == [1, 1] and sum(mask) == 2
    assert tokenizer.decode(ids[-2:]) == ("Yes" if correct else "No") + tokenizer.eos_token
    prompt = tokenizer.decode(ids[:-2])
    # the chat template with thinking_budget=0: the answer comes right after an empty think block
    assert prompt.endswith("<|im_start|>assistant\n<think></think>\n\n")
    assert "Problem: 7+3*2\nResponse: 7+3=10\n+3*2=20</think>\n\n20\nIs the answer correct?" in prompt


TINY_RM = """\
run_dir: {run_dir}
seed: 0
threads: 2
stages: [rm]
model: {{path: {model}}}
task: {{min_difficulty: 1, max_difficulty: 2}}
rm: {{n_prompts: 16, samples_per_prompt: 2, budgets: [0, auto], max_new_tokens: 6, holdout_fraction: 0.5,
      label_reward: format, genrm: {{steps: 3, batch_size: 4}}, scalar: {{enabled: true, steps: 2, batch_size: 2}}}}
"""


@pytest.fixture(scope="module")
def tiny_rm_run(tmp_path_factory, tiny_model_dir):
    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe

    root = tmp_path_factory.mktemp("rm")
    recipe = root / "rm.yaml"
    recipe.write_text(TINY_RM.format(run_dir=root / "run", model=tiny_model_dir))
    results = run_recipe(load_recipe(recipe, []))
    return root / "run" / "rm", results["rm"]


def test_rm_stage_writes_reports_and_keeps_the_policy(tiny_rm_run):
    stage, info = tiny_rm_run
    assert "checkpoint" not in info  # the next stage's policy must stay the SFT model
    report = json.loads((stage / "rm_report.json").read_text())
    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == report["samples"] == 32
    # split by problem: no problem is in both splits
    splits = {}
    for s in samples:
        assert splits.setdefault(s["problem_id"], s["split"]) == s["split"]
    train = [s for s in samples if s["in_train"]]
    assert train and all(s["split"] == "train" for s in train)
    n_pos = sum(s["correct"] for s in train)
    assert n_pos == len(train) - n_pos  # balanced by downsampling (format: budget 0 is well formed, auto is not)
    holdout = [s for s in samples if s["split"] == "holdout"]
    assert 0 < sum(s["correct"] for s in holdout) < len(holdout)
    for key in ("genrm_auc", "genrm_accuracy", "scalar_auc", "scalar_pairwise_accuracy"):
        assert 0.0 <= info[key] <= 1.0, key
    assert info["genrm_auc"] == report["genrm"]["auc"]
    assert "genrm" in info["summary"] and "AUC" in info["summary"]
    for sub in ("genrm", "scalar"):
        assert (stage / sub / "model.safetensors").is_file() and (stage / sub / "tokenizer.json").is_file()
    metrics = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert any("rm/genrm/auc" in m for m in metrics) and any("genrm/train/loss" in m for m in metrics)


def test_genrm_reward_loads_the_verifier_and_matches_the_stage(tiny_rm_run):
    from posttrain.rewards import build_reward

    stage, info = tiny_rm_run
    holdout = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    holdout = [s for s in holdout if s["split"] == "holdout"]
    reward = build_reward("genrm", path=info["genrm"], batch_size=3)
    reward = pickle.loads(pickle.dumps(reward))  # picklable before loading (Ray)
    out = reward([s["problem"] for s in holdout], [s["response"] for s in holdout])
    assert all(0.0 <= p <= 1.0 for p in out.scores)
    # a different batch size (so different padding) gives the stage's own scores
    assert out.scores == pytest.approx([s["genrm_score"] for s in holdout], abs=1e-5)
    assert 0.0 <= out.metrics["p_yes"] <= 1.0
    assert pickle.loads(pickle.dumps(reward))._model is None  # and after: the loaded model is not shipped


def test_genrm_is_the_judge_of_a_gated_combination(tiny_rm_run):
    from posttrain.rewards.combine import CombinedReward, hero_gate

    stage, info = tiny_rm_run
    probs = ["1+2", "3*3"]
    comps = ["1+2=3</think>\n\n3", "3*3=9</think>\n\n8"]
    combined = CombinedReward([{"name": "exact_int"}, {"name": "genrm", "params": {"path": info["genrm"]}}],
                              mode="gated", verifier="exact_int", judge="genrm", beta=0.2)
    out = combined(probs, comps, answer=[3, 9])
    p_yes = verifier.score(*_load(info["genrm"]), probs, comps)
    assert out.scores == pytest.approx([hero_gate(1, p_yes[0], 0.2), hero_gate(0, p_yes[1], 0.2)], abs=1e-6)
    assert out.metrics["reward/genrm/errors"] == 0


def _load(path):
    from posttrain.model import load_model, load_tokenizer

    return load_model(path), load_tokenizer(path)


def test_within_group_auc_matches_pairwise_reference():
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(2, 30)
        scores = [rng.randrange(4) / 4 for _ in range(n)]
        labels = [rng.random() < 0.5 for _ in range(n)]
        groups = [rng.randrange(3) for _ in range(n)]
        pairs = [(scores[i], scores[j]) for i in range(n) for j in range(n)
                 if labels[i] and not labels[j] and groups[i] == groups[j]]
        got = verifier.within_group_auc(scores, labels, groups)
        if not pairs:
            assert math.isnan(got)
        else:
            want = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)
            assert got == pytest.approx(want, abs=1e-12)


def test_rm_stage_on_a_data_file_samples_rows_no_rl_stage_holds_out(tmp_path, tiny_model_dir):
    """With `data.source: file` the samples' problems are the file's rows, none of those grpo holds out for its
    evaluation, the rows sft does not train on first; they are labelled by math equivalence of text answers
    (`rm.label_reward` unset), and a file without enough rows is a DataError naming it."""
    from posttrain.data import DataError
    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe
    from posttrain.stages.rm import rm_problems
    from posttrain.tasks.task import build_task

    rows = [{"q": f"What is {i} halved?", "a": f"\\frac{{{i}}}{{2}}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ["data.source=file", f"data.path={tmp_path / 'd.jsonl'}", "data.prompt_column=q", "data.answer_column=a"]
    over = [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "threads=2", "stages=[rm,grpo]", *data,
            "task.max_difficulty=2", "grpo.eval_budgets=[4,auto]", "grpo.eval_n_per_difficulty=3",
            "sft.n_examples=20", "rm.n_prompts=12", "rm.samples_per_prompt=2", "rm.budgets=[0,auto]",
            "rm.max_new_tokens=6", "rm.holdout_fraction=0.5", "rm.genrm.steps=2", "rm.genrm.batch_size=4"]
    rc = load_recipe(None, over)
    held = {p.expression for p in build_task(rc).evaluation_rows()}
    problems = rm_problems(rc, seed=7)
    asked = [p.expression for p in problems]
    assert len(held) == 12 and len(set(asked)) == 12 and not set(asked) & held
    # 28 training rows: sft takes the first 20, so the 8 after them come first, then 4 of the 20
    train = [r["q"] for r in rows if r["q"] not in held]
    assert set(train[20:]) < set(asked) and len(set(asked) & set(train[:20])) == 4
    assert problems == rm_problems(rc, seed=7) and problems != rm_problems(rc, seed=8)
    # a prompt repeated in the file is asked once: the 6 prompts after sft's 20 rows come twice, so 6 of the 12
    # problems are those 6 (once each) and 6 are prompts sft trains on (none held out without an RL stage)
    (tmp_path / "twice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20] + rows[20:26] * 2))
    twice = [p.expression for p in rm_problems(load_recipe(None, [*over, "stages=[rm]",
                                                                  f"data.path={tmp_path / 'twice.jsonl'}"]), seed=7)]
    assert len(set(twice)) == 12 and set(r["q"] for r in rows[20:26]) < set(twice)
    (tmp_path / "same.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match="same.jsonl: rm needs at least 2 distinct prompts that no RL stage holds out"):
        rm_problems(load_recipe(None, [*over, "stages=[rm]", f"data.path={tmp_path / 'same.jsonl'}"]), seed=7)
    run_recipe(load_recipe(None, [*over, "stages=[rm]"]))  # nothing held out without an RL stage
    samples = [json.loads(line) for line in (tmp_path / "run" / "rm" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and {s["problem"] for s in samples} <= set(by_q := {r["q"]: r["a"] for r in rows})
    assert json.loads((tmp_path / "run" / "rm" / "rm_report.json").read_text())["label_reward"] == "math"
    for s in samples:  # a right answer written as 0.5 * i would be labelled correct: math equivalence, not strings
        assert s["answer"] == by_q[s["problem"]] and s["correct"] == (s["label_score"] >= 0.5)
    from posttrain.rewards import build_reward

    math = build_reward("math")
    assert math(["q"], ["x</think>\n\n1.5"], answer=["\\frac{3}{2}"]).scores[0] == 1.0
    (tmp_path / "tiny.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match=r"rm.label_reward: `exact_int` counts only 0 of 12 gold answers"):
        run_recipe(load_recipe(None, [*over, "stages=[rm]", "rm.label_reward=exact_int", f"run_dir={tmp_path / 'r3'}"]))
    assert not (tmp_path / "r3" / "rm" / "samples.jsonl").exists()
    report = json.loads((tmp_path / "run" / "rm" / "rm_report.json").read_text())
    assert report["genrm"]["difficulty_baseline_auc"] is None  # no difficulty column: nothing to compare with
    with pytest.raises(DataError, match="tiny.jsonl: rm needs at least 2 distinct prompts"):
        run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'run2'}", f"model.path={tiny_model_dir}", "threads=2",
                                      "stages=[rm]", "data.source=file", f"data.path={tmp_path / 'tiny.jsonl'}",
                                      "data.prompt_column=q", "data.answer_column=a"]))
