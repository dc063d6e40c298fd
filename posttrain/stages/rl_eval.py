"""The RL stage's before/after evaluation, apart from generation (pure: dicts and lists, no workers).

- `eval_problems`: each eval budget's held-out problems of the embedded task (`rl_problems` for data files);
- `problems_fingerprint` / `_paired`: before and after are compared only on the same problems;
- `_compare`: per budget and measure, the paired difference with its 95% interval and McNemar p-value;
- `_verdict`: the stage's claim, pooled over budgets (adherence over all, accuracy over the middle ones);
- `format_comparison`, `_brief`, `_without_vectors`: what the log and the summary show.
"""

from __future__ import annotations

import hashlib

PER_PROBLEM = {"accuracy": "correct", "accuracy_capped": "correct_capped", "adherence": "adherent"}


def eval_problems(n_per_difficulty: int, seed: int, difficulties: list[int], budget) -> list:
    """The RL stage's held-out problems at one eval budget (an int or `auto`): `n_per_difficulty` per difficulty,
    drawn from a seed made of `seed` and the budget, so each budget has problems of its own and adding a budget
    leaves the others' unchanged."""
    from posttrain.tasks.arithmetic import generate_problems

    mixed = int.from_bytes(hashlib.sha256(f"{seed}/{budget}".encode()).digest()[:8], "big")
    return generate_problems(n_per_difficulty * len(difficulties), mixed, difficulties)


def problems_fingerprint(prompts: list[str]) -> str:
    """A short hash of an ordered problem list: two evaluations are paired only when theirs are equal (a run
    resumed by another version, or with other eval settings, may hold an `eval_before.json` of other problems)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _paired(before: dict, after: dict, b: str) -> bool:
    """Budget `b` was evaluated on the same problems before and after (same fingerprint and count)."""
    return (b in before and before[b].get("problems") == after[b].get("problems")
            and len(before[b].get("correct", ())) == len(after[b].get("correct", ())))


def _compare(before: dict, after: dict) -> dict:
    """Per budget and measure (natural accuracy, capped accuracy, adherence): before, after, and the paired
    difference on the same problems with its 95% interval, McNemar p-value and whether it is measurable
    (`eval.stats.paired_difference`): the RL stage's claim, in the summary."""
    from posttrain.eval.stats import paired_difference

    out = {}
    for b in after:
        if b not in before:
            continue
        out[b] = {}
        for k, vec in PER_PROBLEM.items():
            if k not in after[b] or k not in before[b]:
                continue
            row = {"before": before[b][k], "after": after[b][k]}
            if vec in before[b] and vec in after[b] and _paired(before, after, b):
                d = paired_difference(before[b][vec], after[b][vec])
                row |= {"diff": d["diff"], "ci95": [d["ci_low"], d["ci_high"]], "p_value": d["p_value"],
                        "measurably": d["measurably"]}
            out[b][k] = row
    return out


def _verdict(before: dict, after: dict) -> dict:
    """The stage's claim over budgets pooled (paired on the same problems): adherence over every positive eval
    budget, and accuracy (natural and capped) over the middle budgets, those strictly between the smallest and
    the largest (all of them when there are fewer than three)."""
    from posttrain.eval.stats import paired_difference

    budgets = sorted(int(b) for b in after
                     if b != "auto" and _paired(before, after, b) and int(b) > 0 and "adherent" in after[b])
    if not budgets:
        return {}
    middle = budgets[1:-1] if len(budgets) >= 3 else budgets

    def pooled(bs, vec):
        d = paired_difference([x for b in bs for x in before[str(b)][vec]], [x for b in bs for x in after[str(b)][vec]])
        n = d["n"]
        before_rate = sum(x for b in bs for x in before[str(b)][vec]) / n
        return {"before": before_rate, "after": before_rate + d["diff"], "diff": d["diff"],
                "ci95": [d["ci_low"], d["ci_high"]], "p_value": d["p_value"], "measurably": d["measurably"]}

    return {"budgets": budgets, "middle_budgets": middle, "adherence": pooled(budgets, "adherent"),
            "accuracy_middle": pooled(middle, "correct"), "accuracy_capped_middle": pooled(middle, "correct_capped")}


def _without_vectors(ev: dict) -> dict:
    """An evaluation without its per-problem lists (kept in eval_before.json / eval_after.json)."""
    return {b: {k: v for k, v in r.items() if k not in PER_PROBLEM.values()} for b, r in ev.items()}


def format_comparison(cmp: dict, verdict: dict | None = None) -> str:
    """The comparison as a table: one line per budget and measure, then the pooled verdict lines."""
    lines = [f"{'budget':>6}  {'measure':<15} {'before':>7} {'after':>7} {'diff [95% CI]':>22}  {'p':>7}  verdict"]
    for b, measures in cmp.items():
        for k, r in measures.items():
            ci = f"{100 * r['diff']:+5.1f} [{100 * r['ci95'][0]:+5.1f}, {100 * r['ci95'][1]:+5.1f}]" if "diff" in r else "-"
            p = f"{r['p_value']:.3g}" if "p_value" in r else "-"
            lines.append(f"{b:>6}  {k:<15} {100 * r['before']:6.1f}% {100 * r['after']:6.1f}% {ci:>22}  {p:>7}  "
                         f"{r.get('measurably', '-')}")
    if verdict:
        lines.append(format_verdict(verdict))
    return "\n".join(lines)


def format_verdict(verdict: dict) -> str:
    """`_verdict` as text: which budgets were pooled, then one line per pooled measure, before -> after."""
    lines = ["pooled: adherence over budgets %s; accuracy over the middle budgets %s"
             % (",".join(map(str, verdict["budgets"])), ",".join(map(str, verdict["middle_budgets"])))]
    for k in ("adherence", "accuracy_middle", "accuracy_capped_middle"):
        r = verdict[k]
        lines.append(f"{'':>6}  {k:<22} {100 * r['before']:5.1f}% -> {100 * r['after']:5.1f}%  "
                     f"{100 * r['diff']:+5.1f} [{100 * r['ci95'][0]:+5.1f}, {100 * r['ci95'][1]:+5.1f}]  "
                     f"p {r['p_value']:.3g}  {r['measurably']}")
    return "\n".join(lines)


def _brief(ev: dict) -> str:
    parts = []
    for b, r in ev.items():
        adh = f" adh {r['adherence']:.2f} capped acc {r['accuracy_capped']:.2f}" if "adherence" in r else ""
        parts.append(f"[{b}] acc {r['accuracy']:.2f}{adh} think {r['think_tokens']:.1f}")
    return "  ".join(parts)
