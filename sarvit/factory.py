"""Create SAR models from timm names, and load trained ones from safetensors files."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .checkpoint import load_weights, read_metadata
from .surgery import attach

__all__ = ["create_model", "load_model", "resolve_weights"]


def create_model(
    name: str,
    num_classes: int,
    *,
    img_size: int | None = None,
    drop_path: float = 0.0,
    model_kwargs: dict[str, Any] | None = None,
    layout: str = "sar",
    query: str = "auto",
) -> nn.Module:
    """``timm.create_model(name, ...)`` (no pretrained weights) made a SAR model by :func:`attach`."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}: timm has no model of that name.{hint}")
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path, **(model_kwargs or {}))
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:
        raise ValueError(f"timm model {name!r} does not accept these arguments {sorted(kwargs)}: {err}") from err
    return attach(model, layout=layout, query=query)


def resolve_weights(path: str | Path, which: str = "best") -> Path:
    """A weights file from a file path or a run folder (``best`` or ``last`` weights)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or run folder: {path}")
    candidates = {
        "best": [path / "best.safetensors", path / "checkpoints" / "last" / "model.safetensors"],
        "last": [path / "checkpoints" / "last" / "model.safetensors", path / "model.safetensors"],
        "best_ema": [path / "best_ema.safetensors"],
    }[which]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{path} holds no {which} weights; looked for: {', '.join(str(c) for c in candidates)}")


def load_model(path: str | Path, which: str = "best", device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a SAR model from weights sarvit saved (a ``.safetensors`` file or a run folder).

    Returns ``(model, metadata)``; ``metadata`` holds the model name, its arguments, the
    number of classes, the last-block layout and the training data.
    """
    weights = resolve_weights(path, which)
    meta = read_metadata(weights)
    if "model" not in meta:
        raise ValueError(
            f"{weights} was not written by sarvit (no model description in its metadata); "
            "create the model yourself and load_state_dict(safetensors.torch.load_file(path))"
        )
    model = create_model(
        meta["model"], meta["num_classes"], img_size=meta.get("img_size"), model_kwargs=meta.get("model_kwargs"),
        layout=meta.get("layout", "sar"), query=meta.get("query", "auto"),
    )
    model.load_state_dict(load_weights(weights), strict=True)
    return model.to(device), meta
