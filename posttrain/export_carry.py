"""How an extracted adapter (`posttrain.export`) carries the small tensors training changed that a low-rank delta
cannot express: 1-D tensors such as norm weights, biases, GPT-OSS's router bias (`export.carry_small_tensors`).

- A changed 1-D tensor of a module that holds no LoRA target and is small (at most `SMALL_SHARE` of the model's
  parameters: a norm, a router) is carried by storing that module whole, PEFT `modules_to_save`. PEFT matches those
  names as plain string suffixes of module paths (`norm` also matches `q_norm` and `input_layernorm`), so each module
  goes in under the shortest dotted suffix of its path whose matches are all modules being carried (`norm` when
  every norm changed, `model.norm` when only the final one did), and nothing else is stored.
- A changed bias of a LoRA-targeted linear layer travels as PEFT's `bias="lora_only"` (saved from and loaded back
  into the layer's `base_layer.bias`).
- A changed Linear layer PEFT cannot adapt because it rewrites the layer's name to the fused experts (DeepSeek-V3's
  and GLM4-MoE's shared experts and dense MLP layers, `moe_lora.peft_remapped`) is stored whole, whatever its size
  (`frozen_linear_carriers`): the adapter would otherwise put its untrained weights back.
- Anything else stays out and is reported: attention sinks of a module with LoRA-targeted projections, fused
  experts' biases, a module too large to store whole. The export's KL check then decides.
"""

from __future__ import annotations

import torch

SMALL_SHARE = 0.01  # a module is stored whole for a changed 1-D tensor only up to this share of the model


def _peft_match(key: str, targets) -> bool:
    """PEFT's `target_modules`/`target_parameters` rule for a list of names: the key or a dotted suffix of it."""
    return any(key == t or key.endswith(f".{t}") for t in targets)


def small_tensor_carriers(base_model, tuned_state: dict, target_modules, target_parameters,
                          modules_to_save=()) -> tuple[list[str], bool]:
    """([names to add to PEFT `modules_to_save`], whether LoRA layers' biases go with the adapter) for the 1-D
    tensors that differ between `base_model` and `tuned_state` and that neither the LoRA targets nor
    `modules_to_save` (name suffixes, PEFT's matching) already carry."""
    from torch import nn

    modules = dict(base_model.named_modules(remove_duplicate=False))
    total = sum(p.numel() for p in base_model.parameters())
    heads = {id(base_model.get_input_embeddings()), id(base_model.get_output_embeddings())}

    def lora_target(pname: str) -> bool:
        owner, _, leaf = pname.rpartition(".")
        return (leaf == "weight" and _peft_match(owner, target_modules)) or _peft_match(pname, target_parameters)

    def stored(owner: str) -> bool:  # the module, or one it is part of, is stored whole already
        parts = owner.split(".")
        return any(".".join(parts[:i]).endswith(m) for i in range(1, len(parts) + 1) for m in modules_to_save)

    carry, lora_bias = set(), False  # owners of changed 1-D tensors to store whole
    for name, p in base_model.named_parameters():
        new = tuned_state.get(name)
        if p.ndim != 1 or new is None or torch.equal(new.detach().to(p.device, p.dtype), p.detach()):
            continue
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        if stored(owner):
            continue
        if leaf == "bias" and isinstance(module, nn.Linear) and lora_target(f"{owner}.weight"):
            lora_bias = True
            continue
        if (id(module) in heads or any(lora_target(f"{owner}.{n}") for n, _ in module.named_parameters())
                or sum(q.numel() for q in module.parameters()) > SMALL_SHARE * total):
            continue  # left out: reported as not carried
        carry.add(owner)
    return _shortest_names(carry, modules), lora_bias


def moved_buffer_owners(base_model, tuned_state: dict) -> list[str]:
    """Paths of the modules whose 1-D floating buffers differ between `base_model` and `tuned_state`: DeepSeek-V3's
    routers after `router_bias_update_rate` moved their `e_score_correction_bias`. A buffer is no parameter, so
    neither LoRA nor the parameter checks see it; storing its module whole carries it (PEFT saves the buffers of a
    `modules_to_save` module)."""
    out = []
    for name, b in base_model.named_buffers():
        new = tuned_state.get(name)
        if (b.ndim == 1 and b.is_floating_point() and new is not None
                and not torch.equal(new.detach().to(b.device, b.dtype), b.detach())):
            out.append(name.rpartition(".")[0])
    return sorted(set(out))


def frozen_linear_carriers(base_model, tuned_state: dict, target_modules, modules_to_save=()) -> list[str]:
    """[names to add to PEFT `modules_to_save`] for the Linear layers training changed that no LoRA target can cover
    because PEFT rewrites their names to the fused experts (`moe_lora.peft_remapped`: DeepSeek-V3's shared experts
    and dense MLP layers), nor `modules_to_save` stores already."""
    from torch import nn

    from posttrain.moe_lora import peft_remapped

    modules = dict(base_model.named_modules(remove_duplicate=False))
    heads = {id(base_model.get_input_embeddings()), id(base_model.get_output_embeddings())}
    changed = {}
    for name, m in modules.items():
        new = tuned_state.get(f"{name}.weight")
        if (not isinstance(m, nn.Linear) or id(m) in heads or new is None or _peft_match(name, target_modules)
                or any(_peft_match(name, [s]) or f".{s}." in f".{name}." for s in modules_to_save)
                or torch.equal(new.detach().to(m.weight.device, m.weight.dtype), m.weight.detach())):
            continue
        changed[name] = ".".join(name.split(".")[-2:])
    remapped = set(peft_remapped(base_model, sorted(set(changed.values())))) if changed else set()
    return _shortest_names({n for n, short in changed.items() if short in remapped}, modules)


def _shortest_names(carry: set[str], modules: dict) -> list[str]:
    """The shortest dotted suffixes of the module paths in `carry` whose PEFT matches are all in `carry`."""
    shortest = set()
    for owner in carry:
        parts = owner.split(".")
        for i in range(len(parts) - 1, -1, -1):
            name = ".".join(parts[i:])  # not from a layer index: `1.input_layernorm` would read as layer 1 only
            if not parts[i].isdigit() and {k for k in modules if k.endswith(name)} <= carry:
                shortest.add(name)
                break
    # a name that ends with another chosen one matches a subset of its modules: `norm` makes `q_norm` redundant
    return sorted(n for n in shortest if not any(n != m and n.endswith(m) for m in shortest))
