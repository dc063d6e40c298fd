"""DeepSeek-V3's auxiliary-loss-free load balancing (arXiv 2412.19437, sec. 2.1.2): b_i += gamma * sign(mean load -
load_i) after each learner step. The pure update against a hand-worked example (and, repeated, balancing a skewed
router); a learner step on a tiny DeepSeek-V3 that moves every correction bias by the sign the formula gives for
the load its loss forwards really had (counted by a slow loop over the routing recorded from the step, routing
replay included); two data-parallel ranks make the one-learner update; the biases reach the rollout workers
(through a LoRA wrapper too) and the saved checkpoints; the recipe key is refused, naming it, for routers without a
correction bias; and the key off (the default) changes nothing."""

import json
from types import SimpleNamespace

import pytest
import torch

from posttrain import moe
from posttrain.moe_routers import bias_update, max_violation

RATE = 0.01
GROUP = 2


def _deepseek_config(tokenizer):
    """The tiny DeepSeek-V3 of tests/test_families.py: MLA, one shared expert, a dense first layer (so one MoE
    layer), 4 experts in 2 groups of which the best 1 is routed to, top-2."""
    import transformers as tf

    return tf.DeepseekV3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, num_experts_per_tok=2,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=None, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8, v_head_dim=8,
                               qk_nope_head_dim=8, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
                               n_group=2, topk_group=1, first_k_dense_replace=1)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory, tokenizer):
    """The tiny DeepSeek-V3 saved as a checkpoint, with larger random router weights and random correction biases
    (routing far from ties, biases that matter)."""
    from transformers import AutoModelForCausalLM

    from posttrain.model import save_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_deepseek_config(tokenizer), experts_implementation="grouped_mm")
    with torch.no_grad():
        for r in moe.moe_routers(model):
            r.weight.normal_(0, 1.0)
            r.e_score_correction_bias.normal_(0, 0.1)
    return save_model(model.eval(), tokenizer, tmp_path_factory.mktemp("deepseek") / "model")


def _learner(model_dir, **kw):
    from posttrain.learner import Learner
    from posttrain.model import load_model

    torch.manual_seed(0)
    kw = {"lr": 1e-3, "router_aux_coef": 0.0, "router_metrics": False, "router_bias_update_rate": RATE} | kw
    return Learner(load_model(model_dir), **kw)


