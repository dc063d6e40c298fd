"""The `distill` stage's student: the teacher's architecture made smaller, or a checkpoint with the teacher's
tokenizer (`build_student`).

A smaller student (`distill.student: {layers, experts, hidden, init}`) keeps the teacher's config but for those
keys. For a Qwen3-MoE teacher (the embedded family) that is the teacher's own config; for any other family, the
embedded tiny Qwen3-MoE (`model.tiny_moe_config`) over the teacher's tokenizer, randomly initialised. With
`init: copy` (the default) the student starts as a truncation of the teacher: its embeddings, final norm and head,
its first N layers whole (attention and norms), and in each MoE layer the first E experts with their router rows
(the router's softmax then runs over E experts; `norm_topk_prob` renormalises the chosen ones). A truncated
teacher predicts far better than a random network from the first step (the embeddings and the lower layers'
features are kept), which is the point of distilling into it; the upper layers' work is what training recovers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from posttrain.model import _MOE_EXPERT_KEYS, tiny_moe_config
from posttrain.recipe import RecipeError


def _experts_key(config) -> str | None:
    return next((k for k in _MOE_EXPERT_KEYS if getattr(config, k, None)), None)


def student_config(teacher_config, tokenizer, spec, experts_implementation: str = "grouped_mm"):
    """The student's config from the teacher's and `spec` (`config_distill.StudentSize`); RecipeError naming the
    `distill.student` key that cannot apply."""
    same_family = teacher_config.model_type == "qwen3_moe"
    if not same_family and spec.init == "copy":
        raise RecipeError(f"distill.student.init: `copy` needs a Qwen3-MoE teacher (the embedded family), this one is "
                         f"{teacher_config.model_type}; set init: random (a tiny Qwen3-MoE over its tokenizer) or give "
                         "a checkpoint directory as distill.student")
    if same_family:
        cfg = copy.deepcopy(teacher_config)
    else:
        cfg = tiny_moe_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    n_layers = cfg.num_hidden_layers
    layers = spec.layers if spec.layers is not None else max(1, (teacher_config.num_hidden_layers + 1) // 2)
    key = _experts_key(cfg)
    experts = spec.experts if spec.experts is not None else getattr(cfg, key)
    if spec.init == "copy":
        teacher_experts = getattr(teacher_config, _experts_key(teacher_config))
        if layers > teacher_config.num_hidden_layers:
            raise RecipeError(f"distill.student.layers: {layers} is more than the teacher's "
                             f"{teacher_config.num_hidden_layers} layers, which `init: copy` copies from")
        if experts > teacher_experts:
            raise RecipeError(f"distill.student.experts: {experts} is more than the teacher's {teacher_experts} "
                             "experts, which `init: copy` copies from")
        if spec.hidden is not None and spec.hidden != teacher_config.hidden_size:
            raise RecipeError(f"distill.student.hidden: {spec.hidden} differs from the teacher's width "
                             f"{teacher_config.hidden_size}: its weights cannot be copied; set init: random")
    cfg.num_hidden_layers = layers
    setattr(cfg, key, experts)
    cfg.num_experts_per_tok = min(cfg.num_experts_per_tok, experts)
    if spec.hidden is not None:
        cfg.hidden_size = spec.hidden
    if getattr(cfg, "layer_types", None) is not None and len(cfg.layer_types) == n_layers:
        cfg.layer_types = list(cfg.layer_types)[:layers]
    if getattr(cfg, "mlp_only_layers", None):
        cfg.mlp_only_layers = [i for i in cfg.mlp_only_layers if i < layers]
    cfg.output_router_logits = False
    cfg._experts_implementation = experts_implementation
    return cfg


def copy_teacher_weights(student, teacher) -> None:
    """Load the student with the teacher's weights under the same names: equal shapes whole, the expert dimension
    (the first) cut to the student's experts (the fused expert weights (E, ., .) and the router (E, hidden)).
    Teacher layers past the student's are left out. RecipeError naming the tensor when one has no counterpart."""
    source = teacher.state_dict()
    weights = {}
    for name, tensor in student.state_dict().items():
        t = source.get(name)
        if t is None:
            raise RecipeError(f"distill.student.init: the teacher has no weight {name!r} to copy")
        if t.shape != tensor.shape:
            if t.shape[1:] != tensor.shape[1:] or t.shape[0] < tensor.shape[0]:
                raise RecipeError(f"distill.student.init: {name} is {tuple(tensor.shape)} in the student and "
                                 f"{tuple(t.shape)} in the teacher: it cannot be copied")
            t = t[: tensor.shape[0]]
        weights[name] = t.detach().clone()
    student.load_state_dict(weights, strict=True)
    if student.config.tie_word_embeddings:
        student.tie_weights()


def build_student(spec, teacher, tokenizer, device, dtype, load_kwargs: dict) -> tuple[torch.nn.Module, dict]:
    """(student model, description) from `distill.student`: a `StudentSize` (see the module docstring) or a checkpoint
    directory, loaded by `load_model(**load_kwargs)`, whose tokenizer and output size must be the teacher's
    (RecipeError naming `distill.student` otherwise)."""
    from transformers import AutoModelForCausalLM

    from posttrain.model import load_model, open_tokenizer

    if isinstance(spec, str):
        path = Path(spec).expanduser()
        student = load_model(path, device, dtype, **load_kwargs)
        theirs = open_tokenizer(path, load_kwargs.get("trust_remote_code", False))
        if theirs.get_vocab() != tokenizer.get_vocab():
            diff = len(set(theirs.get_vocab().items()) ^ set(tokenizer.get_vocab().items()))
            raise RecipeError(f"distill.student: {path}'s tokenizer is not the teacher's ({len(theirs)} tokens against "
                             f"{len(tokenizer)}, {diff} (token, id) pairs differ); the stored targets are teacher "
                             "token ids, so the student needs the same vocabulary")
        n_s = student.get_output_embeddings().weight.shape[0]
        n_t = teacher.get_output_embeddings().weight.shape[0]
        if n_s != n_t:
            raise RecipeError(f"distill.student: {path} has {n_s} output logits, the teacher {n_t}; the vocabulary "
                             "must match")
        return student, {"path": str(path)}
    cfg = student_config(teacher.config, tokenizer, spec, load_kwargs.get("experts_implementation") or "grouped_mm")
    student = AutoModelForCausalLM.from_config(cfg, dtype=dtype)  # random init from torch's seeded generator
    if spec.init == "copy":
        copy_teacher_weights(student, teacher)
    return student.to(device), {"layers": cfg.num_hidden_layers, "experts": getattr(cfg, _experts_key(cfg)),
                                "hidden": cfg.hidden_size, "top_k": cfg.num_experts_per_tok, "init": spec.init}
