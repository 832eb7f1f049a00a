"""The models analysis reads: sarvit runs or weight files at any input size, or plain timm weights.

``load_analysis_model(checkpoint, img_size=480)`` loads the weights, resamples the
position embeddings to the requested input size (timm's ``set_input_size``), and
returns the model with what is needed to feed it: its normalisation and patch size.
Weights that sarvit did not write (a timm ``state_dict`` in ``.safetensors``, ``.pth`` or
``.bin``) load with ``model_name``, the timm architecture; their last block stays standard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

__all__ = ["AnalysisModel", "load_analysis_model", "run_name"]

_RUN_FILES = ("best.safetensors", "best_ema.safetensors")


@dataclass
class AnalysisModel:
    """A loaded model in eval mode and how to feed it."""

    model: nn.Module
    name: str  # the run's folder name (or the file's stem)
    patch_size: int
    img_size: int  # the input size it is set to now
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def run_name(checkpoint: str | Path) -> str:
    """The run folder's name for a run folder or its weights, else the file's stem."""
    path = Path(checkpoint).resolve()
    if path.is_dir():
        return path.name
    if path.name in _RUN_FILES:
        return path.parent.name
    if path.parent.parent.name == "checkpoints":  # run/checkpoints/step-N/model.safetensors
        return path.parent.parent.parent.name
    return path.stem


def _match_grid(model: nn.Module, pos_embed: torch.Tensor | None) -> None:
    """Set a timm ViT to the square input size its saved position embeddings were made for."""
    if pos_embed is None or getattr(model, "pos_embed", None) is None:
        return
    prefix = model.pos_embed.shape[1] - model.patch_embed.num_patches  # prefix tokens with a position
    side = round((pos_embed.shape[1] - prefix) ** 0.5)
    if side * side == pos_embed.shape[1] - prefix and (side, side) != tuple(model.patch_embed.grid_size):
        model.set_input_size(img_size=side * int(model.patch_embed.patch_size[0]))


def _plain_timm(path: Path, model_name: str | None) -> tuple[nn.Module, dict]:
    """A timm model from a bare ``state_dict`` file."""
    import timm

    if model_name is None:
        raise UserError(
            f"{path} was not written by sarvit (no model description inside); pass --model with its timm "
            "architecture, e.g. --model vit_small_patch16_224"
        )
    if not timm.is_model(model_name):
        raise UserError(f"unknown timm model {model_name!r}; `timm.list_models('vit_*')` lists the names")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    head = state.get("head.weight")
    model = timm.create_model(model_name, pretrained=False, num_classes=0 if head is None else head.shape[0])
    if not isinstance(model, VisionTransformer):
        raise UserError(f"{model_name} is not a timm VisionTransformer; attention maps need a ViT/DeiT model")
    _match_grid(model, state.get("pos_embed"))
    try:
        state = checkpoint_filter_fn(state, model)  # a non-square saved grid is resampled
        model.load_state_dict(state, strict=head is not None)
    except RuntimeError as err:
        raise UserError(f"{path} does not hold {model_name} weights: {_first_problem(err)}; pass the --model "
                        "these weights were saved from") from err
    return model, {}


def _first_problem(err: Exception, limit: int = 240) -> str:
    """The first line of a ``load_state_dict`` error that names a tensor (not its header line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    line = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
    line = line.rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load_analysis_model(
    checkpoint: str | Path,
    *,
    which: str = "best",
    img_size: int | None = None,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
) -> AnalysisModel:
    """Load weights for analysis and set the model to ``img_size`` (default: its training size).

    Args:
        checkpoint: a run folder or a weights file.
        which: ``best``, ``last`` or ``best_ema`` weights of a run folder.
        img_size: square input size; must be a multiple of the patch size.
        model_name: timm architecture, only for weights sarvit did not write.
    """
    from ..checkpoint import read_metadata
    from ..data.pipeline import DATASET_STATS, IMAGENET_STATS
    from ..factory import load_model, resolve_weights

    weights = resolve_weights(checkpoint, which)
    meta = read_metadata(weights) if weights.suffix == ".safetensors" else {}
    if "model" in meta:
        model, meta = load_model(weights)
    else:
        model, meta = _plain_timm(weights, model_name)
    patch = int(model.patch_embed.patch_size[0])
    size = img_size or int(model.patch_embed.img_size[0])
    if size <= 0 or size % patch:
        lower = max(patch, size // patch * patch)
        raise UserError(f"--img-size {size} is not a multiple of the patch size {patch}; "
                        f"use {lower} or {lower + patch}")
    if tuple(model.patch_embed.img_size) != (size, size):
        model.set_input_size(img_size=size)  # resamples the position embeddings
    mean, std = DATASET_STATS.get(meta.get("data"), IMAGENET_STATS)
    return AnalysisModel(model.to(device).eval(), run_name(checkpoint), patch, size, tuple(mean), tuple(std))
