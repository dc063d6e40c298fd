"""`posttrain prepare`: a checkpoint whose template takes no budget, or whose tokenizer has no think tokens, becomes
one the stages accept, with the original weights unchanged."""

import json
import shutil

import pytest
import torch

from posttrain.model import CheckpointError, check_chat_template, load_model, load_tokenizer, save_model


def _files(d):
    from posttrain.model import _sha256

    return {f.name: _sha256(f) for f in sorted(d.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory, foreign_tokenizer):
    """A tiny MoE whose tokenizer has no think or ChatML tokens and a template of its own, with two spare
    embedding rows (as checkpoints pad their vocabulary)."""
    from transformers import AutoModelForCausalLM

    from posttrain.model import tiny_moe_config

    fast = foreign_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_moe_config(len(fast) + 2, fast.pad_token_id, fast.eos_token_id, hidden_size=32, num_hidden_layers=2,
                          num_experts=4, moe_intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, tie_word_embeddings=False)
    return save_model(AutoModelForCausalLM.from_config(cfg), fast, tmp_path_factory.mktemp("foreign") / "model")


def test_prepare_adds_tokens_and_template_keeping_the_model_and_the_source(foreign_dir, tmp_path):
    from posttrain.prepare import prepare_checkpoint

    with pytest.raises(CheckpointError, match=r"posttrain prepare .* --out DIR"):
        check_chat_template(load_tokenizer(foreign_dir), foreign_dir)
    before = _files(foreign_dir)
    src_tok, src = load_tokenizer(foreign_dir), load_model(foreign_dir)
    n_old, rows = len(src_tok), src.get_input_embeddings().weight.shape[0]
    report = prepare_checkpoint(foreign_dir, tmp_path / "out")
    assert _files(foreign_dir) == before  # the source is untouched
    assert report["added_tokens"] == ["<think>", "</think>", "<|im_start|>", "<|im_end|>"]
    assert json.loads((tmp_path / "out" / "prepare.json").read_text()) == report
    tok, model = load_tokenizer(tmp_path / "out"), load_model(tmp_path / "out")  # the manifest verifies
    check_chat_template(tok, "prepared")
    assert report["embedding_rows"] == [rows, n_old + 4]  # two new ids fill the spare rows, two grow the matrix
    ids = sorted(report["added_token_ids"].values())
    assert ids == list(range(n_old, n_old + 4))
    for new, old in ((model.get_input_embeddings(), src.get_input_embeddings()),
                     (model.get_output_embeddings(), src.get_output_embeddings())):
        torch.testing.assert_close(new.weight[:n_old], old.weight[:n_old], rtol=0, atol=0)
        mean = torch.stack([old.weight[i] for i in range(n_old)]).mean(0)  # spare rows not in the mean
        for i in ids:
            torch.testing.assert_close(new.weight[i], mean)
    x = torch.tensor([src_tok("1+2*3 = 9", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():  # the same function on the old vocabulary
        torch.testing.assert_close(model(x).logits[..., :n_old], src(x).logits[..., :n_old])
    text = tok.apply_chat_template([{"role": "user", "content": "1+2"}], add_generation_prompt=True, tokenize=False,
                                   thinking_budget=16)
    assert "Thinking budget: 16 tokens." in text and text.endswith("<think>")
    assert tok("<think>1</think>", add_special_tokens=False)["input_ids"][0] == report["added_token_ids"]["<think>"]


def test_prepared_checkpoint_runs_the_sft_and_grpo_stages(foreign_dir, tmp_path):
    from posttrain.pipeline import run_recipe
    from posttrain.prepare import prepare_checkpoint
    from posttrain.recipe import load_recipe

    overrides = [f"run_dir={tmp_path / 'run'}", "stages=[sft]", "sft.steps=2", "sft.n_examples=64",
                 "sft.batch_size=8", "threads=1"]
    with pytest.raises(CheckpointError, match="does not write `thinking_budget`"):
        run_recipe(load_recipe(None, overrides + [f"model.path={foreign_dir}"]))
    prepare_checkpoint(foreign_dir, tmp_path / "ready")
    rl = ["grpo.steps=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=6", "grpo.budgets=[0,4,auto]",
          "grpo.eval_budgets=[4,auto]", "grpo.eval_n_per_difficulty=1", "grpo.eval_max_new_tokens=6",
          "ray.backend=local", "grpo.process_penalty=0", "grpo.ptx_coef=0"]
    out = run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'run2'}", *overrides[1:], "stages=[sft,grpo]", *rl,
                                        f"model.path={tmp_path / 'ready'}"]))
    assert (tmp_path / "run2" / "grpo" / "done.json").is_file() and set(out) == {"sft", "grpo"}


