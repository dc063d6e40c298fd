"""Registered rewards that shape correctness by thinking length (the math lives in `shaping.py`).

Fields: ``answer`` (gold), ``n_think`` (thinking-token counts the caller computed from token ids with
`parse.count_think_tokens_ids`), ``budget`` (int, or None for an autonomous example: plain correctness), and
``group`` (prompt ids, for `length_group`). Correctness comes from the grader named by ``grader`` ("exact_int",
the evaluation grader, by default; or "math").
"""

from __future__ import annotations

from .registry import RewardOutput, get_field, mean, register_reward
from .shaping import (L1_ALPHA, L1_MAX_DELTA, check_group_weight, dapo_overlong_penalty, group_length_bonus,
                      l1_exact, l1_max, length_group_combine)
from .verifiable import correctness, get_grader


class _Graded:
    @property
    def name(self) -> str:  # the registered name, for error messages
        return getattr(type(self), "reward_name", type(self).__name__)

    def __init__(self, grader: str = "exact_int"):
        get_grader(grader)  # fail at build time on a bad name
        self.grader = grader

    def _correct(self, completions, fields) -> list[float]:
        return correctness(self.grader, completions, fields, self.name)


class _BudgetReward(_Graded):
    """Shared loop: budgeted samples get `_shape`, autonomous ones (budget None) plain correctness."""

    def _shape(self, correct: float, n: int, budget: int) -> float:
        raise NotImplementedError

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        n = len(completions)
        correct = self._correct(completions, fields)
        budgets = get_field(fields, "budget", n, reward=self.name, default=None)
        need_len = any(b is not None for b in budgets)
        lengths = get_field(fields, "n_think", n, reward=self.name) if need_len else [None] * n
        scores, errs, over = [], [], []
        for c, b, L in zip(correct, budgets, lengths):
            if b is None:
                scores.append(c)
                continue
            scores.append(float(self._shape(c, int(L), int(b))))
            errs.append(abs(int(L) - int(b)))
            over.append(float(int(L) > int(b)))
        metrics = {"accuracy": mean(correct), "budgeted": len(errs) / n if n else 0.0}
        if errs:
            metrics |= {"abs_budget_error": mean(errs), "over_budget": mean(over)}
        return RewardOutput(scores, metrics)


@register_reward("budget_l1_exact")
class L1ExactReward(_BudgetReward):
    """``correct - alpha * |n_think - budget|`` (L1-Exact, see `shaping.l1_exact`); params alpha, grader."""


    def __init__(self, alpha: float = L1_ALPHA, grader: str = "exact_int"):
        super().__init__(grader)
        self.alpha = alpha

    def _shape(self, correct, n, budget):
        return l1_exact(correct, n, budget, self.alpha)


@register_reward("budget_l1_max")
class L1MaxReward(_BudgetReward):
    """``correct * clip(alpha * (budget - n_think) + delta, 0, 1)`` (L1-Max, see `shaping.l1_max`)."""


    def __init__(self, alpha: float = L1_ALPHA, delta: float = L1_MAX_DELTA, grader: str = "exact_int"):
        super().__init__(grader)
        self.alpha, self.delta = alpha, delta

    def _shape(self, correct, n, budget):
        return l1_max(correct, n, budget, self.alpha, self.delta)


@register_reward("overlong")
class OverlongReward(_Graded):
    """``correct + dapo_overlong_penalty(length, max_len, cache_len)`` (DAPO; see `shaping.dapo_overlong_penalty`).

    Differences from DAPO: correctness is 1/0 (DAPO: +1/-1), and the length is the field ``length_field``
    (thinking tokens by default; DAPO uses the whole response). ``include_correctness=False`` gives the penalty
    alone, for adding to another reward in a `CombinedReward`.
    """


    def __init__(self, max_len: int = 4096, cache_len: int = 512, grader: str = "exact_int",
                 length_field: str = "n_think", include_correctness: bool = True):
        super().__init__(grader)
        dapo_overlong_penalty(0, max_len, cache_len)  # validate now
        self.max_len, self.cache_len = max_len, cache_len
        self.length_field, self.include_correctness = length_field, include_correctness

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        n = len(completions)
        lengths = get_field(fields, self.length_field, n, reward=self.name)
        pens = [dapo_overlong_penalty(int(L), self.max_len, self.cache_len) for L in lengths]
        correct = self._correct(completions, fields) if self.include_correctness else [0.0] * n
        metrics = {"penalty": mean(pens), "in_buffer": mean([float(-1 < p < 0) for p in pens]),
                   "truncated": mean([float(p == -1) for p in pens])}
        if self.include_correctness:
            metrics["accuracy"] = mean(correct)
        return RewardOutput([c + p for c, p in zip(correct, pens)], metrics)


@register_reward("length_group")
class LengthGroupReward(_Graded):
    """``correct + weight * group_length_bonus(...)`` (Kimi k1.5 / shortest-correct; see `shaping`).

    Needs the ``group`` field (one id per prompt; a group's responses are scored relative to each other) and
    ``length_field`` (``n_think`` by default). ``0 <= weight < 2`` is enforced: then a wrong answer can never
    outscore a correct one (proof in `shaping.length_group_combine`).
    """


    def __init__(self, weight: float = 0.5, target: str = "kimi", grader: str = "exact_int",
                 length_field: str = "n_think"):
        super().__init__(grader)
        check_group_weight(weight)
        group_length_bonus([], [], [], target)  # validate target now
        self.weight, self.target, self.length_field = weight, target, length_field

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        n = len(completions)
        lengths = get_field(fields, self.length_field, n, reward=self.name)
        groups = get_field(fields, "group", n, reward=self.name)
        correct = self._correct(completions, fields)
        bonus = group_length_bonus(lengths, correct, groups, self.target)
        scores = length_group_combine(correct, bonus, self.weight)
        return RewardOutput(scores, {"accuracy": mean(correct), "length_bonus": mean(bonus)})


@register_reward("budget_forced")
class BudgetForcedReward:
    """``-penalty`` for a budgeted sample whose thinking had to be forced closed at its budget, else 0.

    The cap that forces ``</think>`` keeps every rollout within budget, so a length-shaped reward alone cannot
    tell a model that stopped by itself from one that was stopped: both have ``n_think <= budget``. This term
    is what teaches adherence without forcing. Fields: ``budget`` (None = autonomous: 0) and ``forced``
    (bools from the rollout). Add it to a correctness reward in a `CombinedReward`.
    """

    reward_name = "budget_forced"
    name = "budget_forced"

    def __init__(self, penalty: float = 0.5):
        if penalty < 0:
            raise ValueError(f"budget_forced: penalty must be >= 0, got {penalty}")
        self.penalty = penalty

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        n = len(completions)
        budgets = get_field(fields, "budget", n, reward=self.name, default=None)
        forced = get_field(fields, "forced", n, reward=self.name)
        scores = [-self.penalty if b is not None and f else 0.0 for b, f in zip(budgets, forced)]
        budgeted = [f for b, f in zip(budgets, forced) if b is not None]
        return RewardOutput(scores, {"forced": mean([float(f) for f in budgeted]) if budgeted else 0.0})
