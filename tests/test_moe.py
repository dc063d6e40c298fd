"""posttrain.moe: load-balancing loss against transformers, router metrics on hand-made routings, routing capture
in the rollout worker, and routing replay (R3) in the learner's teacher-forced forward."""

import copy
import math

import pytest
import torch

from posttrain import moe
from posttrain.learner import gather_logp, response_logits
from posttrain.workers.rollout import RolloutWorker

PROMPTS = ["7+3*2-5", "12-4", "3*3*3+1-8*2"]


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    """The tiny random model with larger random weights (router included), so that routing is not a near-tie
    everywhere and sampled responses are varied."""
    torch.set_num_threads(1)
    w = RolloutWorker(tiny_model_dir, threads=1)
    g = torch.Generator().manual_seed(0)
    w.update_weights({k: torch.randn(v.shape, generator=g) * (1.0 if "norm" in k else 0.3)
                      for k, v in w.model.state_dict().items() if "norm" in k or "proj" in k or "gate.weight" in k})
    return w


@pytest.fixture(scope="module")
def rollout(worker):
    return worker.generate(PROMPTS, [None, 4, 0], group_size=3, max_new_tokens=20, seed=1, record_routing=True)


def _tiny(family: str):
    """A randomly initialised tiny causal LM of each supported router family."""
    from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1,
                  bos_token_id=None)
    cfg = {
        "qwen3_moe": lambda: Qwen3MoeConfig(**common, num_experts=4, moe_intermediate_size=16, head_dim=16,
                                            norm_topk_prob=True),
        "qwen2_moe": lambda: Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=16,
                                            shared_expert_intermediate_size=16),
        "mixtral": lambda: MixtralConfig(**common, num_local_experts=4),
        "olmoe": lambda: OlmoeConfig(**common, num_experts=4),
    }[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for r in moe.moe_routers(model):
            r.weight.normal_(0, 1.0)
    return model.eval()


# ------------------------------------------------------------------------------------------ load balancing


def _slow_lb_loss(router_logits, top_k, mask):
    """Fedus et al. (2021) eqs. 4-6 with top-k counts, one token at a time, pooled over layers as transformers."""
    n_experts = router_logits[0].shape[-1]
    counts, probs, total = [0.0] * n_experts, [0.0] * n_experts, 0.0
    flat = mask.reshape(-1).tolist() if mask is not None else [1] * router_logits[0].shape[0]
    for layer in router_logits:
        for row, m in zip(layer, flat):
            if not m:
                continue
            p = torch.softmax(row.double(), -1).tolist()
            for e in sorted(range(n_experts), key=lambda e: -p[e])[:top_k]:
                counts[e] += 1
            for e in range(n_experts):
                probs[e] += p[e]
            total += 1
    return n_experts * sum(c / total * q / total for c, q in zip(counts, probs))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(masked):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(3 * 7, 6, generator=g) for _ in range(4))  # 4 layers, B=3, S=7, E=6
    mask = (torch.rand(3, 7, generator=g) > 0.3).long() if masked else None
    ours = moe.load_balancing_loss(logits, top_k=2, mask=mask)
    ref = load_balancing_loss_func(logits, num_experts=6, top_k=2, attention_mask=mask)
    torch.testing.assert_close(ours, ref)
    assert ours.item() == pytest.approx(_slow_lb_loss(logits, 2, mask), rel=1e-5)


def test_load_balancing_loss_from_recorded_logits_matches_model_aux_loss():
    """`record_routing(logits=True)` yields the router logits the model reports, and the loss of transformers."""
    model = _tiny("qwen3_moe")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with moe.record_routing(model, logits=True) as rec:
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    for ours, theirs in zip(rec.logits[0], out.router_logits):
        assert torch.equal(ours, theirs)
    torch.testing.assert_close(moe.load_balancing_loss(rec.logits[0], 2, mask), out.aux_loss)


# ------------------------------------------------------------------------------------------ metrics


