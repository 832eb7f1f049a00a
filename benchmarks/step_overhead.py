"""Cost of the SE term in one training step: SAR against the same model without it.

One step = forward, loss, backward, AdamW update, on a batch of random images. Both
sides use the same SAR-attached model (Eq. 10-11 last block), so the only difference
is the spatial-entropy term: ``model(x)`` + CE against
``model.forward_with_similarity(x)`` + CE + 0.01 * SE. The two are timed in
alternation, and the script prints both medians and the relative overhead.

    python benchmarks/step_overhead.py [--model vit_small_patch16_224] [--batch 64] [--device cuda] [--amp]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F

import sarvit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = sarvit.attach(timm.create_model(args.model, num_classes=100, img_size=args.img_size)).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    se = sarvit.SpatialEntropyLoss()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()

    def step(with_se: bool) -> None:
        with amp:
            if with_se:
                logits, S = model.forward_with_similarity(x)
                loss = F.cross_entropy(logits, y) + 0.01 * se(S)
            else:
                loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(with_se: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(with_se)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up
        step(False), step(True)
    base, sar = [], []
    for _ in range(args.steps):
        base.append(timed(False))
        sar.append(timed(True))
    t_base, t_sar = statistics.median(base), statistics.median(sar)
    with amp:
        _, S = model.forward_with_similarity(x)
    S = S.detach()

    def se_alone() -> float:  # the loss on this batch's maps, forward + backward
        s = S.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        se(s).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    t_se = statistics.median(se_alone() for _ in range(20))
    print(f"one training step, {args.model} at {args.img_size}px ({tuple(S.shape[-2:])} grid), batch {args.batch}, "
          f"{device} ({torch.get_num_threads()} threads){', bf16 autocast' if args.amp else ''}")
    print(f"  CE only:            {t_base * 1e3:9.1f} ms")
    print(f"  CE + 0.01 * SE:     {t_sar * 1e3:9.1f} ms")
    print(f"  SE overhead, step against step:        {100 * (t_sar / t_base - 1):+.2f}% "
          f"(min {min(base) * 1e3:.1f} / {min(sar) * 1e3:.1f} ms; run-to-run noise included)")
    print(f"  SE loss alone on these maps, fwd + bwd: {t_se * 1e3:.2f} ms = {100 * t_se / t_base:.2f}% of a step")


if __name__ == "__main__":
    main()
