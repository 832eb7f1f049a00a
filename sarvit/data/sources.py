"""Find and open the raw image-classification datasets, by name or as an ImageFolder root.

``open_dataset(name, root, split)`` returns a torchvision dataset of ``(PIL.Image RGB,
int)`` samples (no transform yet), its targets and its class names. Where a dataset is
absent, ``DatasetNotFound`` says every place that was looked at and how to get it.

Names: ``cifar10``, ``cifar100``, ``flowers102``, ``oxford_pets``, ``stanford_cars``,
``imagenet``, ``imagenet100`` (the CMC class list, a subset of an ImageNet folder),
``fashion_mnist`` (read offline from the Debian package ``dataset-fashion-mnist``), or a
path to a folder with ``train/`` and ``val/`` class sub-folders.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import ConfigError, UserError

__all__ = ["DatasetNotFound", "UnreadableImage", "RawDataset", "open_dataset", "DATASETS", "dataset_targets"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


class DatasetNotFound(UserError, FileNotFoundError):
    """A dataset is not where sarvit looked; the message lists the places and the remedy."""


class UnreadableImage(UserError, ValueError):
    """An image file that cannot be decoded; the message names the file."""


def load_image(path: str):
    """ImageFolder's loader, with an error that names the file and the way out."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(
            f"cannot read image {path} ({type(err).__name__}: {err}). Remove or replace the file (an "
            "interrupted `sarvit train` then continues from its last checkpoint with --resume auto)"
        ) from err


