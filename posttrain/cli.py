"""The `posttrain` command.

    posttrain run RECIPE.yaml [dotted.key=value ...] [--run-dir DIR]
    posttrain schema            print every recipe key with its type, default and documentation
    posttrain sweep --model PATH [--model PATH ...] --budgets 0,16,auto --out DIR [--workers N] [--data FILE ...]
                                budget sweep (embedded task, or your own problems)
    posttrain prepare CHECKPOINT --out DIR   a copy with the budget-aware chat template and think tokens
    posttrain export --model RUN_OR_CHECKPOINT --out DIR [--merged] [--rank R]   PEFT LoRA adapter
    posttrain bench [--steps N] [--warmup N] [--out DIR] [--model PATH] [--quick]   our GRPO step against TRL's
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def _cmd_run(args) -> int:
    from posttrain.recipe import load_recipe

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = load_recipe(args.recipe, overrides)  # fails before any work on a bad recipe

    from posttrain.pipeline import run_recipe

    results = run_recipe(cfg)
    print(f"\nrun directory: {cfg.run_dir}")
    from pathlib import Path

    for name, info in results.items():
        where = Path(info.get("checkpoint") or info.get("genrm") or info.get("adapter") or info.get("merged") or name)
        # done.json holds the path as the run that wrote it saw it; show the stage's folder in this run directory
        rest = where.parts[len(where.parts) - where.parts[::-1].index(name):] if name in where.parts else ()
        print(f"  {name:<6} {Path(cfg.run_dir, name, *rest)}")
    if "rm" in results and results["rm"].get("summary"):
        print("\nreward models (held-out samples):")
        print(results["rm"]["summary"])
    if "eval" in results:
        print("\naccuracy by difficulty (held-out problems):")
        print(results["eval"]["table"])
    from posttrain.stages.rl_eval import format_verdict

    for algo in ("grpo", "ppo"):
        verdict = (results.get(algo) or {}).get("summary", {}).get("verdict")
        if verdict:
            print(f"\n{algo} against its input model (same held-out problems, 95% paired intervals; "
                  f"{Path(cfg.run_dir, algo, 'done.json')} summary.verdict):")
            print(format_verdict(verdict))
    if "sweep" in results:
        print(f"\nbudget sweep ({results['sweep']['sweep']}, plots beside it):")
        print(results["sweep"]["table"])
    return 0


def _yaml_value(value) -> str:
    """A default as a recipe would spell it (`null`, `[0, auto]`, `{name: exact_int, ...}`), not as a Python repr."""
    import yaml
    from pydantic import BaseModel

    def plain(v):
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json")
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    text = yaml.safe_dump(plain(value), default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("\n...").strip()


def _cmd_schema(args) -> int:
    from posttrain.config import RecipeConfig

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                doc = " ".join((field.description or ann.__doc__ or "").split())  # a docstring on one line
                print(f"{prefix}{name}:  # {doc}".rstrip())
                walk(ann, prefix + "  ")
            else:
                default = _yaml_value(field.get_default(call_default_factory=True))
                print(f"{prefix}{name}: {default}  # {field.description or ''}".rstrip(" #"))

    walk(RecipeConfig)
    return 0


def _run_held_out_problems(args, columns: dict) -> tuple[list, str] | None:
    """With `--model RUN` (a run directory) whose recipe trained on a data file, and `--data` that same file or none:
    the first `--n` of each difficulty among the rows that run held out (what its eval and sweep stages evaluate),
    never rows it trained on, and the run's grader (`data.grader`). None when no such run is among the models."""
    from posttrain.eval.sweep import SweepError
    from posttrain.recipe import RecipeError, load_recipe
    from posttrain.tasks.task import build_task

    chosen = None
    for model in args.model:
        run = Path(model).expanduser()
        if not (run / "recipe.yaml").is_file() or (run / "config.json").is_file():
            continue
        try:
            rc = load_recipe(run / "recipe.yaml")
        except RecipeError as e:
            raise SweepError(f"--model {model}: its recipe.yaml no longer loads, so the rows it held out are "
                             f"unknown ({e})") from None
        task = build_task(rc)
        if not task.holds_out_rows or args.data is not None and (
                rc.data.path is None or Path(args.data).resolve() != Path(rc.data.path).resolve()):
            continue  # the embedded task (fresh problems from a seed), or other rows than the run trained on
        if columns:
            raise SweepError(f"--{next(iter(columns)).replace('_', '-')}: --model {model} trained on "
                             f"{task.where}, and its recipe names the rows' columns")
        if not any(a in rc.stages and getattr(rc, a).eval_n_per_difficulty > 0 for a in ("grpo", "ppo")):
            raise SweepError(f"--model {model} trained on every row of {task.where} (no grpo/ppo stage held rows "
                             "out): sweeping them would measure its training data; sweep another file with --data")
        task.check_recorded(run)
        problems = task.held_out(args.n, 0)
        if chosen is not None and [(p.expression, p.answer) for p in chosen[1]] != [
                (p.expression, p.answer) for p in problems]:
            raise SweepError(f"--model {chosen[0]} and --model {model} hold out different rows of "
                             f"{task.where}: sweep them separately")
        chosen = (model, problems, task.grader)
        print(f"sweep: the {len(problems)} rows {model} held out of {task.where}, graded by {task.grader}",
              file=sys.stderr)
    return None if chosen is None else chosen[1:]


