"""Budget sweep: accuracy (with 95% Wilson intervals), thinking length and budget adherence, by model, budget,
mode and difficulty, on the embedded arithmetic task.

Three modes per budget: `natural` (the budget is only an instruction in the prompt), `capped` (the budget in the
prompt and a hard cap forcing `</think>` once thinking reaches it) and `forced` (no budget in the prompt, the same
cap: budget forcing of the autonomous mode, Muennighoff et al. 2025, the baseline any thinking model gets without
training for budgets). Decoding is greedy, so a capped response differs from the uncapped one of the same prompt
only where that one overran: capped mode reuses the natural responses that kept the budget and generates the
others again, forced mode the same from the autonomous responses (`capped_responses`, the one decoding loop of
`RolloutWorker` either way). Budget `auto` (None) has no cap: its capped and forced rows repeat the natural
responses; budget 0 is a pre-closed think block with the budget in the prompt, and `</think>` forced as the first
token without. `eval/forcing.py` compares capped with forced on the same problems (`SweepResult.forcing`).

`rel_length_error` is L1's length measure (Aggarwal & Welleck 2025): mean |n_think - budget| / budget.

Generation is greedy, on `RolloutWorker`s (its own KV-cache decoding loop, the same budget forcing as RL rollouts):
Ray actors or objects in this process, started once and reused for every model (`RolloutWorker.load`). A
response's `n_think` is every token generated before `</think>` (the count the cap uses).

The pure parts (`grade_responses`, `aggregate`; the statistics in `eval/stats.py`) know nothing of models or files;
`run_sweep` generates, `eval/report.py` writes and prints, `eval/plots.py` draws.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.eval.stats import quantile, wilson_interval
from posttrain.eval.sweep_options import MODES, SweepError, _unique, check_options

if TYPE_CHECKING:
    from posttrain.generate import Response

ROW_KEYS = (
    "model", "budget", "mode", "difficulty", "n", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
    "think_tokens_mean", "think_tokens_median", "think_tokens_p90", "adherence", "rel_length_error", "forced_share",
)


# ---------------------------------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Record:
    """One graded response."""

    difficulty: int
    correct: bool
    n_think: int
    closed: bool
    forced: bool


def grade_responses(problems, responses, grader: str = "exact_int") -> list[Record]:
    """Grade each response against its problem's answer with the task's grader (`rewards.verifiable.get_grader`:
    "exact_int" for the embedded task, "math" equivalence or "exact" text for a data file's answers): the function
    the RL rewards' correctness and the RM labels use too."""
    from posttrain.rewards.verifiable import judge

    return [Record(p.difficulty, judge(grader, r.text, p.answer, getattr(p, "tests", None)), r.n_think, r.closed,
                   r.forced) for p, r in zip(problems, responses)]


def file_problems(data, n_per_difficulty: int) -> list:
    """Up to `n_per_difficulty` rows of each difficulty (`data.difficulty_column`; one group without it) of the data
    file `data` (a `DataConfig`), as problems with `expression`, `answer` and `difficulty`."""
    from posttrain.data import text_problems
    from posttrain.tasks.files import first_per_difficulty

    return first_per_difficulty(text_problems(data), n_per_difficulty)


def summarize(records: list[Record], budget: int | None, mode: str) -> dict:
    """Metrics of one group of records answered under `budget` (None = autonomous) in `mode`."""
    n = len(records)
    k = sum(r.correct for r in records)
    lo, hi = wilson_interval(k, n)
    think = [r.n_think for r in records]
    from posttrain.budgets import adherent as kept

    adherent = [kept(r.closed, r.forced, r.n_think, budget) for r in records] if budget is not None else None
    return {
        "n": n,
        "accuracy": k / n,
        "accuracy_ci_low": lo,
        "accuracy_ci_high": hi,
        "think_tokens_mean": sum(think) / n,
        "think_tokens_median": quantile(think, 0.5),
        "think_tokens_p90": quantile(think, 0.9),
        "adherence": sum(adherent) / n if adherent is not None else None,
        "rel_length_error": (sum(abs(t - budget) / budget for t in think) / n) if budget else None,
        "forced_share": sum(r.forced for r in records) / n if mode in ("capped", "forced") else None,
    }


def aggregate(records: list[Record], model: str, budget: int | None, mode: str) -> list[dict]:
    """Rows for each difficulty (ascending) and "all"."""
    groups: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.difficulty].append(r)
    label = "auto" if budget is None else budget
    head = {"model": model, "budget": label, "mode": mode}
    rows = [{**head, "difficulty": d, **summarize(groups[d], budget, mode)} for d in sorted(groups)]
    rows.append({**head, "difficulty": "all", **summarize(records, budget, mode)})
    return rows


