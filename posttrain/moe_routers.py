"""Router adapters: how each MoE family of transformers 5.x picks experts and weighs them, so that router metrics,
the load-balancing objective and routing replay (`posttrain.moe`) follow each family's own routing rule.

Every supported router module returns `(router_logits (N, E), routing_weights (N, k), selected_experts (N, k))`
for the N = batch * seq tokens of one call; they differ in how the weights and experts come from the logits:

- `SoftmaxTopK` (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, FlexOlmo, Qwen3-Next): p = softmax(logits) over all E
  experts, experts = top-k of p, weights = p at those experts, renormalised to sum 1 when `norm_topk_prob` (always
  for Mixtral; Jiang et al. 2024, arXiv 2401.04088). Trained with the Switch-Transformer load-balancing loss
  (Fedus et al. 2021, eqs. 4-6), which transformers' `load_balancing_loss_func` computes.
- `SigmoidBiasTopK` (DeepSeek-V3, GLM4-MoE): s = sigmoid(logits); experts = top-k of s + `e_score_correction_bias`
  within the `topk_group` best of `n_group` expert groups (a group scores the sum of its 2 best biased scores);
  weights = s at those experts (the bias only selects), divided by their sum + 1e-20 when `norm_topk_prob`, times
  `routed_scaling_factor` (DeepSeek-V3 technical report, arXiv 2412.19437, sec. 2.1.2, eqs. 12-16). DeepSeek-V3 is
  trained auxiliary-loss-free (the bias is nudged towards balance outside the gradient, `bias_update`) plus a small
  sequence-wise balance loss (eqs. 17-20), which `sequence_balance_loss` computes.
- `TopKSoftmax` (GPT-OSS; model card arXiv 2508.10925): logits from a linear layer *with bias*, experts = top-k of
  the logits, weights = softmax over the k chosen logits only. transformers trains it with the Switch loss on
  softmax over all E logits (`GptOssForCausalLM`, `router_aux_loss_coef`); softmax is monotone, so that loss's
  top-k is the router's own choice.

Pure torch; no Ray, IO or config objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RouterAdapter:
    """One routing rule. `select` reproduces the router's expert choice from its logits; `weights` the routed weights
    of any given experts as the router's forward computes them from the same logits (what routing replay needs)."""

    kind = ""
    aux_objective: str | None = None  # the load-balancing objective `aux_loss` computes; None: refused
    correction_bias = False  # has `e_score_correction_bias`, which `bias_update` moves (aux-loss-free balancing)

    def select(self, router: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """(N, E) router logits -> (N, k) long experts, in the order the router returns them."""
        raise NotImplementedError

    def weights(self, router: torch.nn.Module, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """(N, E) logits, (N, k) experts -> (N, k) routed weights (float32 or the logits' dtype), with the logits'
        graph, so the router still gets gradients."""
        raise NotImplementedError

    def aux_loss(self, routers: Sequence[torch.nn.Module], logits: Sequence[torch.Tensor], top_k: int,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """Scalar load-balancing objective over the MoE layers (one (N, E) logits tensor per router)."""
        raise NotImplementedError

    def describe(self, config: dict) -> str:
        """One line on the routing rule, from the HF config (as a dict)."""
        return self.kind


class SoftmaxTopK(RouterAdapter):
    """softmax over E -> top-k -> optional renormalisation (`MixtralTopKRouter`, `Qwen3MoeTopKRouter`, ...)."""

    kind = "softmax top-k"
    aux_objective = "Switch-Transformer load balancing (transformers' load_balancing_loss_func)"

    def __init__(self, always_normalise: bool = False):
        self.always_normalise = always_normalise

    def normalises(self, router) -> bool:
        return self.always_normalise or bool(router.norm_topk_prob)

    def select(self, router, logits):
        return torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), router.top_k, dim=-1).indices

    def weights(self, router, logits, experts):
        top = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, experts)
        return top / top.sum(-1, keepdim=True) if self.normalises(router) else top

    def aux_loss(self, routers, logits, top_k, mask):
        return load_balancing_loss(logits, top_k, mask)

    def describe(self, config):
        norm = self.always_normalise or config.get("norm_topk_prob", False)
        return f"softmax top-{config.get('num_experts_per_tok')}" + (", renormalised" if norm else "")


