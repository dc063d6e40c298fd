"""The policy learner: loss weighting of forced tokens, non-finite steps, router loss and metrics, and data
parallelism (2 learners over gloo take the same step as 1 learner on the whole batch)."""

import dataclasses
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
@pytest.mark.parametrize("ptx_coef, atol", [(0.0, 2e-6), (0.5, 1e-4)])
def test_two_data_parallel_learners_take_the_same_step_as_one(tiny_model_dir, tokenizer, ray_session, ptx_coef, atol):
    """2 LearnerWorker actors over gloo, each on half the groups, end with the weights of one learner that saw
    the whole batch (token-mean loss: each rank scales by its share of the global token count), the ptx term
    included (each rank imitates the demonstrations of its own problems). With ptx, Adam's first step (nearly
    g / |g|) turns float-order differences in a few near-zero gradients into ~1e-5 differences, hence the
    looser tolerance; a wrongly scaled ptx term moves many weights by ~lr = 1e-2."""
    import dataclasses

    from posttrain.learner import group_bounds
    from posttrain.rlbatch import select_rows
    from posttrain.stages.rl_task import demo_batch
    from posttrain.tasks.arithmetic import parse_expression
    from posttrain.workers.actors import ActorOptions, spawn
    from posttrain.workers.learner import LearnerWorker
    from posttrain.workers.rollout import RolloutWorker

    roll = RolloutWorker(str(tiny_model_dir))
    prompts, budgets = ["1+2", "3*4", "5-1", "2+2"], [4, None, 0, 8]
    batch = roll.generate(prompts, budgets, group_size=2, max_new_tokens=6, seed=0)
    adv = torch.linspace(-1, 1, len(batch))
    mask = batch.loss_mask
    demos = demo_batch(tokenizer, [parse_expression(p) for p in prompts], budgets, tokenizer.pad_token_id)
    kw = dict(lr=1e-2, seed=0, ptx_coef=ptx_coef)

    single = LearnerWorker(str(tiny_model_dir), **kw)
    single.step(batch, adv, mask, mini_batches=2, group_size=2, demos=demos)
    expected = single.weights()

    opts = ActorOptions(cpus=0.5, threads=1, max_restarts=0, timeout_s=120)
    learners = [spawn(LearnerWorker, str(tiny_model_dir), **kw, name=f"learner{i}", options=opts) for i in range(2)]
    url = learners[0].call(LearnerWorker.rendezvous)
    [p.result() for p in [w.submit(LearnerWorker.init_distributed, url, i, 2) for i, w in enumerate(learners)]]
    # uneven shares (3 groups and 1 group) so the per-rank loss scaling matters
    shares = [(0, 6), (6, 8)]
    assert group_bounds(len(batch), 2, 2) == [(0, 4), (4, 8)]
    pending = [w.submit(LearnerWorker.step, select_rows(batch, lo, hi), adv[lo:hi], mask[lo:hi], mini_batches=2,
                        group_size=2, demos=dataclasses.replace(demos, **{k: v[lo // 2:hi // 2]
                                                                          for k, v in vars(demos).items()}))
               for w, (lo, hi) in zip(learners, shares)]
    [p.result() for p in pending]
    got = [w.call(LearnerWorker.weights) for w in learners]
    for name, value in expected.items():
        torch.testing.assert_close(got[0][name], value, atol=atol, rtol=1e-4)
        torch.testing.assert_close(got[1][name], got[0][name], atol=0, rtol=0)  # the ranks never diverge
    for w in learners:
        w.kill()


@pytest.mark.parametrize("mini_batches, first_demos", [(1, 3), (2, 2)])
def test_ptx_term_adds_the_demonstrations_nll_gradient(tiny_model_dir, tokenizer, mini_batches, first_demos):
    """ptx_coef: with zero advantages (no policy gradient) and no KL, the first update's gradient is exactly that
    of ptx_coef * mean NLL of its demonstration tokens (all three demonstrations with one mini-batch; with two,
    the first two, divided as `group_bounds` divides groups), and a few steps lower that NLL."""
    from posttrain.learner import Learner, demo_nll_sum
    from posttrain.model import load_model
    from posttrain.stages.rl_task import demo_batch
    from posttrain.tasks.arithmetic import parse_expression

    problems = [parse_expression(e) for e in ("7+3*2", "4-1", "9*9-5+2")]
    demos = demo_batch(tokenizer, problems, [16, None, 0], tokenizer.pad_token_id)
    model = load_model(tiny_model_dir)
    learner = Learner(model, lr=1e-2, router_metrics=False, router_aux_coef=0.0, ptx_coef=0.5, max_grad_norm=1e9)
    batch = _Batch()
    with torch.no_grad():
        batch.logp = learner.forward(batch, slice(None))[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    captured = {}
    real_apply = learner._apply

    def spy(loss):
        if not captured:
            captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return real_apply(loss)

    learner._apply = spy
    metrics = learner.step(batch, torch.zeros(2), demos=demos, mini_batches=mini_batches)
    assert metrics["actor/updates"] == mini_batches
    model.zero_grad()
    for n, p in model.named_parameters():  # the step changed the weights: recompute the reference at `before`
        p.data.copy_(before[n])
    first = dataclasses.replace(demos, **{k: v[:first_demos] for k, v in vars(demos).items()})
    (0.5 * demo_nll_sum(model, first) / first.response_mask.sum()).backward()
    for n, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().max() > 0:
            torch.testing.assert_close(captured[n], p.grad, atol=1e-6, rtol=1e-4)
    model.zero_grad()
    nll0 = metrics["actor/ptx_nll"]
    for _ in range(5):
        metrics = learner.step(batch, torch.zeros(2), demos=demos, mini_batches=mini_batches)
    assert metrics["actor/ptx_nll"] < nll0


def test_demo_batch_renders_prompts_as_rollouts_do_and_fits_the_budget(tokenizer):
    from posttrain.generate import render_prompts
    from posttrain.stages.rl_task import demo_batch
    from posttrain.tasks.arithmetic import parse_expression
    from posttrain.tokenizer import THINK_END

    problems = [parse_expression(e) for e in ("7+3*2-5*3+1", "4-1", "9*9-5+2")]
    budgets = [16, None, 0]
    demos = demo_batch(tokenizer, problems, budgets, tokenizer.pad_token_id)
    for i, (p, b, text) in enumerate(zip(problems, budgets, render_prompts(tokenizer, [p.expression for p in problems], budgets))):
        prompt = demos.prompt_ids[i][demos.prompt_mask[i].bool()].tolist()
        assert prompt == tokenizer(text, add_special_tokens=False)["input_ids"]
        resp = tokenizer.decode(demos.response_ids[i][demos.response_mask[i].bool()].tolist())
        assert resp.endswith(f"{p.answer}{tokenizer.eos_token}")
        if b == 0:
            assert THINK_END not in resp
        else:
            think = resp.split(THINK_END)[0]
            if b is None:  # autonomous: the full verbose trace
                assert think == "4-1=3"
            else:  # the verbose trace (21 tokens) does not fit 16; two operators a line (16 tokens) does
                assert think == "7+3*2=20\n*2-5*3=45\n*3+1=46"
                assert len(tokenizer(think, add_special_tokens=False)["input_ids"]) == 16
    full = demo_batch(tokenizer, problems, budgets, tokenizer.pad_token_id, traces="full")
    # budget 16 needs a compressed trace, budget 0 answers directly: both left to RL; autonomous kept
    assert full.response_mask[0].sum() == 0 and full.response_mask[2].sum() == 0
    assert torch.equal(full.response_mask[1], demos.response_mask[1])
    # a demonstrator that ignores the budget (`sft.budget_traces: full`): its overrun at 16 is not imitated, the
    # full trace within a budget it fits is
    from posttrain.tasks.arithmetic import make_trace

    blind = demo_batch(tokenizer, problems[:2], [16, 8], tokenizer.pad_token_id, traces="full",
                       fit=lambda p, b, count: make_trace(p))
    assert blind.response_mask[0].sum() == 0 and blind.response_mask[1].sum() > 0
    # one that reads the problem back first (`full_read_back`): where the full trace fits, it is the full trace
    # (without the preamble) that is imitated, as for every other demonstrator
    from posttrain.tasks.arithmetic import read_back_trace

    for fit in (make_trace, read_back_trace):
        wide = demo_batch(tokenizer, problems, [64, None, 64], tokenizer.pad_token_id, traces="full",
                          fit=lambda p, b, count: fit(p))
        assert torch.equal(wide.response_ids, demo_batch(tokenizer, problems, [64, None, 64], tokenizer.pad_token_id,
                                                          traces="full").response_ids)
        assert wide.response_mask.sum(1).gt(0).all()


def test_ptx_demonstrations_follow_the_sft_stages_budget_traces(tokenizer):
    import random

    from types import SimpleNamespace

    from posttrain.config import SFTStageConfig, TaskConfig
    from posttrain.stages.rl_task import demo_batch
    from posttrain.tasks.arithmetic import parse_expression
    from posttrain.tasks.embedded import ArithmeticTask, budget_trace

    def sft_demonstrator(sft, rng):  # as the RL stage draws the SFT stage's demonstrations
        task = ArithmeticTask(SimpleNamespace(sft=sft, task=TaskConfig()))
        return lambda p, b, count: task.budget_demonstration(p, b, count, rng)
    from posttrain.tokenizer import THINK_END, count_tokens

    p = parse_expression("7+3*2-5*3")  # the full trace (19 tokens) does not fit 16: three lines (15) do
    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731

    def think(demos):
        return tokenizer.decode(demos.response_ids[0][demos.response_mask[0].bool()].tolist()).split(THINK_END)[0]

    assert think(demo_batch(tokenizer, [p], [16], tokenizer.pad_token_id)) == "7+3*2=20\n*2-5*3=45"
    fit = sft_demonstrator(SFTStageConfig(budget_traces="most_lines"), random.Random(0))
    assert think(demo_batch(tokenizer, [p], [16], tokenizer.pad_token_id, fit=fit)) == "7+3*2=20\n*2-5=15\n-5*3=45"
    cfg = SFTStageConfig(budget_traces="sampled", full_trace_share=1.0, truncate_share=0.5)
    got = think(demo_batch(tokenizer, [p], [16], tokenizer.pad_token_id, fit=sft_demonstrator(cfg, random.Random(3))))
    assert got == budget_trace(p, 16, count, random.Random(3), "sampled", 1.0, 0.5)
    with pytest.raises(ValueError, match="budget_traces"):
        budget_trace(p, 16, count, random.Random(0), "shortest")


@pytest.mark.ray
def test_rendezvous_inside_ray_is_the_nodes_address_others_reach(tiny_model_dir, ray_session, monkeypatch):
    """Issue #25 item 4: rank 0's rendezvous is the node IP Ray uses (reachable from the other nodes of a cluster),
    not 127.0.0.1, inside an actor whatever RAY_ADDRESS says; outside Ray it is the loopback address."""
    import ray

    from posttrain.workers.actors import ActorOptions, spawn
    from posttrain.workers.learner import LearnerWorker, node_ip

    learner = spawn(LearnerWorker, str(tiny_model_dir), name="learner0",
                    options=ActorOptions(cpus=0.5, threads=1, max_restarts=0, timeout_s=120))
    try:
        url = learner.call(LearnerWorker.rendezvous)
    finally:
        learner.kill()
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    assert host == ray.util.get_node_ip_address() and int(port) > 0
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a process without Ray (one process per rank)
    assert node_ip() == "127.0.0.1"
