"""Spatial-entropy loss, forward + backward: sarvit against the natural implementation.

The natural implementation is what the published training code does: move the maps to
the host, label each map on its own (OpenCV ``connectedComponents`` when OpenCV is
installed, else ``scipy.ndimage.label``), build one mask tensor per component and pool
with it (appendix A, Eq. 12-13). Both run on the same maps; the script checks that they
agree and prints both timings and their ratio.

    python benchmarks/spatial_entropy.py [--shape 256 6 14 14] [--repeats 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

import sarvit

try:
    import cv2
except ImportError:  # pragma: no cover - depends on the environment
    cv2 = None


def _label_map(mask: np.ndarray) -> np.ndarray:
    if cv2 is not None:
        return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[1]
    return ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))[0]


def natural_loss(S: torch.Tensor) -> torch.Tensor:
    """Per-map loop, one tensor per component: the published code's loss, without its eps."""
    bs, heads, h, w = S.shape
    m = S.mean(dim=(2, 3), keepdim=True)
    B = torch.relu(S - m)
    masks_np = (B > 0).detach().cpu().numpy()
    total = torch.zeros((), device=S.device)
    for b in range(bs):
        for hd in range(heads):
            labels = _label_map(masks_np[b, hd])
            n = int(labels.max())
            if n == 0:
                continue
            comp = torch.stack([torch.from_numpy(labels == j) for j in range(1, n + 1)]).to(S.device)
            p = (B[b, hd][None] * comp).sum(dim=(1, 2)) / B[b, hd].sum()
            total = total - (p * torch.log(p)).sum()
    return total / (bs * heads)


def timeit(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[256, 6, 14, 14], metavar=("B", "HEADS", "H", "W"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = tuple(args.shape)
    # attention-like maps: smooth random fields (a 3 x 3 box blur of white noise)
    S0 = F.avg_pool2d(torch.randn(shape[0] * shape[1], 1, *shape[2:]), 3, 1, 1).reshape(shape).to(device)
    loss_fn = sarvit.SpatialEntropyLoss()

    def step(fn):
        S = S0.clone().requires_grad_(True)
        fn(S).backward()
        return S.grad

    g_ours, g_nat = step(loss_fn), step(natural_loss)
    assert torch.allclose(g_ours, g_nat, atol=1e-6), "the two implementations disagree"
    t_nat = timeit(lambda: step(natural_loss), max(3, args.repeats // 4), device)
    t_ours = timeit(lambda: step(loss_fn), args.repeats, device)
    masks = (S0 > S0.mean(dim=(2, 3), keepdim=True)).cpu().numpy().reshape(-1, *shape[2:])
    t_label = timeit(lambda: [_label_map(m) for m in masks], max(3, args.repeats // 4), device)
    labeller = "OpenCV" if cv2 is not None else "scipy"
    print(f"spatial-entropy loss, forward + backward, S of shape {shape} on {device} "
          f"({torch.get_num_threads()} threads)")
    print(f"  natural (per-map {labeller} loop, one tensor per component): {t_nat * 1e3:9.2f} ms")
    print(f"  labelling alone, per-map {labeller} loop (no loss, no backward): {t_label * 1e3:6.2f} ms")
    print(f"  sarvit.SpatialEntropyLoss:                                  {t_ours * 1e3:9.2f} ms")
    print(f"  speed-up: {t_nat / t_ours:.1f}x over the natural loss, "
          f"{t_label / t_ours:.1f}x over its labelling loop alone")


if __name__ == "__main__":
    main()
