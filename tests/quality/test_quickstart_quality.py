"""Quality of a finished quickstart run: thinking beats no thinking on hard problems, and the GenRM verifies
(held-out AUC clearly above chance and above what difficulty alone gives).

These read `$POSTTRAIN_QUICKSTART_RUN` (a run directory of recipes/quickstart.yaml); `.ci/run` sets it after
running the quickstart, since training a model that can think and verify takes 12-25 minutes on 2 cores, more
than the unit suite's budget. Without the variable they are skipped.
"""

import json
import os
from pathlib import Path

import pytest

RUN = os.environ.get("POSTTRAIN_QUICKSTART_RUN")
pytestmark = pytest.mark.skipif(not RUN, reason="set POSTTRAIN_QUICKSTART_RUN to a finished quickstart run")


def cell(rows, budget, difficulty):
    (row,) = [r for r in rows if r["budget"] == budget and r["difficulty"] == difficulty]
    return row


def test_thinking_clearly_wins_on_hard_problems():
    rows = json.loads((Path(RUN) / "eval" / "eval.json").read_text())
    for d in (6, 7, 8):
        think, direct = cell(rows, "auto", d), cell(rows, "0", d)
        assert think["accuracy"] >= direct["accuracy"] + 0.25, (d, think, direct)
    assert cell(rows, "auto", "all")["accuracy"] >= 0.6
    # autonomous thinking grows with difficulty
    means = [cell(rows, "auto", d)["think_tokens_mean"] for d in range(1, 9)]
    assert all(a < b for a, b in zip(means, means[1:])), means


def test_genrm_scores_clearly_above_chance_on_held_out_samples():
    report = json.loads((Path(RUN) / "rm" / "rm_report.json").read_text())
    g = report["genrm"]
    assert g["auc"] >= 0.75 and g["accuracy"] >= 0.7, g
    assert g["auc"] > g["difficulty_baseline_auc"] + 0.03, g  # it checks answers, not just problem length
    assert g["within_difficulty_auc"] >= 0.65, g


def _sweep_rows():
    return json.loads((Path(RUN) / "sweep" / "sweep.json").read_text())


def _budget_rows(rows, model, mode="natural"):
    return {r["budget"]: r for r in rows if r["model"] == model and r["mode"] == mode and r["difficulty"] == "all"}


def test_grpo_follows_budgets_measurably_better_than_sft_without_losing_accuracy(grpo_evaluation):
    """From the grpo stage's own paired evaluation (`eval_before.json` of the SFT model, `eval_after.json` of the
    GRPO model: the same held-out problems, greedy): budget adherence without forcing, pooled over every budget,
    is measurably above SFT's (McNemar p < 0.05) and no budget's is measurably below; accuracy at the middle
    budgets with the budget enforced is not measurably below (a measurable gain is not met on the quickstart's
    budget-aware SFT data, where RL keeps what SFT reaches; test_budget_blind_quality.py checks it on budget-blind
    data: docs/rl_findings.md); autonomous thinking still grows with difficulty. The
    pooled figures are recomputed here from the per-problem lists.

    Natural-mode accuracy (the budget only an instruction) is checked for consistency but not judged: it counts
    answers that overran the budget, so an SFT model that overruns often (22% at budget 16 from one machine's
    base) scores points there that a model which keeps its budget gives up by design."""
    run = grpo_evaluation(RUN)
    v, summary = run.verdict, run.summary
    for name, budgets, key in (("adherence", v["budgets"], "adherent"), ("accuracy_middle", v["middle_budgets"], "correct"),
                               ("accuracy_capped_middle", v["middle_budgets"], "correct_capped")):
        d = run.pooled(name, budgets, key)
        if name == "adherence":
            assert d["measurably"] == "above", (name, d)
        elif name == "accuracy_capped_middle":
            assert d["measurably"] != "below", (name, d)
    for b in v["budgets"]:
        assert summary["comparison"][str(b)]["adherence"]["measurably"] != "below", (b, summary["comparison"][str(b)])
    run.thinking_grows()


def test_rl_curve_sits_on_or_above_sft_curve():
    """sweep.json: at every budget the GRPO model's accuracy with the budget enforced (capped; natural where there
    is no cap: budget 0 and auto) is within noise of SFT's or above (SFT's accuracy is inside or below the GRPO
    row's 95% interval), and its budget adherence without forcing is at least SFT's."""
    rows = _sweep_rows()
    sft, rl = _budget_rows(rows, "sft"), _budget_rows(rows, "grpo")
    sft_c, rl_c = _budget_rows(rows, "sft", "capped"), _budget_rows(rows, "grpo", "capped")
    assert set(sft) == set(rl) and len(sft) >= 5
    for b in sft:
        s_acc, r_acc = (sft_c[b], rl_c[b]) if b in sft_c else (sft[b], rl[b])
        assert r_acc["accuracy_ci_high"] >= s_acc["accuracy"], (b, s_acc, r_acc)
        if sft[b]["adherence"] is not None and b not in (0, "0"):
            assert rl[b]["adherence"] >= sft[b]["adherence"] - 0.02, (b, sft[b], rl[b])
    for name in ("accuracy_vs_budget.png", "think_tokens_vs_budget.png"):
        assert (Path(RUN) / "sweep" / name).is_file()


