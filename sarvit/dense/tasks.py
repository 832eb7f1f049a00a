"""``sarvit detect`` and ``sarvit segment``: ViTDet transfer (Tables 5 and 6, appendix E.3) as tasks
of the generic run (``sarvit.loop``): same run folders, metrics.jsonl, checkpoints, exact resume
and torchrun as ``sarvit train``.

The backbone comes from ``--backbone`` (a sarvit run folder or weights file, a timm state
dict, a DINO / MoCo v3 checkpoint; ``sarvit.pretrained``): its architecture and last-block
layout from sarvit's metadata (``--model``/``--model-kwargs`` for weights from elsewhere, with
the standard block). The whole network is fine-tuned (E.3: AdamW, lr 1e-4, a linear warm-up
of ``--warmup-steps`` 250 optimizer steps, 25 epochs, ``--dense-size`` 512, batch 8).

- :class:`DetectTask`: Mask R-CNN (Faster R-CNN without masks) on the simple feature pyramid;
  validation: COCO mAP and VOC mAP@0.5 of the boxes (and masks); best checkpoint by mAP@0.5.
- :class:`SegmentTask`: the semantic FPN head; validation: mIoU and pixel accuracy; best
  checkpoint by mIoU.

Each run folder also gets ``predictions.png``: predictions beside the ground truth on
validation images spread over the split, drawn at the end of the run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import file_sha256
from ..errors import ConfigError

__all__ = ["DetectTask", "SegmentTask", "DetectStep", "SegmentStep", "detect", "segment", "check_dense_config",
           "open_dense_data", "shown_detections", "FIGURE", "FIGURE_IMAGES", "SCORE_SHOWN"]

FIGURE = "predictions.png"
FIGURE_IMAGES = 4
SCORE_SHOWN = 0.5  # the detections the figure draws (Detectron2's demo threshold)


def check_dense_config(cfg):
    """The checks of a dense run that need torch and timm, before anything is written; the
    ``coco_json:``/``masks:`` folder made absolute (the run's records work from anywhere)."""
    from .. import config

    config.validate(cfg)
    config.check_optimization_with_timm(cfg)
    kind, sep, folder = cfg.data.partition(":")
    if sep and not folder:
        raise ConfigError(f"--data {cfg.data}: name the folder after the colon, e.g. {kind}:data/stamps")
    if sep:
        import os

        cfg = dataclasses.replace(cfg, data=f"{kind}:{os.path.abspath(os.path.expanduser(folder))}")
    return cfg


def open_dense_data(cfg) -> None:
    """Open the train and val annotations of ``cfg.data`` as ``cfg.task`` (detect, segment) reads them: a
    missing or malformed dataset raises its clear error (``DatasetNotFound``, ``ConfigError``)."""
    from .datasets import open_detection, open_segmentation

    read = open_detection if cfg.task == "detect" else open_segmentation
    for split in ("train", "val"):
        read(cfg.data, cfg.data_root, split)


def detect(cfg) -> dict:
    """Run (or resume) ``sarvit detect``; returns its summary."""
    from ..loop import run
    from ..pretrained import backbone_architecture

    return run(backbone_architecture(cfg), DetectTask, check=check_dense_config)


def segment(cfg) -> dict:
    """Run (or resume) ``sarvit segment``; returns its summary."""
    from ..loop import run
    from ..pretrained import backbone_architecture

    return run(backbone_architecture(cfg), SegmentTask, check=check_dense_config)


def shown_detections(scores: torch.Tensor) -> torch.Tensor:
    """Which detections the figure draws: ``(N,)`` scores -> ``(N,)`` bool, those of ``SCORE_SHOWN`` or
    more, else (an uncertain detector) the best one alone, its score printed beside it."""
    keep = scores >= SCORE_SHOWN
    if len(scores) and not keep.any():
        keep[scores.argmax()] = True
    return keep


def _to(target: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in target.items()}


class DetectStep:
    """One detection step: torchvision's loss dict (RPN objectness and boxes, RoI class, boxes, masks),
    summed into ``loss``."""

    def __init__(self, device: torch.device, amp: str, masks: bool) -> None:
        self.device, self.amp, self.masks = device, amp, masks

    def terms(self, net: nn.Module, batch, progress: float) -> dict[str, torch.Tensor]:
        from ..engine import autocast

        images, targets = batch
        images = [im.to(self.device, non_blocking=True) for im in images]
        keys = ("boxes", "labels", "masks") if self.masks else ("boxes", "labels")
        targets = [_to({k: t[k] for k in keys}, self.device) for t in targets]
        with autocast(self.device, self.amp):
            losses = net(images, targets)
        losses = {k: v.float() for k, v in losses.items()}
        return {"loss": sum(losses.values()), **losses}

    def before_optimizer_step(self, progress: float) -> None:
        pass

    def after_optimizer_step(self, global_step: int, progress: float) -> None:
        pass

    def logged(self) -> dict[str, float]:
        return {}

    def batch_size(self, batch) -> int:
        return len(batch[0])


class SegmentStep(DetectStep):
    """One segmentation step: the pixel cross-entropy (255 ignored)."""

    def __init__(self, device: torch.device, amp: str) -> None:
        super().__init__(device, amp, masks=False)

    def terms(self, net: nn.Module, batch, progress: float) -> dict[str, torch.Tensor]:
        from ..engine import autocast
        from .segmentation import pixel_cross_entropy

        images, masks = batch
        images, masks = images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp):
            logits = net(images)  # (B, K, H, W)
        return {"loss": pixel_cross_entropy(logits, masks)}