class SigmoidBiasTopK(RouterAdapter):
    """sigmoid scores + correction bias, group-limited top-k (`DeepseekV3TopkRouter`, `Glm4MoeTopkRouter`)."""

    kind = "sigmoid + correction bias top-k"
    aux_objective = "sequence-wise balance loss (DeepSeek-V3 eqs. 17-20)"
    correction_bias = True

    def select(self, router, logits):
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias  # (N, E): the bias steers the choice only
        n, groups = router.num_experts, router.num_group
        group_scores = choice.view(-1, groups, n // groups).topk(2, dim=-1)[0].sum(dim=-1)  # (N, groups)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, n // groups).reshape(-1, n)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        return torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]

    def weights(self, router, logits, experts):
        top = logits.sigmoid().gather(1, experts)
        if router.norm_topk_prob:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return top * router.routed_scaling_factor

    def aux_loss(self, routers, logits, top_k, mask):
        experts = [self.select(r, x) for r, x in zip(routers, logits)]
        return sequence_balance_loss([x.sigmoid() for x in logits], experts, mask)

    def describe(self, config):
        groups, keep = config.get("n_group") or 1, config.get("topk_group") or 1
        return (f"sigmoid + correction bias top-{config.get('num_experts_per_tok')}"
                + (f" in the best {keep} of {groups} expert groups" if groups > 1 else "")
                + (", renormalised" if config.get("norm_topk_prob") else "")
                + f", scaled by {config.get('routed_scaling_factor', 1.0)}")


class TopKSoftmax(RouterAdapter):
    """top-k of biased logits -> softmax over the k (`GptOssTopKRouter`)."""

    kind = "top-k logits (router with bias), softmax over the k"
    aux_objective = "Switch-Transformer load balancing (as GptOssForCausalLM computes it)"

    def select(self, router, logits):
        return torch.topk(logits, router.top_k, dim=-1).indices

    def weights(self, router, logits, experts):
        return torch.softmax(logits.gather(-1, experts), dim=1, dtype=logits.dtype)

    def aux_loss(self, routers, logits, top_k, mask):
        return load_balancing_loss(logits, top_k, mask)

    def describe(self, config):
        return f"top-{config.get('num_experts_per_tok')} logits (router with bias), softmax over the chosen"


SOFTMAX, SOFTMAX_NORMALISED, SIGMOID_BIAS, TOPK_SOFTMAX = (SoftmaxTopK(), SoftmaxTopK(True), SigmoidBiasTopK(),
                                                          TopKSoftmax())

# Router class (transformers 5.x) -> its adapter. Each was checked against the class's forward.
ROUTER_CLASSES: dict[str, RouterAdapter] = {
    "Qwen3MoeTopKRouter": SOFTMAX,
    "Qwen2MoeTopKRouter": SOFTMAX,
    "OlmoeTopKRouter": SOFTMAX,
    "FlexOlmoTopKRouter": SOFTMAX,
    "Qwen3NextTopKRouter": SOFTMAX,
    "MixtralTopKRouter": SOFTMAX_NORMALISED,
    "DeepseekV3TopkRouter": SIGMOID_BIAS,
    "Glm4MoeTopkRouter": SIGMOID_BIAS,
    "GptOssTopKRouter": TOPK_SOFTMAX,
}

# HF `model_type` -> the router class its modelling code builds (for reports from config.json alone).
MODEL_TYPES: dict[str, str] = {
    "qwen3_moe": "Qwen3MoeTopKRouter",
    "qwen2_moe": "Qwen2MoeTopKRouter",
    "olmoe": "OlmoeTopKRouter",
    "flex_olmo": "FlexOlmoTopKRouter",
    "qwen3_next": "Qwen3NextTopKRouter",
    "mixtral": "MixtralTopKRouter",
    "deepseek_v3": "DeepseekV3TopkRouter",
    "glm4_moe": "Glm4MoeTopkRouter",
    "gpt_oss": "GptOssTopKRouter",
}


def adapter_of(router: torch.nn.Module) -> RouterAdapter | None:
    return ROUTER_CLASSES.get(type(router).__name__)


# ---------------------------------------------------------------------------------------------- objectives


def _token_weights(mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
    return (torch.ones(n, device=device) if mask is None
            else mask.reshape(-1).to(device=device, dtype=torch.float32))


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, equal to transformers' `load_balancing_loss_func`.

    router_logits: one (N, E) tensor per MoE layer, N = B * S tokens in the row-major order of `mask`
    (what `model(..., output_router_logits=True).router_logits` or `record_routing(model, logits=True)` gives).
    mask: (B, S) or (N,), 1 on real tokens; None counts every token.
    Returns the scalar E * sum_e f_e * P_e, with f_e = top-k assignments to e / tokens and P_e = mean router
    probability of e, both pooled over layers (a perfectly balanced router gives top_k). With top-k counts, f_e
    counts *all* top-k assignments and P_e averages the full softmax; padding tokens are left out of both.
    """
    logits = torch.stack([x.float() for x in router_logits])  # (L, N, E)
    n_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (L, N, k)
    counts = torch.nn.functional.one_hot(chosen, n_experts).sum(2).float()  # (L, N, E)
    w = _token_weights(mask, logits.shape[1], logits.device)  # (N,)
    total = w.sum() * logits.shape[0]
    f = (counts * w[:, None]).sum((0, 1)) / total  # (E,)
    p = (probs * w[:, None]).sum((0, 1)) / total  # (E,)
    return n_experts * (f * p).sum()


def sequence_balance_loss(scores: Sequence[torch.Tensor], experts: Sequence[torch.Tensor],
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437, eqs. 17-20), without its alpha.

    scores: one (N, E) tensor of sigmoid affinities s per MoE layer; experts: one (N, k) long tensor of the experts
    the router chose (bias and groups included, as Megatron-Core counts them); mask: (B, S) with N = B * S, 1 on real
    tokens ((N,) or None: one sequence of N tokens). For each sequence of T real tokens,
    f_e = E / (k T) * #tokens routed to e and P_e = mean over its tokens of s_e / sum_j s_j; the loss is
    sum_e f_e P_e, averaged over sequences with a real token and over layers (1 when perfectly balanced). The
    gradient flows through P (the scores), not through the counts.
    """
    s = torch.stack([x.float() for x in scores])  # (L, N, E)
    n_layers, n, n_experts = s.shape
    top_k = experts[0].shape[-1]
    if mask is None or mask.dim() < 2:
        w = _token_weights(mask, n, s.device)[None]  # (1, N): one sequence
    else:
        w = mask.to(device=s.device, dtype=torch.float32)  # (B, S)
    s = (s / (s.sum(-1, keepdim=True) + 1e-20)).view(n_layers, *w.shape, n_experts)  # (L, B, S, E)
    counts = torch.nn.functional.one_hot(torch.stack(experts), n_experts).sum(-2).float()  # (L, N, E)
    counts = counts.view(n_layers, *w.shape, n_experts)
    tokens = w.sum(-1)  # (B,)
    real = tokens > 0
    t = tokens.clamp(min=1)[None, :, None]  # (1, B, 1)
    f = n_experts / top_k * (counts * w[None, ..., None]).sum(2) / t  # (L, B, E)
    p = (s * w[None, ..., None]).sum(2) / t  # (L, B, E)
    return (f * p).sum(-1)[:, real].mean()


def bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free load balancing (arXiv 2412.19437, sec. 2.1.2; Wang et al. 2024, "Auxiliary-
    Loss-Free Load Balancing Strategy for Mixture-of-Experts", arXiv 2408.15664): the new correction biases
    b_i + rate * sign(mean_j load_j - load_i), one step of the bias update.

    bias: (..., E) the `e_score_correction_bias` of one router, or (L, E) of L routers stacked; load: (..., E) the
    tokens routed to each expert in the step (top-k assignments of real tokens, any real dtype), same shape;
    rate: the update speed gamma (DeepSeek-V3 used 0.001 for most of pre-training, then 0).
    Returns a new tensor of the bias's shape and dtype: experts above the mean load lose `rate`, those below gain
    it, those exactly at it (and a layer that saw no token) keep theirs. As in the paper the step is the sign only,
    whatever the size of the imbalance; unlike the paper (one update per optimizer step on a pre-training batch),
    the caller decides what a step's load is (`posttrain.learner`: all mini-batches of one RL step, all ranks).
    """
    load = load.to(device=bias.device, dtype=torch.float64)
    step = torch.sign(load.mean(-1, keepdim=True) - load)  # (..., E), in {-1, 0, 1}
    return (bias.double() + rate * step).to(bias.dtype)


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio of Wang et al. 2024 (arXiv 2408.15664): max_i load_i / mean_j load_j - 1 over the last axis.

    load: (..., E) tokens routed to each expert. Returns (...) float64: 0 when perfectly balanced, E - 1 when one
    expert takes every token (with top-1; E / k - 1 with top-k); 0 for a layer that saw no token."""
    load = load.double()
    mean = load.mean(-1)
    return torch.where(mean > 0, load.amax(-1) / mean.clamp(min=1e-12) - 1, torch.zeros_like(mean))
