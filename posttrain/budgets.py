"""Drawing thinking budgets from a recipe's budget list, and naming them in metrics.

A budget list holds integers (0: no thinking), `"auto"` (no budget: autonomous thinking) and ranges
(`posttrain.config.BudgetRange`, `{low, high}`). One entry is drawn uniformly; a range then draws its budget
uniformly from `low..high`, or log-uniformly with `scale: log`, rounded to `significant` digits when given (round
budgets, as callers write them). A list without ranges draws exactly as `rng.choice` always did, so recipes of
fixed budgets keep their numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def draw_budget(rng: random.Random, entries: Sequence) -> int | None:
    """One budget: an int, or None for `auto`."""
    return entry_budget(rng, rng.choice(entries))


def entry_budget(rng: random.Random, entry) -> int | None:
    """The budget of one list entry: an int as it is, None for `auto`, a range's drawn from it."""
    if entry == "auto":
        return None
    if isinstance(entry, int):
        return entry
    if entry.scale == "log":
        budget = log_uniform_int(rng, entry.low, entry.high)
    else:
        budget = rng.randint(entry.low, entry.high)
    if entry.significant:
        budget = round_significant(budget, entry.significant, entry.low, entry.high)
    return budget


def round_significant(budget: int, digits: int, low: int, high: int) -> int:
    """`budget` rounded to `digits` significant digits (half up: 1499 -> 1000, 1500 -> 2000 with one digit); when
    that leaves `low..high`, rounded towards the range instead, and when neither way stays inside, kept as it is."""
    step = 10 ** max(0, len(str(budget)) - digits)
    down, up = budget // step * step, -(-budget // step) * step
    nearest = up if budget - down >= up - budget else down
    for value in (nearest, down, up):
        if low <= value <= high:
            return value
    return budget


def log_uniform_int(rng: random.Random, low: int, high: int) -> int:
    """An integer in `low..high` with P(k) = log((k+1)/k) / log((high+1)/low): the floor of a continuous
    log-uniform draw on [low, high+1), so every decade of a wide range is drawn about equally often."""
    x = math.exp(rng.uniform(math.log(low), math.log(high + 1)))
    return min(high, max(low, math.floor(x)))


def budget_label(budget: int | None, entries: Sequence) -> str:
    """The metrics name of a drawn budget: `auto`, the integer when the list names it, else the first range that
    holds it (`8-48`), else the integer."""
    if budget is None:
        return "auto"
    if budget in [e for e in entries if isinstance(e, int)]:
        return str(budget)
    for e in entries:
        if not isinstance(e, (int, str)) and e.low <= budget <= e.high:
            return str(e)
    return str(budget)


def adherent(closed: bool, forced: bool, n_think: int, budget: int) -> bool:
    """Whether a response kept its budget: it closed `</think>` by itself (not forced) within `budget` thinking
    tokens. The one definition the rollout metrics, the RL stage's before/after evaluation and the sweep share.

    >>> adherent(True, False, 8, 8), adherent(True, True, 8, 8), adherent(True, False, 9, 8), adherent(False, False, 3, 8)
    (True, False, False, False)
    """
    return bool(closed and not forced and n_think <= budget)
