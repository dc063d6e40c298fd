"""Saving and loading checkpoints: the same path for the embedded model and any local HF checkpoint."""

import json

import pytest
import torch

from posttrain.model import CheckpointError, check_checkpoint_dir, load_model, load_tokenizer, save_model


def test_saved_checkpoint_loads_back_identically(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert not any(f.endswith(".bin") for f in files)
    model = load_model(tiny_model_dir)
    again = load_model(tiny_model_dir, experts_implementation="eager")
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 4
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        a, b = model(input_ids=x).logits, again(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # grouped_mm and eager experts agree


def test_save_is_atomic_and_replaces(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    out = save_model(model, tok, tmp_path / "ckpt")
    save_model(model, tok, out)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp/.old left behind
    assert check_checkpoint_dir(out) == out


def test_pickle_only_checkpoint_is_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(bad)
    assert check_checkpoint_dir(bad, allow_pickle=True) == bad


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        check_checkpoint_dir(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        check_checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(CheckpointError, match="no weights"):
        check_checkpoint_dir(tmp_path)


def test_moe_required(tiny_model_dir):
    model = load_model(tiny_model_dir, require_moe=True)
    assert any("experts.gate_up_proj" in n for n, _ in model.named_parameters())
