"""Actor faults in real grpo runs on Ray actors (issue #7): a rollout actor killed mid-call and between calls, a
reward call that hangs, and a rollout actor out of restarts. Two runs in all (each starts its actors, ~20 s)."""

import functools
import json
import os
import signal
import sys
import time

import pytest
import ray
import torch

from posttrain.recipe import load_recipe
from posttrain.rlstate import latest
from posttrain.workers.actors import Shared
from posttrain.workers.learner import LearnerWorker
from posttrain.workers.reward import RLRewardWorker
from posttrain.workers.rollout import RolloutWorker

TINY = ["stages=[grpo]", "threads=1", "task.max_difficulty=2", "grpo.steps=4", "grpo.save_every=2",
        "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.budgets=[0,4,auto]", "grpo.max_new_tokens=8",
        "grpo.learning_rate=1e-2", "grpo.eval_budgets=[4]", "grpo.eval_n_per_difficulty=1",
        "grpo.eval_max_new_tokens=8", "ray.backend=ray"]


def _bump(counter_file: str) -> int:
    """Count a call in a file (the count survives the actor's restarts); returns the count including this one.
    Under a file lock: two rollout workers count their calls at once."""
    import fcntl

    with open(counter_file, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
        f.flush()
    return n


class FaultyRollout(RolloutWorker):
    """A rollout worker whose process dies in the middle of its `die_on`-th generate call, as an OOM kill would.
    The class attributes are set by the test; they travel with the class, which Ray gets pickled by value."""

    counter, die_on = "", 0
    receive_counter, die_in_receive = "", 0  # the same for `receive_weights` (weight_sync.method: broadcast)

    def generate(self, *args, **kwargs):
        if _bump(self.counter) == self.die_on:
            os._exit(1)
        return RolloutWorker.generate(self, *args, **kwargs)

    def receive_weights(self, *args, **kwargs):
        if _bump(self.receive_counter) == self.die_in_receive:
            os._exit(1)
        return RolloutWorker.receive_weights(self, *args, **kwargs)

    def weights_of(self, names: list[str]) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        return {n: state[n].clone() for n in names}


class HangingReward(RLRewardWorker):
    """The real reward plus per-row noise (the random tiny model never answers correctly, so without it most
    steps would change nothing); its `hang_on`-th call hangs."""

    counter, hang_on = "", 0

    def score(self, *args, **kwargs):
        if _bump(self.counter) == self.hang_on:
            time.sleep(600)
        scores, correct, metrics = RLRewardWorker.score(self, *args, **kwargs)
        return [s + 0.1 * i for i, s in enumerate(scores)], correct, metrics


class FaultyLearner(LearnerWorker):
    """A learner whose process dies in its `die_on`-th `step` call (the count survives restarts)."""

    counter, die_on = "", 0

    def step(self, *args, **kwargs):
        if _bump(self.counter) == self.die_on:
            os._exit(1)
        return LearnerWorker.step(self, *args, **kwargs)


@pytest.fixture()
def faulty_workers(monkeypatch, tmp_path, ray_session):
    """The driver spawns FaultyRollout and HangingReward; returns what the test hooks record."""
    from ray import cloudpickle

    from posttrain.stages import rl, rl_workers
    from posttrain.workers import ray_cluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import the tests folder
    monkeypatch.setattr(ray_cluster, "shutdown_ray", lambda: None)  # the session's Ray outlives the run
    monkeypatch.setattr(rl_workers, "RolloutWorker", FaultyRollout)
    monkeypatch.setattr(rl_workers, "RLRewardWorker", HangingReward)
    monkeypatch.setattr(FaultyRollout, "counter", str(tmp_path / "generate_calls"))
    monkeypatch.setattr(FaultyRollout, "receive_counter", str(tmp_path / "receive_calls"))
    monkeypatch.setattr(HangingReward, "counter", str(tmp_path / "score_calls"))
    seen = {"workers": None, "checked": 0, "stale": []}
    real_start, real_rollout = rl.start_workers, rl.RLDriver.rollout

    @functools.wraps(real_start)
    def start_workers(*args, **kwargs):
        seen["workers"] = real_start(*args, **kwargs)
        return seen["workers"]

    def rollout(driver, *args, **kwargs):
        """After every rollout: each rollout worker holds exactly the weights the driver last synced (by broadcast:
        the learner's, which are those in a synchronous run)."""
        out = real_rollout(driver, *args, **kwargs)
        if driver.weights is not None:  # a `Shared` reference: the weights went learner -> rollout directly
            synced = ray.get(driver.weights.ref) if isinstance(driver.weights, Shared) else driver.weights
        elif driver.broadcast is not None and driver.weights_version > 0:
            synced = driver.w.learners[0].call(LearnerWorker.weights)
        else:
            return out
        names = list(synced)
        for r in driver.w.rollouts:
            held = r.call(FaultyRollout.weights_of, names)
            seen["checked"] += 1
            if not all(torch.equal(held[n], synced[n]) for n in names):
                seen["stale"].append((r.name, r.restarts))
        return out

    monkeypatch.setattr(rl, "start_workers", start_workers)
    monkeypatch.setattr(rl.RLDriver, "rollout", rollout)
    yield seen
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _kill_between_calls(monkeypatch, before_step: int) -> None:
    """SIGKILL the rollout actor's process while it is idle, before `before_step`, and wait until Ray has
    restarted it: the proxy is not told, so only the incarnation check can notice that its weights are gone."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    from posttrain.stages import rl

    real = rl.RLDriver.train_step

    def train_step(driver, step):
        if step == before_step:
            proxy = driver.w.rollouts[0]
            old = proxy.pid()
            os.kill(old, signal.SIGKILL)
            t0 = time.time()
            while time.time() - t0 < 120:
                try:
                    if proxy.pid() != old:
                        break
                except (RayActorError, ActorUnavailableError):
                    time.sleep(0.2)
        return real(driver, step)

    monkeypatch.setattr(rl.RLDriver, "train_step", train_step)


def test_rollout_deaths_and_a_reward_hang_are_survived(faulty_workers, tiny_model_dir, tmp_path, monkeypatch):
    """The rollout actor dies mid-call in step 1 and is killed while idle before step 2; the reward call of step
    3 hangs past `ray.reward.timeout_s`. Each time the actor is restarted, the rollout gets the current weights
    back (`on_restart`), the call is retried, and the run ends with every step."""
    from posttrain.pipeline import run_recipe

    # generate calls: 1-2 = the evaluation before (natural, capped), 3 = step 0, 4 = step 1, ...
    monkeypatch.setattr(FaultyRollout, "die_on", 4)
    monkeypatch.setattr(HangingReward, "hang_on", 4)
    _kill_between_calls(monkeypatch, before_step=2)
    run = tmp_path / "run"
    info = run_recipe(load_recipe(None, [f"run_dir={run}", f"model.path={tiny_model_dir}", *TINY,
                                         "ray.rollout.max_restarts=3", "ray.reward.timeout_s=5",
                                         "ray.reward.max_restarts=2"]))["grpo"]
    assert info["steps"] == 4 and (run / "grpo" / "done.json").is_file()
    lines = (run / "grpo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [0, 1, 2, 3]
    assert faulty_workers["checked"] >= 3 and faulty_workers["stale"] == []  # no rollout ran on lost weights
    w = faulty_workers["workers"]
    assert w.rollouts[0].restarts == 2 and w.reward.restarts >= 1
    log = (run / "run.log").read_text()
    assert "actor rollout0: generate(): the actor process died" in log
    assert "actor rollout0: generate(): the actor was restarted since its last call" in log
    assert "actor reward: score() took longer than timeout_s=5.0" in log


def test_rollout_out_of_restarts_stops_the_run_naming_the_actor(faulty_workers, tiny_model_dir, tmp_path,
                                                                monkeypatch):
    from posttrain.pipeline import run_recipe
    from posttrain.workers.actors import WorkerFailed

    monkeypatch.setattr(FaultyRollout, "die_on", 6)  # step 3 (calls 1-2 are the evaluation), after the step-2 save
    run = tmp_path / "run"
    with pytest.raises(WorkerFailed, match=r"actor 'rollout0' failed: generate\(\): the actor process died .*"
                                           r"restart limit max_restarts=0 reached"):
        run_recipe(load_recipe(None, [f"run_dir={run}", f"model.path={tiny_model_dir}", *TINY,
                                      "ray.rollout.max_restarts=0"]))
    assert not (run / "grpo" / "done.json").exists() and not (run / ".lock").exists()
    d, driver = latest(run / "grpo" / "state")
    assert d.name == "step_000002" and driver["step"] == 2


def test_learner_death_is_recovered_from_the_last_save_to_the_same_weights(faulty_workers, tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    """A learner holds the weights and optimizer, so Ray alone must not restart it (it would come back with the
    input model). With `ray.learner.max_restarts: 1` its death in step 3 (after the step-2 save) restarts every
    actor, resumes from the save, redoes step 2 and 3, and ends with the weights of a run that never failed."""
    from posttrain.model import load_model
    from posttrain.pipeline import run_recipe
    from posttrain.stages import rl_workers

    monkeypatch.setattr(rl_workers, "LearnerWorker", FaultyLearner)
    monkeypatch.setattr(FaultyLearner, "counter", str(tmp_path / "step_calls"))
    clean = run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'clean'}", f"model.path={tiny_model_dir}", *TINY]))
    (tmp_path / "step_calls").unlink()
    monkeypatch.setattr(FaultyLearner, "die_on", 4)  # step calls 1-4 = steps 0-3
    run = tmp_path / "run"
    info = run_recipe(load_recipe(None, [f"run_dir={run}", f"model.path={tiny_model_dir}", *TINY,
                                         "ray.learner.max_restarts=1"]))["grpo"]
    assert info["steps"] == 4 and int((tmp_path / "step_calls").read_text()) == 6  # steps 2 and 3 redone
    lines = (run / "grpo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [0, 1, 2, 3]
    assert "restarting every actor and resuming from the last saved state (recovery 1 of 1)" in (run / "run.log").read_text()
    a, b = load_model(clean["grpo"]["checkpoint"]).state_dict(), load_model(info["checkpoint"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # without a recovery allowed (the default), the same death stops the run, the last save intact
    (tmp_path / "step_calls").unlink()
    with pytest.raises(Exception, match=r"actor 'learner0' failed: step\(\): the actor process died"):
        run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'stop'}", f"model.path={tiny_model_dir}", *TINY]))
    assert latest(tmp_path / "stop" / "grpo" / "state")[1]["step"] == 2


def test_broadcast_weight_sync_survives_rollout_deaths_with_the_object_store_runs_weights(
        faulty_workers, tiny_model_dir, tmp_path, monkeypatch):
    """`grpo.weight_sync.method: broadcast` (gloo) with two rollout workers: one dies inside the second sync's
    broadcast (that sync goes through the object store and the group is built anew), and rollout0 is killed while
    idle before step 3 (restored through the object store; the group built anew again). Every rollout runs on the
    learner's latest weights, every step is there, and the trained weights equal those of the same run synced
    through the object store without faults (the rollouts are seeded, so a retried call samples the same)."""
    from posttrain.model import load_model
    from posttrain.pipeline import run_recipe

    two = [*TINY, "ray.rollout.num=2", "ray.rollout.max_restarts=2", "grpo.eval_n_per_difficulty=0"]
    clean = run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'clean'}", f"model.path={tiny_model_dir}", *two]))
    monkeypatch.setattr(FaultyRollout, "die_in_receive", 3)  # receive calls 1-2: the first sync (two workers)
    _kill_between_calls(monkeypatch, before_step=3)
    run = tmp_path / "run"
    info = run_recipe(load_recipe(None, [f"run_dir={run}", f"model.path={tiny_model_dir}", *two,
                                         "grpo.weight_sync.method=broadcast", "grpo.weight_sync.timeout_s=60"]))
    lines = [json.loads(s) for s in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    assert [m["sync/fallbacks"] for m in lines] == [0, 1, 1, 1]
    assert all(m["sync/bytes"] > 0 for m in lines)
    assert faulty_workers["checked"] >= 6 and faulty_workers["stale"] == []
    log = (run / "run.log").read_text()
    assert "weight sync by gloo broadcast, group 3" in log and "group 4" not in log
    assert "the weight broadcast of version 2 failed" in log
    a = load_model(clean["grpo"]["checkpoint"]).state_dict()
    b = load_model(info["grpo"]["checkpoint"]).state_dict()
    assert any(not torch.equal(a[k], v) for k, v in load_model(tiny_model_dir).state_dict().items())
    assert all(torch.equal(a[k], b[k]) for k in a)
