"""Statistics of the sweep and the RL stage's before/after verdict: Wilson intervals, paired differences (McNemar's
exact test), quantiles. Pure: lists in, numbers out."""

from __future__ import annotations

import math


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n (Wilson 1927): unlike the normal interval it stays
    inside [0, 1] and is not degenerate at 0/n or n/n.

        centre = (p + z^2 / 2n) / (1 + z^2 / n),  half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at k = 0 (k = n) the lower (upper) bound is exactly 0 (1); say so rather than trust the rounding
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def paired_difference(before: list[bool], after: list[bool], z: float = 1.959964) -> dict:
    """Change in a success rate measured twice on the same items (before -> after), with a 95% interval and
    McNemar's exact test (McNemar 1947): only the items that changed carry information.

    gained = after right, before wrong; lost = the reverse; diff = (gained - lost) / n, and
        var(diff) = (gained + lost - (gained - lost)^2 / n) / n^2          (paired Wald; Agresti, Categorical Data
                                                                             Analysis, 10.1)
        p = min(1, 2 * P[Binomial(gained + lost, 1/2) <= min(gained, lost)])
    `measurably` is "above" or "below" when p < 0.05, else "unchanged".
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_difference needs two equal, non-empty lists (got {len(before)} and {len(after)})")
    n = len(before)
    gained = sum(bool(a) and not bool(b) for b, a in zip(before, after))
    lost = sum(bool(b) and not bool(a) for b, a in zip(before, after))
    diff = (gained - lost) / n
    half = z * math.sqrt(max(0.0, gained + lost - (gained - lost) ** 2 / n)) / n
    m = gained + lost
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, k) for k in range(min(gained, lost) + 1)) / 2 ** m)
    verdict = "unchanged" if p >= 0.05 else ("above" if diff > 0 else "below")
    return {"n": n, "diff": diff, "ci_low": diff - half, "ci_high": diff + half, "gained": gained, "lost": lost,
            "p_value": p, "measurably": verdict}


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default, `statistics.quantiles(method="inclusive")`)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
