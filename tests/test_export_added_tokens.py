"""Issue 23 item 1: the default export of a prepared foreign checkpoint after full training keeps the trained rows
of the tokens `posttrain prepare` added and the small tensors training changed (norms, biases, GPT-OSS's router), and
an adapter that, loaded in plain PEFT, is measurably worse than the trained model is refused (`export.max_kl`, exit
1) unless `export.allow_lossy`. The adapter is checked the way a user consumes it: transformers + PEFT only."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli import main
from posttrain.export import DEFAULT_MAX_KL, LossyExport
from posttrain.export_carry import small_tensor_carriers
from posttrain.model import load_model, load_tokenizer, save_model, tiny_moe_config
from posttrain.prepare import prepare_checkpoint

ADDED = ["<think>", "</think>", "<|im_start|>", "<|im_end|>"]


def _foreign(path, fast, tied: bool, family: str = "qwen3_moe"):
    """A tiny random-init MoE whose tokenizer (`fast`, the `foreign_tokenizer` fixture's) lacks the think and ChatML
    tokens (as most foreign checkpoints do)."""
    from transformers import GptOssConfig

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 tie_word_embeddings=tied, pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id)
    if family == "gpt_oss":
        cfg = GptOssConfig(vocab_size=len(fast), intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                           layer_types=["full_attention"] * 2, **small)
    else:
        cfg = tiny_moe_config(len(fast), fast.pad_token_id, fast.eos_token_id, num_experts=4, moe_intermediate_size=32,
                              **small)
    return save_model(AutoModelForCausalLM.from_config(cfg), fast, path)


def _train(ready, out, norms: bool = False, full_rank: bool = False):
    """Stand-in for full SFT: the added tokens' rows move far from their mean initialisation (the model learns to
    use and close `<think>`), a query projection moves (rank 1); with `norms`, the final norm changes too; with
    `full_rank`, every value and output projection moves at full rank and the final norm scales the logits up."""
    model, tok = load_model(ready), load_tokenizer(ready)
    ids = [tok.convert_tokens_to_ids(t) for t in ADDED]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] += 2.0 * torch.randn(len(ids), 32, generator=g)
        head = model.get_output_embeddings()
        if head.weight is not model.get_input_embeddings().weight:
            head.weight[ids] += 2.0 * torch.randn(len(ids), 32, generator=g)
        q = model.model.layers[0].self_attn.q_proj.weight  # a rank-1 change: the default rank carries it exactly
        q += 0.05 * torch.outer(torch.randn(q.shape[0], generator=g), torch.randn(q.shape[1], generator=g))
        if norms:
            model.model.norm.weight *= 4.0
        if full_rank:
            for layer in model.model.layers:
                for lin in (layer.self_attn.v_proj, layer.self_attn.o_proj):
                    lin.weight += torch.randn(lin.weight.shape, generator=g)
            model.model.norm.weight *= 30.0
    return save_model(model, tok, out), ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def prepared(request, tmp_path_factory, foreign_tokenizer):
    root = tmp_path_factory.mktemp("tied" if request.param else "untied")
    ready = root / "ready"
    prepare_checkpoint(_foreign(root / "src", foreign_tokenizer(), request.param), ready)
    tuned, ids = _train(ready, root / "tuned")
    return root, ready, tuned, ids, request.param


def test_default_export_carries_the_added_tokens_rows(prepared):
    root, ready, tuned_dir, added, tied = prepared
    out = root / "export_default"  # a sibling named `adapter` would mark `tuned` as LoRA-trained
    assert main(["export", "--model", str(tuned_dir), "--base", str(ready), "--out", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    # only the changed rows travel, as PEFT's trainable_token_indices; a tied head follows the embedding
    assert report["trainable_token_rows"] == ({"embed_tokens": 4} if tied else {"embed_tokens": 4, "lm_head": 4})
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["trainable_token_indices"]["embed_tokens"]) == sorted(added)
    shapes = {k: tuple(v.shape) for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert not any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in shapes)  # no whole matrices
    assert report["kl_tuned_vs_adapted"] < 1e-4 < DEFAULT_MAX_KL < report["kl_tuned_vs_base"]
    assert not report["lossy"] and report["uncovered_changed_params"] == {}

    # plain transformers + PEFT reproduce the trained model's logits and greedy answers
    tok = AutoTokenizer.from_pretrained(out)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]),
                                        out).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False,
                                       thinking_budget=8) for q in ("1+2", "3*3", "2+9*3")]
    for text in prompts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        assert set(added[::2]) <= set(ids[0].tolist())  # <think> and <|im_start|> are in the prompt
        torch.testing.assert_close(_logits(adapted, ids), _logits(tuned, ids), rtol=1e-4, atol=1e-4)
        kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id}
        assert torch.equal(adapted.generate(input_ids=ids, **kw), tuned.generate(input_ids=ids, **kw))


def test_dropping_the_rows_fails_the_kl_check(prepared, tmp_path):
    """The old default (no embedding rows in the adapter) is what the new check refuses: the `export` stage of a
    run raises and writes nothing, until `export.allow_lossy: true`."""
    root, ready, tuned_dir, _, tied = prepared
    if tied:
        pytest.skip("the check does not depend on tying; the untied run covers it")
    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe

    run = tmp_path / "run"  # a run whose base stage gave `ready` and whose full SFT gave `tuned`
    shutil.copytree(ready, run / "base" / "checkpoint")
    shutil.copytree(tuned_dir, run / "sft" / "checkpoint")
    keys = [f"run_dir={run}", "stages=[export]", f"model.path={run / 'sft' / 'checkpoint'}", "threads=2",
            "export.carry_embeddings=false"]
    with pytest.raises(LossyExport) as e:
        run_recipe(load_recipe(None, keys))
    msg = str(e.value)
    assert "export.max_kl 0.1" in msg and "export.allow_lossy: true" in msg and "export.modules_to_save" in msg
    assert "embed_tokens" in msg and not (run / "export" / "adapter").exists()
    kl = float(msg.split("KL(trained || base + adapter) ")[1].split()[0])
    assert kl > DEFAULT_MAX_KL
    info = run_recipe(load_recipe(None, keys + ["export.allow_lossy=true"]))["export"]  # the opt-out
    assert info["lossy"] and info["kl_tuned_vs_adapted"] == pytest.approx(kl, rel=1e-3)
    assert json.loads((run / "export" / "adapter" / "export.json").read_text())["lossy"]


def _adapted_matches(out, tuned_dir, ids):
    """Plain transformers + PEFT: base + the adapter in `out` gives the trained model's logits on `ids`."""
    cfg = json.loads((out / "adapter_config.json").read_text())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]),
                                        out).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir).eval()
    torch.testing.assert_close(_logits(adapted, ids), _logits(tuned, ids), rtol=1e-4, atol=1e-4)
    return cfg


