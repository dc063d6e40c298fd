"""Forced mode (no budget in the prompt, `</think>` forced after B thinking tokens: budget forcing of the autonomous
mode) on the real tiny model, in the sweep and the RL stage's evaluation, and the paired comparison of capped
against forced against hand-worked numbers."""

import csv
import json

import pytest
import torch

from posttrain.eval.forcing import forcing_comparison, format_forcing, hard_from
from posttrain.eval.sweep import MODES, SweepError, grade_responses


# --------------------------------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def pool(talkative_model_dir):
    from posttrain.eval.sweep import start_workers

    torch.set_num_threads(1)
    workers = start_workers(talkative_model_dir, 1, "local", torch.device("cpu"))
    yield workers
    for w in workers:
        w.kill()


def _problems(n=8, seed=3):
    from posttrain.tasks.arithmetic import generate_problems

    return generate_problems(n, seed)


def test_forced_prompt_has_no_budget_and_no_response_thinks_past_it(talkative_model_dir):
    from posttrain.workers.rollout import RolloutWorker

    torch.set_num_threads(1)
    worker = RolloutWorker(talkative_model_dir)
    tok, end = worker.tokenizer, worker.think_end_id
    prompts = [p.expression for p in _problems()]

    def shown(batch, i):
        return tok.decode(batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist())

    cut = 0
    for budget in (0, 3, 5):
        forced = worker.generate(prompts, [budget] * 8, 1, 14, greedy=True, cap=True, budget_in_prompt=False)
        capped = worker.generate(prompts, [budget] * 8, 1, 14, greedy=True, cap=True)
        auto = worker.generate(prompts, [None] * 8, 1, 14, greedy=True)
        for i in range(8):
            # (a) the prompt is the autonomous one, token for token: no budget line, no pre-closed think block
            assert "Thinking budget" not in shown(forced, i) and shown(forced, i).endswith("<think>")
            assert shown(forced, i) == shown(auto, i)
            assert ("Thinking budget" in shown(capped, i)) == (budget > 0)
            # (b) never more than `budget` thinking tokens: `</think>` at position n_think <= budget
            ids = forced.response_ids[i, : int(forced.response_mask[i].sum())].tolist()
            assert forced.closed[i] and forced.n_think[i] <= budget and ids.index(end) == forced.n_think[i], ids
            if forced.forced[i]:  # forced exactly at the budget, as capped mode forces
                cut += 1
                assert forced.n_think[i] == budget and forced.forced_mask[i].nonzero().flatten().tolist() == [budget]
            else:  # closed by itself within the budget: the autonomous response itself
                assert ids == auto.response_ids[i, : len(ids)].tolist()
        if budget == 0:  # not pre-filled by the prompt: </think> is the first generated token
            assert (forced.response_ids[:, 0] == end).all() and all(n == 0 for n in forced.n_think)
            assert all(t.startswith("</think>") for t in forced.texts)  # in the text: graded like any response
            assert all(t.startswith("</think>\n\n") for t in capped.texts) and not any(capped.forced)
    assert cut > 0  # the cap really cut responses: not a vacuous check


def test_forced_mode_matches_hf_generate_with_thinkcap(talkative_model_dir):
    """The independent reference (HF `generate` + the ThinkCap logits processor, greedy) given the same
    `budget_in_prompt=False`: the same tokens, thinking counts and forcing."""
    from posttrain.generate import reference_generate
    from posttrain.model import load_model, load_tokenizer
    from posttrain.workers.rollout import RolloutWorker

    torch.set_num_threads(1)
    prompts = [p.expression for p in _problems(6)]
    model, tok = load_model(talkative_model_dir), load_tokenizer(talkative_model_dir)
    worker = RolloutWorker(talkative_model_dir)
    forced = 0
    for budget in (0, 3):
        ref = reference_generate(model, tok, prompts, [budget] * 6, max_new_tokens=10, batch_size=6, cap=True,
                       budget_in_prompt=False)
        got = worker.generate(prompts, [budget] * 6, 1, 10, greedy=True, cap=True, budget_in_prompt=False)
        for i, r in enumerate(ref):
            n = int(got.response_mask[i].sum())
            assert got.response_ids[i, :n].tolist() == r.ids and got.texts[i] == r.text
            assert (got.n_think[i], got.closed[i], got.forced[i]) == (r.n_think, r.closed, r.forced)
        forced += sum(r.forced for r in ref)
    assert forced > 0


