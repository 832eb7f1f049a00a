"""From a raw dataset to reproducible batches, on one process or many.

Two pieces make every run replayable, whatever the number of workers or ranks and
wherever a resumed run restarts:

- ``EpochSampler`` yields ``(epoch, index)`` keys: a permutation seeded by
  ``(seed, epoch)``, dealt to the ranks like ``DistributedSampler`` (rank r takes every
  world-th entry), and able to start part-way through an epoch.
- ``SeededTransform`` augments sample ``index`` with Python, NumPy and torch RNGs seeded
  from ``(seed, epoch, index)``, so its augmentation does not depend on which worker
  or rank draws it, nor on what was drawn before.

The transforms themselves are timm's (``create_transform``): RandAugment, random
erasing, colour jitter, random-resized crop, and the eval resize + centre crop.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

__all__ = ["SeededTransform", "EpochSampler", "build_transform", "build_loader", "seeded_rngs", "DATASET_STATS"]

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASET_STATS = {  # per-channel mean and std of the training images
    "fashion_mnist": ((0.286,) * 3, (0.353,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def build_transform(
    dataset: str,
    img_size: int,
    train: bool,
    *,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    color_jitter: float = 0.3,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
):
    """timm's training or evaluation transform, normalised with the statistics of ``dataset``
    (a name of ``DATASET_STATS``; any other name or an ImageFolder path gets ImageNet's)."""
    from timm.data import create_transform

    mean, std = DATASET_STATS.get(dataset, IMAGENET_STATS)
    if train:
        return create_transform(
            img_size, is_training=True, auto_augment=auto_augment or None, re_prob=reprob, re_mode="pixel",
            color_jitter=color_jitter, hflip=hflip, scale=scale, interpolation=interpolation, mean=mean, std=std,
        )
    return create_transform(img_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct, mean=mean, std=std)


@contextmanager
def seeded_rngs(seed: int):
    """Seed Python's, NumPy's and torch's CPU RNGs for the block.

    In the main process the previous states are restored afterwards, so that training
    randomness (dropout, Mixup) does not depend on the data; a DataLoader worker only
    ever draws for samples, so it skips the save and restore (~0.2 ms a sample).
    """
    restore = get_worker_info() is None
    if restore:
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA RNGs stay untouched
    try:
        yield
    finally:
        if restore:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class SeededTransform(Dataset):
    """``ds[(epoch, i)] -> (transform(image_i), target_i)`` with RNGs seeded by (seed, epoch, i).

    Args:
        dataset: yields ``(PIL image, int)``.
        transform: applied to the image.
        seed: the run's seed.
        indices: optional subset: position ``i`` reads ``dataset[indices[i]]``.
    """

    def __init__(self, dataset: Dataset, transform, seed: int, indices: np.ndarray | None = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        image, target = self.dataset[int(self.indices[i]) if self.indices is not None else i]
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
        with seeded_rngs(sample_seed):
            return self.transform(image), target


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys for one rank; see the module docstring.

    Args:
        size: number of samples.
        shuffle: permute each epoch (training) or keep the order (evaluation).
        seed: permutation seed, combined with the epoch.
        rank, world: this process's share: entries ``rank, rank + world, ...``.
        even: drop the tail so that every rank gets ``size // world`` samples (training);
            otherwise ranks differ by at most one sample and every sample is seen once.
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1, even: bool = True):
        self.size, self.shuffle, self.seed, self.rank, self.world, self.even = size, shuffle, seed, rank, world, even
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Next iteration: epoch ``epoch``, skipping the first ``start`` samples of this rank."""
        self.epoch, self.start = epoch, start

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            order = np.arange(self.size)
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(self.size)
        if self.even:
            order = order[: (self.size // self.world) * self.world]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._order()[self.start :]:
            yield self.epoch, int(i)

    def __len__(self) -> int:
        return max(0, len(self._order()) - self.start)


def build_loader(
    dataset: SeededTransform,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
    collate_fn=None,
) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader over ``dataset`` and the sampler that drives it (call ``set_epoch``).

    Training drops the last incomplete batch (Mixup/CutMix need full, even batches);
    evaluation sees every sample exactly once across the ranks.
    """
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world=world, even=train)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=workers > 0,
        collate_fn=collate_fn,  # None: torch's default
        # a private generator: creating an iterator must not draw from the global RNG
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler
