"""The reward worker, plain and as a Ray actor (one Ray test: starting Ray costs seconds)."""

import sys
import threading

import pytest

from posttrain.rewards.actor import RewardWorker, start_reward_actor
from posttrain.rewards.combine import CombinedReward
from posttrain.rewards.registry import RewardOutput, register_reward


@register_reward("_test_actor_raises_on_odd")
class RaisesOnOdd:
    """Raises whenever the batch holds an odd gold answer; reports whether it ran on the main thread."""

    def __call__(self, prompts, completions, **fields):
        if any(int(a) % 2 for a in fields["answer"]):
            raise RuntimeError("odd answer")
        main = float(threading.current_thread() is threading.main_thread())
        return RewardOutput([1.0] * len(completions), {"main_thread": main})


SPECS = {"rewards": [{"name": "exact_int"}, {"name": "math", "weight": 0.5},
                     {"name": "_test_actor_raises_on_odd", "key": "flaky", "weight": 0.25},
                     {"name": "code", "weight": 0.1, "params": {"timeout_s": 2.0, "memory_mb": 256}}]}
COMPS = ["t</think>2", "t</think>3", r"t</think>\boxed{4}"]
ANSWERS = [2, 3, 5]
TESTS = [["assert __name__ == '__main__'"]] * 3  # passes for any code that compiles
# exact_int: [1, 1, 0]; math: [1, 1, 0]; flaky: batch raises -> per sample [1, error -> 0, error -> 0];
# code: the answers run as Python: "2" and "3" pass the test (it reads the code's namespace), "\boxed{4}" is a SyntaxError -> [1, 1, 0]
EXPECTED = [1 + 0.5 + 0.25 + 0.1, 1 + 0.5 + 0.1, 0.0]


def test_worker_without_ray():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        worker = RewardWorker(SPECS, num_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = worker.score([""] * 3, COMPS, answer=ANSWERS, tests=TESTS)
    assert out.scores == pytest.approx(EXPECTED)
    assert out.metrics["reward/flaky/errors"] == 2.0


def test_ray_actor_scores_and_counts_errors(ray_session):
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker cannot import this test module
    actor = start_reward_actor(CombinedReward(**SPECS), num_cpus=1)
    try:
        out = ray.get(actor.score.remote([""] * 3, COMPS, answer=ANSWERS, tests=TESTS), timeout=120)
    finally:
        ray.kill(actor)
    assert out.scores == pytest.approx(EXPECTED)
    assert out.metrics["reward/flaky/errors"] == 2.0
    assert out.metrics["reward/exact_int/errors"] == 0.0
    assert out.metrics["reward/math/mean"] == pytest.approx(2 / 3)
    assert out.metrics["reward/flaky/main_thread"] == 1.0  # so math-verify's signal timeout is usable there
    assert out.metrics["reward/code/mean"] == pytest.approx(2 / 3)  # the sandbox runs from inside an actor
