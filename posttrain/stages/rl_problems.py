"""Where the RL stages' problems come from (pure: no workers, no Ray).

- `data.source: arithmetic` (the embedded task): each step's problems are generated from (seed, step), each eval
  budget's from (eval.seed, budget) (`sample_step_problems`, `rl_eval.eval_problems`); graded by `exact_int`.
- `data.source: file` / `hub` (the user's prompts and answers, `data.*` column mapping): rows spread evenly
  through the file are held out for the stage's evaluation (`data.split_held_out`), a share of their own for each
  eval budget (so the pooled verdict counts each
  problem once), and every step samples `prompts_per_step` of the other rows from (seed, step); graded by
  `math` equivalence (math-verify: integers, fractions, LaTeX), the grader of the `math` reward.

A problem is anything with `expression` (the user prompt), `answer` and `difficulty`, as the embedded task's
`Problem` has; file rows become `data.TextProblem`s (difficulty from `data.difficulty_column`, else 0).
"""

from __future__ import annotations

import random

from posttrain.budgets import draw_budget
from posttrain.data import TextProblem, text_problems
from posttrain.runlog import log


def sample_step_problems(cfg, task, seed: int, step: int):
    """(problems, budgets) of one step; the budgets are int or None (auto). Deterministic in (seed, step)."""
    from posttrain.tasks.arithmetic import generate_problems

    diffs = list(range(task.min_difficulty, task.max_difficulty + 1))
    problems = generate_problems(cfg.prompts_per_step, seed + step, diffs)
    rng = random.Random(seed + step)
    return problems, [draw_budget(rng, cfg.budgets) for _ in problems]


def held_out_per_budget(cfg, task, n_rows: int) -> int:
    """Rows of a data file held out per eval budget of one RL stage: `eval_rows`, by default as many as the embedded
    task would evaluate (`eval_n_per_difficulty` x the task's difficulties), at most half of the file in all."""
    n_budgets = max(1, len(dict.fromkeys(str(b) for b in cfg.eval_budgets)))
    n_diff = task.max_difficulty - task.min_difficulty + 1
    wanted = cfg.eval_rows or cfg.eval_n_per_difficulty * n_diff
    return min(wanted, n_rows // (2 * n_budgets)) if cfg.eval_budgets and cfg.eval_n_per_difficulty > 0 else 0


def rl_held_out_rows(rc, n_rows: int) -> int:
    """How many of a data file's rows the recipe's RL stages hold out for evaluation: SFT leaves them out too,
    so the before/after verdict is on rows no stage trained on."""
    if rc.data.source == "arithmetic":
        return 0
    held = [held_out_per_budget(getattr(rc, a), rc.task, n_rows) * len(dict.fromkeys(map(str, getattr(rc, a).eval_budgets)))
            for a in ("grpo", "ppo") if a in rc.stages and getattr(rc, a).eval_n_per_difficulty > 0]
    return max(held, default=0)


def evaluation_rows(rc) -> list[TextProblem]:
    """A data file's rows that the recipe's RL stages hold out for evaluation (no stage trains on them): what the
    eval and sweep stages evaluate with file data. Raises DataError when the file is too small to hold any out (a
    recipe without an RL stage that holds rows out is refused when it loads)."""
    from posttrain.data import DataError, split_held_out

    rows = text_problems(rc.data)
    k = rl_held_out_rows(rc, len(rows))
    if k == 0:
        raise DataError(f"{rc.data.path}: its {len(rows)} rows are too few for the grpo/ppo stage to hold any out "
                        "for evaluation (at most half the file, a share per distinct eval budget), so the eval and "
                        "sweep stages have nothing no stage trained on; use a larger file or fewer eval budgets")
    return split_held_out(rows, k, prompt=lambda r: r.expression)[1]


def stage_problems(rc, n_per_difficulty: int) -> list[TextProblem] | None:
    """The eval and sweep stages' problems: None for the embedded task (they generate their own), else the first
    `n_per_difficulty` of each difficulty among the rows the RL stages hold out."""
    if rc.data.source == "arithmetic":
        return None
    from posttrain.eval.sweep import first_per_difficulty

    return first_per_difficulty(evaluation_rows(rc), n_per_difficulty)


class ProblemSource:
    """Training and held-out problems of one RL stage (`cfg` its recipe section, `rc` the whole recipe)."""

    def __init__(self, rc, cfg):
        self.rc, self.cfg = rc, cfg
        self.embedded = rc.data.source == "arithmetic"
        self.train: list[TextProblem] = []
        self.held_out: dict[str, list[TextProblem]] = {}
        if not self.embedded:
            self._split_file()

    def _split_file(self) -> None:
        from posttrain.data import split_held_out, spread

        rows = text_problems(self.rc.data)
        budgets = list(dict.fromkeys(str(b) for b in self.cfg.eval_budgets))
        per_budget = held_out_per_budget(self.cfg, self.rc.task, len(rows))
        if self.cfg.eval_n_per_difficulty > 0 and budgets and per_budget == 0:
            log.warning("%s: %d rows are too few to hold any out for evaluation; the stage evaluates nothing",
                        self.rc.data.path, len(rows))
        own = per_budget * len(budgets)
        # train on none of the rows any RL stage of the recipe holds out (another's share may be larger than this
        # one's): the eval and sweep stages evaluate all of them; evaluate on `own` of them, spread among them
        total = max(own, rl_held_out_rows(self.rc, len(rows)))
        self.train, held = split_held_out(rows, total, prompt=lambda r: r.expression)
        if len(held) < own:  # repeated prompts were held out once each
            per_budget = len(held) // len(budgets)
            log.warning("%s: the held-out rows repeat prompts; %d distinct ones, %d per eval budget", self.rc.data.path,
                        len(held), per_budget)
        held = [held[i] for i in spread(len(held), per_budget * len(budgets))]
        for i, b in enumerate(budgets):  # every len(budgets)-th row: each budget's share spans the file too
            self.held_out[b] = held[i::len(budgets)]
        if not self.train:
            raise ValueError(f"{self.rc.data.path}: no rows left to train on after holding out evaluation rows")
        log.info("%s: %d training rows, %d held out per eval budget (spread through the file)", self.rc.data.path,
                 len(self.train), per_budget)

    def step(self, step: int) -> tuple[list, list]:
        """(problems, budgets) of one step; budgets are int or None (auto). Deterministic in (seed, step)."""
        if self.embedded:
            return sample_step_problems(self.cfg, self.rc.task, self.rc.seed, step)
        rng = random.Random(self.rc.seed + step)
        k = self.cfg.prompts_per_step
        problems = rng.sample(self.train, k) if k <= len(self.train) else rng.choices(self.train, k=k)
        budget_rng = random.Random(f"budgets/{self.rc.seed}/{step}")  # independent of which rows were drawn
        return problems, [draw_budget(budget_rng, self.cfg.budgets) for _ in problems]

    def eval(self, budget) -> list:
        """The held-out problems of one eval budget (an int or `auto`), the same for every model."""
        if self.embedded:
            from posttrain.stages.rl_eval import eval_problems

            task = self.rc.task
            diffs = list(range(task.min_difficulty, task.max_difficulty + 1))
            return eval_problems(self.cfg.eval_n_per_difficulty, self.rc.eval.seed, diffs, budget)
        return self.held_out.get(str(budget), [])

    def grade(self, problems: list, responses: list) -> list:
        """`eval.sweep.Record`s by the data's grader (`data.grader`), as the stage's rewards judge correctness."""
        from posttrain.eval.sweep import grade_responses

        return grade_responses(problems, responses, self.rc.data.grader_name)
