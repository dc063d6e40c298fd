"""Smoke tests of the `posttrain` command end to end on a very small recipe (seconds, real model and trainer)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = """\
run_dir: {run_dir}
seed: 0
threads: 2
stages: [base, sft, eval]
task: {{min_difficulty: 1, max_difficulty: 2}}
base: {{hidden_size: 32, num_layers: 1, num_experts: 4, top_k: 2, moe_intermediate_size: 32, num_heads: 2,
        steps: 3, batch_size: 4, seq_len: 32}}
sft: {{steps: 2, batch_size: 4, n_examples: 16, logging_steps: 1}}
eval: {{n_per_difficulty: 2, budgets: [0, 8, auto], max_new_tokens: 8}}
"""


def posttrain(*args, cache, timeout=300):
    env = {**os.environ, "POSTTRAIN_CACHE": str(cache)}
    exe = Path(sys.executable).with_name("posttrain")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY.format(run_dir=root / "run"))
    proc = posttrain("run", str(recipe), cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, recipe, proc


def test_run_writes_every_stage(tiny_run):
    root, _, proc = tiny_run
    run = root / "run"
    assert (run / "recipe.yaml").is_file() and (run / "run.log").is_file()
    for stage in ("base", "sft"):
        ckpt = run / stage / "checkpoint"
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
        assert json.loads((run / stage / "done.json").read_text())["checkpoint"] == str(ckpt)
    sft_metrics = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in m for m in sft_metrics)
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "sft" / "tb").iterdir())
    rows = json.loads((run / "eval" / "eval.json").read_text())
    assert {r["budget"] for r in rows} == {"0", "8", "auto"} and {r["difficulty"] for r in rows} == {1, 2, "all"}
    assert f"run directory: {run}" in proc.stdout and "budget 0" in proc.stdout and "budget auto" in proc.stdout


def test_rerun_resumes_and_skips_finished_stages(tiny_run):
    root, recipe, _ = tiny_run
    before = (root / "run" / "sft" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    proc = posttrain("run", str(recipe), cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("already finished") == 3 and "nothing to do" in proc.stderr
    assert (root / "run" / "sft" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == before


def test_base_model_is_cached_by_settings(tiny_run):
    root, recipe, _ = tiny_run
    proc = posttrain("run", str(recipe), f"run_dir={root / 'run2'}", "stages=[base]", cache=root / "cache")
    assert proc.returncode == 0 and "reusing cached model" in proc.stderr


def test_bad_recipe_fails_before_work_with_one_message(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\nsft:\n  stpes: 3\n")
    proc = posttrain("run", str(recipe), cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert "sft.stpes: unknown key; did you mean 'sft.steps'?" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_schema_lists_documented_keys(tmp_path):
    proc = posttrain("schema", cache=tmp_path)
    assert proc.returncode == 0 and "learning_rate" in proc.stdout and "target_parameters" in proc.stdout
    # defaults are spelled as a recipe spells them, so a value copied from here validates
    assert "  address: null  #" in proc.stdout and "dual_clip_c: null" in proc.stdout and "None" not in proc.stdout
    assert "rewards: [{name: " in proc.stdout and "GRPORewardConfig" not in proc.stdout


def test_rerun_with_changed_settings_of_a_finished_stage_stops_and_names_them(tiny_run, tmp_path):
    import shutil

    root, recipe, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(root / "run", copy)
    recorded = (copy / "recipe.yaml").read_text()
    # overrides may come after --run-dir too
    proc = posttrain("run", str(recipe), "--run-dir", str(copy), "sft.steps=50", "eval.max_new_tokens=9",
                     cache=root / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "stage sft finished with other settings" in proc.stderr and "sft.steps: 2 -> 50" in proc.stderr
    assert (copy / "recipe.yaml").read_text() == recorded
    # what does not change a result (where the base is cached) is not a change; the stage list may grow
    proc = posttrain("run", str(recipe), "--run-dir", str(copy), f"base.cache_dir={tmp_path / 'elsewhere'}",
                     "stages=[base,sft]", cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the closing summary names this run directory's folders, not the paths the copied run recorded
    assert f"sft    {copy / 'sft' / 'checkpoint'}" in proc.stdout and str(root / "run") not in proc.stdout
    # a run of other stages records the new value in recipe.yaml; the finished stage still knows its own settings
    proc = posttrain("run", str(recipe), "--run-dir", str(copy), "stages=[base]", "sft.steps=50",
                     "model.experts_implementation=eager", cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = posttrain("run", str(recipe), "--run-dir", str(copy), "sft.steps=50", cache=root / "cache")
    assert proc.returncode == 2 and "sft.steps: 2 -> 50" in proc.stderr, proc.stderr[-2000:]


def test_bad_override_values_are_one_line_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\n")
    for override, message in (("sft.budgets=[1,2", "override 'sft.budgets=[1,2': the value '[1,2' is not valid YAML"),
                              ("ray.address=None", "ray.address: 'None' is not a Ray address")):
        proc = posttrain("run", str(recipe), override, cache=tmp_path / "cache")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
