"""Training throughput of ``sarvit train`` against a minimal hand-written PyTorch loop.

Same model, data, transforms, batch size and data workers on both sides. The minimal
loop is a plain ``DataLoader(shuffle=True)`` + forward + cross-entropy + backward +
AdamW step. ``sarvit train`` runs the full machinery (seeded per-sample augmentation,
resumable sampler, loss terms, schedules, progress, checkpoints at epoch ends), once
with SAR off and once with SAR on. Each side runs ``--epochs`` epochs per round, the
three sides take turns for ``--rounds`` rounds (so that a drift of the machine's speed
hits all of them), and images/s are the median over every epoch but each run's first
(which warms up). Evaluation is excluded.

    python benchmarks/throughput.py [--device cuda --model vit_small_patch16_224 --img-size 224 --data DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from sarvit.config import load_config
from sarvit.data import build_transform, open_dataset, stratified_subset
from sarvit.train import train

DEMO_MODEL = '{"patch_size": 2, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 2.0}'


def minimal_loop(args, kwargs: dict) -> list[float]:
    """Images per second of each epoch of a bare training loop, the first left out."""
    raw = open_dataset(args.data, args.data_root, "train")
    subset = torch.utils.data.Subset(raw.dataset, stratified_subset(raw.targets, per_class=args.per_class).tolist())
    transform = build_transform(args.data, args.img_size, True, auto_augment=None, reprob=0.0, color_jitter=0.0,
                                scale=(0.6, 1.0))

    class Transformed(torch.utils.data.Dataset):
        def __len__(self):
            return len(subset)

        def __getitem__(self, i):
            image, target = subset[i]
            return transform(image), target

    loader = torch.utils.data.DataLoader(Transformed(), batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
                                         persistent_workers=args.workers > 0)
    device = torch.device(args.device)
    model = timm.create_model(args.model, num_classes=raw.num_classes, img_size=args.img_size, **kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    rates = []
    for _ in range(args.epochs):
        images, start = 0, time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(images / (time.perf_counter() - start))
    return rates[1:]


def sarvit_train(args, sar: bool, out: Path) -> list[float]:
    """Images per second of each epoch of ``sarvit train``, the first left out."""
    cfg = load_config(None, {
        "data": args.data, "data_root": args.data_root, "img_size": args.img_size, "per_class": args.per_class,
        "model": args.model, "model_kwargs": args.model_kwargs, "drop_path": 0.0, "sar": sar, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": 1e-3, "warmup_epochs": 0, "auto_augment": None, "reprob": 0.0,
        "color_jitter": 0.0, "scale": "0.6,1.0", "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0,
        "workers": args.workers, "device": args.device, "amp": args.amp, "eval_interval": 10**6,
        "output": str(out),
    })
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return [r["images_per_sec"] for r in rows[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--data-root")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--model-kwargs", default=DEMO_MODEL, help="JSON; the demo's 14x14-grid ViT by default")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    kwargs = json.loads(args.model_kwargs)
    args.model_kwargs = kwargs
    rates = {"minimal": [], "base": [], "sar": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            rates["minimal"] += minimal_loop(args, kwargs)
            rates["base"] += sarvit_train(args, False, Path(tmp) / f"base{r}")
            rates["sar"] += sarvit_train(args, True, Path(tmp) / f"sar{r}")
    minimal, base, sar = (statistics.median(rates[k]) for k in ("minimal", "base", "sar"))
    print(f"\ntraining throughput, {args.model} {kwargs} at {args.img_size}px, batch {args.batch_size}, "
          f"{args.workers} workers, {args.device} ({torch.get_num_threads()} threads), amp {args.amp}; "
          f"median of {len(rates['minimal'])} epochs a side")
    print(f"  minimal hand-written loop:   {minimal:8.1f} img/s")
    print(f"  sarvit train, SAR off:       {base:8.1f} img/s  ({base / minimal:.3f} of the minimal loop)")
    print(f"  sarvit train, SAR on:        {sar:8.1f} img/s  (SAR costs {100 * (base / sar - 1):+.1f}% time)")


if __name__ == "__main__":
    main()
