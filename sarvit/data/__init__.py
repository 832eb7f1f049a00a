"""Datasets, subsets and reproducible loaders."""

from .pipeline import EpochSampler, SeededTransform, build_loader, build_transform
from .sources import DATASETS, DatasetNotFound, RawDataset, open_dataset
from .stamps import build_stamps
from .subsets import stratified_subset

__all__ = [
    "DATASETS", "DatasetNotFound", "RawDataset", "open_dataset", "stratified_subset",
    "SeededTransform", "EpochSampler", "build_loader", "build_transform",
    "build_stamps",
]
