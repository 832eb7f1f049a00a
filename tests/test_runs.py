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