def test_prepare_with_think_tokens_changes_only_the_template(tiny_model_dir, tmp_path):
    from posttrain.prepare import prepare_checkpoint

    assert prepare_checkpoint(tiny_model_dir, tmp_path / "none") is None  # already ready: nothing written
    assert not (tmp_path / "none").exists()
    src = tmp_path / "qwen3like"
    shutil.copytree(tiny_model_dir, src)
    tok = load_tokenizer(src)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    save_model(load_model(src), tok, src)
    report = prepare_checkpoint(src, tmp_path / "out")
    assert report["added_tokens"] == [] and "embedding_rows" not in report
    weights = {k: v for k, v in _files(src).items() if k.endswith(".safetensors")}
    assert weights and all(_files(tmp_path / "out")[k] == v for k, v in weights.items())  # copied byte for byte
    check_chat_template(load_tokenizer(tmp_path / "out"), "prepared")
    load_model(tmp_path / "out")  # the manifest verifies


def test_prepare_refuses_an_output_it_would_overwrite(foreign_dir, tmp_path):
    from posttrain.cli import main
    from posttrain.prepare import prepare_checkpoint

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="mine: exists, is not empty and is not an earlier"):
        prepare_checkpoint(foreign_dir, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(CheckpointError, match="is, holds or lies inside the source checkpoint"):
        prepare_checkpoint(foreign_dir, foreign_dir)
    assert main(["prepare", str(foreign_dir), "--out", str(tmp_path / "a")]) == 0
    assert main(["prepare", str(foreign_dir), "--out", str(tmp_path / "a")]) == 0  # an earlier output: replaced
    assert main(["prepare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2


def test_lora_sft_on_a_checkpoint_with_added_tokens_is_refused(foreign_dir, tmp_path):
    """LoRA freezes the embeddings, so the rows `prepare` added would stay at their mean: a full SFT is asked for."""
    from posttrain.pipeline import run_recipe
    from posttrain.prepare import prepare_checkpoint
    from posttrain.recipe import RecipeError, load_recipe

    prepare_checkpoint(foreign_dir, tmp_path / "ready")
    with pytest.raises(RecipeError, match=r"sft.lora.enabled: .*ready has tokens `posttrain prepare` added \(<think>"):
        run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'run'}", "stages=[sft]", "sft.steps=1", "threads=1",
                                      "sft.lora.enabled=true", f"model.path={tmp_path / 'ready'}"]))
    assert not (tmp_path / "run" / "sft" / "checkpoint").exists()
    with pytest.raises(RecipeError, match=r"grpo.lora.enabled: .*modules_to_save.*run a full `sft` stage first"):
        run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'run'}", "stages=[grpo]", "threads=1", "ray.backend=local",
                                      "grpo.lora.enabled=true", f"model.path={tmp_path / 'ready'}"]))


