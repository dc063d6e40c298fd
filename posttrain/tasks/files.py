"""The user's own rows as a task (`data.source: file` / `hub`): JSONL, JSON, Parquet, `datasets` saved to disk or
named on a hub, read and validated by `posttrain.data` (column mapping `data.*`).

Rows spread evenly through the file are held out for the RL stages' evaluation (`data.split_held_out`), a share of
their own for each eval budget (so the pooled verdict counts each problem once); SFT, the RM and every RL step
train on the other rows only, and the eval and sweep stages (and `posttrain sweep --model RUN`) evaluate the held
out ones. Graded by `data.grader` (`math` equivalence by default: integers, fractions, decimals, LaTeX). The only
hook is `demonstrations`, with a reasoning column (`data.reasoning_column`, or the part before
`data.answer_delimiter`).
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from posttrain.budgets import draw_budget
from posttrain.data import DataError, Example, TextProblem, file_examples, split_held_out, spread
from posttrain.runlog import log, write_bytes_atomic
from posttrain.tasks.task import Task, register_task

RL_ALGOS = ("grpo", "ppo")
HELD_OUT_FILE = "held_out.jsonl"


def _eval_budgets(cfg) -> list[str]:
    return list(dict.fromkeys(str(b) for b in cfg.eval_budgets))


def held_out_per_budget(cfg, task, n_rows: int) -> int:
    """Rows held out per eval budget of one RL stage `cfg`: `eval_rows`, by default as many as the embedded task
    would evaluate (`eval_n_per_difficulty` x the task's difficulties), at most half of the rows in all."""
    n_budgets = max(1, len(_eval_budgets(cfg)))
    n_diff = task.max_difficulty - task.min_difficulty + 1
    wanted = cfg.eval_rows or cfg.eval_n_per_difficulty * n_diff
    return min(wanted, n_rows // (2 * n_budgets)) if cfg.eval_budgets and cfg.eval_n_per_difficulty > 0 else 0


def rl_held_out_rows(rc, n_rows: int) -> int:
    """How many of `n_rows` rows the recipe's RL stages hold out for evaluation (the largest stage's share): no
    stage trains on them."""
    held = [held_out_per_budget(getattr(rc, a), rc.task, n_rows) * len(_eval_budgets(getattr(rc, a)))
            for a in RL_ALGOS if a in rc.stages and getattr(rc, a).eval_n_per_difficulty > 0]
    return max(held, default=0)


def first_per_difficulty(problems: list, n: int) -> list:
    """The first `n` problems of each difficulty, in their order."""
    seen: dict[int, int] = {}
    out = []
    for p in problems:
        if seen.get(p.difficulty, 0) < n:
            seen[p.difficulty] = seen.get(p.difficulty, 0) + 1
            out.append(p)
    return out


@register_task("file")
class FileTask(Task):
    """Rows of `data.path` (`source: file`) or of a `datasets` name (`source: hub`)."""

    name = "file"
    default_grader = "math"
    holds_out_rows = True

    @classmethod
    def hooks_for(cls, rc) -> frozenset[str]:
        d = rc.data
        return frozenset({"demonstrations"}) if d.reasoning_column or d.answer_delimiter else frozenset()

    # the rows, read once per task object ------------------------------------------------------------------
    def examples(self, bad_rows_file=None) -> list[Example]:
        """Every usable row as an `Example` (bad rows stop the run, or are skipped with `data.skip_bad_rows`)."""
        return file_examples(self.rc.data, bad_rows_file)

    @functools.cached_property
    def _rows(self) -> list[TextProblem]:
        return [TextProblem(e.prompt, e.answer, e.difficulty or 0, e.tests, e.reasoning) for e in self.examples()]

    @property
    def where(self) -> str:
        return str(self.rc.data.path)

    @functools.cached_property
    def _split(self) -> tuple[list, list]:
        """(training rows, held-out rows) of the whole recipe: what any RL stage holds out, no stage trains on."""
        rows = self._rows
        return split_held_out(rows, rl_held_out_rows(self.rc, len(rows)), prompt=lambda r: r.expression)

    # problems ----------------------------------------------------------------------------------------------
    def train_examples(self, n: int, seed: int, bad_rows_file=None) -> list[Example]:
        """The first `n` rows that no RL stage holds out (all of them if fewer)."""
        rows = self.examples(bad_rows_file)
        k = rl_held_out_rows(self.rc, len(rows))
        train, _ = split_held_out(rows, k)
        if k:
            log.info("data: %d rows spread through %s are held out for the RL stages' evaluation; %d remain", k,
                     self.where, len(train))
        return train[:n]

    def rm_problems(self, n: int, seed: int) -> list:
        """`n` rows no RL stage holds out, first those the SFT stage does not train on (it takes the first
        `sft.n_examples` training rows), so that the samples' labels are not those of memorised answers."""
        train = self._split[0]
        first = list({e.expression: i for i, e in reversed(list(enumerate(train)))}.values())  # each prompt's first
        unseen = sorted(i for i in first if i >= self.rc.sft.n_examples)
        seen = sorted(i for i in first if i < self.rc.sft.n_examples)
        rng = random.Random(seed)
        picked = rng.sample(unseen, min(n, len(unseen)))
        n_seen = min(n - len(picked), len(seen))
        picked += rng.sample(seen, n_seen)
        if len(picked) < 2:
            raise DataError(f"{self.where}: rm needs at least 2 distinct prompts that no RL stage holds out, found "
                            f"{len(picked)}")
        if n_seen or len(picked) < n:
            log.info("rm: %d problems from %s (%d of them rows the sft stage trains on)", len(picked), self.where,
                     n_seen)
        return [train[i] for i in picked]

    def stage_split(self, cfg) -> tuple[list, dict[str, list]]:
        """(training rows, {eval budget: held-out rows}) of the RL stage `cfg` (cached per stage section)."""
        cache = self.__dict__.setdefault("_stage_splits", {})
        if id(cfg) not in cache:
            cache[id(cfg)] = self._split_for(cfg)
        return cache[id(cfg)]

    def _split_for(self, cfg) -> tuple[list, dict[str, list]]:
        rows = self._rows
        budgets = _eval_budgets(cfg)
        per_budget = held_out_per_budget(cfg, self.rc.task, len(rows))
        if cfg.eval_n_per_difficulty > 0 and budgets and per_budget == 0:
            log.warning("%s: %d rows are too few to hold any out for evaluation; the stage evaluates nothing",
                        self.where, len(rows))
        own = per_budget * len(budgets)
        # train on none of the rows any RL stage of the recipe holds out (another's share may be larger than this
        # one's): the eval and sweep stages evaluate all of them; evaluate on `own` of them, spread among them
        total = max(own, rl_held_out_rows(self.rc, len(rows)))
        train, held = split_held_out(rows, total, prompt=lambda r: r.expression)
        if len(held) < own:  # repeated prompts were held out once each
            per_budget = len(held) // len(budgets)
            log.warning("%s: the held-out rows repeat prompts; %d distinct ones, %d per eval budget", self.where,
                        len(held), per_budget)
        held = [held[i] for i in spread(len(held), per_budget * len(budgets))]
        by_budget = {b: held[i::len(budgets)] for i, b in enumerate(budgets)}  # each budget's share spans the file
        if not train:
            raise ValueError(f"{self.where}: no rows left to train on after holding out evaluation rows")
        log.info("%s: %d training rows, %d held out per eval budget (spread through the file)", self.where,
                 len(train), per_budget)
        return train, by_budget

    def step_problems(self, cfg, step: int) -> tuple[list, list]:
        train = self.stage_split(cfg)[0]
        rng = random.Random(self.rc.seed + step)
        k = cfg.prompts_per_step
        problems = rng.sample(train, k) if k <= len(train) else rng.choices(train, k=k)
        budget_rng = random.Random(f"budgets/{self.rc.seed}/{step}")  # independent of which rows were drawn
        return problems, [draw_budget(budget_rng, cfg.budgets) for _ in problems]

    def rl_eval_problems(self, cfg, budget) -> list:
        return self.stage_split(cfg)[1].get(str(budget), [])

    def evaluation_rows(self) -> list:
        """Every row the recipe's RL stages hold out (no stage trains on them). Raises DataError when there are
        too few rows to hold any out."""
        held = self._split[1]
        if not held:
            raise DataError(f"{self.where}: its {len(self._rows)} rows are too few for the grpo/ppo stage to hold "
                            "any out for evaluation (at most half the rows, a share per distinct eval budget), so "
                            "the eval and sweep stages have nothing no stage trained on; use more rows or fewer "
                            "eval budgets")
        return held

    def held_out(self, n_per_difficulty: int, seed: int = 0) -> list:
        return first_per_difficulty(self.evaluation_rows(), n_per_difficulty)

    def record(self, run_dir) -> None:
        if not self.rc.data.skip_bad_rows:
            self._rows  # noqa: B018 - reads and validates every row
        if rl_held_out_rows(self.rc, len(self._rows)):
            lines = [json.dumps({"prompt": p.expression, "answer": p.answer, "difficulty": p.difficulty})
                     for p in self._split[1]]
            write_bytes_atomic(Path(run_dir) / HELD_OUT_FILE, "".join(f"{x}\n" for x in lines).encode(),
                               "the held-out rows")

    def check_recorded(self, run_dir) -> None:
        """Raise DataError when `run_dir`'s recorded held-out rows are not those the data gives now (the file
        changed since the run): its evaluation would then include rows it trained on."""
        path = Path(run_dir) / HELD_OUT_FILE
        if not path.is_file():
            return
        recorded = [json.loads(x)["prompt"] for x in path.read_text().splitlines() if x.strip()]
        if recorded != [p.expression for p in self._split[1]]:
            raise DataError(f"{self.where}: the rows held out now are not those {path} records (the data changed "
                            "since the run), so some may be rows it trained on; sweep a file of held-out rows "
                            "with --data")

    @property
    def difficulties(self) -> list[int]:
        return sorted({p.difficulty for p in self._rows})

    def demonstration(self, problem) -> str:
        return problem.reasoning or ""


register_task("hub")(FileTask)
