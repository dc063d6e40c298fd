"""The run summary of flywheel rounds (`RUN/rounds.json`, `RUN/rounds.txt`): each round's SFT and RL model side by
side on the same held-out problems, from the RL stages' evaluation files, and each later round against round 1."""

from __future__ import annotations

from pathlib import Path

from posttrain.rounds import kind_of, rounds_of, split_stage


def round_summary(run_dir: Path, stages: list[str]) -> dict | None:
    """Each round's input model (SFT) and RL model at every eval budget, side by side, from the RL stages'
    evaluations (`eval_before.json`: the round's SFT model; `eval_after.json`: its RL model), and each round's
    SFT and RL model against round 1's, paired on the same held-out problems (the RL stages of every round hold out
    the same ones). None when the recipe has one round, or no RL stage has finished its evaluation."""
    from posttrain.runlog import read_json
    from posttrain.stages.rl_eval import _compare, _verdict, _without_vectors

    if rounds_of(stages) < 2:
        return None
    rl = [s for s in stages if kind_of(s) in ("grpo", "ppo")]
    evals = {}
    for s in rl:
        d = Path(run_dir) / s
        if (d / "eval_before.json").is_file() and (d / "eval_after.json").is_file():
            evals[s] = {"sft": read_json(d / "eval_before.json", f"stage {s}'s evaluation before training"),
                        "rl": read_json(d / "eval_after.json", f"stage {s}'s evaluation after training")}
    if not evals:
        return None
    first = next(iter(evals))
    out = {"rounds": {}, "against_round_1": {}}
    for s, ev in evals.items():
        r = split_stage(s)[1]
        out["rounds"][r] = {"stage": s, "sft": _without_vectors(ev["sft"]), "rl": _without_vectors(ev["rl"])}
        sft = Path(run_dir) / (f"sft@{r}" if r > 1 else "sft") / "done.json"
        if r > 1 and sft.is_file():  # what the round's SFT data was: samples kept of those drawn, by mode
            data = read_json(sft, f"stage sft@{r}").get("flywheel")
            if data:
                out["rounds"][r]["data"] = data
        if s == first:
            continue
        out["against_round_1"][r] = {}
        for model in ("sft", "rl"):
            base, new = evals[first][model], ev[model]
            per = _compare(base, new)
            below = sorted(b for b, m in per.items() for k in ("accuracy", "accuracy_capped")
                           if m.get(k, {}).get("measurably") == "below")
            adherence = sorted(b for b, m in per.items() if m.get("adherence", {}).get("measurably") == "below")
            out["against_round_1"][r][model] = {"per_budget": per, "pooled": _verdict(base, new),
                                                "measurably_below_at": sorted(set(below)),
                                                "adherence_measurably_below_at": adherence}
    return out


def format_rounds(summary: dict) -> str:
    """The round summary as a table: per eval budget, each round's SFT and RL accuracy (natural) and adherence, and
    the paired difference of each later round's SFT model against round 1's."""
    rounds = summary["rounds"]
    budgets = list(next(iter(rounds.values()))["sft"])
    head = ["budget"] + [f"r{r} {m}" for r in rounds for m in ("sft", "rl")]
    lines = ["accuracy (adherence) per round, same held-out problems:", "  ".join(f"{h:>16}" for h in head)]
    for b in budgets:
        cells = [f"{b:>16}"]
        for r, v in rounds.items():
            for m in ("sft", "rl"):
                row = v[m].get(b, {})
                acc, adh = row.get("accuracy"), row.get("adherence")
                cell = "-" if acc is None else f"{100 * acc:.1f}" + ("" if adh is None else f" ({100 * adh:.1f})")
                cells.append(f"{cell:>16}")
        lines.append("  ".join(cells))
    for r, v in rounds.items():
        if "data" in v:
            d = v["data"]
            lines.append(f"round {r} sft data: {d['kept']} of {d['samples']} samples of {d['sampled_by']} kept (" +
                         ", ".join(f"{m} {c['kept']}/{c['samples']}" for m, c in d["by_mode"].items()) +
                         f"), with {d['demo_rows']} demonstrations")
    for r, models in summary["against_round_1"].items():
        for model, cmp in models.items():
            diffs = [f"{b} {100 * a['diff']:+.1f} [{100 * a['ci95'][0]:+.1f}, {100 * a['ci95'][1]:+.1f}]"
                     for b, m in cmp["per_budget"].items() if "diff" in (a := m.get("accuracy", {}))]
            if diffs:
                lines.append(f"round {r} {model} - round 1 {model}, accuracy (paired, 95% CI): " + "; ".join(diffs))
            below = cmp["measurably_below_at"]
            lines.append(f"round {r} {model}: " + (f"measurably below round 1 at budgets {', '.join(below)}" if below
                         else "not measurably below round 1 at any budget (natural and capped)"))
            if cmp.get("adherence_measurably_below_at"):
                lines.append(f"round {r} {model}: adherence measurably below round 1 at budgets "
                             + ", ".join(cmp["adherence_measurably_below_at"]))
    return "\n".join(lines)
