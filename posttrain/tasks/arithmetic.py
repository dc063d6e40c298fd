"""The embedded task: left-to-right arithmetic.

Spec (kept exactly, so outside code can generate compatible problems):
- a problem is 2 to 9 single-digit operands (0-9) joined by ``+``, ``-``, ``*``;
- it is evaluated strictly left to right with no precedence: ``7+3*2-5`` = ((7+3)*2)-5 = 15;
- every intermediate value and the result lie in 0..99;
- the user message is the expression alone (``7+3*2-5``), the answer the integer alone (``15``);
- difficulty is the number of operators (1-8).

Thinking traces write the running value step by step; each line restates the last operand pair of the line
before it. The terse style folds ``group`` operators into one line, so a trace can be shrunk to fit a budget
at the cost of harder steps:

    verbose:           7+3=10\\n+3*2=20\\n*2-5=15
    terse, group=2:    7+3*2=20\\n*2-5=15
    terse, group=3:    7+3*2-5=15
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPS = ("+", "-", "*")
MIN_DIFFICULTY, MAX_DIFFICULTY = 1, 8
VALUE_MAX = 99
TRACE_STYLES = ("verbose", "terse")


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def pairs(self) -> list[str]:
        """Each operator with its digit, as a trace writes them: ``["+3", "*2", "-5"]`` for ``7+3*2-5``."""
        return [op + str(d) for op, d in zip(self.ops, self.operands[1:])]

    @property
    def expression(self) -> str:
        return str(self.operands[0]) + "".join(self.pairs)

    @property
    def difficulty(self) -> int:
        return len(self.ops)

    @property
    def running_values(self) -> list[int]:
        """Value after each operator, left to right (the last one is the answer)."""
        values, acc = [], self.operands[0]
        for op, d in zip(self.ops, self.operands[1:]):
            acc = apply_op(acc, op, d)
            values.append(acc)
        return values

    @property
    def answer(self) -> int:
        return self.running_values[-1]


def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def parse_expression(expr: str) -> Problem:
    """Parse ``7+3*2-5`` into a Problem; raises ValueError naming what is wrong."""
    expr = expr.strip()
    if len(expr) < 3 or len(expr) % 2 == 0:
        raise ValueError(f"not a left-to-right arithmetic expression: {expr!r}")
    digits, ops = expr[0::2], expr[1::2]
    if not digits.isdigit() or any(o not in OPS for o in ops):
        raise ValueError(f"not a left-to-right arithmetic expression: {expr!r}")
    return Problem(tuple(int(c) for c in digits), tuple(ops))


def evaluate_left_to_right(expr: str) -> int:
    """Value of an expression evaluated strictly left to right."""
    p = parse_expression(expr)
    return p.answer


def sample_problem(rng: random.Random, difficulty: int) -> Problem:
    """A random valid step sequence: each step picks an operator, then a digit, among those that keep the running
    value in 0..99, so every intermediate and the result are in range by construction (weights: `_step_weight`)."""
    if not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in {MIN_DIFFICULTY}..{MAX_DIFFICULTY}, got {difficulty}")
    acc = rng.randint(0, 9)
    operands, ops = [acc], []
    for _ in range(difficulty):
        by_op = {op: [d for d in range(10) if 0 <= apply_op(acc, op, d) <= VALUE_MAX] for op in OPS}
        weights = {op: [_step_weight(acc, op, d) for d in ds] for op, ds in by_op.items() if ds}
        op_names = sorted(weights)
        op = rng.choices(op_names, weights=[max(weights[o]) for o in op_names])[0]
        d = rng.choices(by_op[op], weights=weights[op])[0]
        acc = apply_op(acc, op, d)
        operands.append(d)
        ops.append(op)
    return Problem(tuple(operands), tuple(ops))


def _step_weight(acc: int, op: str, d: int) -> float:
    """Relative weight of a step: results of 0 and `*1` are rare, or long problems collapse to 0 (0 absorbs
    `*` and allows only `-0`), and an answer of 0 could be guessed without computing anything."""
    if apply_op(acc, op, d) == 0:
        return 0.1
    return 0.3 if op == "*" and d == 1 else 1.0


def generate_problems(n: int, seed: int, difficulties: tuple[int, ...] | list[int] = tuple(range(1, 9))) -> list[Problem]:
    """`n` problems, difficulties cycled evenly over `difficulties`, reproducible from `seed`."""
    rng = random.Random(seed)
    diffs = list(difficulties)
    return [sample_problem(rng, diffs[i % len(diffs)]) for i in range(n)]


def make_trace(p: Problem, style: str = "verbose", group: int = 2) -> str:
    """A thinking trace for `p`: one line per `group` operators (verbose: one), see the module docstring.

    Each line starts with the operand pair that ended the previous line (the first operand on the first line),
    then this line's pairs, then the running value: `+3*2=20` reads "after +3 came *2, giving 20". Repeating
    the last pair makes finding the next one a plain lookup (the token after that pair in the problem) and keeps
    the previous value at a fixed distance, which a small model learns quickly.
    """
    if style not in TRACE_STYLES:
        raise ValueError(f"trace style must be one of {TRACE_STYLES}, got {style!r}")
    if style == "verbose":
        group = 1
    if group < 1:
        raise ValueError("group must be >= 1")
    return make_trace_groups(p, [group] * (p.difficulty // group) + ([p.difficulty % group] if p.difficulty % group else []))


def make_trace_groups(p: Problem, groups: list[int]) -> str:
    """A trace whose k-th line folds `groups[k]` operators (they must sum to the difficulty): `[1, 1, 2]` on
    ``7+3*2-5*3`` gives ``7+3=10\\n+3*2=20\\n*2-5*3=45``. Every line costs 4 tokens besides its pairs, so with
    values below 100 a trace of L lines has difficulty + 4L - 1 tokens, whatever the grouping."""
    if any(g < 1 for g in groups) or sum(groups) != p.difficulty:
        raise ValueError(f"groups {groups} must be positive and sum to the difficulty {p.difficulty}")
    values, pairs = p.running_values, p.pairs
    lines, prev, i = [], str(p.operands[0]), 0
    for g in groups:
        j = i + g
        lines.append(f"{prev}{''.join(pairs[i:j])}={values[j - 1]}")
        prev, i = pairs[j - 1], j
    return "\n".join(lines)


def read_back_trace(p: Problem) -> str:
    """The full (verbose) trace after a line that reads the problem back (the expression alone, no value):
    ``7+3*2\\n7+3=10\\n+3*2=20``. It costs a token per operand pair and two more and computes nothing, like a reasoning
    model's "so the problem asks ..." preamble: free without a budget, a loss under one, where the lines it pushes
    past the budget are folded into the answer once `</think>` is forced (`sft.budget_traces: full_read_back`)."""
    return p.expression + "\n" + make_trace(p, "verbose")


def random_groups(rng: random.Random, total: int, n_lines: int) -> list[int]:
    """A uniformly random composition of `total` operators into `n_lines` non-empty lines."""
    cuts = sorted(rng.sample(range(1, total), n_lines - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


def trace_ladder(p: Problem) -> list[tuple[str, int]]:
    """Trace variants from most to least explicit: verbose (one operator a line), then terse with 2, 3, ...
    operators a line; each is shorter and asks more of each step."""
    return [("verbose", 1)] + [("terse", g) for g in range(2, p.difficulty + 1)]


def fit_trace(p: Problem, budget: int, count_tokens) -> str:
    """The most explicit trace whose token count fits `budget`; "" (no thinking) when none fits.

    count_tokens: callable str -> int (the tokenizer's count of thinking tokens).
    """
    if budget <= 0:
        return ""
    for style, group in trace_ladder(p):
        trace = make_trace(p, style, group)
        if count_tokens(trace) <= budget:
            return trace
    return ""


def balanced_groups(total: int, n_lines: int) -> list[int]:
    """`total` operators in `n_lines` lines as evenly as possible, the larger groups first: (4, 3) -> [2, 1, 1],
    (6, 4) -> [2, 2, 1, 1], (7, 2) -> [4, 3]."""
    size, extra = divmod(total, n_lines)
    return [size + 1] * extra + [size] * (n_lines - extra)


def most_lines_trace(p: Problem, budget: int, count_tokens) -> str:
    """The trace with the most lines that fits `budget`, its operators grouped as evenly as possible (the larger
    groups first, `balanced_groups`); the full (verbose) trace when it fits; "" when none fits.

    `fit_trace` only knows uniform groups, so it folds more than the budget asks: two lines of two for four
    operators where three lines (2-1-1) fit. A folded line is right far less often than a plain one for a small
    model (docs/rl_findings.md), so the fewer operators folded, the better.
    """
    if budget <= 0:
        return ""
    for n in range(p.difficulty, 0, -1):
        trace = make_trace_groups(p, balanced_groups(p.difficulty, n))
        if count_tokens(trace) <= budget:
            return trace
    return ""


def truncated_trace(p: Problem, budget: int, count_tokens) -> str:
    """The longest prefix of the verbose trace (whole lines) that fits `budget`; "" when not even its first line
    does. The answer that follows it must fold the operators the trace did not reach, as an answer after thinking
    forced closed at the budget must (s1's budget forcing; Qwen3's thinking budget)."""
    lines = make_trace(p, "verbose").split("\n")
    for k in range(len(lines), 0, -1):
        trace = "\n".join(lines[:k])
        if count_tokens(trace) <= budget:
            return trace
    return ""


def sample_fitting_trace(p: Problem, budget: int, count_tokens, rng: random.Random, full_share: float = 1.0,
                         truncate_share: float = 0.0) -> str:
    """With probability `full_share` the full (verbose) trace when it fits `budget`; otherwise one drawn among the
    traces that fit: a line count uniform over the counts that fit, then a random grouping of the operators into
    that many lines; "" when none fits.

    Demonstrations vary in how much of the budget they spend, and a demonstrator short of room has many ways to
    compress and no way of knowing which one the student model will execute best. Unlike `fit_trace` (always the
    most explicit), this shows the model all of them for RL to choose among (on the embedded task it did not
    choose better than SFT: docs/rl_findings.md).
    """
    if budget <= 0:
        return ""
    full = make_trace(p, "verbose")
    if count_tokens(full) <= budget and rng.random() < full_share:
        return full
    if rng.random() < truncate_share:
        return truncated_trace(p, budget, count_tokens)
    fits = [n for n in range(1, p.difficulty + 1)
            if count_tokens(make_trace_groups(p, [p.difficulty - n + 1] + [1] * (n - 1))) <= budget]
    if not fits:
        return ""
    n = rng.choice(fits)
    trace = make_trace_groups(p, random_groups(rng, p.difficulty, n))
    if count_tokens(trace) > budget:  # a value of 100+ would cost more; fall back to the grouping that was counted
        trace = make_trace_groups(p, [p.difficulty - n + 1] + [1] * (n - 1))
    return trace