def _sweep_file_problems(args) -> tuple[list | None, str]:
    """(problems, grader): those of `--data FILE` (its first `--n` rows of each difficulty; `--grader`, math by
    default) or of a run trained on a file (the rows it held out and its grader: `_run_held_out_problems`); None
    and `exact_int` for the embedded task."""
    from pydantic import ValidationError

    from posttrain.config import DataConfig
    from posttrain.eval.sweep import SweepError, file_problems

    columns = {k: getattr(args, k) for k in ("prompt_column", "answer_column", "answer_delimiter",
                                              "difficulty_column") if getattr(args, k) is not None}
    held = _run_held_out_problems(args, columns)
    if held is not None:
        if args.difficulties is not None:
            raise SweepError("--difficulties selects embedded-task problems; a run trained on a data file is swept "
                             "on the rows it held out")
        if args.grader is not None and args.grader != held[1]:
            raise SweepError(f"--grader {args.grader}: the run was trained and evaluated with the grader "
                             f"{held[1]} (its data.grader)")
        return held
    if args.data is None:
        if columns:
            raise SweepError(f"--{next(iter(columns)).replace('_', '-')} describes a --data file, and none was given")
        if args.grader not in (None, "exact_int"):
            raise SweepError(f"--grader {args.grader}: the embedded task's answers are integers (exact_int)")
        return None, "exact_int"
    if args.difficulties is not None:
        raise SweepError("--difficulties selects embedded-task problems; with --data every row's difficulty "
                         "(--difficulty-column) is swept")
    from posttrain.data import DataError

    try:
        data = DataConfig(source="file", path=args.data, skip_bad_rows=args.skip_bad_rows,
                          max_prompt_chars=args.max_prompt_chars, **columns)
    except ValidationError as e:
        raise SweepError(f"--data {args.data}: " + "; ".join(err["msg"] for err in e.errors())) from None
    try:
        return file_problems(data, args.n), args.grader or "math"
    except DataError as e:  # the reader names recipe keys: name this command's options instead
        msg = str(e).replace("set data.skip_bad_rows: true", "pass --skip-bad-rows")
        msg = msg.replace("data.max_prompt_chars", "--max-prompt-chars").replace("data.path:", "--data:")
        raise DataError(msg) from None


