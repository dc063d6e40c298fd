"""`scripts/gpu_check.py` (issue #25 item 5): the same code a GPU machine runs, exercised on CPU with the tiny size;
on a machine without CUDA the default invocation skips with one line and exit 0; with CUDA, the `gpu` test runs it."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_on_cpu_and_reports_every_figure(tmp_path, capsys):
    rc = _script().main(["--device", "cpu", "--sizes", "tiny", "--prompts", "8", "--group", "2", "--new-tokens",
                         "24", "--steps", "1", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (tiny,) = report["results"]
    assert tiny["size"] == "tiny" and 3e6 < tiny["params"] < 4e6 and tiny["dtype"] == "float32"
    roll, learn = tiny["rollout"], tiny["learner"]
    assert roll["rows"] == 16 and roll["new_tokens"] > 0 and roll["tokens_per_s"] > 0
    assert roll["budget_kept_share"] == 1.0  # capped rows never think past their budget
    assert learn["finite"] and learn["tokens_per_s"] > 0 and math.isfinite(learn["loss"])
    assert report["info"]["stages"]["finished"] and report["info"]["stages"]["stages"] == ["grpo", "sft"]
    sync = report["info"]["sync"]  # scripts/sync_compare.py: object store and gloo broadcast, the same bytes
    assert sync["ok"] and sync["broadcast"]["backend"] == "gloo" and sync["broadcast"]["bytes"] > 10 * 2**20
    assert "rollout tok/s" in capsys.readouterr().out


def test_gpu_check_without_cuda_skips_with_one_line(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _script().main([]) == 0
    assert capsys.readouterr().out.strip() == ("gpu_check: no CUDA device on this machine: skipped (run with "
                                               "--device cpu to exercise the code)")


def test_gpu_check_refuses_an_unknown_size():
    with pytest.raises(SystemExit):
        _script().main(["--device", "cpu", "--sizes", "huge"])


@pytest.mark.gpu
def test_gpu_check_on_cuda(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert _script().main(["--device", "cuda", "--sizes", "tiny", "--steps", "1", "--out", str(tmp_path)]) == 0