def test_lora_with_the_embedding_and_head_trained_whole_learns_the_added_tokens(foreign_dir, tmp_path):
    """`sft.lora.modules_to_save: [embed_tokens, lm_head]` (what the refusal asks for on this untied model) trains
    the rows `prepare` added: after LoRA SFT the merged checkpoint's rows for `<think>` and `</think>` have moved, in
    the embedding and in the head. A GRPO stage with LoRA and the same modules then runs on that checkpoint's
    input (the learner's whole-module copies reach the rollout worker by name), and a module name the model lacks
    is refused naming the key."""
    from posttrain.pipeline import run_recipe
    from posttrain.prepare import embedding_module_names, prepare_checkpoint
    from posttrain.recipe import RecipeError, load_recipe

    ready = tmp_path / "ready"
    prepare_checkpoint(foreign_dir, ready)
    assert embedding_module_names(ready) == ["embed_tokens", "lm_head"]  # untied
    lora = ["sft.lora.enabled=true", "sft.lora.target_modules=[q_proj,v_proj]"]
    with pytest.raises(RecipeError, match=r"add sft.lora.modules_to_save: \[embed_tokens, lm_head\]"):
        run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'r0'}", "stages=[sft]", "threads=1", *lora,
                                      "sft.lora.modules_to_save=[embed_tokens]", f"model.path={ready}"]))
    run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'run'}", "stages=[sft]", "sft.steps=3", "sft.n_examples=64",
                                  "sft.batch_size=8", "sft.learning_rate=0.01", "threads=1", *lora,
                                  "sft.lora.modules_to_save=[embed_tokens,lm_head]", f"model.path={ready}"]))
    ids = [i for t, i in json.loads((ready / "prepare.json").read_text())["added_token_ids"].items()
           if t in ("<think>", "</think>")]
    before, after = load_model(ready), load_model(tmp_path / "run" / "sft" / "checkpoint")
    for get in ("get_input_embeddings", "get_output_embeddings"):
        moved = (getattr(after, get)().weight[ids] - getattr(before, get)().weight[ids]).abs().amax(dim=1)
        assert (moved > 1e-3).all(), (get, moved)

    rl = ["stages=[grpo]", "threads=1", "ray.backend=local", "grpo.steps=1", "grpo.prompts_per_step=2",
          "grpo.group_size=2", "grpo.max_new_tokens=6", "grpo.budgets=[4,auto]", "grpo.eval_budgets=[4,auto]",
          "grpo.eval_n_per_difficulty=1", "grpo.eval_max_new_tokens=6", "grpo.process_penalty=0", "grpo.ptx_coef=0",
          "grpo.lora.enabled=true", "grpo.lora.target_modules=[q_proj,v_proj]", f"model.path={ready}"]
    with pytest.raises(ValueError, match=r"grpo.lora.modules_to_save: \['lm_heads'\] names no module"):
        run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'r1'}", *rl,
                                      "grpo.lora.modules_to_save=[embed_tokens,lm_head,lm_heads]"]))
    run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'r2'}", *rl, "grpo.lora.modules_to_save=[embed_tokens,lm_head]",
                                  "stages=[grpo,export]", "export.rank=4"]))
    assert (tmp_path / "r2" / "grpo" / "done.json").is_file()
    # the export carries what the LoRA stage trained whole, though export.modules_to_save names nothing
    report = json.loads((tmp_path / "r2" / "export" / "adapter" / "export.json").read_text())
    assert report["modules_to_save"] == ["embed_tokens", "lm_head"] and not report["uncovered_changed_params"]


def test_lora_weight_sync_carries_the_modules_trained_whole(foreign_dir, tmp_path):
    """With `modules_to_save`, what the learner sends after an update includes the whole embedding and head copies,
    and a rollout worker wrapped the same way takes every tensor by name and then computes the learner's logits."""
    from posttrain.prepare import prepare_checkpoint
    from posttrain.workers.learner import LearnerWorker
    from posttrain.workers.rollout import RolloutWorker

    prepare_checkpoint(foreign_dir, tmp_path / "ready")
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}
    learner = LearnerWorker(str(tmp_path / "ready"), lora=lora)
    with torch.no_grad():  # stands for an update
        for p in learner.learner.model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    weights = learner.weights()
    assert any("embed_tokens.modules_to_save" in k for k in weights) and any("lm_head.modules_to_save" in k for k in weights)
    rollout = RolloutWorker(str(tmp_path / "ready"), "cpu", torch.float32, 1)
    rollout.enable_lora(lora, "grpo.lora")
    assert rollout.update_weights(weights) == len(weights)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(rollout.model(input_ids=ids).logits, learner.learner.model(input_ids=ids).logits, atol=1e-5)


