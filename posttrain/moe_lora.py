"""LoRA targets per MoE family: which matrices of a transformers 5.x MoE model an adapter should cover, found from
the model's structure (attention variants such as DeepSeek's MLA, shared experts, dense MLP layers, fused 3-D
experts). `posttrain.model.peft_config` uses them when a recipe leaves its targets at the default.

PEFT (0.18+) with transformers 5 rewrites, for the model types whose experts transformers fused (Qwen3-MoE, OLMoE,
DeepSeek-V3, GLM4-MoE, Mixtral, ...; not Qwen2-MoE or GPT-OSS), every `target_modules` entry named like a v4 expert
projection (`gate_proj`, `up_proj`, `down_proj`, `w1`-`w3`, `gate`, or ending in `.gate_proj`, ...) into the fused
`target_parameters`, also when loading an adapter; a shared expert's or dense layer's `gate_proj` can then never
be a LoRA target. `peft_remapped` asks PEFT which entries it would rewrite: they are left out of the family's
targets (those layers stay frozen under LoRA; `modules_to_save: [shared_experts]` trains them whole) and are an
error when a recipe names them."""

from __future__ import annotations

import torch


def peft_matches(name: str, target: str) -> bool:
    """PEFT's rule for a list entry of `target_modules` / `target_parameters`: the full name or a dotted suffix."""
    return name == target or name.endswith("." + target)


def family_lora_targets(model) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) that cover the trainable matrices of `model`'s family, found by structure:

    - attention: every `nn.Linear` under `self_attn`, by its own name: `q_proj k_proj v_proj o_proj` for Mixtral,
      OLMoE, Qwen2/3-MoE and GPT-OSS; DeepSeek-V3's multi-head latent attention (MLA, arXiv 2405.04434)
      `q_a_proj q_b_proj kv_a_proj_with_mqa kv_b_proj o_proj` (`q_proj` when `q_lora_rank` is null);
    - shared experts (Qwen2-MoE `shared_expert.*` and its `mlp.shared_expert_gate`, DeepSeek `shared_experts.*`)
      and dense MLP layers (DeepSeek's first `first_k_dense_replace` layers: `mlp.gate_proj`, ...), by their last
      two name parts;
    - the fused 3-D expert weights (E, ., .) as `target_parameters` (`mlp.experts.gate_up_proj`,
      `mlp.experts.down_proj`; GPT-OSS's are transposed, which PEFT handles).

    Routers, norms, biases, GPT-OSS's attention sinks and DeepSeek's `e_score_correction_bias` are not targets: a
    LoRA run leaves them frozen (`modules_to_save` trains a module whole); so are the Linear layers whose names PEFT
    rewrites to the fused experts (`peft_remapped`: DeepSeek's and GLM4-MoE's shared experts and dense layers).
    """
    modules: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        parts = name.split(".")
        if "self_attn" in parts[:-1]:
            t = parts[-1]
        elif any("shared_expert" in p for p in parts) or (len(parts) > 1 and parts[-2] == "mlp"):
            t = ".".join(parts[-2:])
        else:
            continue
        if t not in modules:
            modules.append(t)
    remapped = set(peft_remapped(model, modules))
    modules = [t for t in modules if t not in remapped]
    params: list[str] = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if p.ndim == 3 and "experts" in parts[:-1] and ".".join(parts[-3:]) not in params:
            params.append(".".join(parts[-3:]))
    return modules, params


def peft_remapped(model, targets: list[str]) -> list[str]:
    """The entries of `targets` (a `target_modules` list) that PEFT's transformers-v4 compatibility rewrites into
    fused-expert `target_parameters` for `model`'s type (see the module docstring); [] when PEFT has no such step."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return []
    out = []
    for t in targets:  # one at a time: PEFT refuses half of a fused pair (`up_proj` without `gate_proj`) outright
        cfg = LoraConfig(target_modules=[t])
        try:
            convert_peft_config_for_transformers(cfg, model, None)
        except ValueError:
            out.append(t)
            continue
        if t not in set(cfg.target_modules or ()):
            out.append(t)
    return out


def check_targets(model, field: str, asked: list[str], family: list[str], key: str) -> None:
    """ValueError naming `{key}.{field}` (`target_modules` or `target_parameters`) when an entry of `asked` matches
    no module (parameter) of `model` (PEFT's rule, `peft_matches`), or, for `target_modules`, when PEFT would rewrite
    it to the fused experts (`peft_remapped`), so that no Linear layer of that name would be adapted. `family`: the
    family's own targets for that field, named in the message."""
    kind = "module" if field == "target_modules" else "parameter"
    have = [n for n, _ in (model.named_modules() if kind == "module" else model.named_parameters())]
    missing = [t for t in asked if not any(peft_matches(n, t) for n in have)]
    if missing:
        raise ValueError(f"{key}.{field}: {missing} match{'es' if len(missing) == 1 else ''} nothing in "
                         f"{type(model).__name__} (a name or dotted suffix of a {kind}); this family's are {family}, "
                         f"or leave {key}.{field} at its default for them")
    remapped = peft_remapped(model, list(asked)) if kind == "module" else []
    if remapped:
        raise ValueError(f"{key}.target_modules: {remapped}: for {model.config.model_type} PEFT rewrites these names "
                         "to the fused expert parameters (transformers v4 compatibility), so no Linear layer of that "
                         f"name would be adapted; adapt the experts with {key}.target_parameters and keep shared "
                         f"experts or dense MLP layers whole with {key}.modules_to_save (e.g. [shared_experts])")
