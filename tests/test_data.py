import numpy as np
import pytest
import torch

from sarvit.data import (
    DatasetNotFound, EpochSampler, SeededTransform, build_loader, build_transform, open_dataset, stratified_subset,
)
from sarvit.data.sources import DEBIAN_FASHION_MNIST

needs_fashion_mnist = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed (make test installs it)"
)


@needs_fashion_mnist
def test_fashion_mnist_from_the_debian_package():
    train = open_dataset("fashion_mnist", split="train")
    val = open_dataset("fashion_mnist", split="val")
    assert len(train.dataset) == 60000 and len(val.dataset) == 10000
    assert train.num_classes == 10 and train.classes[0] == "T-shirt/top"
    image, target = val.dataset[0]
    assert image.mode == "RGB" and image.size == (28, 28)
    assert target == 9  # the first test image is an ankle boot
    assert np.bincount(train.targets).tolist() == [6000] * 10
    # corners of Fashion-MNIST images are background, exactly 0
    assert np.asarray(image)[0, 0].tolist() == [0, 0, 0]


def test_image_folder(image_folder):
    raw = open_dataset(str(image_folder), split="train")
    assert raw.num_classes == 4 and len(raw.dataset) == 48
    assert np.bincount(raw.targets).tolist() == [12] * 4
    assert raw.dataset[0][0].mode == "RGB"


def test_missing_datasets_say_where_they_looked(tmp_path):
    with pytest.raises(DatasetNotFound, match=r"(?s)cifar10.*Looked in.*--download"):
        open_dataset("cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFound, match=r"(?s)imagenet100.*not downloadable"):
        open_dataset("imagenet100", root=str(tmp_path))
    with pytest.raises(DatasetNotFound, match="fashion_mnist"):
        open_dataset("fashion_mnist", root=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        open_dataset("not_a_dataset")


def test_empty_class_folder_is_a_clear_error(image_folder):
    (image_folder / "train" / "class9").mkdir()
    with pytest.raises(DatasetNotFound, match="class9"):
        open_dataset(str(image_folder), split="train")


def test_imagenet100_picks_the_100_classes(tmp_path):
    from sarvit.data.sources import imagenet100_classes

    wnids = imagenet100_classes()
    assert len(wnids) == 100 and len(set(wnids)) == 100
    root = tmp_path / "imagenet"
    from PIL import Image

    for wnid in wnids + ["n99999999"]:  # one extra class that IN-100 must leave out
        (root / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "val" / wnid / "a.JPEG")
    raw = open_dataset("imagenet100", root=str(root), split="val")
    assert raw.classes == wnids and len(raw.dataset) == 100


@pytest.mark.parametrize("per_class,fraction", [(7, None), (None, 0.25), (None, 1.0)])
def test_stratified_subsets(per_class, fraction):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 5, 400)
    counts = np.bincount(targets)
    idx = stratified_subset(targets, per_class=per_class, fraction=fraction, seed=3)
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    got = np.bincount(targets[idx], minlength=5)
    want = [per_class] * 5 if per_class else [max(1, round(fraction * n)) for n in counts]
    assert got.tolist() == want
    np.testing.assert_array_equal(idx, stratified_subset(targets, per_class=per_class, fraction=fraction, seed=3))
    if fraction != 1.0:
        assert not np.array_equal(idx, stratified_subset(targets, per_class=per_class, fraction=fraction, seed=4))


def test_stratified_subset_errors():
    targets = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ValueError, match="more images than 1 classes"):
        stratified_subset(targets, per_class=5)
    with pytest.raises(ValueError, match="exactly one"):
        stratified_subset(targets)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_sampler_shards_cover_the_data(world):
    size = 23
    shards = []
    for rank in range(world):
        s = EpochSampler(size, shuffle=True, seed=1, rank=rank, world=world, even=True)
        s.set_epoch(4)
        shards.append([i for e, i in s])
        assert all(e == 4 for e, _ in s)
    assert len({len(x) for x in shards}) == 1 and len(shards[0]) == size // world
    flat = sorted(i for sh in shards for i in sh)
    assert len(set(flat)) == len(flat) and len(flat) == (size // world) * world
    # evaluation: every sample exactly once, no padding
    ev = [i for r in range(world) for _, i in EpochSampler(size, shuffle=False, rank=r, world=world, even=False)]
    assert sorted(ev) == list(range(size))


def test_epoch_sampler_order_depends_on_seed_and_epoch_and_resumes():
    s = EpochSampler(50, shuffle=True, seed=0)
    s.set_epoch(0)
    a = [i for _, i in s]
    s.set_epoch(1)
    b = [i for _, i in s]
    assert sorted(a) == list(range(50)) and a != b
    s.set_epoch(0, start=20)
    assert [i for _, i in s] == a[20:] and len(s) == 30


def test_global_batches_of_two_ranks_equal_one_rank_with_twice_the_batch():
    size, b = 40, 4
    one = EpochSampler(size, shuffle=True, seed=2, rank=0, world=1)
    one.set_epoch(1)
    order = [i for _, i in one]
    ranks = []
    for r in range(2):
        s = EpochSampler(size, shuffle=True, seed=2, rank=r, world=2)
        s.set_epoch(1)
        ranks.append([i for _, i in s])
    for step in range(size // (2 * b)):
        global_batch = set(order[2 * b * step: 2 * b * (step + 1)])
        assert global_batch == set(ranks[0][b * step: b * (step + 1)]) | set(ranks[1][b * step: b * (step + 1)])


def test_augmentation_depends_on_seed_epoch_and_index_only(image_folder):
    raw = open_dataset(str(image_folder), split="train")
    transform = build_transform("imagefolder", 16, True, reprob=0.5, scale=(0.3, 1.0))
    ds = SeededTransform(raw.dataset, transform, seed=0)
    x1, _ = ds[(0, 5)]
    torch.manual_seed(123)  # the global RNG state must not matter, nor be changed
    state = torch.get_rng_state()
    x2, _ = ds[(0, 5)]
    assert torch.equal(x1, x2) and torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(x1, ds[(1, 5)][0])  # another epoch, another augmentation
    # the same batches with 0 or 2 worker processes, and when starting mid-epoch
    loader0, s0 = build_loader(ds, 8, train=True, seed=0, workers=0)
    loader2, s2 = build_loader(ds, 8, train=True, seed=0, workers=2)
    s0.set_epoch(3)
    s2.set_epoch(3, start=16)
    batches0 = [x for x, _ in loader0]
    batches2 = [x for x, _ in loader2]
    assert len(batches0) == 6 and len(batches2) == 4
    for a, b in zip(batches0[2:], batches2, strict=True):
        assert torch.equal(a, b)
