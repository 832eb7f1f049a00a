"""One training epoch of any task, the supervised step, and one evaluation pass.

The hot loop keeps the device busy: the loss terms are summed on the device and read
back only every ``log_interval`` steps and at the end of the epoch; the only other host
synchronisation is inside the SE term's labelling (a bounded number of checks per step
on accelerators, see ``sarvit.components``).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
import sys
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn
from tqdm import tqdm

from .config import CHOICES
from .distributed import Dist, all_reduce_sum
from .entropy import spatial_entropy
from .errors import ConfigError

__all__ = ["TrainForward", "LoopState", "Tally", "Step", "SupervisedStep", "train_one_epoch", "evaluate", "autocast",
           "resolve_amp"]


class TrainForward(nn.Module):
    """What DDP and ``torch.compile`` wrap: ``(x, needs) -> (logits, outputs or None)``.

    ``needs`` (:class:`~sarvit.objectives.Needs`, or ``None`` for the plain forward) says
    which outputs the objective reads; ``outputs`` is a dict with the similarity maps
    ``"S"`` (``(B, heads, h, w)``) and, when an ``inner`` loss is given (a loss with
    parameters, e.g. DRLoc's MLP), its value on the patch tokens under ``"inner"``.
    Going through one module's ``forward`` lets DistributedDataParallel see every
    forward pass, and the parameters of ``inner``.
    """

    def __init__(self, model: nn.Module, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.inner = inner

    def forward(self, x: torch.Tensor, needs=None):
        if needs is None:
            return self.model(x), None
        if needs.tokens:
            logits, S, tokens = self.model.forward_with_similarity(x, needs.similarity, tokens=True)
        else:
            logits, S = self.model.forward_with_similarity(x, needs.similarity)
        outputs = {} if S is None else {"S": S}
        if self.inner is not None:
            outputs["inner"] = self.inner(tokens)  # tokens: (B, h, w, C)
        return logits, outputs


def _show_progress(dist: Dist) -> bool:
    """Progress bars on the main rank of an interactive terminal (logs get one line per epoch)."""
    return dist.main and sys.stderr.isatty()


AMP_MODES = CHOICES["amp"]  # ("auto", "none", "bf16", "fp16"), as --amp spells them


def _check_amp(amp: str, allowed: tuple[str, ...]) -> None:
    if amp not in allowed:
        raise ConfigError(f"amp must be one of {', '.join(allowed)}; got {amp!r}")


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA devices that support it, fp16 on older ones, none elsewhere."""
    _check_amp(amp, AMP_MODES)
    if amp == "auto":
        if device.type != "cuda":
            return "none"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return amp


def autocast(device: torch.device, amp: str):
    """The autocast context for ``amp`` in (none, bf16, fp16)."""
    _check_amp(amp, AMP_MODES[1:])
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class LoopState:
    """Where training stands; everything a checkpoint must restore besides the modules."""

    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps already taken in this epoch
    global_step: int = 0
    best_score: float = float("-inf")  # the task's validation score (top-1, k-NN top-1, mAP@0.5, mIoU) at best_epoch
    best_epoch: int = -1


class Tally:
    """The loss terms summed over the epoch in progress, on the device (no host sync per step).

    ``reset(saved)`` continues the sums a checkpoint saved, so that an epoch resumed in the
    middle logs the mean over all its steps, not only those after the resume.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self, saved: dict[str, Any] | None = None) -> None:
        saved = saved or {}
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device)
                     for k, v in saved.get("sums", {}).items()}
        self.steps = saved.get("steps", 0)
        self.seconds = saved.get("seconds", 0.0)  # of the epoch, in the sessions before this one

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.steps += 1

    def means(self) -> dict[str, float]:
        """``train_<term>``: the epoch's mean of every term (one host sync per term)."""
        return {f"train_{k}": (v / max(self.steps, 1)).item() for k, v in self.sums.items()}

    def state(self, session_seconds: float) -> dict[str, Any]:
        return {"sums": {k: v.item() for k, v in self.sums.items()}, "steps": self.steps,
                "seconds": self.seconds + session_seconds}


class Step(Protocol):
    """What a task does in one training step, around the optimizer step the loop owns."""

    def terms(self, net: nn.Module, batch: Any, progress: float) -> dict[str, torch.Tensor]:
        """Forward ``batch`` through ``net`` (the module DDP wraps) and return the named loss terms,
        ``"loss"`` being the one to minimise; ``progress`` is the fractional epoch."""

    def before_optimizer_step(self, progress: float) -> None:
        """After the backward pass and gradient clipping (e.g. DINO's frozen last layer)."""

    def after_optimizer_step(self, global_step: int, progress: float) -> None:
        """After the optimizer step (EMA, momentum encoders)."""

    def logged(self) -> dict[str, float]:
        """Values of the last step worth a column in metrics.jsonl (``lambda``, a temperature)."""

    def batch_size(self, batch: Any) -> int:
        """The number of images in ``batch`` on this process."""


def train_one_epoch(
    *,
    net: nn.Module,
    step: Step,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loader,
    state: LoopState,
    steps_per_epoch: int,
    dist: Dist,
    tally: Tally | None = None,
    scaler=None,
    clip_grad: float | None = None,
    log_interval: int = 20,
    on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train from ``state.step_in_epoch`` to the end of ``state.epoch``.

    The loop owns the optimizer step (gradient scaling for fp16, clipping, the schedule's
    per-step update); ``step`` owns the forward, the loss terms and what happens around the
    optimizer step. ``on_step`` runs after every optimizer step (the checkpoint hook).
    Returns the epoch's mean loss terms (``tally``'s, which may continue a resumed epoch),
    the last learning rate, ``step.logged()`` and images per second of this session.
    """
    from timm.utils import dispatch_clip_grad

    net.train()
    tally = tally if tally is not None else Tally(dist.device)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # for gradient clipping
    steps = 0
    images = 0
    start = time.perf_counter()
    bar = tqdm(
        loader, total=steps_per_epoch - state.step_in_epoch, initial=0, disable=not _show_progress(dist),
        desc=f"epoch {state.epoch + 1}", leave=False, dynamic_ncols=True,
    )
    for batch in bar:
        progress = state.epoch + state.step_in_epoch / steps_per_epoch
        terms = step.terms(net, batch, progress)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(terms["loss"]).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                dispatch_clip_grad(params, clip_grad)
            step.before_optimizer_step(progress)
            scaler.step(optimizer)
            scaler.update()
        else:
            terms["loss"].backward()
            if clip_grad:
                dispatch_clip_grad(params, clip_grad)
            step.before_optimizer_step(progress)
            optimizer.step()
        state.step_in_epoch += 1
        state.global_step += 1
        step.after_optimizer_step(state.global_step, progress)
        scheduler.step_update(num_updates=state.global_step)
        tally.add(terms)
        steps += 1
        images += step.batch_size(batch) * dist.world
        if dist.main and (steps % log_interval == 0 or state.step_in_epoch == steps_per_epoch):
            bar.set_postfix(
                **{k.removeprefix("train_"): f"{v:.4f}" for k, v in tally.means().items()},
                lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f"{images / (time.perf_counter() - start):.0f}",
            )
        if on_step is not None:
            on_step()
    bar.close()
    elapsed = time.perf_counter() - start
    return {**tally.means(), "lr": optimizer.param_groups[0]["lr"], **step.logged(),
            "images_per_sec": images / max(elapsed, 1e-9)}


class SupervisedStep:
    """A step of supervised classification: Mixup/CutMix, the model's forward (with the outputs
    ``needs`` asks for), the objective's terms at the scheduled weight, and the EMA update."""

    def __init__(self, objective: nn.Module, lambda_fn: Callable[[float], float], device: torch.device,
                 amp: str = "none", *, needs=None, mixup=None, ema=None, model: nn.Module | None = None) -> None:
        if ema is not None and model is None:
            raise ValueError("an EMA needs the model it averages")
        self.objective, self.lambda_fn, self.device, self.amp = objective, lambda_fn, device, amp
        self.needs, self.mixup, self.ema, self.model = needs, mixup, ema, model
        self.lam = 0.0

    def terms(self, net: nn.Module, batch, progress: float) -> dict[str, torch.Tensor]:
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        self.lam = self.lambda_fn(progress)
        with autocast(self.device, self.amp):
            logits, outputs = net(x, self.needs)
        return self.objective(logits, y, outputs, self.lam)

    def before_optimizer_step(self, progress: float) -> None:
        pass

    def after_optimizer_step(self, global_step: int, progress: float) -> None:
        if self.ema is not None:  # timm counts the updates from 1: the first one copies the weights
            self.ema.update(self.model, step=global_step)

    def logged(self) -> dict[str, float]:
        return {"lambda": self.lam}

    def batch_size(self, batch) -> int:
        return int(batch[0].shape[0])


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: Dist, amp: str = "none", desc: str = "eval",
             per_head: bool = False) -> dict[str, float]:
    """Top-1/top-5, CE, and the last block's mean spatial entropy and components per head.

    Every rank evaluates its share; sums are reduced over ranks, so the result covers
    the whole set exactly once. ``per_head``: also ``se_heads`` and ``components_heads``,
    lists with the mean over images of each head.
    """
    model.eval()
    device = dist.device
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # n, top1, top5, ce, se, components
    heads = None  # (2, heads): per-head sums of the entropy and of the component count
    for x, y in tqdm(loader, disable=not _show_progress(dist), desc=desc, leave=False, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits, S = model.forward_with_similarity(x)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hit = top5 == y[:, None]
        H, count = spatial_entropy(S, return_num_components=True)  # (B, heads)
        sums += torch.stack([
            torch.tensor(float(x.shape[0]), device=device, dtype=torch.float64),
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            nn.functional.cross_entropy(logits, y, reduction="sum").double(),
            H.mean(dim=1).sum().double(),
            count.double().mean(dim=1).sum(),
        ])
        if per_head:
            batch = torch.stack([H.double().sum(dim=0), count.double().sum(dim=0)])  # (2, heads)
            heads = batch if heads is None else heads + batch
    all_reduce_sum(sums)
    n = max(sums[0].item(), 1.0)
    extra = {}
    if per_head and heads is not None:
        all_reduce_sum(heads)
        extra = {"se_heads": (heads[0] / n).tolist(), "components_heads": (heads[1] / n).tolist()}
    return {**extra,
        "top1": 100.0 * sums[1].item() / n,
        "top5": 100.0 * sums[2].item() / n,
        "loss": sums[3].item() / n,
        "se": sums[4].item() / n,
        "components": sums[5].item() / n,
        "images": int(sums[0].item()),
    }
