"""The reward registry: every reward is a small picklable class whose registered name is the YAML string.

A reward is called on a batch::

    reward(prompts: list[str], completions: list[str], **fields) -> RewardOutput

where every field is a per-example list of length B (``answer``, ``budget`` (int, or None for autonomous),
``tests``, ``difficulty``, ``n_think`` (thinking-token counts the caller computed from token ids), ``closed``,
``group`` ...). Parameters live in ``__init__`` so an instance pickles across process boundaries (Ray actors,
multiprocessing); rewards are never closures.

Metric convention: a reward's ``metrics`` are either counts over the batch (the names in `COUNT_METRICS`, e.g.
``errors``, ``timeout``) or batch means (everything else). `merge_metrics` adds counts and size-weights means, so
per-sample retries and sharded batches aggregate the same way.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

from posttrain.algo.registry import Registry, UnknownAlgoError

# Metrics that are counts of samples, summed when batches are merged (all other metrics are means).
COUNT_METRICS = frozenset({"errors", "timeout", "memory", "violation", "output_limit", "crash", "sandbox_error"})

# Modules that register the built-in rewards; imported on first registry lookup so importing the package stays
# cheap (math-verify/sympy, torch and Ray are only imported by the rewards that need them, when they are called).
_BUILTIN_MODULES = ("verifiable", "math", "code", "budget", "genrm", "scalar_rm")


@dataclass
class RewardOutput:
    """Scores (B,) for a batch and scalar metrics (counts for `COUNT_METRICS`, batch means otherwise)."""

    scores: list[float]
    metrics: dict[str, float] = field(default_factory=dict)


class UnknownRewardError(UnknownAlgoError):
    """An unknown reward name. Both a ValueError and a KeyError, so either `except` catches it."""


REWARDS = Registry("reward", _BUILTIN_MODULES, package=__package__, error=UnknownRewardError)


class UnknownParamError(TypeError, ValueError):
    """A parameter the reward does not take. Both a TypeError and a ValueError."""


def register_reward(name: str):
    """Class decorator: register a reward class under `name` (the string recipes use).

    >>> @register_reward("_doctest_const")
    ... class Const:
    ...     def __init__(self, value: float = 1.0):
    ...         self.value = value
    ...     def __call__(self, prompts, completions, **fields):
    ...         return RewardOutput([self.value] * len(completions))
    >>> build_reward("_doctest_const", value=0.5)([""], ["x"]).scores
    [0.5]
    """

    def decorator(cls):
        REWARDS.register(name)(cls)
        cls.reward_name = name
        return cls

    return decorator


def list_rewards() -> list[str]:
    """All registered reward names, sorted."""
    return REWARDS.names()


def get_reward_cls(name: str) -> type:
    """The class registered under `name`; an unknown name raises `UnknownRewardError` listing the known ones."""
    return REWARDS.get(name)


def reward_params(cls: type) -> list[str]:
    """The keyword parameters a reward class accepts."""
    if cls.__init__ is object.__init__:
        return []
    sig = inspect.signature(cls.__init__)
    return [p.name for p in list(sig.parameters.values())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_reward_params(name: str, params: dict) -> None:
    """Raise naming the reward and the parameter when `params` would not construct reward `name`: an unknown
    parameter (with its nearest valid spelling) or a required one missing. Builds nothing (no model is loaded), so
    a recipe is checked before any work."""
    cls = get_reward_cls(name)
    if cls.__init__ is object.__init__:
        sig_params = []
    else:
        sig_params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    takes_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig_params)
    valid = reward_params(cls)
    if not takes_var_kw:
        for key in params:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise UnknownParamError(
                    f"reward {name!r} got an unknown parameter {key!r}.{hint} "
                    f"Valid parameters: {', '.join(valid) or '(none)'}"
                )
    missing = [p.name for p in sig_params if p.default is p.empty and p.name not in params
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise UnknownParamError(f"reward {name!r} needs the parameter{'s' * (len(missing) > 1)} "
                                f"{', '.join(missing)} (in its `params`)")
    check = getattr(cls, "check_params", None)  # what only the reward knows, e.g. whether its sandbox runs here
    if check is not None:
        try:
            check(params)
        except (ValueError, RuntimeError) as e:
            raise UnknownParamError(f"reward {name!r}: {e}") from None


def build_reward(name: str, **params: Any):
    """Instantiate the reward registered under `name` with `params` (checked first: `check_reward_params`): an
    unknown parameter is an error naming the reward, the parameter and its nearest valid spelling."""
    check_reward_params(name, params)
    return get_reward_cls(name)(**params)


def merge_metrics(metrics: Sequence[dict[str, float]], sizes: Sequence[int]) -> dict[str, float]:
    """Merge metrics of several sub-batches: counts (`COUNT_METRICS`) add up, means are size-weighted.

    >>> merge_metrics([{"errors": 1, "acc": 1.0}, {"errors": 2, "acc": 0.0}], [1, 3])
    {'errors': 3.0, 'acc': 0.25}
    """
    out: dict[str, float] = {}
    weight: dict[str, int] = {}
    for m, n in zip(metrics, sizes):
        for k, v in m.items():
            if k in COUNT_METRICS:
                out[k] = out.get(k, 0.0) + float(v)
            else:
                out[k] = out.get(k, 0.0) + float(v) * n
                weight[k] = weight.get(k, 0) + n
    for k, w in weight.items():
        out[k] = out[k] / w if w else 0.0
    return out


def get_field(fields: dict[str, Any], key: str, n: int, *, reward: str, default: Any = ..., ) -> list:
    """A per-example field as a list of length `n`; missing without a default is a clear error."""
    if key not in fields or fields[key] is None:
        if default is ...:
            raise ValueError(f"reward {reward!r} needs the per-example field {key!r}; got fields {sorted(fields)}")
        return [default] * n
    values = list(fields[key])
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: field {key!r} has {len(values)} values for {n} completions")
    return values


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs)) / len(xs) if len(xs) else 0.0
