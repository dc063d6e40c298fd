"""What the quality checks of finished runs share: reading a grpo stage's paired evaluation back."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture
def grpo_evaluation():
    """`load(run_dir)`: the grpo stage's `summary` (done.json), `verdict`, `after` (eval_after.json), `pooled(name,
    budgets, key)` (the paired difference recomputed from the per-problem lists of eval_before/after.json, asserted
    equal to the stored `verdict[name]`) and `thinking_grows()` (autonomous thinking grows with difficulty)."""
    from posttrain.eval.stats import paired_difference

    def load(run):
        stage = Path(run) / "grpo"
        summary = json.loads((stage / "done.json").read_text())["summary"]
        before = json.loads((stage / "eval_before.json").read_text())
        after = json.loads((stage / "eval_after.json").read_text())
        v = summary["verdict"]
        assert v["middle_budgets"] and set(v["middle_budgets"]) < set(v["budgets"]), v

        def pooled(name, budgets, key):
            d = paired_difference([x for b in budgets for x in before[str(b)][key]],
                                  [x for b in budgets for x in after[str(b)][key]])
            assert d["diff"] == pytest.approx(v[name]["diff"]) and d["p_value"] == pytest.approx(v[name]["p_value"])
            return d

        def thinking_grows():
            by_d = after["auto"]["think_tokens_by_difficulty"]
            means = [by_d[k] for k in sorted(by_d, key=int)]
            assert means[-1] > 2 * means[0] and sum(a <= b for a, b in zip(means, means[1:])) >= len(means) - 2, means

        return SimpleNamespace(summary=summary, verdict=v, after=after, pooled=pooled, thinking_grows=thinking_grows)

    return load
