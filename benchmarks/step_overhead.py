"""Cost of the SE term in one training step: SAR against the same model without it, for one
model or several side by side.

One step = forward, loss, backward, AdamW update, on a batch of random images. Both
sides use the same SAR-attached model (Eq. 10-11 last block), so the only difference
is the spatial-entropy term: ``model(x)`` + CE against
``model.forward_with_similarity(x)`` + CE + 0.01 * SE. The two are timed in
alternation; the script prints, per model, both medians, the relative overhead and the
time of the SE loss alone on the step's maps as a share of a step.

Any model ``sarvit.create_model`` builds: timm names (``vit_small_patch16_224``,
``swin_tiny_patch4_window7_224``, ``pvt_v2_b0``), the architectures sarvit adds to timm
(``cvt_13``, ``t2t_vit_14``, ``pvt_small``) and torchvision's (``torchvision:vit_b_16``).

Without ``--model`` it measures one model of every family side by side (``FAMILIES``):
ViT-S/16, T2T-ViT-14, PVT-Small, CvT-13, Swin-T, PVT v2-b0 and torchvision's ViT-B/16
(torchvision's builders fix the architecture: ``vit_b_16`` is its smallest ViT).

    python benchmarks/step_overhead.py [--model vit_small_patch16_224,swin_tiny_patch4_window7_224]
        [--img-size 224] [--batch 64] [--device cuda] [--amp]
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import sarvit
import sarvit.models  # noqa: F401  (registers cvt_13, t2t_vit_14, pvt_small, ... with timm)
from sarvit.errors import ConfigError

from clock import seconds  # benchmarks/clock.py (run as python benchmarks/NAME.py)

NUM_CLASSES = 100
# one model of every family sarvit.attach supports, in the order of sarvit.surgery.FAMILIES
FAMILIES = ("vit_small_patch16_224", "t2t_vit_14", "pvt_small", "pvt_v2_b0", "cvt_13", "swin_tiny_patch4_window7_224",
            "torchvision:vit_b_16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=",".join(FAMILIES),
                        help="one name, or several separated by commas (default: one model of every family)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    print(f"one training step at {args.img_size}px, batch {args.batch}, {device} ({torch.get_num_threads()} threads)"
          f"{', bf16 autocast' if args.amp else ''}; medians of {args.steps} steps per side")
    print(f"{'model':34s} {'S':>14s} {'CE only':>10s} {'CE + SE':>10s} {'overhead':>9s} {'SE alone':>10s} "
          f"{'share':>7s}")
    for name in args.model.split(","):
        r = measure(build(name.strip(), args.img_size, device), args.batch, args.img_size, args.steps, device, amp)
        print(f"{name.strip():34s} {str(r['S']):>14s} {r['base'] * 1e3:8.1f}ms {r['sar'] * 1e3:8.1f}ms "
              f"{100 * (r['sar'] / r['base'] - 1):+8.2f}% {r['se'] * 1e3:8.2f}ms {100 * r['se'] / r['base']:6.2f}%")
    print("overhead: step against step (run-to-run noise included); share: the SE loss alone (fwd + bwd on the "
          "step's maps) over a CE-only step")


def build(name: str, img_size: int, device: torch.device) -> torch.nn.Module:
    """A SAR model of ``name`` built for ``img_size``, or with its defaults when its constructor
    refuses the size (the input is ``img_size`` all the same)."""
    torch.manual_seed(0)
    try:
        model = sarvit.create_model(name, NUM_CLASSES, img_size=img_size)
    except ConfigError as err:
        print(f"  {name}: {err}; built with its defaults")
        model = sarvit.create_model(name, NUM_CLASSES)
    return model.to(device).train()


def measure(model: torch.nn.Module, batch: int, img_size: int, steps: int, device: torch.device, amp) -> dict:
    """Median seconds of a CE-only step (``base``), a CE + SE step (``sar``) and the SE loss alone
    (``se``), and the shape of one batch's maps ``(heads, h, w)`` (``S``)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    se = sarvit.SpatialEntropyLoss()
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

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

    for _ in range(2):  # warm-up
        step(False), step(True)
    base, sar = [], []
    for _ in range(steps):
        base.append(seconds(lambda: step(False), device))
        sar.append(seconds(lambda: step(True), device))
    with amp:
        S = model.forward_with_similarity(x)[1].detach()  # (B, heads, h, w)
    se_alone = [seconds(lambda: se(S.clone().requires_grad_(True)).backward(), device) for _ in range(20)]
    return {"base": statistics.median(base), "sar": statistics.median(sar), "se": statistics.median(se_alone),
            "S": tuple(S.shape[1:])}


if __name__ == "__main__":
    main()
