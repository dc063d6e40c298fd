"""Faults of a run's files and of its updates (issue #30): a torn or damaged metrics line, a damaged done.json, a
full disk (a real small filesystem, and a file-size limit) during a save, a learning rate that blows the weights up.

Each fault is injected from outside into a real run of the grpo stage on the tiny model (or into the file the run
reads) and checked for one `error:` line naming what is wrong and where, a non-zero exit, no traceback, and nothing
lost: the last save verifies and the rerun resumes from it.
"""

import errno
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.rlstate import latest, step_dirs
from posttrain.workers.learner import LearnerWorker
from posttrain.workers.reward import RLRewardWorker
from test_reliability_rl import (_cli, _fail_on_call, _noisy, _overrides, _run, _same, _steps, _weights,
                                 noisy_rewards)  # noqa: F401 - a fixture

ARGS = ("grpo.steps=4", "grpo.save_every=2")


@pytest.fixture(scope="module")
def stopped_run(tiny_model_dir, tmp_path_factory):
    """A grpo run (4 steps, a save every 2) whose learner failed in step 3: the state saved after step 2, metrics
    lines of steps 0-2, no done.json. Tests take a copy (`_copy`)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RLRewardWorker, "score", _noisy(RLRewardWorker.score))
        _fail_on_call(mp, LearnerWorker, "step", 4, RuntimeError("injected learner failure"))
        with pytest.raises(RuntimeError, match="injected learner failure"):
            _run(run, tiny_model_dir, *ARGS)
    assert _steps(run) == [0, 1, 2] and [s for s, _ in step_dirs(run / "grpo" / "state")] == [2]
    return run


def _copy(stopped_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    return run


def _main(tmp_path, run, model, *extra) -> int:
    """`posttrain run` in this process (its SIGTERM handler put back afterwards)."""
    from posttrain.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages: [grpo]\n")
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        return main(["run", str(recipe), *_overrides(run, model, *extra)])
    finally:
        signal.signal(signal.SIGTERM, old_term)


# ------------------------------------------------------------------------------------------------ metrics.jsonl
@pytest.mark.parametrize("torn", [b'{"step": 3, "time": 17', b"\x00" * 40 + b"\n"], ids=["cut-short", "zeros"])
def test_torn_last_metrics_line_is_dropped_and_the_run_resumes(torn, stopped_run, tiny_model_dir, tmp_path,
                                                               noisy_rewards):
    """What a crash or a full disk leaves mid-append (a line cut short; or, after a power cut, a block of zeros)
    used to stop the rerun with a JSONDecodeError; now that line is dropped with a warning and the run resumes."""
    run = _copy(stopped_run, tmp_path)
    metrics = run / "grpo" / "metrics.jsonl"
    with open(metrics, "ab") as f:
        f.write(torn)
    info = _run(run, tiny_model_dir, *ARGS)
    assert info["steps"] == 4 and _steps(run) == [0, 1, 2, 3]
    log = (run / "run.log").read_text()
    assert f"{metrics}: dropped" in log and "torn last line" in log
    assert f"resuming from {run / 'grpo' / 'state' / 'step_000002'} (step 2 of 4)" in log


def test_damaged_metrics_line_before_the_last_stops_naming_file_and_line(stopped_run, tiny_model_dir, tmp_path,
                                                                        noisy_rewards, capsys):
    """A line a crash cannot have torn (not the last) is not guessed at: one error naming the file and the line,
    exit 2, the file and the saved state left as they were."""
    run = _copy(stopped_run, tmp_path)
    metrics = run / "grpo" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:25] + "\n"
    metrics.write_text("".join(lines))
    before = metrics.read_bytes()
    rc = _main(tmp_path, run, tiny_model_dir, *ARGS)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f"error: {metrics}, line 2 of 3, is not a metrics record" in err and "Traceback" not in err
    assert metrics.read_bytes() == before
    assert latest(run / "grpo" / "state")[1]["step"] == 2 and not (run / ".lock").exists()


def test_damaged_done_json_is_named(tmp_path):
    from posttrain.runlog import RunFileError, StageDir, latest_checkpoint

    stage = StageDir(tmp_path / "run", "sft")
    stage.checkpoint.mkdir()
    (stage.checkpoint / "config.json").write_text("{}")
    stage.mark_done({"checkpoint": "run/sft/checkpoint"})
    stage.done_file.write_text(stage.done_file.read_text()[:20])
    with pytest.raises(RunFileError, match=rf"{stage.done_file} is damaged \(.*\); it records that stage sft "
                                           "finished: delete it to run the stage again"):
        stage.done_info()
    with pytest.raises(RunFileError, match=f"{stage.done_file} is damaged"):
        latest_checkpoint(tmp_path / "run")


def test_metrics_writer_repairs_on_open_and_never_glues_a_line_to_a_torn_one(tmp_path):
    """A stage that appends without resuming (no `resume_at`) must not glue its first line to a torn one."""
    from posttrain.runlog import MetricsWriter

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    m = MetricsWriter(tmp_path)
    m.log(1, {"loss": 2.0})
    m.close()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 1.0), (1, 2.0)]


# ------------------------------------------------------------------------------------------------ a full disk
# Runs inside `unshare -m` as root: mounts a small tmpfs, starts `posttrain run` on it (argv 1), fills the disk once
# the step-2 save exists, waits for the run to end, then frees the space and runs it again (argv 2). Writes what it
# saw as JSON to OUT (outside the tmpfs, which goes away with the namespace).
FULL_DISK = r"""
import json, os, subprocess, sys, time
mnt, first, second, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mnt], check=True)
env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
state = os.path.join(mnt, "run", "grpo", "state")
with open(os.path.join(mnt, "first.log"), "w") as log:
    proc = subprocess.Popen(first, env=env, stdout=subprocess.DEVNULL, stderr=log)
