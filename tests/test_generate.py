"""One decoder: `generate` (the eval stage's, RM's and export's path) wraps `posttrain.decode.Decoder`, the loop the
RL stage's and the sweep's RolloutWorkers run, so both paths give one model the same responses; HF `generate` +
`ThinkCap` (`reference_generate`) is the independent check; and the cap forces `</think>` exactly at the budget."""

import pytest
import torch

from posttrain.generate import ThinkCap


N, MAX_NEW = 8, 14
MODES = {"natural": dict(cap=False), "capped": dict(cap=True), "forced": dict(cap=True, budget_in_prompt=False)}


def test_think_cap_forces_at_budget_and_counts_only_real_forcing():
    end, vocab, plen = 5, 8, 3
    cap = ThinkCap(end, [2, 2, None, 0], plen, "cpu")
    ids = torch.zeros(4, plen + 2, dtype=torch.long)  # two tokens generated, none of them </think>
    scores = torch.zeros(4, vocab)
    scores[0, 1] = 3.0  # row 0 wants token 1: must be forced
    scores[1, end] = 3.0  # row 1 wants </think> anyway: closes by itself
    scores[2, 1] = 3.0  # row 2 has no cap
    out = cap(ids, scores.clone())
    assert out[0].argmax() == end and out[0, 1] == float("-inf")
    assert out[1].argmax() == end
    assert out[2].argmax() == 1  # budget 0 rows are pre-closed by the prompt: never forced
    assert cap.forced.tolist() == [True, False, False, False]
    # one step earlier nothing is forced
    early = ThinkCap(end, [2, 2, None, 0], plen, "cpu")
    assert torch.equal(early(ids[:, : plen + 1], scores.clone()), scores) and not early.forced.any()


# ------------------------------------------------------------------------------------------ on the tiny model


@pytest.fixture(scope="module")
def thinker_dir(tmp_path_factory, talkative_model_dir):
    """The talkative model with larger `</think>` and `<think>` embeddings (tied: in and out): greedy, some rows
    close their think block by themselves, others run past every budget, and some write a second `<think>` (where
    `count_think_tokens_ids` and the decoder count differently)."""
    from posttrain.model import load_model, load_tokenizer, save_model
    from posttrain.tokenizer import think_token_ids

    model, tok = load_model(talkative_model_dir), load_tokenizer(talkative_model_dir)
    start, end = think_token_ids(tok)
    with torch.no_grad():
        model.get_output_embeddings().weight[end] *= 1.6
        model.get_output_embeddings().weight[start] *= 2.0
    return save_model(model, tok, tmp_path_factory.mktemp("thinker") / "model")


@pytest.fixture(scope="module")
def thinker(thinker_dir):
    from posttrain.model import load_model, load_tokenizer

    torch.set_num_threads(1)
    return load_model(thinker_dir).eval(), load_tokenizer(thinker_dir)


@pytest.fixture(scope="module")
def pool(thinker_dir):
    from posttrain.eval.sweep import start_workers

    torch.set_num_threads(1)
    workers = start_workers(thinker_dir, 1, "local", torch.device("cpu"))
    yield workers
    for w in workers:
        w.kill()


def _problems(n=N, seed=3):
    from posttrain.tasks.arithmetic import generate_problems

    return generate_problems(n, seed)


def _fields(r):
    return r.ids, r.text, r.n_think, r.closed, r.forced, r.budget


@pytest.mark.parametrize("mode", list(MODES))
def test_eval_path_and_sweep_path_give_the_same_responses(thinker, pool, mode):
    """`generate` (the eval stage) against `generate_responses` on RolloutWorkers (the sweep, the RL evaluation):
    the same ids, texts, thinking counts (every token before `</think>`), closing and forcing, in each mode."""
    from posttrain.eval.sweep import generate_responses
    from posttrain.generate import generate
    from posttrain.tokenizer import think_token_ids

    model, tok = thinker
    start, end = think_token_ids(tok)
    prompts = [p.expression for p in _problems()]
    seen = {"forced": 0, "self_closed": 0, "open": 0, "rethink": 0}
    for budget in (None, 0, 3, 8):
        ours = generate(model, tok, prompts, [budget] * N, MAX_NEW, batch_size=1, **MODES[mode])
        sweep = generate_responses(pool, prompts, budget, max_new_tokens=MAX_NEW, batch_size=1, **MODES[mode])
        assert [_fields(r) for r in ours] == [_fields(r) for r in sweep]
        for r in ours:
            if budget == 0 and mode != "forced":  # the prompt pre-closed the think block
                assert r.text.startswith("</think>\n\n") and (r.n_think, r.closed, r.forced) == (0, True, False)
                continue
            assert r.n_think == (r.ids.index(end) if end in r.ids else len(r.ids)) and r.closed == (end in r.ids)
            seen["forced"] += r.forced
            seen["self_closed"] += r.closed and not r.forced
            seen["open"] += budget is not None and not r.closed  # past its budget, unforced
            seen["rethink"] += start in r.ids[: r.n_think]
    assert seen["self_closed"] and seen["rethink"], seen  # not vacuous: both conventions' hard cases occur
    assert (seen["forced"] > 0) == (mode != "natural") and (seen["open"] > 0) == (mode == "natural"), seen


