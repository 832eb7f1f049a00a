"""``sarvit train``: the DeiT recipe with the SE term, as a task of the generic run (``sarvit.loop``).

Built from timm's parts (model, AdamW with weight-decay groups, cosine schedule with
warm-up, Mixup/CutMix, soft-target or label-smoothed CE, RandAugment and random erasing,
model EMA) and torch's (autocast, GradScaler). The run itself (run folder, resume,
checkpoints, DDP, ``torch.compile``, logs) is ``sarvit.loop``'s; this module owns the data,
the model and its objective, validation, and what the run prints.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import config
from .config import ConfigError, TrainConfig, default_output, resolved_layout
from .data import SeededTransform, build_loader, build_transform, open_dataset, stratified_subset
from .distributed import Dist
from .engine import LoopState, SupervisedStep, TrainForward, evaluate, resolve_amp
from .factory import create_model
from .loop import (BASE_RESUMABLE, Data, Plan, epoch_text, grad_scaler, learning_rate, run, seed_everything,
                   steps_per_epoch)
from .objectives import SupervisedObjective, build_objective, classification_loss, drloc_lambda_at, lambda_at
from .runlog import read_metrics
from .runs import RunFolder
from .surgery import sar_block

__all__ = ["train"]

# options that may change when a run is resumed: they do not alter the experiment
RESUMABLE_CHANGES = BASE_RESUMABLE


class SupervisedTask:
    """Supervised classification (``sarvit train``): the DeiT recipe with the SE term, as a
    task of the generic run (``sarvit.loop``)."""

    command = "train"
    resumable = RESUMABLE_CHANGES

    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        self.cfg, self.dist = cfg, dist
        self.layout = resolved_layout(cfg)
        self.loaded = None  # what --pretrained loaded (sarvit.pretrained.LoadReport)
        if cfg.pretrained is not None:  # appendix E.4: the last block the backbone was pre-trained with
            from .pretrained import finetune_layout, pretrained_layout

            _check_pretrained_architecture(cfg)
            self.layout = finetune_layout(pretrained_layout(cfg.pretrained), cfg.sar, cfg.layout)

    def default_output(self) -> str:
        return default_output(self.cfg)

    def build(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.data = build_data(cfg, dist)
        seed_everything(cfg.seed)  # the same initial weights (and EMA copy) on every rank
        self.model = create_model(
            cfg.model, len(self.data.classes), img_size=cfg.img_size, drop_path=cfg.drop_path,
            model_kwargs=cfg.model_kwargs, layout=self.layout, query=cfg.query,
        )
        if cfg.pretrained is not None:
            from .pretrained import load_pretrained

            self.loaded = load_pretrained(self.model, cfg.pretrained, cfg.pretrained_which)
        self.model.to(dist.device)
        self.amp = resolve_amp(cfg.amp, dist.device)
        (self.optimizer, self.scheduler, self.scaler, self.ema, mixup,
         self.objective) = _build_training(cfg, self.model, self.data, dist, self.amp)
        needs = self.objective.needs if _auxiliary_on(cfg) else None  # None: the plain forward
        self.step = SupervisedStep(self.objective, lambda e: _weight_at(cfg, e), dist.device, self.amp,
                                   needs=needs, mixup=mixup, ema=self.ema, model=self.model)
        self.net = TrainForward(self.model, self.objective.inner)  # DDP sees the objective's own parameters too

    def check_checkpoint(self, meta: dict[str, Any], path: Path) -> None:
        if meta.get("num_classes") != len(self.data.classes):
            raise ConfigError(f"checkpoint {path} has {meta.get('num_classes')} classes, the data has "
                              f"{len(self.data.classes)}")

    def metadata(self) -> dict[str, Any]:
        return _metadata(self.cfg, self.data.classes, self.layout, self.model)

    def validate(self, epoch: int) -> dict[str, float]:
        return _validate(self.model, self.ema, self.data, self.dist, self.amp, epoch)

    def score(self, row: dict[str, Any]) -> float | None:
        return row["val_top1"]

    def save_best(self, run: RunFolder, metadata: dict[str, Any]) -> None:
        ckpt.save_weights(self.model, run.best, metadata)
        if self.ema is not None:
            ckpt.save_weights(self.ema.module, run.best_ema, metadata)

    def after_epoch(self, run: RunFolder, metadata: dict[str, Any]) -> None:
        pass

    def banner(self, plan: Plan, dist: Dist) -> str:
        text = _banner(self.cfg, dist, self.data, self.layout, self, plan)
        if self.loaded is not None and plan.resume_from is None:
            text += "\n  pre-trained weights: " + self.loaded.text().replace("\n", "\n  ")
        return text

    def epoch_line(self, row: dict[str, Any]) -> str:
        return _epoch_line(row)

    def summary(self, run: RunFolder, state: LoopState, seconds: float) -> dict[str, Any]:
        return _summary(self.cfg, run, state, seconds, self.data.warnings)

    def summary_text(self, summary: dict[str, Any]) -> str:
        return _summary_text(summary)

    def finish(self, run: RunFolder) -> None:
        from .analysis.curves import write_curves

        write_curves(run.root)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary the run folder also holds."""
    return run(cfg, SupervisedTask, check=config.validate_with_libraries)


