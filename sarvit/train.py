"""``train(cfg)``: the DeiT recipe with the SE term, on one process or under ``torchrun``.

Built from timm's parts (model, AdamW with weight-decay groups, cosine schedule with
warm-up, Mixup/CutMix, soft-target or label-smoothed CE, RandAugment and random erasing,
model EMA) and torch's (autocast, GradScaler, DistributedDataParallel, torch.compile).
Checkpoints go out every epoch (and every ``checkpoint_interval`` steps) and restore
the run bit for bit: weights, optimizer, scheduler, scaler, EMA, every RNG, and the
position in the data order.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, default_output, resolved_layout, to_dict
from .data import SeededTransform, build_loader, build_transform, open_dataset, stratified_subset
from .distributed import Dist, barrier, gather_objects, init_distributed, shutdown
from .engine import LoopState, TrainForward, evaluate, resolve_amp, train_one_epoch
from .factory import create_model
from .objectives import SupervisedObjective, classification_loss, lambda_at
from .runlog import RunLog, read_metrics

__all__ = ["train"]

# options that may change when a run is resumed: they do not alter the experiment
RESUMABLE_CHANGES = {"resume", "output", "workers", "log_interval", "device", "eval_interval",
                     "checkpoint_interval", "compile", "download", "data_root"}


@dataclass
class Data:
    train_loader: Any
    train_sampler: Any
    val_loader: Any
    val_sampler: Any
    classes: list
    steps_per_epoch: int
    train_size: int
    val_size: int


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary the run folder also holds."""
    dist = init_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        shutdown()


