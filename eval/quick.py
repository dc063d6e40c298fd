"""Quick evaluation: accuracy and thinking length by difficulty for a few budgets on held-out problems.

Graded with the task's grader (`grade_responses`: the function the RL rewards and the RM labels use); grading and
aggregation are `posttrain.eval.sweep`'s (this is a sweep's subset: no intervals, one mode). Decoded by
`posttrain.generate.generate`, the sweep's own decoding loop (`posttrain.decode.Decoder`), so the responses, thinking
counts and forcing are the ones the sweep gets for the same model.
"""

from __future__ import annotations

from posttrain.generate import generate
from posttrain.tasks.arithmetic import generate_problems


_KEYS = ("difficulty", "n", "accuracy", "think_tokens_mean", "adherence")


def budget_label(b: int | str | None) -> str:
    return "auto" if b in (None, "auto") else str(b)


def evaluate_budgets(
    model,
    tokenizer,
    budgets: list[int | str],
    n_per_difficulty: int,
    seed: int,
    difficulties: list[int],
    max_new_tokens: int = 160,
    batch_size: int = 64,
    cap: bool = False,
    problems: list | None = None,
    grader: str | None = None,
) -> list[dict]:
    """Rows {budget, difficulty ('all' too), n, accuracy, think_tokens_mean, adherence} on fixed problems: the
    embedded task's (`n_per_difficulty` of each of `difficulties` from `seed`), or the given `problems` of a data
    file (the other three arguments unused); graded by `grader` (None: "exact_int" for the embedded task, "math"
    for given problems)."""
    from posttrain.eval.sweep import aggregate, grade_responses

    grader = grader or ("exact_int" if problems is None else "math")
    if problems is None:
        problems = generate_problems(n_per_difficulty * len(difficulties), seed, difficulties)
    rows = []
    for b in budgets:
        budget = None if b == "auto" else int(b)
        resp = generate(model, tokenizer, [p.expression for p in problems], [budget] * len(problems),
                        max_new_tokens=max_new_tokens, batch_size=batch_size, cap=cap)
        mode = "capped" if cap else "natural"
        for r in aggregate(grade_responses(problems, resp, grader), "", budget, mode):
            rows.append({"budget": budget_label(budget), **{k: r[k] for k in _KEYS}})
    return rows


def format_table(rows: list[dict]) -> str:
    """Difficulty down, budgets across: 'acc% (mean thinking tokens)'."""
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    diffs = sorted({r["difficulty"] for r in rows if r["difficulty"] != "all"}) + ["all"]
    cell = {(r["budget"], r["difficulty"]): r for r in rows}
    head = f"{'difficulty':>10} | " + " | ".join(f"{'budget ' + b:>16}" for b in budgets)
    lines = [head, "-" * len(head)]
    for d in diffs:
        parts = []
        for b in budgets:
            r = cell.get((b, d))
            parts.append(f"{100 * r['accuracy']:6.1f}% ({r['think_tokens_mean']:5.1f}t)" if r else f"{'-':>16}")
        lines.append(f"{str(d):>10} | " + " | ".join(parts))
    lines.append("cells: accuracy (mean thinking tokens)")
    return "\n".join(lines)
