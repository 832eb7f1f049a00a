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


def test_class_differences_name_what_differs():
    from sarvit.data.classes import class_differences

    assert class_differences(["a", "b", "c"], ["a", "b", "c"]) is None
    assert class_differences([], ["a", "b"]) is None and class_differences(["a"], []) is None  # nothing to compare
    assert class_differences(["a", "b", "c"], ["a", "b", "z"], "train", "val") == (
        "only in train: 1 ('c'); only in val: 1 ('z')")
    assert class_differences(["a", "b"], ["a", "b", "c"], "train", "val") == "only in val: 1 ('c')"
    assert class_differences(["a", "b", "c"], ["a", "c", "b"], "train", "val") == (
        "the same names in another order: class 1 is 'b' in train, 'c' in val")
    many = class_differences([f"x{i}" for i in range(20)], [], "a", "b")
    assert many is None
    long = class_differences([f"x{i}" for i in range(20)], ["x0"], "a", "b")
    assert long.startswith("only in a: 19 ('x1', 'x2',") and long.endswith("'x8', ...)")


def test_check_same_classes_is_a_config_error():
    from sarvit.config import ConfigError
    from sarvit.data.classes import check_same_classes

    check_same_classes(["a", "b"], ["a", "b"], "train", "val", "Fix it.")
    with pytest.raises(ConfigError, match=r"train and val name their classes differently \(only in train: 1 \('c'\); "
                                          r"only in val: 1 \('z'\)\).*Fix it\."):
        check_same_classes(["a", "b", "c"], ["a", "b", "z"], "train", "val", "Fix it.")


def test_checkpoints_of_unnamed_data_record_no_names():
    from sarvit.data.classes import recorded_names

    assert recorded_names(["0", "1", "2"]) == [] and recorded_names(None) == []
    assert recorded_names(["0", "1", "10", "2"]) == ["0", "1", "10", "2"]  # ImageFolder's sorted digit folders
    assert recorded_names(["cat", "dog"]) == ["cat", "dog"]


def test_class_counts_and_labels_out_of_range():
    from sarvit.config import ConfigError
    from sarvit.data.classes import class_counts

    assert class_counts(np.array([2, 0, 2, 2]), 4, "val").tolist() == [1, 0, 3, 0]
    with pytest.raises(ConfigError, match=r"val has 2 images labelled \[4, 7\], outside the 4 classes 0\.\.3"):
        class_counts(np.array([0, 4, 7, 1]), 4, "val")


def test_class_count_warnings():
    from sarvit.data.classes import class_count_warnings

    names = ["cat", "dog", "owl"]
    assert class_count_warnings(np.array([5, 3, 1]), np.array([2, 0, 1]), names) == []  # val may lack a class
    one = class_count_warnings(np.array([10]), np.array([4]), ["cat"])
    assert len(one) == 1 and "one class only ('cat')" in one[0] and "top-1" in one[0]
    gaps = class_count_warnings(np.array([5, 0, 0]), np.array([1, 2, 3]), names)
    assert len(gaps) == 2 and "one class only ('cat')" in gaps[0]
    assert "no image of 2 ('dog', 'owl') of its 3 classes" in gaps[1] and "the 5 val images" in gaps[1]
    quiet = class_count_warnings(np.array([5, 4, 0]), np.array([1, 2, 0]), names)
    assert len(quiet) == 1 and "('owl')" in quiet[0] and "val images" not in quiet[0]


def test_hidden_folders_are_not_classes(image_folder):
    (image_folder / "train" / ".ipynb_checkpoints").mkdir()
    raw = open_dataset(str(image_folder), split="train")
    assert raw.classes == ["class0", "class1", "class2", "class3"] and len(raw.dataset) == 48


def test_a_missing_split_folder_says_what_is_there(image_folder):
    (image_folder / "val").rename(image_folder / "validation")
    with pytest.raises(DatasetNotFound, match=r"(?s)Looked in:.*/val\n.*holds train/, validation/"):
        open_dataset(str(image_folder), split="val")
    assert open_dataset(str(image_folder), split="train").num_classes == 4


def test_an_empty_or_flat_split_is_a_clear_error(tmp_path):
    from PIL import Image

    (tmp_path / "flat" / "train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "train" / "a.png")  # images without class folders
    with pytest.raises(DatasetNotFound, match="has no class sub-folders"):
        open_dataset(str(tmp_path / "flat"), split="train")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)  # a class folder, no image anywhere
    with pytest.raises(DatasetNotFound, match="cat"):
        open_dataset(str(tmp_path / "empty"), split="train")


def test_subset_and_dataset_errors_are_user_errors():
    from sarvit.errors import UserError

    with pytest.raises(UserError, match="more images than"):
        stratified_subset(np.array([0, 0, 1]), per_class=2)
    with pytest.raises(UserError, match="train_fraction must be in"):
        stratified_subset(np.array([0, 0, 1]), fraction=1.5)
    with pytest.raises(UserError, match="unknown dataset"):
        open_dataset("not_a_dataset")
