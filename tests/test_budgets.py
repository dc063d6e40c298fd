"""Budget lists with ranges: drawing, metrics names, recipe errors, and SFT / RL rows that use them."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from posttrain.budgets import budget_label, draw_budget, entry_budget, round_significant
from posttrain.config import BudgetRange, TaskConfig
from posttrain.recipe import RecipeError, load_recipe


def test_lists_without_ranges_draw_as_rng_choice_did():
    entries = [0, 8, 16, "auto"]
    a, b = random.Random(3), random.Random(3)
    assert [draw_budget(a, entries) for _ in range(200)] == [
        None if e == "auto" else e for e in (b.choice(entries) for _ in range(200))]


def test_ranges_draw_every_value_of_the_range_and_nothing_else():
    r = BudgetRange(low=5, high=9)
    rng = random.Random(0)
    drawn = [draw_budget(rng, [0, r]) for _ in range(2000)]
    counts = {b: drawn.count(b) for b in set(drawn)}
    assert set(counts) == {0, 5, 6, 7, 8, 9}
    assert 900 <= counts[0] <= 1100  # the entry is drawn first (1/2), then the value (1/5 each)
    assert all(150 <= counts[b] <= 250 for b in range(5, 10)), counts
    assert {entry_budget(rng, r) for _ in range(200)} == set(range(5, 10))  # one entry: its range
    assert entry_budget(rng, 16) == 16 and entry_budget(rng, "auto") is None


def test_log_ranges_draw_each_value_with_its_log_share():
    """P(k) = log((k+1)/k) / log((high+1)/low), worked by hand for 1..7 (log 8 = 3 log 2): P(1) = 1/3,
    P(2) = log(3/2)/log 8 = 0.195, P(7) = log(8/7)/log 8 = 0.064; and every decade of 1..9999 about equally."""
    r = BudgetRange(low=1, high=7, scale="log")
    rng = random.Random(0)
    drawn = [entry_budget(rng, r) for _ in range(30000)]
    assert set(drawn) == set(range(1, 8))
    for k, p in [(1, 1 / 3), (2, 0.195), (7, 0.064)]:
        assert abs(drawn.count(k) / len(drawn) - p) < 0.01, (k, drawn.count(k) / len(drawn))
    assert sum(math.log((k + 1) / k) for k in range(1, 8)) == pytest.approx(math.log(8))
    wide = [entry_budget(rng, BudgetRange(low=1, high=9999, scale="log")) for _ in range(20000)]
    assert min(wide) >= 1 and max(wide) <= 9999
    shares = [sum(10 ** d <= b < 10 ** (d + 1) for b in wide) / len(wide) for d in range(4)]
    assert all(0.23 < s < 0.27 for s in shares), shares  # a linear draw: 0.001, 0.009, 0.09, 0.9
    assert str(BudgetRange(low=49, high=32768, scale="log")) == "49-32768log"


def test_rounded_ranges_draw_round_budgets_inside_the_range():
    # worked by hand: one significant digit rounds half up; a value the rounding would push out goes the other way
    assert [round_significant(b, 1, 49, 32768) for b in (49, 54, 55, 149, 150, 1499, 1500, 32768)] == [
        50, 50, 60, 100, 200, 1000, 2000, 30000]
    assert round_significant(45, 1, 40, 48) == 40 and round_significant(41, 1, 41, 48) == 41  # 40 and 50 both out
    assert round_significant(1234, 2, 1, 9999) == 1200 and round_significant(7, 2, 1, 9) == 7
    r = BudgetRange(low=49, high=32768, scale="log", significant=1)
    rng = random.Random(0)
    drawn = [entry_budget(rng, r) for _ in range(5000)]
    assert all(49 <= b <= 32768 and str(b).rstrip("0") in "123456789" for b in drawn)
    assert {100, 1000, 10000} <= set(drawn) and str(r) == "49-32768logr1"
    share = sum(b in (100, 1000, 10000) for b in drawn) / len(drawn)
    # each is the rounding of draws in [0.95, 1.5) x itself: 3 log(1.5/0.95) / log(32769/49) = 0.211
    assert abs(share - 3 * math.log(1.5 / 0.95) / math.log(32769 / 49)) < 0.02, share
    with pytest.raises(RecipeError, match=r"sft.budgets.0.significant: Input should be greater than or equal to 1"):
        load_recipe(None, ["sft.budgets=[{low: 1, high: 48, significant: 0}]"])


def test_labels_name_listed_budgets_else_their_range():
    entries = [0, 16, BudgetRange(low=8, high=48), "auto"]
    assert [budget_label(b, entries) for b in (None, 0, 16, 8, 17, 48, 60)] == [
        "auto", "0", "16", "8-48", "8-48", "8-48", "60"]


def test_recipe_reads_ranges_and_names_bad_ones():
    cfg = load_recipe(None, ["sft.budgets=[{low: 1, high: 48}, 64, {low: 49, high: 9999, scale: log}]",
                             "grpo.budgets=[0, {low: 4, high: 48}, auto]",
                             "rm.budgets=[auto, {low: 8, high: 64}]"])
    assert cfg.sft.budgets == [BudgetRange(low=1, high=48), 64, BudgetRange(low=49, high=9999, scale="log")]
    assert cfg.grpo.budgets[1] == BudgetRange(low=4, high=48) and cfg.grpo.budgets[2] == "auto"
    for override, expected in [
        ("grpo.budgets=[0, {low: 48, high: 8}]", "grpo.budgets.1: low (48) must be <= high (8)"),
        ("grpo.budgets=[0, {low: 8}]", "grpo.budgets.1.high: Field required"),
        ("grpo.budgets=[{low: 8, hi: 9}]", "grpo.budgets.0.hi: unknown key; did you mean 'grpo.budgets.0.high'?"),
        ("sft.budgets=[{low: 0, high: 8}]", "sft.budgets.0.low: Input should be greater than or equal to 1"),
        ("sft.budgets=[auto]", "sft.budgets.0: Input should be a valid integer"),
        ("ppo.budgets=[autoo]", "ppo.budgets.0: Input should be 'auto' (got 'autoo'); did you mean 'auto'?"),
        ("rm.budgets=[-1]", "rm.budgets: budgets must be a non-empty list"),
        ("sft.budgets=[{low: 1, high: 48, scale: logg}]", "sft.budgets.0.scale: Input should be 'linear' or 'log'"),
    ]:
        with pytest.raises(RecipeError) as ei:
            load_recipe(None, [override])
        assert expected in str(ei.value), (override, str(ei.value))
        assert str(ei.value).count("\n") == 1 + ("hi:" in override), str(ei.value)  # one line per mistake


def test_unknown_keys_in_list_sections_list_the_valid_ones():
    with pytest.raises(RecipeError) as ei:
        load_recipe(None, ["grpo.rewards=[{name: budget_forced, on: budgeted, parms: {}}]"])
    assert "grpo.rewards.0.parms: unknown key; did you mean 'grpo.rewards.0.params'? (valid keys here: name," in str(
        ei.value)


def test_sft_rows_draw_budgets_from_ranges_and_fit_them(tokenizer, arithmetic_sft):
    from posttrain.tasks.arithmetic import fit_trace, parse_expression
    from posttrain.tokenizer import THINK_END, count_tokens

    ex, rows = arithmetic_sft(300, 0, [BudgetRange(low=3, high=40)])
    budgets = [r["budget"] for r in rows]
    assert min(budgets) >= 3 and max(budgets) <= 40 and len(set(budgets)) >= 30
    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    for e, row in zip(ex, rows):
        think = tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]).split(THINK_END)[0]
        assert row["n_think"] == count(think) <= row["budget"]
        assert think == fit_trace(parse_expression(e.prompt), row["budget"], count)
        prompt = tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if not m])
        assert f"Thinking budget: {row['budget']} tokens." in prompt


class _Batch(SimpleNamespace):
    def __len__(self):
        return len(self.budgets)


def test_rl_steps_draw_from_ranges_and_pool_their_metrics():
    from posttrain.stages.rl_step import rollout_metrics
    from posttrain.tasks.task import build_task

    rc = load_recipe(None, ["grpo.prompts_per_step=64", "grpo.budgets=[0, {low: 10, high: 20}, auto]"])
    cfg = rc.grpo
    _, budgets = build_task(rc).step_problems(cfg, 5)
    assert build_task(rc).step_problems(cfg, 5)[1] == budgets  # deterministic in (seed, step)
    ranged = [b for b in budgets if b not in (0, None)]
    assert ranged and all(10 <= b <= 20 for b in ranged) and len(set(ranged)) > 3
    n = len(budgets)
    n_think = [b - 1 if b else 0 for b in budgets]  # one token under every budget: adherent
    batch = _Batch(budgets=budgets, n_think=n_think, closed=[True] * n, forced=[False] * n,
                   response_mask=torch.ones(n, 4))
    m = rollout_metrics(batch, [True] * n, cfg.budgets)
    assert m["budget/10-20/adherence"] == 1.0 and m["rollout/adherence"] == 1.0
    assert m["budget/10-20/think_tokens"] == pytest.approx(sum(b - 1 for b in ranged) / len(ranged))
    assert not any(k.startswith(f"budget/{b}/") for b in ranged for k in m)


def test_full_or_empty_demonstrates_the_full_trace_or_nothing(tokenizer, arithmetic_sft):
    from posttrain.tasks.arithmetic import make_trace, parse_expression
    from posttrain.tokenizer import THINK_END, count_tokens

    ex, rows = arithmetic_sft(200, 1, [BudgetRange(low=1, high=40)], "full_or_empty")
    kinds = set()
    for e, row in zip(ex, rows):
        think = tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]).split(THINK_END)[0]
        full = make_trace(parse_expression(e.prompt), "verbose", 1)
        fits = count_tokens(tokenizer, full) <= row["budget"]
        assert think == (full if fits else ""), (e.prompt, row["budget"], think)
        kinds.add(fits)
    assert kinds == {True, False}


def test_full_demonstrator_ignores_the_budget_and_mixes_per_example(tokenizer, arithmetic_sft):
    """`full` shows the whole verbose trace past a budget it does not fit; in a list with `most_explicit` each
    example takes one of the two, so some overrun and none of the others do."""
    from posttrain.tasks.arithmetic import fit_trace, make_trace, parse_expression
    from posttrain.tokenizer import THINK_END, count_tokens

    ex, rows = arithmetic_sft(300, 1, [BudgetRange(low=4, high=16)], ["most_explicit", "full"])
    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    past, fitted = 0, 0
    for e, row in zip(ex, rows):
        think = tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]).split(THINK_END)[0]
        p = parse_expression(e.prompt)
        full, fit = make_trace(p, "verbose", 1), fit_trace(p, row["budget"], count)
        assert think in (full, fit), (e.prompt, row["budget"], think)
        if full != fit:
            past += think == full
            fitted += think == fit
    assert past > 20 and fitted > 20
    with pytest.raises(ValueError, match="full_or_empty, full or full_read_back"):
        arithmetic_sft(1, 1, [8], "bogus")


def test_read_back_demonstrator_reads_the_problem_back_then_writes_the_full_trace_whatever_the_budget(tokenizer, arithmetic_sft):
    from posttrain.tasks.arithmetic import make_trace, parse_expression
    from posttrain.tokenizer import THINK_END, count_tokens

    ex, rows = arithmetic_sft(60, 1, [BudgetRange(low=4, high=16)], "full_read_back")
    assert len(rows) == len(ex)
    over = 0
    for e, row in zip(ex, rows):
        think = tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]).split(THINK_END)[0]
        p = parse_expression(e.prompt)
        assert think == f"{e.prompt}\n{make_trace(p)}"
        # the read-back line costs one token per operand pair, one for the first operand and one for its newline
        assert count_tokens(tokenizer, think) == count_tokens(tokenizer, make_trace(p)) + p.difficulty + 2
        over += row["n_think"] > row["budget"]
    assert over > 30
    from posttrain.tasks.embedded import teaches_read_back  # what tells the process reward a read-back is no error

    assert teaches_read_back("full_read_back") and teaches_read_back(["most_explicit", "full_read_back"])
    assert not teaches_read_back("most_explicit") and not teaches_read_back(["most_explicit", "full"])
