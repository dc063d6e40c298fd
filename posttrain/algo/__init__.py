"""The pure algorithm core of the RL stage: advantages, policy/value losses, KL estimators, off-policy
corrections, guards.

Tensors and keyword scalars in, ``(tensor, metrics)`` out; no Ray, IO or config objects. One mask name, ``mask``
(B, T), 1 on response tokens. This ``__init__`` stays light (no torch import): the registries load
`advantages`, `losses`, `kl` and `offpolicy` on first lookup; import those modules directly for the functions
themselves.
"""

from posttrain.algo.registry import (
    ADV_ESTIMATORS,
    KL_ESTIMATORS,
    OFF_POLICY_CORRECTIONS,
    POLICY_LOSSES,
    UnknownAlgoError,
    get_adv_estimator,
    get_correction,
    get_kl_estimator,
    get_policy_loss,
    register_adv_est,
    register_correction,
    register_kl,
    register_policy_loss,
)

__all__ = [
    "ADV_ESTIMATORS",
    "KL_ESTIMATORS",
    "OFF_POLICY_CORRECTIONS",
    "POLICY_LOSSES",
    "UnknownAlgoError",
    "get_adv_estimator",
    "get_correction",
    "get_kl_estimator",
    "get_policy_loss",
    "register_adv_est",
    "register_correction",
    "register_kl",
    "register_policy_loss",
]