class _DenseTask:
    """What detection and segmentation share: backbone, data, optimisation, records."""

    command = "dense"
    score_key = ""

    def __init__(self, cfg, dist) -> None:
        from ..loop import BASE_RESUMABLE

        self.cfg, self.dist = cfg, dist
        self.resumable = BASE_RESUMABLE
        self.loaded = None

    # --- set-up -----------------------------------------------------------------------------

    def default_output(self) -> str:
        name = Path(self.cfg.pretrained.rstrip("/")).name
        data = Path(self.cfg.data.partition(":")[2] or self.cfg.data).name
        return f"runs/{self.command}-{name}-{data}-seed{self.cfg.seed}"

    def _backbone(self) -> nn.Module:
        """The pre-trained ViT at ``dense_size`` (position embeddings resampled), SAR block kept."""
        from ..factory import create_model
        from ..pretrained import load_pretrained, read_checkpoint, weights_file

        cfg = self.cfg
        meta = read_checkpoint(cfg.pretrained, cfg.pretrained_which).metadata
        self.weights = weights_file(cfg.pretrained)
        self.sha256 = file_sha256(self.weights)
        # model and model_kwargs are the weights' own (backbone_architecture); the last block too
        self.arch = {"model": cfg.model, "model_kwargs": cfg.model_kwargs,
                     "layout": meta.get("layout") or "A", "query": meta.get("query") or "auto"}
        vit = create_model(self.arch["model"], 0, img_size=None, drop_path=cfg.drop_path,
                           model_kwargs=self.arch["model_kwargs"], layout=self.arch["layout"], query=self.arch["query"])
        patch = int(vit.patch_embed.patch_size[0])
        if cfg.dense_size % (2 * patch):
            raise ConfigError(f"dense_size must be a multiple of twice the backbone's patch size ({2 * patch}), so "
                              f"that every pyramid level tiles the input; got {cfg.dense_size}")
        vit.set_input_size(img_size=(cfg.dense_size, cfg.dense_size))
        self.loaded = load_pretrained(vit, cfg.pretrained, cfg.pretrained_which)
        return vit

    def _loaders(self, train_images, val_images, classes: list[str], semantic: bool, masks: bool):
        from ..data.pipeline import build_loader
        from ..loop import Data, steps_per_epoch
        from .datasets import DenseSamples, dense_transform, detection_collate, segmentation_collate

        cfg, dist = self.cfg, self.dist
        collate = segmentation_collate if semantic else detection_collate
        train = DenseSamples(train_images, dense_transform(cfg.dense_size, True, semantic), cfg.seed, masks)
        val = DenseSamples(val_images, dense_transform(cfg.dense_size, False, semantic), cfg.seed, masks)
        self.val_images = val
        pin = dist.device.type == "cuda"
        common = dict(seed=cfg.seed, rank=dist.rank, world=dist.world, workers=cfg.workers, pin_memory=pin,
                      collate_fn=collate)
        train_loader, train_sampler = build_loader(train, cfg.batch_size, train=True, **common)
        val_loader, val_sampler = build_loader(val, cfg.batch_size, train=False, **common)
        steps = steps_per_epoch(len(train), cfg.batch_size, dist.world)
        return Data(train_loader, train_sampler, val_loader, val_sampler, steps, len(train), len(val), classes)

    def _optimisation(self) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        from ..engine import resolve_amp
        from ..loop import grad_scaler, learning_rate

        cfg, dist = self.cfg, self.dist
        self.amp = resolve_amp(cfg.amp, dist.device)
        self.ema = None
        self.scaler = grad_scaler(self.amp, dist.device)
        self.objective = nn.Module()  # no state of its own beyond the model's
        lr = learning_rate(cfg, dist.world)
        self.optimizer = create_optimizer_v2(self.model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                             momentum=cfg.momentum)
        steps = self.data.steps_per_epoch
        if cfg.warmup_steps:  # a schedule counted in optimizer steps (E.3: 250 warm-up iterations)
            timing = dict(num_epochs=cfg.epochs * steps, warmup_epochs=cfg.warmup_steps, updates_per_epoch=1)
        else:
            timing = dict(num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, updates_per_epoch=steps)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched=cfg.sched, warmup_lr=cfg.warmup_lr,
                                                min_lr=cfg.min_lr, step_on_epochs=False, **timing)

    # --- records ----------------------------------------------------------------------------

    def check_checkpoint(self, meta: dict, path) -> None:
        classes = len(self.data.classes)
        if meta.get("task") != self.command or meta.get("num_classes") != classes:
            raise ConfigError(f"checkpoint {path} is not a {self.command} run of {classes} classes")
        if meta.get("backbone_sha256") != self.sha256:
            raise ConfigError(f"the backbone {self.weights} changed since this run started (its SHA-256 differs "
                              f"from the one in {path}); fine-tune the new weights in a new --output")

    def metadata(self) -> dict:
        cfg = self.cfg
        return {"task": self.command, "backbone": str(self.weights), "backbone_sha256": self.sha256, **self.arch,
                "dense_size": cfg.dense_size, "dense_channels": cfg.dense_channels,
                "num_classes": len(self.data.classes), "classes": self.data.classes, "data": cfg.data}

    def score(self, row: dict):
        return row.get(self.score_key)

    def save_best(self, run, metadata: dict) -> None:
        from .. import checkpoint as ckpt

        ckpt.save_weights(self.model, run.best, metadata)

    def after_epoch(self, run, metadata: dict) -> None:
        pass

    def banner(self, plan, dist) -> str:
        cfg, data = self.cfg, self.data
        lines = [
            f"sarvit {self.command}: {self.what()} on {self.arch['model']} (last block {self.arch['layout']}), "
            f"simple feature pyramid, strides {', '.join(map(str, self.strides))}",
            f"  backbone {self.weights} (sha256 {self.sha256[:12]})",
            f"  data {cfg.data}: {data.train_size} train / {data.val_size} val images, {len(data.classes)} classes, "
            f"{cfg.dense_size}x{cfg.dense_size}, {data.steps_per_epoch} steps/epoch of {cfg.batch_size} x "
            f"{dist.world} process(es)",
            f"  device {dist.device}, amp {self.amp}, {cfg.epochs} epochs, run folder {plan.run.root}",
        ]
        if plan.resume_from is None:
            lines.append("  " + self.loaded.text().replace("\n", "\n  "))
        return "\n".join(lines + [f"  {note}" for note in plan.notes])

    def summary(self, run, state, seconds: float) -> dict:
        from ..runlog import read_metrics

        rows = read_metrics(run.metrics)
        last = next((r for r in reversed(rows) if self.score_key in r), {})
        return {"run_dir": str(run.root), "task": self.command, "backbone": str(self.weights),
                "backbone_sha256": self.sha256, "epochs": self.cfg.epochs,
                f"best_{self.score_key.removeprefix('val_')}": state.best_score, "best_epoch": state.best_epoch,
                "final": {k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")},
                "train_seconds_this_session": seconds,
                "train_seconds_total": sum(r.get("epoch_time", 0.0) for r in rows)}

    def _figure_samples(self):
        """``FIGURE_IMAGES`` validation images spread evenly over the split (a split sorted by class shows
        several classes) as ``(image (3, S, S), target)`` pairs."""
        count = min(FIGURE_IMAGES, len(self.val_images))
        return [self.val_images[(0, i * len(self.val_images) // count)] for i in range(count)]


class DetectTask(_DenseTask):
    """Mask R-CNN / Faster R-CNN fine-tuning of a pre-trained ViT (Table 5)."""

    command = "detect"
    score_key = "val_map_50"

    def build(self) -> None:
        from ..loop import seed_everything
        from .datasets import open_detection
        from .detection import build_detector

        cfg, dist = self.cfg, self.dist
        train, val = open_detection(cfg.data, cfg.data_root, "train"), open_detection(cfg.data, cfg.data_root, "val")
        if train.classes != val.classes:
            raise ConfigError(f"the train and val annotations of {cfg.data} name different classes "
                              f"({train.classes} / {val.classes}); give both the same categories")
        self.masks = cfg.dense_masks and train.masks and val.masks
        self.data = self._loaders(train, val, train.classes, semantic=False, masks=self.masks)
        seed_everything(cfg.seed)
        vit = self._backbone()
        self.model = build_detector(vit, len(train.classes), cfg.dense_size, masks=self.masks,
                                    out_channels=cfg.dense_channels, rois_per_image=cfg.dense_rois).to(dist.device)
        self.strides = self.model.backbone.strides
        self.net = self.model
        self._optimisation()
        self.step = DetectStep(dist.device, self.amp, self.masks)

    def what(self) -> str:
        return "Mask R-CNN" if self.masks else "Faster R-CNN"

    def metadata(self) -> dict:
        return {**super().metadata(), "masks": self.masks}

    @torch.no_grad()
    def validate(self, epoch: int) -> dict:
        from ..engine import autocast
        from .metrics import DetectionScore

        self.data.val_sampler.set_epoch(epoch)
        self.model.eval()
        score = DetectionScore(masks=self.masks)
        for images, targets in self.data.val_loader:
            with autocast(self.dist.device, self.amp):
                out = self.model([im.to(self.dist.device) for im in images])
            score.update([{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in out], targets)
        self.model.train()
        return {f"val_{k}": v for k, v in score.compute().items()}

    def epoch_line(self, row: dict) -> str:
        from ..loop import epoch_text

        text = epoch_text(row)
        if "val_map_50" in row:
            text += f" | val box mAP@0.5 {100 * row['val_map_50']:.2f}% mAP {100 * row['val_map']:.2f}%"
            if "val_mask_map_50" in row:
                text += f", mask mAP@0.5 {100 * row['val_mask_map_50']:.2f}% mAP {100 * row['val_mask_map']:.2f}%"
        return text

    def summary_text(self, summary: dict) -> str:
        final = summary["final"]
        return (f"done: {summary['run_dir']}\n  final val box mAP@0.5 {100 * final.get('map_50', float('nan')):.2f}%, "
                f"mAP {100 * final.get('map', float('nan')):.2f}%\n  best val box mAP@0.5 "
                f"{100 * summary['best_map_50']:.2f}% "
                f"(epoch {summary['best_epoch']}), {summary['train_seconds_total']:.0f} s of training")

    @torch.no_grad()
    def finish(self, run) -> None:
        from .figures import draw_detections

        self.model.eval()
        samples = self._figure_samples()
        out = self.model([image.to(self.dist.device) for image, _ in samples])
        images, truths, preds = [], [], []
        for (image, target), pred in zip(samples, out):
            images.append(image.permute(1, 2, 0).numpy())  # (S, S, 3)
            truths.append({"boxes": target["boxes"].numpy(), "labels": target["labels"].numpy(),
                           "masks": target["masks"].bool().numpy() if self.masks else None})
            keep = shown_detections(pred["scores"])
            preds.append({"boxes": pred["boxes"][keep].cpu().numpy(), "labels": pred["labels"][keep].cpu().numpy(),
                          "scores": pred["scores"][keep].cpu().numpy(),
                          "masks": (pred["masks"][keep, 0] > 0.5).cpu().numpy() if self.masks else None})
        draw_detections(run.root / FIGURE, images, truths, preds, self.data.classes,
                        shown=f"score >= {SCORE_SHOWN}, else the best one")


class SegmentTask(_DenseTask):
    """Semantic segmentation fine-tuning of a pre-trained ViT (Table 6)."""

    command = "segment"
    score_key = "val_miou"

    def build(self) -> None:
        from ..loop import seed_everything
        from .backbone import ViTDetBackbone
        from .datasets import open_segmentation
        from .segmentation import SegmentationModel

        cfg, dist = self.cfg, self.dist
        train, classes = open_segmentation(cfg.data, cfg.data_root, "train")
        val, _ = open_segmentation(cfg.data, cfg.data_root, "val")
        self.data = self._loaders(train, val, classes, semantic=True, masks=False)
        seed_everything(cfg.seed)
        pyramid = ViTDetBackbone(self._backbone(), cfg.dense_size, cfg.dense_channels)
        self.strides = pyramid.strides
        self.model = SegmentationModel(pyramid, len(classes), width=min(128, cfg.dense_channels)).to(dist.device)
        self.net = self.model
        self._optimisation()
        self.step = SegmentStep(dist.device, self.amp)

    def what(self) -> str:
        return "semantic FPN head"

    @torch.no_grad()
    def validate(self, epoch: int) -> dict:
        from ..distributed import all_reduce_sum
        from ..engine import autocast
        from .metrics import confusion_matrix, mean_iou

        self.data.val_sampler.set_epoch(epoch)
        self.model.eval()
        k = len(self.data.classes)
        confusion = torch.zeros(k, k, dtype=torch.int64, device=self.dist.device)
        for images, masks in self.data.val_loader:
            with autocast(self.dist.device, self.amp):
                logits = self.model(images.to(self.dist.device))
            confusion += confusion_matrix(logits.argmax(1), masks.to(self.dist.device), k)
        self.model.train()
        all_reduce_sum(confusion)
        total = confusion.sum().clamp(min=1)
        return {"val_miou": mean_iou(confusion.cpu()), "val_pixel_acc": float(confusion.diagonal().sum() / total)}

    def epoch_line(self, row: dict) -> str:
        from ..loop import epoch_text

        text = epoch_text(row)
        if "val_miou" in row:
            text += f" | val mIoU {100 * row['val_miou']:.2f}%, pixel accuracy {100 * row['val_pixel_acc']:.2f}%"
        return text

    def summary_text(self, summary: dict) -> str:
        final = summary["final"]
        return (f"done: {summary['run_dir']}\n  final val mIoU {100 * final.get('miou', float('nan')):.2f}%\n"
                f"  best val mIoU {100 * summary['best_miou']:.2f}% (epoch {summary['best_epoch']}), "
                f"{summary['train_seconds_total']:.0f} s of training")

    @torch.no_grad()
    def finish(self, run) -> None:
        from .figures import draw_segmentations

        self.model.eval()
        samples = self._figure_samples()
        logits = self.model(torch.stack([image for image, _ in samples]).to(self.dist.device))
        predicted = logits.argmax(1).cpu().numpy()  # (n, S, S)
        draw_segmentations(run.root / FIGURE, [im.permute(1, 2, 0).numpy() for im, _ in samples],
                           [m.numpy() for _, m in samples], list(predicted), self.data.classes)
