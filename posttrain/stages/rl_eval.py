"""The RL stage's before/after evaluation.

- `evaluate_budget`: one eval budget's row, in three modes (natural, capped, forced: `eval.sweep`'s generation on
  the rollout workers, the only part here that needs workers; the rest is pure: dicts and lists);
- `problems_fingerprint` / `_paired`: before and after are compared only on the same problems;
- `_compare`: per budget and measure, the paired difference with its 95% interval and McNemar p-value;
- `_verdict`: the stage's claim, pooled over budgets (adherence over all, accuracy over the middle ones), and the
  trained model's capped accuracy against budget forcing (`forcing_of`, `eval/forcing.py`);
- `format_comparison`, `_brief`, `_without_vectors`: what the log and the summary show.
"""

from __future__ import annotations

import hashlib

PER_PROBLEM = {"accuracy": "correct", "accuracy_capped": "correct_capped", "accuracy_forced": "correct_forced",
               "adherence": "adherent"}
VECTORS = (*PER_PROBLEM.values(), "difficulties")  # per problem, in problem order: kept out of the summary


def evaluate_budget(workers: list, problems: list, budget: int | None, grade, max_new_tokens: int,
                    batch_size: int) -> dict:
    """One eval budget's row (greedy, on `workers`, proxies of `RolloutWorker`; `grade(problems, responses)` gives
    `eval.sweep.Record`s):

    - natural (the budget only in the prompt): `accuracy`, `think_tokens`, `adherence` (closed within the budget by
      itself) and, for `auto`, `think_tokens_by_difficulty`;
    - capped (`</think>` forced at the budget, what a caller who sets a budget gets): `accuracy_capped`;
    - forced (no budget in the prompt, `</think>` forced at the budget: budget forcing, the baseline any thinking
      model gets without training for budgets; the same cap and count as capped): `accuracy_forced`;
    - per problem, in problem order, for paired comparisons: `correct`, `correct_capped`, `correct_forced`,
      `adherent`, `difficulties`, and `problems`, a fingerprint of the problem list.
    """
    from collections import defaultdict

    from posttrain.budgets import adherent
    from posttrain.eval.sweep import capped_responses, generate_responses, summarize

    prompts = [p.expression for p in problems]
    responses = generate_responses(workers, prompts, budget, False, max_new_tokens, batch_size)
    natural = grade(problems, responses)
    s = summarize(natural, budget, "natural")
    row = {"accuracy": s["accuracy"], "think_tokens": s["think_tokens_mean"],
           "correct": [int(r.correct) for r in natural], "problems": problems_fingerprint(prompts)}
    if budget is None:
        by = defaultdict(list)
        for r in natural:
            by[r.difficulty].append(r.n_think)
        return row | {"think_tokens_by_difficulty": {d: sum(v) / len(v) for d, v in sorted(by.items())}}
    capped = grade(problems, capped_responses(workers, prompts, responses, budget, max_new_tokens, batch_size))
    # forced: generated directly with the cap (each budget has its own problems, so no autonomous pass to reuse)
    forced = grade(problems, generate_responses(workers, prompts, budget, True, max_new_tokens, batch_size,
                                                budget_in_prompt=False))
    return row | {"adherence": s["adherence"], "accuracy_capped": sum(r.correct for r in capped) / len(capped),
                  "accuracy_forced": sum(r.correct for r in forced) / len(forced),
                  "adherent": [int(adherent(r.closed, r.forced, r.n_think, budget)) for r in natural],
                  "correct_capped": [int(r.correct) for r in capped], "correct_forced": [int(r.correct) for r in forced],
                  "difficulties": [r.difficulty for r in natural]}


def forcing_of(ev: dict, label: str | None = None) -> list[dict]:
    """An evaluation's capped accuracy against forced (`eval.forcing.forcing_comparison`), per budget that has both
    and pooled over the positive ones, overall and on the hard half; each row named `label` when given."""
    from posttrain.eval.forcing import forcing_comparison

    need = ("difficulties", "correct_capped", "correct_forced")
    per = {int(b): tuple(r[k] for k in need) for b, r in ev.items() if b != "auto" and all(k in r for k in need)}
    rows = forcing_comparison(dict(sorted(per.items())))
    return rows if label is None else [{"model": label, **r} for r in rows]


def problems_fingerprint(prompts: list[str]) -> str:
    """A short hash of an ordered problem list: two evaluations are paired only when theirs are equal (a run
    resumed by another version, or with other eval settings, may hold an `eval_before.json` of other problems)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _paired(before: dict, after: dict, b: str) -> bool:
    """Budget `b` was evaluated on the same problems before and after (same fingerprint and count)."""
    return (b in before and before[b].get("problems") == after[b].get("problems")
            and len(before[b].get("correct", ())) == len(after[b].get("correct", ())))


def _compare(before: dict, after: dict) -> dict:
    """Per budget and measure (natural, capped and forced accuracy, adherence): before, after, and the paired
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
    the largest (all of them when there are fewer than three). `forcing` (when the evaluations have forced mode):
    capped against forced on the same problems, the trained model's per budget and pooled, then the input model's
    pooled rows, overall and on the hard half (`forcing_of`)."""
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

    out = {"budgets": budgets, "middle_budgets": middle, "adherence": pooled(budgets, "adherent"),
           "accuracy_middle": pooled(middle, "correct"), "accuracy_capped_middle": pooled(middle, "correct_capped")}
    forcing = forcing_of(after, "trained") + [r for r in forcing_of(before, "input") if r["budget"] == "pooled"]
    return out | ({"forcing": forcing} if forcing else {})


def _without_vectors(ev: dict) -> dict:
    """An evaluation without its per-problem lists (kept in eval_before.json / eval_after.json)."""
    return {b: {k: v for k, v in r.items() if k not in VECTORS} for b, r in ev.items()}


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
    if verdict.get("forcing"):
        from posttrain.eval.forcing import format_forcing

        lines += ["budget forcing (trained: this stage's model; input: the model it started from):",
                  format_forcing(verdict["forcing"], width=7)]
    return "\n".join(lines)


def _brief(ev: dict) -> str:
    parts = []
    for b, r in ev.items():
        adh = f" adh {r['adherence']:.2f} capped acc {r['accuracy_capped']:.2f}" if "adherence" in r else ""
        adh += f" forced acc {r['accuracy_forced']:.2f}" if "accuracy_forced" in r else ""
        parts.append(f"[{b}] acc {r['accuracy']:.2f}{adh} think {r['think_tokens']:.1f}")
    return "  ".join(parts)
