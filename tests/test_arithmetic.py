import random
import re

import pytest

from posttrain.tasks.arithmetic import (
    balanced_groups, evaluate_left_to_right, fit_trace, generate_problems, make_trace, make_trace_groups,
    most_lines_trace, parse_expression, random_groups, sample_fitting_trace, sample_problem, trace_ladder, truncated_trace,
)


def slow_left_to_right(expr: str) -> int:
    """Independent reference: parenthesise fully from the left and let Python evaluate it."""
    parts = re.findall(r"\d+|[-+*]", expr)  # the first number of a trace line may have two digits
    nested = parts[0]
    for i in range(1, len(parts), 2):
        nested = f"({nested}{parts[i]}{parts[i + 1]})"
    return eval(nested)  # the string holds only digits, + - * and parentheses


def test_spec_example():
    assert evaluate_left_to_right("7+3*2-5") == 15
    assert evaluate_left_to_right("2+3*4") == 20  # not 14: no precedence


@pytest.mark.parametrize("difficulty", range(1, 9))
def test_generator_matches_reference_and_bounds(difficulty):
    rng = random.Random(difficulty)
    for _ in range(300):
        p = sample_problem(rng, difficulty)
        expr = p.expression
        assert p.difficulty == difficulty and len(p.operands) == difficulty + 1
        assert all(0 <= d <= 9 for d in p.operands) and set(p.ops) <= {"+", "-", "*"}
        assert p.answer == slow_left_to_right(expr)
        for k in range(1, difficulty + 1):  # every intermediate value in 0..99
            assert 0 <= slow_left_to_right(expr[: 2 * k + 1]) <= 99


def test_generator_reproducible_and_covers_ops():
    a, b = generate_problems(200, seed=3), generate_problems(200, seed=3)
    assert [p.expression for p in a] == [p.expression for p in b]
    assert [p.expression for p in a] != [p.expression for p in generate_problems(200, seed=4)]
    ops = "".join(p.expression for p in a)
    assert all(ops.count(o) > 50 for o in "+-*")
    assert sorted({p.difficulty for p in a}) == list(range(1, 9))


def test_bad_difficulty_and_expression():
    with pytest.raises(ValueError, match="difficulty"):
        sample_problem(random.Random(0), 9)
    with pytest.raises(ValueError, match="not a left-to-right"):
        parse_expression("7+/3")


def _mixed_traces(p, rng):
    """The ladder's traces (uniform grouping, `group` = the most a line may fold) and random mixed groupings."""
    for style, group in trace_ladder(p):
        yield make_trace(p, style, group), group
    for n in range(1, p.difficulty + 1):
        groups = random_groups(rng, p.difficulty, n)
        assert len(groups) == n and sum(groups) == p.difficulty and min(groups) >= 1
        yield make_trace_groups(p, groups), max(groups)


def test_traces_check_out_step_by_step():
    rng = random.Random(0)
    for p in generate_problems(100, seed=1):
        pairs = re.findall(r"[-+*]\d", p.expression)
        for trace, group in _mixed_traces(p, rng):
            acc, used = None, 0
            for k, line in enumerate(trace.split("\n")):
                lhs, rhs = line.split("=")
                if k == 0:
                    assert lhs.startswith(str(p.operands[0]))
                    new = re.findall(r"[-+*]\d", lhs)
                else:  # restates the previous line's last pair, then applies its own pairs to the running value
                    restated, *new = re.findall(r"[-+*]\d", lhs)
                    assert restated == pairs[used - 1] and lhs.startswith(restated)
                    lhs = str(acc) + "".join(new)
                assert new == pairs[used:used + len(new)] and 1 <= len(new) <= group
                assert slow_left_to_right(lhs) == int(rhs), (trace, line)
                acc, used = int(rhs), used + len(new)
            assert acc == p.answer and used == p.difficulty


def test_make_trace_groups_example_and_errors():
    p = parse_expression("7+3*2-5*3")
    assert make_trace_groups(p, [1, 1, 2]) == "7+3=10\n+3*2=20\n*2-5*3=45"
    assert make_trace_groups(p, [1, 1, 1, 1]) == make_trace(p, "verbose")
    assert make_trace_groups(p, [2, 2]) == make_trace(p, "terse", 2)
    for bad in ([1, 1, 1], [0, 4], [2, 3]):
        with pytest.raises(ValueError, match="sum to the difficulty 4"):
            make_trace_groups(p, bad)


def test_random_groups_is_uniform_over_compositions():
    # compositions of 5 into 3 parts: C(4, 2) = 6, each should come up ~1/6 of the time
    rng = random.Random(0)
    counts = {}
    for _ in range(6000):
        g = tuple(random_groups(rng, 5, 3))
        counts[g] = counts.get(g, 0) + 1
    assert len(counts) == 6 and all(800 < c < 1200 for c in counts.values()), counts


