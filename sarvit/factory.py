"""Create SAR models from timm names, and load trained ones from safetensors files."""

from __future__ import annotations

import difflib
import inspect
import json
import math
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from torch import nn

from .checkpoint import EMA_WEIGHTS, STATE, WEIGHTS, find_checkpoint, load_weights, read_metadata
from .errors import ConfigError, WeightsNotFound
from .runs import RunFolder
from .surgery import attach, check_supported

__all__ = ["create_model", "load_model", "resolve_weights", "check_image_size"]

TORCHVISION = "torchvision:"  # a model name with this prefix is torchvision's, not timm's

# the weights a run folder holds, by the name `--which` gives them, in the order they are looked for
RUN_WEIGHTS = {
    "best": ("best.safetensors", "checkpoints/last/model.safetensors"),
    "last": ("checkpoints/last/model.safetensors", "model.safetensors"),
    "best_ema": ("best_ema.safetensors",),
}


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
    """``timm.create_model(name, ...)`` (no pretrained weights) made a SAR model by :func:`attach`.

    ``name`` is a timm model name, or ``torchvision:<name>`` for a torchvision model
    (``torchvision:vit_b_16``). Raises :class:`ConfigError` for an unknown name, arguments
    the model refuses, or an ``img_size`` its patch size does not divide, and
    :class:`UnsupportedModel` for a model of a family SAR does not support. Under
    ``with torch.device("meta")`` it checks all that without allocating the weights.
    """
    if name.startswith(TORCHVISION):
        model = _create_torchvision(name.removeprefix(TORCHVISION), num_classes, img_size, drop_path, model_kwargs)
        return attach(model, layout=layout, query=query)
    _check_name(name)
    with torch.device("meta"):  # the family, from the model with its defaults; no memory
        default = timm.create_model(name, pretrained=False)
        check_supported(default)
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path, **(model_kwargs or {}))
    if img_size is not None and "img_size" in inspect.signature(type(default)).parameters:
        kwargs["img_size"] = img_size  # models without one (PVT v2) take any size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except ConfigError:  # sarvit's own models refuse what they cannot take (PVT v1: sizes of 32), in their words
        raise
    except TypeError as err:
        raise ConfigError(f"timm model {name!r} does not accept these arguments {sorted(kwargs)}: {err}") from None
    except (ValueError, RuntimeError, AssertionError, ZeroDivisionError) as err:  # e.g. depth -2, dim 0
        given = {k: v for k, v in (model_kwargs or {}).items()}
        raise ConfigError(f"timm model {name!r} cannot be built with model_kwargs {given}: "
                          f"{type(err).__name__}: {err}; check the values (sizes must be positive)") from None
    if img_size is not None:
        check_image_size(model, img_size)
        _check_pooled_keys(name, model, img_size)
    return attach(model, layout=layout, query=query)


def _check_pooled_keys(name: str, model: nn.Module, img_size: int) -> None:
    """PVT v2's linear variants (``*_li``) pool their keys to a fixed 7x7 grid: below 224 px the last
    stage has fewer tokens than keys, and S would be made of repeated values."""
    pooled = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (7, (7, 7))]
    if pooled and img_size < 224:
        raise ConfigError(f"{name} pools its keys to a 7x7 grid: at img_size {img_size} its last stage has fewer "
                          f"than 7x7 tokens, so the keys (and S) would repeat values; use img_size 224 or more, or "
                          "a model without linear spatial reduction (pvt_v2_b0 ... pvt_v2_b5)")


