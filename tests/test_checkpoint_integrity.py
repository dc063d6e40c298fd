"""Checkpoints are written atomically with a checksum manifest: damage is detected, a failed save loses nothing."""

import subprocess
import sys

import pytest

from posttrain.model import CheckpointError, load_model, load_tokenizer, save_model, verify_manifest


@pytest.fixture()
def ckpt(tiny_model_dir, tmp_path):
    return save_model(load_model(tiny_model_dir), load_tokenizer(tiny_model_dir), tmp_path / "ckpt")


def test_manifest_lists_every_file(ckpt):
    assert (ckpt / "manifest.json").is_file() and verify_manifest(ckpt) == []


def test_truncated_weights_are_detected(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is .* bytes, the manifest says .*truncated"):
        load_model(ckpt)


def test_corrupted_weights_are_detected(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # same size, one byte flipped
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_model(ckpt)


def test_save_failing_part_way_leaves_the_previous_checkpoint_loadable(ckpt, tiny_model_dir):
    """A file-size limit makes the save die part-way through writing the weights (as a full disk would)."""
    script = f"""
import resource, signal, torch
from posttrain.model import load_model, load_tokenizer, save_model
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
model = load_model({str(tiny_model_dir)!r})
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)  # a different model, so a half-written save would be visible
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
save_model(model, load_tokenizer({str(tiny_model_dir)!r}), {str(ckpt)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and ("File too large" in proc.stderr or "Errno 27" in proc.stderr), proc.stderr[-800:]
    assert verify_manifest(ckpt) == []
    import torch

    reloaded, original = load_model(ckpt), load_model(tiny_model_dir)
    for (n, a), (_, b) in zip(reloaded.named_parameters(), original.named_parameters()):
        assert torch.equal(a, b), n
