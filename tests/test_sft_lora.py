"""LoRA SFT reaches the fused 3-D expert weights through PEFT `target_parameters`, and trains only the adapter."""

import json

import torch

from posttrain.recipe import load_recipe


def test_lora_sft_trains_expert_adapters(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.model import load_model
    from posttrain.pipeline import run_recipe

    cfg = load_recipe(None, [
        f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "stages=[sft]", "threads=2",
        "task.max_difficulty=2", "sft.steps=3", "sft.batch_size=4", "sft.n_examples=16", "sft.learning_rate=0.01",
        "sft.lora.enabled=true", "sft.lora.r=4",
    ])
    info = run_recipe(cfg)["sft"]
    adapter = tmp_path / "run" / "sft" / "adapter"
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(acfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    from safetensors.torch import load_file

    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    assert any("experts" in k and "lora" in k for k in keys) and any("q_proj.lora_A" in k for k in keys)
    # merged checkpoint differs from the base in expert weights (the adapter was trained and merged in)
    base, merged = load_model(tiny_model_dir), load_model(info["checkpoint"])
    b = dict(base.named_parameters())
    diff = {n: (p - b[n]).abs().max().item() for n, p in merged.named_parameters()}
    assert any(v > 0 for n, v in diff.items() if "experts.gate_up_proj" in n)
    assert all(v == 0 for n, v in diff.items() if "embed" in n or "norm" in n)  # only adapted matrices moved