@dataclass
class RawDataset:
    """An untransformed dataset: ``dataset[i] -> (PIL RGB image, class index)``."""

    dataset: Dataset
    targets: np.ndarray  # (N,) int64
    classes: list[str]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class _RGB(Dataset):
    """Converts the images of a dataset to RGB (Fashion-MNIST is grayscale)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return image.convert("RGB"), target


def data_home() -> Path:
    """``$SARVIT_DATA``, else ``~/.cache/sarvit`` (also where decompressed copies go)."""
    env = os.environ.get("SARVIT_DATA")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "sarvit"


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """The class index of every sample, read without decoding any image."""
    for attr in ("targets", "_labels"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr), dtype=np.int64)
    if hasattr(dataset, "_samples"):  # StanfordCars
        return np.asarray([t for _, t in dataset._samples], dtype=np.int64)
    if hasattr(dataset, "samples"):
        return np.asarray([t for _, t in dataset.samples], dtype=np.int64)
    raise TypeError(f"cannot read the targets of {type(dataset).__name__} without loading every sample")


def _candidates(name: str, root: str | None) -> list[Path]:
    if root is not None:
        return [Path(root).expanduser()]
    return [data_home() / name, Path("data") / name]


def _not_found(name: str, looked: list[Path], how: str) -> DatasetNotFound:
    places = "\n".join(f"  - {p}" for p in looked)
    return DatasetNotFound(f"dataset {name!r} not found. Looked in:\n{places}\n{how}")


def _torchvision(name: str, root: str | None, split: str, download: bool) -> RawDataset:
    from torchvision import datasets as tv

    train = split == "train"
    makers = {
        "cifar10": lambda r, d: tv.CIFAR10(r, train=train, download=d),
        "cifar100": lambda r, d: tv.CIFAR100(r, train=train, download=d),
        "flowers102": lambda r, d: tv.Flowers102(r, split="train" if train else "test", download=d),
        "oxford_pets": lambda r, d: tv.OxfordIIITPet(r, split="trainval" if train else "test", download=d),
        "stanford_cars": lambda r, d: tv.StanfordCars(r, split="train" if train else "test", download=d),
    }
    looked = _candidates(name, root)
    for path in looked:
        try:
            ds = makers[name](str(path), False)
        except (RuntimeError, FileNotFoundError):
            continue
        return RawDataset(_RGB(ds), dataset_targets(ds), list(getattr(ds, "classes", [])), f"{name} ({split}) at {path}")
    if download:
        path = looked[0]
        path.mkdir(parents=True, exist_ok=True)
        ds = makers[name](str(path), True)
        return RawDataset(_RGB(ds), dataset_targets(ds), list(getattr(ds, "classes", [])), f"{name} ({split}) at {path}")
    how = (
        f"Put torchvision's layout for {name} in one of these folders (--data-root DIR), "
        "or add --download to let torchvision fetch it where the network allows."
    )
    if name == "stanford_cars":
        how = "Stanford Cars has no working download; place torchvision's layout in --data-root DIR."
    raise _not_found(name, looked, how)


def _fashion_mnist(root: str | None, split: str) -> RawDataset:
    from torchvision import datasets as tv

    looked = [Path(root).expanduser()] if root else [data_home() / "fashion_mnist", DEBIAN_FASHION_MNIST]
    for path in looked:
        raw = _fashion_mnist_raw(path)
        if raw is None:
            continue
        ds = tv.FashionMNIST(str(raw.parent.parent), train=split == "train", download=False)
        return RawDataset(_RGB(ds), dataset_targets(ds), list(ds.classes), f"fashion_mnist ({split}) from {path}")
    raise _not_found(
        "fashion_mnist", looked,
        "Install the Debian package: `apt-get install dataset-fashion-mnist` (make test and make demo do), "
        "or give a folder holding the four IDX files (.gz or not) with --data-root DIR.",
    )


def _fashion_mnist_raw(path: Path) -> Path | None:
    """torchvision's ``FashionMNIST/raw`` folder for the IDX files at ``path``, or None.

    Files in torchvision's layout are used where they are; plain or gzipped IDX files
    (the Debian package's) are decompressed once into the data home.
    """
    layout = path / "FashionMNIST" / "raw"
    if all((layout / f).is_file() for f in FASHION_MNIST_FILES):
        return layout
    sources = {}
    for f in FASHION_MNIST_FILES:
        found = [s for s in (path / f, path / f"{f}.gz") if s.is_file()]
        if not found:
            return None
        sources[f] = found[0]
    target = data_home() / "fashion_mnist" / "FashionMNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for f, src in sources.items():
        if (target / f).is_file():
            continue
        tmp = target / f".{f}.tmp-{os.getpid()}"
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, target / f)  # atomic: a killed copy never leaves a truncated file
    return target


def imagenet100_classes() -> list[str]:
    text = resources.files("sarvit.data").joinpath("imagenet100.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _class_folders(folder: Path) -> list[str]:
    """The sub-folders of ``folder``, sorted; hidden ones (``.ipynb_checkpoints``, ...) are never classes."""
    return sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))


def _folders_hint(path: Path) -> str:
    """``"; PATH holds test/, train/"``: what is there instead of the expected split folder."""
    if not path.is_dir():
        return ""
    found = _class_folders(path)
    if not found:
        return f"; {path} holds no folder"
    return f"; {path} holds {', '.join(f + '/' for f in found[:8])}{', ...' if len(found) > 8 else ''}"


def _image_folder(path: Path, split: str, classes: list[str] | None = None, name: str | None = None) -> RawDataset:
    from torchvision.datasets import ImageFolder

    folder = path / split
    if not folder.is_dir():
        expected = f"Expected {path}/train/<class>/*.jpg and {path}/val/<class>/*.jpg{_folders_hint(path)}."
        raise _not_found(name or str(path), [folder], expected)
    present = _class_folders(folder)
    if classes is not None:
        missing = sorted(set(classes) - set(present))
        if missing:
            raise DatasetNotFound(f"{folder} lacks {len(missing)} of the requested classes, e.g. {missing[:5]}")
    else:
        classes = present
    if not classes:
        raise DatasetNotFound(f"{folder} has no class sub-folders; expected {folder}/<class>/<image files>")

    class _Subset(ImageFolder):
        def find_classes(self, directory):
            return classes, {c: i for i, c in enumerate(classes)}

    try:
        ds = _Subset(str(folder), loader=load_image)
    except FileNotFoundError as err:  # a class folder without any image file
        raise DatasetNotFound(f"{folder}: {err}. Remove empty class folders or add their images.") from err
    return RawDataset(ds, dataset_targets(ds), list(classes), f"{name or 'imagefolder'} ({split}) at {folder}")


def _imagenet(root: str | None, split: str, subset: bool) -> RawDataset:
    name = "imagenet100" if subset else "imagenet"
    looked = _candidates("imagenet", root)
    for path in looked:
        if (path / split).is_dir():
            return _image_folder(path, split, imagenet100_classes() if subset else None, name)
    raise _not_found(
        name, [p / split for p in looked],
        "ImageNet is not downloadable: extract ILSVRC2012 train/ and val/ (one folder per class, "
        "e.g. with the usual valprep script) under --data-root DIR.",
    )


DATASETS = ("cifar10", "cifar100", "flowers102", "oxford_pets", "stanford_cars", "imagenet", "imagenet100", "fashion_mnist")


def open_dataset(name: str, root: str | None = None, split: str = "train", download: bool = False) -> RawDataset:
    """Open a dataset by name, or an ImageFolder root (``name`` a path with train/ val/).

    Args:
        name: one of ``DATASETS`` or a folder path.
        root: where the named dataset lies; default: ``$SARVIT_DATA/<name>`` (or
            ``~/.cache/sarvit/<name>``), then ``./data/<name>``.
        split: ``"train"`` or ``"val"`` (the official test split where there is no val).
        download: let torchvision fetch the datasets it can fetch.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "fashion_mnist":
        return _fashion_mnist(root, split)
    if name in ("imagenet", "imagenet100"):
        return _imagenet(root, split, subset=name == "imagenet100")
    if name in DATASETS:
        return _torchvision(name, root, split, download)
    path = Path(name).expanduser()
    if path.is_dir():
        return _image_folder(path, split)
    raise ConfigError(
        f"unknown dataset {name!r}: give one of {', '.join(DATASETS)}, "
        "or a folder with train/ and val/ class sub-folders"
    )
