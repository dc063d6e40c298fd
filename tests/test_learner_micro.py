"""Micro-batches by token budget and gradient checkpointing take the one-pass step (issue #25 item 3).

`micro_batch_tokens` cuts each mini-batch into micro-batches (`rlbatch.micro_slices`) whose gradients accumulate,
each loss term scaled by its micro-batch's share of the mini-batch's counts (loss tokens for token_mean, sequences
otherwise), so the update equals one pass over the mini-batch for every loss_agg (the kind of bug issue #9 had in
`seq_mean_token_mean` would show here as gradients weighted by micro-batch instead of by sequence). The batch is
test_learner_dp's: ragged rows, a dropped group (whole micro-batches without a loss token), KL and entropy terms.
Two FSDP ranks with different numbers of micro-batches are in tests/test_learner_fsdp.py.
"""

import pytest
import torch

from test_learner_dp import AGGS, T, _inputs, _run

KWARGS = dict(lr=1e-2, max_len=T + 2, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, router_aux_coef=0.0,
              router_metrics=False, max_grad_norm=1e9)


def _learner(model_dir, agg, **kw):
    from posttrain.learner import Learner
    from posttrain.model import load_model

    torch.manual_seed(0)
    return Learner(load_model(model_dir), loss_agg=agg, **KWARGS, **kw)


def _same_step(one, other, what):
    assert len(one["loss"]) == len(other["loss"]), what
    for a, b in zip(one["loss"], other["loss"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), what
    for u, grads in enumerate(one["grads"]):
        scale = max(float(g.abs().max()) for g in grads.values())
        for name, want in grads.items():
            torch.testing.assert_close(other["grads"][u][name], want, atol=1e-5 * scale, rtol=1e-4,
                                       msg=lambda m: f"{what}, update {u}, {name}: {m}")
    for name, want in one["weights"].items():  # Adam's first step ~ lr * sign(g): test_learner_dp's tolerance
        torch.testing.assert_close(other["weights"][name], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mini_batches,micro", [(1, 24), (2, 11), (1, 1)], ids=["2rows", "1row", "tiny-budget"])
def test_micro_batches_take_the_one_pass_step(tiny_model_dir, agg, mini_batches, micro):
    from posttrain.rlbatch import micro_slices

    batch, adv, mask, ref = _inputs(str(tiny_model_dir))
    assert len(micro_slices(batch, 0, len(batch), micro)) >= 6  # really split
    one = _run(_learner(str(tiny_model_dir), agg), batch, adv, mask, ref, mini_batches)
    split = _run(_learner(str(tiny_model_dir), agg, micro_batch_tokens=micro), batch, adv, mask, ref, mini_batches)
    _same_step(one, split, f"{agg}, micro_batch_tokens {micro}")
    # the metrics of the loss terms are the one-pass values (the policy loss weighted by the loss_agg's count,
    # the token means by loss tokens)
    terms = ["actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/approx_kl", "actor/ratio_mean",
             "actor/clipfrac_low", "actor/logp_mismatch"]
    for k in terms:
        assert split["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-4, abs=1e-6), k


def test_gradient_checkpointing_takes_the_same_step(tiny_model_dir):
    batch, adv, mask, ref = _inputs(str(tiny_model_dir))
    one = _run(_learner(str(tiny_model_dir), "token_mean"), batch, adv, mask, ref, 2)
    learner = _learner(str(tiny_model_dir), "token_mean", gradient_checkpointing=True, micro_batch_tokens=40)
    assert learner.model.is_gradient_checkpointing
    _same_step(one, _run(learner, batch, adv, mask, ref, 2), "gradient checkpointing")


def test_micro_slices_cover_the_rows_within_the_budget(tiny_model_dir):
    from posttrain.rlbatch import micro_slices

    batch, *_ = _inputs(str(tiny_model_dir))
    width = lambda a, b: (b - a) * (int(batch.prompt_mask[a:b].sum(1).max())  # noqa: E731
                                    + max(1, int(batch.response_mask[a:b].sum(1).max())))
    for budget in (1, 8, 11, 24, 40, 10_000):
        cuts = micro_slices(batch, 2, 11, budget)
        assert cuts[0][0] == 2 and cuts[-1][1] == 11 and all(a < b for a, b in cuts)
        assert all(cuts[i][1] == cuts[i + 1][0] for i in range(len(cuts) - 1))
        assert all(width(a, b) <= budget or b - a == 1 for a, b in cuts), (budget, cuts)
        # greedy: a micro-batch could not have taken the next row
        assert all(width(a, b + 1) > budget for a, b in cuts[:-1]), (budget, cuts)
    assert micro_slices(batch, 2, 11, None) == [(2, 11)]


def test_checkpointing_with_routing_replay_is_refused(tiny_model_dir):
    from posttrain.recipe import RecipeError, load_recipe

    with pytest.raises(ValueError, match="gradient_checkpointing cannot be combined with routing_replay"):
        _learner(str(tiny_model_dir), "token_mean", gradient_checkpointing=True, routing_replay=True)
    with pytest.raises(RecipeError, match=r"grpo: .*gradient_checkpointing cannot be combined with routing_replay"):
        load_recipe(None, ["grpo.gradient_checkpointing=true", "grpo.routing_replay=true"])
    with pytest.raises(RecipeError, match=r"ppo\.micro_batch_tokens: .*greater than or equal to 1"):
        load_recipe(None, ["ppo.micro_batch_tokens=0"])
