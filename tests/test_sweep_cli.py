"""`posttrain sweep` from the command line: end to end, on a data file, on Ray workers, bad options, and a run
trained on a data file (the rows it held out)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.eval.sweep import MODES, ROW_KEYS, grade_responses

def posttrain(*args, timeout=300):
    exe = Path(sys.executable).with_name("posttrain")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=dict(os.environ), timeout=timeout)


def test_sweep_command_end_to_end(tmp_path, tiny_model_dir):
    args = ["sweep", "--model", str(tiny_model_dir), "--n", "1", "--budgets", "0,4,auto", "--max-new-tokens", "6",
            "--threads", "1", "--backend", "local"]
    proc = posttrain(*args, "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "a"
    for name in ("sweep.json", "sweep.csv", "accuracy_vs_budget.png", "think_tokens_vs_budget.png",
                 "accuracy_vs_difficulty.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = json.loads((out / "sweep.json").read_text())
    # 3 budgets x 3 modes x (8 difficulties + "all")
    assert len(rows) == 3 * 3 * 9 and all(set(ROW_KEYS) <= set(r) for r in rows)
    assert {r["budget"] for r in rows} == {0, 4, "auto"} and {r["mode"] for r in rows} == set(MODES)
    assert {r["difficulty"] for r in rows} == set(range(1, 9)) | {"all"} and {r["model"] for r in rows} == {
        str(tiny_model_dir)}
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "accuracy [95% CI]" in proc.stdout and "auto" in proc.stdout
    # forced mode's paired comparison with capped: in the table printed and beside sweep.json
    forcing = json.loads((out / "forcing.json").read_text())
    assert {(r["budget"], r["subset"]) for r in forcing} == {(b, s) for b in (0, 4, "pooled") for s in ("all", "hard")}
    assert "capped - forced [95% CI]" in proc.stdout and "forcing.json" in proc.stdout
    again = posttrain(*args, "--workers", "2", "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "b" / "sweep.json").read_text() == (out / "sweep.json").read_text()


def test_math_grading_of_sweep_responses():
    """Data-file answers are graded by math equivalence of the text after </think>; the embedded grader is exact."""
    from posttrain.data import TextProblem
    from posttrain.generate import Response

    def resp(text, closed=True):
        return Response(text=text, ids=[], n_think=3, closed=closed, forced=False, budget=4)

    problems = [TextProblem("q", "\\frac{1}{2}", 1), TextProblem("q", "0.5", 2), TextProblem("q", "12", 1),
                TextProblem("q", "12", 1)]
    responses = [resp("a b</think>\n\n1/2"), resp("x</think>\n\n\\boxed{1/2}"), resp("x</think>\n\n13"),
                 resp("12", closed=False)]
    got = grade_responses(problems, responses, "math")
    assert [r.correct for r in got] == [True, True, False, False]  # no credit without </think>
    assert [r.difficulty for r in got] == [1, 2, 1, 1] and got[0].n_think == 3
    # the integer grader reads neither a fraction nor a decimal; the text grader only equal text
    assert [r.correct for r in grade_responses(problems, responses, "exact_int")] == [False, False, False, False]
    text = [TextProblem("q", "Paris", 1), TextProblem("q", "b", 1)]
    graded = grade_responses(text, [resp("x</think>\n\nparis."), resp("x</think>\n\n\\boxed{B}")], "exact")
    assert [r.correct for r in graded] == [True, True]


def test_sweep_command_on_a_data_file(tmp_path, tiny_model_dir):
    rows = [{"question": f"{i} apples and {i % 3} more?", "solution": f"so #### {i + i % 3}", "lvl": 1 + i % 3}
            for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["sweep", "--model", str(tiny_model_dir), "--n", "2", "--budgets", "0,4,auto", "--max-new-tokens", "6",
            "--threads", "1", "--backend", "local", "--data", str(tmp_path / "d.jsonl"), "--prompt-column", "question",
            "--answer-column", "solution", "--answer-delimiter", "####"]
    proc = posttrain(*args, "--difficulty-column", "lvl", "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert {r["difficulty"] for r in saved} == {1, 2, 3, "all"}  # the file's difficulties, 2 rows each
    assert all(r["n"] == (6 if r["difficulty"] == "all" else 2) for r in saved) and len(saved) == 3 * 3 * 4
    proc = posttrain(*args, "--out", str(tmp_path / "b"))  # no difficulty column: one group of the first 2 rows
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["difficulty"] for r in json.loads((tmp_path / "b" / "sweep.json").read_text())} == {0, "all"}
    for extra, shown in ((["--difficulties", "1-2"], "--difficulties selects embedded-task problems"),
                         (["--answer-column", "nope"], "nope"),
                         (["--max-prompt-chars", "10"], "over --max-prompt-chars=10 (pass --skip-bad-rows to skip")):
        proc = posttrain(*args, *extra, "--out", str(tmp_path / "c"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and shown in proc.stderr, proc.stderr[-2000:]
    proc = posttrain("sweep", "--model", str(tiny_model_dir), "--prompt-column", "q", "--out", str(tmp_path / "c"))
    assert proc.returncode == 2 and "--prompt-column describes a --data file" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "c").exists()


@pytest.mark.ray
def test_sweep_command_on_ray_workers(tmp_path, talkative_model_dir):
    """Two Ray actors (the command's default backend) give the same sweep as one worker in this process."""
    args = ["sweep", "--model", str(talkative_model_dir), "--n", "2", "--difficulties", "1,2", "--budgets", "0,3,auto",
            "--max-new-tokens", "6", "--batch-size", "2", "--threads", "2"]
    ray = posttrain(*args, "--workers", "2", "--out", str(tmp_path / "ray"))
    assert ray.returncode == 0, ray.stderr[-3000:]
    local = posttrain(*args, "--backend", "local", "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]
    assert (tmp_path / "ray" / "sweep.json").read_text() == (tmp_path / "local" / "sweep.json").read_text()


def test_sweep_command_bad_model_path(tmp_path):
    proc = posttrain("sweep", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--threads", "1")
    assert proc.returncode == 2 and "error:" in proc.stderr and "missing" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, shown", [
    (["--n", "0"], "--n must be an integer >= 1, got 0"),
    (["--difficulties", "3-1"], "--difficulties '3-1'"),
    (["--budgets", "8,²"], "--budgets '8,²'"),
    (["--device", "bogus"], "--device 'bogus'"),
    (["--modes", "natural,bogus"], "--modes 'natural,bogus': 'bogus' is not a mode"),
])
def test_sweep_command_bad_options_are_errors_not_tracebacks(tmp_path, tiny_model_dir, args, shown):
    proc = posttrain("sweep", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--threads", "1",
                     "--backend", "local", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: {shown}" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
def test_sweep_command_more_workers_than_cpus(tmp_path, tiny_model_dir):
    """More Ray workers than CPUs: the sweep says how many fit and which option to lower (not the recipe's RL keys)."""
    cpus = os.cpu_count()
    proc = posttrain("sweep", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--threads", "1",
                     "--workers", str(cpus + 1), "--n", "1", "--max-new-tokens", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: --workers {cpus + 1}:" in proc.stderr and f"at most {cpus} worker" in proc.stderr, proc.stderr
    assert "lower --workers" in proc.stderr and "ray.*.cpus" not in proc.stderr
    assert not (tmp_path / "o").exists()


def _file_run(tmp_path, model_dir, stages=("sft", "grpo")) -> Path:
    """A run directory trained on a data file, as `posttrain run` leaves it for the sweep: recipe.yaml and an SFT
    checkpoint (the tiny model)."""
    import shutil

    from posttrain.recipe import dump_recipe, load_recipe

    rows = [{"question": f"{i} apples and {i % 3} more?", "solution": f"so #### {i + i % 3}", "lvl": 1 + i % 3}
            for i in range(60)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    over = [f"model.path={model_dir}", "data.source=file", f"data.path={tmp_path / 'd.jsonl'}",
            "data.prompt_column=question", "data.answer_column=solution", "data.answer_delimiter=####",
            "data.difficulty_column=lvl", f"stages=[{','.join(stages)}]", "grpo.eval_budgets=[8]",
            "grpo.eval_n_per_difficulty=3", f"run_dir={run}"]
    cfg = load_recipe(None, over)
    run.mkdir()
    (run / "recipe.yaml").write_text(dump_recipe(cfg))
    shutil.copytree(model_dir, run / "sft" / "checkpoint")
    return run


def test_sweep_of_a_file_run_sweeps_exactly_the_rows_it_held_out(tmp_path, tiny_model_dir):
    from posttrain.recipe import load_recipe
    from posttrain.stages.rl_problems import ProblemSource

    run = _file_run(tmp_path, tiny_model_dir)
    rc = load_recipe(run / "recipe.yaml")
    source = ProblemSource(rc, rc.grpo)  # what the grpo stage itself trains on and holds out
    held = {p.expression for rows in source.task.stage_split(rc.grpo)[1].values() for p in rows}
    trained = {p.expression for p in source.train}
    assert held and not held & trained
    common = ["--n", "40", "--budgets", "0", "--max-new-tokens", "4", "--threads", "1", "--backend", "local"]
    for data in ([], ["--data", str(tmp_path / "d.jsonl")]):  # the run's own file, named or not
        out = tmp_path / f"out{len(data)}"
        proc = posttrain("sweep", "--model", str(run), *common, *data, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"the {len(held)} rows {run} held out" in proc.stderr
        saved = json.loads((out / "sweep.json").read_text())
        assert [r["n"] for r in saved if r["difficulty"] == "all"] == [len(held)] * 3  # natural, capped, forced
    # a file the run did not train on is swept as before (its first rows); a run that held nothing out is refused
    other = tmp_path / "other.jsonl"
    other.write_text((tmp_path / "d.jsonl").read_text())
    proc = posttrain("sweep", "--model", str(run), "--n", "2", *common[2:], "--data", str(other),
                     "--prompt-column", "question", "--answer-column", "solution", "--answer-delimiter", "####",
                     "--out", str(tmp_path / "o2"))
    assert proc.returncode == 0 and "held out" not in proc.stderr, proc.stderr[-3000:]
    (tmp_path / "s").mkdir()
    sft_only = _file_run(tmp_path / "s", tiny_model_dir, stages=("sft",))
    proc = posttrain("sweep", "--model", str(sft_only), *common, "--out", str(tmp_path / "o3"))
    assert proc.returncode == 2 and "trained on every row" in proc.stderr and "Traceback" not in proc.stderr
