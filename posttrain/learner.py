"""The policy learner: a plain class (no Ray, no IO) that scores rollouts with gradient and takes optimizer steps.

`response_forward` runs the policy over prompt + response in one teacher-forced pass and returns, for every
response token, the logits that predicted it (so `gather_logp` gives the log-prob the rollout recorded as `logp`,
now with grad) and, on request, the router logits of every MoE layer. `Learner.step` turns a `RolloutBatch` and
advantages into one AdamW update per mini-batch:

    loss = policy_loss(logp, old_logp, A; mask [, w])        clipped, token or sequence level (algo.losses)
         + kl_coef * KL(pi || pi_ref; mask)                   when the caller passes ref_logp (k1/k2/k3)
         - entropy_coef * H(pi; mask)                         optional bonus
         + router_aux_coef * aux_loss                         the family's load balancing (`moe.aux_loss`)
         + ptx_coef * NLL(demonstrations)                     InstructGPT's PPO-ptx, when the caller passes demos

With `router_bias_update_rate` gamma > 0 (DeepSeek-V3 / GLM4-MoE routers, which have an `e_score_correction_bias`),
each step that is applied ends with DeepSeek-V3's auxiliary-loss-free balancing (arXiv 2412.19437, sec. 2.1.2):
every router's bias moves by gamma * sign(mean load - load_i), load_i = the top-k assignments to expert i of the
real (non-padding) tokens of the step's loss forwards, i.e. the experts those forwards really used (the replayed
ones under routing replay), over all mini-batches and ranks. One update per `step` (an RL step), after its last
optimizer update, not one per mini-batch: the paper makes one per optimizer step on a pre-training batch, and
here a bias moved mid-step would change the routing, hence the policy, between the updates of one rollout batch.
The bias is a buffer, outside the optimizer and the gradient; it reaches the rollout workers with
`trainable_weights` and the checkpoints with the model's state dict.

`mask` is the batch's loss mask: forced `</think>` tokens are not the policy's actions and get zero weight, nor do
rows of dropped groups. `old_logp` is the rollout's recorded log-probs; with an off-policy correction
(`correction`, `posttrain.algo.offpolicy`; `tis_cap` is the `tis` one) it is the learner's own recomputation before
the step's first update, and the correction, computed from the ratio exp(old_logp - rollout logp), weights each
token's policy-gradient term (`tis`: w = min(ratio, cap), truncated importance sampling, Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training": the rollout engine's numerics are not the
learner's, and with `max_staleness` its policy is an older one) and/or takes tokens or rows out of the loss mask
(masked IS).

A step whose advantages, loss or gradients are not finite is skipped and counted, never applied. So is an update
that breaks the model (a learning rate far too high): after each optimizer step the weights must be finite and so
must the logits on a few padded rows of the mini-batch (what the next rollout will sample from). A step is applied
whole or not at all: on any skip, the weights and the AdamW state go back to what they were before the step's first
update, bit for bit. That takes a copy of the trainable weights and their optimizer state during each step (3x the
trainable parameters: small for LoRA; for full fine-tuning, the price of never sampling from a broken model).

Data parallel (torch.distributed, gloo on CPU / nccl on GPU): each rank gets whole groups of the batch; every rank
scales each loss term by its share of the global count that term averages over, and the gradients are summed
across ranks, so N ranks take exactly the step one rank would take on the whole batch (values and gradients):
policy loss and KL by the loss_agg's count (loss tokens for `token_mean`, sequences with a loss token for the
sequence modes, as `algo.losses.agg_loss` counts them), the entropy bonus by loss tokens, ptx by demonstration
tokens. The router load-balancing loss is a product of token means, not a mean: ranks weight theirs by their share
of the attended tokens, which is close to, not exactly, the one-learner value. Skips are agreed collectively, so
the ranks' weights never diverge; the bias update uses the expert loads summed over ranks, so every rank makes the
one-learner update.

Sharded (FSDP2, `posttrain.workers.learner.shard_model`): the same ranks, the same shares, but the parameters, their
gradients and the AdamW state are DTensors sharded across the ranks. FSDP reduce-scatters the gradients in the
backward pass, summing them (its divide factor is set to 1), so the hand-made all-reduce is not done again, and the
ranks' losses still sum to the one-learner loss. FSDP's all-gathers and reduce-scatters are collective, so every
rank runs the same number of forwards and backwards: a rank without a loss token in a mini-batch (or without
demonstrations, or without probe rows) runs an idle one-token forward whose loss is 0 x its logits. The grad norm,
the finiteness checks and the weight export (`trainable_weights`, collective) work on the local shards and combine
them across ranks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from posttrain.algo.kl import kl_loss
from posttrain.algo.losses import clip_grad_norm, entropy_from_logits, finite_or_skip, masked_mean
from posttrain.algo.registry import get_correction, get_policy_loss
from posttrain.distributed import (all_reduce_max, all_reduce_sum, full_tensor, is_sharded, local_shard,
                                  sharded_clip_grad_norm)
from posttrain.policy_forward import (DemoBatch, _idle_objective, demo_nll_sum, gather_logp,  # noqa: F401 - also
                                     response_forward, response_logits)  # imported from here by the workers, tests
from posttrain.rlbatch import compact, group_bounds, micro_slices  # noqa: F401 - group_bounds: also imported here
from posttrain.step_metrics import _average, _weighted  # noqa: F401 - _average: also imported from here


class Learner:
    """Holds the trained policy and its AdamW optimizer; `step` applies the RL loss to a rollout batch."""

    def __init__(self, model, *, lr: float = 2e-5, weight_decay: float = 0.0, clip_low: float = 0.2,
                 clip_high: float = 0.28, dual_clip_c: float | None = None, loss_agg: str = "token_mean",
                 policy_loss: str = "vanilla", kl_coef: float = 0.0, kl_kind: str = "k3",
                 entropy_coef: float = 0.0, router_aux_coef: float = 0.0, max_grad_norm: float = 1.0,
                 max_len: int | None = None, router_metrics: bool = True, routing_replay: bool = False,
                 ptx_coef: float = 0.0, tis_cap: float | None = None, correction: str = "none",
                 correction_cap: float = 2.0, correction_lower: float | None = None,
                 router_bias_update_rate: float = 0.0, micro_batch_tokens: int | None = None,
                 gradient_checkpointing: bool = False):
        if tis_cap is not None:  # the `tis` correction under its older name
            if not tis_cap > 0:
                raise ValueError(f"tis_cap must be > 0 (or None: off), got {tis_cap}")
            if correction not in ("none", "tis"):
                raise ValueError(f"tis_cap is the `tis` correction; it cannot be combined with "
                                 f"correction={correction!r}")
            correction, correction_cap = "tis", tis_cap
        self.model = model
        self.sharded = is_sharded(model)  # FSDP2: see the module docstring
        if micro_batch_tokens is not None and micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1 (or None: one forward per mini-batch), got "
                             f"{micro_batch_tokens}")
        self.micro_batch_tokens = micro_batch_tokens
        if gradient_checkpointing:
            if routing_replay:  # the recompute runs in backward, after `forward` has left the replay context
                raise ValueError("gradient_checkpointing cannot be combined with routing_replay: the recompute in "
                                 "the backward pass would route by the router's own top-k, not the replayed experts")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.policy_loss = get_policy_loss(policy_loss)
        self.loss_kwargs = {"clip_low": clip_low, "clip_high": clip_high, "agg": loss_agg, "max_len": max_len,
                            "dual_clip_c": dual_clip_c}
        self.kl_coef, self.kl_kind, self.max_grad_norm = kl_coef, kl_kind, max_grad_norm
        self.entropy_coef, self.router_aux_coef, self.ptx_coef = entropy_coef, router_aux_coef, ptx_coef
        self.router_metrics, self.routing_replay = router_metrics, routing_replay
        # (rollout_logp, old_logp, mask) -> algo.offpolicy.Correction, or None: the rollout's log-probs are pi_old
        self.correction = None
        if correction != "none":
            from posttrain.algo.offpolicy import check_thresholds

            check_thresholds(correction, correction_cap, correction_lower)
            self.correction = functools.partial(get_correction(correction), cap=correction_cap, lower=correction_lower)
        self.top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
        self._routers = None  # the model's MoE routers, found on first use (`_moe_routers`)
        self.bias_rate = float(router_bias_update_rate)
        # (state-dict name, router) of the correction biases the aux-loss-free balancing moves, and the step's load
        self._bias_routers: list = []
        self._step_load: torch.Tensor | None = None  # (L, E) float64 during `step`, summed by `loss`
        if not self.bias_rate >= 0:
            raise ValueError(f"router_bias_update_rate must be >= 0 (0: off), got {router_bias_update_rate}")
        if self.bias_rate > 0:
            from posttrain.moe import correction_bias_routers

            self._bias_routers = correction_bias_routers(model)
            if not self._bias_routers:  # the recipe check (`moe.check_moe_features`) names the section's key
                raise ValueError(f"router_bias_update_rate: {router_bias_update_rate} asks for DeepSeek-V3's "
                                 "auxiliary-loss-free bias update, which needs routers with an "
                                 f"e_score_correction_bias (DeepSeek-V3, GLM4-MoE), and {type(model).__name__} has "
                                 "none; set router_bias_update_rate: 0")
        self.skipped_steps = 0
        self.updates = 0
        self._probe = None  # the rows `_apply` checks the updated model's logits on (set by `step`)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, batch, rows: slice, router: bool = False):
        """(logp (R, T) with grad, logits (R, T, V), router logits or None) for `rows` of the batch."""
        args = (batch.prompt_ids[rows], batch.prompt_mask[rows], batch.response_ids[rows], batch.response_mask[rows])
        routing = getattr(batch, "routing", None)
        if self.routing_replay and routing is not None:
            from posttrain.moe import replay_routing, replay_tensors

            with replay_routing(self.model, replay_tensors(routing[:, rows])):
                logits, router_logits = response_forward(self.model, *args, router_logits=router)
        else:
            logits, router_logits = response_forward(self.model, *args, router_logits=router)
        return gather_logp(logits, batch.response_ids[rows]), logits, router_logits

    def loss(self, batch, advantages: torch.Tensor, mask: torch.Tensor, rows: slice,
             ref_logp: torch.Tensor | None = None, *, shares: tuple[float, float, float] = (1.0, 1.0, 1.0),
             old_logp: torch.Tensor | None = None, is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Scalar loss (with grad) and metrics (unscaled, over `rows`) for `rows`.

        advantages: (B,) or (B, T); mask: (B, T) token weights; ref_logp: (B, T) or None (no KL term).
        shares: this part's share of the mini-batch's (loss_agg count, loss tokens, attended tokens) over all ranks;
        each term is scaled by its own (policy loss and KL, entropy, router loss), so that the ranks' losses sum to
        the one-learner loss (see the module docstring). old_logp: (B, T), default the rollout's `batch.logp`.
        is_weights: (B, T) TIS weights on the policy-gradient term, or None.
        """
        want_router = self.router_aux_coef > 0 or self.router_metrics or self.bias_rate > 0
        logp, logits, router_logits = self.forward(batch, rows, router=want_router and self.top_k > 0)
        m = mask[rows]
        rollout_logp = batch.logp[rows]  # the behaviour policy's log-probs, recorded by the rollout at temperature 1
        old_logp = rollout_logp if old_logp is None else old_logp[rows]
        extra = {} if is_weights is None else {"is_weights": is_weights[rows]}
        agg_share, token_share, attended_share = shares
        loss, metrics = self.policy_loss(logp, old_logp, advantages[rows], m, **self.loss_kwargs, **extra)
        total = loss * agg_share
        entropy = entropy_from_logits(logits)
        metrics["actor/entropy"] = float(masked_mean(entropy.detach(), m))
        metrics["actor/logp_mismatch"] = float(masked_mean((logp.detach() - rollout_logp).abs(), m))
        routing = getattr(batch, "routing", None)
        if self.routing_replay and routing is not None:  # loss tokens whose recorded experts this forward replayed
            recorded = (routing[0, rows, -m.shape[1]:] >= 0).all(-1).float()  # (R, T): layer 0 records every token
            metrics["actor/replayed_share"] = float(masked_mean(recorded, (m > 0).float()))
        if self.entropy_coef > 0:
            bonus = self.entropy_coef * masked_mean(entropy, m)
            loss, total = loss - bonus, total - bonus * token_share
        if ref_logp is not None and self.kl_coef > 0:
            kl, kl_metrics = kl_loss(logp, ref_logp[rows], m, kind=self.kl_kind, agg=self.loss_kwargs["agg"],
                                     max_len=self.loss_kwargs["max_len"])
            loss, total = loss + self.kl_coef * kl, total + self.kl_coef * kl * agg_share
            metrics |= kl_metrics
        if router_logits is not None:
            from posttrain.moe import aux_loss

            seq_mask = torch.cat([batch.prompt_mask[rows], batch.response_mask[rows]], dim=1)
            if self.router_aux_coef > 0:
                aux = aux_loss(self.model, router_logits, seq_mask)  # the objective of the model's family
                loss, total = loss + self.router_aux_coef * aux, total + self.router_aux_coef * aux * attended_share
                metrics["actor/router_aux_loss"] = float(aux.detach())
            if self.router_metrics or self._step_load is not None:
                with torch.no_grad():
                    metrics |= self._routing(batch, rows, router_logits, seq_mask)
        metrics["actor/loss"] = float(loss.detach())
        return total, metrics

    def _moe_routers(self) -> list:
        if self._routers is None:
            from posttrain.moe import moe_routers

            self._routers = moe_routers(self.model)
        return self._routers

    def _routing(self, batch, rows: slice, router_logits, seq_mask: torch.Tensor) -> dict:
        """From one loss forward's router logits (one (N, E) per MoE layer, N = rows * (P + T), seq_mask (rows,
        P + T)): the router metrics of the experts the routers pick (`moe.router_metrics`), and, during a `step` with
        the bias update on, this forward's expert load added to the step's: the experts the forward really used
        (the replayed ones where routing replay replays a recorded token)."""
        from posttrain.moe import expert_load, replay_tensors, replayed_experts, routed_experts, router_metrics

        n_experts = router_logits[0].shape[-1]
        experts = routed_experts(self.model, router_logits, self._moe_routers())  # the routers' own choice
        metrics = router_metrics(experts, mask=seq_mask, num_experts=n_experts) if self.router_metrics else {}
        if self._step_load is not None:
            routing = getattr(batch, "routing", None)
            if self.routing_replay and routing is not None:
                experts = [replayed_experts(own, r) for own, r in zip(experts, replay_tensors(routing[:, rows]))]
            self._step_load += expert_load(experts, seq_mask, n_experts).to(self._step_load.device)
        return metrics

    @torch.no_grad()
    def old_logp(self, batch, bounds: Sequence[tuple[int, int]], mask: torch.Tensor) -> torch.Tensor:
        """(B, T) the current policy's log-probs of the batch's response tokens (0 off each part's columns), computed
        part by part (`bounds`, the mini-batches; parts without a loss token are skipped) exactly as the update's
        forward computes them: TIS's pi_old."""
        out = torch.zeros_like(batch.logp)
        for lo, hi in bounds:
            if hi > lo and bool(mask[lo:hi].any()):
                part, cols = compact(batch, lo, hi)
                out[lo:hi, cols] = self.forward(part, slice(None))[0].to(out.dtype)
            elif self.sharded:  # one forward per part on every rank: FSDP's all-gathers are collective
                _idle_objective(self.model)
        return out

    # ---------------------------------------------------------------------------------------------- update
    def _counts(self, batch, mask: torch.Tensor, lo: int, hi: int) -> list[float]:
        """What rows lo..hi add to the counts the loss terms average over: [the loss_agg's count (loss tokens for
        token_mean, sequences with a loss token otherwise, as `agg_loss` counts them), loss tokens, attended
        (prompt + response) tokens]; all 0 for a part without a loss token (it computes nothing)."""
        m = mask[lo:hi]
        tokens = float(m.sum())
        if tokens == 0:
            return [0.0, 0.0, 0.0]
        seqs = float((m.sum(-1) > 0).sum())
        attended = float(batch.prompt_mask[lo:hi].sum() + batch.response_mask[lo:hi].sum())
        return [tokens if self.loss_kwargs["agg"] == "token_mean" else seqs, tokens, attended]

    def step(self, batch, advantages: torch.Tensor, mask: torch.Tensor | None = None, *, mini_batches: int = 1,
             group_size: int = 1, ref_logp: torch.Tensor | None = None,
             demos: DemoBatch | None = None) -> dict[str, float]:
        """One update per mini-batch (contiguous whole groups); returns metrics averaged over mini-batches.

        mask: (B, T) token weights, default `batch.loss_mask` (forced tokens 0); rows of dropped groups are 0.
        demos: the ptx demonstrations, one per group in group order; each mini-batch imitates its own groups'.
        Under data parallelism every rank must call `step` with the same `mini_batches` (the updates are
        collective), each on its own share of the groups.
        """
        mask = batch.loss_mask if mask is None else mask
        # a NaN/inf advantage (from a NaN reward, say) skips the whole step on every rank, masked rows included:
        # dynamic sampling would otherwise drop a NaN group as "all equal" and train on the rest
        bad = all_reduce_sum(torch.tensor([float((~torch.isfinite(advantages)).sum())], dtype=torch.float64))
        if float(bad) > 0:
            self.skipped_steps += 1
            return {"actor/updates": 0.0, "actor/skipped_steps": float(self.skipped_steps),
                    "actor/skip_reason": f"non-finite advantages ({int(bad)} values; a reward was NaN or inf?)"}
        self.model.train()
        collected: list[dict] = []
        if self.bias_rate > 0:  # `loss` adds each forward's expert load; applied after the last update
            first = self._bias_routers[0][1]
            self._step_load = torch.zeros(len(self._bias_routers), first.e_score_correction_bias.shape[-1],
                                          dtype=torch.float64, device=first.e_score_correction_bias.device)
        before = self._snapshot()  # a step is applied whole or not at all
        ptx = demos is not None and self.ptx_coef > 0
        # the demonstrations are divided among the mini-batches as the groups are (one per group, in group order,
        # as the RL driver passes them: each update imitates the demonstrations of its own problems)
        demo_parts = group_bounds(len(demos), 1, mini_batches) if ptx else [(0, 0)] * mini_batches
        bounds = group_bounds(len(batch), group_size, mini_batches)
        old, weights, tis_metrics = None, None, {}
        if self.correction is not None:  # pi_old from this learner, before the first update; the correction from
            old = self.old_logp(batch, bounds, mask)  # its ratio to the rollout's log-probs
            corr = self.correction(batch.logp, old, mask)
            weights, tis_metrics = corr.weights, corr.metrics
            if corr.keep is not None:  # masked IS: those tokens (rows) leave the loss and its counts
                mask = mask * corr.keep.to(mask.dtype)
        for (lo, hi), (d0, d1) in zip(bounds, demo_parts):
            local = self._counts(batch, mask, lo, hi)
            mine = demos.rows(d0, d1) if d1 > d0 else None
            local_demo = float(mine.response_mask.sum()) if mine is not None else 0.0
            *totals, demo_tokens = all_reduce_sum(torch.tensor(local + [local_demo], dtype=torch.float64)).tolist()
            if totals[0] == 0:
                continue  # no token to learn from on any rank
            self.optimizer.zero_grad(set_to_none=True)
            micro = micro_slices(batch, lo, hi, self.micro_batch_tokens) if local[0] > 0 else []
            # sharded, every rank runs as many forward/backward passes as the rank with the most micro-batches (its
            # own, then idle ones: FSDP's all-gathers and reduce-scatters must meet); agreed on before any of them
            passes = all_reduce_max(len(micro)) if self.sharded else len(micro)
            parts, loss = [], torch.zeros(())  # (metrics, loss_agg count, loss tokens) per micro-batch; summed loss
            for a, b in micro:  # each term scaled by the micro-batch's share of the mini-batch's counts (all ranks)
                counts = self._counts(batch, mask, a, b)
                if counts[0] == 0:  # no loss token in this micro-batch (a dropped group's rows)
                    if self.sharded:
                        _idle_objective(self.model).backward()
                    continue
                part, cols = compact(batch, a, b)  # no padding-only columns: no compute spent on them
                r = slice(a, b)
                adv = advantages[r] if advantages.dim() == 1 else advantages[r, cols]
                ref = None if ref_logp is None else ref_logp[r, cols]
                shares = tuple(mine_ / all_ for mine_, all_ in zip(counts, totals))
                tis = {} if old is None else {"old_logp": old[r, cols]}
                if weights is not None:
                    tis["is_weights"] = weights[r, cols]
                part_loss, part_metrics = self.loss(part, adv, mask[r, cols], slice(None), ref, shares=shares, **tis)
                part_loss.backward()
                loss = loss + part_loss.detach()
                parts.append((part_metrics, counts[0], counts[1]))
            for _ in range(passes - len(micro)):  # fewer micro-batches here (or none: nothing in this mini-batch)
                _idle_objective(self.model).backward()
            metrics = _weighted(parts)
            if local_demo > 0:  # + ptx_coef * (mean NLL per token of this mini-batch's demos, over all ranks)
                nll = demo_nll_sum(self.model, mine)
                (self.ptx_coef * nll / demo_tokens).backward()
                metrics["actor/ptx_nll"] = float(nll.detach()) / local_demo
            elif self.sharded and demo_tokens > 0:
                _idle_objective(self.model).backward()
            self._probe = self._probe_rows(batch, lo, hi) if local[0] > 0 else None
            try:
                metrics |= self._apply(loss)
            finally:
                self._probe = None
            collected.append(metrics)
            # a skip (every rank agrees on it) takes the step's earlier updates with it: a NaN after an update is
            # most often that update's doing, and the next rollout must not sample from it
            if "actor/skip_reason" in metrics:
                if len(collected) > 1:
                    metrics["actor/skip_reason"] += (f", after {len(collected) - 1} update(s) of this step (learning "
                                                     f"rate {self._lr():g} too high?): the step is undone")
                break
        self.model.eval()
        skipped = any("actor/skip_reason" in m for m in collected)
        if skipped:
            self._restore(before)
            self.skipped_steps += 1
        else:
            self.updates += len(collected)
        out = _average(collected) | tis_metrics | {"actor/updates": 0.0 if skipped else float(len(collected)),
                                                   "actor/skipped_steps": float(self.skipped_steps)}
        load, self._step_load = self._step_load, None
        if load is not None and collected and not skipped:  # every rank agrees on both, so all reach the all-reduce
            from posttrain.moe import update_correction_bias

            out |= update_correction_bias([r for _, r in self._bias_routers], all_reduce_sum(load), self.bias_rate)
        return out

    def _apply(self, loss: torch.Tensor) -> dict:
        """All-reduce gradients, clip, check finiteness (collectively), step and check the updated model; returns
        grad-norm metrics, with `actor/skip_reason` when the update must not stand (`step` then undoes the step)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if not self.sharded:  # FSDP has summed the gradients in its reduce-scatter
                all_reduce_sum(p.grad)
        if self.sharded:
            grad_norm = sharded_clip_grad_norm(self.params, self.max_grad_norm)
            ok, reason = finite_or_skip(loss, [(n, local_shard(p.grad)) for n, p in self.named_params])
        else:
            grad_norm = clip_grad_norm(self.params, self.max_grad_norm)
            ok, reason = finite_or_skip(loss, self.named_params)
        ok = ok and math.isfinite(grad_norm)
        agreed = all_reduce_sum(torch.tensor([0.0 if ok else 1.0]))  # any rank's fault skips everyone's step
        out = {"actor/grad_norm": grad_norm if math.isfinite(grad_norm) else float("nan")}
        if float(agreed) == 0:
            reason = self._step_and_check()
        else:
            reason = reason or ("grad norm %s" % grad_norm if not math.isfinite(grad_norm)
                                else "non-finite loss or gradient on another rank")
        if reason is not None:  # `step` puts the weights and optimizer state back as they were before the step
            out["actor/skip_reason"] = reason
        self.optimizer.zero_grad(set_to_none=True)
        return out

    # rows of the mini-batch whose logits are checked after an update (`_broken`), and the padding put before them:
    # enough to see a model that an update broke, a small share of the step's compute
    probe_rows, probe_pad = 4, 4

    def _probe_rows(self, batch, lo: int, hi: int) -> tuple:
        """(prompt_ids, prompt_mask, response_ids, response_mask) of the mini-batch's `probe_rows` rows with the
        shortest prompts, left-padded by `probe_pad` more pad tokens. Weights blown up but finite break padded rows
        first: an attention score on a pad token past float range is not masked out, and softmax turns it into NaN.
        The rollout's batches pad most prompts, so the probe must have padding even when this batch has none."""
        rows = lo + torch.argsort(batch.prompt_mask[lo:hi].sum(1), stable=True)[:self.probe_rows]
        cfg = self.model.config
        pad = next((i for i in (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None))
                    if isinstance(i, int)), 0)
        ids, mask = batch.prompt_ids[rows], batch.prompt_mask[rows]
        ids = torch.cat([torch.full((len(rows), self.probe_pad), pad, dtype=ids.dtype, device=ids.device), ids], 1)
        mask = torch.cat([torch.zeros((len(rows), self.probe_pad), dtype=mask.dtype, device=mask.device), mask], 1)
        return ids, mask, batch.response_ids[rows], batch.response_mask[rows]

    def _step_and_check(self) -> str | None:
        """`optimizer.step()`, then whether it broke the model (`_broken`) on any rank (agreed collectively, so every
        rank skips together). Returns why, or None."""
        try:
            self.optimizer.step()
            reason = self._broken()
        except RuntimeError as e:  # lr / (1 - beta1^t) past float32: "value cannot be converted ... without overflow"
            if "overflow" not in str(e):
                raise
            reason = f"the optimizer step overflowed (learning rate {self._lr():g} is too large: {e})"
        if float(all_reduce_sum(torch.tensor([0.0 if reason is None else 1.0]))) == 0:
            return None
        return reason or "the update broke the model on another rank"

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def _broken(self) -> str | None:
        """Why the just-updated model is unusable, or None: a non-finite weight, or non-finite logits on the
        mini-batch's probe rows (`_probe_rows`: weights finite but huge, from which the next rollout would fail to
        sample, "probability tensor contains inf/nan")."""
        flags = torch.stack([torch.isfinite(local_shard(p)).all() for p in self.params]).cpu()
        if self.sharded:  # every rank runs the probe forward (FSDP's all-gathers), then answers
            probe_ok = self._probe_finite() if self._probe is not None else bool(_idle_objective(self.model) == 0)
        if not bool(flags.all()):
            bad = [n for (n, _), ok in zip(self.named_params, flags.tolist()) if not ok]
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            return (f"the update made weights non-finite in {', '.join(bad[:3])}{more} (learning rate {self._lr():g} "
                    "too high?)")
        if self._probe is None:
            return None
        if not (probe_ok if self.sharded else self._probe_finite()):
            return f"the update made the model's logits non-finite (learning rate {self._lr():g} too high?)"
        return None

    def _probe_finite(self) -> bool:
        """Whether the logits on the probe rows are finite."""
        self.model.eval()  # as the rollout runs it
        try:
            logits, _ = response_forward(self.model, *self._probe)
        finally:
            self.model.train()
        return bool(torch.isfinite(logits[self._probe[3].bool()]).all())

    def _snapshot(self) -> tuple[list[torch.Tensor], list[dict]]:
        """Copies of the trainable weights and of their AdamW state (moments, step count), for `_restore`."""
        return ([p.detach().clone() for p in self.params],
                [{k: v.clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state[p].items()}
                 for p in self.params])

    @torch.no_grad()
    def _restore(self, saved) -> None:
        """Weights and optimizer state as `_snapshot` found them, bit for bit (a parameter without state then gets
        none, as before its first update)."""
        for p, w, state in zip(self.params, *saved):
            p.copy_(w)
            if state:
                self.optimizer.state[p] = state
            else:
                self.optimizer.state.pop(p, None)

    def trainable_weights(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """{state-dict name: tensor} of what the updates change (all weights for full fine-tuning, the adapter
        for LoRA, and the routers' correction biases when the bias update is on: buffers, never trainable, so they
        are named here), detached, on CPU, for `RolloutWorker.update_weights`. Sharded, every rank must call it (the
        tensors are gathered one by one); `keep=False` joins the gathers and keeps nothing (returns {})."""
        names = {n for n, _ in self.named_params}
        names = names | {n for n, _ in self._bias_routers} if names else names
        out = {}
        for n, t in self.model.state_dict().items():
            if n in names or not names:
                full = full_tensor(t.detach())
                if keep:
                    out[n] = full.to("cpu", copy=True)
        return out
