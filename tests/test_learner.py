"""The policy learner: loss weighting of forced tokens, non-finite steps, router loss and metrics, and data
parallelism (2 learners over gloo take the same step as 1 learner on the whole batch)."""

import sys

import pytest
import torch


def _Batch(n=2):
    """A hand-made rollout batch: n rows, the second with a forced token at position 1."""
    from posttrain.workers.rollout import RolloutBatch

    g = torch.Generator().manual_seed(0)
    forced = torch.zeros(n, 3, dtype=torch.bool)
    forced[1, 1] = True
    return RolloutBatch(prompt_ids=torch.randint(3, 100, (n, 4), generator=g),
                        prompt_mask=torch.ones(n, 4, dtype=torch.long),
                        response_ids=torch.randint(3, 100, (n, 3), generator=g),
                        response_mask=torch.ones(n, 3, dtype=torch.long), logp=torch.zeros(n, 3),
                        forced_mask=forced, n_think=[3] * n, closed=[True] * n, forced=[False, True] + [False] * (n - 2),
                        group_index=list(range(n)), budgets=[None] * n, texts=[""] * n)


def test_forced_tokens_get_zero_loss_weight(tiny_model_dir):
    """d loss / d logp is 0 on the forced token and equal to -A / n_tokens on the others (token mean, ratio 1)."""
    from posttrain.learner import Learner, response_logits
    from posttrain.model import load_model

    learner = Learner(load_model(tiny_model_dir), clip_low=0.2, clip_high=0.28, router_metrics=False)
    batch = _Batch()
    with torch.no_grad():
        batch.logp = learner.forward(batch, slice(None))[0]
    captured = {}
    real = learner.forward

    def spy(b, rows, router=False):
        logp, logits, rl = real(b, rows, router)
        logp.retain_grad()
        captured["logp"] = logp
        return logp, logits, rl

    learner.forward = spy
    adv = torch.tensor([1.0, -2.0])
    loss, _ = learner.loss(batch, adv, batch.loss_mask, slice(None))
    loss.backward()
    grad = captured["logp"].grad
    n = batch.loss_mask.sum()
    expected = -adv[:, None] * batch.loss_mask / n
    assert grad[1, 1] == 0
    torch.testing.assert_close(grad, expected)

    # a teacher-forced pass over prompt + response scores the same tokens as scoring each row on its own
    logits = response_logits(learner.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                             batch.response_mask)
    one = learner.model(input_ids=torch.cat([batch.prompt_ids[:1], batch.response_ids[:1]], 1)).logits[:, 3:6]
    torch.testing.assert_close(logits[:1], one.float(), atol=1e-4, rtol=1e-4)


def test_non_finite_step_is_skipped_and_counted(tiny_model_dir):
    from posttrain.learner import Learner
    from posttrain.model import load_model

    learner = Learner(load_model(tiny_model_dir), lr=1e-2)
    batch = _Batch()
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    out = learner.step(batch, torch.tensor([float("nan"), 1.0]), group_size=1)
    assert learner.skipped_steps == 1 and out["actor/skipped_steps"] == 1.0 and "non-finite" in out["actor/skip_reason"]
    assert all(torch.equal(p, before[n]) for n, p in learner.model.named_parameters())
    learner.step(batch, torch.tensor([1.0, -1.0]), group_size=1)
    assert learner.skipped_steps == 1
    assert any(not torch.equal(p, before[n]) for n, p in learner.model.named_parameters())


def test_router_aux_loss_joins_the_loss_and_router_metrics_are_reported(tiny_model_dir):
    """The loss with router_aux_coef c equals the loss without it plus c * the load-balancing loss computed
    independently (transformers' load_balancing_loss_func on the same forward's router logits)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from posttrain.learner import Learner, response_forward
    from posttrain.model import load_model

    model = load_model(tiny_model_dir)
    batch = _Batch()
    adv = torch.tensor([1.0, -0.5])
    plain = Learner(model, router_aux_coef=0.0, router_metrics=False)
    with_aux = Learner(model, router_aux_coef=0.3)
    l0, _ = plain.loss(batch, adv, batch.loss_mask, slice(None))
    l1, m1 = with_aux.loss(batch, adv, batch.loss_mask, slice(None))
    _, router_logits = response_forward(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                        batch.response_mask, router_logits=True)
    mask = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    ref = load_balancing_loss_func(router_logits, model.config.num_experts, model.config.num_experts_per_tok, mask)
    torch.testing.assert_close(l1 - l0, 0.3 * ref, atol=1e-5, rtol=1e-4)
    assert 0 < m1["router/load_entropy"] <= 1 and 0 < m1["router/max_share"] <= 1
    assert "router/layer0/max_share" in m1


@pytest.mark.ray
def test_two_data_parallel_learners_take_the_same_step_as_one(tiny_model_dir, ray_session):
    """2 LearnerWorker actors over gloo, each on half the groups, end with the weights of one learner that saw
    the whole batch (token-mean loss: each rank scales by its share of the global token count)."""
    from posttrain.learner import group_bounds
    from posttrain.rlbatch import select_rows
    from posttrain.workers.actors import ActorOptions, spawn
    from posttrain.workers.learner import LearnerWorker
    from posttrain.workers.rollout import RolloutWorker

    roll = RolloutWorker(str(tiny_model_dir))
    batch = roll.generate(["1+2", "3*4", "5-1", "2+2"], [4, None, 0, 8], group_size=2, max_new_tokens=6, seed=0)
    adv = torch.linspace(-1, 1, len(batch))
    mask = batch.loss_mask
    kw = dict(lr=1e-2, seed=0)

    single = LearnerWorker(str(tiny_model_dir), **kw)
    single.step(batch, adv, mask, mini_batches=2, group_size=2)
    expected = single.weights()

    opts = ActorOptions(cpus=0.5, threads=1, max_restarts=0, timeout_s=120)
    learners = [spawn(LearnerWorker, str(tiny_model_dir), **kw, name=f"learner{i}", options=opts) for i in range(2)]
    url = learners[0].call(LearnerWorker.rendezvous)
    [p.result() for p in [w.submit(LearnerWorker.init_distributed, url, i, 2) for i, w in enumerate(learners)]]
    # uneven shares (3 groups and 1 group) so the per-rank loss scaling matters
    shares = [(0, 6), (6, 8)]
    assert group_bounds(len(batch), 2, 2) == [(0, 4), (4, 8)]
    pending = [w.submit(LearnerWorker.step, select_rows(batch, lo, hi), adv[lo:hi], mask[lo:hi], mini_batches=2,
                        group_size=2) for w, (lo, hi) in zip(learners, shares)]
    [p.result() for p in pending]
    got = [w.call(LearnerWorker.weights) for w in learners]
    for name, value in expected.items():
        torch.testing.assert_close(got[0][name], value, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(got[1][name], got[0][name], atol=0, rtol=0)  # the ranks never diverge
    for w in learners:
        w.kill()
