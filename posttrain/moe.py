"""Router tooling for training a Mixture-of-Experts policy with RL: load-balancing loss, routing metrics, and
routing capture/replay (R3).

- `load_balancing_loss`: the auxiliary loss of the Switch Transformer (Fedus et al. 2021, eqs. 4-6) in the form
  transformers computes it (`load_balancing_loss_func`): with top-k routing, f_e counts *all* top-k assignments
  to expert e and P_e averages the full softmax; counts and probabilities are pooled over layers before the
  product (not a mean of per-layer losses), and padding tokens are left out of both.
- `router_metrics`: per-layer expert-load entropy and largest expert share, for logging.
- `record_routing` / `replay_routing`: Rollout Routing Replay (R3, Ma et al. 2025, arXiv 2510.11370). The
  rollout engine records which top-k experts every token went to; the learner's forward then uses those experts
  instead of its own top-k, so a tiny numerical or weight difference between the two engines cannot flip an
  expert choice and turn the importance ratio into noise. As in the paper, the *gate weights* are still computed
  from the learner's own router logits (softmax over all experts, gathered at the replayed experts, renormalised
  when the model normalises its top-k), so the router keeps getting gradients. Unlike the paper, which replays
  the inference engine's (vLLM/SGLang) routing, here the rollout is our own KV-cache decoding loop
  (`posttrain.workers.rollout`), and a token whose routing was not recorded (marked -1) falls back to the
  router's own choice.

The patching uses forward hooks on the router modules of transformers 5.x (`<Model>TopKRouter`, whose forward
returns `(router_logits (N, E), routing_weights (N, k), selected_experts (N, k))` for the N = batch * seq tokens
of one call); hooks are removed on leaving the context. Pure torch: no Ray, IO or config objects.

What the learner does with a `RolloutBatch` that has `routing` (L, B, P + T, k), for mini-batch `rows`:

    with replay_routing(model, replay_tensors(batch.routing[:, rows])):
        logits = response_logits(model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                                 batch.response_ids[rows], batch.response_mask[rows])

The forward inside must run over exactly `torch.cat([prompt_ids, response_ids], 1)[rows]` (same width P + T, same
row order); slice the routing's sequence axis the same way if the learner trims columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch

# Router classes whose forward is softmax -> top-k -> (optional) renormalisation, identical to Qwen3-MoE's;
# value: whether the class always renormalises (True) or follows its `norm_topk_prob` attribute (None).
_ROUTERS = {
    "Qwen3MoeTopKRouter": None,
    "Qwen2MoeTopKRouter": None,
    "OlmoeTopKRouter": None,
    "FlexOlmoTopKRouter": None,
    "Qwen3NextTopKRouter": None,
    "MixtralTopKRouter": True,
}

UNRECORDED = -1  # expert id of a token whose routing was not recorded: replay leaves it to the router


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router modules of `model`, one per MoE layer, in layer order. Raises when none is recognised."""
    routers = [m for m in model.modules() if type(m).__name__ in _ROUTERS]
    if not routers:
        raise TypeError(f"{type(model).__name__}: no supported MoE router found (routing replay and metrics know "
                        f"{', '.join(sorted(_ROUTERS))})")
    return routers


def _normalises(router) -> bool:
    always = _ROUTERS[type(router).__name__]
    return bool(always if always is not None else router.norm_topk_prob)


# ---------------------------------------------------------------------------------------------- load balancing


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, equal to transformers' `load_balancing_loss_func`.

    router_logits: one (N, E) tensor per MoE layer, N = B * S tokens in the row-major order of `mask`
    (what `model(..., output_router_logits=True).router_logits` or `record_routing(model, logits=True)` gives).
    mask: (B, S) or (N,), 1 on real tokens; None counts every token.
    Returns the scalar E * sum_e f_e * P_e, with f_e = top-k assignments to e / tokens and P_e = mean router
    probability of e, both pooled over layers (a perfectly balanced router gives top_k).
    """
    logits = torch.stack([x.float() for x in router_logits])  # (L, N, E)
    n_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (L, N, k)
    counts = torch.nn.functional.one_hot(chosen, n_experts).sum(2).float()  # (L, N, E)
    w = (torch.ones(logits.shape[1], device=logits.device) if mask is None
         else mask.reshape(-1).to(device=logits.device, dtype=torch.float32))  # (N,)
    total = w.sum() * logits.shape[0]
    f = (counts * w[:, None]).sum((0, 1)) / total  # (E,)
    p = (probs * w[:, None]).sum((0, 1)) / total  # (E,)
    return n_experts * (f * p).sum()


# ---------------------------------------------------------------------------------------------- metrics


def router_metrics(routing: Sequence[torch.Tensor] | torch.Tensor, top_k: int | None = None,
                   mask: torch.Tensor | None = None, num_experts: int | None = None) -> dict[str, float]:
    """Per-layer expert-load statistics of one batch, for logging.

    routing: per MoE layer (a sequence, or the first axis of a tensor) either float router logits (N, E), of which
    the top `top_k` are taken, or long selected experts (..., k) (e.g. `RolloutBatch.routing` (L, B, S, k) with
    `num_experts` given); ids of -1 (unrecorded) are left out. mask: 1 on real tokens, N elements (e.g. (B, S)).
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
        idx = x.reshape(-1, x.shape[-1])  # (N, k)
        w = torch.ones(idx.shape[0], device=idx.device) if mask is None else mask.reshape(-1).to(idx.device).float()
        w = w[:, None] * (idx >= 0)  # (N, k): real tokens with recorded experts
        load = torch.zeros(n_experts, device=idx.device).index_add_(0, idx.clamp(min=0).reshape(-1), w.reshape(-1))
        share = load / load.sum().clamp(min=1e-12)
        entropy = -(share * share.clamp(min=1e-12).log()).sum() / math.log(n_experts)
        out[f"router/layer{i}/load_entropy"] = float(entropy)
        out[f"router/layer{i}/max_share"] = float(share.max())
    layers = len(out) // 2
    for name in ("load_entropy", "max_share"):
        out[f"router/{name}"] = sum(out[f"router/layer{i}/{name}"] for i in range(layers)) / max(layers, 1)
    return out


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


def _replayed(router, experts: torch.Tensor):
    def hook(module, args, output):
        logits, weights, own = output
        if experts.shape != own.shape:
            raise ValueError(f"replay_routing: routing of shape {tuple(experts.shape)} for a forward whose router "
                             f"sees {tuple(own.shape)} (N = batch * seq tokens, top_k); the replayed batch must "
                             "have exactly the layout of this forward's input_ids")
        recorded = (experts >= 0).all(-1, keepdim=True)  # (N, 1)
        chosen = torch.where(recorded, experts, own)  # (N, k)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E), as the router computes it
        top = probs.gather(-1, chosen)
        if _normalises(module):
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(weights.dtype), chosen
    return hook


@contextmanager
def replay_routing(model: torch.nn.Module, routing: Sequence[torch.Tensor]):
    """Within the context, the routers of `model` send each token to the experts given in `routing` (R3).

    routing: one (N, k) long tensor per MoE layer (`replay_tensors` builds it from (L, B, S, k)); N must be the
    batch * seq of every forward run inside (all of them replay the same routing; a gradient-checkpointing
    recompute does too). A token whose k ids are -1 keeps the router's own top-k. The gate weights come from the
    current router logits (softmax over all E experts, gathered at the replayed experts, renormalised when the
    model normalises top-k probs), so the router weight still gets gradients.
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
