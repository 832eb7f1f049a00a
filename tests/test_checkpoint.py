import os

import pytest
import torch

from sarvit import checkpoint as ckpt


def small_model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(path, crash)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_weights_and_metadata_round_trip(tmp_path):
    model = small_model(0.5)
    ckpt.save_weights(model, tmp_path / "w.safetensors", {"model": "x", "num_classes": 2})
    loaded = ckpt.load_weights(tmp_path / "w.safetensors")
    assert loaded.keys() == model.state_dict().keys() and torch.equal(loaded["weight"], model.weight)
    assert ckpt.read_metadata(tmp_path / "w.safetensors") == {"model": "x", "num_classes": 2}


def test_last_points_at_the_newest_complete_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, 10, small_model(1.0), {"step": 10}, {"step": 10})
    # a kill while the next checkpoint was being assembled leaves a staging folder behind
    staging = tmp_path / "checkpoints" / ".step-00000020.tmp-12345"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"truncated")
    last = ckpt.latest_checkpoint(tmp_path)
    assert last.name == "step-00000010" and ckpt.load_state(last) == {"step": 10}
    ckpt.save_checkpoint(tmp_path, 30, small_model(3.0), {"step": 30}, {"step": 30})
    last = ckpt.latest_checkpoint(tmp_path)
    assert last.name == "step-00000030" and ckpt.load_state(last) == {"step": 30}
    assert torch.equal(ckpt.load_weights(last / ckpt.WEIGHTS)["weight"], torch.full((2, 3), 3.0))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["last", "step-00000030"]  # old and stale gone
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None
