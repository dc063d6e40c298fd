"""The RL stages' reward worker: one `CombinedReward` per prompt kind (budgeted / autonomous), scored together.

A plain class (no Ray); the driver runs it as an actor through `workers.actors.spawn`. Budgeted rows (an int
budget, 0 included) and autonomous rows (no budget) are scored by the components whose `on` names their kind.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.rewards.combine import CombinedReward
from posttrain.rewards.registry import get_reward_cls, reward_params
from posttrain.rewards.verifiable import get_grader, judge


def with_grader(spec: dict, grader: str) -> dict:
    """`spec` with `params.grader` set to the task's grader when its reward grades correctness by a named grader
    (the budget rewards) and the recipe did not name one: every reward then judges an answer as the evaluations do
    (a budget reward grading a file's `\\frac{3}{4}` by `exact_int` would rank a wrong integer above it)."""
    params = dict(spec.get("params") or {})
    if "grader" in reward_params(get_reward_cls(spec["name"])) and "grader" not in params:
        params["grader"] = grader
    return {**spec, "params": params}


def with_run_output(spec: dict, rm_dir) -> dict:
    """`spec` with `params.path` set to this run's `rm` stage output (`rm_dir`: RUN/rm, or a later round's RUN/rm@2)
    when its reward reads one (`genrm`, `scalar_rm`: a `run_output` class attribute) and the recipe gave no path."""
    sub = getattr(get_reward_cls(spec["name"]), "run_output", None)
    params = dict(spec.get("params") or {})
    if sub is None or params.get("path") is not None:
        return spec
    return {**spec, "params": {**params, "path": str(Path(rm_dir) / sub)}}


class RLRewardWorker:
    """specs: dicts with name, weight, params, key, on (`all` | `budgeted` | `auto`), as in the recipe. grader: the
    task's grader (`data.grader`, `rewards.verifiable.GRADERS`): what `correct` (the accuracy metrics) is judged by,
    and the correctness of every reward component that takes a `grader` and was not given one. combine: the
    `CombinedReward` options (`reward_combine`: mode, verifier, judge, beta, verifier_threshold), per kind."""

    def __init__(self, specs: list[dict], grader: str = "exact_int", combine: dict | None = None):
        get_grader(grader)  # raises naming the known graders
        self.grader = grader
        self.rewards: dict[str, CombinedReward] = {}
        for kind in ("budgeted", "auto"):
            chosen = [{k: s[k] for k in ("name", "weight", "params", "key")} for s in
                      (with_grader(s, grader) for s in specs) if s.get("on", "all") in ("all", kind)]
            if chosen:
                self.rewards[kind] = CombinedReward(chosen, **(combine or {}))

    def score(self, prompts: list[str], texts: list[str], answers: list, budgets: list[int | None], n_think: list[int],
              groups: list[int], forced: list[bool], tests: list | None = None
              ) -> tuple[list[float], list[bool], dict[str, float]]:
        """(per-row rewards, per-row correctness by the eval grader, metrics prefixed by the kind).

        prompts: the problems (user messages; a generative verifier reads them); texts: the responses; tests: each
        row's tests (`data.tests_column`), passed to the rewards as the `tests` field (the `code` reward's).

        A row whose kind has no reward component scores 0.
        """
        n = len(texts)
        total = [0.0] * n
        metrics: dict[str, float] = {}
        for kind, reward in self.rewards.items():
            rows = [i for i in range(n) if (budgets[i] is None) == (kind == "auto")]
            if not rows:
                continue
            extra = {} if tests is None else {"tests": [tests[i] for i in rows]}
            out = reward([prompts[i] for i in rows], [texts[i] for i in rows], answer=[answers[i] for i in rows],
                         budget=[budgets[i] for i in rows], n_think=[n_think[i] for i in rows],
                         group=[groups[i] for i in rows], forced=[forced[i] for i in rows], **extra)
            for i, s in zip(rows, out.scores):
                total[i] = float(s)
            metrics |= {k.replace("reward/", f"reward/{kind}/", 1): v for k, v in out.metrics.items()}
        metrics["reward/mean"] = sum(total) / n if n else 0.0
        tests = tests if tests is not None else [None] * n
        correct = [judge(self.grader, t, a, x) for t, a, x in zip(texts, answers, tests)]
        return total, correct, metrics
