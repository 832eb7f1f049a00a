"""``attention_figure``: the attention of one or more checkpoints on the same images, as a PNG.

Images come from a folder of image files or from a dataset (a name ``sarvit train``
reads, an ImageFolder root, ``voc2012`` or an ``images/`` + ``masks/`` folder: ``count``
validation images evenly spaced over the split). Every image is resized to
``img_size x img_size`` without a crop, as in the Jaccard protocol, so the maps cover
the whole image; every checkpoint is resampled to that size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .figures import ModelMaps, plot_attention_figure
from .maps import attention_maps
from .models import load_analysis_model
from .protocol import check_options, resolve_device

__all__ = ["pick_images", "attention_figure"]


def _spread(n: int, count: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, min(count, n)).round()})


def pick_images(data: str | None = None, data_root: str | None = None, count: int = 4,
                image_dir: str | None = None) -> tuple[list, list[str]]:
    """``(PIL RGB images, captions)`` from ``image_dir`` (the first ``count`` files, sorted by
    name) or ``count`` evenly spaced validation images of ``data``."""
    from ..data.masks import IMAGE_SUFFIXES, open_masked
    from ..data.sources import load_image, open_dataset

    if count < 1:
        raise UserError(f"--images must be at least 1, got {count}")
    if image_dir is not None:
        folder = Path(image_dir).expanduser()
        if not folder.is_dir():
            raise UserError(f"--image-dir {folder} is not a folder")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise UserError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        files = files[:count]
        return [load_image(str(p)) for p in files], [p.name for p in files]
    if data is None:
        raise UserError("give the images: --image-dir DIR, or --data NAME_OR_FOLDER with --images N")
    masked = data == "voc2012" or (Path(data).expanduser() / "images").is_dir()
    if masked:
        dataset = open_masked(data, data_root)
        picked = [dataset[i] for i in _spread(len(dataset), count)]
        return [img for _, img, _ in picked], [stem for stem, _, _ in picked]
    raw = open_dataset(data, data_root, "val")
    picked = _spread(len(raw.dataset), count)
    return [raw.dataset[i][0] for i in picked], [raw.classes[int(raw.targets[i])] for i in picked]


def image_tensors(images: list, size: int, mean, std) -> tuple[torch.Tensor, np.ndarray]:
    """Normalised ``(B, 3, size, size)`` batch and the ``(B, size, size, 3)`` display images."""
    from torchvision.transforms import functional as TF

    shown = [TF.to_tensor(TF.resize(im, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True))
             for im in images]
    batch = torch.stack([TF.normalize(x, mean, std) for x in shown])  # (B, 3, S, S)
    return batch, torch.stack(shown).permute(0, 2, 3, 1).numpy()  # (B, S, S, 3)


def attention_figure(
    checkpoints: list[str],
    output: str | Path,
    *,
    data: str | None = None,
    data_root: str | None = None,
    count: int = 4,
    image_dir: str | None = None,
    img_size: int | None = None,
    which: str = "best",
    mass: float = 0.6,
    model_name: str | None = None,
    device: str = "auto",
) -> Path:
    """Write the figure of :mod:`.figures` for ``checkpoints`` on the chosen images to ``output``."""
    check_options(img_size=img_size, mass=mass, output=output)
    if not str(output).lower().endswith(".png"):
        raise UserError(f"--output {output} must be a .png file")
    images, captions = pick_images(data, data_root, count, image_dir)
    dev = resolve_device(device)
    size, groups = img_size, []
    for checkpoint in checkpoints:
        loaded = load_analysis_model(checkpoint, which=which, img_size=size, model_name=model_name, device=dev)
        size = loaded.img_size  # the first checkpoint's size holds for all
        x, shown = image_tensors(images, size, loaded.mean, loaded.std)
        maps = attention_maps(loaded.model, x.to(dev))
        groups.append(ModelMaps(
            name=loaded.name, attn=maps.attn.cpu().numpy(), mass=maps.mass_mask(mass).cpu().numpy(),
            components=maps.components.cpu().numpy(), entropy=maps.entropy.cpu().numpy(), mass_fraction=mass,
        ))
    plot_attention_figure(shown, groups, output, captions, title=f"Last block at {size}x{size}, per head: "
                          f"[CLS] (or mean-query) attention (post-softmax), its {mass:.0%}-mass mask and components "
                          "of ReLU(S - mean)")
    return Path(output)