def test_forced_responses_reuse_autonomous_ones_like_a_fresh_capped_pass(pool):
    """`capped_responses(..., budget_in_prompt=False)` from the autonomous responses (what the sweep does) against
    generating every prompt with no budget and the cap (batches of one on both sides: the same floats)."""
    from posttrain.eval.sweep import capped_responses, generate_responses

    prompts = [p.expression for p in _problems()]
    auto = generate_responses(pool, prompts, None, False, 14, batch_size=1)
    for budget in (0, 3, 40):
        got = capped_responses(pool, prompts, auto, budget, 14, 1, budget_in_prompt=False)
        full = generate_responses(pool, prompts, budget, True, 14, 1, budget_in_prompt=False)
        assert got == full and all(r.budget == budget and r.n_think <= budget for r in got)
    assert capped_responses(pool, prompts, auto, None, 14, 1, budget_in_prompt=False) == auto  # auto: no cap


def test_sweep_writes_forced_rows_and_the_comparison(tmp_path, pool, talkative_model_dir):
    from posttrain.eval.forcing import KEYS
    from posttrain.eval.report import format_sweep_table, write_outputs
    from posttrain.eval.sweep import generate_responses, run_sweep

    # batches of one: the sweep's regenerated rows and the direct pass below see the same floats
    kw = dict(n_per_difficulty=2, difficulties=[1, 3, 5, 7], max_new_tokens=12, batch_size=1, backend="local")
    result = run_sweep([str(talkative_model_dir)], [0, 3, None], **kw)
    out = write_outputs(result.rows, tmp_path, result.forcing)
    # (d) sweep.json and sweep.csv hold a forced row per budget and difficulty, beside natural and capped
    saved = json.loads((out / "sweep.json").read_text())
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    for rows in (saved, table):
        assert {(str(r["budget"]), str(r["difficulty"])) for r in rows if r["mode"] == "forced"} == {
            (b, d) for b in ("0", "3", "auto") for d in ("1", "3", "5", "7", "all")}
    assert [r["mode"] for r in saved if r["difficulty"] == "all"] == list(MODES) * 3
    forced3 = next(r for r in saved if (r["mode"], r["budget"], r["difficulty"]) == ("forced", 3, "all"))
    assert forced3["forced_share"] > 0 and forced3["think_tokens_p90"] <= 3
    # the forced rows are the graded no-budget, capped responses on the same problems
    from posttrain.tasks.arithmetic import generate_problems

    problems = generate_problems(8, 12345, [1, 3, 5, 7])
    direct = grade_responses(problems, generate_responses(pool, [p.expression for p in problems], 3, True, 12, 1,
                                                          budget_in_prompt=False))
    assert forced3["accuracy"] == sum(r.correct for r in direct) / 8
    assert forced3["think_tokens_mean"] == sum(r.n_think for r in direct) / 8
    # auto has no cap: its forced row is the natural one
    auto = {r["mode"]: r for r in saved if r["budget"] == "auto" and r["difficulty"] == "all"}
    assert {k: v for k, v in auto["forced"].items() if k not in ("mode", "forced_share")} == {
        k: v for k, v in auto["natural"].items() if k not in ("mode", "forced_share")}
    # the comparison: budgets 0 and 3, pooled over 3 (the positive ones), all and hard (difficulty >= 4)
    forcing = json.loads((out / "forcing.json").read_text())
    assert forcing == result.forcing
    assert [(r["budget"], r["subset"]) for r in forcing] == [(b, s) for b in (0, 3, "pooled") for s in ("all", "hard")]
    assert all(r["hard_from"] == 4 and r["n"] == (8 if r["subset"] == "all" else 4) for r in forcing)
    with open(out / "forcing.csv") as f:
        assert [list(r) for r in csv.DictReader(f)][0] == ["model", *KEYS]
    assert "capped - forced [95% CI]" in format_sweep_table(result.rows, result.forcing)
    # without forced mode: no forced rows and no comparison file (not one left from an earlier sweep either)
    plain = run_sweep([str(talkative_model_dir)], [3], modes=["natural", "capped"], **kw)
    write_outputs(plain.rows, tmp_path, plain.forcing)
    assert not plain.forcing and not (tmp_path / "forcing.json").exists()
    assert {r["mode"] for r in plain.rows} == {"natural", "capped"}


