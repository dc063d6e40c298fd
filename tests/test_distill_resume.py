"""The `distill` stage killed (SIGKILL, no chance to clean up) and started again. Killed mid-training: it reuses the
stored teacher targets untouched and ends with the very student an uninterrupted run trains (every weight equal,
on the same machine and thread count), with one metrics record per step. Killed while the teacher samples: the
finished shards are kept and the rest sampled into what an uninterrupted run stores."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

STEPS, SAVE_EVERY, STALL_AT = 10, 4, 7  # saves after steps 4 and 8; the killed run stalls in step 7 (index 6)


# The child runs the stage and stalls inside the Nth call of a function (`module:name`), writing a marker: the parent
# kills it there, so the kill lands where the test wants it whatever the machine's speed.
CHILD = """
import importlib, pathlib, sys, time
where, n, marker = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
module, name = where.split(":")
module = importlib.import_module(module)
real, calls = getattr(module, name), [0]
def stalling(*a, **k):
    calls[0] += 1
    if calls[0] == n:
        marker.write_text("stalled")
        time.sleep(600)
    return real(*a, **k)
setattr(module, name, stalling)
from posttrain.pipeline import run_recipe
from posttrain.recipe import load_recipe
run_recipe(load_recipe(None, sys.argv[4:]))
"""


def run_killed(tmp_path, where: str, n: int, args: list) -> str:
    """Run the stage in a child process, SIGKILL it inside the `n`th call of `where`; its output."""
    marker = tmp_path / f"stalled-{n}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", CHILD, where, str(n), str(marker), *args]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, f"the stage ended before it was killed:\n{child.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"the stage never reached call {n} of {where}"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        out = child.communicate(timeout=60)[0]
    assert child.returncode == -signal.SIGKILL, out[-3000:]
    return out


def overrides(run_dir, model_dir):
    return [f"run_dir={run_dir}", f"model.path={model_dir}", "stages=[distill]", "threads=1",
            f"distill.teacher={model_dir}", "distill.student={layers: 1, experts: 2}", "distill.k=4",
            "distill.n_examples=8", "distill.max_new_tokens=6", f"distill.steps={STEPS}", "distill.batch_size=3",
            f"distill.save_every={SAVE_EVERY}", "distill.logging_steps=1", "task.max_difficulty=2"]


def run_in_process(args):
    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe

    return run_recipe(load_recipe(None, args))["distill"]


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_resume_after_sigkill_mid_distillation(tmp_path, tiny_model_dir):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    out = run_killed(tmp_path, "posttrain.algo.distill:distill_loss", STALL_AT, overrides(killed, tiny_model_dir))
    stage = killed / "distill"
    state = stage / "state"
    assert sorted(p.name for p in state.iterdir()) == ["step_000004"], out[-3000:]
    assert not (stage / "done.json").exists() and not (stage / "checkpoint").exists()
    logged = [json.loads(ln)["step"] for ln in (stage / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3, 4, 5]  # steps 4 and 5 ran after the save: the resumed run does them again
    shard = stage / "targets" / "shard-00000.safetensors"
    before = (shard.stat().st_mtime_ns, shard.read_bytes())

    resumed = run_in_process(overrides(killed, tiny_model_dir))
    s = resumed["summary"]
    assert s["resumed_at_step"] == SAVE_EVERY and s["targets"]["reused"] is True
    assert (shard.stat().st_mtime_ns, shard.read_bytes()) == before  # not sampled again, not rewritten
    logged = [json.loads(ln)["step"] for ln in (stage / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(STEPS))  # the killed run's steps 4 and 5 replaced, not repeated
    assert sorted(p.name for p in state.iterdir()) == ["step_000004", "step_000008"]

    uninterrupted = run_in_process(overrides(whole, tiny_model_dir))
    u = uninterrupted["summary"]
    assert u["resumed_at_step"] == 0
    # the same teacher samples and targets as the run that was never killed stored (every tensor equal: the
    # safetensors header's metadata order is not fixed, so the files' bytes are not compared)
    assert_same_tensors(load_file(str(shard)), load_file(str(whole / "distill" / "targets" / shard.name)))
    assert_same_tensors(load_file(str(stage / "checkpoint" / "model.safetensors")),
                        load_file(str(whole / "distill" / "checkpoint" / "model.safetensors")))
    assert (s["first_loss"], s["final_loss"], s["train_tokens"]) == (u["first_loss"], u["final_loss"],
                                                                     u["train_tokens"])


def test_a_save_of_other_settings_is_not_resumed(tmp_path, tiny_model_dir):
    """A state saved under another learning rate (the run killed, the recipe changed, the stage run again) would
    continue another training: the stage trains the student from the start and says why."""
    import shutil

    run_dir = tmp_path / "run"
    first = run_in_process(overrides(run_dir, tiny_model_dir))
    assert first["summary"]["resumed_at_step"] == 0
    (run_dir / "distill" / "done.json").unlink()
    shutil.rmtree(run_dir / "distill" / "checkpoint")
    again = run_in_process([*overrides(run_dir, tiny_model_dir), "distill.learning_rate=0.002"])
    assert again["summary"]["resumed_at_step"] == 0 and again["summary"]["targets"]["reused"] is True
    text = (run_dir / "run.log").read_text()
    assert "is of other settings (learning_rate); training the student from the start" in text
    logged = [json.loads(ln)["step"] for ln in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(STEPS))


def test_a_kill_while_the_teacher_samples_keeps_the_finished_shards(tmp_path, tiny_model_dir):
    """Killed while the teacher samples its second shard of targets: the first shard, already written, is reused
    as it is; the second is sampled again, from its own seed, into what an uninterrupted run stores."""
    from posttrain.distill_targets import SHARD_SEQUENCES

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    more = [f"distill.n_examples={SHARD_SEQUENCES + 8}", "distill.max_new_tokens=4", "distill.steps=2"]
    run_killed(tmp_path, "posttrain.distill_targets:sample_shard", 2, [*overrides(killed, tiny_model_dir), *more])
    targets = killed / "distill" / "targets"
    assert sorted(p.name for p in targets.iterdir()) == ["key.json", "shard-00000.safetensors"]
    first = targets / "shard-00000.safetensors"
    before = (first.stat().st_mtime_ns, first.read_bytes())

    s = run_in_process([*overrides(killed, tiny_model_dir), *more])["summary"]
    t = s["targets"]
    assert (t["shards"], t["reused_shards"], t["sequences"]) == (2, 1, SHARD_SEQUENCES + 8)
    assert (first.stat().st_mtime_ns, first.read_bytes()) == before
    run_in_process([*overrides(whole, tiny_model_dir), *more])
    for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
        assert_same_tensors(load_file(str(targets / name)), load_file(str(whole / "distill" / "targets" / name)))
