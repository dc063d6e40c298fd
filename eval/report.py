"""What a budget sweep (`eval/sweep.py`) leaves behind: its rows as JSON and CSV, the forcing comparison
(`eval/forcing.py`) beside them, and the terminal table of both. The plots are `eval/plots.py`'s."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from posttrain.eval.forcing import KEYS as FORCING_KEYS
from posttrain.eval.forcing import format_forcing
from posttrain.eval.sweep import ROW_KEYS


def _write_csv(path: Path, rows: list[dict], keys) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keys))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})


def write_outputs(rows: list[dict], out: str | Path, forcing: list[dict] | None = None) -> Path:
    """DIR/sweep.json (list of rows) and DIR/sweep.csv (same rows, empty cells for None); with `forcing` (the rows
    of `SweepResult.forcing`), DIR/forcing.json and DIR/forcing.csv too."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    _write_csv(out / "sweep.csv", rows, ROW_KEYS)
    if forcing:
        (out / "forcing.json").write_text(json.dumps(forcing, indent=1) + "\n")
        _write_csv(out / "forcing.csv", forcing, ("model", *FORCING_KEYS))
    else:  # not an earlier sweep's comparison beside this sweep's rows
        for name in ("forcing.json", "forcing.csv"):
            (out / name).unlink(missing_ok=True)
    return out


def short_labels(labels, width: int) -> dict[str, str]:
    """label -> how a table column or plot title `width` characters wide shows it: the label, or "..." and its last
    `width - 3` characters when longer. Two labels that would read the same are both shown whole."""
    from collections import Counter

    short = {label: label if len(label) <= width else "..." + label[-(width - 3):] for label in dict.fromkeys(labels)}
    counts = Counter(short.values())
    return {label: s if counts[s] == 1 else label for label, s in short.items()}


def format_sweep_table(rows: list[dict], forcing: list[dict] | None = None) -> str:
    """Difficulty "all": model, budget, mode, accuracy ± 95% CI, mean thinking tokens, adherence, forced share; then,
    with `forcing`, the paired comparison of capped against forced (`eval.forcing.format_forcing`)."""
    head = f"{'model':<32} {'budget':>6} {'mode':<8} {'accuracy [95% CI]':>22} {'think':>6} {'adher.':>7} " \
           f"{'forced':>7}"
    lines = [head, "-" * len(head)]
    names = short_labels((r["model"] for r in rows), 32)
    for r in rows:
        if r["difficulty"] != "all":
            continue
        acc = f"{100 * r['accuracy']:5.1f}% [{100 * r['accuracy_ci_low']:4.1f},{100 * r['accuracy_ci_high']:5.1f}]"
        adh = "-" if r["adherence"] is None else f"{100 * r['adherence']:5.1f}%"
        forced = "-" if r["forced_share"] is None else f"{100 * r['forced_share']:5.1f}%"
        lines.append(f"{names[r['model']]:<32} {str(r['budget']):>6} {r['mode']:<8} {acc:>22} "
                     f"{r['think_tokens_mean']:6.1f} {adh:>7} {forced:>7}")
    if forcing:
        short = short_labels((r["model"] for r in forcing), 24)
        width = max(5, *(len(s) for s in short.values()))
        lines += ["", format_forcing([{**r, "model": short[r["model"]]} for r in forcing], width)]
    return "\n".join(lines)