def test_default_export_carries_a_changed_norm_and_an_explicit_list_is_kept(prepared):
    """A changed final norm (no low-rank delta can carry a 1-D tensor) goes into the default adapter whole, under a
    name PEFT's suffix matching gives to it alone (`norm` would store every norm); an explicit
    `--modules-to-save` that covers it is used as given, nothing added."""
    root, ready, _, _, tied = prepared
    if tied:
        pytest.skip("norms do not depend on tying")
    tuned_dir, _ = _train(ready, root / "tuned_norms", norms=True)
    out = root / "norms"
    assert main(["export", "--model", str(tuned_dir), "--base", str(ready), "--out", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["modules_to_save"] == ["model.norm"] and report["uncovered_changed_params"] == {}
    assert report["kl_tuned_vs_adapted"] < 1e-4 and not report["lossy"]
    cfg = _adapted_matches(out, tuned_dir, torch.tensor([[5, 17, 42, 99, 3]]))
    assert cfg["modules_to_save"] == ["model.norm"]
    stored = {k.rsplit(".", 1)[0] for k in load_file(out / "adapter_model.safetensors")
              if "lora_" not in k and "token_adapter" not in k}  # what is stored whole
    assert stored == {"base_model.model.model.norm"}  # not the layers' q_norm, k_norm, input_layernorm, ...
    explicit = root / "norms_explicit"
    assert main(["export", "--model", str(tuned_dir), "--base", str(ready), "--out", str(explicit),
                 "--modules-to-save", "norm"]) == 0
    report = json.loads((explicit / "export.json").read_text())
    assert report["modules_to_save"] == ["norm"] and report["uncovered_changed_params"] == {}


def test_carried_names_match_exactly_the_changed_modules_under_peft(prepared):
    """The names added to `modules_to_save` are the shortest that PEFT's own matching (a string suffix of the module
    path) resolves to exactly the changed modules: PEFT wraps those and nothing else."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import ModulesToSaveWrapper

    root, ready, _, _, tied = prepared
    if tied:
        pytest.skip("norms do not depend on tying")
    targets = (["q_proj", "k_proj", "v_proj", "o_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    norms = [n for n, p in load_model(ready).named_parameters() if p.ndim == 1]
    q_norms = [n for n in norms if "q_norm" in n]
    cases = [(["model.norm.weight"], (), ["model.norm"]),
             (norms, (), ["norm"]),  # every norm changed: one name
             (norms, ("norm",), []),  # an explicit list already stores them
             (q_norms + ["model.norm.weight"], (), ["model.norm", "q_norm"]),
             (["model.layers.1.input_layernorm.weight"], (), ["layers.1.input_layernorm"])]  # not `1.input_...`
    for changed, explicit, names in cases:
        model = load_model(ready)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for n in changed:
            state[n] += 1.0
        assert small_tensor_carriers(model, state, *targets, explicit) == (names, False), changed
        if names:
            peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets[0], modules_to_save=names))
            wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                       if isinstance(m, ModulesToSaveWrapper)}
            assert wrapped == {n.removesuffix(".weight") for n in changed}


def test_gpt_oss_router_biases_and_norms_travel_and_sinks_are_reported(tmp_path, foreign_tokenizer):
    """GPT-OSS: a changed router (its bias and weight, no LoRA target) is stored whole, changed attention biases go
    as PEFT `bias: lora_only`, a changed norm whole; plain PEFT then gives the trained logits. Sinks (beside the
    LoRA-targeted projections) and the fused experts' biases cannot be carried by name: they are left out."""
    ready = tmp_path / "ready"
    prepare_checkpoint(_foreign(tmp_path / "src", foreign_tokenizer(), False, "gpt_oss"), ready)
    model, tok = load_model(ready), load_tokenizer(ready)
    g = torch.Generator().manual_seed(1)
    layer = model.model.layers[0]
    with torch.no_grad():
        for p in (layer.mlp.router.bias, layer.mlp.router.weight, layer.self_attn.q_proj.bias,
                  layer.self_attn.v_proj.bias):
            p += torch.randn(p.shape, generator=g)
        layer.input_layernorm.weight *= 3.0
    tuned_dir = save_model(model, tok, tmp_path / "tuned")
    out = tmp_path / "out"
    assert main(["export", "--model", str(tuned_dir), "--base", str(ready), "--out", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["modules_to_save"] == ["layers.0.input_layernorm", "layers.0.mlp.router"] and report["lora_bias"]
    assert report["uncovered_changed_params"] == {} and report["kl_tuned_vs_adapted"] < 1e-6
    cfg = _adapted_matches(out, tuned_dir, torch.tensor([[5, 17, 42, 99, 3]]))
    assert cfg["bias"] == "lora_only" and cfg["modules_to_save"] == report["modules_to_save"]

    base = load_model(ready)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for n in ("model.layers.1.self_attn.sinks", "model.layers.1.mlp.experts.down_proj_bias"):
        state[n] += 1.0
    targets = (["q_proj", "k_proj", "v_proj", "o_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    assert small_tensor_carriers(base, state, *targets) == ([], False)  # neither: the KL check decides


def test_cli_lossy_export_exits_1_and_names_the_keys(prepared, capsys):
    """An adapter whose rank cannot carry the change stops `posttrain export` with exit 1 (a measured-quality
    failure; bad input exits 2) and an error that names the KL, the threshold, the fix and the opt-outs, writing
    nothing; `--max-kl` raises the threshold and `--allow-lossy` writes it marked lossy."""
    root, ready, _, _, tied = prepared
    if tied:
        pytest.skip("the CLI path does not depend on tying")
    tuned_dir, _ = _train(ready, root / "tuned_full_rank", full_rank=True)
    args = ["export", "--model", str(tuned_dir), "--base", str(ready), "--rank", "1", "--out"]
    out = root / "lossy"
    assert main(args + [str(out)]) == 1
    err = capsys.readouterr().err
    assert "export.max_kl 0.1" in err and "export.allow_lossy" in err and "--allow-lossy" in err
    assert "raise export.rank" in err and "--max-kl" in err
    assert "Traceback" not in err and not out.exists() and not out.with_name("lossy.tmp").exists()
    kl = float(err.split("KL(trained || base + adapter) ")[1].split()[0])
    assert kl > DEFAULT_MAX_KL
    assert main(args + [str(out), "--max-kl", str(2 * kl)]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["max_kl"] == 2 * kl and not report["lossy"]
    assert main(args + [str(out), "--allow-lossy"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["lossy"] and report["max_kl"] == DEFAULT_MAX_KL and "LOSSY" in capsys.readouterr().out
    assert main(args + [str(root / "x"), "--max-kl", "0"]) == 2 and "--max-kl 0" in capsys.readouterr().err