def _train(cfg: TrainConfig, dist: Dist) -> dict[str, Any]:
    run_dir, resume_from = _prepare_run(cfg, dist)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    data = _build_data(cfg, dist, run_dir)
    layout = resolved_layout(cfg)
    _seed_everything(cfg.seed)  # the same initial weights (and EMA copy) on every rank
    model = create_model(
        cfg.model, len(data.classes), img_size=cfg.img_size, drop_path=cfg.drop_path,
        model_kwargs=cfg.model_kwargs, layout=layout, query=cfg.query,
    ).to(dist.device)
    amp = resolve_amp(cfg.amp, dist.device)
    optimizer, scheduler, scaler, ema, mixup, objective = _build_training(cfg, model, data, dist, amp)
    _seed_everything(cfg.seed + dist.rank)  # drop-path and Mixup draw differently on each rank
    state = LoopState()
    if resume_from is not None:
        _restore(resume_from, cfg, dist, model, optimizer, scheduler, scaler, ema, state, len(data.classes))
    net = TrainForward(model)
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)
    metadata = _metadata(cfg, data.classes, layout, model)
    log = RunLog(run_dir, dist.main, resume_epoch=state.epoch, resume_step=state.global_step)
    if dist.main:
        print(_banner(cfg, dist, data, layout, amp, run_dir, resume_from, model))

    def save() -> None:
        _save(run_dir, cfg, dist, model, ema, optimizer, scheduler, scaler, state, metadata)

    def on_step() -> None:
        at_epoch_end = state.step_in_epoch == data.steps_per_epoch
        if cfg.checkpoint_interval and state.global_step % cfg.checkpoint_interval == 0 and not at_epoch_end:
            save()

    use_se = cfg.sar and cfg.lambda_ > 0
    started = time.perf_counter()
    while state.epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        data.train_sampler.set_epoch(state.epoch, start=state.step_in_epoch * cfg.batch_size)
        row = train_one_epoch(
            net=net, optimizer=optimizer, scheduler=scheduler, loader=data.train_loader, objective=objective,
            state=state, steps_per_epoch=data.steps_per_epoch, dist=dist, amp=amp, use_se=use_se,
            lambda_fn=lambda e: lambda_at(cfg.lambda_schedule, cfg.lambda_, e, cfg.epochs, cfg.lambda_warmup_epochs),
            mixup=mixup, scaler=scaler, ema=ema, clip_grad=cfg.clip_grad, log_interval=cfg.log_interval,
            on_step=on_step,
        )
        scheduler.step(state.epoch + 1)
        row = {"epoch": state.epoch + 1, "step": state.global_step, **row}
        last_epoch = state.epoch + 1 == cfg.epochs
        if (state.epoch + 1) % cfg.eval_interval == 0 or last_epoch:
            row.update(_validate(model, ema, data, dist, amp, state.epoch))
            if row["val_top1"] > state.best_top1:
                state.best_top1, state.best_epoch = row["val_top1"], state.epoch + 1
                _save_best(run_dir, dist, model, ema, {**metadata, "epoch": state.epoch + 1})
        row["epoch_time"] = time.perf_counter() - epoch_start
        log.epoch(row, state.global_step)
        if dist.main:
            print(_epoch_line(row))
        state.epoch += 1
        state.step_in_epoch = 0
        save()
    log.close()
    summary = _summary(cfg, run_dir, state, time.perf_counter() - started)
    if dist.main:
        ckpt.atomic_write(run_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        print(_summary_text(summary))
    barrier()
    return summary


# --- run folder and resume ------------------------------------------------------------------


def _prepare_run(cfg: TrainConfig, dist: Dist) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from; writes ``config.yaml``."""
    resume_from = None
    if cfg.resume not in (None, "auto"):
        resume_from = ckpt.latest_checkpoint(cfg.resume)
        if resume_from is None:
            raise ConfigError(f"--resume {cfg.resume}: no complete checkpoint there (looked for checkpoints/last)")
        run_dir = resume_from.parent.parent if resume_from.parent.name == "checkpoints" else Path(cfg.resume)
    else:
        run_dir = Path(cfg.output or default_output(cfg))
        if cfg.resume == "auto":
            resume_from = ckpt.latest_checkpoint(run_dir)
        elif run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                f"run folder {run_dir} already exists and is not empty; add --resume auto to continue "
                "that run, or choose another --output (nothing there is overwritten)"
            )
    if cfg.resume is not None:  # also a run killed before its first checkpoint: same experiment only
        _check_same_experiment(cfg, run_dir)
    barrier()  # every rank has looked at the folder before the main rank writes into it
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(to_dict(dataclasses.replace(cfg, output=str(run_dir))), sort_keys=False)
        ckpt.atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(text))
    barrier()
    return run_dir, resume_from


def _check_same_experiment(cfg: TrainConfig, run_dir: Path) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = to_dict(cfg)
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if diff:
        shown = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"cannot resume {run_dir} with a different experiment ({shown}). "
                          "Resume with the run's own config.yaml, or start a new --output.")


def _restore(path, cfg, dist, model, optimizer, scheduler, scaler, ema, state, num_classes) -> None:
    meta = ckpt.read_metadata(path / ckpt.WEIGHTS)
    if meta.get("num_classes") != num_classes:
        raise ConfigError(f"checkpoint {path} has {meta.get('num_classes')} classes, the data has {num_classes}")
    saved = ckpt.load_state(path)
    if saved["world"] != dist.world:
        raise ConfigError(f"checkpoint {path} was written by {saved['world']} processes; resume it with "
                          f"{saved['world']} (the data order and the batches depend on it), not {dist.world}")
    model.load_state_dict(ckpt.load_weights(path / ckpt.WEIGHTS, dist.device), strict=True)
    if ema is not None:
        ema.module.load_state_dict(ckpt.load_weights(path / ckpt.EMA_WEIGHTS, dist.device), strict=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    for f in dataclasses.fields(LoopState):
        setattr(state, f.name, saved["loop"][f.name])
    _set_rng_state(saved["rng"][dist.rank], dist.device)


def _save(run_dir, cfg, dist, model, ema, optimizer, scheduler, scaler, state, metadata) -> None:
    rngs = gather_objects(_rng_state(dist.device))  # every rank's generators, in rank order
    if dist.main:
        payload = {
            "loop": dataclasses.asdict(state),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rngs,
            "world": dist.world,
            "data_order": {"seed": cfg.seed, "epoch": state.epoch, "samples_done": state.step_in_epoch * cfg.batch_size},
        }
        meta = {**metadata, "epoch": state.epoch, "step": state.global_step}
        ckpt.save_checkpoint(run_dir, state.global_step, model, payload, meta,
                             ema=ema.module if ema is not None else None)
    barrier()


def _save_best(run_dir, dist, model, ema, metadata) -> None:
    if dist.main:
        ckpt.save_weights(model, run_dir / "best.safetensors", metadata)
        if ema is not None:
            ckpt.save_weights(ema.module, run_dir / "best_ema.safetensors", metadata)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- data, model, optimisation ----------------------------------------------------------------


def _build_data(cfg: TrainConfig, dist: Dist, run_dir: Path) -> Data:
    raw_train = open_dataset(cfg.data, cfg.data_root, "train", cfg.download)
    raw_val = open_dataset(cfg.data, cfg.data_root, "val", cfg.download)
    if raw_train.classes and raw_val.classes and len(raw_train.classes) != len(raw_val.classes):
        raise ConfigError(f"{cfg.data}: train has {len(raw_train.classes)} classes, val has {len(raw_val.classes)}")
    indices = None
    if cfg.per_class is not None or cfg.train_fraction is not None:
        indices = stratified_subset(raw_train.targets, per_class=cfg.per_class, fraction=cfg.train_fraction, seed=cfg.seed)
        if dist.main:
            record = {"seed": cfg.seed, "per_class": cfg.per_class, "train_fraction": cfg.train_fraction,
                      "size": int(len(indices)), "indices": indices.tolist()}
            ckpt.atomic_write(run_dir / "subset_indices.json", lambda tmp: tmp.write_text(json.dumps(record)))
    aug = dict(auto_augment=cfg.auto_augment, reprob=cfg.reprob, color_jitter=cfg.color_jitter, hflip=cfg.hflip,
               scale=cfg.scale, interpolation=cfg.interpolation)
    train_ds = SeededTransform(raw_train.dataset, build_transform(cfg.data, cfg.img_size, True, **aug),
                               cfg.seed, indices)
    val_ds = SeededTransform(raw_val.dataset, build_transform(cfg.data, cfg.img_size, False,
                                                              interpolation=cfg.interpolation, crop_pct=cfg.crop_pct),
                             cfg.seed)
    pin = dist.device.type == "cuda"
    train_loader, train_sampler = build_loader(train_ds, cfg.batch_size, train=True, seed=cfg.seed, rank=dist.rank,
                                               world=dist.world, workers=cfg.workers, pin_memory=pin)
    val_loader, val_sampler = build_loader(val_ds, cfg.batch_size, train=False, seed=cfg.seed, rank=dist.rank,
                                           world=dist.world, workers=cfg.workers, pin_memory=pin)
    steps = (len(train_ds) // dist.world) // cfg.batch_size
    if steps == 0:
        raise ConfigError(f"the training set has {len(train_ds)} images: fewer than one batch of {cfg.batch_size} "
                          f"per process ({dist.world} processes); lower --batch-size")
    classes = raw_train.classes or [str(i) for i in range(int(raw_train.targets.max()) + 1)]
    return Data(train_loader, train_sampler, val_loader, val_sampler, classes, steps, len(train_ds), len(val_ds))


def _build_training(cfg: TrainConfig, model, data: Data, dist: Dist, amp: str):
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size * dist.world / 512
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=data.steps_per_epoch,
    )
    scaler = torch.amp.GradScaler(dist.device.type) if amp == "fp16" and dist.device.type == "cuda" else None
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    mixup_active = (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0
    mixup = None
    if mixup_active:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=len(data.classes))
    objective = SupervisedObjective(classification_loss(mixup_active, cfg.smoothing))
    return optimizer, scheduler, scaler, ema, mixup, objective


def _validate(model, ema, data: Data, dist: Dist, amp: str, epoch: int) -> dict[str, float]:
    data.val_sampler.set_epoch(epoch)
    out = {f"val_{k}": v for k, v in evaluate(model, data.val_loader, dist, amp).items() if k != "images"}
    if ema is not None:
        data.val_sampler.set_epoch(epoch)
        out.update({f"val_ema_{k}": v for k, v in evaluate(ema.module, data.val_loader, dist, amp).items()
                    if k != "images"})
    return out


def _metadata(cfg: TrainConfig, classes: list, layout: str, model) -> dict[str, Any]:
    return {
        "model": cfg.model, "model_kwargs": cfg.model_kwargs, "img_size": cfg.img_size, "num_classes": len(classes),
        "classes": classes, "layout": layout, "query": model.blocks[-1].query, "sar": cfg.sar,
        "lambda": cfg.lambda_, "data": cfg.data,
    }


# --- what the run prints ----------------------------------------------------------------------


def _banner(cfg, dist, data: Data, layout, amp, run_dir, resume_from, model) -> str:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    what = f"SAR (lambda={cfg.lambda_}, {cfg.lambda_schedule})" if cfg.sar else "baseline (no SE term)"
    lines = [
        f"sarvit train: {cfg.model} ({params:.2f}M params, last block {layout}) - {what}",
        f"  data {cfg.data}: {data.train_size} train / {data.val_size} val images, {len(data.classes)} classes, "
        f"{data.steps_per_epoch} steps/epoch of {cfg.batch_size} x {dist.world} process(es)",
        f"  device {dist.device}, amp {amp}, {cfg.epochs} epochs, run folder {run_dir}",
    ]
    if resume_from is not None:
        lines.append(f"  resuming from {resume_from}")
    return "\n".join(lines)


def _epoch_line(row: dict[str, Any]) -> str:
    text = f"epoch {row['epoch']}: loss {row['train_loss']:.4f} (ce {row['train_ce']:.4f}"
    if "train_se" in row:
        text += f", se {row['train_se']:.4f}"
    text += f"), {row['images_per_sec']:.0f} img/s"
    if "val_top1" in row:
        text += (f" | val top-1 {row['val_top1']:.2f} top-5 {row['val_top5']:.2f} "
                 f"SE {row['val_se']:.3f} components/head {row['val_components']:.2f}")
    return text


def _summary(cfg: TrainConfig, run_dir: Path, state: LoopState, seconds: float) -> dict[str, Any]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    last_eval = next((r for r in reversed(rows) if "val_top1" in r), {})
    return {
        "run_dir": str(run_dir),
        "sar": cfg.sar,
        "layout": resolved_layout(cfg),
        "epochs": cfg.epochs,
        "best_top1": state.best_top1,
        "best_epoch": state.best_epoch,
        "final": {k.removeprefix("val_"): v for k, v in last_eval.items() if k.startswith("val_")},
        "train_seconds_this_session": seconds,
        "train_seconds_total": sum(r.get("epoch_time", 0.0) for r in rows),
    }


def _summary_text(summary: dict[str, Any]) -> str:
    final = summary["final"]
    return (
        f"done: {summary['run_dir']}\n"
        f"  final val top-1 {final.get('top1', float('nan')):.2f}, top-5 {final.get('top5', float('nan')):.2f}, "
        f"SE {final.get('se', float('nan')):.3f}, components/head {final.get('components', float('nan')):.2f}\n"
        f"  best val top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), "
        f"{summary['train_seconds_total']:.0f} s of training"
    )