def _batch(n_groups=2, seed=0):
    """n_groups groups of 2 rows, prompts left-padded and responses right-padded; in every group one row has the
    full prompt and the other the full response, so the learner's forward of a group (or of several) keeps every
    column (`rlbatch.compact` drops none) and its token layout is cat([prompt, response], 1) of those rows."""
    from posttrain.decode import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    n, P, T = n_groups * GROUP, 5, 4
    prompt_len = torch.tensor([P, 3] * n_groups)
    response_len = torch.tensor([2, T] * n_groups)
    prompt_mask = (torch.arange(P)[None] >= P - prompt_len[:, None]).long()
    response_mask = (torch.arange(T)[None] < response_len[:, None]).long()
    return RolloutBatch(prompt_ids=torch.randint(3, 100, (n, P), generator=g) * prompt_mask,
                        prompt_mask=prompt_mask,
                        response_ids=torch.randint(3, 100, (n, T), generator=g) * response_mask,
                        response_mask=response_mask, logp=torch.zeros(n, T), forced_mask=torch.zeros(n, T, dtype=bool),
                        n_think=[1] * n, closed=[True] * n, forced=[False] * n,
                        group_index=[i // GROUP for i in range(n)], budgets=[None] * n, texts=[""] * n)


def _biases(model) -> torch.Tensor:
    """(L, E) the correction biases of the model's routers."""
    return torch.stack([r.e_score_correction_bias.detach().clone() for _, r in moe.correction_bias_routers(model)])


def _slow_load(calls, masks, n_experts) -> torch.Tensor:
    """(L, E) top-k assignments of real tokens, one token at a time: calls[c][l] the (N_c, k) experts layer l used in
    forward c, masks[c] its (B_c, S_c) attention mask, N_c = B_c * S_c row-major."""
    n_layers = len(calls[0])
    load = [[0] * n_experts for _ in range(n_layers)]
    for call, mask in zip(calls, masks):
        B, S = mask.shape
        for layer in range(n_layers):
            assert call[layer].shape[0] == B * S
            for b in range(B):
                for s in range(S):
                    if mask[b, s]:
                        for e in call[layer][b * S + s].tolist():
                            load[layer][e] += 1
    return torch.tensor(load, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- the pure update


def test_bias_update_by_hand():
    """Loads (5, 1, 3, 3), mean 3: expert 0 is overloaded (-gamma), expert 1 underloaded (+gamma), 2 and 3 at the
    mean keep their bias; a layer that saw no token keeps all four. MaxVio = 5 / 3 - 1."""
    bias = torch.tensor([[0.1, -0.2, 0.0, 0.3], [0.5, 0.5, -0.5, 0.0]])
    load = torch.tensor([[5, 1, 3, 3], [0, 0, 0, 0]])
    new = bias_update(bias, load, 0.01)
    torch.testing.assert_close(new, torch.tensor([[0.09, -0.19, 0.0, 0.3], [0.5, 0.5, -0.5, 0.0]]))
    assert new.dtype == bias.dtype and torch.equal(bias[0], torch.tensor([0.1, -0.2, 0.0, 0.3]))  # a new tensor
    torch.testing.assert_close(bias_update(bias[0], load[0].double(), 0.5), torch.tensor([-0.4, 0.3, 0.0, 0.3]))
    torch.testing.assert_close(max_violation(load), torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    assert float(max_violation(torch.tensor([2, 2, 2, 2]))) == 0.0


def test_repeated_updates_balance_a_skewed_router():
    """Sigmoid scores with a strong preference for the first experts, top-2 of scores + bias: one expert gets far
    more than its share at first; 300 sign steps of 0.01 bring every expert within 20% of the mean."""
    g = torch.Generator().manual_seed(0)
    E, k = 8, 2
    scores = torch.sigmoid(torch.randn(4096, E, generator=g) + torch.linspace(2, -2, E))  # (N, E)
    bias = torch.zeros(E)

    def load(b):
        chosen = torch.topk(scores + b, k, dim=-1).indices
        return torch.bincount(chosen.reshape(-1), minlength=E)

    start = float(max_violation(load(bias)))
    for _ in range(300):
        bias = bias_update(bias, load(bias), 0.01)
    assert start > 1.0 and float(max_violation(load(bias))) < 0.2
    assert bias[0] < 0 < bias[-1]  # the favoured experts were pushed down, the shunned ones up


# ---------------------------------------------------------------------------------------------- the learner


@pytest.mark.parametrize("replay", [False, True])
def test_learner_step_moves_each_bias_by_the_sign_of_its_load(deepseek_dir, replay):
    """Two mini-batches (two optimizer updates), one bias update after both: every bias moves by RATE * sign(mean -
    load) of the load summed over the step's loss forwards, counted here by a slow loop over the routing those
    forwards recorded (the grad-enabled ones; the no-grad forward that checks the updated model is not the step's
    routing). With routing replay the load is the replayed experts' (group 0's tokens all sent to experts 2 and 3,
    against the routers' own choice; group 1 unrecorded, so its routers decide)."""
    learner = _learner(deepseek_dir, routing_replay=replay)
    batch = _batch()
    if replay:
        n, S = len(batch), batch.prompt_ids.shape[1] + batch.response_ids.shape[1]
        routing = torch.full((1, n, S, 2), -1, dtype=torch.long)
        routing[:, :GROUP] = torch.tensor([2, 3])
        batch.routing = routing
    before = _biases(learner.model)
    with moe.record_routing(learner.model, logits=True) as rec:
        metrics = learner.step(batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), mini_batches=2, group_size=GROUP)
    assert metrics["actor/updates"] == 2.0
    loss_calls = [c for c, logits in enumerate(rec.logits) if logits[0].requires_grad]
    assert len(loss_calls) == 2  # one loss forward per mini-batch
    masks = [torch.cat([batch.prompt_mask[lo:lo + GROUP], batch.response_mask[lo:lo + GROUP]], 1)
             for lo in range(0, len(batch), GROUP)]
    calls = [rec.calls[c] for c in loss_calls]
    if replay:
        assert (calls[0][0][masks[0].reshape(-1).bool()].sort(-1).values == torch.tensor([2, 3])).all()
    load = _slow_load(calls, masks, n_experts=4)
    assert load.sum() == 2 * sum(int(m.sum()) for m in masks)  # every real token counted k = 2 times
    expected = before + RATE * torch.sign(load.mean(-1, keepdim=True) - load)
    after = _biases(learner.model)
    torch.testing.assert_close(after, expected.float(), rtol=0, atol=1e-7)
    assert (after != before).any()  # not vacuous: the load is not balanced
    over, under = load > load.mean(-1, keepdim=True), load < load.mean(-1, keepdim=True)
    assert (after[over] < before[over]).all() and (after[under] > before[under]).all()
    assert metrics["router/bias_max"] == pytest.approx(float(after.max()))
    assert metrics["router/bias_min"] == pytest.approx(float(after.min()))
    assert metrics["router/max_violation"] == pytest.approx(float(load.max() / load.mean() - 1))


def test_off_by_default_changes_nothing(deepseek_dir):
    """router_bias_update_rate 0 (the Learner's and the recipe's default): a step leaves every bias as the
    checkpoint has it, the rollout workers get no bias, and no bias metric is logged."""
    from posttrain.config_rl import GRPOStageConfig, PPOStageConfig

    assert GRPOStageConfig().router_bias_update_rate == 0.0 == PPOStageConfig().router_bias_update_rate
    learner = _learner(deepseek_dir, router_bias_update_rate=0.0, router_metrics=True)
    before = _biases(learner.model)
    metrics = learner.step(_batch(), torch.tensor([1.0, -1.0, 0.5, -0.5]), mini_batches=2, group_size=GROUP)
    assert metrics["actor/updates"] == 2.0 and "router/load_entropy" in metrics
    assert torch.equal(_biases(learner.model), before)
    assert not any(k.startswith("router/bias") or k == "router/max_violation" for k in metrics)
    assert not any("e_score_correction_bias" in n for n in learner.trainable_weights())


def test_a_skipped_step_leaves_the_bias(deepseek_dir):
    """A step that is skipped (a non-finite update) is undone whole: the bias does not move either."""
    learner = _learner(deepseek_dir, lr=1e30)
    before = _biases(learner.model)
    metrics = learner.step(_batch(), torch.tensor([1.0, -1.0, 0.5, -0.5]), group_size=GROUP)
    assert "actor/skip_reason" in metrics and torch.equal(_biases(learner.model), before)


def test_the_bias_reaches_rollout_workers_and_checkpoints(deepseek_dir, tmp_path):
    """The updated biases are buffers, not parameters: `LearnerWorker.weights` carries them (full fine-tuning and
    LoRA, under the PEFT wrapper's names), a rollout worker takes them, and `save_state` / `load_state` and
    `save_model` keep them."""
    from posttrain.model import load_model
    from posttrain.workers.learner import LearnerWorker
    from posttrain.workers.rollout import RolloutWorker

    for lora in (None, {"r": 2, "alpha": 4}):
        worker = LearnerWorker(str(deepseek_dir), lora=lora, router_aux_coef=0.0, router_metrics=False,
                               router_bias_update_rate=RATE)
        before = _biases(worker.learner.model)
        worker.step(_batch(), torch.tensor([1.0, -1.0, 0.5, -0.5]), group_size=GROUP)
        after = _biases(worker.learner.model)
        assert (after != before).any()
        weights = worker.weights()
        names = [n for n in weights if n.endswith("e_score_correction_bias")]
        assert len(names) == 1
        rollout = RolloutWorker(str(deepseek_dir))
        if lora:
            rollout.enable_lora(lora)
        rollout.update_weights(weights, version=1)
        torch.testing.assert_close(_biases(rollout.model), after, rtol=0, atol=0)
    (tmp_path / "state").mkdir()
    worker.save_state(str(tmp_path / "state"))
    fresh = LearnerWorker(str(deepseek_dir), lora=lora, router_bias_update_rate=RATE)
    fresh.load_state(str(tmp_path / "state"))
    torch.testing.assert_close(_biases(fresh.learner.model), after, rtol=0, atol=0)
    saved = worker.save_model(str(tmp_path / "final"), str(deepseek_dir))
    torch.testing.assert_close(_biases(load_model(saved)), after, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- data parallel

SHARES = [(0, 2 * GROUP), (2 * GROUP, 3 * GROUP)]  # rank 0: groups 0-1, rank 1: group 2


def _dp_inputs():
    return _batch(n_groups=3, seed=1), torch.tensor([1.0, -1.0, 0.5, -0.5, 0.3, -0.3])


def _dp_step(learner, batch, adv) -> dict:
    metrics = learner.step(batch, adv, mini_batches=1, group_size=GROUP)
    return {"bias": _biases(learner.model), "metrics": {k: v for k, v in metrics.items() if k.startswith("router/")}}


def _rank_main(rank: int, model_dir: str) -> dict:
    from posttrain.rlbatch import select_rows

    batch, adv = _dp_inputs()
    lo, hi = SHARES[rank]
    return _dp_step(_learner(model_dir), select_rows(batch, lo, hi), adv[lo:hi])


def test_two_ranks_make_the_one_learner_bias_update(deepseek_dir, gloo_ranks):
    """Each rank counts only its own groups' tokens; with the loads summed across ranks both make exactly the
    update of one learner that saw the whole batch (one of them alone would have made another)."""
    from posttrain.rlbatch import select_rows

    with gloo_ranks(_rank_main, str(deepseek_dir)) as ranks:
        batch, adv = _dp_inputs()
        one = _dp_step(_learner(deepseek_dir), batch, adv)
        alone = [_dp_step(_learner(deepseek_dir), select_rows(batch, lo, hi), adv[lo:hi]) for lo, hi in SHARES]
    initial = _biases(_learner(deepseek_dir).model)
    assert (one["bias"] != initial).any()
    for r in ranks:
        torch.testing.assert_close(r["bias"], one["bias"], rtol=0, atol=0)
        assert r["metrics"] == pytest.approx(one["metrics"])
    # a rank on its own share would update otherwise: the sum over ranks is what made them agree
    assert any(not torch.equal(a["bias"], one["bias"]) for a in alone)


# ---------------------------------------------------------------------------------------------- refusals


def test_the_key_is_refused_for_routers_without_a_correction_bias(tiny_model_dir, tmp_path):
    """Softmax families, GPT-OSS, dense models, the base stage's embedded Qwen3-MoE: the problem names the
    section's key and how to turn it off; DeepSeek-V3 and GLM4-MoE take it. The recipe check refuses it at load
    and the Learner on a model without the bias."""
    from posttrain.recipe import RecipeError, load_recipe

    on = SimpleNamespace(routing_replay=False, router_aux_coef=0.0, router_bias_update_rate=0.001)
    rc = SimpleNamespace(stages=["grpo", "ppo"], grpo=on, ppo=on)
    qwen = {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2}
    problems = moe.check_moe_features(qwen, rc)
    assert [p.split(":")[0] for p in problems] == ["grpo.router_bias_update_rate", "ppo.router_bias_update_rate"]
    assert "the router of qwen3_moe is softmax top-k, without one" in problems[0]
    assert problems[1].endswith("set ppo.router_bias_update_rate: 0")
    for cfg in ({"model_type": "gpt_oss", "num_local_experts": 4}, {"model_type": "qwen3", "hidden_size": 32},
                {"model_type": "phimoe", "num_local_experts": 4}, None):
        assert [p.split(":")[0] for p in moe.check_moe_features(cfg, rc)] == ["grpo.router_bias_update_rate",
                                                                              "ppo.router_bias_update_rate"], cfg
    for model_type in ("deepseek_v3", "glm4_moe"):
        assert moe.check_moe_features({"model_type": model_type, "n_routed_experts": 4}, rc) == []
        assert moe.moe_features({"model_type": model_type, "n_routed_experts": 4})["bias_update"]
    assert "bias update (router_bias_update_rate): no" in moe.format_moe_features(moe.moe_features(qwen))
    off = SimpleNamespace(routing_replay=False, router_aux_coef=0.0, router_bias_update_rate=0.0)
    assert moe.check_moe_features(qwen, SimpleNamespace(stages=["grpo"], grpo=off, ppo=off)) == []

    args = [f"run_dir={tmp_path / 'run'}", "stages=[grpo]", f"model.path={tiny_model_dir}",
            "grpo.router_bias_update_rate=0.001"]
    with pytest.raises(RecipeError, match=r"grpo\.router_bias_update_rate: 0\.001 asks for DeepSeek-V3's"):
        load_recipe(None, args)
    with pytest.raises(ValueError, match=r"router_bias_update_rate: 0\.001 .* Qwen3MoeForCausalLM has none"):
        _learner(tiny_model_dir, router_bias_update_rate=0.001)


def test_grpo_stage_moves_the_bias_end_to_end(deepseek_dir, tmp_path, noisy_rewards):
    """The recipe key reaches the learners: a 2-step GRPO run (local backend, routing replay) on the tiny
    DeepSeek-V3 logs the bias metrics every step and its checkpoint holds moved biases."""
    from posttrain.model import load_model
    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe

    overrides = [f"run_dir={tmp_path / 'run'}", f"model.path={deepseek_dir}", "stages=[grpo]", "threads=1",
                 "ray.backend=local", "task.max_difficulty=2", "grpo.steps=2", "grpo.prompts_per_step=3",
                 "grpo.group_size=2", "grpo.budgets=[0,4,auto]", "grpo.max_new_tokens=8", "grpo.mini_batches=2",
                 "grpo.eval_n_per_difficulty=0", "grpo.kl_coef=0", "grpo.routing_replay=true",
                 f"grpo.router_bias_update_rate={RATE}"]
    info = run_recipe(load_recipe(None, overrides))["grpo"]
    lines = [json.loads(s) for s in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all({"router/bias_max", "router/bias_min", "router/max_violation"} <= set(m)
                                   for m in lines)
    moved = _biases(load_model(info["checkpoint"])) - _biases(load_model(deepseek_dir))
    assert (moved != 0).any() and moved.abs().max() <= 2 * RATE + 1e-6  # at most one step of RATE per RL step
