"""How an extracted adapter (`posttrain.export`) carries the small tensors training changed that a low-rank delta
cannot express: 1-D tensors such as norm weights, biases, GPT-OSS's router bias (`export.carry_small_tensors`).

- A changed 1-D tensor of a module that holds no LoRA target and is small (at most `SMALL_SHARE` of the model's
  parameters: a norm, a router) is carried by storing that module whole, PEFT `modules_to_save`. PEFT matches those
  names as plain string suffixes of module paths (`norm` also matches `q_norm` and `input_layernorm`), so each module
  goes in under the shortest dotted suffix of its path whose matches are all modules being carried (`norm` when
  every norm changed, `model.norm` when only the final one did), and nothing else is stored.
- A changed bias of a LoRA-targeted linear layer travels as PEFT's `bias="lora_only"` (saved from and loaded back
  into the layer's `base_layer.bias`).
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

    carry, lora_bias = set(), False
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
    shortest = set()
    for owner in carry:
        parts = owner.split(".")
        for i in range(len(parts) - 1, -1, -1):
            name = ".".join(parts[i:])  # not from a layer index: `1.input_layernorm` would read as layer 1 only
            if not parts[i].isdigit() and {k for k in modules if k.endswith(name)} <= carry:
                shortest.add(name)
                break
    # a name that ends with another chosen one matches a subset of its modules: `norm` makes `q_norm` redundant
    return sorted(n for n in shortest if not any(n != m and n.endswith(m) for m in shortest)), lora_bias
