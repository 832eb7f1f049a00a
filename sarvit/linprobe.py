"""Linear probing (appendix C): a linear classifier on the frozen features of a backbone, and
``sarvit linprobe`` (``linprobe(cfg)``), a task of the generic run (``sarvit.loop``).

The model parts of DINO's linear evaluation (``eval_linear.py``): :class:`ProbeFeatures`
turns a frozen timm ViT into features, :class:`LinearClassifier` is the only trained part.
DINO's choices: the class tokens of the last 4 blocks for ViT-S (``n_last_blocks=4``), the
last block's class token and mean patch token for ViT-B (``n_last_blocks=1, avgpool=True``).

    features = ProbeFeatures(backbone, n_last_blocks=4)
    classifier = LinearClassifier(features.feature_dim, num_classes)
    logits = classifier(features(images))          # gradients reach the classifier only
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError, UnsupportedModel

__all__ = ["ProbeFeatures", "LinearClassifier", "ProbeNet", "check_probe_backbone", "linprobe", "LinprobeTask"]

SUPPORTED = ("timm.models.vision_transformer.VisionTransformer (vit_*, deit_*, deit3_*, register variants), "
             "with or without SAR attached")


def check_probe_backbone(backbone: nn.Module) -> None:
    """Raise :class:`~sarvit.errors.UnsupportedModel` unless ``backbone`` is a timm ViT."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        cls = type(backbone)
        raise UnsupportedModel(f"linear probing does not support {cls.__module__}.{cls.__qualname__}; "
                               f"it supports {SUPPORTED}")


class ProbeFeatures(nn.Module):
    """The frozen features of a ViT: ``(B, 3, H, W) -> (B, feature_dim)``.

    For each of the last ``n_last_blocks`` blocks, the block's output goes through the
    model's final norm and is pooled as the model's head would see it: the class token,
    or, for a model without a class token, the mean of the patch tokens (then through
    ``fc_norm`` when the model has one). The pooled vectors are concatenated, oldest block
    first; ``avgpool`` appends the mean of the last block's normed patch tokens (DINO
    interleaves these two vectors when ``n_last_blocks=1``: the same features in another
    order, which a linear classifier does not see).

    The backbone is frozen: its parameters never require gradients, it stays in eval mode
    (no dropout, no drop-path) whatever ``train()`` is called with, and it runs under
    ``no_grad``.
    """

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 1, avgpool: bool = False) -> None:
        super().__init__()
        check_probe_backbone(backbone)
        depth = len(backbone.blocks)
        if isinstance(n_last_blocks, bool) or not isinstance(n_last_blocks, int) or not 1 <= n_last_blocks <= depth:
            raise ConfigError(f"n_last_blocks must be an integer from 1 to the model's depth {depth}; "
                              f"got {n_last_blocks!r}")
        self.has_class_token = getattr(backbone, "cls_token", None) is not None
        if avgpool and not self.has_class_token:
            raise ConfigError("avgpool adds the mean patch token to the class tokens, but this model has no class "
                              "token: its features already are the mean patch tokens; set avgpool to false")
        self.backbone = backbone.requires_grad_(False).eval()
        self.n_last_blocks = n_last_blocks
        self.avgpool = avgpool
        self.feature_dim = backbone.embed_dim * (n_last_blocks + int(avgpool))

    def train(self, mode: bool = True) -> "ProbeFeatures":
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, feature_dim)``, detached from the backbone."""
        outs = self.backbone.forward_intermediates(
            x, indices=self.n_last_blocks, return_prefix_tokens=True, norm=True, output_fmt="NLC",
            intermediates_only=True,
        )  # n x (patches (B, h*w, C), prefix (B, prefix, C)), or n x patches without prefix tokens
        patches = [o[0] if isinstance(o, tuple) else o for o in outs]  # n x (B, h*w, C)
        if self.has_class_token:
            pooled = [o[1][:, 0] for o in outs]  # n x (B, C)
        else:
            pooled = [p.mean(dim=1) for p in patches]  # n x (B, C)
        if self.avgpool:
            pooled.append(patches[-1].mean(dim=1))  # (B, C)
        fc_norm = getattr(self.backbone, "fc_norm", nn.Identity())
        return torch.cat([fc_norm(p) for p in pooled], dim=-1)  # (B, feature_dim)


class LinearClassifier(nn.Module):
    """DINO's linear layer: ``(B, dim) -> (B, num_classes)``, weight ~ N(0, 0.01^2), bias 0.

    The parameters are named ``linear.weight`` / ``linear.bias``, as in DINO's checkpoints.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # (B, dim) -> (B, num_classes)


