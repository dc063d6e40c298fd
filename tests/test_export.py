"""`posttrain export` produces adapters that plain transformers + PEFT load. This file deliberately imports
neither posttrain nor its helpers: the export is checked the way a user would consume it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

TINY = """\
run_dir: {run_dir}
seed: 0
threads: 2
stages: [base, sft]
task: {{min_difficulty: 1, max_difficulty: 2}}
base: {{hidden_size: 32, num_layers: 1, num_experts: 4, top_k: 2, moe_intermediate_size: 32, num_heads: 2,
        steps: 3, batch_size: 4, seq_len: 32}}
sft: {{steps: 3, batch_size: 4, n_examples: 16, learning_rate: 0.01, lora: {{enabled: {lora}, r: 4}}}}
"""


def cli(*args, env):
    exe = Path(sys.executable).with_name("posttrain")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    env = {**os.environ, "POSTTRAIN_CACHE": str(root / "cache")}
    out = {}
    for kind, lora in (("lora", "true"), ("full", "false")):
        recipe = root / f"{kind}.yaml"
        recipe.write_text(TINY.format(run_dir=root / kind, lora=lora))
        cli("run", str(recipe), env=env)
        out[kind] = root / kind
    return root, env, out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_run_exports_its_trained_adapter(runs):
    root, env, run = runs
    out = root / "lora_export"
    cli("export", "--model", str(run["lora"]), "--out", str(out), env=env)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (out / "adapter_model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    adapted = PeftModel.from_pretrained(base, out).eval()
    trained = AutoModelForCausalLM.from_pretrained(run["lora"] / "sft" / "checkpoint").eval()  # merged at the end
    ids = torch.randint(0, 400, (2, 12))
    torch.testing.assert_close(logits(adapted, ids), logits(trained, ids), rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+3"}], add_generation_prompt=True,
                                     tokenize=False, thinking_budget=16)
    assert "Thinking budget: 16 tokens." in prompt


def test_full_finetune_adapter_is_extracted_by_svd(runs):
    root, env, run = runs
    out = root / "full_export"
    proc = cli("export", "--model", str(run["full"]), "--out", str(out), "--rank", "64", env=env)
    report = json.loads((out / "export.json").read_text())
    assert "max relative Frobenius error" in proc.stdout
    assert report["max_relative_frobenius_error"] < 1e-5  # rank 64 >= every matrix's rank here: exact
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "mlp.experts.gate_up_proj" in cfg["target_parameters"]
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    tuned = AutoModelForCausalLM.from_pretrained(run["full"] / "sft" / "checkpoint")
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    tuned_params = dict(tuned.named_parameters())
    for name, p in merged.named_parameters():  # every adapted matrix, fused experts included, is reproduced
        if any(t in name for t in ("experts.gate_up_proj", "experts.down_proj", "q_proj", "o_proj", "mlp.gate")):
            torch.testing.assert_close(p, tuned_params[name], rtol=1e-4, atol=1e-5)
    # norms and the (tied) embedding are not low-rank targets: by default the adapter stores them whole (full SFT
    # changed every norm and every row), each norm under a name PEFT matches to changed norms only (`norm`: all of
    # them changed); base + adapter is then the tuned model itself
    assert report["uncovered_changed_params"] == {} and "not carried" not in proc.stdout
    assert report["modules_to_save"] == ["embed_tokens", "norm"]
    ids = torch.randint(0, 400, (2, 12))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), out)
    torch.testing.assert_close(logits(adapted.eval(), ids), logits(tuned.eval(), ids), rtol=1e-4, atol=1e-4)
    # an explicit --modules-to-save is used as given
    whole = root / "full_export_whole"
    proc = cli("export", "--model", str(run["full"]), "--out", str(whole), "--rank", "64",
               "--modules-to-save", "norm,embed_tokens", env=env)
    assert "not carried" not in proc.stdout
    report = json.loads((whole / "export.json").read_text())
    assert report["uncovered_changed_params"] == {} and report["modules_to_save"] == ["norm", "embed_tokens"]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), whole)
    torch.testing.assert_close(logits(adapted.eval(), ids), logits(tuned, ids), rtol=1e-4, atol=1e-4)
    # and a low-rank export reports the larger error it makes (written, over export.max_kl, with --allow-lossy)
    low = root / "full_export_r1"
    cli("export", "--model", str(run["full"]), "--out", str(low), "--rank", "1", "--allow-lossy", env=env)
    assert json.loads((low / "export.json").read_text())["max_relative_frobenius_error"] > 1e-3


def test_an_export_beside_a_checkpoint_is_not_taken_for_its_trained_adapter(runs):
    """LoRA training saves its adapter as <stage>/adapter (and records it in the stage's done.json); an export
    written to that place for a full fine-tune is output: exporting the checkpoint again extracts an adapter from
    it rather than re-ship the earlier export."""
    import shutil

    root, env, run = runs
    ckpt = run["full"] / "sft" / "checkpoint"
    beside = ckpt.parent / "adapter"
    try:
        cli("export", "--model", str(ckpt), "--out", str(beside), "--rank", "64", env=env)
        again = root / "full_again"
        cli("export", "--model", str(ckpt), "--out", str(again), "--rank", "64", env=env)
        report = json.loads((again / "export.json").read_text())
        assert report["kind"] == "lora (extracted by SVD)" and report["source"] == str(ckpt)
    finally:
        shutil.rmtree(beside, ignore_errors=True)


def test_merged_export_is_a_plain_checkpoint(runs):
    root, env, run = runs
    out = root / "merged"
    cli("export", "--model", str(run["full"]), "--out", str(out), "--merged", env=env)
    model = AutoModelForCausalLM.from_pretrained(out)
    tuned = AutoModelForCausalLM.from_pretrained(run["full"] / "sft" / "checkpoint")
    ids = torch.randint(0, 400, (1, 8))
    torch.testing.assert_close(logits(model, ids), logits(tuned, ids))


def cli_error(*args, env):
    exe = Path(sys.executable).with_name("posttrain")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_export_never_deletes_a_directory_it_did_not_write(runs):
    root, env, run = runs
    mine = root / "notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    err = cli_error("export", "--model", str(run["full"]), "--out", str(mine), env=env)
    assert str(mine) in err and "not an earlier export" in err
    assert (mine / "notes.txt").read_text() == "important"
    err = cli_error("export", "--model", str(run["full"]), "--out", str(run["full"]), "--merged", env=env)
    assert (run["full"] / "sft" / "checkpoint" / "config.json").is_file() and (run["full"] / "recipe.yaml").is_file()
    # an earlier export is replaced, as the export stage re-run does
    out = root / "again"
    cli("export", "--model", str(run["full"]), "--out", str(out), "--rank", "2", env=env)
    cli("export", "--model", str(run["full"]), "--out", str(out), "--rank", "4", env=env)
    assert json.loads((out / "export.json").read_text())["rank"] == 4
    assert not any(p.name.endswith((".tmp", ".old")) for p in root.iterdir())


def test_export_rejects_bad_options_by_name(runs):
    root, env, run = runs
    err = cli_error("export", "--model", str(run["full"]), "--out", str(root / "x1"), "--modules-to-save",
                    "norm,bogus", env=env)
    assert "'bogus'" in err and "embed_tokens" in err and not (root / "x1").exists()
    err = cli_error("export", "--model", str(run["full"]), "--out", str(root / "x2"), "--rank", "0", env=env)
    assert "--rank 0" in err
    err = cli_error("export", "--model", str(run["full"]), "--out", str(root / "x3"), "--base", str(root / "nope"),
                    env=env)
    assert f"--base {root / 'nope'}" in err
    # a rank above every target matrix's is lowered to the largest that means anything (hidden 32 here)
    cli("export", "--model", str(run["full"]), "--out", str(root / "x4"), "--rank", "300",
        "--modules-to-save", " norm , embed_tokens", env=env)
    report = json.loads((root / "x4" / "export.json").read_text())
    assert report["rank"] == 32 and report["rank_requested"] == 300 and report["modules_to_save"] == ["norm",
                                                                                                        "embed_tokens"]


def test_reshipping_an_adapter_keeps_a_hub_base_and_needs_its_tokenizer(runs):
    import shutil

    root, env, run = runs
    first = root / "first"
    cli("export", "--model", str(run["lora"]), "--out", str(first), env=env)
    hub = root / "hub_adapter"
    shutil.copytree(first, hub)
    cfg = json.loads((hub / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "Org/Some-MoE"}))
    cli("export", "--model", str(hub), "--out", str(root / "again_hub"), env=env)
    assert json.loads((root / "again_hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == "Org/Some-MoE"
    bare = root / "bare_adapter"
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(first / f, bare / f)
    err = cli_error("export", "--model", str(bare), "--out", str(root / "again_bare"), env=env)
    assert "no tokenizer there to ship beside the adapter" in err and not (root / "again_bare").exists()
