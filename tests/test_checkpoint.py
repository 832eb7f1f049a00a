import hashlib
import json
import os

import pytest
import torch

from sarvit import checkpoint as ckpt
from sarvit import runs


def small_model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def save(run_dir, step):
    return ckpt.save_checkpoint(run_dir, step, small_model(float(step)), {"step": step}, {"step": step})


def test_atomic_write_is_the_run_folder_one():
    assert ckpt.atomic_write is runs.atomic_write


def test_weights_and_metadata_round_trip(tmp_path):
    model = small_model(0.5)
    ckpt.save_weights(model, tmp_path / "w.safetensors", {"model": "x", "num_classes": 2})
    loaded = ckpt.load_weights(tmp_path / "w.safetensors")
    assert loaded.keys() == model.state_dict().keys() and torch.equal(loaded["weight"], model.weight)
    assert ckpt.read_metadata(tmp_path / "w.safetensors") == {"model": "x", "num_classes": 2}


def test_last_points_at_the_newest_complete_checkpoint_and_one_before_it_is_kept(tmp_path):
    save(tmp_path, 10)
    # a kill while the next checkpoint was being assembled leaves a staging folder behind
    staging = tmp_path / "checkpoints" / ".step-00000020.tmp-12345"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"truncated")
    last = ckpt.latest_checkpoint(tmp_path)
    assert last.name == "step-00000010" and ckpt.load_state(last) == {"step": 10}
    save(tmp_path, 20)
    save(tmp_path, 30)
    last = ckpt.latest_checkpoint(tmp_path)
    assert last.name == "step-00000030" and ckpt.load_state(last) == {"step": 30}
    assert torch.equal(ckpt.load_weights(last / ckpt.WEIGHTS)["weight"], torch.full((2, 3), 30.0))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["last", "step-00000020", "step-00000030"]
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None


def test_the_manifest_holds_the_size_and_sha256_of_every_file(tmp_path):
    folder = save(tmp_path, 10)
    files = json.loads((folder / ckpt.MANIFEST).read_text())["files"]
    assert set(files) == {"model.safetensors", "state.pt"}
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    weights = newest / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    found = ckpt.find_checkpoint(tmp_path)
    assert found.path.name == "step-00000010"
    assert found.skipped == (f"checkpoints/last: step-00000020/model.safetensors has {weights.stat().st_size} bytes, "
                             f"{weights.stat().st_size + 7} were written",)
    state = save(tmp_path / "other", 30) / ckpt.STATE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    state.write_bytes(bytes(data))
    assert "state.pt does not match the SHA-256" in ckpt.verify_checkpoint(state.parent)


def test_missing_or_dangling_last_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    (tmp_path / "checkpoints" / "last").unlink()
    found = ckpt.find_checkpoint(tmp_path)
    assert found.path.name == "step-00000020" and found.skipped == ("checkpoints/last is missing",)
    os.symlink("step-00000030", tmp_path / "checkpoints" / "last")  # points at nothing
    found = ckpt.find_checkpoint(tmp_path)
    assert found.path.name == "step-00000020" and "step-00000030 does not exist" in found.skipped[0]
    for folder in (tmp_path / "checkpoints").glob("step-*"):
        (folder / ckpt.MANIFEST).write_text("{")
    assert ckpt.find_checkpoint(tmp_path).path is None


def test_a_checkpoint_from_before_manifests_is_checked_by_reading_it(tmp_path):
    folder = save(tmp_path, 10)
    (folder / ckpt.MANIFEST).unlink()
    assert ckpt.verify_checkpoint(folder) is None
    state = folder / ckpt.STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert "cannot be read" in ckpt.verify_checkpoint(folder)


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save(tmp_path, 10)
    ckpt.save_checkpoint(tmp_path, 10, small_model(5.0), {"step": 10, "again": True}, {})
    last = ckpt.latest_checkpoint(tmp_path)
    assert last.name == "step-00000010" and ckpt.load_state(last) == {"step": 10, "again": True}
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["last", "step-00000010"]


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_half_written_folder(tmp_path, monkeypatch):
    save(tmp_path, 5)

    def disk_full(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, 10)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["last", "step-00000005"]  # nothing holds the space
    monkeypatch.undo()
    assert ckpt.load_state(ckpt.latest_checkpoint(tmp_path)) == {"step": 5}


def test_weights_files_get_the_permissions_of_every_other_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # created as any file is, under the process's umask
    ckpt.save_weights(small_model(1.0), tmp_path / "w.safetensors")
    folder = save(tmp_path / "run", 3)
    for path in (tmp_path / "w.safetensors", folder / ckpt.WEIGHTS, folder / ckpt.STATE):
        assert oct(path.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777), path
