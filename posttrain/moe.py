"""Router tooling for training a Mixture-of-Experts policy with RL: load-balancing objectives, routing metrics,
routing capture/replay (R3), and which of these a checkpoint supports.

Each family routes its own way (`posttrain.moe_routers`: softmax top-k for Mixtral/OLMoE/Qwen2-MoE/Qwen3-MoE,
sigmoid + correction bias with expert groups for DeepSeek-V3/GLM4-MoE, top-k-then-softmax with a router bias for
GPT-OSS); the functions here pick the adapter of each router module by its class.

- `aux_loss(model, router_logits, mask)`: the load-balancing objective the model's family trains with (the
  Switch-Transformer loss, `load_balancing_loss`, or DeepSeek-V3's sequence-wise loss, `sequence_balance_loss`);
  an unknown router is refused.
- `router_metrics`: per-layer expert-load entropy and largest expert share, for logging; `model_router_metrics`
  takes the experts each router really picks from its logits (bias and groups included).
- `expert_load` / `update_correction_bias`: DeepSeek-V3's auxiliary-loss-free balancing (arXiv 2412.19437,
  sec. 2.1.2): the tokens each expert got in a step, and the sign step of every router's `e_score_correction_bias`
  towards the mean load (`moe_routers.bias_update`), for the routers that have one (DeepSeek-V3, GLM4-MoE).
- `moe_features` / `check_moe_features`: what a checkpoint supports, from its config.json alone, and the recipe
  keys (`grpo.routing_replay`, `grpo.router_aux_coef`, `grpo.router_bias_update_rate`, same for `ppo`) it cannot
  honour.
- `record_routing` / `replay_routing`: Rollout Routing Replay (R3, Ma et al. 2025, arXiv 2510.11370). The
  rollout engine records which top-k experts every token went to; the learner's forward then uses those experts
  instead of its own top-k, so a tiny numerical or weight difference between the two engines cannot flip an
  expert choice and turn the importance ratio into noise. As in the paper, the *gate weights* are still computed
  from the learner's own router logits as the family's router computes them for those experts (softmax over all
  experts gathered and optionally renormalised; DeepSeek's sigmoid scores without the bias, normalised and
  scaled; GPT-OSS's softmax over the k chosen logits), so the router keeps getting gradients. Unlike the paper,
  which replays the inference engine's (vLLM/SGLang) routing, here the rollout is our own KV-cache decoding loop
  (`posttrain.workers.rollout`), and a token whose routing was not recorded (marked -1) falls back to the
  router's own choice.

The patching uses forward hooks on the router modules of transformers 5.x (`<Model>TopKRouter`, whose forward
returns `(router_logits (N, E), routing_weights (N, k), selected_experts (N, k))` for the N = batch * seq tokens
of one call); hooks are removed on leaving the context. Torch only (`check_moe_features` reads a config.json).

What the learner does with a `RolloutBatch` that has `routing` (L, B, P + T, k), for mini-batch `rows`:

    with replay_routing(model, replay_tensors(batch.routing[:, rows])):
        logits = response_logits(model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                                 batch.response_ids[rows], batch.response_mask[rows])

The forward inside must run over exactly `torch.cat([prompt_ids, response_ids], 1)[rows]` (same width P + T, same
row order); slice the routing's sequence axis the same way if the learner trims columns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from posttrain.moe_routers import MODEL_TYPES, ROUTER_CLASSES, RouterAdapter, adapter_of, bias_update, max_violation
from posttrain.moe_routers import load_balancing_loss, sequence_balance_loss  # noqa: F401 (re-exported)

UNRECORDED = -1  # expert id of a token whose routing was not recorded: replay leaves it to the router


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router modules of `model`, one per MoE layer, in layer order. Raises when none is recognised."""
    routers = [m for m in model.modules() if type(m).__name__ in ROUTER_CLASSES]
    if not routers:
        raise TypeError(f"{type(model).__name__}: no supported MoE router found (routing replay, router metrics and "
                        f"the load-balancing objective know {', '.join(sorted(ROUTER_CLASSES))})")
    return routers


def _adapter(routers: Sequence[torch.nn.Module]) -> RouterAdapter:
    kinds = {id(adapter_of(r)): adapter_of(r) for r in routers}
    if len(kinds) != 1:
        raise TypeError(f"routers of several kinds in one model: {sorted({type(r).__name__ for r in routers})}")
    return next(iter(kinds.values()))


