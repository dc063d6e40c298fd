"""Issue #30: no fault or bad input ends in a traceback. Each fault is made from outside, on disk or by a signal (data
files with bytes that are not UTF-8, a checkpoint whose config.json is not JSON or whose weights are cut short, a
driver killed with SIGKILL), and checked through the `posttrain` command: one message naming the file and where in it,
a non-zero exit code, and nothing lost (no half-written output, an earlier output kept, no Ray process left behind)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.cli import main

GOOD = [{"prompt": f"{i}+1", "answer": str(i + 1)} for i in range(8)]


@pytest.fixture(autouse=True)
def _fresh_log_handlers(monkeypatch):
    """`setup_logging` binds a handler to the stderr of the test that first runs a stage, which pytest closes after
    it; each test here starts without the handlers of earlier ones (a real `posttrain` process has one stderr)."""
    from posttrain.runlog import log

    monkeypatch.setattr(log, "handlers", [])


def _cli(capsys, *args) -> tuple[int, str]:
    """`posttrain ARGS` in this process: (exit code, stderr), after checking that no traceback was printed."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def _files(d: Path) -> dict:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file()}


# ------------------------------------------------------------------------------------------------- data files


@pytest.fixture()
def non_utf8_jsonl(tmp_path) -> Path:
    """8 rows: line 3's prompt has a Latin-1 byte, line 6 is bytes that are not UTF-8, line 7's prompt is empty."""
    lines = [json.dumps(r).encode() for r in GOOD]
    lines[2] = b'{"prompt": "caf\xe9 2+1", "answer": "3"}'
    lines[5] = b"\xff\xfe not text"
    lines[6] = b'{"prompt": "", "answer": "7"}'
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _run_args(tmp_path, model, *extra):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    return ["run", recipe, f"run_dir={tmp_path / 'run'}", f"model.path={model}", "stages=[sft]", "sft.steps=1",
            "sft.batch_size=2", "threads=1", *extra]


def test_non_utf8_rows_stop_the_run_naming_every_bad_row(non_utf8_jsonl, tiny_model_dir, tmp_path, capsys):
    raw = non_utf8_jsonl.read_bytes()
    e9, ff = raw.index(b"\xe9"), raw.index(b"\xff")  # where the bad bytes are in the file
    rc, err = _cli(capsys, *_run_args(tmp_path, tiny_model_dir, "data.source=file", f"data.path={non_utf8_jsonl}"))
    assert rc == 2
    assert (f"{non_utf8_jsonl}, line 3: field 'prompt' is not UTF-8 text (byte 0xe9 at byte offset {e9} of the file) "
            "(set data.skip_bad_rows: true to skip such rows); 2 more bad rows of 8:") in err
    assert f"{non_utf8_jsonl}, line 6: not UTF-8 text (byte 0xff at byte offset {ff} of the file)" in err
    assert f"{non_utf8_jsonl}, line 7: field 'prompt' is empty" in err
    assert not (tmp_path / "run" / "sft" / "checkpoint").exists()  # stopped before training