# -------------------------------------------------------------------------------------------- model resolution


@dataclass(frozen=True)
class ModelSpec:
    label: str  # the path as given on the command line
    checkpoint: Path  # a HF checkpoint directory, or the base of an adapter
    adapter: Path | None = None  # a PEFT adapter directory to load on top of `checkpoint`


def _run_checkpoint(run: Path) -> Path:
    """The last model-producing stage's checkpoint of a run directory, inside `run` (`runlog.latest_checkpoint`,
    as `posttrain export` resolves it); a run without finished stages falls back to its sft checkpoint."""
    from posttrain.runlog import latest_checkpoint

    try:
        found = latest_checkpoint(run)
    except FileNotFoundError as e:
        raise SweepError(str(e)) from None
    if found is not None:
        return found[1]
    sft = run / "sft" / "checkpoint"
    if (sft / "config.json").is_file():
        return sft
    raise SweepError(f"run directory {run}: no checkpoint found (no stage of its recipe.yaml finished with one, "
                     f"and no {sft})")


def resolve_model(path: str) -> ModelSpec:
    """A run directory (recipe.yaml), a checkpoint (config.json) or a PEFT adapter (adapter_config.json)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise SweepError(f"--model {path}: not a directory")
    if (p / "adapter_config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not (Path(base).expanduser() / "config.json").is_file():
            raise SweepError(f"--model {path}: adapter's base_model_name_or_path {base!r} is not a local "
                             "checkpoint directory (config.json)")
        return ModelSpec(path, Path(base).expanduser(), p)
    if (p / "config.json").is_file():
        return ModelSpec(path, p)
    if (p / "recipe.yaml").is_file():
        return ModelSpec(path, _run_checkpoint(p))
    raise SweepError(f"--model {path}: neither a run directory (recipe.yaml), a checkpoint (config.json) nor a "
                     "PEFT adapter (adapter_config.json)")


# ------------------------------------------------------------------------------------------------- generation


def generate_responses(workers: list, prompts: list[str], budget: int | None, cap: bool, max_new_tokens: int,
                       batch_size: int, budget_in_prompt: bool = True) -> list[Response]:
    """One greedy response per prompt from `workers` (proxies of `RolloutWorker`), in parallel.

    Prompts are sorted by length and cut into batches of `batch_size`, handed out round-robin: the batches, and so
    the tokens, do not depend on the number of workers. `cap=False` is natural mode (the budget only in the prompt);
    `budget_in_prompt=False` with `cap=True` is forced mode (no budget in the prompt, `</think>` forced at it).
    """
    from posttrain.generate import batch_responses
    from posttrain.workers.rollout import RolloutWorker

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    chunks = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    pending = [workers[k % len(workers)].submit(RolloutWorker.generate, [prompts[i] for i in idx],
                                                [budget] * len(idx), 1, max_new_tokens, greedy=True, cap=cap,
                                                budget_in_prompt=budget_in_prompt)
               for k, idx in enumerate(chunks)]
    out: list[Response | None] = [None] * len(prompts)
    for idx, p in zip(chunks, pending):
        for i, r in zip(idx, batch_responses(p.result())):
            out[i] = r
    return out  # type: ignore[return-value]


def capped_responses(workers: list, prompts: list[str], natural: list[Response], budget: int | None,
                     max_new_tokens: int, batch_size: int, budget_in_prompt: bool = True) -> list[Response]:
    """Capped mode's greedy responses, given the uncapped ones of the same prompts (`natural[i]` answers
    `prompts[i]`): natural mode's at `budget`, or with `budget_in_prompt=False` (forced mode) the autonomous
    responses (budget None), whichever budget they were generated for.

    The cap forces `</think>` only on a row still thinking after `budget` tokens, so an uncapped response that
    closed its think block within the budget is what the cap gives too (at exactly `budget` tokens the forced
    token is its own choice: not counted as forced). Only the others are generated again, with the cap: at a
    budget the model keeps, capped mode costs almost nothing. (The regenerated rows are batched apart from the
    rest, which can move a float32 logit in the last bit; not a different decoding.) Every response returned
    carries `budget`.
    """
    if budget is None or (budget == 0 and budget_in_prompt):
        return list(natural)  # nothing to cap: auto has no cap, budget 0 in the prompt is pre-closed
    redo = [i for i, r in enumerate(natural) if not (r.closed and r.n_think <= budget)]
    out = [replace(r, budget=budget) for r in natural]
    for i, r in zip(redo, generate_responses(workers, [prompts[i] for i in redo], budget, True, max_new_tokens,
                                             batch_size, budget_in_prompt)):
        out[i] = r
    return out


@dataclass
class SweepResult:
    """What `run_sweep` measured: `rows` (`aggregate`'s, every model x budget x mode x difficulty) and `forcing`
    (`eval.forcing.forcing_comparison`'s, each row with its `model`; empty unless both capped and forced ran)."""

    rows: list[dict]
    forcing: list[dict] = field(default_factory=list)


def sweep_model(workers: list, label: str, problems, budgets: list[int | None], max_new_tokens: int = 160,
                batch_size: int = 64, grader: str = "exact_int", modes=MODES) -> SweepResult:
    """Rows for the model the workers hold over `budgets` x `modes` on fixed `problems` (greedy decoding), each
    response graded by `grade_responses(problems, responses, grader)`; with capped and forced among `modes`, their
    paired comparison on these problems. The autonomous responses are generated once (those of budget `auto`
    when it is swept) and reused by forced mode at every budget."""
    from posttrain.eval.forcing import forcing_comparison

    prompts = [p.expression for p in problems]
    result, paired = SweepResult([]), {}
    autonomous: list[Response] | None = None

    def generate(budget):
        nonlocal autonomous
        if budget is None and autonomous is not None:
            return autonomous
        responses = generate_responses(workers, prompts, budget, False, max_new_tokens, batch_size)
        if budget is None:
            autonomous = responses
        return responses

    for budget in budgets:
        by_mode = {}
        if "natural" in modes or "capped" in modes:
            by_mode["natural"] = generate(budget)
        if "capped" in modes:
            by_mode["capped"] = capped_responses(workers, prompts, by_mode["natural"], budget, max_new_tokens,
                                                 batch_size)
        if "forced" in modes:
            by_mode["forced"] = capped_responses(workers, prompts, generate(None), budget, max_new_tokens, batch_size,
                                                 budget_in_prompt=False)
        records = {m: grade_responses(problems, by_mode[m], grader) for m in modes}
        for m in modes:
            result.rows += aggregate(records[m], label, budget, m)
        if budget is not None and "capped" in modes and "forced" in modes:
            paired[budget] = ([r.difficulty for r in records["capped"]], [r.correct for r in records["capped"]],
                              [r.correct for r in records["forced"]])
    result.forcing = [{"model": label, **r} for r in forcing_comparison(paired)]
    return result


def start_workers(checkpoint: Path, n: int, backend: str, device, cpus_per_worker: int = 1,
                  ray_init: dict | None = None, engine: dict | None = None) -> list:
    """`n` RolloutWorkers holding `checkpoint`: Ray actors (`backend="ray"`; on CUDA each gets 1/n of a GPU; Ray is
    started by `init_ray(**ray_init)` unless it runs already) or objects in this process (`"local"`, which keep this
    process's thread count). `engine`: a `rollout_engine` section as a dict (None: the hf engine)."""
    import torch

    from posttrain.model import pick_dtype
    from posttrain.workers.actors import ActorOptions, spawn
    from posttrain.workers.ray_cluster import init_ray
    from posttrain.workers.engines import engine_class, engine_kwargs

    if n < 1:
        raise SweepError(f"--workers must be >= 1, got {n}")
    if backend == "ray":
        gpus = 1 / n if device.type == "cuda" else 0.0
        res = init_ray(**(ray_init or {}))
        _check_ray_fits(n, cpus_per_worker, gpus, res["CPU"], res["GPU"],
                        recipe_ray=ray_init is not None and res["address"] == "local")
        options, device = ActorOptions(cpus=cpus_per_worker, gpus=gpus), torch.device("cuda" if gpus else "cpu")
    elif backend == "local":
        options = ActorOptions(cpus=cpus_per_worker, threads=torch.get_num_threads())
    else:
        raise SweepError(f"unknown backend {backend!r}; expected 'ray' or 'local'")
    dtype = pick_dtype("auto", device)
    cls = engine_class((engine or {}).get("name", "hf"))
    return [spawn(cls, str(checkpoint), str(device), dtype, options.torch_threads, name=f"sweep{i}",
                  options=options, backend=backend, **engine_kwargs(engine)) for i in range(n)]


def _check_ray_fits(n: int, cpus_per_worker: int, gpus_per_worker: float, have_cpu: float, have_gpu: float,
                    recipe_ray: bool = False) -> None:
    """Ray waits forever for resources that never come: say, in the sweep's own options, how many workers fit.

    Both callers give each worker `max(1, threads // workers)` CPUs (the threads are split across the workers), so
    the workers need at least `workers` CPUs and about `threads`. `recipe_ray`: Ray was started from a recipe's
    `ray` section (whose `num_cpus` sets a local instance's size)."""
    if n * gpus_per_worker > have_gpu + 1e-9:
        raise SweepError(f"--device: the sweep's workers share one GPU but Ray has {have_gpu:g} GPUs; use "
                         "--device cpu (`device: cpu` in a recipe)")
    if n * cpus_per_worker <= have_cpu + 1e-9:
        return
    fit = int(have_cpu // cpus_per_worker)
    s = "s" if cpus_per_worker != 1 else ""
    msg = (f"--workers {n}: each sweep worker needs {cpus_per_worker} CPU{s}, {n * cpus_per_worker} in all, but "
           f"Ray has {have_cpu:g} CPUs")
    if fit >= 1:
        msg += f"; at most {fit} worker{'s' if fit != 1 else ''} of {cpus_per_worker} CPU{s} fit: lower --workers " \
               "(`sweep.workers` in a recipe)"
        if cpus_per_worker > 1:
            msg += " or the threads split across the workers (--threads; `threads` in a recipe)"
    else:
        msg += "; not even one worker fits: lower the threads split across the workers (--threads; `threads` in " \
               "a recipe)"
    if recipe_ray:
        msg += ", or raise `ray.num_cpus`"
    raise SweepError(msg)


def _sweep_device(device):
    """`device` ("auto", "cpu", "cuda[:N]" or a torch.device) as a torch.device this machine has."""
    import torch

    from posttrain.model import pick_device

    try:
        d = pick_device(str(device))
    except ValueError:
        raise SweepError(f"--device {str(device)!r}: CUDA is not available on this machine; use cpu or auto") from None
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise SweepError(f"--device {str(device)!r}: expected auto, cpu or cuda[:N]")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise SweepError(f"--device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def distinct_models(specs: list[ModelSpec]) -> list[ModelSpec]:
    """`specs` with each model once (the same checkpoint and adapter, however its path was written: the first one
    is kept) and with distinct labels: two different models that would share a label get their path appended."""
    from collections import Counter

    seen, out = set(), []
    for s in specs:
        key = (s.checkpoint.expanduser().resolve(), s.adapter.expanduser().resolve() if s.adapter else None)
        if key not in seen:
            seen.add(key)
            out.append(s)
    shared = {label for label, c in Counter(s.label for s in out).items() if c > 1}
    out = [replace(s, label=f"{s.label} ({s.adapter or s.checkpoint})") if s.label in shared else s for s in out]
    counts = Counter(s.label for s in out)  # still shared (paths that differ only in how they are written)
    k: Counter = Counter()
    for i, s in enumerate(out):
        if counts[s.label] > 1:
            k[s.label] += 1
            out[i] = replace(s, label=f"{s.label} #{k[s.label]}")
    return out


def run_sweep(models: list, budgets: list[int | None], n_per_difficulty: int = 40, seed: int = 12345,
              difficulties: list[int] = list(range(1, 9)), max_new_tokens: int = 160, batch_size: int = 64,
              device: str = "auto", workers: int = 1, backend: str = "local", cpus_per_worker: int = 1,
              ray_init: dict | None = None, problems: list | None = None, grader: str | None = None,
              modes=MODES, engine: dict | None = None) -> SweepResult:
    """Rows (and the forcing comparison: `sweep_model`) in `modes` for every model (a path for `resolve_model`, or a `ModelSpec`) on the same held-out problems: the
    embedded task's (`n_per_difficulty` of each of `difficulties`, from `seed`), or the given `problems` (a data
    file's, e.g. `file_problems`; `n_per_difficulty`, `seed` and `difficulties` then unused), graded by `grader`
    (`grade_responses`; None: "exact_int" for the embedded task, "math" for given problems).

    The settings are checked and every model is resolved first (a bad option or path fails before any model
    loads); a budget, difficulty or model given twice is swept once (`distinct_models`). Then `workers` rollout
    workers are started once and reused: each loads the next model in turn (`RolloutWorker.load`). They are ended on
    return. `engine`: the `rollout_engine` they run (a dict of `RolloutEngineConfig`; None: hf).
    """
    from posttrain.tasks.arithmetic import generate_problems
    from posttrain.workers.rollout import RolloutWorker

    budgets, difficulties = _unique(list(budgets)), _unique(list(difficulties))
    check_options(budgets, n_per_difficulty, difficulties if problems is None else None, max_new_tokens, batch_size,
                  workers, backend, cpus_per_worker, modes)  # a data file's problems carry their own difficulties
    modes = [m for m in MODES if m in modes]
    if problems is not None and not problems:
        raise SweepError("--data: no problems to sweep")
    dev = _sweep_device(device)
    if not models:
        raise SweepError("--model: no model given")
    specs = distinct_models([m if isinstance(m, ModelSpec) else resolve_model(m) for m in models])
    from posttrain.model import check_checkpoint_files

    for spec in specs:  # a damaged checkpoint stops the sweep here, not in a worker that would be restarted
        check_checkpoint_files(spec.checkpoint)
    grader = grader or ("exact_int" if problems is None else "math")
    if problems is None:
        problems = generate_problems(n_per_difficulty * len(difficulties), seed, difficulties)
    pool = start_workers(specs[0].checkpoint, workers, backend, dev, cpus_per_worker, ray_init, engine)
    result = SweepResult([])
    try:
        for k, spec in enumerate(specs):
            if k or spec.adapter is not None:
                adapter = None if spec.adapter is None else str(spec.adapter)
                for pending in [w.submit(RolloutWorker.load, str(spec.checkpoint), adapter) for w in pool]:
                    pending.result()
            one = sweep_model(pool, spec.label, problems, budgets, max_new_tokens, batch_size, grader, modes)
            result.rows += one.rows
            result.forcing += one.forcing
    finally:
        for w in pool:
            w.kill()
    return result
