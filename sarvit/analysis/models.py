"""The models analysis reads: sarvit runs or weight files of every family, at any input size
the family can take, or bare weights of a named architecture.

``load_analysis_model(checkpoint, img_size=480)`` loads the weights, resamples the
position embeddings (and Swin's windows) to the requested input size, and returns the
model with what is needed to feed it: its normalisation and its key-grid stride, the
pixels per cell of the grid the attention maps lie on (the patch size of a ViT; 32 for
PVT, CvT and Swin at 224). Weights that sarvit did not write (a ``state_dict`` in
``.safetensors``, ``.pth`` or ``.bin``) load with ``model_name``: a timm name (the
architectures sarvit registers with timm included) or ``torchvision:<name>``; their
last block stays standard.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, UserError

__all__ = ["AnalysisModel", "load_analysis_model", "run_name", "native_size", "resize_input"]

_RUN_FILES = ("best.safetensors", "best_ema.safetensors")


@dataclass
class AnalysisModel:
    """A loaded model in eval mode and how to feed it."""

    model: nn.Module
    name: str  # the run's folder name (or the file's stem)
    stride: int  # pixels per cell of the key grid the attention maps lie on, at img_size
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


def _match_grid(model: nn.Module, pos_embed: torch.Tensor | None) -> int | None:
    """The square input size a ViT-like model's saved position embeddings were made for
    (``None`` when they say nothing: no ``pos_embed``, or a non-square grid)."""
    embed = getattr(model, "patch_embed", None)
    if pos_embed is None or getattr(model, "pos_embed", None) is None or not hasattr(embed, "num_patches"):
        return None
    prefix = model.pos_embed.shape[1] - embed.num_patches  # prefix tokens with a position
    side = round((pos_embed.shape[1] - prefix) ** 0.5)
    return side * int(embed.patch_size[0]) if side * side == pos_embed.shape[1] - prefix else None


def _torchvision_grid(model: nn.Module, pos_embedding: torch.Tensor | None) -> int | None:
    """The square input size of torchvision ViT position embeddings ``(1, 1 + side**2, C)``."""
    if pos_embedding is None:
        return None
    side = round((pos_embedding.shape[1] - 1) ** 0.5)
    return side * model.patch_size if side * side == pos_embedding.shape[1] - 1 else None


def native_size(model: nn.Module) -> int:
    """The square input size ``model`` is set to (its default for models that take any size)."""
    for size in (getattr(model, "image_size", None), getattr(getattr(model, "patch_embed", None), "img_size", None),
                 getattr(model, "img_size", None)):
        if size is not None:
            return int(size if isinstance(size, int) else size[0])
    return int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state


def _classifier_key(model: nn.Module) -> str:
    """The name of the classifier's weight: ``head.weight`` (timm ViT), ``head.fc.weight`` (Swin),
    ``heads.head.weight`` (torchvision)."""
    if hasattr(model, "heads"):
        return "heads.head.weight"
    return f"{getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')}.weight"


def _bare_weights(path: Path, model_name: str | None) -> tuple[nn.Module, int]:
    """A plain model (its last block standard) from a bare ``state_dict`` file, and the input
    size its position embeddings were made for."""
    from ..factory import TORCHVISION, create_model
    from ..surgery import detach

    if model_name is None:
        raise UserError(
            f"{path} was not written by sarvit (no model description inside); pass --model with its architecture, "
            "e.g. --model vit_small_patch16_224, --model pvt_small or --model torchvision:vit_b_16"
        )
    if not model_name.startswith(TORCHVISION):
        import timm

        if not timm.is_model(model_name):
            raise UserError(f"unknown timm model {model_name!r}; `timm.list_models('vit_*')` lists the names "
                            "(sarvit adds t2t_vit_14, pvt_small, cvt_13)")
    state = _read_state(path)
    with torch.device("meta"):  # the family, the classifier's name and the patch size; no memory
        default = create_model(model_name, 1000, layout="standard")
    head = state.get(_classifier_key(default))
    num_classes = head.shape[0] if head is not None else (1000 if model_name.startswith(TORCHVISION) else 0)
    size = _torchvision_grid(default, state.get("encoder.pos_embedding")) if model_name.startswith(TORCHVISION) \
        else _match_grid(default, state.get("pos_embed"))
    model = detach(create_model(model_name, num_classes, img_size=size, layout="standard"))
    fix = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)  # the family's key renaming
    try:
        state = fix(state, model) if fix is not None else state
        model.load_state_dict(state, strict=head is not None)
    except (RuntimeError, KeyError, ValueError) as err:
        raise UserError(f"{path} does not hold {model_name} weights: {_first_problem(err)}; pass the --model "
                        "these weights were saved from") from err
    return model, size or native_size(model)


def _first_problem(err: Exception, limit: int = 240) -> str:
    """The first line of a ``load_state_dict`` error that names a tensor (not its header line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    line = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
    line = line.rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def resize_input(model: nn.Module, size: int) -> None:
    """Set ``model`` to ``size x size`` inputs: position embeddings resampled (bicubic), Swin's
    windows scaled with the grid; PVT v2 takes any size as it is. Sizes a family cannot take
    raise :class:`~sarvit.errors.ConfigError` (e.g. PVT's multiples of 32)."""
    if getattr(model, "image_size", None) is not None and hasattr(model, "encoder"):  # torchvision's ViT
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(size, model.patch_size, {"encoder.pos_embedding": model.encoder.pos_embedding})
        model.encoder.pos_embedding = nn.Parameter(state["encoder.pos_embedding"])
        model.image_size, model.seq_length = size, state["encoder.pos_embedding"].shape[1]
    elif hasattr(model, "set_input_size"):
        model.set_input_size(img_size=(size, size))


def _key_stride(model: nn.Module, size: int, device) -> int:
    """Pixels per key-grid cell at ``size``, measured on one blank image: every family's own
    rule (Swin's one window, PVT's strides, the key grid tiling the image) speaks before any data is read."""
    from .maps import attention_maps

    return attention_maps(model, torch.zeros(1, 3, size, size, device=device)).stride


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
        img_size: square input size; a size the family can take whose key grid tiles it.
        model_name: the architecture (timm name or ``torchvision:<name>``), only for weights
            sarvit did not write.
    """
    from ..checkpoint import read_metadata
    from ..data.pipeline import DATASET_STATS, IMAGENET_STATS
    from ..factory import check_image_size, load_model, resolve_weights

    weights = resolve_weights(checkpoint, which)
    meta = read_metadata(weights) if weights.suffix == ".safetensors" else {}
    if "model" in meta:
        model, meta = load_model(weights)
        native = int(meta.get("img_size") or native_size(model))
    else:
        (model, native), meta = _bare_weights(weights, model_name), {}
    size = img_size or native
    try:
        check_image_size(model, size)
        if size != native:
            resize_input(model, size)
    except ConfigError as err:
        raise UserError(f"--img-size {size}: {err}") from None
    model = model.to(device).eval()
    stride = _key_stride(model, size, device)
    mean, std = DATASET_STATS.get(meta.get("data"), IMAGENET_STATS)
    return AnalysisModel(model, run_name(checkpoint), stride, size, tuple(mean), tuple(std))
