"""Spatial-entropy loss, forward + backward: sarvit against the published algorithm.

Three implementations run on the same maps; the script first checks that their losses and
gradients agree, then times them in interleaved rounds and prints medians and ratios.

- sarvit: ``sarvit.SpatialEntropyLoss``. On the CPU: compiled loops (numba) on the calling
  thread, per map the mean, the components of the 2 x 2 blocks by bit-parallel flood fill,
  the masses and the entropy; a hand-written backward. No torch kernel touches the maps.
- published: the algorithm of the published SAR training code (helia95/SAR, ``BlobLoss``)
  as it is: one device -> host copy of the masks, a Python loop over batch x heads with
  one OpenCV ``connectedComponents`` call per map (8-connectivity), one 0/1 index row per
  component, then ONE batched gather of the maps by (batch, head) for all components, the
  pooling as a masked sum, +1e-9 on ReLU(S - mean), float32.
- natural: the per-map loop one would write first: label each map (OpenCV), build one mask
  tensor per component and pool it on its own, so autograd records a small graph per map.

The loss runs beside training, where data-loading workers keep the cores busy; ``--busy N``
starts N busy-looping processes and measures every side with them running and paused
(SIGSTOP), interleaved, so that "quiet" and "busy" rows come from the same rounds.

    python benchmarks/spatial_entropy.py [--shape 256 6 14 14] [--rounds 15] [--threads 1 0]
                                         [--busy 2] [--natural-rounds 3] [--device cpu]

``--threads 0`` means torch's default thread count. Timings on a shared machine vary from
run to run: the table gives medians and, for the ratios, the 10th-90th percentile range of
the per-round ratios, and the ratio of the CPU time each side used (all threads of the
process; less sensitive to other load than wall-clock time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import sarvit

# A busy loop that exits when its parent goes away (re-parented: getppid changes).
_BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(10**6): pass\n"


def published_loss(S: torch.Tensor) -> torch.Tensor:
    """The published algorithm (see the module docstring); S (B, heads, h, w) float32."""
    bs, heads, h, w = S.shape
    x = S.reshape(bs, heads, h * w)  # (B, heads, n)
    mean = x.mean(dim=-1, keepdim=True)  # (B, heads, 1)
    with torch.no_grad():
        above = (x > mean).long()  # (B, heads, n)
        masks = above.cpu().numpy()  # the one device -> host copy
        batch_idx, head_idx, rows = [], [], []
        for b in range(bs):
            for hd in range(heads):
                grid = (masks[b, hd].reshape(h, w) > 0).astype(np.uint8)
                count, labels = cv2.connectedComponents(grid, connectivity=8, ltype=cv2.CV_16U)
                for j in range(1, count):
                    batch_idx.append(b)
                    head_idx.append(hd)
                    rows.append(torch.tensor((labels == j) * 1.0).reshape(-1).long())
        batch_idx = torch.tensor(batch_idx).to(S.device)  # (C,)
        head_idx = torch.tensor(head_idx).to(S.device)  # (C,)
        rows = torch.stack(rows).to(S.device)  # (C, n): one 0/1 row per component
    B = torch.relu(x - mean) + torch.tensor(1e-9)  # (B, heads, n)
    pooled = torch.sum(B[batch_idx, head_idx] * rows, dim=-1)  # (C,), one batched gather
    total = torch.sum(B[batch_idx, head_idx] * above[batch_idx, head_idx], dim=-1)  # (C,)
    p = pooled / total
    return torch.sum(-(p * torch.log(p))) / (bs * heads)


def natural_loss(S: torch.Tensor) -> torch.Tensor:
    """Per-map loop, one mask tensor and one small autograd graph per map; no eps."""
    bs, heads, h, w = S.shape
    B = torch.relu(S - S.mean(dim=(2, 3), keepdim=True))  # (B, heads, h, w)
    masks = (B > 0).detach().cpu().numpy()
    total = torch.zeros((), device=S.device)
    for b in range(bs):
        for hd in range(heads):
            count, labels = cv2.connectedComponents(masks[b, hd].astype(np.uint8), connectivity=8)
            if count == 1:
                continue
            comp = torch.stack([torch.from_numpy(labels == j) for j in range(1, count)]).to(S.device)  # (C, h, w)
            p = (B[b, hd][None] * comp).sum(dim=(1, 2)) / B[b, hd].sum()
            total = total - (p * torch.log(p)).sum()
    return total / (bs * heads)


IMPLEMENTATIONS = {"sarvit": sarvit.SpatialEntropyLoss(), "published": published_loss, "natural": natural_loss}


def make_maps(kind: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """White-noise maps, or smooth ones (a 3 x 3 box blur of white noise), float32."""
    generator = torch.Generator().manual_seed(0)
    S = torch.randn(shape, generator=generator)
    if kind == "smooth":
        S = F.avg_pool2d(S.reshape(-1, 1, *shape[2:]), 3, 1, 1).reshape(shape)  # (B * heads, 1, h, w) -> shape
    return S.to(device)


def step(loss_fn, S0: torch.Tensor) -> tuple[float, torch.Tensor]:
    S = S0.clone().requires_grad_(True)
    loss = loss_fn(S)
    loss.backward()
    return loss.item(), S.grad


def check_agreement(S0: torch.Tensor) -> None:
    loss, grad = step(IMPLEMENTATIONS["sarvit"], S0)
    for name in ("published", "natural"):
        other, other_grad = step(IMPLEMENTATIONS[name], S0)
        if abs(loss - other) > 1e-5 or not torch.allclose(grad, other_grad, atol=1e-6):
            raise SystemExit(f"sarvit and the {name} implementation disagree: loss {loss} vs {other}")


def timed(loss_fn, S0: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) for ``loss_fn(S).backward()``.

    The copy of the input leaf is made before the clocks start.
    """
    S = S0.clone().requires_grad_(True)
    if S0.device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    loss_fn(S).backward()
    if S0.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` busy-looping processes, started paused; yields a function ``set_busy(bool)``."""
    procs = [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP]) for _ in range(count)]

    def set_busy(on: bool) -> None:
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT if on else signal.SIGSTOP)
        time.sleep(0.05)  # let the scheduler settle

    try:
        set_busy(False)
        yield set_busy
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def measure(maps, threads, loads, set_busy, rounds: int, natural_rounds: int, device):
    """Interleaved rounds -> {(kind, threads, load, impl): [(wall, cpu) seconds per round]}."""
    times: dict[tuple, list[float]] = {}
    for r in range(rounds):
        for kind, S0 in maps.items():
            for t in threads:
                torch.set_num_threads(t)
                for load in loads:
                    set_busy(load != "quiet")
                    names = ["sarvit", "published"] + (["natural"] if r < natural_rounds and load == "quiet" else [])
                    for name in names if r % 2 == 0 else names[::-1]:
                        times.setdefault((kind, t, load, name), []).append(timed(IMPLEMENTATIONS[name], S0))
    set_busy(False)
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def report(times, maps, threads, loads, default_threads: int) -> None:
    print("| maps | threads | load | sarvit (ms) | published (ms) | published / sarvit | CPU time ratio "
          "| natural (ms) | natural / sarvit |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in maps:
        for t in threads:
            for load in loads:
                ours = [wall for wall, _ in times[(kind, t, load, "sarvit")]]
                pub = [wall for wall, _ in times[(kind, t, load, "published")]]
                cpu_ratio = statistics.median(cpu for _, cpu in times[(kind, t, load, "published")]) / max(
                    statistics.median(cpu for _, cpu in times[(kind, t, load, "sarvit")]), 1e-9)
                ratios = [p / o for p, o in zip(pub, ours, strict=True)]
                cells = [
                    kind, f"{t}{' (default)' if t == default_threads else ''}", load,
                    f"{statistics.median(ours) * 1e3:.2f}", f"{statistics.median(pub) * 1e3:.1f}",
                    f"{statistics.median(pub) / statistics.median(ours):.0f}x "
                    f"({percentile(ratios, 10):.0f}-{percentile(ratios, 90):.0f})",
                    f"{cpu_ratio:.0f}x",
                ]
                nat = times.get((kind, t, load, "natural"))
                if nat:
                    n_med = statistics.median(wall for wall, _ in nat)
                    cells += [f"{n_med * 1e3:.0f}", f"{n_med / statistics.median(ours):.0f}x"]
                else:
                    cells += ["", ""]
                print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[256, 6, 14, 14], metavar=("B", "HEADS", "H", "W"))
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--natural-rounds", type=int, default=3, help="rounds that also time the natural loop")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="torch threads; 0 = default")
    parser.add_argument("--busy", type=int, default=0, help="also measure beside N busy-looping processes")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.rounds < 1 or args.natural_rounds < 0 or args.busy < 0 or min(args.shape) < 1:
        parser.error("--rounds and --shape must be positive, --natural-rounds and --busy non-negative")
    if any(t < 0 for t in args.threads):
        parser.error("--threads must be 0 (default) or positive")
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    threads = list(dict.fromkeys(t or default_threads for t in args.threads))
    shape = tuple(args.shape)
    maps = {kind: make_maps(kind, shape, device) for kind in ("white", "smooth")}
    for S0 in maps.values():
        check_agreement(S0)
        step(IMPLEMENTATIONS["sarvit"], S0)  # warm-up (compiles the CPU kernels once)
    loads = ["quiet"] + ([f"busy {args.busy}"] if args.busy else [])
    print(f"spatial-entropy loss, forward + backward, S of shape {shape} float32 on {device}, "
          f"{os.cpu_count()} cores (load average before: {os.getloadavg()[0]:.1f}); "
          f"medians of {args.rounds} interleaved rounds "
          f"({args.natural_rounds} for the natural loop, quiet only); ratio ranges: 10th-90th "
          "percentile of the per-round ratios; CPU time: all threads of this process. "
          "'quiet' = without the busy processes (other load on the machine is not controlled)")
    print("sarvit: SpatialEntropyLoss. published: per-map OpenCV loop + one batched gather (helia95/SAR). "
          "natural: per-map loop, one graph per map.\n")
    with busy_processes(args.busy) as set_busy:
        times = measure(maps, threads, loads, set_busy, args.rounds, args.natural_rounds, device)
    torch.set_num_threads(default_threads)
    report(times, maps, threads, loads, default_threads)


if __name__ == "__main__":
    main()
