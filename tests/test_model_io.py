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


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "olmoe"])
def test_other_moe_families_load_through_the_same_path(arch, tmp_path, tokenizer):
    """Any local HF MoE checkpoint loads with load_model (tiny random ones stand in for real checkpoints)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, num_experts_per_tok=2, pad_token_id=0)
    extra = {"qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32),
             "mixtral": dict(num_local_experts=4),
             "olmoe": dict(num_experts=4)}[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **common, **extra))
    path = save_model(model, tokenizer, tmp_path / arch)
    loaded = load_model(path, require_moe=True)
    assert loaded.config.model_type == arch and loaded.config.output_router_logits is False
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="not a Mixture-of-Experts"):
        dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **{k: v for k, v in common.items()
                                                                                  if k != "num_experts_per_tok"}))
        load_model(save_model(dense, tokenizer, tmp_path / "dense"), require_moe=True)


def test_allow_pickle_reaches_every_rl_worker(tiny_model_dir, tmp_path):
    """`model.allow_pickle: true` must reach the RL stage's workers (they load `model.path` themselves when no sft
    stage precedes them); without it each refuses the pickled checkpoint, naming the setting."""
    import shutil

    from transformers import AutoModelForCausalLM

    from posttrain.workers.learner import CriticWorker, LearnerWorker, ReferenceWorker
    from posttrain.workers.rollout import RolloutWorker

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "manifest.json").unlink(missing_ok=True)
    assert (pickled / "pytorch_model.bin").is_file()
    allow = {"allow_pickle": True}
    for make in (lambda o: RolloutWorker(str(pickled), load_options=o), lambda o: LearnerWorker(str(pickled), load_options=o),
                 lambda o: ReferenceWorker(str(pickled), load_options=o), lambda o: CriticWorker(str(pickled), load_options=o)):
        with pytest.raises(CheckpointError, match="allow_pickle"):
            make(None)
        make(allow)
