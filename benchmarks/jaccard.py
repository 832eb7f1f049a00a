"""Cost of ``sarvit jaccard`` per image beside a plain evaluation pass of the same model.

Both sides read the same images and masks from an ``images/`` + ``masks/`` folder, resize
them to ``--img-size`` and run the model in eval mode, batch by batch:

- plain: ``model(x)``, the logits (what an accuracy evaluation does per image);
- jaccard: ``score_dataset``, i.e. the last block's [CLS] attention over all keys, the
  60%-mass mask per head, nearest upsampling and the per-class IoU over heads.

Weights are random (the cost does not depend on them); the folder is synthetic unless
``--data`` points at one. Each side runs ``--rounds`` times, alternating; the median is kept.

    python benchmarks/jaccard.py [--model vit_small_patch16_224 --img-size 480 --images 32 --device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from sarvit.analysis.models import AnalysisModel
from sarvit.analysis.protocol import prepare_pair, score_dataset
from sarvit.data.masks import open_masked

from clock import seconds  # benchmarks/clock.py (run as python benchmarks/NAME.py)


def synthetic(root: Path, count: int) -> Path:
    """VOC-sized random images with two rectangular objects and a void border each."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        h, w = int(rng.integers(330, 500)), int(rng.integers(330, 500))
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 4: w // 2], mask[h // 4 - 2: h // 4, w // 4: w // 2] = 12, 255
        mask[2 * h // 3: h - 10, 10: w // 3] = 15
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i:04d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"{i:04d}.png")
    return root


def plain_pass(loaded: AnalysisModel, dataset, batch_size: int, device) -> None:
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            x = torch.stack([prepare_pair(img, m, loaded.img_size, loaded.mean, loaded.std)[0] for _, img, m in items])
            loaded.model(x.to(device)).float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=480)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", help="an images/ + masks/ folder (default: synthetic)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=1000, img_size=args.img_size).to(device).eval()
    loaded = AnalysisModel(model, args.model, int(model.patch_embed.patch_size[0]), args.img_size,
                           (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with tempfile.TemporaryDirectory() as tmp:
        dataset = open_masked(args.data or str(synthetic(Path(tmp) / "masked", args.images)))
        n = len(dataset)
        plain_pass(loaded, dataset, args.batch_size, device)  # warm-up
        plain, jac = [], []
        for _ in range(args.rounds):
            plain.append(seconds(lambda: plain_pass(loaded, dataset, args.batch_size, device), device) / n)
            jac.append(seconds(lambda: score_dataset(loaded, dataset, batch_size=args.batch_size, device=device,
                                                   progress=False), device) / n)
    p, j = statistics.median(plain), statistics.median(jac)
    print(f"{args.model} at {args.img_size}x{args.img_size}, {n} images, batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds (image decoding and resizing included)")
    print(f"  plain evaluation pass : {1000 * p:8.1f} ms/image")
    print(f"  sarvit jaccard        : {1000 * j:8.1f} ms/image   ({j / p:.2f}x the plain pass)")


if __name__ == "__main__":
    main()