def _create_torchvision(name: str, num_classes: int, img_size: int | None, drop_path: float,
                        model_kwargs: dict[str, Any] | None) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, ...)``, its options checked first."""
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(TORCHVISION + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown model {TORCHVISION}{name}: torchvision has no model of that name.{hint}")
    if drop_path:
        raise ConfigError(f"torchvision's {name} has no stochastic depth; set drop_path (--drop-path) to 0")
    if "image_size" in (model_kwargs or {}):
        raise ConfigError("set the input size of a torchvision model with img_size (--img-size), not model_kwargs")
    kwargs = dict(weights=None, num_classes=num_classes, **(model_kwargs or {}))
    with torch.device("meta"):  # the family and the patch size, from the model with its defaults; no memory
        default = torchvision.models.get_model(name, weights=None)
        check_supported(default)
    if img_size is not None:
        check_image_size(default, img_size)
        kwargs["image_size"] = img_size
    try:
        return torchvision.models.get_model(name, **kwargs)
    except TypeError as err:
        raise ConfigError(f"torchvision model {name!r} does not accept these arguments {sorted(kwargs)}: {err}; "
                          "its builder fixes the architecture (layers, width, heads, patch size)") from None


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}: timm has no model of that name.{hint}")


def check_image_size(model: nn.Module, img_size: int) -> None:
    """Refuse an ``img_size`` the model's patch size does not divide (the last rows and
    columns of pixels would be dropped without a word)."""
    embed = getattr(model, "patch_embed", None)  # timm; torchvision's ViT holds patch_size itself
    patch = tuple(embed.patch_size) if embed is not None else (model.patch_size, model.patch_size)  # (ph, pw)
    reductions = {f["reduction"] for f in getattr(model, "feature_info", None) or [] if isinstance(f, dict)}
    if len(reductions) > 1:  # a pyramid (Swin, PVT): its total stride must divide the input
        patch = (max(reductions),) * 2
    if any(img_size % p for p in patch):
        step = math.lcm(*patch)
        below, above = (img_size // step) * step, (img_size // step + 1) * step
        nearest = " or ".join(str(s) for s in (below, above) if s > 0)
        raise ConfigError(f"img_size {img_size} is not a multiple of the patch size {patch[0]}x{patch[1]}: the last "
                          f"{img_size % patch[0]} rows of pixels would be dropped; use {nearest}")


def resolve_weights(path: str | Path, which: str = "best") -> Path:
    """A weights file from a file path or a run folder (``best``, ``last`` or ``best_ema`` weights;
    ``last`` of a ``sarvit pretrain`` run is its ``backbone.safetensors``, the evaluated backbone)."""
    if which not in RUN_WEIGHTS:
        raise ConfigError(f"which must be one of {', '.join(RUN_WEIGHTS)}; got {which!r}")
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise WeightsNotFound(f"no such file or run folder: {path}")
    if (path / STATE).is_file():  # a checkpoint folder (checkpoints/step-N, checkpoints/last): its own weights
        own = path / (EMA_WEIGHTS if which == "best_ema" else WEIGHTS)
        if own.is_file() and read_metadata(own).get("task") in ("dino", "mocov3"):
            raise WeightsNotFound(f"checkpoint {path} of a self-supervised pre-training holds the whole "
                                  f"{read_metadata(own)['task']} module (student, teacher, heads), not one model; "
                                  f"give its run folder ({path.parent.parent}: its backbone.safetensors), or "
                                  "`sarvit finetune --pretrained` this folder with --pretrained-which")
        if own.is_file():
            return own
        raise WeightsNotFound(f"checkpoint {path} holds no {own.name}; looked for: {own}")
    if which == "last" and RunFolder(path).backbone.is_file():  # a `sarvit pretrain` run: its latest backbone
        return RunFolder(path).backbone
    candidates = [path / name for name in RUN_WEIGHTS[which]]
    for c in candidates:
        if c.parent.name == "last" and c.parent.parent.name == "checkpoints":
            found = find_checkpoint(path).path  # an intact checkpoint: `last`, or the one before it
            if found is not None:
                return found / WEIGHTS
        elif c.is_file():
            return c
    raise WeightsNotFound(f"{path} holds no {which} weights; looked for: {', '.join(str(c) for c in candidates)}")


def load_model(
    path: str | Path, which: str = "best", device: str | torch.device = "cpu", img_size: int | None = None,
) -> tuple[nn.Module, dict]:
    """Rebuild a SAR model from weights sarvit saved (a ``.safetensors`` file or a run folder).

    Args:
        path: a ``.safetensors`` file or a run folder.
        which: ``best``, ``last`` or ``best_ema`` weights of a run folder.
        device: where the model goes.
        img_size: evaluate at this resolution instead of the training one: the position
            embeddings are resampled (bicubic, by timm) after the weights are loaded.

    Returns ``(model, metadata)``; ``metadata`` holds the model name, its arguments, the
    number of classes, the training resolution, the last-block layout and the training data.
    """
    weights = resolve_weights(path, which)
    meta = _read_sarvit_metadata(weights)
    model = create_model(
        meta["model"], meta["num_classes"], img_size=meta.get("img_size"), model_kwargs=meta.get("model_kwargs"),
        layout=meta.get("layout", "sar"), query=meta.get("query", "auto"),
    )
    try:
        state = load_weights(weights)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"cannot read the weights in {weights} ({err}); the file is damaged: copy it again "
                          "or load another one (e.g. --which last)") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"the weights in {weights} do not fit the model its metadata describes ({first}); "
                          "the file was changed after sarvit wrote it") from None
    if img_size is not None and img_size != meta.get("img_size"):
        _set_image_size(model, img_size)
    return model.to(device), meta


def _read_sarvit_metadata(weights: Path) -> dict[str, Any]:
    """The model description sarvit stores in a safetensors file, with errors that say what to do."""
    try:
        meta = read_metadata(weights)
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{weights} is not a readable safetensors file ({err}); it may be truncated or not "
                          "weights at all: copy it again, or point at the run folder or another file") from None
    if not isinstance(meta, dict) or not {"model", "num_classes"} <= meta.keys():
        raise ConfigError(
            f"{weights} was not written by sarvit (no model description in its metadata); "
            "create the model yourself and load_state_dict(safetensors.torch.load_file(path))"
        )
    return meta


def _set_image_size(model: nn.Module, img_size: int) -> None:
    """Resize the model's input to ``img_size``, resampling the position embeddings."""
    check_image_size(model, img_size)
    if not hasattr(model, "set_input_size"):
        raise ConfigError(f"{type(model).__name__} cannot change its input size; evaluate at the training size")
    model.set_input_size(img_size=(img_size, img_size))
