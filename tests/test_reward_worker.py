"""The RL stages' one reward worker (`workers.reward.RLRewardWorker`), in this process and as a Ray actor (one Ray
test: starting Ray costs seconds)."""

import sys
import threading

import pytest

from posttrain.rewards.registry import RewardOutput, register_reward
from posttrain.workers.reward import RLRewardWorker


@register_reward("_test_worker_raises_on_odd")
class RaisesOnOdd:
    """Raises whenever the batch holds an odd gold answer; reports whether it ran on the main thread."""

    def __call__(self, prompts, completions, **fields):
        if any(int(a) % 2 for a in fields["answer"]):
            raise RuntimeError("odd answer")
        main = float(threading.current_thread() is threading.main_thread())
        return RewardOutput([1.0] * len(completions), {"main_thread": main})


class WorkerWithTestReward(RLRewardWorker):
    """The worker in an actor that cannot import this module: registers the test's reward there first (both
    classes travel by value)."""

    def __init__(self, *args, **kwargs):
        from posttrain.rewards.registry import get_reward_cls

        try:
            get_reward_cls("_test_worker_raises_on_odd")
        except KeyError:
            register_reward("_test_worker_raises_on_odd")(RaisesOnOdd)
        super().__init__(*args, **kwargs)


def _spec(name, weight=1.0, key=None, params=None):
    return {"name": name, "weight": weight, "key": key, "params": params or {}, "on": "all"}


SPECS = [_spec("exact_int"), _spec("math", 0.5), _spec("_test_worker_raises_on_odd", 0.25, "flaky"),
         _spec("code", 0.1, params={"timeout_s": 2.0, "memory_mb": 256})]
COMPS = ["t</think>2", "t</think>3", r"t</think>\boxed{4}"]
ANSWERS = [2, 3, 5]
TESTS = [["assert __name__ == '__main__'"]] * 3  # passes for any code that compiles
# exact_int: [1, 1, 0]; math: [1, 1, 0]; flaky: batch raises -> per sample [1, error -> 0, error -> 0];
# code: the answers run as Python: "2" and "3" pass the test (it reads the code's namespace), "\boxed{4}" is a SyntaxError -> [1, 1, 0]
EXPECTED = [1 + 0.5 + 0.25 + 0.1, 1 + 0.5 + 0.1, 0.0]
ARGS = ([""] * 3, COMPS, ANSWERS, [None] * 3, [1] * 3, [0, 1, 2], [False] * 3, TESTS)


def _code_sandbox_or_skip():
    import os

    from posttrain.rewards.sandbox import bwrap_problem

    if bwrap_problem():
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the code reward with its sandbox: {bwrap_problem()}")
        pytest.skip(bwrap_problem())


def test_worker_scores_correctness_by_the_task_grader_and_counts_errors():
    _code_sandbox_or_skip()
    scores, correct, metrics = RLRewardWorker(SPECS, "exact_int").score(*ARGS)
    assert scores == pytest.approx(EXPECTED)
    assert correct == [True, True, False]  # by the task's grader, whatever the rewards
    assert metrics["reward/auto/flaky/errors"] == 2.0


def test_ray_actor_scores_on_its_main_thread_and_runs_the_sandbox(ray_session):
    import ray.cloudpickle

    from posttrain.workers.actors import spawn

    _code_sandbox_or_skip()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker cannot import this test module
    proxy = spawn(WorkerWithTestReward, SPECS, "exact_int", name="reward")
    try:
        scores, correct, metrics = proxy.call(WorkerWithTestReward.score, *ARGS)
    finally:
        proxy.kill()
    assert scores == pytest.approx(EXPECTED) and correct == [True, True, False]
    assert metrics["reward/auto/flaky/errors"] == 2.0 and metrics["reward/auto/exact_int/errors"] == 0.0
    assert metrics["reward/auto/math/mean"] == pytest.approx(2 / 3)
    assert metrics["reward/auto/flaky/main_thread"] == 1.0  # so math-verify's signal timeout is usable there
    assert metrics["reward/auto/code/mean"] == pytest.approx(2 / 3)  # the sandbox runs from inside an actor
