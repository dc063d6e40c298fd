"""The policy's forward pass over prompt + response rows, as the learner, the reference and the tests run it.

`response_forward` / `response_logits` give the logits predicting each response token of left-padded prompts
and right-padded responses (positions count real tokens, as the rollout's decoding loop does); `gather_logp`
the log-probs of given tokens; `DemoBatch` and `demo_nll_sum` the ptx term's demonstrations; `_idle_objective`
the zero-gradient forward a sharded rank runs to keep FSDP's collectives in step. Pure torch: no optimizer, no
distributed state (split out of `posttrain.learner`, which re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, router_logits: bool = False):
    """(logits (B, T, V) float32 predicting each response token, router logits or None) from one forward pass.

    Prompts are left-padded and responses right-padded, so positions count real tokens only (as the rollout's
    decoding loop does); padding is masked out of attention. With `router_logits`, the second value is the
    model's per-layer router logits, each (B * (P + T), E).
    """
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    kwargs = {"output_router_logits": True} if router_logits else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs)
    logits = out.logits[:, P - 1:P + T - 1].float()  # the logit at position t predicts token t + 1
    return logits, (getattr(out, "router_logits", None) if router_logits else None)


def response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
    """(B, T, V) float32 logits predicting each response token (see `response_forward`)."""
    return response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask)[0]


def gather_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) tokens -> (B, T) log-probs of the tokens."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class DemoBatch:
    """Demonstrations for the ptx term (`Learner.step(demos=...)`): N examples."""

    prompt_ids: torch.Tensor  # (N, P) long, left-padded
    prompt_mask: torch.Tensor  # (N, P) long
    response_ids: torch.Tensor  # (N, T) long, right-padded
    response_mask: torch.Tensor  # (N, T) long, 1 on the tokens to imitate

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def rows(self, lo: int, hi: int) -> "DemoBatch":
        """Demonstrations lo..hi (a rank's or a mini-batch's share)."""
        return DemoBatch(self.prompt_ids[lo:hi], self.prompt_mask[lo:hi], self.response_ids[lo:hi],
                         self.response_mask[lo:hi])


def demo_nll_sum(model, demos: DemoBatch) -> torch.Tensor:
    """Summed negative log-likelihood of the demonstrations' response tokens (with grad)."""
    logits = response_logits(model, demos.prompt_ids, demos.prompt_mask, demos.response_ids, demos.response_mask)
    return -(gather_logp(logits, demos.response_ids) * demos.response_mask).sum()


def _idle_objective(model) -> torch.Tensor:
    """0 x the logits of a one-token forward: what a sharded rank with nothing to learn from runs so that FSDP's
    all-gathers (forward) and reduce-scatters (backward) meet the other ranks' (its gradient is exactly 0)."""
    p = next(model.parameters())
    one = torch.ones((1, 1), dtype=torch.long, device=p.device)
    logits, _ = response_forward(model, one, one, one, one)
    return logits.sum() * 0.0
