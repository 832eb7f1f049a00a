"""``sarvit pretrain --method dino|mocov3``: self-supervised pre-training, with or without SAR,
as a task of the generic run (``sarvit.loop``: same run folder, checkpoints, exact resume,
torchrun and logs as ``sarvit train``).

- DINO (``sarvit.ssl.DINO``): multi-crop views, a student and its EMA teacher (momentum
  cosine from ``--momentum-teacher`` to 1 over the run), the head's last layer frozen for
  ``--freeze-last-layer`` epochs, weight decay cosine from ``--weight-decay`` to
  ``--weight-decay-end``.
- MoCo v3 (``sarvit.ssl.MoCoV3``): two views, a momentum encoder (momentum cosine from
  ``--moco-m`` to 1, updated before each step's keys as the published code does), the
  random patch projection kept fixed (``--stop-grad-conv1``).
- With ``--sar true`` the student (DINO) or the query encoder (MoCo v3) gets the Eq. 10-11
  last block (and so does its momentum copy: same architecture), and ``lambda * L_se`` of
  its maps on the global views is added (appendix C).

Validation, every ``--eval-interval`` epochs: weighted 20-NN top-1 (DINO's protocol) of
the evaluated backbone's features (DINO: the teacher's; MoCo v3: the base encoder's),
the training images against the validation images, both with the evaluation transform;
and that backbone's spatial entropy and components per head on the validation images.
The run folder gets ``backbone.safetensors`` (that backbone, timm's key names, sarvit
metadata) after every epoch, for ``sarvit linprobe``, ``finetune``, ``attention`` and
``jaccard``; ``best.safetensors`` is the backbone of the best k-NN top-1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, default_output, resolved_layout
from .data import SeededTransform, build_loader, build_transform
from .data.pipeline import DATASET_STATS, IMAGENET_STATS
from .distributed import Dist, all_reduce_sum, gather_objects
from .engine import LoopState, autocast, resolve_amp
from .entropy import spatial_entropy
from .factory import create_model
from .knn import knn_predict
from .loop import (BASE_RESUMABLE, Data, Plan, epoch_text, grad_scaler, learning_rate, run, seed_everything,
                   steps_per_epoch)
from .runlog import read_metrics
from .runs import RunFolder
from .surgery import sar_block

__all__ = ["pretrain", "PretrainTask"]

SE_KIND = "dot"  # the maps of Eq. 4, as the sar objective of sarvit train
KNN_K, KNN_T = 20, 0.07  # DINO's k-NN monitor


def pretrain(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a self-supervised pre-training run; returns its summary."""
    from . import config

    return run(cfg, PretrainTask, check=config.validate_with_libraries)


