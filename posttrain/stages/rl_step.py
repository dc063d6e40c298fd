"""The pure parts of one RL step (no workers, no IO): the rollout's metrics and the advantages, on a rollout batch
(`posttrain.rlbatch`). `stages/rl.py`'s driver calls them between its actors."""

from __future__ import annotations

from collections import defaultdict

import torch

from posttrain.budgets import adherent, budget_label


def rollout_metrics(batch, correct: list[bool], entries=()) -> dict[str, float]:
    """Accuracy, thinking tokens and adherence (closed within budget without forcing) overall and by budget (budgets
    drawn from a range of the budget list `entries` are pooled under its name, `8-48`)."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, b in enumerate(batch.budgets):
        by[budget_label(b, entries)].append(i)
    m = {"rollout/accuracy": sum(correct) / len(correct),
         "rollout/response_tokens": float(batch.response_mask.sum(1).float().mean()),
         "rollout/forced_share": sum(batch.forced) / len(batch)}
    adherent_all = []
    for label, rows in by.items():
        m[f"budget/{label}/accuracy"] = sum(correct[i] for i in rows) / len(rows)
        m[f"budget/{label}/think_tokens"] = sum(batch.n_think[i] for i in rows) / len(rows)
        if label != "auto":
            adh = [adherent(batch.closed[i], batch.forced[i], batch.n_think[i], batch.budgets[i]) for i in rows]
            m[f"budget/{label}/adherence"] = sum(adh) / len(adh)
            if label != "0":
                adherent_all += adh
    if adherent_all:
        m["rollout/adherence"] = sum(adherent_all) / len(adherent_all)
    return m


def compute_advantages(cfg, batch, scores: list[float], values=None, ref_logp=None,
                       marks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """(advantages (B,) or (B, T), loss mask (B, T), returns (B, T) or None, metrics). Pure: no workers.

    marks: (B, T) or None, per-token process rewards (`rl_task.first_error_marks`): added to the token rewards
    before GAE, or to the sequence advantages (which then become (B, T)) for the group estimators.
    """
    from posttrain.algo.advantages import compute_gae, dynamic_sampling_mask, masked_whiten
    from posttrain.algo.kl import kl_estimate
    from posttrain.algo.registry import get_adv_estimator

    r = torch.tensor(scores, dtype=torch.float32)
    mask = batch.loss_mask
    metrics: dict[str, float] = {}
    kl = None
    if ref_logp is not None and cfg.kl_in_reward and cfg.kl_coef > 0:
        kl = kl_estimate(batch.logp, ref_logp, cfg.kl_kind) * batch.response_mask
        metrics["actor/reward_kl_penalty"] = float(kl.sum() / batch.response_mask.sum().clamp(min=1))
    if cfg.adv_estimator == "gae":
        if values is None:
            raise ValueError("adv_estimator 'gae' needs a critic (the ppo stage)")
        token_r = torch.zeros_like(batch.logp)
        last = (batch.response_mask.sum(1) - 1).clamp(min=0)
        token_r[torch.arange(len(batch)), last] = r
        if marks is not None:
            token_r = token_r + marks
        if kl is not None:
            token_r = token_r - cfg.kl_coef * kl
        adv, returns = compute_gae(token_r, values, batch.response_mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, mask.bool()) * mask
        return adv, mask, returns, metrics
    if kl is not None:
        r = r - cfg.kl_coef * kl.sum(1)
    groups = torch.tensor(batch.group_index)
    adv = get_adv_estimator(cfg.adv_estimator)(r, groups)
    if marks is not None:
        adv = adv[:, None] + marks
        metrics["process/first_error_share"] = float((marks != 0).any(1).float().mean())
    if cfg.dynamic_sampling:
        keep, ds_metrics = dynamic_sampling_mask(r, groups)
        mask = mask * keep.long()[:, None]
        metrics |= ds_metrics
    return adv, mask, None, metrics
