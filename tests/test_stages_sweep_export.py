"""The `sweep` and `export` stages at the end of a tiny recipe (base -> LoRA sft -> sweep -> export), run by the
`posttrain` command; the exported adapter is loaded by a process that imports only transformers and peft."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = """\
run_dir: {run_dir}
seed: 0
threads: 1
stages: [base, sft, sweep, export]
task: {{min_difficulty: 1, max_difficulty: 2}}
base: {{hidden_size: 32, num_layers: 1, num_experts: 4, top_k: 2, moe_intermediate_size: 32, num_heads: 2,
        steps: 3, batch_size: 4, seq_len: 32}}
sft: {{steps: 2, batch_size: 4, n_examples: 16, lora: {{enabled: true, r: 4}}}}
sweep: {{n_per_difficulty: 2, budgets: [0, 4, auto], max_new_tokens: 8, workers: 2, backend: local}}
export: {{rank: 4}}
"""

# Runs in a fresh interpreter: a user's view of the export, with nothing of posttrain imported.
LOAD_ADAPTER = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
adapter, trained = sys.argv[1], sys.argv[2]
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
ref = AutoModelForCausalLM.from_pretrained(trained).eval()
tok = AutoTokenizer.from_pretrained(adapter)
ids = tok.apply_chat_template([{"role": "user", "content": "2+3"}], add_generation_prompt=True,
                              thinking_budget=4, return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
assert not any(m == "posttrain" or m.startswith("posttrain.") for m in sys.modules)
print("logits equal")
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY.format(run_dir=root / "run"))
    env = {**os.environ, "POSTTRAIN_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).with_name("posttrain")
    proc = subprocess.run([str(exe), "run", str(recipe)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", proc


def test_sweep_stage_writes_outputs_and_summary(run):
    run_dir, proc = run
    out = run_dir / "sweep"
    for name in ("sweep.json", "sweep.csv", "table.txt", "accuracy_vs_budget.png", "think_tokens_vs_budget.png",
                 "accuracy_vs_difficulty.png"):
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "sweep.json").read_text())
    assert {r["model"] for r in rows} == {"sft"}  # by default the recipe's model-producing stages, by name
    assert len(rows) == 3 * 3 * 3  # budgets x modes (natural, capped, forced) x (2 difficulties + all)
    done = json.loads((out / "done.json").read_text())
    assert done["produces_model"] is False and "checkpoint" not in done
    assert done["models"] == {"sft": str(run_dir / "sft" / "checkpoint")}
    assert len(done["summary"]) == 3 * 3 and {"accuracy", "think_tokens_mean", "adherence"} <= set(done["summary"][0])
    # capped against forced at budgets 0 and 4, pooled over 4, overall and on the hard half (difficulty >= 1.5)
    forcing = json.loads((out / "forcing.json").read_text())
    assert forcing == done["forcing"] and {(r["budget"], r["subset"]) for r in forcing} == {
        (b, s) for b in (0, 4, "pooled") for s in ("all", "hard")}
    assert all(r["model"] == "sft" and r["hard_from"] == 1.5 for r in forcing)
    assert "capped - forced [95% CI]" in proc.stdout and "capped - forced" in (out / "table.txt").read_text()
    assert "accuracy [95% CI]" in proc.stdout and "accuracy [95% CI]" in (run_dir / "run.log").read_text()


def test_export_stage_adapter_loads_with_plain_peft(run):
    run_dir, _ = run
    adapter = run_dir / "export" / "adapter"
    done = json.loads((run_dir / "export" / "done.json").read_text())
    assert done["kind"] == "lora (trained)" and done["adapter"] == str(adapter) and done["produces_model"] is False
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "chat_template.jinja").is_file()
    proc = subprocess.run([sys.executable, "-c", LOAD_ADAPTER, str(adapter), str(run_dir / "sft" / "checkpoint")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0 and "logits equal" in proc.stdout, proc.stderr[-3000:]


def test_sweep_models_must_name_a_stage_or_a_directory(tmp_path):
    from posttrain.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.format(run_dir=tmp_path / "run"))
    with pytest.raises(RecipeError, match="sweep.models.*'grpo'"):
        load_recipe(recipe, ["sweep.models=[sft,grpo]"])
    assert load_recipe(recipe, ["sweep.models=[sft]"]).sweep.models == ["sft"]


def test_a_run_resumed_from_another_directory_finds_its_checkpoints(run, tmp_path):
    """done.json keeps the checkpoint path as the run wrote it (relative when the run directory was); a resume
    started elsewhere must use the stage folders under its run directory, not those paths."""
    import shutil

    run_dir, _ = run
    moved = tmp_path / "moved" / "run"
    shutil.copytree(run_dir, moved)
    for done in moved.glob("*/done.json"):  # as if the run had begun as `run_dir: run` in another directory
        info = json.loads(done.read_text())
        if "checkpoint" in info:
            info["checkpoint"] = f"run/{done.parent.name}/checkpoint"
            done.write_text(json.dumps(info))
    for stage in ("sft", "sweep"):  # both run again: sft from the base's checkpoint, sweep on sft's
        (moved / stage / "done.json").unlink()
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.format(run_dir=moved))
    env = {**os.environ, "POSTTRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).with_name("posttrain")
    proc = subprocess.run([str(exe), "run", str(recipe), "stages=[base,sft,sweep]"], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage base already finished" in proc.stderr and "stage sft finished" in proc.stderr
    done = json.loads((moved / "sweep" / "done.json").read_text())
    assert done["models"] == {"sft": str(moved / "sft" / "checkpoint")}


def test_export_of_a_run_takes_its_latest_model(run, tmp_path):
    """`posttrain export --model RUN` ships the last stage of the recipe that finished with a model (as the export
    stage and `posttrain sweep` do), from the run's own folders; an adapter directory is re-shipped as it is."""
    import shutil

    import yaml

    from posttrain.export import ExportError, resolve_run

    run_dir, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.copytree(copy / "sft" / "checkpoint", copy / "grpo" / "checkpoint")
    (copy / "grpo" / "done.json").write_text(json.dumps({"stage": "grpo", "checkpoint": "elsewhere/grpo/checkpoint",
                                                         "finished": 2e9}))
    assert resolve_run(copy) == (copy / "grpo" / "checkpoint", copy / "base" / "checkpoint", None)
    # whatever the recipe.yaml of the latest invocation lists (a rerun of `stages=[base, sft]` rewrites it)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["stages"] = ["base", "sft"]
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert resolve_run(copy)[0] == copy / "grpo" / "checkpoint"
    sft = copy / "sft" / "checkpoint"  # a LoRA stage: its trained adapter
    assert resolve_run(sft) == (sft, copy / "base" / "checkpoint", copy / "sft" / "adapter")
    adapter = copy / "export" / "adapter"
    ckpt, base, found = resolve_run(adapter)
    assert ckpt == found == adapter and (base / "config.json").is_file()
    # only LoRA training's own adapter counts: an export written beside a checkpoint is output (export.json)...
    loose = tmp_path / "loose"
    shutil.copytree(sft, loose / "checkpoint")
    shutil.copytree(adapter, loose / "adapter")
    assert resolve_run(loose / "checkpoint") == (loose / "checkpoint", None, None)
    shutil.rmtree(loose / "adapter")
    shutil.copytree(copy / "sft" / "adapter", loose / "adapter")  # the trained adapter, copied with its checkpoint
    assert resolve_run(loose / "checkpoint")[2] == loose / "adapter"
    # ...and a stage that records no adapter (trained in full) has none, whatever its `adapter` folder holds
    done = json.loads((copy / "sft" / "done.json").read_text())
    (copy / "sft" / "done.json").write_text(json.dumps({k: v for k, v in done.items() if k != "adapter"}))
    assert resolve_run(sft) == (sft, copy / "base" / "checkpoint", None)
    (copy / "grpo" / "done.json").unlink()
    (copy / "sft" / "done.json").unlink()
    with pytest.raises(ExportError, match="no finished stage with a trained checkpoint"):
        resolve_run(copy)
    with pytest.raises(ExportError, match="neither a run directory"):
        resolve_run(copy / "sweep")