class PretrainTask:
    """DINO or MoCo v3 (``cfg.task``), with or without SAR."""

    command = "pretrain"
    resumable = BASE_RESUMABLE

    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        self.cfg, self.dist = cfg, dist
        self.layout = resolved_layout(cfg)
        self.objective = nn.Module()  # no state beside the method module's own

    def default_output(self) -> str:
        return default_output(self.cfg)

    # --- set-up -------------------------------------------------------------------------

    def build(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.data = _build_data(cfg, dist)
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.model = _build_method(cfg, self.layout).to(dist.device)
        self.amp = resolve_amp(cfg.amp, dist.device)
        self.ema = None  # the teacher / momentum encoder is the method's own
        self.optimizer, self.scheduler = _build_optimizer(cfg, self.model, self.data, dist)
        self.scaler = grad_scaler(self.amp, dist.device)
        self.step = PretrainStep(self.model, cfg, self.optimizer, self.data.steps_per_epoch, dist.device, self.amp)
        self.net = self.model

    def check_checkpoint(self, meta: dict[str, Any], path: Path) -> None:
        if meta.get("task") != self.cfg.task:
            raise ConfigError(f"checkpoint {path} holds a {meta.get('task')} run, not {self.cfg.task}")

    def metadata(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"model": cfg.model, "model_kwargs": _backbone_kwargs(cfg), "img_size": cfg.img_size,
                "num_classes": 0, "layout": self.layout, "query": sar_block(self.backbone()).query,
                "sar": cfg.sar, "lambda": cfg.lambda_, "data": cfg.data, "task": cfg.task,
                "objective": f"{cfg.task}+sar" if cfg.sar else cfg.task}

    def backbone(self) -> nn.Module:
        """The backbone that is evaluated and exported (DINO: the teacher's; MoCo v3: the base encoder's)."""
        return self.model.backbone_for_evaluation()

    # --- per epoch ------------------------------------------------------------------------

    def validate(self, epoch: int) -> dict[str, float]:
        return _validate(self.backbone(), self.data, self.dist, self.amp, epoch)

    def score(self, row: dict[str, Any]) -> float | None:
        return row.get("val_knn_top1")

    def save_best(self, run: RunFolder, metadata: dict[str, Any]) -> None:
        ckpt.save_weights(self.backbone(), run.best, metadata)

    def after_epoch(self, run: RunFolder, metadata: dict[str, Any]) -> None:
        ckpt.save_weights(self.backbone(), run.backbone, metadata)

    # --- what the run prints ----------------------------------------------------------------

    def banner(self, plan: Plan, dist: Dist) -> str:
        cfg, data = self.cfg, self.data
        params = sum(p.numel() for p in self.backbone().parameters()) / 1e6
        sar = f"SAR (lambda={cfg.lambda_}, last block {self.layout}, on the global views)" if cfg.sar else "no SAR"
        views = (f"2 x {cfg.img_size} + {cfg.local_crops_number} x {cfg.local_crop_size} crops"
                 if cfg.task == "dino" else f"2 views of {cfg.img_size}")
        lines = [
            f"sarvit pretrain: {cfg.task} on {cfg.model} ({params:.2f}M backbone params) - {sar}",
            f"  data {cfg.data}: {data.train_size} train / {data.val_size} val images (labels only for the "
            f"{KNN_K}-NN monitor), {views}, {data.steps_per_epoch} steps/epoch of {cfg.batch_size} x "
            f"{dist.world} process(es)",
            f"  device {dist.device}, amp {self.amp}, {cfg.epochs} epochs, run folder {plan.run.root}",
        ]
        lines += [f"  warning: {warning}" for warning in data.warnings]
        return "\n".join(lines + [f"  {note}" for note in plan.notes])

    def epoch_line(self, row: dict[str, Any]) -> str:
        text = epoch_text(row)
        if "val_knn_top1" in row:
            text += (f" | {KNN_K}-NN top-1 {row['val_knn_top1']:.2f} SE {row['val_se']:.3f} "
                     f"components/head {row['val_components']:.2f}")
        return text

    def summary(self, run: RunFolder, state: LoopState, seconds: float) -> dict[str, Any]:
        rows = read_metrics(run.metrics)
        last_eval = next((r for r in reversed(rows) if "val_knn_top1" in r), {})
        return {
            "run_dir": str(run.root), "task": self.cfg.task, "sar": self.cfg.sar, "layout": self.layout,
            "epochs": self.cfg.epochs, "best_knn_top1": state.best_score, "best_epoch": state.best_epoch,
            "final": {k.removeprefix("val_"): v for k, v in last_eval.items() if k.startswith("val_")},
            "backbone": str(run.backbone),
            "train_seconds_this_session": seconds,
            "train_seconds_total": sum(r.get("epoch_time", 0.0) for r in rows),
            "warnings": list(self.data.warnings),
        }

    def summary_text(self, summary: dict[str, Any]) -> str:
        final = summary["final"]
        return (f"done: {summary['run_dir']}\n"
                f"  final {KNN_K}-NN top-1 {final.get('knn_top1', float('nan')):.2f}, SE "
                f"{final.get('se', float('nan')):.3f}, components/head {final.get('components', float('nan')):.2f}\n"
                f"  best {KNN_K}-NN top-1 {summary['best_knn_top1']:.2f} (epoch {summary['best_epoch']}), "
                f"{summary['train_seconds_total']:.0f} s of training\n"
                f"  backbone: {summary['backbone']} (sarvit linprobe --checkpoint, sarvit finetune --pretrained)")

    def finish(self, run: RunFolder) -> None:
        from .analysis.curves import write_curves

        write_curves(run.root)


class PretrainStep:
    """One step of DINO or MoCo v3 (``sarvit.engine.Step``)."""

    def __init__(self, method: nn.Module, cfg: TrainConfig, optimizer, steps_per_epoch: int, device: torch.device,
                 amp: str) -> None:
        self.method, self.cfg, self.optimizer = method, cfg, optimizer
        self.steps_per_epoch, self.device, self.amp = steps_per_epoch, device, amp
        self.se_kind = SE_KIND if cfg.sar and cfg.lambda_ > 0 else None
        self.values: dict[str, float] = {}

    def terms(self, net: nn.Module, batch, progress: float) -> dict[str, torch.Tensor]:
        views = [v.to(self.device, non_blocking=True) for v in batch[0]]
        cfg = self.cfg
        lam = _sar_weight(cfg, progress)
        self._set_weight_decay(progress)
        with autocast(self.device, self.amp):
            outputs = net(views, self.se_kind)
        if cfg.task == "dino":
            terms = self.method.loss(outputs, progress, lam)
            self.values = {"lambda": lam, "teacher_temp": self.method.teacher_temperature(progress)}
        else:
            terms = self.method.loss(outputs, lam)
            self.values = {"lambda": lam}
        return terms

    def before_optimizer_step(self, progress: float) -> None:
        if self.cfg.task == "dino":
            self.method.cancel_last_layer_gradients(progress, self.cfg.freeze_last_layer)

    def after_optimizer_step(self, global_step: int, progress: float) -> None:
        from .ssl.dino import teacher_momentum
        from .ssl.mocov3 import momentum_at

        cfg = self.cfg
        if cfg.task == "dino":  # DINO: the momentum of the step just taken (0-based), cosine to 1 at the end
            total = cfg.epochs * self.steps_per_epoch
            m = teacher_momentum(min(global_step - 1, total - 1), total, cfg.momentum_teacher)
            self.method.update_teacher(m)
        else:  # MoCo v3 updates before each step's keys, with that step's momentum: the next step's
            m = momentum_at(min(progress + 1 / self.steps_per_epoch, cfg.epochs), cfg.epochs, cfg.moco_m)
            self.method.update_momentum(m)
        self.values["momentum"] = m

    def logged(self) -> dict[str, float]:
        return dict(self.values)

    def batch_size(self, batch) -> int:
        return int(batch[0][0].shape[0])

    def _set_weight_decay(self, progress: float) -> None:
        """DINO's cosine weight-decay schedule, on the groups that decay (not biases and norms)."""
        cfg = self.cfg
        if cfg.weight_decay_end is None:
            return
        t = min(progress / cfg.epochs, 1.0)
        wd = cfg.weight_decay_end + 0.5 * (cfg.weight_decay - cfg.weight_decay_end) * (1 + math.cos(math.pi * t))
        for group in self.optimizer.param_groups:
            if group.get("decays", False):
                group["weight_decay"] = wd


def _sar_weight(cfg: TrainConfig, epoch: float) -> float:
    from .objectives import lambda_at

    if not cfg.sar:
        return 0.0
    return lambda_at(cfg.lambda_schedule, cfg.lambda_, epoch, cfg.epochs, cfg.lambda_warmup_epochs)


def _backbone_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The backbone's timm arguments: DINO's crops of two sizes need ``dynamic_img_size``."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.task == "dino" and cfg.local_crops_number > 0 and cfg.local_crop_size != cfg.img_size:
        kwargs.setdefault("dynamic_img_size", True)
    return kwargs


def _build_method(cfg: TrainConfig, layout: str) -> nn.Module:
    from .ssl import DINO, MoCoV3

    backbone = create_model(cfg.model, 0, img_size=cfg.img_size, drop_path=cfg.drop_path,
                            model_kwargs=_backbone_kwargs(cfg), layout=layout, query=cfg.query)
    if cfg.task == "dino":
        patch = _patch_size(backbone)
        if cfg.local_crops_number and cfg.local_crop_size > cfg.img_size:
            raise ConfigError(f"local_crop_size {cfg.local_crop_size} is larger than the global crops (img_size "
                              f"{cfg.img_size}); DINO's local crops are the small ones (96 against 224)")
        if cfg.local_crops_number and patch and cfg.local_crop_size % patch:
            raise ConfigError(f"local_crop_size {cfg.local_crop_size} is not a multiple of {cfg.model}'s patch size "
                              f"{patch}; choose a multiple (DINO: 96 for patch 16)")
        return DINO(backbone, out_dim=cfg.out_dim, norm_last_layer=cfg.norm_last_layer,
                    warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
                    warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs)
    return MoCoV3(backbone, dim=cfg.moco_dim, mlp_dim=cfg.moco_mlp_dim, temperature=cfg.moco_t,
                  freeze_patch_embed=cfg.stop_grad_conv1)


def _patch_size(model: nn.Module) -> int | None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return int(patch[0]) if isinstance(patch, (tuple, list)) else patch


def _build_optimizer(cfg: TrainConfig, method: nn.Module, data: Data, dist: Dist):
    """AdamW (or ``--opt``) over the trained parameters (DINO: no decay on biases and norms; MoCo v3:
    decay on all, as its code), and timm's schedule per step. Groups that decay are marked ``decays``."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    lr = learning_rate(cfg, dist.world)
    decay, no_decay = [], []
    for p in method.parameters():  # DINO: no decay on biases and norms; MoCo v3 decays every parameter
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and cfg.task == "dino" else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "decays": True},
              {"params": no_decay, "weight_decay": 0.0, "decays": False}]
    optimizer = create_optimizer_v2(groups, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=data.steps_per_epoch,
    )
    return optimizer, scheduler


# --- data --------------------------------------------------------------------------------


def _build_data(cfg: TrainConfig, dist: Dist) -> Data:
    """Views of the training images for the method; the evaluation transform of the training
    images (the k-NN bank) and of the validation images."""
    from .ssl.views import collate_views, dino_views, mocov3_views
    from .train import open_splits

    raw_train, raw_val, indices, val_indices = open_splits(cfg)
    mean, std = DATASET_STATS.get(cfg.data, IMAGENET_STATS)
    if cfg.task == "dino":
        views = dino_views(cfg.img_size, cfg.local_crop_size, cfg.local_crops_number,
                           global_scale=cfg.global_crops_scale, local_scale=cfg.local_crops_scale, mean=mean, std=std)
    else:
        views = mocov3_views(cfg.img_size, cfg.moco_min_crop, mean=mean, std=std)
    evaluation = build_transform(cfg.data, cfg.img_size, False, interpolation=cfg.interpolation,
                                 crop_pct=cfg.crop_pct)
    train_ds = SeededTransform(raw_train.dataset, views, cfg.seed, indices)
    bank_ds = SeededTransform(raw_train.dataset, evaluation, cfg.seed, indices)
    val_ds = SeededTransform(raw_val.dataset, evaluation, cfg.seed, val_indices)
    pin = dist.device.type == "cuda"
    common = dict(seed=cfg.seed, rank=dist.rank, world=dist.world, workers=cfg.workers, pin_memory=pin)
    train_loader, train_sampler = build_loader(train_ds, cfg.batch_size, train=True, collate_fn=collate_views,
                                               **common)
    bank_loader, bank_sampler = build_loader(bank_ds, cfg.batch_size, train=False, **common)
    val_loader, val_sampler = build_loader(val_ds, cfg.batch_size, train=False, **common)
    steps = steps_per_epoch(len(train_ds), cfg.batch_size, dist.world)
    classes = raw_train.classes or [str(i) for i in range(int(raw_train.targets.max()) + 1)]
    data = Data(train_loader, train_sampler, val_loader, val_sampler, steps, len(train_ds), len(val_ds), classes)
    data.bank_loader, data.bank_sampler = bank_loader, bank_sampler
    return data


# --- validation ------------------------------------------------------------------------------


@torch.no_grad()
def _features(backbone: nn.Module, loader, device: torch.device, amp: str, with_maps: bool):
    """Features ``(n, C)``, labels ``(n,)`` of this rank's share; with maps also the sums of the
    entropy and of the component count (mean over heads) over the images."""
    feats, labels = [], []
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device, amp):
            if with_maps:
                f, S = backbone.forward_with_similarity(x)
            else:
                f, S = backbone(x), None
        if S is not None:
            H, count = spatial_entropy(S, return_num_components=True)  # (B, heads)
            sums += torch.stack([H.double().mean(dim=1).sum(), count.double().mean(dim=1).sum()])
        feats.append(f.float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels), sums


def _validate(backbone: nn.Module, data: Data, dist: Dist, amp: str, epoch: int) -> dict[str, float]:
    """k-NN top-1 of the validation images against the training images, SE and components."""
    was_training = backbone.training
    backbone.eval()
    data.bank_sampler.set_epoch(epoch)
    bank, bank_labels, _ = _features(backbone, data.bank_loader, dist.device, amp, with_maps=False)
    data.val_sampler.set_epoch(epoch)
    val, val_labels, sums = _features(backbone, data.val_loader, dist.device, amp, with_maps=True)
    if dist.world > 1:  # every rank scores its validation share against the whole bank
        shares = gather_objects((bank.cpu(), bank_labels.cpu()))
        bank = torch.cat([b for b, _ in shares]).to(dist.device)
        bank_labels = torch.cat([lab for _, lab in shares]).to(dist.device)
    predicted = knn_predict(bank, bank_labels, val, len(data.classes), k=KNN_K, temperature=KNN_T)
    totals = torch.cat([torch.tensor([float(val.shape[0]), float((predicted == val_labels).sum())],
                                     dtype=torch.float64, device=dist.device), sums])
    all_reduce_sum(totals)
    backbone.train(was_training)
    n = max(totals[0].item(), 1.0)
    return {"val_knn_top1": 100.0 * totals[1].item() / n, "val_se": totals[2].item() / n,
            "val_components": totals[3].item() / n}

