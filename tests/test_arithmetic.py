import random
import re

import pytest

from posttrain.tasks.arithmetic import (
    evaluate_left_to_right, fit_trace, generate_problems, make_trace, parse_expression, sample_problem, trace_ladder,
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


def test_traces_check_out_step_by_step():
    for p in generate_problems(100, seed=1):
        pairs = re.findall(r"[-+*]\d", p.expression)
        for style, group in trace_ladder(p):
            trace = make_trace(p, style, group)
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
