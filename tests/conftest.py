import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests must not touch the user's data cache (decompressed datasets go here).
os.environ["SARVIT_DATA"] = tempfile.mkdtemp(prefix="sarvit-test-data-")


def make_image_folder(root: Path, classes: int = 4, train: int = 12, val: int = 5, size: int = 16) -> Path:
    """A tiny ImageFolder dataset: each class a colour with noise, so it is learnable."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[c % 3] = 200
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)) + 30 * (c // 3), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


TINY_MODEL = [
    "--model", "vit_tiny_patch16_224", "--img-size", "16",
    "--model-kwargs", "{patch_size: 4, embed_dim: 24, depth: 2, num_heads: 2, mlp_ratio: 2.0}",
]


def tiny_train_args(data: Path, output: Path, *extra: str) -> list[str]:
    """Command-line arguments of a seconds-long CPU training run on ``image_folder``."""
    return [
        "train", "--data", str(data), "--output", str(output), *TINY_MODEL,
        "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--warmup-epochs", "1", "--workers", "0",
        "--auto-augment", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--drop-path", "0",
        "--scale", "0.5,1", "--crop-pct", "1.0", "--device", "cpu", *extra,
    ]


def python_cli() -> list[str]:
    return [sys.executable, "-m", "sarvit.cli"]
