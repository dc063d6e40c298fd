"""The GRPO learner: a plain class (no Ray) that scores rollouts with gradient and takes optimizer steps.

`token_logp` runs the policy over prompt + response in one teacher-forced pass and returns, for every response
token, the log-prob the policy gives it (the quantity the rollout recorded as `logp`, now with grad). `step`
turns a `RolloutBatch` and per-sequence advantages into one (or `mini_batches`) AdamW updates: clipped policy
loss on the batch's `loss_mask` (forced `</think>` tokens are not the policy's actions and get zero weight),
optional k3 KL to a frozen reference, gradient clipping, and a finite guard that skips (and counts) a step with a
non-finite loss or gradient instead of applying it.
"""

from __future__ import annotations

import math

import torch

from posttrain.algo.kl import kl_loss
from posttrain.algo.losses import clip_grad_norm, entropy_from_logits, finite_or_skip, masked_mean
from posttrain.algo.registry import get_policy_loss


def response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
    """(B, T, V) float32 logits predicting each response token, from one pass over the (B, P + T) sequence.

    Prompts are left-padded and responses right-padded, so positions count real tokens only (as the rollout's
    decoding loop does); padding is masked out of attention.
    """
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    return logits[:, P - 1:P + T - 1].float()  # the logit at position t predicts token t + 1


def gather_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) tokens -> (B, T) log-probs of the tokens."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class Learner:
    """Holds the trained policy, its AdamW optimizer and (when `kl_coef` > 0) a frozen reference model."""

    def __init__(self, model, *, lr: float = 2e-5, weight_decay: float = 0.0, clip_low: float = 0.2,
                 clip_high: float = 0.28, loss_agg: str = "token_mean", policy_loss: str = "vanilla",
                 kl_coef: float = 0.0, kl_kind: str = "k3", max_grad_norm: float = 1.0, ref_model=None):
        if kl_coef > 0 and ref_model is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        self.model = model
        self.ref_model = ref_model if kl_coef > 0 else None
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.policy_loss = get_policy_loss(policy_loss)
        self.loss_kwargs = {"clip_low": clip_low, "clip_high": clip_high, "agg": loss_agg}
        self.kl_coef, self.kl_kind, self.max_grad_norm = kl_coef, kl_kind, max_grad_norm
        self.skipped_steps = 0

    def token_logp(self, batch, rows=None, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp (B, T) with grad when enabled, logits (B, T, V)) of `batch`'s responses (`rows` selects)."""
        sel = slice(None) if rows is None else rows
        logits = response_logits(model or self.model, batch.prompt_ids[sel], batch.prompt_mask[sel],
                                 batch.response_ids[sel], batch.response_mask[sel])
        return gather_logp(logits, batch.response_ids[sel]), logits

    def loss(self, batch, advantages: torch.Tensor, mask: torch.Tensor, rows=None) -> tuple[torch.Tensor, dict]:
        """Scalar loss (with grad) and metrics. advantages: (B,); mask: (B, T) token weights (the loss mask)."""
        sel = slice(None) if rows is None else rows
        logp, logits = self.token_logp(batch, rows)
        old_logp = batch.logp[sel]  # the behaviour policy's log-probs, recorded by the rollout at temperature 1
        loss, metrics = self.policy_loss(logp, old_logp, advantages[sel], mask[sel], **self.loss_kwargs)
        with torch.no_grad():
            metrics["actor/entropy"] = float(masked_mean(entropy_from_logits(logits), mask[sel]))
            metrics["actor/logp_mismatch"] = float(masked_mean((logp - old_logp).abs(), mask[sel]))
        if self.ref_model is not None:
            with torch.no_grad():
                ref_logp, _ = self.token_logp(batch, rows, model=self.ref_model)
            kl, kl_metrics = kl_loss(logp, ref_logp, mask[sel], kind=self.kl_kind, agg=self.loss_kwargs["agg"])
            loss = loss + self.kl_coef * kl
            metrics |= kl_metrics
        metrics["actor/loss"] = float(loss.detach())
        return loss, metrics

    def step(self, batch, advantages: torch.Tensor, mask: torch.Tensor | None = None,
             mini_batches: int = 1, group_size: int = 1) -> dict[str, float]:
        """One update per mini-batch (contiguous whole groups); returns metrics averaged over mini-batches.

        mask: (B, T) token weights, default `batch.loss_mask` (forced tokens 0); rows of dropped groups are 0.
        """
        mask = batch.loss_mask if mask is None else mask
        self.model.train()
        n_groups = len(batch) // group_size
        bounds = [round(i * n_groups / mini_batches) * group_size for i in range(mini_batches + 1)]
        collected: list[dict] = []
        for lo, hi in zip(bounds, bounds[1:]):
            rows = slice(lo, hi)
            if hi <= lo or not bool(mask[rows].any()):
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss, metrics = self.loss(batch, advantages, mask, rows)
            loss.backward()
            grad_norm = clip_grad_norm(self.params, self.max_grad_norm)
            ok, reason = finite_or_skip(loss, self.params)
            if ok and math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                self.skipped_steps += 1
                metrics["actor/skip_reason"] = reason or f"grad norm {grad_norm}"
            self.optimizer.zero_grad(set_to_none=True)
            metrics["actor/grad_norm"] = grad_norm
            collected.append(metrics)
        self.model.eval()
        out = {k: sum(m[k] for m in collected) / len(collected)
               for k in (collected[0] if collected else {}) if isinstance(collected[0][k], float)}
        out["actor/clipfrac"] = out.get("actor/clipfrac_low", 0.0) + out.get("actor/clipfrac_high", 0.0)
        out["actor/updates"] = float(len(collected))
        out["actor/skipped_steps"] = float(self.skipped_steps)
        return out

    def named_weights(self):
        """(name, tensor) pairs for `RolloutWorker.update_weights`."""
        return self.model.state_dict().items()