def test_weight_tying_is_asked_only_for_a_tied_embedding_or_head_trained_whole(tiny_model_dir, foreign_dir):
    from posttrain.model import saves_tied_embedding

    tied, untied = load_model(tiny_model_dir), load_model(foreign_dir)
    assert saves_tied_embedding(tied, ["embed_tokens"]) and saves_tied_embedding(tied, ["lm_head"])
    assert not saves_tied_embedding(tied, ["norm"]) and not saves_tied_embedding(tied, [])
    assert not saves_tied_embedding(untied, ["embed_tokens", "lm_head"])


def test_modules_to_save_on_tied_embeddings_trains_one_matrix_that_the_head_follows(tiny_model_dir):
    """On a model whose head is its embedding, `modules_to_save: [embed_tokens]` is all the refusal asks for: the
    trained copy is the head's weight too, before and after merging."""
    from peft import get_peft_model

    from posttrain.config import LoraConfig
    from posttrain.model import peft_config
    from posttrain.prepare import embedding_module_names

    assert embedding_module_names(tiny_model_dir) == ["embed_tokens"]
    model = load_model(tiny_model_dir)
    peft = get_peft_model(model, peft_config(LoraConfig(enabled=True, modules_to_save=["embed_tokens"]), model))
    (copy,) = [p for n, p in peft.named_parameters() if p.requires_grad and "modules_to_save" in n]
    with torch.no_grad():
        copy.add_(1.0)
    assert torch.equal(peft.get_output_embeddings().weight, copy)
    merged = peft.merge_and_unload()
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert torch.equal(merged.get_input_embeddings().weight, copy)


def test_prepare_keeps_the_row_of_a_token_the_vocabulary_had_and_converts_pickles(tmp_path):
    """A vocabulary that has `<think>` but splits it when reading text: `prepare` makes it whole and keeps its
    (trained) row; rows are initialised only for ids past the old vocabulary. Pickled weights come out as
    safetensors; no pad token is invented; --out inside the source is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from posttrain.model import tiny_moe_config
    from posttrain.prepare import prepare_checkpoint

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "<think>", "1", "+", "2", "=", "3", "<", ">", "think"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert tok.convert_tokens_to_ids("<think>") == 2 and tok("<think>", add_special_tokens=False)["input_ids"] != [2]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(
        len(tok), 1, 1, hidden_size=16, num_hidden_layers=1, num_experts=2, moe_intermediate_size=16,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True))
    src = tmp_path / "pickled"
    model.save_pretrained(src)
    for f in src.glob("*.safetensors"):  # pytorch_model.bin only
        f.unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    tok.save_pretrained(src)
    (src / "training_args.bin").write_bytes(b"not carried")
    assert tok.pad_token is None
    with pytest.raises(CheckpointError, match="pickled weights"):
        prepare_checkpoint(src, tmp_path / "out")
    with pytest.raises(CheckpointError, match="lies inside the source"):
        prepare_checkpoint(src, src / "prepared", allow_pickle=True)
    report = prepare_checkpoint(src, tmp_path / "out", allow_pickle=True)
    assert report["added_token_ids"]["<think>"] == 2 and 2 not in report["initialised_token_ids"]
    assert report["weights"].startswith("converted to safetensors")
    out = tmp_path / "out"
    assert any(out.glob("*.safetensors")) and not any(out.glob("*.bin"))
    ready, tok2 = load_model(out), load_tokenizer(out)
    torch.testing.assert_close(ready.get_input_embeddings().weight[:len(vocab)], model.get_input_embeddings().weight)
    assert tok2("<think>", add_special_tokens=False)["input_ids"] == [2]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).pad_token is None  # not invented by the copy
    check_chat_template(tok2, "prepared")
