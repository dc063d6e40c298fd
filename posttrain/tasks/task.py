"""The task interface: everything task-specific that stages, workers and rewards need, behind one object.

A recipe's `data.source` names its task (`TASKS`, the YAML strings): `arithmetic` (the embedded task), `file` /
`hub` (the user's rows: `tasks.files`), `reasoning_gym` (any reasoning-gym dataset: `tasks.gym`). `build_task(rc)`
makes the recipe's task; every stage asks it, and nothing else, for:

- problems: `train_examples` (SFT), `rm_problems` (the RM's samples), `step_problems` (an RL step),
  `rl_eval_problems` (the RL stage's before/after evaluation, one share per eval budget) and `held_out` (what the
  eval and sweep stages, and `posttrain sweep --model RUN`, evaluate). Held-out problems are never trained on;
- `grader`: the name of the one function (`rewards.verifiable.GRADERS`) that judges an answer everywhere: the RL
  reward's correctness, the RM labels, the eval stage, the RL evaluation and the sweep;
- `difficulties`: what autonomous thinking and the per-difficulty tables group by;
- optional hooks (`hooks`): `demonstrations` (a full reasoning trace per problem: SFT, PPO-ptx),
  `budget_demonstrations` (traces compressed to fit a budget), `first_error` (where a response's first wrong step
  starts: the process reward), `corpus` (documents to pretrain the embedded base model on). A recipe that needs a
  hook its task lacks fails when it loads, naming the key (`missing_hooks`).

A problem is any object with `expression` (the user prompt), `answer` (str or int), `difficulty` (int) and
`tests` (what the grader compares with besides the answer: a code task's tests, a reasoning-gym entry; else None).
"""

from __future__ import annotations

import random

from posttrain.algo.registry import Registry

TASKS = Registry("task", ("embedded", "files", "gym"), package="posttrain.tasks")
register_task = TASKS.register

# hook -> (recipe key that needs it, why), for `missing_hooks`
HOOK_USERS = {
    "first_error": ("{algo}.process_penalty", "blames the first wrong step of a response"),
    "demonstrations": ("{algo}.ptx_coef", "imitates demonstrations of the step's problems (PPO-ptx)"),
}


class Task:
    """Base class: a task over the recipe `rc` (its `data`, `task`, `seed`, `eval` and RL sections).

    Subclasses implement the problem sources and set `hooks`; hooks they do not offer raise here."""

    name = ""
    hooks: frozenset[str] = frozenset()
    default_grader = "math"
    holds_out_rows = False  # evaluates rows set aside from its training rows (else: fresh problems from a seed)
    where = "the embedded task"  # what error messages call the task's data

    def __init__(self, rc):
        self.rc = rc

    @classmethod
    def hooks_for(cls, rc) -> frozenset[str]:
        """The hooks this task offers under the recipe `rc` (a file offers demonstrations only with a reasoning
        column)."""
        return cls.hooks

    # ------------------------------------------------------------------------------------------- grading
    @property
    def grader(self) -> str:
        """The grader every stage judges answers by: `data.grader`, or the task's own when `auto`."""
        g = self.rc.data.grader
        return self.default_grader if g == "auto" else g

    def grade(self, completion: str, problem) -> bool:
        """Whether `completion` answers `problem` (the grader on its answer, or its tests / entry)."""
        from posttrain.rewards.verifiable import judge

        return judge(self.grader, completion, problem.answer, getattr(problem, "tests", None))

    # ------------------------------------------------------------------------------------------ problems
    @property
    def difficulties(self) -> list[int]:
        """The difficulties the task's problems have (the embedded task's `task.min/max_difficulty`)."""
        t = self.rc.task
        return list(range(t.min_difficulty, t.max_difficulty + 1))

    def train_examples(self, n: int, seed: int, bad_rows_file=None) -> list:
        """`n` SFT examples (`data.Example`), none of them held out."""
        raise NotImplementedError

    def rm_problems(self, n: int, seed: int) -> list:
        """`n` problems the RM stage samples and labels, none of them held out."""
        raise NotImplementedError

    def step_problems(self, cfg, step: int) -> tuple[list, list]:
        """(problems, budgets) of one RL step: `cfg.prompts_per_step` problems and a budget for each drawn from
        `cfg.budgets` (int, or None: autonomous); deterministic in (seed, step)."""
        raise NotImplementedError

    def rl_eval_problems(self, cfg, budget) -> list:
        """The RL stage `cfg`'s held-out problems at one eval budget (an int or `auto`): the same for every model."""
        raise NotImplementedError

    def held_out(self, n_per_difficulty: int, seed: int) -> list:
        """What the eval and sweep stages evaluate: up to `n_per_difficulty` held-out problems of each difficulty
        (a task that generates problems draws them from the evaluating stage's `seed`; rows ignore it)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- hooks
    def demonstration(self, problem) -> str:
        """The full reasoning trace of `problem` (hook `demonstrations`): what SFT imitates without a budget."""
        raise NotImplementedError(f"task {self.name!r} has no demonstrations")

    def budget_demonstration(self, problem, budget: int, count, rng: random.Random) -> str:
        """The reasoning a budgeted example of `problem` demonstrates (`count(text)` counts tokens): with hook
        `budget_demonstrations`, a trace compressed to fit; else the full trace when it fits, none otherwise (never
        cut mid-thought)."""
        full = self.demonstration(problem)
        return full if count(full) <= budget else ""

    def first_error(self, problem, text: str) -> int | None:
        """Character offset in `text` where the response's first wrong step starts (hook `first_error`)."""
        raise NotImplementedError(f"task {self.name!r} cannot locate a response's first error")

    def corpus_document(self, rng: random.Random, direct_share: float = 0.1) -> str:
        """One pretraining document of the task's text (hook `corpus`): the base stage's stream."""
        raise NotImplementedError(f"task {self.name!r} has no pretraining corpus")

    def record(self, run_dir) -> None:
        """Before any stage: check the task's data (every bad row named at once) and write what it holds out to
        `run_dir/held_out.jsonl` (`posttrain sweep --model RUN` checks the data still gives the same rows)."""

    def corpus_key(self) -> dict | None:
        """What the base model's cache key must add for this task's corpus (None: the embedded corpus)."""
        return None

    def tokenizer_texts(self, seed: int) -> list[str]:
        """Extra texts the embedded tokenizer is trained on (the task's own vocabulary)."""
        return []


def task_class(source: str) -> type[Task]:
    """The task class registered under `source` (`data.source`); an unknown name lists the known ones."""
    return TASKS.get(source)


def build_task(rc) -> Task:
    """The recipe's task (`data.source`)."""
    return task_class(rc.data.source)(rc)


def missing_hooks(rc) -> list[str]:
    """Errors, one per recipe key that needs a hook the recipe's task lacks (empty when all is well)."""
    cls = task_class(rc.data.source)
    errors = []
    for algo in ("grpo", "ppo"):
        if algo not in rc.stages:
            continue
        section = getattr(rc, algo)
        for hook, value in (("first_error", section.process_penalty), ("demonstrations", section.ptx_coef)):
            if value > 0 and hook not in cls.hooks_for(rc):
                key, why = HOOK_USERS[hook]
                errors.append(f"{key.format(algo=algo)}: {value} {why}, and the task of data.source: "
                              f"{rc.data.source} has no `{hook}` hook; set it to 0")
    return errors
