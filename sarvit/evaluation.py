"""``evaluate_checkpoint``: accuracy and attention statistics of saved weights on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError
from .data import SeededTransform, build_loader, build_transform, open_dataset, stratified_subset
from .data.classes import check_same_classes, class_counts, recorded_names
from .distributed import init_distributed, shutdown
from .engine import evaluate, resolve_amp
from .factory import load_model, resolve_weights
from .runs import RunFolder, run_folder_of

__all__ = ["evaluate_checkpoint"]


def _run_config(weights: Path) -> dict[str, Any]:
    """The training config.yaml of the run the weights belong to, if it is at hand."""
    return RunFolder(run_folder_of(weights)).read_config("restore it, or pass --data and --img-size")


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    which: str = "best",
    data: str | None = None,
    data_root: str | None = None,
    img_size: int | None = None,
    crop_pct: float | None = None,
    batch_size: int = 256,
    workers: int = 4,
    device: str = "auto",
    amp: str = "auto",
    per_head: bool = False,
    val_per_class: int | None = None,
) -> dict[str, Any]:
    """Top-1/top-5, CE, mean spatial entropy and components per head on a validation split.

    The dataset, resolution and crop default to those the weights were trained with.
    Under ``torchrun`` the evaluation is sharded over the processes. ``per_head`` adds the
    mean entropy and component count of each head (``se_heads``, ``components_heads``).
    ``val_per_class``: score only the fixed stratified subset of N images a class that
    training validates on with the same option (default: every image).
    """
    dist = init_distributed(device)
    try:
        weights = resolve_weights(checkpoint, which)
        model, meta = load_model(weights, device=dist.device, img_size=img_size)
        run = _run_config(weights)
        data = data or meta.get("data") or run.get("data")
        if data is None:
            raise ConfigError(f"{weights} does not say which data it was trained on; pass --data")
        raw = open_dataset(data, data_root or run.get("data_root"), "val")
        if raw.classes and raw.num_classes != meta["num_classes"]:
            raise ConfigError(
                f"the model has {meta['num_classes']} classes but {data} has {raw.num_classes}; "
                "evaluate on the dataset the model was trained for"
            )
        class_counts(raw.targets, meta["num_classes"], f"the val split of {data}")  # labels the model can output
        check_same_classes(recorded_names(meta.get("classes")), raw.classes, "the checkpoint", data,
                           "Evaluate on the dataset the model was trained for (--data).")
        size = img_size or meta.get("img_size") or 224
        # normalised as in training: the statistics of the data the model was trained on, not of --data
        stats_of = meta.get("data") or run.get("data") or data
        transform = build_transform(stats_of, size, False, interpolation=run.get("interpolation", "bicubic"),
                                    crop_pct=crop_pct or run.get("crop_pct", 0.875))
        indices = None
        if val_per_class is not None:  # the subset training validated on (seed 0, as in training)
            indices = stratified_subset(raw.targets, per_class=val_per_class, seed=0, option="val_per_class")
        loader, sampler = build_loader(SeededTransform(raw.dataset, transform, 0, indices), batch_size, train=False,
                                       seed=0, rank=dist.rank, world=dist.world, workers=workers,
                                       pin_memory=dist.device.type == "cuda")
        metrics = evaluate(model, loader, dist, resolve_amp(amp, dist.device), desc=f"eval {data}", per_head=per_head)
        return {"weights": str(weights), "data": data, **metrics}
    finally:
        shutdown()
