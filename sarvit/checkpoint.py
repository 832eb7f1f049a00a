"""Checkpoints that survive a kill at any instant, and a damaged file.

A checkpoint folder (``checkpoints/step-00001234/``, see ``sarvit.runs``) holds:

    model.safetensors     weights (timm's parameter names) + metadata
    ema.safetensors       EMA weights, when model EMA is on
    state.pt              optimizer, scheduler, grad scaler, RNG states of every rank, epoch,
                          step, data position, the data size, the running sums of the epoch
    manifest.json         size and SHA-256 of each file above, and when it was written

Every file is written to a temporary name, flushed to disk and renamed; a checkpoint
folder is assembled under a temporary name, verified against its manifest, and renamed
whole; ``last`` is switched by renaming a new symlink over it. The previous checkpoint is
kept: a kill leaves the previous checkpoint or the new one, never a mix, and a file
damaged later (a full disk, a copy cut short) is found by the manifest, so that
:func:`find_checkpoint` falls back to the checkpoint before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .runs import RunFolder, atomic_write, fsync_dir, remove

__all__ = [
    "atomic_write", "save_weights", "load_weights", "read_metadata", "file_sha256", "save_checkpoint",
    "latest_checkpoint", "find_checkpoint", "verify_checkpoint", "Found", "load_state", "WEIGHTS", "EMA_WEIGHTS",
    "STATE", "MANIFEST",
]

WEIGHTS, EMA_WEIGHTS, STATE, MANIFEST = "model.safetensors", "ema.safetensors", "state.pt", "manifest.json"
METADATA_KEY = "sarvit"


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model.state_dict()`` as safetensors, atomically; ``metadata`` goes in as JSON."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {METADATA_KEY: json.dumps(metadata or {})}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files private (0600), unlike every other file

    return atomic_write(path, write)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (a checkpoint's files; a backbone a run depends on: its resume refuses a changed one)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata sarvit stored in a safetensors file ({} for foreign files)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(METADATA_KEY, "{}"))



def _manifest(folder: Path) -> dict[str, Any]:
    files = sorted(p.name for p in folder.iterdir() if p.name in (WEIGHTS, EMA_WEIGHTS, STATE))
    return {"saved_at": time.time(),
            "files": {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                      for name in files}}


def verify_checkpoint(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete, intact checkpoint (``None`` when it is).

    Each file is compared with the size and SHA-256 its manifest recorded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder.name} does not exist"
    if not (folder / MANIFEST).exists():
        return _unlisted_problem(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{folder.name}/{MANIFEST} is unreadable"
    for name in (WEIGHTS, STATE):
        if name not in manifest["files"]:
            return f"{folder.name}/{MANIFEST} lists no {name}"
    for name, want in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{folder.name}/{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{folder.name}/{name} has {size} bytes, {want['size']} were written"
        if file_sha256(path) != want["sha256"]:
            return f"{folder.name}/{name} does not match the SHA-256 written with it"
    return None


def _unlisted_problem(folder: Path) -> str | None:
    """A checkpoint written before manifests: both files must open and ``state.pt`` pass its CRCs."""
    for name in (WEIGHTS, STATE):
        if not (folder / name).is_file():
            return f"{folder.name}/{name} is missing"
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt"):
            pass
        with zipfile.ZipFile(folder / STATE) as archive:
            bad = archive.testzip()
    except Exception as err:  # safetensors and zipfile raise their own types for a damaged file
        return f"{folder.name} cannot be read ({type(err).__name__}: {err})"
    return f"{folder.name}/{STATE} is damaged ({bad})" if bad else None


def _saved_at(folder: Path) -> float:
    try:
        return float(json.loads((folder / MANIFEST).read_text())["saved_at"])
    except (OSError, ValueError, KeyError):
        return folder.stat().st_mtime


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    metadata: dict[str, Any],
    ema: torch.nn.Module | None = None,
    previous: str | None = None,
) -> Path:
    """Write a complete checkpoint for ``step``, point ``checkpoints/last`` at it, keep one before it.

    ``previous``: the name of the checkpoint to keep besides the new one (default: the one
    ``last`` pointed to). Every other checkpoint folder is deleted once ``last`` moved.
    """
    run = RunFolder(run_dir)
    root = run.checkpoints
    root.mkdir(parents=True, exist_ok=True)
    if previous is None and run.last.is_symlink():
        previous = os.readlink(run.last)
    final = run.step(step)
    staging = root / f".{final.name}.tmp-{os.getpid()}"
    remove(staging)
    staging.mkdir()
    try:
        save_weights(model, staging / WEIGHTS, metadata)
        if ema is not None:
            save_weights(ema, staging / EMA_WEIGHTS, metadata)
        atomic_write(staging / STATE, lambda tmp: torch.save(state, tmp))
        manifest = _manifest(staging)
        atomic_write(staging / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        problem = verify_checkpoint(staging)  # re-read from the disk before it replaces anything
        if problem is not None:
            raise OSError(f"the checkpoint just written does not read back ({problem}); the previous one is kept")
    except BaseException:  # a full disk: the half-written folder would hold on to the space the user frees
        remove(staging)
        raise
    if final.exists():  # the same step saved again: move the old one aside (a kill here leaves `previous`)
        os.replace(final, root / f".{final.name}.old.tmp-{os.getpid()}")
    os.replace(staging, final)
    link_tmp = root / f".last.tmp-{os.getpid()}"
    remove(link_tmp)
    os.symlink(final.name, link_tmp)
    os.replace(link_tmp, run.last)
    fsync_dir(root)
    keep = {final.name, previous}
    for old in [*run.step_folders(), *root.glob(".step-*")]:  # only now is it safe to drop older
        if old.name not in keep:  # checkpoints, and half-written ones a kill left behind
            remove(old)
    return final


@dataclass(frozen=True)
class Found:
    """The checkpoint to resume from, and what was wrong with the newer ones (``skipped``)."""

    path: Path | None
    skipped: tuple[str, ...] = ()


def find_checkpoint(run_dir: str | Path) -> Found:
    """The newest intact checkpoint of a run folder: ``last`` if it verifies, else the newest that does."""
    run = RunFolder(run_dir)
    skipped = []
    first = None
    if run.last.is_symlink():
        first = run.checkpoints / os.readlink(run.last)
        problem = verify_checkpoint(first)
        if problem is None:
            return Found(first)
        skipped.append(f"checkpoints/last: {problem}")
    elif run.step_folders():
        skipped.append("checkpoints/last is missing")
    others = sorted((p for p in run.step_folders() if p != first), key=_saved_at, reverse=True)
    for folder in others:
        problem = verify_checkpoint(folder)
        if problem is None:
            return Found(folder, tuple(skipped))
        skipped.append(problem)
    return Found(None, tuple(skipped))


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest intact checkpoint folder of a run folder (or ``path`` itself if it is one)."""
    path = Path(path)
    if (path / STATE).is_file() and (path / WEIGHTS).is_file():
        return path if verify_checkpoint(path) is None else None
    return find_checkpoint(path).path


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint folder.

    ``weights_only=False``: the state holds NumPy and Python RNG states. Load only
    checkpoints you (or your runs) wrote.
    """
    return torch.load(Path(checkpoint) / STATE, map_location="cpu", weights_only=False)