def test_router_metrics_hand_made():
    E = 4
    uniform = torch.arange(8).remainder(E)[:, None]  # 8 tokens, top-1, each expert twice
    one = torch.zeros(8, 1, dtype=torch.long)  # all to expert 0
    pair = torch.tensor([[0, 1]] * 8)  # top-2, always experts 0 and 1
    m = moe.router_metrics([uniform, one, pair], num_experts=E)
    assert m["router/layer0/load_entropy"] == pytest.approx(1.0)
    assert m["router/layer0/max_share"] == pytest.approx(1 / E)
    assert m["router/layer1/load_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert m["router/layer1/max_share"] == pytest.approx(1.0)
    assert m["router/layer2/load_entropy"] == pytest.approx(math.log(2) / math.log(E))
    assert m["router/layer2/max_share"] == pytest.approx(0.5)
    assert m["router/load_entropy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["router/max_share"] == pytest.approx((0.25 + 1 + 0.5) / 3)


def test_router_metrics_exclude_padding_and_unrecorded_and_take_logits():
    E = 4
    experts = torch.tensor([[[0], [1], [2], [3]], [[3], [3], [3], [-1]]])  # (B=2, S=4, k=1)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]])  # second row: padding, then an unrecorded token
    m = moe.router_metrics(experts[None], mask=mask, num_experts=E)
    assert m["router/layer0/load_entropy"] == pytest.approx(1.0)
    logits = torch.nn.functional.one_hot(experts.clamp(min=0).reshape(-1), E).float() * 5  # argmax = the expert
    assert moe.router_metrics([logits], top_k=1, mask=mask.reshape(-1) * (experts >= 0).reshape(-1)) == m


# ------------------------------------------------------------------------------------------ record / replay


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_replaying_own_routing_is_exact_and_other_routing_is_used(family):
    model = _tiny(family)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), moe.record_routing(model) as rec:
        ref = model(input_ids=ids).logits
    own = rec.calls[0]
    assert len(own) == 2 and own[0].shape == (12, 2) and own[0].dtype == torch.long
    with torch.no_grad(), moe.replay_routing(model, own):
        assert torch.equal(model(input_ids=ids).logits, ref)
    with torch.no_grad(), moe.replay_routing(model, [torch.full_like(r, moe.UNRECORDED) for r in own]):
        assert torch.equal(model(input_ids=ids).logits, ref)  # nothing recorded: the router's own choice
    other = [(r + 1) % 4 for r in own]
    with torch.no_grad(), moe.record_routing(model) as outer, moe.replay_routing(model, other), \
            moe.record_routing(model) as inner:
        changed = model(input_ids=ids).logits
    assert not torch.allclose(changed, ref)
    assert all(torch.equal(a, b) for rec_ in (outer, inner) for a, b in zip(rec_.calls[0], other))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)  # hooks removed on exit


def test_replay_keeps_router_gradients():
    model = _tiny("qwen3_moe").train()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), moe.record_routing(model) as rec:
        model(input_ids=ids)
    routing = [(r + 1) % 4 for r in rec.calls[0]]
    with moe.replay_routing(model, routing):
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
    for r in moe.moe_routers(model):
        assert r.weight.grad is not None and torch.isfinite(r.weight.grad).all() and r.weight.grad.abs().sum() > 0


def test_unsupported_model_is_named():
    with pytest.raises(TypeError, match="Sequential"):
        moe.moe_routers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="1 layers of routing for 2 MoE layers"):
        with moe.replay_routing(_tiny("qwen3_moe"), [torch.zeros(3, 2, dtype=torch.long)]):
            pass


