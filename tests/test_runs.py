import json
import os
import socket
from pathlib import Path

import pytest

from sarvit.runs import RunFolder, RunLock, RunLocked, atomic_write


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_a_second_lock_on_a_run_is_refused_and_names_the_owner(tmp_path):
    first = RunLock(tmp_path / "lock")
    owner = json.loads((tmp_path / "lock").read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunLocked, match=f"process {os.getpid()} on {socket.gethostname()}"):
        RunLock(tmp_path / "lock")
    first.release()
    assert (tmp_path / "lock").read_text() == ""  # a clean exit leaves no owner behind
    second = RunLock(tmp_path / "lock")
    assert second.note is None  # nothing to take over after a clean release
    second.release()


def test_the_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path):
    pid = os.fork()
    if pid == 0:  # the child takes the lock and dies without releasing it
        RunLock(tmp_path / "lock")
        os._exit(0)
    os.waitpid(pid, 0)
    lock = RunLock(tmp_path / "lock")
    assert f"process {pid} on {socket.gethostname()}" in lock.note and "no longer running" in lock.note
    lock.release()


def test_run_folder_paths_and_stale_temporaries(tmp_path):
    run = RunFolder(tmp_path)
    assert not run.holds_run()
    RunLock(run.lock).release()
    assert not run.holds_run()  # a lock file alone is not a run
    run.checkpoints.mkdir()
    run.step(12).mkdir()
    assert run.step(12).name == "step-00000012" and run.step_folders() == [run.step(12)]
    assert run.progress() == ["checkpoints/"] and run.holds_run()
    stale = [tmp_path / ".metrics.jsonl.tmp-99", run.checkpoints / ".step-00000018.tmp-99",
             run.checkpoints / ".last.tmp-99", run.step(12) / ".state.pt.tmp-99"]
    stale[0].write_text("x")
    stale[1].mkdir()
    os.symlink("step-00000018", stale[2])
    stale[3].write_text("x")
    run.metrics.write_text('{"epoch": 1}\n')
    assert run.stale_temporaries() == sorted(stale)
    assert run.progress() == ["metrics.jsonl", "checkpoints/"]


def test_children_of_a_dead_owner_do_not_keep_the_run_locked(tmp_path):
    """DataLoader workers are forked children: they may outlive a killed run for seconds."""
    import subprocess
    import sys
    import time

    code = ("import os, sys, time; from sarvit.runs import RunLock; RunLock(sys.argv[1]); "
            "pid = os.fork()\n"
            "if pid == 0:\n    os.close(1); os.close(2); time.sleep(20); os._exit(0)\n"
            "print(pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lock")], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    child = int(out.stdout.strip())
    try:
        os.kill(child, 0)  # the forked child still runs, holding the lock file open
        lock = RunLock(tmp_path / "lock")
        assert "no longer running" in lock.note
        lock.release()
    finally:
        os.kill(child, 9)
        time.sleep(0.1)


def test_read_config_refuses_what_is_not_a_mapping_of_options(tmp_path):
    from sarvit.errors import UserError

    run = RunFolder(tmp_path)
    assert run.read_config("hint") == {}
    run.config.write_text("epochs: 3\nlambda: 0.01\n")
    assert run.read_config("hint") == {"epochs": 3, "lambda": 0.01}
    run.config.write_text("epochs: [3\n")
    with pytest.raises(UserError, match=r"config.yaml is not valid YAML .*; restore it"):
        run.read_config("restore it")
    run.config.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="does not hold a run's options .*; restore it"):
        run.read_config("restore it")


@pytest.mark.parametrize("command", [["eval"], ["eval", "--corruptions", "fog"]])
def test_eval_of_a_run_with_a_damaged_config_is_one_line(tmp_path, capsys, command):
    import sarvit
    from sarvit.checkpoint import save_weights
    from sarvit.cli import main

    kwargs = dict(patch_size=8, embed_dim=24, depth=1, num_heads=2)
    model = sarvit.create_model("vit_tiny_patch16_224", 2, img_size=32, model_kwargs=kwargs)
    save_weights(model, tmp_path / "best.safetensors", {"model": "vit_tiny_patch16_224", "model_kwargs": kwargs,
                                                        "img_size": 32, "num_classes": 2, "layout": "sar"})
    (tmp_path / "config.yaml").write_text("data: [unclosed\n")
    assert main([*command, "--checkpoint", str(tmp_path), "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml is not valid YAML" in err and "Traceback" not in err
