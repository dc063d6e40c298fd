"""The MoE families of transformers 5.23, each as a tiny random-init model (conftest's `family_config`: hidden 32,
2 layers, 4 experts, top-2): routing recorded on a forward and replayed gives identical logits, router metrics and the
family's load-balancing objective, LoRA targets that exist (MLA and shared experts included), and the features
`posttrain.moe.check_moe_features` reports from config.json alone. GLM4-MoE stands for sigmoid routing without
expert groups."""

import json

import pytest
import torch

from posttrain import moe

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "glm4_moe"]
SIGMOID = {"deepseek_v3", "glm4_moe"}

_MODELS: dict = {}


def _model(family: str, tokenizer, family_config):
    """The family's tiny model with larger random router weights (and random correction / router biases), so
    routing is far from ties and the biases change which experts are chosen."""
    if family not in _MODELS:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(family_config(family, tokenizer), experts_implementation="grouped_mm")
        with torch.no_grad():
            for r in moe.moe_routers(model):
                r.weight.normal_(0, 1.0)
                if hasattr(r, "e_score_correction_bias"):
                    r.e_score_correction_bias.normal_(0, 0.5)
                if getattr(r, "bias", None) is not None:
                    r.bias.normal_(0, 1.0)
        _MODELS[family] = model.eval()
    return _MODELS[family]


def _batch(tokenizer):
    """(ids, mask) (2, S): two problems, the shorter left-padded, as the learner's prompts are."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("7+3*2-5=", "12-4*3+1-8*2=")]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_recorded_routing_reproduces_the_logits(family, tokenizer, family_config):
    """Fails before router adapters for DeepSeek-V3, GLM4-MoE and GPT-OSS: `no supported MoE router found`."""
    model = _model(family, tokenizer, family_config)
    ids, mask = _batch(tokenizer)
    with torch.no_grad(), moe.record_routing(model, logits=True) as rec:
        ref = model(input_ids=ids, attention_mask=mask).logits
    own = rec.calls[0]
    assert own and all(r.shape == (ids.numel(), 2) for r in own)
    with torch.no_grad(), moe.replay_routing(model, own):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    # the selection rule the metrics and the objective use is the router's own (bias and groups included)
    assert all(torch.equal(a, b) for a, b in zip(moe.routed_experts(model, rec.logits[0]), own))
    if family in SIGMOID:  # the bias did change the choice, so replay must not confuse scores with choices
        plain = [torch.topk(x.sigmoid(), 2, dim=-1).indices.sort(-1).values for x in rec.logits[0]]
        assert any(not torch.equal(p, o.sort(-1).values) for p, o in zip(plain, own))
    other = [(r + 1) % 4 for r in own]
    with torch.no_grad(), moe.replay_routing(model, other), moe.record_routing(model) as inner:
        changed = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(changed, ref)
    assert all(torch.equal(a, b) for a, b in zip(inner.calls[0], other))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)  # hooks removed on exit


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_weights_are_the_routers_and_keep_its_gradients(family, tokenizer, family_config):
    """Replaying other experts: the routed weights are what the family's router computes for those experts from
    the current logits (sigmoid ones without the bias), with gradients into the router."""
    model = _model(family, tokenizer, family_config)
    ids, mask = _batch(tokenizer)
    with torch.no_grad(), moe.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    other = [(r + 1) % 4 for r in rec.calls[0]]
    seen = []
    hooks = [r.register_forward_hook(lambda m, a, out: seen.append(out)) for r in moe.moe_routers(model)]
    try:
        with moe.replay_routing(model, other):
            model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean().backward()
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(other)  # one forward
    for r, (logits, weights, experts), replayed in zip(moe.moe_routers(model), seen, other):
        assert torch.equal(experts, replayed)
        if family in SIGMOID:
            w = logits.sigmoid().gather(1, experts)
            expected = w / (w.sum(-1, keepdim=True) + 1e-20) * r.routed_scaling_factor
        elif family == "gpt_oss":
            expected = torch.softmax(logits.gather(1, experts), dim=1)
        else:
            p = torch.softmax(logits.float(), -1).gather(1, experts)
            expected = p / p.sum(-1, keepdim=True) if getattr(r, "norm_topk_prob", True) else p  # Mixtral: always
        torch.testing.assert_close(weights.float(), expected.float(), rtol=0, atol=0)
        assert r.weight.grad is not None and torch.isfinite(r.weight.grad).all() and r.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_metrics_and_the_familys_balancing_objective(family, tokenizer, family_config):
    model = _model(family, tokenizer, family_config)
    ids, mask = _batch(tokenizer)
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    logits = out.router_logits
    metrics = moe.model_router_metrics(model, logits, mask)
    assert all(0 <= v <= 1 for v in metrics.values()) and len(metrics) == 2 * len(logits) + 2
    aux = moe.aux_loss(model, logits, mask)
    assert torch.isfinite(aux) and aux.requires_grad
    if family in SIGMOID:  # DeepSeek-V3's sequence-wise loss over the experts the router really chose
        with torch.no_grad(), moe.record_routing(model) as rec:
            model(input_ids=ids, attention_mask=mask)
        ref = _slow_sequence_loss([x.detach() for x in logits], rec.calls[0], mask)
        assert aux.item() == pytest.approx(ref, rel=1e-5)
    else:  # the Switch loss transformers' own forward computes for these families
        torch.testing.assert_close(aux, out.aux_loss)
    aux.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in moe.moe_routers(model))
    model.zero_grad(set_to_none=True)


def _slow_sequence_loss(logits, experts, mask):
    """DeepSeek-V3 eqs. 17-20 one sequence and one token at a time: f_i = E / (k T) * count_i, P_i = mean over the
    sequence's tokens of s_i / sum_j s_j; mean over layers and sequences of sum_i f_i P_i."""
    E, k = logits[0].shape[-1], experts[0].shape[-1]
    B, S = mask.shape
    values = []
    for x, chosen in zip(logits, experts):
        s, chosen = x.double().sigmoid().view(B, S, E), chosen.view(B, S, k)
        for b in range(B):
            toks = [t for t in range(S) if mask[b, t]]
            f = [E / (k * len(toks)) * sum(int(e in chosen[b, t].tolist()) for t in toks) for e in range(E)]
            p = [sum(float(s[b, t, e] / s[b, t].sum()) for t in toks) / len(toks) for e in range(E)]
            values.append(sum(fi * pi for fi, pi in zip(f, p)))
    return sum(values) / len(values)