def test_replay_shape_mismatch_is_explained():
    model = _tiny("qwen3_moe")
    with pytest.raises(ValueError, match="batch \\* seq"):
        with torch.no_grad(), moe.replay_routing(model, [torch.zeros(5, 2, dtype=torch.long)] * 2):
            model(input_ids=torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------ rollout capture


def _teacher_forced(model, batch, routing=None):
    """(B, T) response log-probs, and the (L, B, P + T, k) routing the forward used."""
    with torch.no_grad(), moe.record_routing(model) as rec:
        if routing is None:
            logits = response_logits(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                     batch.response_mask)
        else:
            with moe.replay_routing(model, moe.replay_tensors(routing)):
                logits = response_logits(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                         batch.response_mask)
    used = torch.stack(rec.calls[0]).unflatten(1, (len(batch), -1))
    return gather_logp(logits, batch.response_ids) * batch.response_mask, used


def test_rollout_routing_is_the_teacher_forced_routing(worker, rollout):
    """Same weights: every recorded token has the experts a full forward over prompt + response gives it, which
    checks the scatter through the prompt-group repeat and the dropping of finished rows."""
    b = rollout
    B, P, T = len(b), b.prompt_ids.shape[1], b.response_ids.shape[1]
    assert b.routing.shape == (2, B, P + T, 2) and b.routing.dtype == torch.long
    lengths = b.response_mask.sum(1)
    assert (lengths < T).any()  # some rows stopped early and were dropped from the decoding batch
    recorded = (b.routing >= 0).all(-1)  # (L, B, P + T)
    expected = torch.ones(B, P + T, dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):
        expected[i, P + n - 1:] = False  # each row's last token was never fed forward; padding after it neither
    assert torch.equal(recorded, expected.expand_as(recorded))
    _, used = _teacher_forced(worker.model, b)
    assert torch.equal(used.sort(-1).values[recorded], b.routing.sort(-1).values[recorded])


def test_default_rollout_has_no_routing(worker):
    batch = worker.generate(PROMPTS[:1], [None], group_size=2, max_new_tokens=4, seed=0)
    assert batch.routing is None
    assert not any(r._forward_hooks for r in moe.moe_routers(worker.model))


def test_routing_replay_brings_learner_logp_closer_to_rollout(worker, rollout):
    """R3: the learner's router has drifted (small noise on the router weights), so some tokens' top-k experts
    flip; replaying the rollout's routing removes that part of the training-inference mismatch."""
    b = rollout
    learner = copy.deepcopy(worker.model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for r in moe.moe_routers(learner):
            r.weight.add_(torch.randn(r.weight.shape, generator=g) * 0.05 * r.weight.std())
    recorded = (b.routing >= 0).all(-1)
    plain, used = _teacher_forced(learner, b)
    flipped = (used.sort(-1).values != b.routing.sort(-1).values).any(-1) & recorded
    assert flipped.float().mean() > 0.01  # the drift did change routing, so the test can fail
    replayed, used_replay = _teacher_forced(learner, b, b.routing)
    assert torch.equal(used_replay[recorded], b.routing[recorded])
    mask = b.response_mask.bool()
    gap_plain = (plain - b.logp)[mask].abs().mean()
    gap_replay = (replayed - b.logp)[mask].abs().mean()
    print(f"mean |logp - rollout logp|: without replay {gap_plain:.5f}, with replay {gap_replay:.5f}, "
          f"flipped {flipped.float().mean():.3f}")
    assert gap_replay < 0.8 * gap_plain


def test_replay_of_a_minibatch_slice(worker, rollout):
    """The learner's mini-batch: `routing[:, rows]` follows the rows of every other field."""
    b, rows = rollout, torch.tensor([4, 0, 7])
    with torch.no_grad():
        full = response_logits(worker.model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
        with moe.replay_routing(worker.model, moe.replay_tensors(b.routing[:, rows])):
            part = response_logits(worker.model, b.prompt_ids[rows], b.prompt_mask[rows], b.response_ids[rows],
                                   b.response_mask[rows])
    mask = b.response_mask[rows].bool()
    torch.testing.assert_close(part[mask], full[rows][mask], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ sigmoid routers


def test_sequence_balance_loss_hand_made():
    """DeepSeek-V3 eqs. 17-20: 1 when balanced, E/k * the chosen experts' share of normalised score when one pair
    of experts takes every token; padding tokens and all-padding sequences are left out."""
    even = torch.tensor([[1.0, 1.0, 1.0, 1.0]] * 2)  # (N=2, E=4), normalised: 1/4 each
    split = torch.tensor([[0, 1], [2, 3]])  # each expert once over the 2 tokens, k = 2
    assert moe.sequence_balance_loss([even], [split]).item() == pytest.approx(1.0)
    peaked = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)
    pair = torch.tensor([[0, 1], [0, 1]])
    assert moe.sequence_balance_loss([peaked], [pair]).item() == pytest.approx(2.0)  # f = (2, 2, 0, 0), P = (.5, .5)
    # B=3, S=3: row 0 the balanced pair then padding, row 1 the collapsed pair then padding, row 2 all padding
    scores = torch.cat([even, torch.rand(1, 4), peaked, torch.rand(1, 4), torch.rand(3, 4)])
    experts = torch.cat([split, torch.tensor([[3, 2]]), pair, torch.tensor([[2, 3]]), torch.tensor([[0, 1]] * 3)])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    assert moe.sequence_balance_loss([scores] * 2, [experts] * 2, mask).item() == pytest.approx(1.5)