class ProbeNet(nn.Module):
    """``classifier(features(x))`` with the interface of ``sarvit.engine.TrainForward``:
    ``forward(x, needs=None) -> (logits, None)``; ``forward_with_similarity(x)`` also gives
    the frozen backbone's maps (for the validation's SE)."""

    def __init__(self, features: ProbeFeatures, classifier: LinearClassifier) -> None:
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x: torch.Tensor, needs=None):
        return self.classifier(self.features(x)), None

    @torch.no_grad()
    def forward_with_similarity(self, x: torch.Tensor):
        _, S = self.features.backbone.forward_with_similarity(x)
        return self.classifier(self.features(x)), S


def linprobe(cfg) -> dict:
    """Run (or resume) a linear probe of ``cfg.pretrained``; returns its summary."""
    from . import config
    from .loop import run

    from .pretrained import backbone_architecture

    return run(backbone_architecture(cfg), LinprobeTask, check=config.validate_with_libraries)


class LinprobeTask:
    """DINO's linear evaluation: frozen backbone, a linear layer trained with cross-entropy.

    The backbone's architecture comes from the weights' sarvit metadata when they have
    it (``--model`` otherwise); its last block is the one it was trained with. Training
    images get random-resized crops and flips, validation images one centre crop. The
    checkpoints hold the classifier only; the backbone file's SHA-256 is recorded, and a
    resume refuses a backbone file that changed.
    """

    command = "linprobe"

    def __init__(self, cfg, dist) -> None:
        from .loop import BASE_RESUMABLE

        self.cfg, self.dist = cfg, dist
        self.resumable = BASE_RESUMABLE
        self.loaded = None

    def default_output(self) -> str:
        from pathlib import Path

        name = Path(self.cfg.pretrained.rstrip("/")).name
        return f"runs/linprobe-{name}-{Path(self.cfg.data).name}-seed{self.cfg.seed}"

    def build(self) -> None:
        import dataclasses

        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        from .engine import SupervisedStep, resolve_amp
        from .factory import create_model
        from .loop import grad_scaler, learning_rate, seed_everything
        from .objectives import SupervisedObjective
        from . import checkpoint as ckpt
        from .pretrained import load_pretrained, read_checkpoint, weights_file
        from .train import build_data

        cfg, dist = self.cfg, self.dist
        plain = dataclasses.replace(cfg, auto_augment=None, reprob=0.0, color_jitter=0.0)  # DINO's probe crops
        self.data = build_data(plain, dist)
        seed_everything(cfg.seed)
        source = read_checkpoint(cfg.pretrained, cfg.pretrained_which)
        meta = source.metadata
        self.weights = weights_file(cfg.pretrained)
        self.sha256 = ckpt.file_sha256(self.weights)
        # model and model_kwargs are the weights' own (backbone_architecture); the last block too
        self.arch = {"model": cfg.model, "model_kwargs": cfg.model_kwargs,
                     "layout": meta.get("layout") or "A", "query": meta.get("query") or "auto"}
        backbone = create_model(self.arch["model"], 0, img_size=cfg.img_size, model_kwargs=self.arch["model_kwargs"],
                                layout=self.arch["layout"], query=self.arch["query"])
        self.loaded = load_pretrained(backbone, cfg.pretrained, cfg.pretrained_which)
        features = ProbeFeatures(backbone, cfg.n_last_blocks, cfg.avgpool_patchtokens)
        self.model = LinearClassifier(features.feature_dim, len(self.data.classes))
        self.net = ProbeNet(features, self.model).to(dist.device)
        self.amp = resolve_amp(cfg.amp, dist.device)
        self.ema, self.scaler = None, grad_scaler(self.amp, dist.device)
        self.objective = SupervisedObjective(nn.CrossEntropyLoss())
        lr = learning_rate(cfg, dist.world)
        self.optimizer = create_optimizer_v2(self.model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                             momentum=cfg.momentum)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
            updates_per_epoch=self.data.steps_per_epoch,
        )
        self.step = SupervisedStep(self.objective, lambda e: 0.0, dist.device, self.amp)

    def check_checkpoint(self, meta: dict, path) -> None:
        if meta.get("task") != "linprobe" or meta.get("num_classes") != len(self.data.classes):
            raise ConfigError(f"checkpoint {path} is not a linear probe of {len(self.data.classes)} classes")
        if meta.get("backbone_sha256") != self.sha256:
            raise ConfigError(f"the backbone {self.weights} changed since this probe started (its SHA-256 differs "
                              f"from the one in {path}); probe the new weights in a new --output")

    def metadata(self) -> dict:
        cfg = self.cfg
        return {"task": "linprobe", "backbone": str(self.weights), "backbone_sha256": self.sha256,
                **self.arch, "img_size": cfg.img_size, "num_classes": len(self.data.classes),
                "classes": self.data.classes, "n_last_blocks": cfg.n_last_blocks,
                "avgpool_patchtokens": cfg.avgpool_patchtokens, "data": cfg.data}

    def validate(self, epoch: int) -> dict:
        from .engine import evaluate

        self.data.val_sampler.set_epoch(epoch)
        out = evaluate(self.net, self.data.val_loader, self.dist, self.amp)
        return {f"val_{k}": v for k, v in out.items() if k != "images"}

    def score(self, row: dict):
        return row["val_top1"]

    def save_best(self, run, metadata: dict) -> None:
        from . import checkpoint as ckpt

        ckpt.save_weights(self.model, run.best, metadata)

    def after_epoch(self, run, metadata: dict) -> None:
        pass

    def banner(self, plan, dist) -> str:
        cfg, data = self.cfg, self.data
        pooled = f"class tokens of the last {cfg.n_last_blocks} block(s)" + (
            " + mean patch token" if cfg.avgpool_patchtokens else "")
        lines = [
            f"sarvit linprobe: {self.arch['model']} (last block {self.arch['layout']}), frozen; linear classifier "
            f"on {self.model.linear.in_features} features ({pooled})",
            f"  backbone {self.weights} (sha256 {self.sha256[:12]})",
            f"  data {cfg.data}: {data.train_size} train / {data.val_size} val images, {len(data.classes)} classes, "
            f"{data.steps_per_epoch} steps/epoch of {cfg.batch_size} x {dist.world} process(es)",
            f"  device {dist.device}, amp {self.amp}, {cfg.epochs} epochs, run folder {plan.run.root}",
        ]
        if plan.resume_from is None:
            lines.append("  " + self.loaded.text().replace("\n", "\n  "))
        lines += [f"  warning: {w}" for w in data.warnings]
        return "\n".join(lines + [f"  {note}" for note in plan.notes])

    def epoch_line(self, row: dict) -> str:
        from .loop import epoch_text

        text = epoch_text(row)
        if "val_top1" in row:
            text += (f" | val top-1 {row['val_top1']:.2f} top-5 {row['val_top5']:.2f} (backbone SE "
                     f"{row['val_se']:.3f}, components/head {row['val_components']:.2f})")
        return text

    def summary(self, run, state, seconds: float) -> dict:
        from .runlog import read_metrics

        rows = read_metrics(run.metrics)
        last = next((r for r in reversed(rows) if "val_top1" in r), {})
        return {"run_dir": str(run.root), "task": "linprobe", "backbone": str(self.weights),
                "backbone_sha256": self.sha256, "epochs": self.cfg.epochs, "best_top1": state.best_score,
                "best_epoch": state.best_epoch,
                "final": {k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")},
                "train_seconds_this_session": seconds,
                "train_seconds_total": sum(r.get("epoch_time", 0.0) for r in rows),
                "warnings": list(self.data.warnings)}

    def summary_text(self, summary: dict) -> str:
        final = summary["final"]
        return (f"done: {summary['run_dir']}\n"
                f"  final val top-1 {final.get('top1', float('nan')):.2f}, top-5 {final.get('top5', float('nan')):.2f}"
                f"\n  best val top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), "
                f"{summary['train_seconds_total']:.0f} s of training")

    def finish(self, run) -> None:
        from .analysis.curves import write_curves

        write_curves(run.root)
