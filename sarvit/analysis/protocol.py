"""Table 11 over a dataset: ``run_jaccard(checkpoint, data)`` scores a model against object masks.

Every image and its mask are resized to ``img_size x img_size`` without a crop (the
image bilinear and antialiased, torchvision's ``Resize((480, 480))`` of the published
script; the mask nearest), normalised with the statistics the model was trained with,
and the model's position embeddings are resampled to that size. Masks go down to the
key grid by its stride (image size / key grid side), whatever the model family. The per-image scores
come from :func:`~.scoring.object_ious`; they go to a CSV file, written atomically.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..errors import UserError
from .maps import attention_maps
from .models import AnalysisModel, load_analysis_model
from .scoring import ImageScore, JaccardSummary, object_ious, summarise

__all__ = [
    "prepare_pair", "score_dataset", "write_scores", "run_jaccard", "resolve_device", "check_options", "default_output",
]


def resolve_device(name: str) -> torch.device:
    """``auto | cpu | cuda | cuda:N | mps`` -> the device; a ConfigError names those this machine has."""
    from ..distributed import pick_device

    return pick_device(name, 0)


def prepare_pair(image, mask: np.ndarray, size: int, mean, std) -> tuple[torch.Tensor, np.ndarray]:
    """PIL image + ``(H, W)`` mask -> normalised ``(3, size, size)`` tensor and ``(size, size)`` mask."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    x = TF.to_tensor(TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True))
    x = TF.normalize(x, mean, std)  # (3, size, size)
    resized = Image.fromarray(mask.astype(np.int32)).resize((size, size), Image.NEAREST)
    return x, np.array(resized).astype(np.int64)


def check_options(*, img_size: int | None = None, mass: float = 0.6, batch_size: int = 1, workers: int = 0,
                  output: str | Path | None = None) -> None:
    """Range checks of the options, before anything is loaded."""
    problems = []
    if img_size is not None and img_size < 1:
        problems.append(f"--img-size must be a positive number of pixels, got {img_size}")
    if not 0.0 < mass <= 1.0:
        problems.append(f"--mass must be in (0, 1], the fraction of attention kept, got {mass}")
    if batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        problems.append(f"--workers must be 0 or more, got {workers}")
    if output is not None and not Path(output).expanduser().resolve().parent.is_dir():
        problems.append(f"the folder of --output {output} does not exist; create it first")
    if problems:
        raise UserError("; ".join(problems))


def default_output(checkpoint: str | Path, data: str, img_size: int, void_fix: bool) -> Path:
    """``jaccard-<data>-<size>[-voidfix].csv`` in the run folder (or beside the weights file)."""
    folder = Path(checkpoint)
    folder = folder if folder.is_dir() else folder.parent
    name = Path(data).expanduser().resolve().name if data != "voc2012" else data
    return folder / f"jaccard-{name}-{img_size}{'-voidfix' if void_fix else ''}.csv"


def _collate(batch):
    return batch


def score_dataset(
    loaded: AnalysisModel,
    dataset,
    *,
    void_fix: bool = False,
    mass: float = 0.6,
    batch_size: int = 16,
    workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[ImageScore]:
    """Per-image scores of ``loaded.model`` on ``dataset`` (items ``(stem, PIL image, mask)``)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate)
    scores = []
    for batch in tqdm(loader, desc="jaccard", unit="batch", disable=not (progress and sys.stderr.isatty())):
        pairs = [prepare_pair(img, msk, loaded.img_size, loaded.mean, loaded.std) for _, img, msk in batch]
        x = torch.stack([p[0] for p in pairs]).to(device)  # (B, 3, S, S)
        attn = attention_maps(loaded.model, x).attn.cpu()  # (B, heads, h, w)
        for (stem, _, _), (_, mask), a in zip(batch, pairs, attn):
            scores.append(ImageScore(stem, object_ious(a, mask, loaded.stride, mass, void_fix)))
    return scores


def write_scores(path: str | Path, scores: list[ImageScore], class_names: dict[int, str] | None = None) -> Path:
    """One CSV row per image: stem, number of objects, the IoU of each class (empty where the
    class is absent), the image's mean (empty for an image without objects)."""
    names = class_names or {}
    ids = sorted({c for s in scores for c in s.ious})
    header = ["stem", "objects", *(f"iou_{names.get(c, c)}" for c in ids), "mean"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(header)
            for s in scores:
                ious = [f"{s.ious[c]:.6f}" if c in s.ious else "" for c in ids]
                out.writerow([s.stem, len(s.ious), *ious, "" if math.isnan(s.mean) else f"{s.mean:.6f}"])

    return atomic_write(path, write)


def run_jaccard(
    checkpoint: str | Path,
    data: str,
    *,
    data_root: str | None = None,
    img_size: int = 480,
    void_fix: bool = False,
    mass: float = 0.6,
    which: str = "best",
    output: str | Path | None = None,
    batch_size: int = 16,
    workers: int = 0,
    device: str = "auto",
    model_name: str | None = None,
    progress: bool = True,
) -> tuple[JaccardSummary, list[ImageScore]]:
    """Load a checkpoint, score it on a masked dataset, write the per-image CSV to ``output``."""
    from ..data.masks import open_masked

    check_options(img_size=img_size, mass=mass, batch_size=batch_size, workers=workers, output=output)
    dataset = open_masked(data, data_root)
    dev = resolve_device(device)
    loaded = load_analysis_model(checkpoint, which=which, img_size=img_size, model_name=model_name, device=dev)
    scores = score_dataset(loaded, dataset, void_fix=void_fix, mass=mass, batch_size=batch_size, workers=workers,
                           device=dev, progress=progress)
    if output is not None:
        write_scores(output, scores, dataset.class_names)
    return summarise(scores, void_fix), scores
