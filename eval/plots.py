"""Plots of a budget sweep's rows (see `eval/sweep.py`), drawn with matplotlib's Agg backend (no display).

The autonomous budget (`auto`) has no x position of its own: it is drawn at its mean thinking tokens with a star.
Each mode has its line style (`STYLE`): natural solid, capped dashed, forced (no budget in the prompt, `</think>`
forced at the budget) dash-dotted.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.eval.report import short_labels
from posttrain.eval.sweep import MODES

STYLE = {"natural": "-", "capped": "--", "forced": "-."}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _all_rows(rows, model, mode):
    return [r for r in rows if r["model"] == model and r["mode"] == mode and r["difficulty"] == "all"]


def plot_accuracy_vs_budget(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, model in enumerate(models):
        color = f"C{i}"
        for mode in MODES:
            rs = _all_rows(rows, model, mode)
            num = sorted((r for r in rs if r["budget"] != "auto"), key=lambda r: r["budget"])
            if num:
                xs = [r["budget"] for r in num]
                ys = [r["accuracy"] for r in num]
                err = [[r["accuracy"] - r["accuracy_ci_low"] for r in num],
                       [r["accuracy_ci_high"] - r["accuracy"] for r in num]]
                ax.errorbar(xs, ys, yerr=err, ls=STYLE[mode], marker="o", ms=4, color=color, capsize=2,
                            label=f"{model} ({mode})")
        auto = [r for r in _all_rows(rows, model, "natural") if r["budget"] == "auto"]
        for r in auto:
            ax.plot([r["think_tokens_mean"]], [r["accuracy"]], marker="*", ms=14, color=color, ls="none",
                    label=f"{model} (auto, at its mean thinking)")
    ticks = sorted({r["budget"] for r in rows if r["budget"] != "auto"})
    ax.set_xscale("symlog", base=2, linthresh=max(1, min([b for b in ticks if b > 0], default=1)))
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.minorticks_off()
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("accuracy vs thinking budget (solid: natural, dashed: capped, dash-dot: forced)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def think_axis_top(rows: list[dict]) -> float:
    """The top of the thinking-tokens axis: a little above the most thinking any point shows (a mean thinking
    length, autonomous ones included). Not the largest budget: a budget far beyond what the model thinks (100000
    when it thinks 30) would flatten every point onto 0; the y = x line then leaves the plot at the top."""
    most = max((r["think_tokens_mean"] for r in rows if r["difficulty"] == "all"), default=0)
    return max(1.0, 1.1 * most)


def plot_think_vs_budget(rows: list[dict], path: Path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = list(dict.fromkeys(r["model"] for r in rows))
    right = 1
    for i, model in enumerate(models):
        for mode in MODES:
            num = sorted((r for r in _all_rows(rows, model, mode) if r["budget"] != "auto"),
                         key=lambda r: r["budget"])
            if num:
                ax.plot([r["budget"] for r in num], [r["think_tokens_mean"] for r in num], ls=STYLE[mode],
                        marker="o", ms=4, color=f"C{i}", label=f"{model} ({mode})")
                right = max(right, max(r["budget"] for r in num))
        for r in _all_rows(rows, model, "natural"):
            if r["budget"] == "auto":
                ax.axhline(r["think_tokens_mean"], color=f"C{i}", ls=":", label=f"{model} (auto mean)")
    top = think_axis_top(rows)
    ax.plot([0, min(right, top)], [0, min(right, top)], color="gray", lw=1, label="y = x")
    ax.set_ylim(0, top)
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel("mean thinking tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("thinking spent vs budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_accuracy_vs_difficulty(rows: list[dict], path: Path) -> None:
    """One panel per model, one line per budget (natural mode)."""
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False, sharey=True)
    titles = short_labels(models, 40)
    for ax, model in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == model and r["mode"] == "natural" and r["difficulty"] != "all"]
        for j, b in enumerate(dict.fromkeys(r["budget"] for r in rs)):
            pts = sorted((r for r in rs if r["budget"] == b), key=lambda r: r["difficulty"])
            ax.plot([r["difficulty"] for r in pts], [r["accuracy"] for r in pts], marker="o", ms=4,
                    color=f"C{j}", label=f"budget {b}")
        ax.set_title(titles[model], fontsize=9)
        ax.set_xlabel("difficulty (operators)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("accuracy (natural)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_all(rows: list[dict], out: str | Path) -> list[Path]:
    out = Path(out)
    paths = [out / "accuracy_vs_budget.png", out / "think_tokens_vs_budget.png", out / "accuracy_vs_difficulty.png"]
    plot_accuracy_vs_budget(rows, paths[0])
    plot_think_vs_budget(rows, paths[1])
    plot_accuracy_vs_difficulty(rows, paths[2])
    return paths
