"""Issue #24's distillation criterion, measured: the k-sparse student against the same student trained by SFT on the
teacher's samples and by a KL to the teacher's full logits, and the teacher, paired on held-out problems.

    .venv/bin/python scripts/distill_compare.py OUT [--recipe recipes/distill.yaml] [key=value ...]

Trains the recipe's student once per loss (`sparse_kl`, `sft`, `full_kl`) in OUT/<loss>/, each with only the
`distill` stage. The teacher's samples and top-k targets are computed once, in OUT/sparse_kl/, and copied for the
others, so the three students see the same sequences in the same order for the same steps. Then every student and
the teacher answer the same held-out problems greedily (the grpo stage's: `grpo.eval_budgets`, 8 to 32 and `auto`
here, `grpo.eval_n_per_difficulty` per difficulty; no stage of the recipe trains on them) with the budget in the
prompt, capped and forced, and OUT/eval.json holds the per-problem results, OUT/compare.json the paired
comparisons (`posttrain.stages.rl_eval._compare` per budget, `_verdict` pooled, as the RL stage reports its own).
Overrides apply to every run (e.g. `seed=1`, `distill.steps=600`). A finished student is not trained again.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

LOSSES = ("sparse_kl", "sft", "full_kl")
EVAL = ["grpo.eval_budgets=[8,12,16,20,24,28,32,auto]", "grpo.eval_n_per_difficulty=100"]


def train_students(recipe: str, out: Path, overrides: list[str]) -> dict[str, Path]:
    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe
    from posttrain.runlog import StageDir

    students = {}
    for loss in LOSSES:
        run = out / loss
        first = out / LOSSES[0] / "distill" / "targets"
        if loss != LOSSES[0] and first.is_dir() and not (run / "distill" / "targets").exists():
            shutil.copytree(first, run / "distill" / "targets")  # the same sequences and targets for every loss
        run_recipe(load_recipe(recipe, [*overrides, "stages=[distill]", f"run_dir={run}", f"distill.loss={loss}"]))
        students[loss] = StageDir(run, "distill").finished_checkpoint()
    return students


def evaluate(models: dict[str, Path], cfg) -> dict:
    import torch

    from posttrain.eval.sweep import grade_responses, start_workers
    from posttrain.stages.rl_eval import evaluate_budget
    from posttrain.tasks.task import build_task

    task = build_task(cfg)
    grade = lambda problems, responses: grade_responses(problems, responses, task.grader)  # noqa: E731
    evals = {}
    for label, ckpt in models.items():
        [w] = start_workers(Path(ckpt), 1, "local", torch.device("cpu"))
        evals[label] = {str(b): evaluate_budget([w], task.rl_eval_problems(cfg.grpo, b), None if b == "auto" else b,
                                                grade, cfg.grpo.eval_max_new_tokens, 64)
                        for b in cfg.grpo.eval_budgets}
    return evals


def compare(evals: dict) -> dict:
    from posttrain.stages.rl_eval import _compare, _verdict

    out = {}
    for base in ("sft", "full_kl"):
        out[f"sparse_kl - {base}"] = {"pooled": _verdict(evals[base], evals["sparse_kl"]),
                                      "per_budget": _compare(evals[base], evals["sparse_kl"])}
    return out


def main() -> None:
    from posttrain.recipe import load_recipe
    from posttrain.runlog import write_json_atomic
    from posttrain.stages.rl_eval import format_verdict

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--recipe", default="recipes/distill.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_recipe(args.recipe, [*EVAL, *args.overrides])
    students = train_students(args.recipe, args.out, args.overrides)
    evals = evaluate({"teacher": Path(cfg.distill.teacher or cfg.model.path), **students}, cfg)
    write_json_atomic(args.out / "eval.json", evals)
    result = compare(evals)
    write_json_atomic(args.out / "compare.json", result)
    for name, c in result.items():
        auto = c["per_budget"].get("auto", {}).get("accuracy", {})
        print(f"{name}:\n{format_verdict(c['pooled'])}")
        if "diff" in auto:
            print(f"        autonomous accuracy {100 * auto['before']:5.1f}% -> {100 * auto['after']:5.1f}%  "
                  f"{100 * auto['diff']:+5.1f} [{100 * auto['ci95'][0]:+5.1f}, {100 * auto['ci95'][1]:+5.1f}]  "
                  f"p {auto['p_value']:.3g}  {auto['measurably']}")
    for label, ev in evals.items():
        print(label, {b: round(100 * r["accuracy"], 1) for b, r in ev.items()})


if __name__ == "__main__":
    main()
