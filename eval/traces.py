"""Line-by-line reading of embedded-task thinking traces: which grouping a model wrote and which lines were right.

The command-line front of `tasks.trace_lines`: it samples a checkpoint's greedy capped traces on `RolloutWorker`
(or, with `--teacher-forced`, measures its folding skill on gold traces) and prints each reading as JSON:

    python -m posttrain.eval.traces CHECKPOINT --budgets 16,24,32 --n 25
    python -m posttrain.eval.traces CHECKPOINT --budgets 16,24,32 --forced   # no budget in the prompt, cut at it
    python -m posttrain.eval.traces CHECKPOINT --teacher-forced 700   # folding skill on gold traces
"""

from __future__ import annotations

from posttrain.tasks.trace_lines import summarize, teacher_forced_lines


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    import torch

    from posttrain.tasks.arithmetic import generate_problems
    from posttrain.workers.rollout import RolloutWorker

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--budgets", default="16,24,32", help="comma-separated budgets (capped, greedy)")
    ap.add_argument("--n", type=int, default=25, help="problems per difficulty")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--forced", action="store_true", help="no budget in the prompt, </think> still forced at each "
                    "budget (the sweep's forced mode: budget forcing of the autonomous traces)")
    ap.add_argument("--teacher-forced", type=int, default=0, metavar="N",
                    help="instead: line-value accuracy by operators folded on N gold traces (teacher_forced_lines)")
    args = ap.parse_args(argv)
    if args.teacher_forced:
        from posttrain.model import load_model, load_tokenizer

        model = load_model(args.checkpoint).eval()
        print(json.dumps(teacher_forced_lines(model, load_tokenizer(args.checkpoint), args.teacher_forced)))
        return 0
    worker = RolloutWorker(args.checkpoint, "cpu", torch.float32, torch.get_num_threads())
    problems = generate_problems(8 * args.n, seed=args.seed)
    for budget in (int(b) for b in args.budgets.split(",")):
        batch = worker.generate([p.expression for p in problems], [budget] * len(problems), 1, 160, greedy=True,
                                cap=True, budget_in_prompt=not args.forced)
        mode = "forced" if args.forced else "capped"
        print(json.dumps({"budget": budget, "mode": mode, **summarize(problems, batch.texts, list(batch.forced))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