def test_rl_evaluation_has_forced_mode(pool):
    from posttrain.eval.sweep import generate_responses
    from posttrain.stages.rl_eval import _without_vectors, evaluate_budget

    problems = _problems()
    row = evaluate_budget(pool, problems, 3, grade_responses, 12, 4)
    direct = grade_responses(problems, generate_responses(pool, [p.expression for p in problems], 3, True, 12, 4,
                                                          budget_in_prompt=False))
    assert row["correct_forced"] == [int(r.correct) for r in direct]
    assert row["accuracy_forced"] == sum(r.correct for r in direct) / len(problems)
    assert row["difficulties"] == [p.difficulty for p in problems] and len(row["correct_capped"]) == len(problems)
    assert set(_without_vectors({"3": row})["3"]) == {"accuracy", "think_tokens", "problems", "adherence",
                                                      "accuracy_capped", "accuracy_forced"}
    auto = evaluate_budget(pool, problems, None, grade_responses, 12, 4)
    assert "accuracy_forced" not in auto and "think_tokens_by_difficulty" in auto


# ------------------------------------------------------------------------------------ the paired comparison

# Per problem, difficulties 1..8 at each budget; the hard half is difficulty >= the median 4.5 (problems 4..7).
D = [1, 2, 3, 4, 5, 6, 7, 8]
PER_BUDGET = {
    0: (D, [0] * 8, [0] * 8),
    8: (D, [1, 1, 1, 0, 1, 1, 0, 0], [1, 0, 1, 0, 0, 0, 1, 0]),
    16: (D, [1] * 8, [1, 0, 1, 0, 0, 0, 0, 0]),
}
Z = 1.959964


def test_forcing_comparison_by_hand():
    """gained = capped right and forced wrong, lost = the reverse; diff = (gained - lost) / n;
    half = z * sqrt(gained + lost - (gained - lost)^2 / n) / n; p = 2 * P[Bin(gained + lost, 1/2) <= min]."""
    assert hard_from(D * 3) == 4.5
    rows = {(r["budget"], r["subset"]): r for r in forcing_comparison(PER_BUDGET)}
    assert list(rows) == [(b, s) for b in (0, 8, 16, "pooled") for s in ("all", "hard")]
    expect = {
        # budget 8, all: capped 5/8, forced 3/8; gained 3 (problems 1, 4, 5), lost 1 (6): diff 2/8;
        # half = z sqrt(4 - 4/8) / 8 = z * 1.870829 / 8 = 0.458345; p = 2 (1 + 4) / 16 = 0.625
        (8, "all"): (8, 5 / 8, 3 / 8, 0.25, 0.458345, 0.625, "unchanged"),
        # hard (4..7): capped 2/4, forced 1/4; gained 2, lost 1: diff 1/4; half = z sqrt(3 - 1/4) / 4 = 0.812558;
        # p = 2 (1 + 3) / 8 = 1
        (8, "hard"): (4, 0.5, 0.25, 0.25, 0.812558, 1.0, "unchanged"),
        # budget 16, all: capped 8/8, forced 2/8; gained 6, lost 0: diff 6/8; half = z sqrt(6 - 36/8) / 8 =
        # z * 1.224745 / 8 = 0.300057; p = 2 / 64 = 0.03125: capped measurably above forcing
        (16, "all"): (8, 1.0, 0.25, 0.75, 0.300057, 0.03125, "above"),
        # hard: capped 4/4, forced 0/4; gained 4: diff 1, half = z sqrt(4 - 16/4) / 4 = 0; p = 2 / 16 = 0.125
        (16, "hard"): (4, 1.0, 0.0, 1.0, 0.0, 0.125, "unchanged"),
        # budget 0 (not pooled): nothing differs
        (0, "all"): (8, 0.0, 0.0, 0.0, 0.0, 1.0, "unchanged"),
        # pooled over 8 and 16, all: n 16, capped 13/16, forced 5/16; gained 9, lost 1: diff 8/16;
        # half = z sqrt(10 - 64/16) / 16 = z * 2.449490 / 16 = 0.300057; p = 2 (1 + 10) / 1024 = 0.021484
        ("pooled", "all"): (16, 13 / 16, 5 / 16, 0.5, 0.300057, 22 / 1024, "above"),
        # pooled hard: n 8, capped 6/8, forced 1/8; gained 6, lost 1: diff 5/8; half = z sqrt(7 - 25/8) / 8 =
        # z * 1.968502 / 8 = 0.482274; p = 2 (1 + 7) / 128 = 0.125
        ("pooled", "hard"): (8, 6 / 8, 1 / 8, 0.625, 0.482274, 0.125, "unchanged"),
    }
    for key, (n, capped, forced, diff, half, p, verdict) in expect.items():
        r = rows[key]
        assert (r["n"], r["measurably"]) == (n, verdict), key
        assert (r["capped"], r["forced"], r["diff"]) == pytest.approx((capped, forced, diff)), key
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((diff - half, diff + half), abs=1e-6), key
        assert r["p_value"] == pytest.approx(p), key
        assert r["hard_from"] == 4.5 and r["pooled_over"] == ("8,16" if key[0] == "pooled" else None)
    text = format_forcing(list(rows.values()))
    assert "+75.0 [+45.0, +105.0]" in text and "hard d>=4.5" in text and "pooled over budgets 8,16" in text
    with pytest.raises(ValueError, match="budget 8 has 8 difficulties, 7 capped"):
        forcing_comparison({8: (D, [1] * 7, [1] * 8)})
    assert forcing_comparison({}) == []