def _cmd_sweep(args) -> int:
    import os

    import torch

    from posttrain.eval.report import format_sweep_table, write_outputs
    from posttrain.eval.sweep import run_sweep
    from posttrain.eval.sweep_options import parse_budgets, parse_difficulties, parse_modes

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    budgets, modes = parse_budgets(args.budgets), parse_modes(args.modes)
    problems, grader = _sweep_file_problems(args)
    difficulties = parse_difficulties("1-8" if args.difficulties is None else args.difficulties) if problems is None else []
    try:
        result = run_sweep(args.model, budgets, args.n, args.seed, difficulties,
                           args.max_new_tokens, args.batch_size, args.device, args.workers, args.backend,
                           cpus_per_worker=max(1, threads // max(1, args.workers)), problems=problems,
                           grader=grader, modes=modes,
                           engine={"name": args.engine, "python": args.vllm_python})
    finally:
        if args.backend == "ray":
            from posttrain.workers.ray_cluster import shutdown_ray

            shutdown_ray()
    out = write_outputs(result.rows, args.out, result.forcing)
    from posttrain.eval.plots import plot_all

    plot_all(result.rows, out)
    print(format_sweep_table(result.rows, result.forcing))
    print(f"\nwrote {out}/sweep.json, sweep.csv, " + ("forcing.json, forcing.csv, " if result.forcing else "")
          + "accuracy_vs_budget.png, think_tokens_vs_budget.png, accuracy_vs_difficulty.png")
    return 0


def _cmd_export(args) -> int:
    """Exit 0 when written, 1 when the extracted adapter measured further than --max-kl from the trained model (a
    quality failure, as a run's stopped training is; nothing written), 2 for bad input (via main)."""
    import torch

    from posttrain.export import ExportError, LossyExport, export

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_kl is not None and not args.max_kl > 0:
        raise ExportError(f"--max-kl {args.max_kl}: must be positive (nats per token, export.max_kl)")
    save = tuple(m.strip() for m in (args.modules_to_save or "").split(",") if m.strip())
    kl = {} if args.max_kl is None else {"max_kl": args.max_kl}
    try:
        report = export(args.model, args.out, merged=args.merged, rank=args.rank, base=args.base,
                        modules_to_save=save, trust_remote_code=args.trust_remote_code,
                        allow_pickle=args.allow_pickle, allow_lossy=args.allow_lossy, **kl)
    except LossyExport as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{report['kind']} -> {args.out}")
    if "max_relative_frobenius_error" in report:
        print(f"  rank {report['rank']}: max relative Frobenius error {report['max_relative_frobenius_error']:.3g}, "
              f"KL(tuned || base+adapter) {report['kl_tuned_vs_adapted']:.4g} "
              f"(without the adapter {report['kl_tuned_vs_base']:.4g})"
              + (f"; LOSSY: over --max-kl {report['max_kl']:g}, written because of --allow-lossy"
                 if report.get("lossy") else ""))
        if report["uncovered_changed_params"]:
            print(f"  {len(report['uncovered_changed_params'])} changed parameters are not carried by the adapter "
                  "(see export.json; --modules-to-save stores such modules whole)")
    return 0


def _cmd_prepare(args) -> int:
    from posttrain.prepare import prepare_checkpoint

    report = prepare_checkpoint(args.checkpoint, args.out, args.trust_remote_code, args.allow_pickle)
    if report is None:
        print(f"{args.checkpoint} already has a budget-aware chat template and think tokens: use it as model.path "
              "(nothing written)")
        return 0
    print(f"{args.checkpoint} -> {args.out}: posttrain's chat template"
          + (f", tokens {', '.join(report['added_tokens'])}" if report["added_tokens"] else "")
          + f"; weights {report['weights']}")
    if report["initialised_token_ids"]:
        rows = report["embedding_rows"]
        print(f"  embedding rows {rows[0]} -> {rows[1]}; the new tokens' rows start at the mean of the others and are "
              "untrained: train SFT in full (sft.lora.enabled: false), which learns them")
    print(f"  set model.path: {args.out} in the recipe")
    return 0


def _cmd_bench(args) -> int:
    from posttrain.bench import BenchSettings, format_table, run_bench

    s = BenchSettings(steps=args.steps, warmup=args.warmup, out=args.out, model=args.model, quick=args.quick,
                      threads=args.threads, backend=args.backend, trl=not args.no_trl, scaling=not args.no_scaling,
                      grid=not args.no_grid, grid_steps=args.grid_steps,
                      async_staleness=args.async_staleness, fsdp_ranks=args.fsdp_ranks, overrides=list(args.set))
    result = run_bench(s)
    print(format_table(result))
    if args.out:
        print(f"\nwrote {args.out}/bench.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Teach an MoE language model to think on a budget.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a recipe's stages into its run directory (resumes an existing one)")
    r.add_argument("recipe", help="recipe YAML file")
    r.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. sft.steps=50")
    r.add_argument("--run-dir", help="override run_dir")
    r.set_defaults(func=_cmd_run)
    e = sub.add_parser("export", help="write a PEFT LoRA adapter (or --merged checkpoint) with the tokenizer")
    e.add_argument("--model", required=True, help="run directory or stage checkpoint")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--merged", action="store_true", help="write a full HF checkpoint instead of an adapter")
    e.add_argument("--rank", type=int, default=16, help="rank of an adapter extracted from a full fine-tune")
    e.add_argument("--base", help="base checkpoint (default: the run's base stage or recipe model.path)")
    e.add_argument("--modules-to-save", default="", help="comma-separated module name suffixes an extracted adapter "
                   "stores whole (PEFT modules_to_save), e.g. norm,embed_tokens")
    e.add_argument("--max-kl", type=float, default=None, help="largest mean per-token KL(trained || base + adapter), "
                   "in nats, of an extracted adapter loaded in plain PEFT, as export.max_kl (default 0.1); above it "
                   "nothing is written and the command exits 1")
    e.add_argument("--allow-lossy", action="store_true", help="write an adapter over --max-kl anyway, with a "
                   "warning and \"lossy\": true in export.json, as export.allow_lossy: true")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--allow-pickle", action="store_true", help="load checkpoints that hold only pickled weights "
                   "(pytorch_model.bin), as model.allow_pickle does in a recipe; runs code from the file")
    e.add_argument("--trust-remote-code", action="store_true", help="run a checkpoint's own modelling code")
    e.set_defaults(func=_cmd_export)
    q = sub.add_parser("prepare", help="copy a checkpoint with posttrain's budget-aware chat template and "
                       "<think>/</think> tokens (for checkpoints the stages refuse)")
    q.add_argument("checkpoint", help="local Hugging Face checkpoint directory (not changed)")
    q.add_argument("--out", required=True, help="output directory (new, empty or an earlier prepare output)")
    q.add_argument("--allow-pickle", action="store_true", help="load pickled weights (pytorch_model.bin)")
    q.add_argument("--trust-remote-code", action="store_true", help="run a checkpoint's own modelling code")
    q.set_defaults(func=_cmd_prepare)
    s = sub.add_parser("schema", help="print every recipe key with its default and documentation")
    s.set_defaults(func=_cmd_schema)
    w = sub.add_parser("sweep", help="accuracy, thinking length and adherence over budgets: natural, capped and "
                       "forced (no budget in the prompt), with capped against forced paired on the same problems")
    w.add_argument("--model", action="append", required=True,
                   help="run directory, checkpoint directory or PEFT adapter directory (repeatable)")
    w.add_argument("--budgets", default="0,16,32,64,128,auto", help="comma-separated ints and/or 'auto'")
    w.add_argument("--modes", default="natural,capped,forced", help="comma-separated modes: natural (budget in the "
                   "prompt), capped (budget in the prompt, </think> forced at it), forced (no budget in the prompt, "
                   "</think> forced at the budget: the budget-forcing baseline); capped and forced together add their "
                   "paired comparison (forcing.json, forcing.csv)")
    w.add_argument("--out", required=True, help="output directory (sweep.json, sweep.csv, forcing.json/.csv, plots)")
    w.add_argument("--n", type=int, default=40, help="problems per difficulty (with --data: the file's first N "
                   "rows of each difficulty; for a run directory trained on a file: the first N of the rows it held "
                   "out, with or without --data)")
    w.add_argument("--seed", type=int, default=12345, help="seed of the problems (same for every model/budget)")
    w.add_argument("--difficulties", help="embedded task: range '1-8' (the default) or list '1,3,5'")
    w.add_argument("--data", help="sweep the problems of a JSONL/JSON/Parquet file instead of the embedded task "
                   "(answers graded by --grader, math equivalence by default)")
    w.add_argument("--grader", choices=("exact_int", "math", "exact"), help="--data: how an answer is judged right "
                   "(default math: equivalence of the answer after </think>; exact: the answer as text); a run "
                   "directory trained on a file uses its own data.grader")
    w.add_argument("--prompt-column", help="--data: column of the prompt (default 'prompt')")
    w.add_argument("--answer-column", help="--data: column of the reference answer (default 'answer')")
    w.add_argument("--answer-delimiter", help="--data: the answer column is 'reasoning DELIM answer' (GSM8K: ####)")
    w.add_argument("--difficulty-column", help="--data: integer column to group rows by (default: one group)")
    w.add_argument("--max-prompt-chars", type=int, default=2000, help="--data: longer prompts are bad rows")
    w.add_argument("--skip-bad-rows", action="store_true", help="--data: skip bad rows (logged) instead of stopping")
    w.add_argument("--max-new-tokens", type=int, default=160)
    w.add_argument("--batch-size", type=int, default=64)
    w.add_argument("--workers", type=int, default=1, help="rollout workers generating in parallel (reused by "
                   "every model)")
    w.add_argument("--backend", choices=("ray", "local"), default="ray",
                   help="workers as Ray actors, or in this process (debugging)")
    w.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="rollout engine: the project's own loop (hf) or vLLM in a child process")
    w.add_argument("--vllm-python", default=None, help="--engine vllm: the interpreter with vLLM installed (default "
                   "$POSTTRAIN_VLLM_PYTHON, else this one)")
    w.add_argument("--threads", type=int, default=0, help="torch CPU threads in all, split across the workers "
                   "(0: all cores)")
    w.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    w.set_defaults(func=_cmd_sweep)
    b = sub.add_parser("bench", help="our GRPO step against TRL's GRPOTrainer, rollout/learner throughput, "
                       "time shares, peak memory, rollout scaling (bench.json and a table)")
    b.add_argument("--steps", type=int, default=5, help="timed GRPO steps per side (and rollout repetitions)")
    b.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    b.add_argument("--out", help="directory for bench.json")
    b.add_argument("--model", help="checkpoint (default: runs/quickstart/sft/checkpoint, else the cached base "
                   "model, else a random tiny MoE)")
    b.add_argument("--quick", action="store_true", help="small batch and short completions (a smoke run)")
    b.add_argument("--threads", type=int, default=2, help="torch threads of TRL and of the in-process rollout "
                   "comparison (both also timed at 1); our actors' threads come from the recipe's ray section")
    b.add_argument("--backend", choices=("ray", "local"), default="ray", help="our workers as Ray actors or in "
                   "this process")
    b.add_argument("--no-trl", action="store_true", help="skip the TRL side")
    b.add_argument("--no-scaling", action="store_true", help="skip the 1 vs 2 rollout workers measurement")
    b.add_argument("--no-grid", action="store_true", help="skip the scaling table (prompts per step 8 -> 64, "
                   "max new tokens 64 -> 512, ours and TRL, on a random-init model of the same shape)")
    b.add_argument("--grid-steps", type=int, default=2, help="timed steps per side at each point of the scaling table")
    b.add_argument("--async-staleness", type=int, default=1, metavar="K", help="also time our step at "
                   "grpo.async.max_staleness K, rollouts K versions ahead of the learner (0: skip)")
    b.add_argument("--fsdp-ranks", type=int, default=2, metavar="N", help="the memory a learner rank holds with "
                   "FSDP2 over N gloo ranks against one unsharded learner (0: skip)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for both sides (repeatable), e.g. model.experts_implementation=eager")
    b.set_defaults(func=_cmd_bench)
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    from posttrain.data import DataError
    from posttrain.eval.sweep import SweepError
    from posttrain.export import ExportError, LossyExport
    from posttrain.model import CheckpointError
    from posttrain.recipe import RecipeError
    from posttrain.runlock import RunDirLocked
    from posttrain.runlog import RunFileError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "run" and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra  # overrides given after --run-dir
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C: locks released, finished stages kept
    try:
        return args.func(args)
    except LossyExport as e:  # the inputs were fine; the result measured too poor to ship (export.max_kl)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RecipeError, DataError, CheckpointError, RunDirLocked, SweepError, ExportError, ConnectionError,
            RunFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # a run stopped by a fault (too many skipped steps, an actor out of restarts)
        from posttrain.stages.rl import TrainingStopped
        from posttrain.workers.actors import WorkerFailed

        if not isinstance(e, (TrainingStopped, WorkerFailed)):
            raise
        print(f"error: {e}\nthe last saved training state is intact: run the same command again to resume",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