t0 = time.time()
while not os.path.isdir(os.path.join(state, "step_000002")):
    assert proc.poll() is None and time.time() - t0 < 120, open(os.path.join(mnt, "first.log")).read()[-3000:]
    time.sleep(0.01)
st = os.statvfs(mnt)
with open(os.path.join(mnt, "filler"), "wb") as f:  # leave 150 kB: the next save needs ~600 kB
    left = st.f_bavail * st.f_frsize - 150_000
    while left > 0:
        left -= f.write(b"\0" * min(left, 1 << 20))
rc1 = proc.wait(timeout=120)
seen = {"rc1": rc1, "stderr1": open(os.path.join(mnt, "first.log")).read(), "state": sorted(os.listdir(state))}
from posttrain.rlstate import latest
found = latest(__import__("pathlib").Path(state))
seen["latest"] = [str(found[0]), found[1]["step"]] if found else None
os.remove(os.path.join(mnt, "filler"))
rerun = subprocess.run(second, env=env, capture_output=True, text=True, timeout=300)
metrics = open(os.path.join(mnt, "run", "grpo", "metrics.jsonl")).read().splitlines()
seen |= {"rc2": rerun.returncode, "stderr2": rerun.stderr, "steps": [json.loads(ln)["step"] for ln in metrics],
         "done": os.path.isfile(os.path.join(mnt, "run", "grpo", "done.json"))}
json.dump(seen, open(out, "w"))
"""


def _tmpfs_refused(mnt: Path) -> str | None:
    """Why a private tmpfs cannot be mounted here (None when it can)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare(1) or mount(8) is not installed"
    mnt.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=1m",
                            "tmpfs", str(mnt)], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"the kernel refuses a tmpfs mount in a private mount namespace: {probe.stderr.strip()}"
    return None


