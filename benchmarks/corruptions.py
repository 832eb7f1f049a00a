"""Cost of the corrupted evaluation (``sarvit eval --corruptions``) beside a plain evaluation pass.

Same model, images, transform, batch size and workers on both sides. The plain pass
decodes, resizes, normalises and classifies every image once; the corrupted evaluation
does the same and classifies the image again under every corruption and severity
(15 x 5 = 75 extra views by default). Printed: milliseconds per image of each side and
their ratio, and the time of each corruption alone (the library call on one crop,
median over the images, after a warm-up call that compiles glass_blur's numba kernel).
The two sides take turns for ``--rounds`` rounds, so that a drift of the machine's speed
hits both, and the medians are printed.

    python benchmarks/corruptions.py [--data fashion_mnist --images 100 --device cpu]
    python benchmarks/corruptions.py --data DIR --img-size 224 --model vit_small_patch16_224 --model-kwargs '{}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import sarvit
from sarvit.data import build_transform, open_dataset, stratified_subset
from sarvit.robustness import CorruptedViews, SingleView, corruption_names, evaluate_corruptions, predict
from sarvit.robustness.corruptions import corrupt_array, image_seed

DEMO_MODEL = '{"patch_size": 2, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 2.0}'


def per_corruption_ms(views: CorruptedViews, names: list[str], images: int) -> dict[str, float]:
    """Median milliseconds of one ``corrupt_array`` call per corruption (severities 1-5 in turn)."""
    crops = [views.crop(i)[0] for i in range(images)]
    out = {}
    for c in names:
        corrupt_array(crops[0], c, 3, 0)  # warm-up (numba compiles glass_blur on its first call)
        times = []
        for i, crop in enumerate(crops):
            s = 1 + i % 5
            start = time.perf_counter()
            corrupt_array(crop, c, s, image_seed(0, c, s, i))
            times.append(time.perf_counter() - start)
        out[c] = 1000 * statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root")
    p.add_argument("--images", type=int, default=100, help="validation images, the same number of every class")
    p.add_argument("--rounds", type=int, default=2, help="the two sides take turns; medians over the rounds")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--model-kwargs", default=DEMO_MODEL)
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--crop-pct", type=float, default=1.0)
    p.add_argument("--corruptions", default="common")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    raw = open_dataset(args.data, args.data_root, "val")
    per_class = max(1, args.images // raw.num_classes)
    subset = torch.utils.data.Subset(raw.dataset, stratified_subset(raw.targets, per_class=per_class).tolist())
    n = len(subset)
    transform = build_transform(args.data, args.img_size, False, crop_pct=args.crop_pct)
    model = sarvit.create_model(args.model, raw.num_classes, img_size=args.img_size,
                                model_kwargs=json.loads(args.model_kwargs)).to(args.device).eval()
    names = corruption_names(args.corruptions) if args.corruptions in ("common", "validation", "all") \
        else args.corruptions.split(",")
    common = dict(batch_size=args.batch_size, workers=args.workers, device=args.device)
    views = CorruptedViews(subset, transform, names, [1, 2, 3, 4, 5], seed=0)
    each = per_corruption_ms(views, names, min(n, 20))
    predict(model, SingleView(subset, transform), **common)  # warm-up

    plain, corrupted = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        predict(model, SingleView(subset, transform), **common)
        plain.append((time.perf_counter() - start) / n)
        start = time.perf_counter()
        out = evaluate_corruptions(model, subset, transform, corruptions=names, seed=0, **common)
        corrupted.append((time.perf_counter() - start) / n)
    plain, corrupted = statistics.median(plain), statistics.median(corrupted)

    size = "x".join(map(str, out["corruption_size"]))
    print(f"{n} images of {args.data} at {args.img_size}x{args.img_size} (corrupted at {size}), {args.model}, "
          f"batch {args.batch_size}, {args.workers} workers, {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    print(f"\n{'corruption':<20} {'ms / call':>9}")
    for c, ms in each.items():
        print(f"{c:<20} {ms:9.2f}")
    views_per_image = 1 + len(names) * 5
    print(f"\nplain evaluation pass     {1000 * plain:9.2f} ms / image")
    print(f"corrupted evaluation      {1000 * corrupted:9.2f} ms / image ({views_per_image} views: clean + "
          f"{len(names)} x 5; {1000 * corrupted / views_per_image:.2f} ms / view)")
    print(f"  of which corrupting     {5 * sum(each.values()):9.2f} ms / image (the calls above, x 5 severities)")
    print(f"ratio                     {corrupted / plain:9.1f} x the plain pass "
          f"({corrupted / plain / views_per_image:.2f} x per view)")


if __name__ == "__main__":
    main()