def test_rl_verdict_prints_the_forcing_comparison():
    """The RL stage's verdict (what the quickstart prints at the end) carries the trained model's comparison, per
    budget and pooled, and the input model's pooled one; the numbers are `forcing_comparison`'s."""
    from posttrain.stages.rl_eval import _verdict, format_verdict, problems_fingerprint

    def ev(correct_forced_shift=0):
        out = {"auto": {"accuracy": 0.5, "correct": [1, 0], "problems": problems_fingerprint(["a", "b"])}}
        for b, (ds, cap, frc) in PER_BUDGET.items():
            frc = frc[correct_forced_shift:] + frc[:correct_forced_shift]
            out[str(b)] = {"accuracy": 0.5, "accuracy_capped": 0.5, "adherence": 0.5, "correct": cap,
                           "correct_capped": cap, "correct_forced": frc, "adherent": cap, "difficulties": ds,
                           "problems": problems_fingerprint([str(b)])}
        return out

    before, after = ev(1), ev()
    v = _verdict(before, after)
    trained = [r for r in v["forcing"] if r["model"] == "trained"]
    assert [{k: x for k, x in r.items() if k != "model"} for r in trained] == forcing_comparison(PER_BUDGET)
    assert [(r["budget"], r["subset"]) for r in v["forcing"] if r["model"] == "input"] == [("pooled", "all"),
                                                                                          ("pooled", "hard")]
    text = format_verdict(v)
    assert "capped - forced [95% CI]" in text and "trained     16  all" in text and "input   pooled  hard" in text
    assert "+50.0 [+20.0, +80.0]" in text  # trained, pooled over 8 and 16, all
    # evaluations without forced mode (an older eval_before.json): the verdict as before, no forcing rows
    old = {b: {k: x for k, x in r.items() if k != "correct_forced"} for b, r in after.items()}
    assert "forcing" not in _verdict(old, old)


def test_mode_options_are_checked_and_named():
    from posttrain.eval.sweep import run_sweep
    from posttrain.eval.sweep_options import parse_modes

    assert parse_modes("forced, natural,forced") == ["natural", "forced"]
    for spec in ("natural,bogus", "", "capped,,forced"):
        with pytest.raises(SweepError, match=r"--modes .*is not a mode; expected a comma-separated list of natural"):
            parse_modes(spec)
    for modes in (["bogus"], [], "forced"):
        with pytest.raises(SweepError, match=r"--modes"):
            run_sweep(["/no/such/model"], [4], modes=modes, backend="local", device="cpu")
