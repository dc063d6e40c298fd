"""Data-parallel learners take the one-learner step for every loss_agg, with a dropped group on one rank.

Two real ranks (processes over gloo, the backend `LearnerWorker.init_distributed` picks on CPU) each run
`Learner.step` on their share of whole groups; their summed losses, their all-reduced gradients and their updated
weights must equal those of one learner that saw the whole batch. Three groups of four: rank 0 holds rows 0-8,
whose group 1 dynamic sampling dropped (mask all zero), rank 1 rows 8-12. `seq_mean_token_mean` used to weight the
ranks by their share of non-empty rows while the loss divided by all rows: gradients ~25% off.
"""

import pytest
import torch

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
SHARES = [(0, 8), (8, 12)]
GROUP = 4
T = 6


def _learner(model_dir, agg):
    from posttrain.learner import Learner
    from posttrain.model import load_model

    torch.manual_seed(0)
    return Learner(load_model(model_dir), lr=1e-2, loss_agg=agg, max_len=T + 2, kl_coef=0.1, kl_kind="k3",
                   entropy_coef=0.01, router_aux_coef=0.0, router_metrics=False, max_grad_norm=1e9)


def _run(learner, batch, adv, mask, ref, mini_batches: int = 1, step=None) -> dict:
    """`step` (default `learner.step`) on the batch; returns the loss each update applied, the whole gradients the
    optimizer stepped with (after the all-reduce, or gathered from FSDP's shards; max_grad_norm is too large to
    clip), the float metrics and the (local) weights after the step."""
    seen = {"loss": [], "grads": []}
    apply, opt_step = learner._apply, learner.optimizer.step

    def spy_apply(loss):
        seen["loss"].append(float(loss.detach()))
        return apply(loss)

    def spy_step(*a, **k):
        seen["grads"].append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                              for n, p in learner.named_params})
        return opt_step(*a, **k)

    learner._apply, learner.optimizer.step = spy_apply, spy_step
    try:
        metrics = (step or learner.step)(batch, adv, mask, mini_batches=mini_batches, group_size=GROUP,
                                         ref_logp=ref)
    finally:
        del learner._apply, learner.optimizer.step
    assert metrics["actor/updates"] >= 1.0, metrics
    return seen | {"metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
                   "weights": {n: p.detach().clone() for n, p in learner.named_params}}


def _inputs(model_dir):
    """A 12-row batch (3 groups of 4, ragged prompts and responses, a forced token) with rollout log-probs near the
    model's own (ratios on both sides of the clip range), advantages, the loss mask with group 1 dropped, and
    reference log-probs."""
    from posttrain.workers.rollout import RolloutBatch

    g = torch.Generator().manual_seed(3)
    n, P = 3 * GROUP, 5
    prompt_mask = (torch.arange(P)[None] >= P - torch.randint(2, P + 1, (n,), generator=g)[:, None]).long()
    response_mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (n,), generator=g)[:, None]).long()
    forced = torch.zeros(n, T, dtype=torch.bool)
    forced[9, 0] = True
    batch = RolloutBatch(prompt_ids=torch.randint(3, 100, (n, P), generator=g), prompt_mask=prompt_mask,
                         response_ids=torch.randint(3, 100, (n, T), generator=g), response_mask=response_mask,
                         logp=torch.zeros(n, T), forced_mask=forced, n_think=[1] * n, closed=[True] * n,
                         forced=[False] * n, group_index=[i // GROUP for i in range(n)], budgets=[None] * n,
                         texts=[""] * n)
    with torch.no_grad():
        own = _learner(model_dir, "token_mean").forward(batch, slice(None))[0]
    batch.logp = (own + 0.3 * torch.randn(n, T, generator=g)) * response_mask
    ref = (own + 0.5 * torch.randn(n, T, generator=g)) * response_mask
    adv = torch.randn(n, generator=g)
    mask = batch.loss_mask.clone()
    mask[GROUP:2 * GROUP] = 0  # group 1: all rewards equal, dropped by dynamic sampling
    return batch, adv, mask, ref


def _rank_main(rank: int, model_dir: str) -> dict:
    from posttrain.rlbatch import select_rows

    batch, adv, mask, ref = _inputs(model_dir)
    lo, hi = SHARES[rank]
    return {agg: _run(_learner(model_dir, agg), select_rows(batch, lo, hi), adv[lo:hi], mask[lo:hi], ref[lo:hi])
            for agg in AGGS}


def test_two_ranks_with_a_dropped_group_take_the_one_learner_step_for_every_loss_agg(tiny_model_dir, gloo_ranks):
    with gloo_ranks(_rank_main, str(tiny_model_dir)) as ranks:
        batch, adv, mask, ref = _inputs(str(tiny_model_dir))
        assert [bool(mask[lo:hi].any(1).all()) for lo, hi in SHARES] == [False, True]  # rank 0 holds the dropped rows
        single = {agg: _run(_learner(str(tiny_model_dir), agg), batch, adv, mask, ref) for agg in AGGS}
    for agg in AGGS:
        one, dp = single[agg], [r[agg] for r in ranks]
        assert sum(r["loss"][0] for r in dp) == pytest.approx(one["loss"][0], rel=1e-5, abs=1e-7), agg
        grads = one["grads"][0]
        scale = max(float(g.abs().max()) for g in grads.values())
        for name, want in grads.items():
            for r in dp:
                torch.testing.assert_close(r["grads"][0][name], want, atol=1e-5 * scale, rtol=1e-4,
                                           msg=lambda m: f"{agg}, {name}: {m}")
        # Adam's first step is nearly lr * sign(g): float-order differences in near-zero gradients give ~1e-5,
        # a wrongly weighted rank flips signs and moves weights by ~lr = 1e-2
        for name, want in one["weights"].items():
            torch.testing.assert_close(dp[0]["weights"][name], want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(dp[1]["weights"][name], dp[0]["weights"][name], atol=0, rtol=0)
