"""Budget sweep: accuracy (with 95% Wilson intervals), thinking length and budget adherence, by model, budget,
mode and difficulty, on the embedded arithmetic task.

Two modes per budget: `natural` (the budget is only an instruction in the prompt) and `capped` (a hard cap forces
`</think>` once thinking reaches the budget: budget-forcing, Muennighoff et al. 2025). Decoding is greedy, so a
capped response differs from the natural one only where the natural one overran: capped mode reuses the natural
responses that kept the budget and generates the others again (`capped_responses`). Budget `auto` (None) has no
cap and budget 0 is a pre-closed think block: their capped rows repeat the natural responses.

`rel_length_error` is L1's length measure (Aggarwal & Welleck 2025): mean |n_think - budget| / budget.

Generation is greedy, on `RolloutWorker`s (its own KV-cache decoding loop, the same budget forcing as RL rollouts):
Ray actors or objects in this process, started once and reused for every model (`RolloutWorker.load`). A
response's `n_think` is every token generated before `</think>` (the count the cap uses).

The pure parts (`grade_responses`, `aggregate`; the statistics in `eval/stats.py`) know nothing of models or files;
`run_sweep` generates, `write_outputs` writes, `eval/plots.py` draws.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.eval.stats import quantile, wilson_interval

if TYPE_CHECKING:
    from posttrain.generate import Response

MODES = ("natural", "capped")
ROW_KEYS = (
    "model", "budget", "mode", "difficulty", "n", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
    "think_tokens_mean", "think_tokens_median", "think_tokens_p90", "adherence", "rel_length_error", "forced_share",
)


class SweepError(ValueError):
    """A model path that cannot be swept (the message says what was looked for) or a sweep option out of range (the
    message names the option and the value)."""


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
    from posttrain.rewards.verifiable import get_grader, gold

    grade = get_grader(grader)
    return [Record(p.difficulty, bool(grade(r.text, gold(grader, p.answer, getattr(p, "tests", None)))), r.n_think,
                   r.closed, r.forced) for p, r in zip(problems, responses)]


def first_per_difficulty(problems: list, n: int) -> list:
    """The first `n` problems of each difficulty, in their order (a data file's rows)."""
    seen: dict[int, int] = defaultdict(int)
    out = []
    for p in problems:
        if seen[p.difficulty] < n:
            seen[p.difficulty] += 1
            out.append(p)
    return out


def file_problems(data, n_per_difficulty: int) -> list:
    """Up to `n_per_difficulty` rows of each difficulty (`data.difficulty_column`; one group without it) of the data
    file `data` (a `DataConfig`), as problems with `expression`, `answer` and `difficulty`."""
    from posttrain.data import text_problems

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
        "forced_share": sum(r.forced for r in records) / n if mode == "capped" else None,
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


def _unique(xs: list) -> list:
    """`xs` without repeats, in the order of their first appearance."""
    return list(dict.fromkeys(xs))


def parse_budgets(spec: str) -> list[int | None]:
    """"0,16,auto" -> [0, 16, None]. A budget named twice (`8,08`, `auto,auto`) is kept once, where it first
    appears. Only ASCII digits make a budget (`str.isdigit` would also take "²")."""
    out: list[int | None] = []
    for part in spec.split(","):
        part = part.strip()
        if part == "auto":
            out.append(None)
        elif part and part.isascii() and part.isdigit():
            out.append(int(part))
        else:
            raise SweepError(f"--budgets {spec!r}: {part!r} is neither a non-negative integer nor 'auto'")
    return _unique(out)


def parse_difficulties(spec: str) -> list[int]:
    """"1-8" or "1,3,5" -> list of ints, each in the embedded task's MIN_DIFFICULTY..MAX_DIFFICULTY (a difficulty
    named twice is kept once, where it first appears)."""
    from posttrain.tasks.arithmetic import MAX_DIFFICULTY, MIN_DIFFICULTY

    def number(x: str) -> int:
        x = x.strip()
        if not (x.isascii() and x.isdigit()):
            raise SweepError(f"--difficulties {spec!r}: {x!r} is not an integer; expected a range like "
                             f"'{MIN_DIFFICULTY}-{MAX_DIFFICULTY}' or a list like '1,3,5'")
        return int(x)

    if "-" in spec:
        a, b = (number(x) for x in spec.split("-", 1))
        if a > b:
            raise SweepError(f"--difficulties {spec!r}: the range is empty ({a} > {b})")
        out = list(range(a, b + 1))
    else:
        out = [number(x) for x in spec.split(",")]
    bad = [d for d in out if not MIN_DIFFICULTY <= d <= MAX_DIFFICULTY]
    if bad:
        raise SweepError(f"--difficulties {spec!r}: difficulty {bad[0]} is outside the task's "
                         f"{MIN_DIFFICULTY}..{MAX_DIFFICULTY}")
    return _unique(out)


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


def _responses(batch, budget: int | None) -> list[Response]:
    """A RolloutBatch (one sample per prompt) as `Response`s, in prompt order."""
    from posttrain.generate import Response

    lengths = batch.response_mask.sum(1).tolist()
    return [Response(batch.texts[i], batch.response_ids[i, : lengths[i]].tolist(), batch.n_think[i],
                     batch.closed[i], batch.forced[i], budget) for i in range(len(batch))]


def generate_responses(workers: list, prompts: list[str], budget: int | None, cap: bool, max_new_tokens: int,
                       batch_size: int) -> list[Response]:
    """One greedy response per prompt from `workers` (proxies of `RolloutWorker`), in parallel.

    Prompts are sorted by length and cut into batches of `batch_size`, handed out round-robin: the batches, and so
    the tokens, do not depend on the number of workers. `cap=False` is natural mode (the budget only in the prompt).
    """
    from posttrain.workers.rollout import RolloutWorker

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    chunks = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    pending = [workers[k % len(workers)].submit(RolloutWorker.generate, [prompts[i] for i in idx],
                                                [budget] * len(idx), 1, max_new_tokens, greedy=True, cap=cap)
               for k, idx in enumerate(chunks)]
    out: list[Response | None] = [None] * len(prompts)
    for idx, p in zip(chunks, pending):
        for i, r in zip(idx, _responses(p.result(), budget)):
            out[i] = r
    return out  # type: ignore[return-value]


def capped_responses(workers: list, prompts: list[str], natural: list[Response], budget: int | None,
                     max_new_tokens: int, batch_size: int) -> list[Response]:
    """Capped mode's greedy responses, given natural mode's (`natural[i]` answers `prompts[i]` at `budget`).

    The cap forces `</think>` only on a row still thinking after `budget` tokens, so a natural response that
    closed its think block within the budget is what the cap gives too (at exactly `budget` tokens the forced
    token is its own choice: not counted as forced). Only the others are generated again, with the cap: at a
    budget the model keeps, capped mode costs almost nothing. (The regenerated rows are batched apart from the
    rest, which can move a float32 logit in the last bit; not a different decoding.)
    """
    if budget is None or budget == 0:
        return list(natural)  # nothing to cap: auto has no cap, budget 0 is pre-closed
    redo = [i for i, r in enumerate(natural) if not (r.closed and r.n_think <= budget)]
    out = list(natural)
    for i, r in zip(redo, generate_responses(workers, [prompts[i] for i in redo], budget, True, max_new_tokens,
                                             batch_size)):
        out[i] = r
    return out


def sweep_model(workers: list, label: str, problems, budgets: list[int | None], max_new_tokens: int = 160,
                batch_size: int = 64, grader: str = "exact_int") -> list[dict]:
    """Rows for the model the workers hold over `budgets` x MODES on fixed `problems` (greedy decoding), each
    response graded by `grade_responses(problems, responses, grader)`."""
    prompts = [p.expression for p in problems]
    rows = []
    for budget in budgets:
        natural = generate_responses(workers, prompts, budget, False, max_new_tokens, batch_size)
        capped = capped_responses(workers, prompts, natural, budget, max_new_tokens, batch_size)
        rows += aggregate(grade_responses(problems, natural, grader), label, budget, "natural")
        rows += aggregate(grade_responses(problems, capped, grader), label, budget, "capped")
    return rows


def start_workers(checkpoint: Path, n: int, backend: str, device, cpus_per_worker: int = 1,
                  ray_init: dict | None = None) -> list:
    """`n` RolloutWorkers holding `checkpoint`: Ray actors (`backend="ray"`; on CUDA each gets 1/n of a GPU; Ray is
    started by `init_ray(**ray_init)` unless it runs already) or objects in this process (`"local"`, which keep this
    process's thread count)."""
    import torch

    from posttrain.model import pick_dtype
    from posttrain.workers.actors import ActorOptions, init_ray, spawn
    from posttrain.workers.rollout import RolloutWorker

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
    return [spawn(RolloutWorker, str(checkpoint), str(device), dtype, options.torch_threads, name=f"sweep{i}",
                  options=options, backend=backend) for i in range(n)]


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


def check_options(budgets: list, n_per_difficulty: int, difficulties: list[int] | None, max_new_tokens: int,
                  batch_size: int, workers: int, backend: str, cpus_per_worker: int) -> None:
    """The sweep's settings, checked before anything loads; the message names the option and its value
    (`difficulties` None: problems of a data file, which carry their own)."""
    from posttrain.tasks.arithmetic import MAX_DIFFICULTY, MIN_DIFFICULTY

    for b in budgets:
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
            raise SweepError(f"--budgets: {b!r} is neither a non-negative integer nor 'auto' (None)")
    if not budgets:
        raise SweepError("--budgets: no budget given")
    for name, value in (("--n", n_per_difficulty), ("--max-new-tokens", max_new_tokens),
                        ("--batch-size", batch_size), ("--workers", workers), ("cpus_per_worker", cpus_per_worker)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepError(f"{name} must be an integer >= 1, got {value!r}")
    if difficulties is not None and not difficulties:
        raise SweepError("--difficulties: no difficulty given")
    for d in difficulties or []:
        if isinstance(d, bool) or not isinstance(d, int) or not MIN_DIFFICULTY <= d <= MAX_DIFFICULTY:
            raise SweepError(f"--difficulties: {d!r} is outside the task's {MIN_DIFFICULTY}..{MAX_DIFFICULTY}")
    if backend not in ("ray", "local"):
        raise SweepError(f"--backend {backend!r}: expected 'ray' or 'local'")


def distinct_models(specs: list[ModelSpec]) -> list[ModelSpec]:
    """`specs` with each model once (the same checkpoint and adapter, however its path was written: the first one
    is kept) and with distinct labels: two different models that would share a label get their path appended."""
    from collections import Counter
    from dataclasses import replace

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
              ray_init: dict | None = None, problems: list | None = None, grader: str | None = None) -> list[dict]:
    """Rows for every model (a path for `resolve_model`, or a `ModelSpec`) on the same held-out problems: the
    embedded task's (`n_per_difficulty` of each of `difficulties`, from `seed`), or the given `problems` (a data
    file's, e.g. `file_problems`; `n_per_difficulty`, `seed` and `difficulties` then unused), graded by `grader`
    (`grade_responses`; None: "exact_int" for the embedded task, "math" for given problems).

    The settings are checked and every model is resolved first (a bad option or path fails before any model
    loads); a budget, difficulty or model given twice is swept once (`distinct_models`). Then `workers` rollout
    workers are started once and reused: each loads the next model in turn (`RolloutWorker.load`). They are ended on
    return.
    """
    from posttrain.tasks.arithmetic import generate_problems
    from posttrain.workers.rollout import RolloutWorker

    budgets, difficulties = _unique(list(budgets)), _unique(list(difficulties))
    check_options(budgets, n_per_difficulty, difficulties if problems is None else None, max_new_tokens, batch_size,
                  workers, backend, cpus_per_worker)  # a data file's problems carry their own difficulties
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
    pool = start_workers(specs[0].checkpoint, workers, backend, dev, cpus_per_worker, ray_init)
    rows = []
    try:
        for k, spec in enumerate(specs):
            if k or spec.adapter is not None:
                adapter = None if spec.adapter is None else str(spec.adapter)
                for pending in [w.submit(RolloutWorker.load, str(spec.checkpoint), adapter) for w in pool]:
                    pending.result()
            rows += sweep_model(pool, spec.label, problems, budgets, max_new_tokens, batch_size, grader)
    finally:
        for w in pool:
            w.kill()
    return rows


# --------------------------------------------------------------------------------------------------- outputs


def write_outputs(rows: list[dict], out: str | Path) -> Path:
    """DIR/sweep.json (list of rows) and DIR/sweep.csv (same rows, empty cells for None)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_KEYS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in ROW_KEYS})
    return out


def short_labels(labels, width: int) -> dict[str, str]:
    """label -> how a table column or plot title `width` characters wide shows it: the label, or "..." and its last
    `width - 3` characters when longer. Two labels that would read the same are both shown whole."""
    from collections import Counter

    short = {label: label if len(label) <= width else "..." + label[-(width - 3):] for label in dict.fromkeys(labels)}
    counts = Counter(short.values())
    return {label: s if counts[s] == 1 else label for label, s in short.items()}


def format_sweep_table(rows: list[dict]) -> str:
    """Difficulty "all": model, budget, mode, accuracy ± 95% CI, mean thinking tokens, adherence."""
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
    return "\n".join(lines)