EXPECTED_TARGETS = {  # attention (MLA for DeepSeek), shared experts and dense MLP layers where PEFT allows them
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "olmoe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt_oss": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                  "shared_expert.down_proj", "mlp.shared_expert_gate"],
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "glm4_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
# PEFT rewrites `*.gate_proj` / `*.up_proj` / `*.down_proj` targets to the fused experts for these model types, so
# their shared experts and dense layers are trained whole through modules_to_save instead of by LoRA
WHOLE = {"deepseek_v3": ["shared_experts", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
         "glm4_moe": ["shared_experts"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_cover_the_family_and_a_missing_target_is_an_error(family, tokenizer, family_config):
    import copy

    from peft import get_peft_model

    from posttrain.config import LoraConfig
    from posttrain.model import peft_config

    model = _model(family, tokenizer, family_config)
    cfg = peft_config(LoraConfig(enabled=True, r=2, alpha=4, modules_to_save=WHOLE.get(family, [])), model)
    assert sorted(cfg.target_modules) == sorted(EXPECTED_TARGETS[family])
    assert sorted(cfg.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    peft = get_peft_model(copy.deepcopy(model), cfg)
    trained = [n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
               for n, p in peft.named_parameters() if p.requires_grad]
    for name, m in model.named_modules():  # every matrix but the head: a LoRA target or trained whole
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            assert any(t.startswith(name + ".lora_A.") or t == name + ".weight" for t in trained), name
    experts = {t.split(".lora_A")[0] for t in trained if ".experts." in t and ".lora_A" in t}
    assert len(experts) == 2 * len(moe.moe_routers(model))  # both fused expert tensors of every MoE layer
    ids, mask = _batch(tokenizer)
    with torch.no_grad():  # B = 0: the adapter starts as the identity; replay reaches the routers through PEFT
        with moe.record_routing(peft) as rec:
            out = peft(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(out, model(input_ids=ids, attention_mask=mask).logits)
        with moe.replay_routing(peft, rec.calls[0]):
            assert torch.equal(peft(input_ids=ids, attention_mask=mask).logits, out)
    with pytest.raises(ValueError, match=r"grpo\.lora\.target_modules: \['k_proj'\]"
                       if family == "deepseek_v3" else r"grpo\.lora\.target_modules: \['kv_b_proj'\]"):
        peft_config(LoraConfig(enabled=True, target_modules=["o_proj", "k_proj" if family == "deepseek_v3"
                                                             else "kv_b_proj"]), model, "grpo.lora")
    with pytest.raises(ValueError, match=r"sft\.lora\.target_parameters: \['mlp\.experts\.w1'\]"):
        peft_config(LoraConfig(enabled=True, target_parameters=["mlp.experts.down_proj", "mlp.experts.w1"]), model)
    if family in WHOLE:  # a target PEFT would divert to the fused experts is refused, not silently moved
        with pytest.raises(ValueError, match=r"sft\.lora\.target_modules: \['shared_experts\.up_proj'\]: for "
                           f"{family} PEFT rewrites"):
            peft_config(LoraConfig(enabled=True, target_modules=["o_proj", "shared_experts.up_proj"]), model)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_targets_are_the_familys_and_a_missing_target_is_an_error(family, tokenizer, family_config):
    from posttrain.export import ExportError, export_targets

    model = _model(family, tokenizer, family_config)
    mods, params = export_targets(model)
    assert sorted(mods) == sorted(EXPECTED_TARGETS[family])  # MLA and Qwen2-MoE's shared expert included
    routers = [] if family == "gpt_oss" else ["mlp.gate.weight"]  # GPT-OSS's router (with bias) travels whole
    assert sorted(params) == sorted(["mlp.experts.down_proj", "mlp.experts.gate_up_proj", *routers])
    assert export_targets(model, ["o_proj"], ["mlp.experts.down_proj"]) == (["o_proj"], ["mlp.experts.down_proj"])
    with pytest.raises(ExportError, match=r"export\.target_modules: \['k_proj'\]" if family == "deepseek_v3"
                       else r"export\.target_modules: \['kv_b_proj'\]"):
        export_targets(model, ["o_proj", "k_proj" if family == "deepseek_v3" else "kv_b_proj"])
    with pytest.raises(ExportError, match=r"export\.target_parameters: \['mlp\.experts\.w1'\]"):
        export_targets(model, None, ["mlp.experts.w1"])


@pytest.mark.parametrize("family", FAMILIES)
def test_features_from_config_json_alone(family, tokenizer, family_config, tmp_path):
    from types import SimpleNamespace

    model = _model(family, tokenizer, family_config)
    model.config.save_pretrained(tmp_path)
    from_json = moe.moe_features(tmp_path)
    assert from_json == moe.moe_features(model)  # the config table agrees with the routers the model has
    assert from_json["routing_replay"] and from_json["router_metrics"] and from_json["aux_objective"]
    assert from_json["shared_experts"] == (family in ("qwen2_moe", "deepseek_v3", "glm4_moe"))
    text = moe.format_moe_features(from_json)
    assert family in text and ("sigmoid" in text) == (family in SIGMOID)
    section = SimpleNamespace(routing_replay=True, router_aux_coef=0.01)
    assert moe.check_moe_features(tmp_path, SimpleNamespace(stages=["sft", "grpo"], grpo=section, ppo=section)) == []


def test_unknown_router_and_dense_model_are_refused_naming_the_key(tmp_path):
    from types import SimpleNamespace

    on = SimpleNamespace(routing_replay=True, router_aux_coef=0.001)
    rc = SimpleNamespace(stages=["sft", "ppo"], grpo=on, ppo=on)
    unknown = {"model_type": "phimoe", "num_local_experts": 4, "num_experts_per_tok": 2}
    problems = moe.check_moe_features(unknown, rc)
    assert [p.split(":")[0] for p in problems] == ["ppo.routing_replay", "ppo.router_aux_coef"]
    assert "'phimoe' is not one posttrain.moe knows" in problems[0] and "set ppo.router_aux_coef: 0" in problems[1]
    dense = moe.check_moe_features({"model_type": "qwen3", "hidden_size": 32}, rc)
    assert len(dense) == 1 and dense[0].startswith("ppo.routing_replay:") and "has no experts" in dense[0]
    assert moe.check_moe_features(unknown, SimpleNamespace(stages=["sft"], grpo=on, ppo=on)) == []
    assert moe.check_moe_features(None, rc) == []  # the base stage's embedded Qwen3-MoE
    with pytest.raises(TypeError, match="no supported MoE router found"):
        moe.aux_loss(torch.nn.Sequential(torch.nn.Linear(2, 2)), [torch.zeros(3, 4)])


def test_recipe_with_an_unsupported_request_is_refused_before_any_stage(tiny_model_dir, tmp_path):
    """The recipe check reads model.path's config.json: an unknown router with routing replay stops at load."""
    import shutil

    from posttrain.recipe import RecipeError, load_recipe

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "phimoe"}))
    args = [f"run_dir={tmp_path / 'run'}", "stages=[grpo]", f"model.path={ckpt}", "grpo.routing_replay=true",
            "grpo.router_aux_coef=0"]
    with pytest.raises(RecipeError, match=r"grpo\.routing_replay: routing replay \(R3\) needs a known MoE router"):
        load_recipe(None, args)
    load_recipe(None, args[:-2] + [f"model.path={tiny_model_dir}", "grpo.routing_replay=true"])  # Qwen3-MoE: fine