# --- data, model, optimisation ----------------------------------------------------------------


def open_splits(cfg: TrainConfig):
    """``(raw_train, raw_val, indices, val_indices)``: the two splits of ``cfg.data`` (the same classes) and
    the stratified subsets ``--per-class`` / ``--train-fraction`` (seeded) and ``--val-per-class`` (seed 0 for
    every run: all seeds are scored on the same images) ask for, or None."""
    from .data.classes import check_same_classes

    raw_train = open_dataset(cfg.data, cfg.data_root, "train", cfg.download)
    raw_val = open_dataset(cfg.data, cfg.data_root, "val", cfg.download)
    check_same_classes(raw_train.classes, raw_val.classes, f"the train split of {cfg.data}", "its val split",
                       "Give both splits the same classes (for a folder: the same class folders, spelled the same).")
    indices = None
    if cfg.per_class is not None or cfg.train_fraction is not None:
        indices = stratified_subset(raw_train.targets, per_class=cfg.per_class, fraction=cfg.train_fraction,
                                    seed=cfg.seed)
    val_indices = None
    if cfg.val_per_class is not None:
        val_indices = stratified_subset(raw_val.targets, per_class=cfg.val_per_class, seed=0, option="val_per_class")
    return raw_train, raw_val, indices, val_indices


def build_data(cfg: TrainConfig, dist: Dist) -> Data:
    """The labelled training and validation data of ``cfg``, as the loop needs it."""
    from .data.classes import class_count_warnings, class_counts

    raw_train, raw_val, indices, val_indices = open_splits(cfg)
    classes = raw_train.classes or [str(i) for i in range(int(raw_train.targets.max()) + 1)]
    train_counts = class_counts(raw_train.targets if indices is None else raw_train.targets[indices], len(classes),
                                "the training set")
    val_counts = class_counts(raw_val.targets if val_indices is None else raw_val.targets[val_indices], len(classes),
                              f"the val split of {cfg.data}")
    warnings = class_count_warnings(train_counts, val_counts, classes)
    if dist.main:
        for warning in warnings:
            print(f"sarvit train: warning: {warning}", file=sys.stderr, flush=True)
    aug = dict(auto_augment=cfg.auto_augment, reprob=cfg.reprob, color_jitter=cfg.color_jitter, hflip=cfg.hflip,
               scale=cfg.scale, interpolation=cfg.interpolation)
    train_ds = SeededTransform(raw_train.dataset, build_transform(cfg.data, cfg.img_size, True, **aug),
                               cfg.seed, indices)
    val_ds = SeededTransform(raw_val.dataset, build_transform(cfg.data, cfg.img_size, False,
                                                              interpolation=cfg.interpolation, crop_pct=cfg.crop_pct),
                             cfg.seed, val_indices)
    pin = dist.device.type == "cuda"
    train_loader, train_sampler = build_loader(train_ds, cfg.batch_size, train=True, seed=cfg.seed, rank=dist.rank,
                                               world=dist.world, workers=cfg.workers, pin_memory=pin)
    val_loader, val_sampler = build_loader(val_ds, cfg.batch_size, train=False, seed=cfg.seed, rank=dist.rank,
                                           world=dist.world, workers=cfg.workers, pin_memory=pin)
    steps = steps_per_epoch(len(train_ds), cfg.batch_size, dist.world)
    return Data(train_loader, train_sampler, val_loader, val_sampler, steps, len(train_ds), len(val_ds),
                classes, warnings)