# ---------------------------------------------------------------------------------------------- load balancing


def aux_loss(model: torch.nn.Module, router_logits: Sequence[torch.Tensor],
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """The load-balancing objective of `model`'s family, scalar with grad (see `posttrain.moe_routers`).

    router_logits: one (N, E) tensor per MoE layer (`model(..., output_router_logits=True).router_logits`, or
    `record_routing(model, logits=True).logits[c]`), N = B * S in the row-major order of mask (B, S), 1 on real
    tokens. Softmax routers and GPT-OSS: the Switch loss (`load_balancing_loss`, balanced = top_k);
    DeepSeek-V3 / GLM4-MoE: the sequence-wise balance loss over the experts the router picks with its bias
    (`sequence_balance_loss`, balanced = 1). A model without a known router raises TypeError.
    """
    routers = moe_routers(model)
    if len(router_logits) != len(routers):
        raise ValueError(f"aux_loss: {len(router_logits)} layers of router logits for {len(routers)} MoE layers")
    return _adapter(routers).aux_loss(routers, router_logits, routers[0].top_k, mask)


def routed_experts(model: torch.nn.Module, router_logits: Sequence[torch.Tensor],
                   routers: Sequence[torch.nn.Module] | None = None) -> list[torch.Tensor]:
    """The (N, k) experts each router picks from its (N, E) logits, as its forward does (bias, groups included).
    routers: `moe_routers(model)`, when the caller has them already (it saves a walk over the model's modules)."""
    routers = moe_routers(model) if routers is None else routers
    with torch.no_grad():
        return [adapter_of(r).select(r, x.detach()) for r, x in zip(routers, router_logits)]


# ---------------------------------------------------------------------------------------------- metrics


def router_metrics(routing: Sequence[torch.Tensor] | torch.Tensor, top_k: int | None = None,
                   mask: torch.Tensor | None = None, num_experts: int | None = None) -> dict[str, float]:
    """Per-layer expert-load statistics of one batch, for logging.

    routing: per MoE layer (a sequence, or the first axis of a tensor) either float router logits (N, E), of which
    the top `top_k` are taken (the choice of softmax routers and GPT-OSS; `model_router_metrics` follows any known
    router, DeepSeek's bias and groups included), or long selected experts (..., k) (e.g. `RolloutBatch.routing`
    (L, B, S, k) with `num_experts` given); ids of -1 (unrecorded) are left out. mask: 1 on real tokens, N elements
    (e.g. (B, S)).
    Returns `router/layer{i}/load_entropy`: entropy of the experts' shares of the top-k assignments over log E
    (1 = perfectly balanced, 0 = one expert takes everything), `router/layer{i}/max_share`: the largest share
    (1/E at best), and their means over layers `router/load_entropy`, `router/max_share`.
    """
    out: dict[str, float] = {}
    for i, x in enumerate(routing):
        if x.is_floating_point():
            if top_k is None:
                raise ValueError("router_metrics: top_k is needed to select experts from router logits")
            n_experts = x.shape[-1]
            x = torch.topk(x.detach(), top_k, dim=-1).indices
        else:
            if num_experts is None:
                raise ValueError("router_metrics: num_experts is needed with selected-expert indices")
            n_experts = num_experts
        load = _layer_load(x, mask, n_experts)
        share = load / load.sum().clamp(min=1e-12)
        entropy = -(share * share.clamp(min=1e-12).log()).sum() / math.log(n_experts)
        out[f"router/layer{i}/load_entropy"] = float(entropy)
        out[f"router/layer{i}/max_share"] = float(share.max())
    layers = len(out) // 2
    for name in ("load_entropy", "max_share"):
        out[f"router/{name}"] = sum(out[f"router/layer{i}/{name}"] for i in range(layers)) / max(layers, 1)
    return out


def _layer_load(experts: torch.Tensor, mask: torch.Tensor | None, n_experts: int) -> torch.Tensor:
    """(..., k) long experts of one layer (-1: unrecorded, left out), mask with as many elements as tokens (1 on
    real tokens; None: all) -> (E,) float64 top-k assignments of real tokens to each expert."""
    idx = experts.reshape(-1, experts.shape[-1])  # (N, k)
    w = (torch.ones(idx.shape[0], device=idx.device, dtype=torch.float64) if mask is None
         else mask.reshape(-1).to(device=idx.device, dtype=torch.float64))
    w = w[:, None] * (idx >= 0)  # (N, k): real tokens with recorded experts
    return torch.zeros(n_experts, device=idx.device, dtype=torch.float64).index_add_(
        0, idx.clamp(min=0).reshape(-1), w.reshape(-1))


def expert_load(experts: Sequence[torch.Tensor], mask: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: one (N, k) long tensor of selected experts per MoE layer (e.g.
    `routed_experts`, or `replayed_experts` for a forward under `replay_routing`; -1 ids are left out), mask (B, S)
    or (N,), 1 on real tokens (None: every token) -> (L, E) float64 counts of top-k assignments of real tokens (a
    token counts once for each of its k experts), on the experts' device. The `load` of `update_correction_bias`."""
    return torch.stack([_layer_load(x, mask, num_experts) for x in experts])


def model_router_metrics(model: torch.nn.Module, router_logits: Sequence[torch.Tensor],
                         mask: torch.Tensor | None = None) -> dict[str, float]:
    """`router_metrics` of the experts `model`'s routers pick from `router_logits` (one (N, E) per MoE layer; mask
    (B, S) or (N,)): right for every known family, where `router_metrics(logits, top_k)` assumes softmax top-k."""
    experts = routed_experts(model, router_logits)
    return router_metrics(experts, mask=mask, num_experts=router_logits[0].shape[-1])


# ---------------------------------------------------------------------------------------------- record / replay


class RoutingRecorder:
    """What `record_routing` collected: `calls[c][l]` is the (N_c, k) long experts of MoE layer l in forward c
    (N_c = batch * seq of that call, row-major); with `logits=True`, `logits[c][l]` the (N_c, E) router logits
    (with their graph when grad is on)."""

    def __init__(self, n_layers: int, keep_logits: bool):
        self.n_layers, self.keep_logits = n_layers, keep_logits
        self._experts: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self._logits: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def _hook(self, layer: int):
        def hook(module, args, output):
            logits, _, experts = output
            self._experts[layer].append(experts.detach())
            if self.keep_logits:
                self._logits[layer].append(logits)
        return hook

    @property
    def calls(self) -> list[list[torch.Tensor]]:
        return [list(c) for c in zip(*self._experts)]

    @property
    def logits(self) -> list[list[torch.Tensor]]:
        return [list(c) for c in zip(*self._logits)]

    def pop(self) -> list[torch.Tensor]:
        """Remove and return the oldest recorded forward: one (N, k) tensor per MoE layer."""
        if not self._experts[0]:
            raise RuntimeError("RoutingRecorder.pop: no forward recorded")
        if self.keep_logits:
            for layer in self._logits:
                layer.pop(0)
        return [layer.pop(0) for layer in self._experts]


@contextmanager
def record_routing(model: torch.nn.Module, logits: bool = False):
    """Within the context, every forward of `model` appends its routing to the returned `RoutingRecorder`.

    Hooks run after the router's forward (and after a replay), so what is recorded is what the experts got.
    """
    routers = moe_routers(model)
    rec = RoutingRecorder(len(routers), logits)
    handles = [r.register_forward_hook(rec._hook(i)) for i, r in enumerate(routers)]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def replayed_experts(own: torch.Tensor, replayed: torch.Tensor) -> torch.Tensor:
    """The (N, k) experts a forward under `replay_routing` sends its tokens to: the (N, k) `replayed` ones where a
    token's k ids are recorded (>= 0), the router's `own` choice (N, k) where they are -1."""
    replayed = replayed.to(device=own.device, dtype=torch.long)
    return torch.where((replayed >= 0).all(-1, keepdim=True), replayed, own)


def _replayed(router, experts: torch.Tensor):
    adapter = adapter_of(router)

    def hook(module, args, output):
        logits, weights, own = output
        if experts.shape != own.shape:
            raise ValueError(f"replay_routing: routing of shape {tuple(experts.shape)} for a forward whose router "
                             f"sees {tuple(own.shape)} (N = batch * seq tokens, top_k); the replayed batch must "
                             "have exactly the layout of this forward's input_ids")
        chosen = replayed_experts(own, experts)  # (N, k)
        return logits, adapter.weights(module, logits, chosen).to(weights.dtype), chosen
    return hook


@contextmanager
def replay_routing(model: torch.nn.Module, routing: Sequence[torch.Tensor]):
    """Within the context, the routers of `model` send each token to the experts given in `routing` (R3).

    routing: one (N, k) long tensor per MoE layer (`replay_tensors` builds it from (L, B, S, k)); N must be the
    batch * seq of every forward run inside (all of them replay the same routing; a gradient-checkpointing
    recompute does too). A token whose k ids are -1 keeps the router's own top-k. The gate weights come from the
    current router logits as the family's router computes them for the replayed experts (`RouterAdapter.weights`:
    softmax gathered and renormalised, sigmoid normalised and scaled without the bias, or softmax over the k
    logits), so the router weight still gets gradients and replaying a forward's own routing changes nothing.
    """
    routers = moe_routers(model)
    if len(routing) != len(routers):
        raise ValueError(f"replay_routing: {len(routing)} layers of routing for {len(routers)} MoE layers")
    handles = []
    try:
        for r, experts in zip(routers, routing):
            experts = experts.to(device=r.weight.device, dtype=torch.long)
            # prepend: the replay runs before any other hook (a recorder then sees the replayed experts)
            handles.append(r.register_forward_hook(_replayed(r, experts), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


def replay_tensors(routing: torch.Tensor) -> list[torch.Tensor]:
    """(L, B, S, k) per-sequence routing (e.g. `RolloutBatch.routing[:, rows]`) -> L tensors (B * S, k), the
    row-major token order a router sees for a (B, S) forward."""
    return [layer.reshape(-1, layer.shape[-1]) for layer in routing]


# ---------------------------------------------------------------------------------------------- aux-loss-free balancing


def correction_bias_routers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(state-dict name of the bias buffer, router) of every router of `model` with an `e_score_correction_bias`
    (`RouterAdapter.correction_bias`: DeepSeek-V3, GLM4-MoE), in layer order; [] when it has none. The names are
    those of `model.state_dict()` (PEFT wrapper prefix included), i.e. what `RolloutWorker.update_weights` takes."""
    return [(f"{name}.e_score_correction_bias" if name else "e_score_correction_bias", m)
            for name, m in model.named_modules()
            if type(m).__name__ in ROUTER_CLASSES and ROUTER_CLASSES[type(m).__name__].correction_bias]


@torch.no_grad()
def update_correction_bias(routers: Sequence[torch.nn.Module], load: torch.Tensor, rate: float) -> dict[str, float]:
    """One step of DeepSeek-V3's auxiliary-loss-free balancing on every router, in place:
    b <- b + rate * sign(mean load - load) (`moe_routers.bias_update`).

    routers: the L routers with a correction bias (`correction_bias_routers`), in the order of `load`'s layers;
    load: (L, E) tokens routed to each expert in the step (`expert_load`; under data parallelism the sum over ranks,
    so every rank makes the same update). Returns metrics: `router/bias_max`, `router/bias_min` (over all layers,
    after the update) and `router/max_violation` (MaxVio of the step's load, max load / mean load - 1, averaged over
    layers; 0 = balanced).
    """
    if len(routers) != load.shape[0]:
        raise ValueError(f"update_correction_bias: load of {load.shape[0]} layers for {len(routers)} routers")
    for r, layer in zip(routers, load):
        r.e_score_correction_bias.copy_(bias_update(r.e_score_correction_bias, layer, rate))
    biases = torch.stack([r.e_score_correction_bias.detach().float().cpu() for r in routers])  # (L, E)
    return {"router/bias_max": float(biases.max()), "router/bias_min": float(biases.min()),
            "router/max_violation": float(max_violation(load).mean())}


# ---------------------------------------------------------------------------------------------- features


def _config_dict(model_config) -> dict | None:
    """config.json as a dict from a dict, a `PretrainedConfig`, or a checkpoint directory / config.json path
    (None when unreadable: the checkpoint loader names that problem)."""
    if model_config is None or isinstance(model_config, dict):
        return model_config
    if isinstance(model_config, (str, Path)):
        f = Path(model_config).expanduser()
        f = f / "config.json" if f.is_dir() else f
        try:
            data = json.loads(f.read_bytes().decode("utf-8-sig"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
    return model_config.to_dict()


def moe_features(model_config) -> dict:
    """Which MoE features posttrain supports for a checkpoint, from its config alone (no weights are read).

    model_config: a `PretrainedConfig`, a config.json dict, a checkpoint directory, or a loaded model (its routers
    are then looked at directly). Returns {"model_type", "moe" (has experts), "router" (the routing rule, or why it is
    unknown), "shared_experts", "router_metrics", "aux_objective" (its name, or None), "routing_replay",
    "bias_update" (aux-loss-free balancing: the router has a correction bias)} and, when a feature is missing, "why".
    """
    if isinstance(model_config, torch.nn.Module):
        names = {type(m).__name__ for m in model_config.modules() if type(m).__name__ in ROUTER_CLASSES}
        cfg = model_config.config.to_dict()
        router = next(iter(names)) if len(names) == 1 else None
    else:
        cfg = _config_dict(model_config) or {}
        router = MODEL_TYPES.get(cfg.get("model_type"))
    moe = any(cfg.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    out = {"model_type": cfg.get("model_type"), "moe": bool(moe),
           "shared_experts": bool(cfg.get("shared_expert_intermediate_size") or cfg.get("n_shared_experts")),
           "router_metrics": False, "aux_objective": None, "routing_replay": False, "bias_update": False}
    if router is None:
        out["router"] = None
        out["why"] = (f"{out['model_type'] or 'this model'} has no experts" if not moe else
                      f"the router of model_type {out['model_type']!r} is not one posttrain.moe knows (it knows "
                      f"{', '.join(sorted(MODEL_TYPES))})")
        return out
    adapter = ROUTER_CLASSES[router]
    return out | {"router": adapter.describe(cfg), "router_metrics": True, "aux_objective": adapter.aux_objective,
                  "routing_replay": True, "bias_update": adapter.correction_bias}


def format_moe_features(features: dict) -> str:
    """A few lines for `posttrain prepare` and logs."""
    yes = lambda v: "yes" if v else "no"  # noqa: E731
    lines = [f"MoE features of {features['model_type']}: router "
             f"{features['router'] or 'unknown'}{' + shared experts' if features['shared_experts'] else ''}",
             f"  router metrics: {yes(features['router_metrics'])}; routing replay (routing_replay): "
             f"{yes(features['routing_replay'])}; load-balancing objective (router_aux_coef): "
             f"{features['aux_objective'] or 'none'}",
             f"  aux-loss-free bias update (router_bias_update_rate): {yes(features.get('bias_update'))}"]
    if features.get("why"):
        lines.append(f"  ({features['why']})")
    return "\n".join(lines)


def check_moe_features(model_config, rc) -> list[str]:
    """Problems (empty: none) with the MoE keys of recipe `rc` for the checkpoint of `model_config` (see
    `moe_features`; None: the `base` stage's embedded Qwen3-MoE, a softmax router), each naming its key:
    `{grpo,ppo}.routing_replay: true` on a model without a replayable router, `{grpo,ppo}.router_aux_coef > 0`
    on a model with experts whose router posttrain cannot balance, and `{grpo,ppo}.router_bias_update_rate > 0` on a
    model whose router has no correction bias (anything but DeepSeek-V3 / GLM4-MoE, dense models included). Only
    stages in `rc.stages` are checked; a dense model ignores `router_aux_coef` (nothing to balance). Reads
    config.json only, so a recipe can be refused before any stage runs."""
    f = moe_features({"model_type": "qwen3_moe", "num_experts": 8} if model_config is None else model_config)
    problems = []
    for algo in ("grpo", "ppo"):
        if algo not in rc.stages:
            continue
        section = getattr(rc, algo)
        if section.routing_replay and not f["routing_replay"]:
            problems.append(f"{algo}.routing_replay: routing replay (R3) needs a known MoE router and "
                            f"{f['why']}; set {algo}.routing_replay: false")
        if section.router_aux_coef > 0 and f["moe"] and not f["aux_objective"]:
            problems.append(f"{algo}.router_aux_coef: {section.router_aux_coef} asks for a load-balancing loss and "
                            f"{f['why']}; set {algo}.router_aux_coef: 0")
        rate = getattr(section, "router_bias_update_rate", 0.0)
        if rate > 0 and not f["bias_update"]:
            problems.append(f"{algo}.router_bias_update_rate: {rate} asks for DeepSeek-V3's auxiliary-loss-free bias "
                            "update, which needs a router with an e_score_correction_bias (DeepSeek-V3, GLM4-MoE), "
                            f"and {_bias_why(f)}; set {algo}.router_bias_update_rate: 0")
    return problems


def _bias_why(features: dict) -> str:
    """Why a model (its `moe_features`) has no correction bias to update, in words."""
    if features.get("why"):
        return features["why"]
    router = MODEL_TYPES.get(features["model_type"])
    kind = ROUTER_CLASSES[router].kind if router else features["router"]
    return f"the router of {features['model_type']} is {kind}, without one"