def test_skip_bad_rows_skips_non_utf8_rows_and_lists_them(non_utf8_jsonl, tiny_model_dir, tmp_path, capsys):
    rc, err = _cli(capsys, *_run_args(tmp_path, tiny_model_dir, "data.source=file", f"data.path={non_utf8_jsonl}",
                                      "data.skip_bad_rows=true"))
    assert rc == 0, err
    bad = [json.loads(line) for line in (tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()]
    assert [b["at"] for b in bad] == ["line 3", "line 6", "line 7"]
    assert "not UTF-8" in bad[0]["error"] and "not UTF-8" in bad[1]["error"]
    assert (tmp_path / "run" / "sft" / "checkpoint" / "config.json").is_file()


def _json_array(path: Path) -> str:
    path.write_bytes(b'[{"prompt": "1+1", "answer": "2"},\n {"prompt": "x\xff", "answer": "3"}]')
    return "row 2: field 'prompt' is not UTF-8 text"


def _parquet(path: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = pa.array([b"1+1", b"bad \xff", b"2+2"], type=pa.binary()).view(pa.string())  # Parquet does not check
    pq.write_table(pa.table({"prompt": prompts, "answer": ["2", "3", "4"]}), path)
    return "row 2: field 'prompt' is not UTF-8 text (byte 0xff"


def _broken_parquet(path: Path) -> str:
    path.write_bytes(b"PAR1 this is no parquet file")
    return "not a readable Parquet file"


@pytest.mark.parametrize("name,write", [("rows.json", _json_array), ("rows.parquet", _parquet),
                                        ("broken.parquet", _broken_parquet)])
def test_sweep_data_with_bad_bytes_is_one_message(name, write, tiny_model_dir, tmp_path, capsys):
    path = tmp_path / name
    expected = write(path)
    rc, err = _cli(capsys, "sweep", "--model", tiny_model_dir, "--data", path, "--budgets", "0", "--out",
                   tmp_path / "out", "--backend", "local", "--threads", "1")
    assert rc == 2 and f"{path}" in err and expected in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- checkpoints


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()  # as a downloaded checkpoint: no manifest to catch the damage
    return dst


@pytest.mark.parametrize("command", ["run", "prepare", "sweep", "export"])
def test_config_json_that_is_not_json_is_named_by_every_command(command, tiny_model_dir, tmp_path, capsys):
    bad = _copy(tiny_model_dir, tmp_path / "bad")
    (bad / "config.json").write_text('{"model_type": "qwen3_moe",\n  "hidden_size": }\n')
    out = tmp_path / "out"
    args = {"run": _run_args(tmp_path, bad),
            "prepare": ["prepare", bad, "--out", out],
            "sweep": ["sweep", "--model", bad, "--budgets", "0", "--n", "1", "--difficulties", "1", "--out", out,
                      "--backend", "local", "--threads", "1"],
            "export": ["export", "--model", bad, "--base", tiny_model_dir, "--out", out]}[command]
    rc, err = _cli(capsys, *args)
    assert rc == 2 and f"{bad}/config.json" in err and "not valid JSON at line 2, column 18" in err, err
    assert not out.exists()


def _truncated(d: Path) -> str:
    f = d / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size // 2)
    return f"{f} is {size // 2} bytes, its header says {size} (truncated?)"


def _missing_shard(d: Path) -> str:
    from safetensors import safe_open

    with safe_open(d / "model.safetensors", "pt") as f:
        names = list(f.keys())
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["lm_head.extra"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return f"{d / 'model-00002-of-00002.safetensors'} is missing (listed in model.safetensors.index.json)"


@pytest.mark.parametrize("damage", [_truncated, _missing_shard])
def test_prepare_refuses_a_checkpoint_with_weights_cut_short(damage, tiny_model_dir, tmp_path, capsys):
    src = _copy(tiny_model_dir, tmp_path / "src")
    why = damage(src)
    rc, err = _cli(capsys, "prepare", src, "--out", tmp_path / "out")
    assert rc == 2 and why in err, err  # (it used to exit 0 calling the checkpoint usable)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial copy


def _plain_template(d: Path) -> Path:
    """A checkpoint `prepare` must write a copy of: its chat template takes no thinking budget."""
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    return d


def test_a_failed_prepare_keeps_the_earlier_output_and_leaves_no_partial_copy(tiny_model_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "out"
    assert _cli(capsys, "prepare", _plain_template(_copy(tiny_model_dir, tmp_path / "good")), "--out", out)[0] == 0
    before = _files(out)
    # weights whose shapes contradict the config pass every check of the files and fail only while the copy is
    # being written (a pickled checkpoint is converted, so its model is loaded inside the copy)
    bad = _plain_template(_copy(tiny_model_dir, tmp_path / "bad"))
    weights = load_file(bad / "model.safetensors")
    name = next(n for n in weights if "embed_tokens" in n)
    weights[name] = torch.zeros(3, 5)
    torch.save(weights, bad / "pytorch_model.bin")
    (bad / "model.safetensors").unlink()
    rc, err = _cli(capsys, "prepare", bad, "--out", out, "--allow-pickle")
    assert rc == 2 and f"{bad}: transformers cannot load its weights" in err, err
    assert _files(out) == before  # the earlier output is kept as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "out"]  # no temporary copy left


# ------------------------------------------------------------------------------------------------- Ray processes

DRIVER = """
import sys, time
import ray
from posttrain.workers.ray_cluster import init_ray
info = init_ray(**({"address": sys.argv[1]} if len(sys.argv) > 1 else {"num_cpus": 1}))
print("READY", ray.get_runtime_context().gcs_address, flush=True)
time.sleep(300)
"""


def _start_driver(tmp_path, name, *args, **env):
    out = tmp_path / f"{name}.out"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=f, stderr=subprocess.STDOUT,
                                env={**base, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **env})
    deadline = time.monotonic() + 90
    while "READY" not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(0.2)
    return proc, out.read_text().split("READY", 1)[1].split()[0]


def _descendants(pid: int) -> dict:
    """{(pid, start time): title} of every process below `pid`."""
    import psutil

    found = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            found[(p.pid, p.create_time())] = " ".join(p.cmdline())[:100] or p.name()
        except psutil.Error:
            pass
    return found


def _alive(procs: dict) -> dict:
    import psutil

    left = {}
    for (pid, started), title in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                left[(pid, started)] = title
        except psutil.Error:
            pass
    return left


def test_a_killed_driver_leaves_no_process_of_its_local_ray_and_a_joined_cluster_is_untouched(tmp_path):
    local, address = _start_driver(tmp_path, "local")
    joined = None
    ours = {}
    try:
        deadline = time.monotonic() + 30
        while True:  # every process below the driver, once the raylet has started its two agents
            ours = _descendants(local.pid)
            if sum("Agent" in t for t in ours.values()) >= 2:
                break
            assert time.monotonic() < deadline, ours
            time.sleep(0.2)
        assert any("raylet" in t for t in ours.values()) and any("gcs_server" in t for t in ours.values())
        core = {k: t for k, t in ours.items() if not t.startswith("ray::") or "Agent" in t}  # not idle workers

        # a driver that joined this instance by address is killed: the instance it joined is left alone
        joined, joined_to = _start_driver(tmp_path, "joined", address, RAY_AUTH_MODE="token")
        assert joined_to == address
        joined.send_signal(signal.SIGKILL)
        joined.wait()
        time.sleep(2)
        assert _alive(core) == core

        local.send_signal(signal.SIGKILL)  # the driver that started it: every process of the instance ends with it
        local.wait()
        deadline = time.monotonic() + 15
        while _alive(ours):
            assert time.monotonic() < deadline, f"still running 15 s after the driver was killed: {_alive(ours)}"
            time.sleep(0.2)
    finally:
        import psutil

        for proc in (local, joined):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid, _ in _alive(ours):  # only this test's own processes, if it failed
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
