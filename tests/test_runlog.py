import json
import time


def _tb_steps(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resume_at_drops_what_a_killed_run_logged_after_the_saved_step(tmp_path):
    from posttrain.runlog import MetricsWriter

    m = MetricsWriter(tmp_path)
    for step in range(8):  # the killed run: its last saved state was before step 5
        m.log(step, {"loss": float(step), "note": "x"})
    m.close()
    m = MetricsWriter(tmp_path)
    m.resume_at(5)
    for step in range(5, 10):
        m.log(step, {"loss": 100.0 + step})
    m.close()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10))
    assert [r["loss"] for r in rows] == [0, 1, 2, 3, 4, 105, 106, 107, 108, 109]
    assert _tb_steps(tmp_path / "tb", "loss") == list(range(10))  # steps 5-7 of the killed run are purged
    m = MetricsWriter(tmp_path)  # resuming from scratch (killed before its first save) empties the log
    m.resume_at(0)
    m.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_finished_checkpoint_is_the_stage_folder_whatever_done_json_says(tmp_path, monkeypatch):
    from posttrain.runlog import StageDir

    stage = StageDir(tmp_path / "run", "sft")
    assert stage.finished_checkpoint() is None  # not done
    stage.checkpoint.mkdir()
    stage.mark_done({"checkpoint": "run/sft/checkpoint"})  # relative to a directory this process is not in
    monkeypatch.chdir(tmp_path / "run")
    assert stage.finished_checkpoint() == tmp_path / "run" / "sft" / "checkpoint"
    StageDir(tmp_path / "run", "sweep").mark_done({"produces_model": False})
    assert StageDir(tmp_path / "run", "sweep").finished_checkpoint() is None  # a stage that made no model


def test_a_failing_last_tensorboard_flush_is_a_warning_and_metrics_stay_whole(tmp_path, caplog):
    """TensorBoard's writer writes events in a thread; a full disk can surface first at close (a flaky CI failure of
    the full-disk test). Here the events file is swapped for a directory before the last event, so its write fails with
    a real OSError (on that file only: a process-wide file-size limit would also break other tests' log handlers):
    close warns and returns, metrics.jsonl keeps every line."""
    import logging
    import shutil

    from posttrain.runlog import MetricsWriter

    m = MetricsWriter(tmp_path)
    for step in range(50):
        m.log(step, {"loss": float(step)})
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    m._tb.flush()  # nothing left queued: TensorBoard's writer appends by path, and would re-create the file
    for _ in range(100):  # (a CI run once lost this race: the file was back between unlink and mkdir)
        events.unlink(missing_ok=True)
        try:
            events.mkdir()  # appending to it now fails: IsADirectoryError
            break
        except FileExistsError:
            time.sleep(0.01)
    assert events.is_dir()
    m.log(50, {"loss": 50.0})  # queued for the writer thread: it fails writing it, close's flush raises
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        m.close()
    # the writer thread fails on the queued event either before `log` returns (log's warning) or after, when
    # close's flush re-raises it (close's warning, the flaky CI case); close never raises either way
    assert ("could not be flushed" in caplog.text or "could not be written" in caplog.text), caplog.text
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(range(51))
    m.close()  # a second close is a no-op
    shutil.rmtree(events)
