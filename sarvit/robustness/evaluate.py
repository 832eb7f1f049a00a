"""Top-1 error under corruptions, on ImageNet-C and on ImageNet-A.

``evaluate_corruptions(model, dataset, transform, ...)`` is pure over its inputs (the
corruptions are seeded per image); ``evaluate_checkpoint_corruptions(checkpoint, ...)``
loads saved weights, picks the data the way ``sarvit eval`` does, writes the results as
JSON into the run folder and prints the table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..config import ConfigError
from .corruptions import MIN_SIZE, resolve_corruptions, resolve_severities
from .scores import Reference, format_table, load_reference, summarise
from .views import CorruptedViews, SingleView, split_eval_transform

__all__ = [
    "predict", "evaluate_corruptions", "evaluate_imagenet_c", "evaluate_imagenet_a",
    "evaluate_checkpoint_corruptions", "format_results",
]


@torch.no_grad()
def predict(
    model: nn.Module,
    views: Dataset,
    *,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: str = "none",
    class_indices: np.ndarray | None = None,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class of every view of every image.

    Args:
        views: ``views[i] -> ((V, 3, H, W) tensor, target)`` with ``V = views.num_views``.
        batch_size: views per forward pass (``batch_size // V`` images, at least one).
        class_indices: ``(K,)`` outputs to choose among (ImageNet-A's 200); default all.

    Returns:
        ``(predictions (N, V) int64, targets (N,) int64)`` in dataset order.
    """
    from ..engine import autocast

    device = torch.device(device)
    model.eval()
    n_views = getattr(views, "num_views", 1)
    loader = DataLoader(views, batch_size=max(1, batch_size // n_views), shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    keep = None if class_indices is None else torch.as_tensor(class_indices, dtype=torch.long, device=device)
    preds, targets = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty()):
        b = x.shape[0]
        x = x.to(device, non_blocking=True).flatten(0, 1)  # (B * V, 3, H, W)
        with autocast(device, amp):
            logits = model(x).float()  # (B * V, classes)
        top = logits.argmax(1) if keep is None else keep[logits[:, keep].argmax(1)]
        preds.append(top.view(b, n_views).cpu())  # (B, V)
        targets.append(torch.as_tensor(y))
    return torch.cat(preds).numpy().astype(np.int64), torch.cat(targets).numpy().astype(np.int64)


def _error(wrong: np.ndarray) -> float:
    return 100.0 * float(wrong.mean()) if wrong.size else float("nan")


def evaluate_corruptions(
    model: nn.Module,
    dataset: Dataset,
    transform,
    *,
    corruptions: str | Sequence[str] = "common",
    severities: str | Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    reference: Reference | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: str = "none",
) -> dict[str, Any]:
    """Top-1 error (%) per corruption and severity, the clean error, and CE/mCE.

    Args:
        dataset: ``dataset[i] -> (PIL RGB image, class index)`` (a validation split).
        transform: the model's evaluation transform (resize, centre crop, to tensor,
            normalise); corruptions are applied to the uint8 crop before the tensor steps.
        corruptions: ``common`` (15), ``validation`` (4), ``all`` or a list of names.
        severities: values in 1..5.
        seed: every image's corruption is drawn from (seed, corruption, severity, index).
        reference: normalises the corruption errors (mCE); None: unnormalised mean error.

    Returns:
        a JSON-able dict: ``clean_error``, ``errors[corruption][str(severity)]``,
        ``corruption_errors``, ``mCE`` or ``mean_error_unnormalised``, sizes and notes.
    """
    corruptions, severities = resolve_corruptions(corruptions), resolve_severities(severities)
    if len(dataset) == 0:
        raise ConfigError("the dataset holds no image to evaluate")
    if reference is not None:
        reference.check(corruptions, severities)
    views = CorruptedViews(dataset, transform, corruptions, severities, seed)
    (in_h, in_w), (c_h, c_w) = views.corruption_size()
    preds, targets = predict(model, views, batch_size=batch_size, workers=workers, device=device, amp=amp,
                             desc="corruptions")
    wrong = preds != targets[:, None]  # (N, 1 + C*S)
    errors = {c: {} for c in corruptions}
    for k, (c, s) in enumerate(views.pairs, start=1):
        errors[c][str(s)] = _error(wrong[:, k])
    notes = [f"corrupted after the resize + centre crop to the model's {in_h}x{in_w} input, before normalising "
             "(ImageNet-C corrupts 224x224 centre crops)"]
    if (c_h, c_w) != (in_h, in_w):
        notes.append(f"images of {in_h}x{in_w} are under the corruption library's {MIN_SIZE}x{MIN_SIZE} minimum: "
                     f"upscaled (bicubic) to {c_h}x{c_w}, corrupted, and resized back to {in_h}x{in_w}")
    results = {
        "mode": "corruptions", "images": int(len(targets)), "seed": int(seed), "corruptions": corruptions,
        "severities": severities, "input_size": [in_h, in_w], "corruption_size": [c_h, c_w],
        "upscaled": (c_h, c_w) != (in_h, in_w), "clean_error": _error(wrong[:, 0]), "errors": errors,
    }
    return _with_summary(results, reference, notes)


def _with_summary(results: dict[str, Any], reference: Reference | None, notes: list[str]) -> dict[str, Any]:
    severities = results["severities"]
    table = {c: {int(s): e for s, e in row.items()} for c, row in results["errors"].items()}
    summary = summarise(table, severities, results.get("clean_error"), reference)
    notes = notes + ([summary.pop("note")] if "note" in summary else [])
    return {**results, **summary, "notes": notes}


def evaluate_imagenet_c(
    model: nn.Module,
    root: str | Path,
    wnids: Sequence[str],
    transform,
    *,
    corruptions: str | Sequence[str] | None = None,
    severities: str | Sequence[int] | None = None,
    reference: Reference | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: str = "none",
) -> dict[str, Any]:
    """Top-1 error (%) on the already corrupted images of an ImageNet-C folder.

    Args:
        wnids: the wnid of each model output (``model_wnids``).
        transform: PIL -> normalised tensor; the images are 224x224 crops already.
        corruptions: default: the common ones present under ``root`` (all present with
            ``all``); a name asked for and absent is an error.
        severities: default 1..5.
    """
    from ..data.imagenet_variants import imagenet_c_contents, open_imagenet_c
    from .corruptions import corruption_names

    present = imagenet_c_contents(root)
    severities = resolve_severities(severities)
    if corruptions is None or corruptions in ("common", "all", "validation"):
        wanted = corruption_names(corruptions or "common")
        names = [c for c in wanted if c in present]
        if not names:
            raise ConfigError(
                f"{root} holds none of the {corruptions or 'common'} corruptions; it has {sorted(present)}")
    else:
        names = resolve_corruptions(corruptions)
    if reference is not None:
        reference.check(names, severities)
    missing = [f"{c}/{s}" for c in names for s in severities if s not in present.get(c, [])]
    if missing:
        raise ConfigError(f"ImageNet-C at {root} lacks {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; "
                          "choose --corruptions/--severities among those present")
    errors, images, left_out = {c: {} for c in names}, 0, 0
    for c in names:
        for s in severities:
            raw, left_out = open_imagenet_c(root, c, s, wnids)
            preds, targets = predict(model, SingleView(raw.dataset, transform), batch_size=batch_size,
                                     workers=workers, device=device, amp=amp, desc=f"{c} {s}")
            errors[c][str(s)] = _error(preds[:, 0] != targets)
            images = max(images, len(targets))
    notes = ["ImageNet-C images evaluated as they are (no corruption applied here); no clean error measured"]
    if left_out:
        notes.append(f"{left_out} wnid folders per corruption are not classes of the model and were left out")
    skipped = [c for c in corruption_names("common") if c not in names]
    if skipped:
        notes.append(f"common corruptions not evaluated: {', '.join(skipped)}")
    results = {"mode": "imagenet_c", "images": images, "corruptions": names, "severities": severities,
               "clean_error": None, "errors": errors}
    return _with_summary(results, reference, notes)


def evaluate_imagenet_a(
    model: nn.Module,
    dataset: Dataset,
    class_indices: np.ndarray,
    transform,
    *,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: str = "none",
) -> dict[str, Any]:
    """Top-1 error (%) on ImageNet-A, the prediction taken among ``class_indices`` (200)."""
    preds, targets = predict(model, SingleView(dataset, transform), batch_size=batch_size, workers=workers,
                             device=device, amp=amp, class_indices=class_indices, desc="imagenet_a")
    error = _error(preds[:, 0] != targets)
    return {"mode": "imagenet_a", "images": int(len(targets)), "classes": int(len(class_indices)),
            "top1": 100.0 - error, "top1_error": error,
            "notes": [f"prediction among the {len(class_indices)} outputs of ImageNet-A's classes"]}


def format_results(results: dict[str, Any]) -> str:
    """The printed form: a corruption x severity table, or ImageNet-A's one line."""
    if results["mode"] == "imagenet_a":
        lines = [f"ImageNet-A: top-1 error {results['top1_error']:.2f}% (top-1 {results['top1']:.2f}%) on "
                 f"{results['images']} images of {results['classes']} classes"]
        return "\n".join(lines + [f"note: {n}" for n in results.get("notes", [])])
    return format_table(results)


# --- saved weights ---------------------------------------------------------------------------


def _run_dir(weights: Path) -> Path:
    """The run folder the weights belong to (``best.safetensors`` or ``checkpoints/step-*/``)."""
    for folder in (weights.parent, weights.parent.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return weights.parent


def _run_config(run_dir: Path) -> dict[str, Any]:
    from ..runs import RunFolder

    return RunFolder(run_dir).read_config("restore it, or pass --data and --img-size")


SETTINGS = ("mode", "weights", "data", "data_root", "seed", "corruptions", "severities")


def _output_path(run_dir: Path, mode: str, output: str | Path | None, settings: dict[str, Any]) -> Path:
    """Where the results go. The default file of the run folder is replaced only by results
    of the same settings: other results already there are not overwritten."""
    if output is not None:
        path = Path(output).expanduser()
        if path.is_dir():
            raise ConfigError(f"--output {path} is a folder; give a .json file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    path = run_dir / f"{mode}.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        differ = [f"{k}={old.get(k)!r}" for k in SETTINGS if k in settings and old.get(k) != settings[k]]
        if differ:
            raise ConfigError(
                f"{path} already holds results for other settings ({', '.join(differ)}); "
                "pass --output FILE to keep both, or move it away"
            )
    return path


def evaluate_checkpoint_corruptions(
    checkpoint: str | Path,
    *,
    which: str = "best",
    data: str | None = None,
    data_root: str | None = None,
    img_size: int | None = None,
    crop_pct: float | None = None,
    corruptions: str | Sequence[str] | None = None,
    severities: str | Sequence[int] | None = None,
    reference: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 256,
    workers: int = 4,
    device: str = "auto",
    amp: str = "auto",
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Corruption robustness of saved weights: results JSON in the run folder, table printed.

    ``data`` ``imagenet_c`` / ``imagenet_a`` read those folders (``data_root``); any other
    dataset (default: the model's) is corrupted on the fly. Every option is checked
    before the model is loaded.
    """
    from ..checkpoint import atomic_write, read_metadata
    from ..data.imagenet_variants import VARIANTS
    from ..factory import resolve_weights

    mode = data if data in VARIANTS else "corruptions"
    if mode == "imagenet_a" and (corruptions is not None or severities is not None or reference is not None):
        raise ConfigError("--data imagenet_a takes no --corruptions, --severities or --corruption-reference")
    if mode != "corruptions" and not data_root:
        raise ConfigError(f"--data {mode} needs --data-root DIR (the extracted {mode.replace('_', '-')} folder)")
    if mode != "imagenet_a":
        severities = resolve_severities(severities)
        if mode == "corruptions" or corruptions not in (None, "common", "all", "validation"):
            corruptions = resolve_corruptions(corruptions)
    if not 0 <= int(seed) < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), got {seed}")
    if img_size is not None and img_size < 1 or crop_pct is not None and not 0 < crop_pct <= 1:
        raise ConfigError(f"--img-size must be positive and --crop-pct in (0, 1], got {img_size} and {crop_pct}")
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("the corruption evaluation runs on one process; start it without torchrun")
    ref = load_reference(reference, mode) if reference is not None else None
    if ref is not None and isinstance(corruptions, list):
        ref.check(corruptions, severities)

    weights = resolve_weights(checkpoint, which).resolve()
    run_dir = _run_dir(weights)
    run = _run_config(run_dir)
    if mode == "corruptions":
        data = data or read_metadata(weights).get("data") or run.get("data")
        if data is None:
            raise ConfigError(f"{weights} does not say which data it was trained on; pass --data")
    if ref is not None:
        ref.check_data(data)
    settings = {"mode": mode, "weights": str(weights), "data": data,
                "data_root": str(data_root) if data_root else None,
                "seed": int(seed) if mode == "corruptions" else None,
                "corruptions": corruptions if isinstance(corruptions, list) else None, "severities": severities}
    path = _output_path(run_dir, mode, output, {k: v for k, v in settings.items() if v is not None})

    start = time.perf_counter()
    results = _evaluate(weights, mode, run, data=data, data_root=data_root, img_size=img_size, crop_pct=crop_pct,
                        corruptions=corruptions, severities=severities, reference=ref, seed=int(seed),
                        batch_size=batch_size, workers=workers, device=device, amp=amp)
    elapsed = time.perf_counter() - start
    results = {"weights": str(weights), **results, "elapsed_s": round(elapsed, 3)}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    print(format_results(results))
    print(f"results: {path}")
    return results


def _evaluate(weights: Path, mode: str, run: dict[str, Any], *, data, data_root, img_size, crop_pct, corruptions,
              severities, reference, seed, batch_size, workers, device, amp) -> dict[str, Any]:
    """Load the model, then evaluate it on the data of ``mode``."""
    from ..distributed import init_distributed
    from ..engine import resolve_amp
    from ..factory import load_model

    dev = init_distributed(device).device
    model, meta = load_model(weights, device=dev, img_size=img_size)
    size = img_size or meta.get("img_size") or 224
    look = dict(interpolation=run.get("interpolation", "bicubic"), crop_pct=crop_pct or run.get("crop_pct", 0.875))
    common = dict(batch_size=batch_size, workers=workers, device=dev, amp=resolve_amp(amp, dev))
    if mode == "corruptions":
        return _on_the_fly(model, meta, data, data_root or run.get("data_root"), size, look, corruptions, severities,
                           seed, reference, common)
    stats = meta.get("data") or run.get("data") or "imagenet"  # normalisation statistics of the training data
    if mode == "imagenet_a":
        return _imagenet_a(model, meta, data_root, build_transform_for(stats, size, look), common)
    return _imagenet_c(model, meta, data_root, stats, size, look, corruptions, severities, reference, common)


def build_transform_for(data: str, size: int, look: dict[str, Any]):
    from ..data import build_transform

    return build_transform(data, size, False, **look)


def _on_the_fly(model, meta, data, root, size, look, corruptions, severities, seed, reference, common):
    from ..data import open_dataset
    from ..data.classes import check_same_classes, recorded_names

    raw = open_dataset(data, root, "val")
    check_same_classes(recorded_names(meta.get("classes")), raw.classes, "the checkpoint", data,
                       "Evaluate on the dataset the model was trained for (--data).")
    stats = meta.get("data") or data  # normalised as in training, whatever --data names
    out = evaluate_corruptions(model, raw.dataset, build_transform_for(stats, size, look), corruptions=corruptions,
                               severities=severities, seed=seed, reference=reference, **common)
    return {"data": data, "data_root": None if root is None else str(root), **out}


def _imagenet_a(model, meta, root, transform, common):
    from ..data.imagenet_variants import model_wnids, open_imagenet_a

    raw, class_indices, left_out = open_imagenet_a(root, model_wnids(meta.get("classes"), meta["num_classes"]))
    out = evaluate_imagenet_a(model, raw.dataset, class_indices, transform, **common)
    if left_out:
        out["notes"].append(f"{left_out} wnid folders are not classes of the model and were left out")
    return {"data": "imagenet_a", "data_root": str(root), **out}


def _imagenet_c(model, meta, root, stats, size, look, corruptions, severities, reference, common):
    """ImageNet-C's 224x224 crops, resized to the model's input (no crop), then normalised."""
    from torchvision.transforms import Compose, InterpolationMode, Resize

    from ..data.imagenet_variants import model_wnids

    _, to_tensor = split_eval_transform(build_transform_for(stats, size, look))
    transform = Compose([Resize((size, size), interpolation=InterpolationMode(look["interpolation"])), to_tensor])
    out = evaluate_imagenet_c(model, root, model_wnids(meta.get("classes"), meta["num_classes"]), transform,
                              corruptions=corruptions, severities=severities, reference=reference, **common)
    if size != 224:
        out["notes"].append(f"the 224x224 ImageNet-C images are resized to the model's {size}x{size} input")
    return {"data": "imagenet_c", "data_root": str(root), **out}