def test_sample_fitting_trace_fits_and_spreads_over_line_counts(tokenizer):
    from posttrain.tokenizer import count_tokens

    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    rng = random.Random(0)
    p = parse_expression("8+9*3*1+2+8-5*1-8")  # 8 operators: a trace of L lines costs 8 + 4L - 1 tokens
    for budget in (11, 19, 27, 35):
        lines = set()
        for _ in range(60):
            t = sample_fitting_trace(p, budget, count, rng)
            assert 0 < count(t) <= budget
            lines.add(t.count("\n") + 1)
        assert lines == set(range(1, (budget - 8 + 1) // 4 + 1)), (budget, lines)  # every count that fits
    for budget in (39, 100):  # the full trace (39 tokens) fits: always it
        assert sample_fitting_trace(p, budget, count, rng) == make_trace(p, "verbose")
    # full_share=0.5: about half full, the rest over every line count that fits (full one included)
    draws = [sample_fitting_trace(p, 39, count, rng, full_share=0.5) for _ in range(400)]
    assert 150 <= sum(t == make_trace(p, "verbose") for t in draws) <= 280
    assert {t.count("\n") + 1 for t in draws} == set(range(1, 9))
    assert sample_fitting_trace(p, 10, count, rng) == "" and sample_fitting_trace(p, 0, count, rng) == ""


def test_balanced_groups_are_even_and_larger_first():
    for total in range(1, 9):
        for n in range(1, total + 1):
            g = balanced_groups(total, n)
            assert sum(g) == total and len(g) == n and max(g) - min(g) <= 1 and g == sorted(g, reverse=True)
    assert balanced_groups(4, 3) == [2, 1, 1] and balanced_groups(7, 2) == [4, 3]


def test_most_lines_trace_folds_fewer_operators_than_fit_trace(tokenizer):
    import itertools

    from posttrain.tokenizer import count_tokens

    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    p = parse_expression("8+9*3*1+2+8-5*1-8")  # values below 100: a trace of L lines costs 8 + 4L - 1 tokens
    assert most_lines_trace(p, 39, count) == make_trace(p, "verbose")
    assert most_lines_trace(p, 10, count) == "" and most_lines_trace(p, 0, count) == ""
    for budget in range(11, 39):
        t, uniform = most_lines_trace(p, budget, count), fit_trace(p, budget, count)
        lines = t.split("\n")
        assert count(t) <= budget and len(lines) == (budget - 8 + 1) // 4, budget  # the most lines that fit
        assert len(lines) >= uniform.count("\n") + 1
        # independent check: no grouping into that many lines folds fewer operators into its largest line
        sizes = [len(re.findall(r"[-+*]\d+", line)) - (k > 0) for k, line in enumerate(lines)]
        best = min(max(c) for c in itertools.product(range(1, 9), repeat=len(lines)) if sum(c) == 8)
        assert sum(sizes) == 8 and max(sizes) == best, (budget, t)
        assert int(lines[-1].split("=")[1]) == p.answer
    # fit_trace's uniform groups fold more than needed: at 27 it writes 4 lines of 2 where 5 lines fit
    assert fit_trace(p, 27, count).count("\n") + 1 == 4 and most_lines_trace(p, 27, count).count("\n") + 1 == 5
    # a value of 100+ costs a token more: a grouping that does not fit gives way to one line fewer
    q = parse_expression("9*9*2-8")  # running values 81, 162, 154; [2, 1] costs 12 tokens, [1, 2] 11
    assert most_lines_trace(q, 12, count) == "9*9*2=162\n*2-8=154"
    assert most_lines_trace(q, 11, count) == "9*9*2-8=154"


def test_truncated_trace_is_the_longest_verbose_prefix_that_fits(tokenizer):
    from posttrain.tokenizer import count_tokens

    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    p = parse_expression("8+9*3*1+2+8-5*1-8")  # verbose lines: 4 tokens, then 5 each (newline included)
    lines = make_trace(p, "verbose").split("\n")
    assert lines[:2] == ["8+9=17", "+9*3=51"]
    for budget, k in ((0, 0), (3, 0), (4, 1), (8, 1), (9, 2), (38, 7), (39, 8), (100, 8)):
        assert truncated_trace(p, budget, count) == "\n".join(lines[:k]), budget
    # truncate_share: the cut trace instead of a compressed one, only when the full trace is not taken
    rng = random.Random(1)
    draws = [sample_fitting_trace(p, 27, count, rng, truncate_share=0.5) for _ in range(400)]
    cut = "\n".join(lines[:5])
    assert 150 <= sum(t == cut for t in draws) <= 250
    assert all(count(t) <= 27 for t in draws) and len(set(draws)) > 20  # the rest: compressed traces
    assert sample_fitting_trace(p, 39, count, rng, truncate_share=1.0) == make_trace(p, "verbose")
    assert sample_fitting_trace(p, 27, count, rng, truncate_share=1.0) == cut


def test_fit_trace_fits_and_prefers_explicit(tokenizer):
    from posttrain.tokenizer import count_tokens

    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    p = parse_expression("8+9*3*1+2+8-5*1-8")
    assert fit_trace(p, 1000, count) == make_trace(p, "verbose", 1)
    for budget in (0, 5, 19, 25, 33, 47, 60):
        t = fit_trace(p, budget, count)
        assert count(t) <= budget
    assert fit_trace(p, 0, count) == ""
    assert count(fit_trace(p, 39, count)) > count(fit_trace(p, 38, count))  # verbose (39 tokens) vs terse