@pytest.mark.parametrize("cap", [False, True])
def test_eval_stage_rows_are_the_sweeps(thinker, pool, cap):
    """`eval.quick.evaluate_budgets` (the eval stage) and the sweep's grading and aggregation of its workers'
    responses give the same rows: accuracy, thinking tokens and adherence agree on one model."""
    from posttrain.eval.quick import evaluate_budgets
    from posttrain.eval.sweep import aggregate, generate_responses, grade_responses

    model, tok = thinker
    problems = _problems()
    rows = evaluate_budgets(model, tok, [3, "auto"], 0, 0, [], MAX_NEW, 1, cap, problems=problems,
                            grader="exact_int")
    for budget in (3, None):
        resp = generate_responses(pool, [p.expression for p in problems], budget, cap, MAX_NEW, 1)
        want = aggregate(grade_responses(problems, resp, "exact_int"), "", budget, "capped" if cap else "natural")
        got = [r for r in rows if r["budget"] == ("auto" if budget is None else str(budget))]
        keys = ("difficulty", "n", "accuracy", "think_tokens_mean", "adherence")
        assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]


@pytest.mark.parametrize("mode", list(MODES))
def test_decoder_matches_hf_reference_greedy(thinker, mode):
    """`generate` against `reference_generate` (HF generate + ThinkCap), greedy, batches of 4 sorted alike: the same
    tokens, texts and forcing; the same thinking count and closing wherever the model writes no second `<think>`
    (`count_think_tokens_ids` restarts its count there, even after `</think>`; the decoder, like the cap, counts every
    token before the first `</think>`)."""
    from posttrain.generate import generate, reference_generate
    from posttrain.rewards.parse import count_think_tokens_ids
    from posttrain.tokenizer import think_token_ids

    model, tok = thinker
    start, end = think_token_ids(tok)
    prompts = [p.expression for p in _problems()]
    forced = rethink = 0
    for budget in (None, 0, 3):
        ours = generate(model, tok, prompts, [budget] * N, MAX_NEW, batch_size=4, **MODES[mode])
        ref = reference_generate(model, tok, prompts, [budget] * N, MAX_NEW, batch_size=4, **MODES[mode])
        for a, b in zip(ours, ref):
            assert (a.ids, a.text, a.forced, a.budget) == (b.ids, b.text, b.forced, b.budget)
            preclosed = budget == 0 and mode != "forced"  # both: 0 thinking tokens, closed
            if start in a.ids and not preclosed:  # the reference restarts its count there, the decoder counts on
                assert (b.n_think, b.closed) == count_think_tokens_ids(b.ids, start, end)
                assert (a.n_think, a.closed) == ((a.ids.index(end), True) if end in a.ids else (len(a.ids), False))
                rethink += (a.n_think, a.closed) != (b.n_think, b.closed)
            else:
                assert (a.n_think, a.closed) == (b.n_think, b.closed)
        forced += sum(r.forced for r in ours)
    assert (forced > 0) == (mode != "natural") and rethink > 0


def test_worker_is_the_decoder(thinker, thinker_dir):
    """A RolloutWorker's batch (sampled groups, top-p, budgets) is `Decoder`'s on the same model and seed, logp and
    routing included: the worker adds loading and weight sync, no decoding of its own."""
    from posttrain.decode import Decoder
    from posttrain.workers.rollout import RolloutWorker

    model, tok = thinker
    worker = RolloutWorker(thinker_dir)
    kw = dict(group_size=3, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7, record_routing=True)
    prompts, budgets = [p.expression for p in _problems(3)], [None, 0, 4]
    a, b = Decoder(model, tok).generate(prompts, budgets, **kw), worker.generate(prompts, budgets, **kw)
    for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logp", "forced_mask", "routing"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert (a.texts, a.n_think, a.closed, a.forced, a.budgets) == (b.texts, b.n_think, b.closed, b.forced, b.budgets)


def test_sampling_is_seeded_across_batches_and_keeps_training_mode(thinker):
    from posttrain.generate import generate

    model, tok = thinker
    prompts = [p.expression for p in _problems()]

    def run(seed, batch_size=3):
        return [r.ids for r in generate(model, tok, prompts, [None, 4] * 4, 10, batch_size, do_sample=True,
                                        seed=seed)]

    model.train()
    try:
        a = run(0)
        assert model.training  # restored after decoding (in eval mode)
    finally:
        model.eval()
    assert run(0) == a and run(1) != a
    torch.manual_seed(5)
    b = run(None)
    torch.manual_seed(5)
    assert run(None) == b  # seed None: drawn from torch's global RNG, so a seeded caller is reproducible
    assert generate(model, tok, [], [], 10) == []
    with pytest.raises(ValueError, match="2 prompts but 1 budgets"):
        generate(model, tok, prompts[:2], [None], 10)