def test_grpo_keeps_budgets_it_was_not_trained_on():
    """sweep.json: the GRPO model closes its thinking within the budget by itself at least 90% of the time at every
    positive sweep budget, those off the old training grid (12, 20) and above GRPO's range (50, 100) included. A
    model trained on a few fixed budgets fails this: it read budget 12 as no budget and kept it 25% of the time
    (docs/rl_findings.md)."""
    rows = _sweep_rows()
    rl = _budget_rows(rows, "grpo")
    kept = {b: r["adherence"] for b, r in rl.items() if r["adherence"] is not None and b not in (0, "0", "auto")}
    assert {"12", "20", "50", "100"} <= {str(b) for b in kept}, kept  # the quickstart's sweep budgets
    assert all(a >= 0.9 for a in kept.values()), kept


def test_grpo_thinks_in_full_at_budgets_of_every_length():
    """sweep.json: a budget above the longest trace (39 tokens) is as good as no budget: at 50, 100, 1000 and
    10000 the GRPO model's accuracy is within 10 points of its autonomous accuracy and its mean thinking within
    3 tokens. The quickstart of 2026-12-01 failed this at 1000 (0 thinking tokens, 16% against 85%): SFT had drawn
    budgets 49-999 uniformly, so it had never seen a four-digit budget (docs/rl_findings.md)."""
    rows = _sweep_rows()
    rl = _budget_rows(rows, "grpo")
    auto = rl["auto"]
    large = {b: r for b, r in rl.items() if b != "auto" and int(b) >= 50}
    assert {"50", "100", "1000", "10000"} <= {str(b) for b in large}, sorted(rl)
    for b, r in large.items():
        assert r["accuracy"] >= auto["accuracy"] - 0.1, (b, r["accuracy"], auto["accuracy"])
        assert abs(r["think_tokens_mean"] - auto["think_tokens_mean"]) <= 3, (b, r, auto)


def test_exported_adapter_loads_with_plain_peft_and_keeps_thinking_within_budget(tmp_path):
    """A fresh interpreter that imports only transformers and peft loads the adapter on the base checkpoint and,
    asked through the chat template for a budget, keeps its thinking within it as often as the GRPO checkpoint it
    was extracted from does (same held-out problems of every difficulty, made here and passed in as text; at most
    2 of 72 fewer), and at least 80% of the time; and it reproduces the GRPO checkpoint's greedy responses (issue
    #23): at most 3 of the 96 (autonomous and the three budgets) differ (measured: 1 at the recipe's rank 64)."""
    import subprocess
    import sys

    from posttrain.tasks.arithmetic import generate_problems

    adapter = Path(RUN) / "export" / "adapter"
    grpo = Path(RUN) / "grpo" / "checkpoint"
    problems = [p.expression for p in generate_problems(24, 777, list(range(1, 9)))]  # 3 per difficulty
    code = f"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
adapter = {str(adapter.resolve())!r}
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
models = {{"adapter": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval(),
          "grpo": AutoModelForCausalLM.from_pretrained({str(grpo.resolve())!r}).eval()}}
tok = AutoTokenizer.from_pretrained(adapter)
end = tok.convert_tokens_to_ids("</think>")
problems = {problems!r}
out = {{}}
for name, model in models.items():
    out[name] = []
    for budget in (None, 8, 16, 32):
        for p in problems:
            kw = {{}} if budget is None else {{"thinking_budget": budget}}
            ids = tok.apply_chat_template([{{"role": "user", "content": p}}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True, **kw)
            gen = model.generate(**ids, max_new_tokens=120, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
            n = gen.index(end) if end in gen else len(gen)
            out[name].append([budget, n, end in gen, gen])
print(json.dumps(out))
assert not [m for m in sys.modules if m.startswith("posttrain")]
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    differ = sum(a[3] != g[3] for a, g in zip(rows["adapter"], rows["grpo"]))
    assert differ <= 3, f"{differ} of {len(rows['grpo'])} greedy responses differ from the GRPO checkpoint's"
    budgeted = {k: [r for r in v if r[0] is not None] for k, v in rows.items()}
    within = {k: sum(closed and n <= budget for budget, n, closed, _ in v) for k, v in budgeted.items()}
    total = len(budgeted["adapter"])
    assert within["adapter"] >= within["grpo"] - 2 and within["adapter"] >= 0.8 * total, (within, budgeted)
