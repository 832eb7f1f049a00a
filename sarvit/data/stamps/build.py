"""Build the stamps benchmark into a folder: options, composition loop, files, atomic publish.

Everything random is drawn from ``numpy.random.default_rng`` seeded by ``(seed, purpose,
split, class, index)``, so every image depends only on the seed and its own name: the
same seed gives the same bytes, whatever the order of work.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...config import ConfigError
from ...errors import UserError
from ...runs import fsync_dir
from ..sources import DatasetNotFound
from .backgrounds import load_backgrounds, random_crop
from .catalog import CLASSES, Stamp, find_stamps, split_by_object
from .coco import annotation
from .compose import compose, instance_mask, semantic_mask

__all__ = ["build_stamps", "StampsSummary", "StampsNotFound", "StampsWriteError", "DEFAULT_STAMPS_DIR", "SPLITS"]

DEFAULT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
PACKAGE = "tuxpaint-stamps-default"
SPLITS = ("train", "val")
LIMITS = {"seed": (0, 2**32 - 1), "size": (32, 1024), "train_per_class": (1, 100_000), "val_per_class": (1, 100_000)}


class StampsNotFound(DatasetNotFound):
    """The Tux Paint stamps are missing, or too few of them are photographs of a class."""


class StampsWriteError(UserError, OSError):
    """Writing the dataset failed (disk full, permissions); nothing was left under the output name."""


@dataclass
class StampsSummary:
    """What a build wrote: per class and split, the stamps used and the number of images."""

    output: Path
    seed: int
    size: int
    stamps_dir: Path
    classes: list[str]
    objects: dict[str, list[list[str]]]  # split -> per class -> stamp names
    images: dict[str, list[int]]  # split -> per class -> image count
    seconds: float = 0.0
    package_version: str = "unknown"
    command: str = ""

    def text(self) -> str:
        lines = [f"stamps benchmark -> {self.output} (seed {self.seed}, {self.size}x{self.size} px, {self.seconds:.1f} s)"]
        lines.append(f"{'class':12s} {'id':>3s} {'train obj':>9s} {'val obj':>7s} {'train img':>9s} {'val img':>7s}")
        for i, name in enumerate(self.classes):
            lines.append(
                f"{name:12s} {i + 1:3d} {len(self.objects['train'][i]):9d} {len(self.objects['val'][i]):7d} "
                f"{self.images['train'][i]:9d} {self.images['val'][i]:7d}"
            )
        lines.append(
            f"train/ val/ (ImageFolder), images/ + masks/ (val, class ids, 255 void), train_masks/ (train), "
            f"annotations.json (COCO, both splits), README.md in {self.output}"
        )
        return "\n".join(lines)


def _check_options(output: Path, **values: int) -> None:
    for name, value in values.items():
        lo, hi = LIMITS[name]
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise ConfigError(f"{flag} must be an integer in [{lo}, {hi}], got {value!r}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(
            f"--output {output} already exists and is not an empty folder; sarvit never overwrites a dataset. "
            "Choose a new folder, or delete this one yourself"
        )


def _catalog(stamps_dir: Path, seed: int) -> dict[str, list[list[Stamp]]]:
    if not stamps_dir.is_dir():
        raise StampsNotFound(
            f"Tux Paint stamps not found at {stamps_dir}. Install the Debian package {PACKAGE} "
            f"(scripts/install-system-deps.sh does, as `make setup` runs it): "
            f"`sudo apt-get install {PACKAGE}`, or give --stamps-dir DIR"
        )
    stamps = find_stamps(stamps_dir)
    split = split_by_object(stamps, seed, len(CLASSES))
    short = [
        f"{c.name} ({len(split['train'][i])} train, {len(split['val'][i])} val)"
        for i, c in enumerate(CLASSES) if len(split["train"][i]) < 2 or not split["val"][i]
    ]
    if short:
        raise StampsNotFound(
            f"{stamps_dir} holds too few photographic stamps for: {', '.join(short)}; every class needs 3 object "
            f"groups (2 train, 1 val) under {', '.join(f for c in CLASSES for f in c.folders)}. "
            f"Use the stamps of the Debian package {PACKAGE} ({DEFAULT_STAMPS_DIR})"
        )
    return split


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=3)  # 2.5x faster than 6, 4% larger
    return buffer.getvalue()


def _load_rgba(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))


def _write_split(root: Path, split: str, objects: list[list[Stamp]], per_class: int, seed: int, size: int,
                 backgrounds: list[np.ndarray], cache: dict[Path, np.ndarray], first_id: int) -> tuple[list, list]:
    """Compose and write one split; returns its COCO image and annotation records."""
    split_id = SPLITS.index(split)
    images, annotations = [], []
    for label, cls in enumerate(CLASSES):
        folder = root / split / cls.name
        folder.mkdir(parents=True)
        order = np.random.default_rng([seed, 3, split_id, label]).permutation(len(objects[label]))
        for i in range(per_class):
            stamp = objects[label][order[i % len(order)]]
            rng = np.random.default_rng([seed, 2, split_id, label, i])
            background = random_crop(backgrounds[int(rng.integers(len(backgrounds)))], size, rng)
            if stamp.path not in cache:
                cache[stamp.path] = _load_rgba(stamp.path)
            composite = compose(background, cache[stamp.path], rng)
            stem = f"{cls.name}_{i:05d}"
            encoded = _png(composite.image)
            (folder / f"{stem}.png").write_bytes(encoded)
            mask = _png(semantic_mask(composite.alpha, label + 1))
            if split == "val":
                (root / "images" / f"{stem}.png").write_bytes(encoded)
                (root / "masks" / f"{stem}.png").write_bytes(mask)
            else:  # the training masks of `sarvit segment --data masks:DIR` (images: train/<class>/)
                (root / "train_masks" / f"{stem}.png").write_bytes(mask)
            image_id = first_id + len(images)
            images.append({"id": image_id, "file_name": f"{split}/{cls.name}/{stem}.png", "width": size,
                           "height": size, "split": split, "license": 1})
            annotations.append(annotation(image_id, image_id, label + 1, instance_mask(composite.alpha), stamp.name))
    return images, annotations


def _coco(images: list, annotations: list, summary: StampsSummary) -> dict:
    return {
        "info": {"description": "sarvit stamps benchmark: Tux Paint photographic cut-outs on real backgrounds",
                 "seed": summary.seed, "size": summary.size, "source": f"Debian package {PACKAGE} {summary.package_version}"},
        "licenses": [{"id": 1, "name": "GPL-2.0-or-later", "url": "https://www.gnu.org/licenses/old-licenses/gpl-2.0.html"}],
        "categories": [{"id": i + 1, "name": c.name, "supercategory": c.supercategory} for i, c in enumerate(CLASSES)],
        "images": images,
        "annotations": annotations,
    }


def _package_version(stamps_dir: Path) -> str:
    import gzip

    changelog = Path("/usr/share/doc") / PACKAGE / "changelog.Debian.gz"
    if stamps_dir != DEFAULT_STAMPS_DIR or not changelog.is_file():
        return "unknown"
    with gzip.open(changelog, "rt") as f:
        first = f.readline()
    return first.split("(", 1)[1].split(")", 1)[0] if "(" in first else "unknown"


def _sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, so that the rename publishes complete files."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def _publish(tmp: Path, output: Path) -> None:
    """Rename the finished folder onto ``output`` (an absent or empty folder), atomically."""
    try:
        os.rename(tmp, output)
    except OSError as err:
        raise ConfigError(
            f"--output {output} was filled by something else during the build ({err.strerror}); "
            "nothing was overwritten. Choose a new folder"
        ) from err


def _command(output: Path, seed: int, size: int, train_per_class: int, val_per_class: int, stamps_dir: Path) -> str:
    return (f"sarvit data stamps --output {output.name} --seed {seed} --size {size} --train-per-class "
            f"{train_per_class} --val-per-class {val_per_class} --stamps-dir {stamps_dir}")


def _write_dataset(root: Path, split: dict[str, list[list[Stamp]]], summary: StampsSummary) -> None:
    """Every file of the dataset, into ``root`` (an empty folder)."""
    from .readme import render_readme

    backgrounds = load_backgrounds()
    (root / "images").mkdir()
    (root / "masks").mkdir()
    (root / "train_masks").mkdir()
    cache: dict[Path, np.ndarray] = {}
    images, annotations = [], []
    for name in SPLITS:
        per_class = summary.images[name][0]
        imgs, anns = _write_split(root, name, split[name], per_class, summary.seed, summary.size, backgrounds, cache,
                                  len(images) + 1)
        images += imgs
        annotations += anns
    (root / "annotations.json").write_text(json.dumps(_coco(images, annotations, summary), separators=(",", ":")))
    (root / "classes.txt").write_text("\n".join(["background", *summary.classes]) + "\n")
    (root / "README.md").write_text(render_readme(summary))


def _write_atomically(output: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a hidden sibling ``.<name>.partial-<pid>``, then rename it onto ``output``.

    A failure or an interruption removes the sibling; a killed process may leave it (under
    its hidden name, never under ``output``), and it can be deleted.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
        write(tmp)
        _sync_tree(tmp)
        _publish(tmp, output)
    except OSError as err:
        if isinstance(err, UserError):
            raise
        raise StampsWriteError(
            f"writing the dataset failed ({err}); nothing was left under {output}. Free disk space or fix "
            "the folder's permissions, then run again"
        ) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_stamps(output: str | Path, seed: int = 0, size: int = 224, train_per_class: int = 100,
                 val_per_class: int = 30, stamps_dir: str | Path = DEFAULT_STAMPS_DIR) -> StampsSummary:
    """Build the masked stamps benchmark into ``output`` (which must be absent or empty).

    The dataset is built in a hidden sibling folder and renamed onto ``output`` at the
    end: an interrupted build leaves nothing under ``output``.

    Args:
        output: the dataset folder to create.
        seed: chooses the split by object, the objects, backgrounds, crops, scales, flips,
            jitter and positions.
        size: side of the square images, in pixels.
        train_per_class, val_per_class: images per class in each split.
        stamps_dir: the Tux Paint stamps (Debian package ``tuxpaint-stamps-default``).
    """
    start = time.perf_counter()
    output, stamps_dir = Path(os.path.abspath(Path(output).expanduser())), Path(stamps_dir).expanduser()
    _check_options(output, seed=seed, size=size, train_per_class=train_per_class, val_per_class=val_per_class)
    split = _catalog(stamps_dir, seed)
    counts = {"train": train_per_class, "val": val_per_class}
    summary = StampsSummary(
        output=output, seed=seed, size=size, stamps_dir=stamps_dir, classes=[c.name for c in CLASSES],
        objects={s: [[st.name for st in per] for per in split[s]] for s in SPLITS},
        images={s: [counts[s]] * len(CLASSES) for s in SPLITS}, package_version=_package_version(stamps_dir),
        command=_command(output, seed, size, train_per_class, val_per_class, stamps_dir),
    )
    _write_atomically(output, lambda tmp: _write_dataset(tmp, split, summary))
    summary.seconds = time.perf_counter() - start
    return summary
