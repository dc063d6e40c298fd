"""Registries of posttrain.algo: YAML names, unknown-name errors, a light package import."""

import subprocess
import sys

import pytest

from posttrain.algo import (
    ADV_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    UnknownAlgoError,
    get_adv_estimator,
    get_kl_estimator,
    get_policy_loss,
)
from posttrain.algo.registry import Registry


def test_builtin_names():
    assert {"grpo", "dr_grpo", "gae"} <= set(ADV_ESTIMATORS.names())
    assert {"vanilla", "gspo"} <= set(POLICY_LOSSES.names())
    assert {"k1", "k2", "k3", "low_var_kl"} <= set(KL_ESTIMATORS.names())
    from posttrain.algo import advantages, kl, losses

    assert get_adv_estimator("gae") is advantages.compute_gae
    assert get_policy_loss("vanilla") is losses.vanilla_policy_loss
    assert get_kl_estimator("low_var_kl") is kl.kl_k3


@pytest.mark.parametrize("getter,bad,close", [
    (get_adv_estimator, "grp0", "grpo"),
    (get_policy_loss, "vanila", "vanilla"),
    (get_kl_estimator, "k4", None),
])
def test_unknown_name_lists_known(getter, bad, close):
    with pytest.raises(UnknownAlgoError) as err:
        getter(bad)
    msg = str(err.value)
    assert repr(bad) in msg
    if close:
        assert f"Did you mean {close!r}" in msg
    registry = {get_adv_estimator: ADV_ESTIMATORS, get_policy_loss: POLICY_LOSSES, get_kl_estimator: KL_ESTIMATORS}
    for name in registry[getter].names():
        assert name in msg
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


def test_duplicate_name_rejected():
    reg = Registry("thing", ())

    @reg.register("a")
    def first():
        pass

    reg.register("a")(first)  # re-registering the same function (module reload) is fine
    with pytest.raises(ValueError, match="already registered"):
        @reg.register("a")
        def second():
            pass


def test_package_import_is_light():
    code = "import sys, posttrain.algo; assert 'torch' not in sys.modules, 'posttrain.algo imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
