"""Combining rewards: a weighted sum, or a verifier-gated generative score (HERO) that can never rank a wrong answer
above a right one. Any registered reward can play the verifier or the judge (e.g. `exact_int` and `genrm`).

Failure isolation: a component that raises on a batch (or returns the wrong number of scores, or a non-finite one)
is retried one sample at a time; samples that still fail score 0 and are counted in ``reward/<key>/errors``. A
`CombinedReward` call never raises because of a component (a group-relative reward retried per sample sees
groups of one, i.e. no length bonus, for that batch).

Metrics: ``reward/<key>/mean`` (the component's per-sample scores after failures were zeroed),
``reward/<key>/errors`` (failed samples plus the errors the component itself reported, e.g. sandbox timeouts),
``reward/<key>/<metric>`` for the component's own metrics, and ``reward/total/mean`` for the combined score.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from .registry import RewardOutput, build_reward, mean, merge_metrics

logger = logging.getLogger(__name__)

MODES = ("sum", "verifiable", "generative", "gated")
_RESERVED_KEYS = ("total",)


def hero_gate(v, s, beta: float):
    """Verifier-gated score (HERO, "Hybrid Ensemble Reward Optimization"; Tao et al. 2025, "Hybrid Reinforcement:
    When Reward Is Sparse, It's Better to Be Dense"):

        r = v * (1 - beta + beta * s) + (1 - v) * (beta * s),   v in {0, 1}, s in [0, 1], 0 <= beta < 0.5

    Correct responses (v=1) land in [1 - beta, 1], wrong ones in [0, beta]; since beta < 0.5 < 1 - beta, the
    generative score s only orders responses within the same verifier outcome. Floats or tensors (elementwise).

    Difference from HERO: HERO normalises s within each verifier-defined group of a prompt's responses
    (stratified normalisation) and adds variance-aware weighting; we use the raw s, so the ranges above are
    bounds rather than always attained.

    >>> hero_gate(1, 0.0, 0.2), hero_gate(0, 1.0, 0.2)
    (0.8, 0.2)
    """
    check_beta(beta)
    return v * (1 - beta + beta * s) + (1 - v) * (beta * s)


def check_beta(beta: float) -> None:
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"gate beta must be in [0, 0.5) so a wrong answer can never outscore a right one; got {beta}")


@dataclass(frozen=True)
class RewardSpec:
    """One component: a registered reward `name` built with `params`, weighted by `weight`, logged as `key`."""

    name: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    key: str | None = None

    @property
    def log_key(self) -> str:
        return self.key or self.name


def as_spec(x) -> RewardSpec:
    """A `RewardSpec` from a spec, a dict ({"name", "weight", "params", "key"}) or a (name, weight[, params]) tuple."""
    if isinstance(x, RewardSpec):
        return x
    if isinstance(x, dict):
        unknown = set(x) - {"name", "weight", "params", "key"}
        if unknown:
            raise ValueError(f"reward spec {x!r} has unknown keys {sorted(unknown)}; valid: name, weight, params, key")
        return RewardSpec(x["name"], float(x.get("weight", 1.0)), dict(x.get("params") or {}), x.get("key"))
    if isinstance(x, (tuple, list)) and 1 <= len(x) <= 3:
        return RewardSpec(x[0], float(x[1]) if len(x) > 1 else 1.0, dict(x[2]) if len(x) > 2 else {})
    raise ValueError(f"cannot read a reward spec from {x!r}")


def _slice(value, i: int, n: int):
    if isinstance(value, (list, tuple)) and len(value) == n:
        return [value[i]]
    if hasattr(value, "shape") and getattr(value, "ndim", 0) >= 1 and len(value) == n:
        return value[i:i + 1]
    return value


def _checked_scores(out, n: int) -> list[float]:
    scores = [float(s) for s in out.scores]
    if len(scores) != n:
        raise ValueError(f"returned {len(scores)} scores for {n} completions")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"returned a non-finite score: {scores}")
    return scores


def score_safely(key: str, reward, prompts, completions, fields) -> tuple[list[float], dict[str, float], int]:
    """(scores, metrics, failed samples) of one component; never raises (see the module docstring)."""
    n = len(completions)
    try:
        out = reward(prompts, completions, **fields)
        return _checked_scores(out, n), dict(out.metrics), 0
    except Exception as e:  # noqa: BLE001 - a reward bug must not stop training
        logger.warning("reward %r failed on a batch of %d (%s: %s); retrying per sample", key, n, type(e).__name__, e)
    scores, metrics, sizes, failed = [], [], [], 0
    for i in range(n):
        sub = {k: _slice(v, i, n) for k, v in fields.items()}
        try:
            out = reward([prompts[i]], [completions[i]], **sub)
            scores.append(_checked_scores(out, 1)[0])
            metrics.append(dict(out.metrics))
            sizes.append(1)
        except Exception as e:  # noqa: BLE001
            logger.warning("reward %r failed on sample %d: %s: %s", key, i, type(e).__name__, e)
            scores.append(0.0)
            failed += 1
    return scores, merge_metrics(metrics, sizes), failed


class CombinedReward:
    """Several registered rewards combined into one score per sample.

    modes:
      "sum"         r = sum_k weight_k * r_k over all components.
      "verifiable"  r = r_verifier + extras          (the judge, if listed, is not called)
      "generative"  r = clip(r_judge, 0, 1) + extras (the verifier, if listed, is not called)
      "gated"       r = hero_gate(v, s, beta) + extras, v = [r_verifier >= verifier_threshold], s = clip(r_judge, 0, 1)
    where extras = sum of weight_k * r_k over the other components (e.g. a format term; the gate's ordering
    guarantee is about the gate term alone). In the last three modes the verifier/judge weights are not used.

    rewards: list of specs (see `as_spec`); verifier / judge: the keys (name, or `key`) of those components.
    """

    def __init__(self, rewards: list, mode: str = "sum", verifier: str | None = None, judge: str | None = None,
                 beta: float = 0.25, verifier_threshold: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"unknown combine mode {mode!r}; known modes: {', '.join(MODES)}")
        self.specs = [as_spec(r) for r in rewards]
        if not self.specs:
            raise ValueError("CombinedReward needs at least one reward")
        keys = [s.log_key for s in self.specs]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup or set(keys) & set(_RESERVED_KEYS):
            raise ValueError(f"reward keys must be unique and not {_RESERVED_KEYS}; got {keys} (set `key` to rename)")
        need = {"verifiable": ("verifier",), "generative": ("judge",), "gated": ("verifier", "judge")}.get(mode, ())
        for role, value in (("verifier", verifier), ("judge", judge)):
            if role in need and value is None:
                raise ValueError(f"mode {mode!r} needs `{role}` (one of {keys})")
            if value is not None and value not in keys:
                raise ValueError(f"{role} {value!r} is not one of the rewards {keys}")
        check_beta(beta)
        self.mode, self.verifier, self.judge = mode, verifier, judge
        self.beta, self.verifier_threshold = beta, verifier_threshold
        self.rewards = {s.log_key: build_reward(s.name, **s.params) for s in self.specs}

    def _active(self) -> list[RewardSpec]:
        skip = {"verifiable": {self.judge}, "generative": {self.verifier}}.get(self.mode, set())
        return [s for s in self.specs if s.log_key not in skip]

    def __call__(self, prompts: list[str], completions: list[str], **fields) -> RewardOutput:
        n = len(completions)
        prompts = list(prompts) if prompts is not None else [""] * n
        metrics: dict[str, float] = {}
        per: dict[str, list[float]] = {}
        for spec in self._active():
            key = spec.log_key
            scores, m, failed = score_safely(key, self.rewards[key], prompts, completions, fields)
            per[key] = scores
            for name, value in m.items():
                metrics[f"reward/{key}/{name}"] = float(value)
            metrics[f"reward/{key}/errors"] = float(m.get("errors", 0.0)) + failed
            metrics[f"reward/{key}/mean"] = mean(scores)
        total = self._combine(per, n)
        metrics["reward/total/mean"] = mean(total)
        return RewardOutput(total, metrics)

    def _combine(self, per: dict[str, list[float]], n: int) -> list[float]:
        roles = {self.verifier, self.judge} if self.mode != "sum" else set()
        extras = [sum(s.weight * per[s.log_key][i] for s in self._active() if s.log_key not in roles)
                  for i in range(n)]
        if self.mode == "sum":
            return extras
        if self.mode == "verifiable":
            return [per[self.verifier][i] + extras[i] for i in range(n)]
        judge = [min(max(x, 0.0), 1.0) for x in per[self.judge]]
        if self.mode == "generative":
            return [judge[i] + extras[i] for i in range(n)]
        v = [1.0 if x >= self.verifier_threshold else 0.0 for x in per[self.verifier]]
        return [hero_gate(v[i], judge[i], self.beta) + extras[i] for i in range(n)]