def _build_training(cfg: TrainConfig, model, data: Data, dist: Dist, amp: str):
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    lr = learning_rate(cfg, dist.world)
    mixup_active = (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0
    objective = _build_objective(cfg, model, mixup_active).to(dist.device)
    optimizer = create_optimizer_v2(_optimized(model, objective), opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=data.steps_per_epoch,
    )
    scaler = grad_scaler(amp, dist.device)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    mixup = None
    if mixup_active:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=len(data.classes))
    return optimizer, scheduler, scaler, ema, mixup, objective


def _check_pretrained_architecture(cfg: TrainConfig) -> None:
    """Refuse ``--pretrained`` weights whose sarvit metadata names another architecture than
    ``--model``/``--model-kwargs`` (weights without metadata are checked key by key when loaded)."""
    from .pretrained import weights_file

    path = weights_file(cfg.pretrained)
    meta = ckpt.read_metadata(path) if path.suffix == ".safetensors" else {}
    theirs = {k: v for k, v in (meta.get("model_kwargs") or {}).items() if k != "dynamic_img_size"}
    ours = {k: v for k, v in cfg.model_kwargs.items() if k != "dynamic_img_size"}
    if meta.get("model") and (meta["model"], theirs) != (cfg.model, ours):
        raise ConfigError(f"--pretrained {cfg.pretrained} holds a {meta['model']} with model_kwargs {theirs}, not "
                          f"{cfg.model} with {ours}: pass --model {meta['model']} --model-kwargs "
                          f"'{theirs}' (or the recipe the weights were trained with)")


def _auxiliary_on(cfg: TrainConfig) -> bool:
    """Whether the run adds an auxiliary term: ``--sar false`` or a zero weight is the plain baseline."""
    return cfg.sar and (cfg.drloc_lambda if cfg.objective == "drloc" else cfg.lambda_) > 0


def _weight_at(cfg: TrainConfig, epoch: float) -> float:
    """The weight of the auxiliary term after ``epoch`` (fractional) epochs: ``--lambda`` with its
    schedule for the spatial-entropy family, ``--drloc-lambda`` warmed up and decayed for DRLoc."""
    if cfg.objective == "drloc":
        return drloc_lambda_at(cfg.drloc_lambda, epoch, cfg.epochs, cfg.drloc_warmup_epochs)
    return lambda_at(cfg.lambda_schedule, cfg.lambda_, epoch, cfg.epochs, cfg.lambda_warmup_epochs)


def _build_objective(cfg: TrainConfig, model, mixup_active: bool):
    """The objective of ``--objective``; the baseline (no auxiliary term) builds no DRLoc MLP."""
    ce = classification_loss(mixup_active, cfg.smoothing)
    if not _auxiliary_on(cfg):
        return SupervisedObjective(ce)  # its term is never computed: the forward is the plain one
    return build_objective(cfg.objective, ce, dim=_token_width(model), drloc_pairs=cfg.drloc_pairs)


def _token_width(model) -> int:
    """The width C of the tokens leaving the last block (timm: ``num_features``; torchvision: ``hidden_dim``)."""
    width = getattr(model, "num_features", None) or getattr(model, "hidden_dim", None)
    if width is None:
        raise ConfigError(f"{type(model).__name__} does not say the width of its last tokens (num_features)")
    return int(width)


class _Optimized(torch.nn.Module):
    """The model and the objective's own parameters, as one module for timm's optimizer groups
    (weight decay on weights, not on biases and norms, nor on the model's ``no_weight_decay``)."""

    def __init__(self, model, objective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def no_weight_decay(self) -> set[str]:
        skip = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        return {f"model.{name}" for name in skip}


def _optimized(model, objective) -> torch.nn.Module:
    """What the optimizer updates: the model alone, or with the objective's parameters (DRLoc's MLP)."""
    if not any(True for _ in objective.parameters()):
        return model
    return _Optimized(model, objective)


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
        "classes": classes, "layout": layout, "query": sar_block(model).query, "sar": cfg.sar,
        "lambda": cfg.lambda_, "data": cfg.data, "objective": _objective_name(cfg), "task": "supervised",
        "pretrained": cfg.pretrained,
    }


