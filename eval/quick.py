"""Quick evaluation: accuracy and thinking length by difficulty for a few budgets on held-out problems.

Graded with `posttrain.rewards.parse.grade_integer`, the same grader the `exact_int` reward uses.
"""

from __future__ import annotations

from collections import defaultdict

from posttrain.generate import generate
from posttrain.rewards.parse import grade_integer
from posttrain.tasks.arithmetic import generate_problems


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
) -> list[dict]:
    """Rows {budget, difficulty ('all' too), n, accuracy, think_tokens_mean, adherence} on fixed problems."""
    problems = generate_problems(n_per_difficulty * len(difficulties), seed, difficulties)
    rows = []
    for b in budgets:
        budget = None if b == "auto" else int(b)
        resp = generate(model, tokenizer, [p.expression for p in problems], [budget] * len(problems),
                        max_new_tokens=max_new_tokens, batch_size=batch_size, cap=cap)
        groups: dict = defaultdict(list)
        for p, r in zip(problems, resp):
            rec = (grade_integer(r.text, p.answer), r.n_think,
                   budget is not None and r.closed and not r.forced and r.n_think <= budget)
            groups[p.difficulty].append(rec)
            groups["all"].append(rec)
        for d, recs in groups.items():
            n = len(recs)
            rows.append({
                "budget": budget_label(budget), "difficulty": d, "n": n,
                "accuracy": sum(r[0] for r in recs) / n,
                "think_tokens_mean": sum(r[1] for r in recs) / n,
                "adherence": (sum(r[2] for r in recs) / n) if budget is not None else None,
            })
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
