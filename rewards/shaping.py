"""Budget and length shaping as pure functions: no IO, no config objects.

Elementwise functions accept Python numbers or torch tensors (shapes broadcast, typically (B,)) and return the
same kind: a tensor when any input is one, else a float. Group functions take (N,) lists or tensors. Lengths are
thinking-token counts unless a caller passes something else.
"""

from __future__ import annotations

from typing import Hashable, Sequence

L1_ALPHA = 0.0003  # the L1 paper's alpha (Aggarwal & Welleck 2025, Sec. 4) for both L1-Exact and L1-Max
L1_MAX_DELTA = 0.5  # the L1 paper's delta for L1-Max
GROUP_WEIGHT_MAX = 2.0  # `length_group_combine` requires weight < this; see its docstring for the proof


def _is_tensor(x) -> bool:
    return type(x).__module__.partition(".")[0] == "torch"


def _clip(x, lo: float, hi: float):
    return x.clamp(lo, hi) if _is_tensor(x) else min(max(float(x), lo), hi)


def _as_float(x):
    return x if _is_tensor(x) else float(x)


def _num(x):
    # bool tensors do not support arithmetic; correctness often arrives as one
    return x.float() if _is_tensor(x) and str(x.dtype) == "torch.bool" else x


def l1_exact(correct, n_think, budget, alpha: float = L1_ALPHA):
    """L1-Exact / LCPO reward: ``r = correct - alpha * |n_think - budget|``.

    Aggarwal & Welleck 2025, "L1: Controlling How Long a Reasoning Model Thinks With Reinforcement Learning", eq. 1
    (LCPO-Exact). correct: (B,) in {0, 1}; n_think, budget: (B,) token counts. Unclipped, so a wrong answer far from
    its budget goes negative, as in the paper.

    Differences from cmu-l3/l1's code (`deepscaler/rewards/math_reward.py`, `get_delta_score_exact`): it uses
    ``alpha = 1/3000`` (vs 0.0003 in the paper; a normalisation by ``budget/2`` is left commented out) and measures
    the whole response (`valid_response_length`, thinking plus answer) where we measure thinking tokens only.

    >>> round(l1_exact(1, 1500, 1000), 6)  # 1 - 0.0003 * 500
    0.85
    """
    return _as_float(_num(correct) - alpha * abs(n_think - budget))


def l1_max(correct, n_think, budget, alpha: float = L1_ALPHA, delta: float = L1_MAX_DELTA):
    """L1-Max reward: ``r = correct * clip(alpha * (budget - n_think) + delta, 0, 1)``.

    Aggarwal & Welleck 2025, eq. 2 (LCPO-Max). Shapes as `l1_exact`. Under budget the reward rises above delta
    (saturating at 1), over budget it decays to 0 at ``budget + delta/alpha`` tokens; a wrong answer gets 0.

    Difference from cmu-l3/l1's code (`get_delta_score_max`): there the score is
    ``(clip(-(n - budget)/500, -1, 1) + 1) / 2 = clip((budget - n)/1000 + 0.5, 0, 1)``, i.e. alpha = 0.001 and
    delta = 0.5, again on the whole response length.

    >>> round(l1_max(1, 1500, 1000), 6)  # clip(0.0003 * -500 + 0.5, 0, 1) = 0.35
    0.35
    """
    return _num(correct) * _clip(alpha * (budget - n_think) + delta, 0.0, 1.0)


