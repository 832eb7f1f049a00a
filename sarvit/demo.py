"""``sarvit demo``: baseline against SAR on a small labelled subset of Fashion-MNIST.

Both runs share the recipe ``fashion_mnist_cpu`` (a 14 x 14-grid ViT, 100 training
images a class, the same seed, epochs and schedule); they differ only in SAR (the SE
term and the Eq. 10-11 last block). Both are evaluated on all 10,000 test images after
the last epoch (the final weights, not the best epoch: picking on the test set would
flatter both). The report folder gets ``report.md``, ``summary.json``, a figure of the
per-head attention maps, and the two run folders.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .runs import atomic_write
from .config import ConfigError, load_config
from .train import train

__all__ = ["run_demo"]

RECIPE = "fashion_mnist_cpu"
FIGURE_IMAGES = (0, 1, 2, 3, 8, 13)  # test images of six different classes


def _plan(cfg, output: Path) -> str:
    return (
        "sarvit demo: does SAR help a ViT trained on little data?\n"
        f"  - trains a {cfg.model_kwargs.get('depth')}-block ViT with a 14x14 patch grid twice on "
        f"{cfg.per_class * 10:,} Fashion-MNIST images ({cfg.per_class} a class), {cfg.epochs} epochs each:\n"
        "    1. baseline: cross-entropy, standard last block\n"
        f"    2. SAR: cross-entropy + {cfg.lambda_} x spatial entropy, last block without MSA skip and LN2 (Eq. 10-11)\n"
        "  - same seed, data, schedule and augmentation; both evaluated on all 10,000 test images\n"
        "  - about 10 minutes on 2 CPU cores (4 to 5 per model)\n"
        f"  - report: {output}/report.md, attention figure: {output}/attention.png"
    )


def run_demo(output: str | None = None, *, epochs: int | None = None, per_class: int | None = None,
             resume: bool = False) -> dict[str, Any]:
    """Run the demo into ``output`` (default ``reports/demo-<timestamp>``); returns the summary."""
    out = Path(output) if output else Path(f"reports/demo-{datetime.now():%Y%m%d-%H%M%S}")
    _check_report_folder(out, output, resume)
    overrides: dict[str, Any] = {}
    if epochs is not None:
        overrides.update(epochs=epochs, eval_interval=epochs)
    if per_class is not None:
        overrides["per_class"] = per_class
    base = load_config(RECIPE, overrides)
    print(_plan(base, out), flush=True)
    started = time.perf_counter()
    results = {}
    for name, sar in (("baseline", False), ("sar", True)):
        print(f"\n=== {name} ===", flush=True)
        cfg = load_config(RECIPE, {**overrides, "sar": sar, "output": str(out / name),
                                   "resume": "auto" if resume else None})
        results[name] = train(cfg)
    figure = _figure(out, base)
    summary = _write_report(out, base, results, figure, time.perf_counter() - started)
    print("\n" + _table(summary))
    print(f"\nreport: {out / 'report.md'}\nfigure: {figure}")
    return summary


REPORT_FILES = {"baseline", "sar", "report.md", "summary.json", "attention.png"}  # what a demo writes


def _check_report_folder(out: Path, output: str | None, resume: bool) -> None:
    """Refuse a report folder that is not the demo's to write (before anything is trained)."""
    if resume and output is None:
        raise ConfigError("--resume continues an interrupted demo: give its report folder with --output")
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    foreign = [name for name in held if name not in REPORT_FILES]
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file; give a folder for the demo's report")
    if foreign:
        raise ConfigError(f"--output {out} holds files the demo did not write ({', '.join(foreign[:5])}); choose "
                          "another folder (nothing there is overwritten)")
    if held and not resume:
        raise ConfigError(f"--output {out} already holds a demo; add --resume to continue it, or choose another "
                          "folder (nothing there is overwritten)")


def _figure(out: Path, cfg) -> Path:
    from .analysis import cls_attention_maps, plot_attention_grid
    from .data import build_transform, open_dataset
    from .factory import load_model

    raw = open_dataset(cfg.data, cfg.data_root, "val")
    transform = build_transform(cfg.data, cfg.img_size, False, interpolation=cfg.interpolation, crop_pct=cfg.crop_pct)
    x = torch.stack([transform(raw.dataset[i][0]) for i in FIGURE_IMAGES])  # (B, 3, H, W), normalised
    display = torch.stack([torch.from_numpy(np.array(raw.dataset[i][0])).permute(2, 0, 1) / 255.0
                           for i in FIGURE_IMAGES])  # (B, 3, H, W) in [0, 1]
    maps = {}
    for name in ("baseline", "sar"):
        model, _ = load_model(out / name, which="last")
        maps[name] = cls_attention_maps(model, x)
    captions = [raw.classes[int(raw.targets[i])] for i in FIGURE_IMAGES]
    return plot_attention_grid(display, maps, out / "attention.png", captions)


def _write_report(out: Path, cfg, results: dict[str, Any], figure: Path, seconds: float) -> dict[str, Any]:
    summary = {
        "recipe": RECIPE,
        "train_images": cfg.per_class * 10,
        "test_images": 10000,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "runs": {
            name: {
                "top1": r["final"].get("top1"), "top5": r["final"].get("top5"),
                "spatial_entropy": r["final"].get("se"), "components_per_head": r["final"].get("components"),
                "train_seconds": r["train_seconds_total"], "run_dir": r["run_dir"],
            }
            for name, r in results.items()
        },
        "total_seconds": seconds,
    }
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    b, s = summary["runs"]["baseline"], summary["runs"]["sar"]
    delta = s["top1"] - b["top1"]
    verdict = (
        f"In this run SAR {'gained' if delta > 0 else 'lost'} {abs(delta):.2f} top-1 points against the baseline, "
        f"and its mean spatial entropy went {'down' if s['spatial_entropy'] < b['spatial_entropy'] else 'up'} "
        f"from {b['spatial_entropy']:.3f} to {s['spatial_entropy']:.3f} ({b['components_per_head']:.2f} -> "
        f"{s['components_per_head']:.2f} components per head). One seed and a {cfg.epochs}-epoch CPU budget: "
        "the paper's gains come from 100-300 epochs on ImageNet-scale data, so this demo shows the whole "
        "pipeline at work and states what it measured; it does not reproduce the paper's numbers."
    )
    text = "\n".join([
        "# sarvit demo: baseline vs SAR on Fashion-MNIST",
        "",
        f"{summary['train_images']:,} training images ({cfg.per_class} a class), {cfg.epochs} epochs, seed {cfg.seed}; "
        f"recipe `{RECIPE}`. Metrics of the final weights on all {summary['test_images']:,} test images.",
        "",
        _table(summary),
        "",
        verdict,
        "",
        "Spatial entropy and components are those of the last block's per-head similarity maps (Eq. 4-9), "
        "averaged over heads and test images: lower means the high-attention patches form fewer, larger blobs.",
        "",
        f"![per-head attention maps]({figure.name})",
        "",
    ])
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    return summary


def _table(summary: dict[str, Any]) -> str:
    lines = ["| model | top-1 (%) | top-5 (%) | spatial entropy | components / head | train time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in summary["runs"].items():
        lines.append(f"| {name} | {r['top1']:.2f} | {r['top5']:.2f} | {r['spatial_entropy']:.3f} | "
                     f"{r['components_per_head']:.2f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)