def _objective_name(cfg: TrainConfig) -> str:
    """``--objective``, or ``baseline`` when no auxiliary term is trained."""
    return cfg.objective if cfg.sar else "baseline"


# --- what the run prints ----------------------------------------------------------------------


def _banner(cfg, dist, data: Data, layout, parts, plan: Plan) -> str:
    params = sum(p.numel() for p in parts.model.parameters()) / 1e6
    what = _objective_text(cfg)
    lines = [
        f"sarvit {'finetune' if cfg.pretrained else 'train'}: {cfg.model} ({params:.2f}M params, last block {layout}) "
        f"- {what}",
        f"  query: {_query_text(cfg.query, sar_block(parts.model).query)}",
        f"  data {cfg.data}: {data.train_size} train / {data.val_size} val images, {len(data.classes)} classes, "
        f"{data.steps_per_epoch} steps/epoch of {cfg.batch_size} x {dist.world} process(es)",
        f"  device {dist.device}, amp {parts.amp}, {cfg.epochs} epochs, run folder {plan.run.root}",
    ]
    lines += [f"  warning: {warning}" for warning in data.warnings]
    return "\n".join(lines + [f"  {note}" for note in plan.notes])


def _query_text(asked: str, used: str) -> str:
    """The query of Eq. 4 in words: the class token, or the mean of the patch queries (Sec. 5.2)."""
    if used == "cls":
        return "the class token"
    return "mean of the patch queries" + (" (no class token)" if asked == "auto" else "")


def _objective_text(cfg: TrainConfig) -> str:
    """The objective and its weight, in words, for the banner."""
    if not cfg.sar:
        return "baseline (no auxiliary term)"
    if cfg.objective == "drloc":
        return (f"objective drloc (DRLoc, drloc_lambda={cfg.drloc_lambda}, warm-up {cfg.drloc_warmup_epochs} epochs "
                f"then linear decay, {cfg.drloc_pairs} pairs/image)")
    return f"objective {cfg.objective} (lambda={cfg.lambda_}, {cfg.lambda_schedule})"


def _epoch_line(row: dict[str, Any]) -> str:
    text = epoch_text(row)
    if "val_top1" in row:
        text += (f" | val top-1 {row['val_top1']:.2f} top-5 {row['val_top5']:.2f} "
                 f"SE {row['val_se']:.3f} components/head {row['val_components']:.2f}")
    return text


def _summary(cfg: TrainConfig, run: RunFolder, state: LoopState, seconds: float, warnings: list) -> dict[str, Any]:
    rows = read_metrics(run.metrics)
    last_eval = next((r for r in reversed(rows) if "val_top1" in r), {})
    return {
        "run_dir": str(run.root),
        "sar": cfg.sar,
        "objective": _objective_name(cfg),
        "layout": resolved_layout(cfg),
        "epochs": cfg.epochs,
        "best_top1": state.best_score,
        "best_epoch": state.best_epoch,
        "final": {k.removeprefix("val_"): v for k, v in last_eval.items() if k.startswith("val_")},
        "train_seconds_this_session": seconds,
        "train_seconds_total": sum(r.get("epoch_time", 0.0) for r in rows),
        "warnings": list(warnings),
    }


def _summary_text(summary: dict[str, Any]) -> str:
    final = summary["final"]
    warned = "".join(f"\n  warning: {w}" for w in summary.get("warnings", []))
    return (
        f"done: {summary['run_dir']}\n"
        f"  final val top-1 {final.get('top1', float('nan')):.2f}, top-5 {final.get('top5', float('nan')):.2f}, "
        f"SE {final.get('se', float('nan')):.3f}, components/head {final.get('components', float('nan')):.2f}\n"
        f"  best val top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), "
        f"{summary['train_seconds_total']:.0f} s of training{warned}"
    )
