"""Budget forcing as the baseline a budget-trained model must beat: capped against forced, paired on the same problems.

Both modes force `</think>` after B thinking tokens; they differ only in the prompt. `capped` states the budget in
the prompt (what the model was trained for), `forced` states none (the autonomous mode, cut at B: s1's budget
forcing, Muennighoff et al. 2025, which any thinking model gets without training for budgets). Per budget and
pooled over the positive budgets, overall and on the hard half (difficulty >= the median difficulty of the
problems), `eval.stats.paired_difference` of forced -> capped: `diff` = capped accuracy - forced accuracy, and
`measurably` "above" when capped is measurably better (McNemar p < 0.05), "below" when forcing is.

Pure: per-problem lists in, rows out. Used by the sweep (`eval/sweep.py`, every model) and the RL stage's
before/after evaluation (`stages/rl_eval.py`, the trained model).
"""

from __future__ import annotations

from posttrain.eval.stats import paired_difference, quantile

KEYS = ("budget", "subset", "hard_from", "pooled_over", "n", "capped", "forced", "diff", "ci_low", "ci_high",
        "p_value", "measurably")


def hard_from(difficulties: list) -> float:
    """The hard half's lower bound: the median of the problems' difficulties (the problems with difficulty >= it
    are the hard half; 1..8 evenly: 4.5, so 5..8)."""
    if not difficulties:
        raise ValueError("hard_from: no difficulties given")
    return quantile(list(difficulties), 0.5)


def compare(capped: list, forced: list) -> dict:
    """Capped against forced accuracy on the same problems (`capped[i]`, `forced[i]`: problem i answered right)."""
    d = paired_difference([bool(x) for x in forced], [bool(x) for x in capped])
    n = d["n"]
    return {"n": n, "capped": sum(map(bool, capped)) / n, "forced": sum(map(bool, forced)) / n, "diff": d["diff"],
            "ci_low": d["ci_low"], "ci_high": d["ci_high"], "p_value": d["p_value"], "measurably": d["measurably"]}


def forcing_comparison(per_budget: dict, threshold: float | None = None) -> list[dict]:
    """Rows (`KEYS`) for each budget of `per_budget` (int budget -> (difficulties, capped, forced): three lists in
    the order of that budget's problems), in its order, then pooled over the positive budgets; each "all" and
    "hard" (difficulty >= `threshold`, by default `hard_from` of every listed problem). A subset without problems
    gives no row."""
    for b, (ds, cap, frc) in per_budget.items():
        if not len(ds) == len(cap) == len(frc):
            raise ValueError(f"forcing_comparison: budget {b} has {len(ds)} difficulties, {len(cap)} capped and "
                             f"{len(frc)} forced results; expected one of each per problem")
    if not per_budget:
        return []
    if threshold is None:
        threshold = hard_from([d for ds, _, _ in per_budget.values() for d in ds])
    pooled = [b for b in per_budget if b > 0]
    groups = [(b, None, per_budget[b]) for b in per_budget]
    if pooled:
        groups.append(("pooled", ",".join(map(str, pooled)),
                       tuple([x for b in pooled for x in per_budget[b][k]] for k in range(3))))
    rows = []
    for label, over, (ds, cap, frc) in groups:
        for subset in ("all", "hard"):
            keep = [i for i, d in enumerate(ds) if subset == "all" or d >= threshold]
            if keep:
                rows.append({"budget": label, "subset": subset, "hard_from": threshold, "pooled_over": over,
                             **compare([cap[i] for i in keep], [frc[i] for i in keep])})
    return rows


VERDICT = {"above": "capped better", "below": "forcing better", "unchanged": "not measurable"}


def format_forcing(rows: list[dict], width: int = 0) -> str:
    """The comparison as a table, one line per row (`model` first, `width` characters, when `width` is given)."""
    if not rows:
        return ""
    lead = f"{'model':<{width}} " if width else ""
    head = (f"{lead}{'budget':>6}  {'subset':<11} {'capped':>7} {'forced':>7} {'capped - forced [95% CI]':>26}  "
            f"{'p':>7}  verdict")
    lines = ["capped (budget in the prompt) vs forced (no budget in the prompt), both cut at the budget; paired",
             head, "-" * len(head)]
    for r in rows:
        subset = "all" if r["subset"] == "all" else f"hard d>={r['hard_from']:g}"
        ci = f"{100 * r['diff']:+5.1f} [{100 * r['ci_low']:+5.1f}, {100 * r['ci_high']:+5.1f}]"
        name = f"{str(r.get('model', '')):<{width}} " if width else ""
        lines.append(f"{name}{str(r['budget']):>6}  {subset:<11} {100 * r['capped']:6.1f}% {100 * r['forced']:6.1f}% "
                     f"{ci:>26}  {r['p_value']:7.3g}  {VERDICT[r['measurably']]}")
    pooled = sorted({r["pooled_over"] for r in rows if r["pooled_over"]})
    if pooled:
        lines.append("pooled over budgets " + "; ".join(pooled))
    return "\n".join(lines)