def test_full_disk_during_a_save_stops_with_one_message_and_the_rerun_resumes(tiny_model_dir, tmp_path):
    """A real full disk (a 64 MB tmpfs filled up after the step-2 save) makes the step-4 save fail: one `error:`
    line says the disk is full, names the save, the free space and the intact step-2 save; exit 2, no traceback;
    the partial save is gone (it would hold the space); the rerun, with space freed, resumes at step 2."""
    mnt = tmp_path / "mnt"
    reason = _tmpfs_refused(mnt)
    if reason:
        pytest.skip(reason)
    run = mnt / "run"
    first, _ = _cli(tmp_path, run, tiny_model_dir, "grpo.steps=6", "grpo.save_every=2", pause=0.3)
    second, _ = _cli(tmp_path, run, tiny_model_dir, "grpo.steps=6", "grpo.save_every=2")
    out = tmp_path / "seen.json"
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", FULL_DISK, str(mnt),
                           json.dumps(first), json.dumps(second), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    state = run / "grpo" / "state"
    err = seen["stderr1"]
    assert seen["rc1"] == 2, err[-3000:]
    assert f"error: could not write the training state after step 4 to {state / 'step_000004'}" in err
    assert "No space left on device: the disk is full;" in err and "free on the filesystem of" in err
    assert f"The previous save {state / 'step_000002'} is intact: free some space and run the same command again " \
           "to resume from it" in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert seen["state"] == ["step_000002"] and seen["latest"] == [str(state / "step_000002"), 2]
    assert seen["rc2"] == 0, seen["stderr2"][-3000:]
    assert f"resuming from {state / 'step_000002'} (step 2 of 6)" in seen["stderr2"]
    assert seen["steps"] == list(range(6)) and seen["done"]


def test_file_size_limit_during_the_final_save_stops_with_one_message_and_the_rerun_resumes(
        stopped_run, tiny_model_dir, tmp_path):
    """RLIMIT_FSIZE (EFBIG, handled as a full disk) set on `posttrain run` from outside: the final checkpoint
    (a ~200 kB safetensors file) cannot be written. One `error:` line naming the checkpoint and the limit, exit 2,
    no traceback, no temporary left; the saved state still verifies and the rerun resumes from it."""
    run = _copy(stopped_run, tmp_path)
    argv, env = _cli(tmp_path, run, tiny_model_dir, *ARGS)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    ckpt = run / "grpo" / "checkpoint"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: could not write {ckpt} (" in proc.stderr
    assert "File too large: a file grew past the file-size limit" in proc.stderr
    assert f"Nothing was written to {ckpt}: raise the file-size limit and run the same command again" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run / "grpo").iterdir() if p.name.startswith("checkpoint")) == []
    assert latest(run / "grpo" / "state")[1]["step"] == 2 and not (run / "grpo" / "done.json").exists()

    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {run / 'grpo' / 'state' / 'step_000002'} (step 2 of 4)" in proc.stderr
    assert _steps(run) == [0, 1, 2, 3] and (ckpt / "model.safetensors").is_file()


