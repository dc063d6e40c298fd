"""Where the RL stages' problems come from: the recipe's task (`tasks.task`), seen by one RL stage.

Each step's problems and budgets, each eval budget's held-out problems and the grading are the task's
(`step_problems`, `rl_eval_problems`, `grader`); this adds only the stage's own section `cfg`.
"""

from __future__ import annotations

from posttrain.tasks.task import build_task


def stage_problems(rc, n_per_difficulty: int, seed: int) -> list:
    """The eval and sweep stages' problems: up to `n_per_difficulty` of each difficulty, held out from training
    (`seed`: the stage's, from which a task that generates problems draws them)."""
    return build_task(rc).held_out(n_per_difficulty, seed)


class ProblemSource:
    """Training and held-out problems of one RL stage (`cfg` its recipe section, `rc` the whole recipe)."""

    def __init__(self, rc, cfg):
        self.rc, self.cfg = rc, cfg
        self.task = build_task(rc)
        self.task.rl_eval_problems(cfg, next(iter(cfg.eval_budgets), "auto"))  # a bad data file fails here

    @property
    def train(self) -> list:
        """The stage's training rows (a task that holds rows out: `FileTask.stage_split`)."""
        return self.task.stage_split(self.cfg)[0]

    def step(self, step: int) -> tuple[list, list]:
        """(problems, budgets) of one step; budgets are int or None (auto). Deterministic in (seed, step)."""
        return self.task.step_problems(self.cfg, step)

    def eval(self, budget) -> list:
        """The held-out problems of one eval budget (an int or `auto`), the same for every model."""
        return self.task.rl_eval_problems(self.cfg, budget)

    def grade(self, problems: list, responses: list) -> list:
        """`eval.sweep.Record`s by the task's grader, as the stage's rewards judge correctness."""
        from posttrain.eval.sweep import grade_responses

        return grade_responses(problems, responses, self.task.grader)
