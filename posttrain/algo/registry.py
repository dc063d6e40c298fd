"""The project's one registry type (`Registry`): the registered names are the strings recipes use.

It lives in the lowest layer so that every package can build on it: the algorithm core's advantage estimators
(``register_adv_est("grpo")``), policy losses (``register_policy_loss("vanilla")``), KL estimators
(``register_kl("k3")``) and off-policy corrections (``register_correction("tis")``) here; the rewards and graders
(`posttrain.rewards.registry`, `.verifiable`), the tasks (`posttrain.tasks.task`) and the stages
(`posttrain.stages`). Lookups load the built-in modules on first use, so
``import posttrain.algo`` does not import torch. An unknown name fails with the nearest spelling and the list of
known names.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable


class UnknownAlgoError(ValueError, KeyError):
    """An unknown registry name. Both a ValueError and a KeyError, so either `except` catches it."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class Registry:
    """A name -> object table (functions, classes, module paths), the one registry type of the project: algo's
    estimators and losses, the rewards, the graders and the tasks. `kind` names it in errors; `modules` (under
    `package`) register the built-ins when a name is first looked up."""

    def __init__(self, kind: str, modules: tuple[str, ...] = (), package: str = "posttrain.algo",
                 error: type[Exception] | None = None, plural: str | None = None):
        self.kind = kind
        self._modules = modules
        self._package = package
        self._error = error or UnknownAlgoError  # what an unknown name raises (a ValueError and a KeyError)
        self._plural = plural or f"{kind}s"
        self._fns: dict[str, Callable] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator: register `fn` under `name`; a second, different function under the same name is an error."""

        def decorator(fn: Callable) -> Callable:
            existing = self._fns.get(name)
            if existing is not None and _qualname(existing) != _qualname(fn):
                raise ValueError(f"{self.kind} {name!r} is already registered to {_qualname(existing)}")
            self._fns[name] = fn
            return fn

        return decorator

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._fns

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first, so a module that looks a name up while importing does not recurse
        try:
            for mod in self._modules:
                importlib.import_module(f"{self._package}.{mod}")
        except BaseException:
            self._loaded = False
            raise

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._load_builtins()
        return sorted(self._fns)

    def get(self, name: str) -> Callable:
        """The function registered under `name`; an unknown name raises `UnknownAlgoError` listing known ones."""
        self._load_builtins()
        if name in self._fns:
            return self._fns[name]
        known = sorted(self._fns)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise self._error(f"unknown {self.kind} {name!r}.{hint} Known {self._plural}: {', '.join(known)}")


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


ADV_ESTIMATORS = Registry("advantage estimator", ("advantages",))
POLICY_LOSSES = Registry("policy loss", ("losses",))
KL_ESTIMATORS = Registry("KL estimator", ("kl",))
OFF_POLICY_CORRECTIONS = Registry("off-policy correction", ("offpolicy",))

register_adv_est = ADV_ESTIMATORS.register
register_policy_loss = POLICY_LOSSES.register
register_kl = KL_ESTIMATORS.register
register_correction = OFF_POLICY_CORRECTIONS.register


def get_adv_estimator(name: str) -> Callable:
    """The advantage estimator registered under `name` (``grpo``, ``dr_grpo``, ``gae``)."""
    return ADV_ESTIMATORS.get(name)


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered under `name` (``vanilla``, ``gspo``)."""
    return POLICY_LOSSES.get(name)


def get_kl_estimator(name: str) -> Callable:
    """The per-token KL estimator registered under `name` (``k1``, ``k2``, ``k3``/``low_var_kl``)."""
    return KL_ESTIMATORS.get(name)


def get_correction(name: str) -> Callable:
    """The off-policy correction registered under `name` (``tis``, ``seq_tis``, ``mis``, ``icepop``, ``seq_mis``, ``geo_mis``, ``decoupled``;
    see `posttrain.algo.offpolicy`)."""
    return OFF_POLICY_CORRECTIONS.get(name)