def dapo_overlong_penalty(length, max_len: int, cache_len: int):
    """DAPO soft overlong punishment (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale", eq. 13):

        0                                  if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
        -1                                 if L > L_max

    which is exactly ``clip(((L_max - L_cache) - L) / L_cache, -1, 0)``. length: (B,). DAPO adds it to a +1/-1
    correctness reward and applies it to the whole response length.

    >>> dapo_overlong_penalty(900, 1000, 200), dapo_overlong_penalty(1100, 1000, 200)
    (-0.5, -1.0)
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    return _clip((max_len - cache_len - length) / cache_len, -1.0, 0.0)


def _group_indices(groups: Sequence[Hashable]) -> dict:
    out: dict = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return out


def group_length_bonus(lengths, correct, groups, target: str = "kimi"):
    """Group-relative length bonus in [-0.5, 0.5]: Kimi k1.5's length reward, or a shortest-correct variant.

    Kimi Team 2025, "Kimi k1.5: Scaling Reinforcement Learning with LLMs", Sec. 2.3.3 (length penalty): within the
    responses to one prompt (a group), ``lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)`` (0 when all
    lengths are equal); a correct response gets ``lambda_i``, a wrong one ``min(0, lambda_i)`` (never rewarded for
    being short).

    target="shortest_correct" follows ShorterBetter (Yi et al. 2025, "ShorterBetter: Guiding Reasoning Models to
    Find Optimal Inference Length for Efficient Reasoning"): the target is the group's Sample Optimal Length (the
    shortest correct length; the mean length when none is correct), and
    ``lambda_i = 0.5 - |len_i - target| / (max_len - min_len)``, with Kimi's rule for wrong answers. ShorterBetter
    itself uses an unnormalised ``alpha * correct - beta * |len - target|``; normalising by the group's range and
    applying Kimi's rule bound the bonus, so `length_group_combine` keeps its ordering guarantee.

    lengths, correct: (N,) lists or tensors; groups: (N,) group ids (e.g. prompt index). Returns (N,), same kind.

    >>> group_length_bonus([100, 200, 300], [1, 1, 0], [0, 0, 0])
    [0.5, 0.0, -0.5]
    """
    if target not in ("kimi", "shortest_correct"):
        raise ValueError(f"target must be 'kimi' or 'shortest_correct', got {target!r}")
    as_tensor = _is_tensor(lengths)
    lens = [float(x) for x in (lengths.tolist() if as_tensor else lengths)]
    corr = [bool(c) for c in (correct.tolist() if _is_tensor(correct) else correct)]
    gids = groups.tolist() if _is_tensor(groups) else list(groups)
    if not len(lens) == len(corr) == len(gids):
        raise ValueError(f"lengths, correct and groups differ in length: {len(lens)}, {len(corr)}, {len(gids)}")
    bonus = [0.0] * len(lens)
    for idx in _group_indices(gids).values():
        lo, hi = min(lens[i] for i in idx), max(lens[i] for i in idx)
        if hi == lo:
            continue
        if target == "kimi":
            ref = lo
        else:
            right = [lens[i] for i in idx if corr[i]]
            ref = min(right) if right else sum(lens[i] for i in idx) / len(idx)
        for i in idx:
            lam = 0.5 - abs(lens[i] - ref) / (hi - lo)
            bonus[i] = lam if corr[i] else min(0.0, lam)
    if as_tensor:
        import torch

        return torch.tensor(bonus, dtype=torch.float32, device=lengths.device)
    return bonus


def length_group_combine(correct, bonus, weight: float):
    """``r = correct + weight * bonus`` with ``0 <= weight < 2``: a wrong answer never outscores a right one.

    Proof: a correct response gets ``bonus >= -0.5``, so ``r >= 1 - weight/2 > 0`` when ``weight < 2``; a wrong one
    gets ``bonus = min(0, lambda) <= 0``, so ``r <= 0``. This holds across groups too, so no batch of any shape can
    rank a short wrong answer above a long right one. correct, bonus: (N,) numbers or tensors (elementwise).
    """
    check_group_weight(weight)
    if _is_tensor(correct) or _is_tensor(bonus):
        return _num(correct) + weight * bonus
    return [float(c) + weight * float(b) for c, b in zip(correct, bonus)]


def check_group_weight(weight: float) -> None:
    if not 0.0 <= weight < GROUP_WEIGHT_MAX:
        raise ValueError(
            f"length-group weight must be in [0, {GROUP_WEIGHT_MAX}) so that a wrong answer can never outscore a "
            f"correct one (correct >= 1 - weight/2 > 0 >= wrong); got {weight}"
        )
