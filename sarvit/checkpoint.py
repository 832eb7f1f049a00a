"""Checkpoints that survive a kill at any instant.

A run folder holds:

    config.yaml                       the resolved configuration
    checkpoints/step-00001234/        one complete checkpoint:
        model.safetensors             weights (timm's parameter names) + metadata
        ema.safetensors               EMA weights, when model EMA is on
        state.pt                      optimizer, scheduler, grad scaler, RNG states of
                                      every rank, epoch, step, data position, best metric
    checkpoints/last -> step-...      symlink to the newest complete checkpoint
    best.safetensors                  weights of the best validation epoch (+ best_ema)

Every file is written to a temporary name, flushed to disk and renamed; a checkpoint
folder is assembled under a temporary name and renamed whole; ``last`` is switched by
renaming a new symlink over it. A kill leaves either the previous checkpoint or the new
one, never a mix, and older checkpoints are deleted only after ``last`` moved.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_write", "save_weights", "load_weights", "read_metadata", "save_checkpoint", "latest_checkpoint",
    "load_state", "WEIGHTS", "EMA_WEIGHTS", "STATE",
]

WEIGHTS, EMA_WEIGHTS, STATE = "model.safetensors", "ema.safetensors", "state.pt"
METADATA_KEY = "sarvit"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` then rename ``tmp`` onto ``path`` once it is safely on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model.state_dict()`` as safetensors, atomically; ``metadata`` goes in as JSON."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {METADATA_KEY: json.dumps(metadata or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata sarvit stored in a safetensors file ({} for foreign files)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(METADATA_KEY, "{}"))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    metadata: dict[str, Any],
    ema: torch.nn.Module | None = None,
) -> Path:
    """Write a complete checkpoint for ``step`` and point ``checkpoints/last`` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    staging = root / f".{name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    save_weights(model, staging / WEIGHTS, metadata)
    if ema is not None:
        save_weights(ema, staging / EMA_WEIGHTS, metadata)
    atomic_write(staging / STATE, lambda tmp: torch.save(state, tmp))
    if final.exists():  # the same step saved again (e.g. an epoch end right after an interval save)
        shutil.rmtree(final)
    os.replace(staging, final)
    link_tmp = root / f".last.tmp-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(name, link_tmp)
    os.replace(link_tmp, root / "last")
    _fsync_dir(root)
    for old in [*root.glob("step-*"), *root.glob(".step-*")]:  # only now is it safe to drop older
        if old.name != name:  # checkpoints, and half-written ones a kill left behind
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run folder (or ``path`` itself if it is one)."""
    path = Path(path)
    if (path / STATE).is_file() and (path / WEIGHTS).is_file():
        return path
    last = path / "checkpoints" / "last"
    if last.is_dir() and (last / STATE).is_file():
        return last.resolve()
    return None


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint folder.

    ``weights_only=False``: the state holds NumPy and Python RNG states. Load only
    checkpoints you (or your runs) wrote.
    """
    return torch.load(Path(checkpoint) / STATE, map_location="cpu", weights_only=False)