def test_learner_state_written_through_torch_save_names_the_full_disk(tiny_model_dir, tmp_path):
    """torch.save on its own says only "unexpected pos"; the learner writes through a Python file, so the OSError
    (here EFBIG from a file-size limit, set from outside around the call) reaches the message."""
    from posttrain.rlstate import save_state
    from posttrain.runlog import SaveFailed

    from test_learner import _Batch

    worker = LearnerWorker(str(tiny_model_dir))
    worker.learner.step(_Batch(), torch.tensor([1.0, -1.0]), group_size=1)  # AdamW state: 2x the weights
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # the weights (~200 kB) fit, the AdamW state (~400 kB) does not
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, hard))
    try:
        with pytest.raises(SaveFailed, match="File too large: a file grew past the file-size limit") as failed:
            save_state(tmp_path / "state", 2, lambda d: worker.save_state(str(d)), {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert "There is no earlier save: raise the file-size limit and run the same command again to start over" \
        in str(failed.value)
    cause = failed.value.__cause__  # the OSError itself, not torch's RuntimeError: it crosses from a Ray actor
    assert type(cause) is OSError and cause.errno == errno.EFBIG and cause.filename.endswith("learner.pt")
    assert list((tmp_path / "state").iterdir()) == []


# --------------------------------------------------------------------------------------- a blown-up update
def test_learning_rate_that_blows_the_weights_up_is_skipped_and_stops_the_run(tiny_model_dir, tmp_path,
                                                                              noisy_rewards, capsys):
    """grpo.learning_rate=1e10: the first update leaves finite but huge weights whose logits are NaN on padded
    prompts, so the next rollout used to fail with "probability tensor contains either inf, nan". Now each such
    update is undone (weights and AdamW state), counted as a skipped step, and the run stops after
    max_consecutive_skips with one `error:` line; the last save holds the input model's weights and no AdamW state."""
    from posttrain.model import load_model

    run = tmp_path / "run"
    rc = _main(tmp_path, run, tiny_model_dir, "grpo.steps=6", "grpo.save_every=1", "grpo.learning_rate=1e10",
               "grpo.max_consecutive_skips=3")
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    assert "error: grpo: 3 steps in a row were skipped" in err and "learning rate 1e+10 too high?" in err
    assert "lower grpo.learning_rate" in err
    assert "probability tensor" not in err and "Traceback" not in err
    lines = [json.loads(s) for s in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]  # step 2, the third skip, stops the run before it is logged
    assert [m["actor/skipped_steps"] for m in lines] == [1, 2] and all(m["actor/updates"] == 0 for m in lines)
    assert all("learning rate 1e+10 too high?" in m["actor/skip_reason"] for m in lines)
    d, driver = latest(run / "grpo" / "state")
    assert driver["step"] == 2 and driver["consecutive_skips"] == 2
    assert _same(_weights(d / "model.safetensors"), load_model(tiny_model_dir).state_dict())
    assert torch.load(d / "learner.pt", weights_only=True)["optimizer"]["state"] == {}


def test_an_update_that_breaks_the_model_is_undone_bit_for_bit(tiny_model_dir):
    """After one good update, a step at lr 1e10 is skipped with weights and AdamW state exactly as before it; the
    next good step then matches, bit for bit, a learner that never took the bad one."""
    from posttrain.learner import Learner
    from posttrain.model import load_model
    from test_learner import _Batch

    hit, clean = (Learner(load_model(tiny_model_dir), lr=1e-2, router_metrics=False) for _ in range(2))
    batch = _Batch(4)
    with torch.no_grad():
        batch.logp = hit.forward(batch, slice(None))[0]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for learner in (hit, clean):
        assert "actor/skip_reason" not in learner.step(batch, adv, group_size=1, mini_batches=2)

    def adam_state(learner):  # (name, moment or step count) of every parameter, in order
        return [(k, v.clone()) for p in learner.params for k, v in learner.optimizer.state[p].items()]

    weights, state = [p.detach().clone() for p in hit.params], adam_state(hit)
    assert {float(v) for k, v in state if k == "step"} == {2.0}  # two updates (mini-batches) so far
    hit.optimizer.param_groups[0]["lr"] = 1e10
    out = hit.step(batch, adv, group_size=1, mini_batches=2)
    assert "learning rate 1e+10 too high?" in out["actor/skip_reason"] and hit.skipped_steps == 1
    assert out["actor/updates"] == 0 and hit.updates == clean.updates == 2
    assert all(torch.equal(p, w) for p, w in zip(hit.params, weights))
    after = adam_state(hit)
    assert [k for k, _ in after] == [k for k, _ in state] and all(torch.equal(a, b) for (_, a), (_, b) in
                                                                  zip(after, state))

    hit.optimizer.param_groups[0]["lr"] = 1e-2
    for learner in (hit, clean):
        learner.step(batch, adv, group_size=1, mini_batches=2)
    assert all(torch.equal(a, b) for a, b in zip(hit.model.parameters(), clean.model.parameters()))
