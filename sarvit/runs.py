"""The run folder: every path of a run, atomic writes, and the lock that gives a run one writer.

A run folder holds:

    config.yaml                       the resolved configuration (absolute data and output paths)
    metrics.jsonl                     one JSON line per finished epoch
    tensorboard/                      the same scalars for TensorBoard
    subset_indices.json               the training subset (with --per-class / --train-fraction)
    checkpoints/step-00001234/        a complete checkpoint (see ``sarvit.checkpoint``); the newest
                                      two are kept, so that a damaged newest one has a fallback
    checkpoints/last -> step-...      symlink to the newest complete checkpoint
    best.safetensors                  weights of the best validation epoch (+ best_ema.safetensors)
    backbone.safetensors              `sarvit pretrain`: the evaluated backbone after the latest epoch
    summary.json                      written when the run finishes
    lock                              pid and host of the process training the run (lockf-ed)

Nothing here imports torch: the command line reads these paths before it needs a model.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError

__all__ = ["RunFolder", "RunLocked", "RunLock", "atomic_write", "fsync_dir", "remove", "run_folder_of", "TEMP_MARK"]

BACKBONE = "backbone.safetensors"  # the backbone a `sarvit pretrain` run exports after every epoch
TEMP_MARK = ".tmp-"  # every temporary name holds it: ``.<name>.tmp-<pid>``


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (nothing is created by asking for a path)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    subset = property(lambda self: self.root / "subset_indices.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    last = property(lambda self: self.root / "checkpoints" / "last")
    best = property(lambda self: self.root / "best.safetensors")
    best_ema = property(lambda self: self.root / "best_ema.safetensors")
    backbone = property(lambda self: self.root / BACKBONE)
    summary = property(lambda self: self.root / "summary.json")
    lock = property(lambda self: self.root / "lock")

    def step(self, step: int) -> Path:
        """The folder of the checkpoint written after optimizer step ``step``."""
        return self.checkpoints / f"step-{step:08d}"

    def step_folders(self) -> list[Path]:
        """Every complete-looking checkpoint folder (``step-*``), in name order."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir() and not p.is_symlink())

    def holds_run(self) -> bool:
        """Whether the folder holds anything besides a lock file."""
        return self.root.is_dir() and any(p.name != self.lock.name for p in self.root.iterdir())

    def read_config(self, hint: str) -> dict:
        """The run's options from ``config.yaml`` ({} when there is none).

        Raises:
            UserError: the file is not a YAML mapping; the message ends with ``hint``.
        """
        import yaml

        from .config import yaml_problem

        if not self.config.is_file():
            return {}
        try:
            saved = yaml.safe_load(self.config.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{self.config} is not valid YAML ({yaml_problem(err)}); {hint}") from None
        if not isinstance(saved, dict):
            raise UserError(f"{self.config} does not hold a run's options (a YAML mapping); {hint}")
        return saved

    def progress(self) -> list[str]:
        """What in the folder a restart from scratch would lose (empty: nothing yet)."""
        found = []
        if self.metrics.is_file() and any(line.strip() for line in self.metrics.read_text().splitlines()):
            found.append(self.metrics.name)
        found += [p.name for p in (self.best, self.best_ema, self.summary) if p.is_file()]
        if self.last.is_symlink() or self.step_folders():
            found.append("checkpoints/")
        return found

    def stale_temporaries(self) -> list[Path]:
        """Temporary files and staging folders that a killed writer left behind."""
        found = []
        for folder in (self.root, self.checkpoints, *self.step_folders()):
            if folder.is_dir():
                found += [p for p in folder.iterdir() if p.name.startswith(".") and TEMP_MARK in p.name]
        return sorted(found)


def run_folder_of(path: str | Path) -> Path:
    """The run folder a path names: itself, or the run that a checkpoint folder or weights file belongs to."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent, path.parent.parent.parent):
        if (folder / "config.yaml").is_file() or (folder / "checkpoints").is_dir():
            return folder
    return path


def remove(path: Path) -> None:
    """Delete a file, symlink or folder, whichever ``path`` is."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` then rename ``tmp`` onto ``path`` once it is safely on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


# --- the lock ---------------------------------------------------------------------------------


class RunLocked(UserError):
    """Another process is training the run."""


def _describe(owner: dict) -> str:
    if not owner:
        return "another process"
    return f"process {owner.get('pid')} on {owner.get('host')} (since {owner.get('since')})"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD: dict[Path, "RunLock"] = {}  # the lock files this process holds


class RunLock:
    """An exclusive POSIX record lock (``fcntl.lockf``) on ``<run>/lock``, which also holds
    the owner's pid and host.

    The operating system releases the lock when its process dies (even by SIGKILL), so a
    lock left by a killed run is free; its text then names a dead owner and ``note``
    says that the lock was taken over. A record lock (unlike ``flock``) is not inherited
    by forked children, so DataLoader workers that outlive a killed run for a few seconds
    do not keep its folder locked. Record locks do not exclude the process that holds
    them: ``_HELD`` refuses a second lock of one folder within a process.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.note: str | None = None
        self._key = self.path.resolve()
        if self._key in _HELD:  # checked before opening: closing any descriptor of the file drops the lock
            raise self._refusal(_HELD[self._key]._owner())
        self._file = open(self.path, "a+")
        try:
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            owner = self._owner()
            self._file.close()
            raise self._refusal(owner) from None
        _HELD[self._key] = self
        previous = self._owner()
        if previous:
            gone = previous.get("host") == socket.gethostname() and not _alive(previous.get("pid", -1))
            self.note = (f"took over the lock of {self.path.parent} from {_describe(previous)}, which "
                         f"{'is no longer running' if gone else 'no longer holds it'}")
        self._write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")

    def _refusal(self, owner: dict) -> RunLocked:
        return RunLocked(f"run folder {self.path.parent} is in use by {_describe(owner)}; wait for that run to "
                         "finish (or stop it) before resuming or restarting it")

    def _owner(self) -> dict:
        self._file.seek(0)
        try:
            owner = json.loads(self._file.read() or "{}")
        except json.JSONDecodeError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def _write(self, text: str) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(text)
        self._file.flush()

    def release(self) -> None:
        """Clear the owner's text and drop the lock (a clean exit leaves no owner behind)."""
        if self._file.closed:
            return
        self._write("")
        fcntl.lockf(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        _HELD.pop(self._key, None)
