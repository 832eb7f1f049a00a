"""Cost of SAR in a DINO training step: DINO + SAR against DINO, on the same model.

One step = the student on every view (2 global + N local crops), the teacher on the 2
global views, DINO's loss (+ 0.01 * L_se of the student's maps on the global views),
backward, AdamW update, teacher momentum update: ``sarvit.pretrain``'s step without the
data loader. Both sides use the same SAR-attached student (Eq. 10-11 last block), so the
difference is the SE term alone (the maps and their entropy). Timed in alternation;
prints both medians and minima (the minimum is the least disturbed by other processes on a
shared machine), the overhead, and the SE loss alone (forward + backward on the step's maps)
as a share of a DINO step.

    python benchmarks/dino_step_overhead.py [--model vit_small_patch16_224] [--batch 8]
        [--local-crops 10] [--device cuda] [--amp]
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import torch

import sarvit
from sarvit.ssl import DINO

from clock import seconds  # benchmarks/clock.py (run as python benchmarks/NAME.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=10, help="the paper: 10")
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    torch.manual_seed(0)
    backbone = sarvit.create_model(args.model, 0, img_size=args.global_size, model_kwargs={"dynamic_img_size": True})
    dino = DINO(backbone, out_dim=args.out_dim).to(device).train()
    optimizer = torch.optim.AdamW([p for p in dino.parameters() if p.requires_grad], lr=1e-4)
    B = args.batch
    views = [torch.randn(B, 3, args.global_size, args.global_size, device=device) for _ in range(2)]
    views += [torch.randn(B, 3, args.local_size, args.local_size, device=device) for _ in range(args.local_crops)]

    def step(sar: bool) -> None:
        with amp:
            out = dino(views, "dot" if sar else None)
        terms = dino.loss(out, epoch=0.0, lam=0.01 if sar else 0.0)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        dino.update_teacher(0.996)

    print(f"DINO step of {args.model}: batch {B}, 2 x {args.global_size} + {args.local_crops} x {args.local_size} "
          f"crops, out_dim {args.out_dim}, {device} ({torch.get_num_threads()} threads)"
          f"{', bf16 autocast' if args.amp else ''}; medians of {args.steps} alternated steps per side")
    for _ in range(2):  # warm-up (the labelling kernels compile on first use)
        step(False), step(True)
    base, sar = [], []
    for _ in range(args.steps):
        base.append(seconds(lambda: step(False), device))
        sar.append(seconds(lambda: step(True), device))
    with amp:
        S = dino(views, "dot")["S"].detach()  # (2B, heads, h, w)
    se_alone = [seconds(lambda: dino.se(S.float().clone().requires_grad_(True)).backward(), device) for _ in range(20)]
    b, s = statistics.median(base), statistics.median(sar)
    print(f"{'':16s} {'median':>10s} {'minimum':>10s}")
    print(f"{'DINO':16s} {b * 1e3:8.1f}ms {min(base) * 1e3:8.1f}ms")
    print(f"{'DINO + SAR':16s} {s * 1e3:8.1f}ms {min(sar) * 1e3:8.1f}ms")
    print(f"overhead of SAR: {100 * (s / b - 1):+.2f}% (medians), {100 * (min(sar) / min(base) - 1):+.2f}% (minima); "
          "step against step, noise included")
    se = statistics.median(se_alone)
    print(f"SE loss alone on the step's maps {tuple(S.shape)}: {se * 1e3:.2f} ms = {100 * se / min(base):.3f}% of "
          "the fastest DINO step")


if __name__ == "__main__":
    main()
