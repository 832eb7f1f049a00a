"""``train(cfg)``: the DeiT recipe with the SE term, on one process or under ``torchrun``.

Built from timm's parts (model, AdamW with weight-decay groups, cosine schedule with
warm-up, Mixup/CutMix, soft-target or label-smoothed CE, RandAugment and random erasing,
model EMA) and torch's (autocast, GradScaler, DistributedDataParallel, torch.compile).
Checkpoints go out every epoch (and every ``checkpoint_interval`` steps) and restore
the run bit for bit: weights, optimizer, scheduler, scaler, EMA, every RNG, the position
in the data order, and the running sums of the epoch in progress.

The run folder (``sarvit.runs``) is written only once the set-up has succeeded (data
opened, model, optimizer and schedule built, first batch decoded), and only by the
process that holds its lock. Resuming:

- ``--resume auto`` continues ``--output`` from its newest intact checkpoint; when
  ``checkpoints/last`` is missing or damaged it falls back to the checkpoint before it
  (with a warning), and it refuses a folder that holds a run but no intact checkpoint.
- ``--resume RUN`` continues the run in the folder RUN, wherever it was moved to.
- Only the options in ``RESUMABLE_CHANGES`` may differ from the run's ``config.yaml``;
  ``--extend true`` also lets ``--epochs`` grow, and the schedules follow the new length.
- If the training set changed size (an unreadable image removed), the data position of
  a checkpoint taken inside an epoch is meaningless: that epoch restarts from its first
  batch, and the schedule continues from the start of that epoch in the new steps/epoch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from . import config
from .config import ConfigError, TrainConfig, default_output, resolved_layout, to_dict
from .data import DATASETS, SeededTransform, build_loader, build_transform, open_dataset, stratified_subset
from .distributed import Dist, barrier, gather_objects, init_distributed, shutdown
from .engine import LoopState, TrainForward, evaluate, resolve_amp, train_one_epoch
from .factory import create_model
from .objectives import SupervisedObjective, build_objective, classification_loss, drloc_lambda_at, lambda_at
from .runlog import RunLog, read_metrics
from .runs import RunFolder, RunLock, atomic_write, remove, run_folder_of
from .surgery import sar_block

__all__ = ["train"]

# options that may change when a run is resumed: they do not alter the experiment
RESUMABLE_CHANGES = {"resume", "output", "workers", "log_interval", "device", "eval_interval",
                     "checkpoint_interval", "compile", "download", "data_root", "extend"}


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
    warnings: list = field(default_factory=list)  # about the classes' counts, printed and summarised


@dataclass
class Parts:
    """What a training step updates and a checkpoint restores, besides the loop state."""

    model: torch.nn.Module
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    mixup: Any
    objective: Any
    amp: str


@dataclass
class Plan:
    """Where the run goes and what it continues from, decided before anything is written."""

    run: RunFolder
    fresh: bool  # the folder holds no run yet: it is created (and locked) after the set-up
    resume_from: Path | None = None
    extend_from: int | None = None  # the planned epochs of a run that --extend lengthens
    notes: list = field(default_factory=list)  # printed in the banner
    warnings: list = field(default_factory=list)  # printed to stderr


class EpochTally:
    """The objective, also summing its terms over the epoch in progress.

    The sums, step count and seconds go into every checkpoint, so that an epoch resumed
    in the middle logs the mean over all its steps, not only those after the resume.
    """

    def __init__(self, objective, device: torch.device) -> None:
        self.objective, self.device = objective, device
        self.reset()

    def reset(self, saved: dict[str, Any] | None = None) -> None:
        saved = saved or {}
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device)
                     for k, v in saved.get("sums", {}).items()}
        self.steps = saved.get("steps", 0)
        self.seconds = saved.get("seconds", 0.0)  # of the epoch, in the sessions before this one

    def __call__(self, logits, targets, outputs=None, lam: float = 0.0) -> dict[str, torch.Tensor]:
        terms = self.objective(logits, targets, outputs, lam)
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.steps += 1
        return terms

    def means(self) -> dict[str, float]:
        return {f"train_{k}": (v / max(self.steps, 1)).item() for k, v in self.sums.items()}

    def state(self, session_seconds: float) -> dict[str, Any]:
        return {"sums": {k: v.item() for k, v in self.sums.items()}, "steps": self.steps,
                "seconds": self.seconds + session_seconds}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary the run folder also holds."""
    dist = init_distributed(cfg.device)
    try:
        with ExitStack() as stack:  # holds the run folder's lock until the run ends, however it ends
            return _train(cfg, dist, stack)
    finally:
        shutdown()


def _train(cfg: TrainConfig, dist: Dist, stack: ExitStack) -> dict[str, Any]:
    cfg = config.validate_with_libraries(_absolute_paths(cfg))
    plan = _plan_run(cfg, dist, stack)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    data = _build_data(cfg, dist)
    layout = resolved_layout(cfg)
    parts = _build_parts(cfg, data, dist, layout)
    _read_first_batch(data, cfg.batch_size)
    _write_run_folder(cfg, dist, plan, data, stack)
    _seed_everything(cfg.seed + dist.rank)  # drop-path and Mixup draw differently on each rank
    state = LoopState()
    tally = EpochTally(parts.objective, dist.device)
    if plan.resume_from is not None:
        plan.notes += _restore(plan, cfg, dist, parts, state, data, tally)
    net = TrainForward(parts.model, parts.objective.inner)  # DDP sees the objective's own parameters too
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)
    metadata = _metadata(cfg, data.classes, layout, parts.model)
    log = RunLog(plan.run.root, dist.main, resume_epoch=state.epoch, resume_step=state.global_step)
    if dist.main:
        for warning in plan.warnings:
            print(f"sarvit train: warning: {warning}", file=sys.stderr, flush=True)
        print(_banner(cfg, dist, data, layout, parts, plan), flush=True)
    # the checkpoint to keep besides the next one (`--resume RUN/checkpoints/last` names the folder it points to)
    kept = [plan.resume_from.resolve().name if plan.resume_from is not None else None]
    epoch_start = time.perf_counter()

    def save() -> None:
        kept[0] = _save(plan.run, cfg, dist, parts, state, metadata, data,
                        tally.state(time.perf_counter() - epoch_start), kept[0])

    def on_step() -> None:
        at_epoch_end = state.step_in_epoch == data.steps_per_epoch
        if cfg.checkpoint_interval and state.global_step % cfg.checkpoint_interval == 0 and not at_epoch_end:
            save()

    needs = parts.objective.needs if _auxiliary_on(cfg) else None  # None: the plain forward
    started = time.perf_counter()
    while state.epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        data.train_sampler.set_epoch(state.epoch, start=state.step_in_epoch * cfg.batch_size)
        row = train_one_epoch(
            net=net, optimizer=parts.optimizer, scheduler=parts.scheduler, loader=data.train_loader,
            objective=tally, state=state, steps_per_epoch=data.steps_per_epoch, dist=dist, amp=parts.amp,
            needs=needs, lambda_fn=lambda e: _weight_at(cfg, e),
            mixup=parts.mixup, scaler=parts.scaler, ema=parts.ema, clip_grad=cfg.clip_grad,
            log_interval=cfg.log_interval, on_step=on_step,
        )
        row.update(tally.means())  # the whole epoch's means, also across a resume
        parts.scheduler.step(state.epoch + 1)
        row = {"epoch": state.epoch + 1, "step": state.global_step, **row}
        last_epoch = state.epoch + 1 == cfg.epochs
        if (state.epoch + 1) % cfg.eval_interval == 0 or last_epoch:
            row.update(_validate(parts.model, parts.ema, data, dist, parts.amp, state.epoch))
            if row["val_top1"] > state.best_top1:
                state.best_top1, state.best_epoch = row["val_top1"], state.epoch + 1
                _save_best(plan.run, dist, parts, {**metadata, "epoch": state.epoch + 1})
        row["epoch_time"] = tally.seconds + time.perf_counter() - epoch_start
        if plan.extend_from is not None:
            row["extended_from"] = plan.extend_from
        log.epoch(row, state.global_step)
        if dist.main:
            print(_epoch_line(row))
        state.epoch += 1
        state.step_in_epoch = 0
        tally.reset()
        save()
    log.close()
    summary = _summary(cfg, plan.run, state, time.perf_counter() - started, data.warnings)
    if dist.main:
        atomic_write(plan.run.summary, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        from .analysis.curves import write_curves

        write_curves(plan.run.root)
        print(_summary_text(summary))
    barrier()
    return summary


# --- run folder and resume ------------------------------------------------------------------


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``data`` (when it is a folder), ``data_root`` and ``output`` as absolute, normalised paths,
    so that the run folder's records work from any working directory."""
    data = cfg.data
    if data not in DATASETS and Path(data).expanduser().is_dir():
        data = _absolute(data)
    return dataclasses.replace(
        cfg, data=data, data_root=_absolute(cfg.data_root) if cfg.data_root else None,
        output=_absolute(cfg.output) if cfg.output else None,
    )


def _saved_config(run: RunFolder) -> dict[str, Any]:
    return run.read_config("restore the run's config.yaml (a copy of its options) before resuming")


def _run_folder(cfg: TrainConfig) -> RunFolder:
    """The folder of the run: ``--output`` (or its default), or the run ``--resume RUN`` names."""
    if cfg.resume in (None, "auto"):
        return RunFolder(Path(cfg.output or _absolute(default_output(cfg))))
    given = Path(_absolute(cfg.resume))
    run = RunFolder(run_folder_of(given))
    if not given.is_dir() or not (run.config.is_file() or run.checkpoints.is_dir()):
        raise ConfigError(f"--resume {cfg.resume}: no run there (no config.yaml, no checkpoints/); give the run "
                          "folder (or one of its checkpoints/step-* folders), or `auto` to continue --output")
    recorded = _saved_config(run).get("output")
    same = {os.path.realpath(p) for p in (run.root, recorded) if p}  # through symlinks: one folder, one run
    if cfg.output is not None and os.path.realpath(cfg.output) not in same:
        raise ConfigError(f"--resume {cfg.resume} continues the run in {run.root}, but --output names "
                          f"{cfg.output}: a run is resumed where it lies. Drop --output, or copy the run folder "
                          f"to {cfg.output} and resume that copy.")
    return run


def _plan_run(cfg: TrainConfig, dist: Dist, stack: ExitStack) -> Plan:
    """Check the run folder, lock it (when it holds a run) and choose the checkpoint; writes nothing."""
    run = _run_folder(cfg)
    if not run.holds_run():
        if cfg.resume == "auto":
            return Plan(run, fresh=True, notes=[f"no run in {run.root} yet: starting a new one"])
        return Plan(run, fresh=True)
    if cfg.resume is None:
        raise ConfigError(f"run folder {run.root} already exists and is not empty; add --resume auto to continue "
                          "that run, or choose another --output (nothing there is overwritten)")
    plan = Plan(run, fresh=False)
    if dist.main:
        lock = RunLock(run.lock)
        stack.callback(lock.release)
        if lock.note:
            plan.notes.append(lock.note)
        stale = run.stale_temporaries()
        for path in stale:
            remove(path)
        if stale:
            plan.notes.append(f"removed {len(stale)} temporary file(s) an interrupted run left: "
                              + ", ".join(str(p.relative_to(run.root)) for p in stale))
    plan.extend_from = _check_same_experiment(cfg, run)
    chosen = _choose_checkpoint(cfg, run) if dist.main else None
    plan.resume_from, skipped = gather_objects(chosen)[0]  # every rank resumes from rank 0's choice
    if skipped and plan.resume_from is None:
        plan.warnings.append("; ".join(skipped) + ": the run starts again from its first epoch, and the records "
                             "of that epoch are written again")
    elif skipped:
        plan.warnings.append("; ".join(skipped) + f"; resuming from the previous complete checkpoint "
                             f"{plan.resume_from.name}")
    elif plan.resume_from is None:
        plan.notes.append(f"no checkpoint in {run.root} yet: the run starts from its first epoch")
    return plan


def _choose_checkpoint(cfg: TrainConfig, run: RunFolder) -> tuple[Path | None, tuple[str, ...]]:
    """The checkpoint to resume from (main rank), refusing to start over a run that made progress."""
    given = Path(_absolute(cfg.resume)) if cfg.resume not in (None, "auto") else None
    if given is not None and (given / ckpt.STATE).is_file():  # one checkpoint named: that one or nothing
        problem = ckpt.verify_checkpoint(given)
        if problem is not None:
            raise ConfigError(f"--resume {cfg.resume}: {problem}. Resume the run folder ({run.root}) to fall "
                              "back to its previous complete checkpoint.")
        return given, ()
    found = ckpt.find_checkpoint(run.root)
    progress = run.progress()
    if found.path is None and progress and _first_checkpoint_unfinished(run):
        return None, ("no checkpoint was completed (the run was stopped, or the disk filled, while its first one "
                      "was written)",)
    if found.path is None and progress:
        why = "; ".join(found.skipped) or "checkpoints/ holds none"
        raise ConfigError(
            f"cannot resume {run.root}: it holds a run ({', '.join(progress)}) but no intact checkpoint ({why}). "
            "Nothing was changed. To train it again from the start, move the folder away or choose another --output."
        )
    return found.path, found.skipped


def _first_checkpoint_unfinished(run: RunFolder) -> bool:
    """Whether the run never completed a checkpoint: checkpoints/ holds none (not even a
    dangling ``last``), and the records reach no further than the first epoch, whose end
    writes the first checkpoint. Starting over then loses at most that epoch."""
    if run.last.is_symlink() or run.step_folders() or run.summary.exists():
        return False
    return all(row.get("epoch", 0) <= 1 for row in read_metrics(run.metrics))


def _same(key: str, saved: Any, now: Any) -> bool:
    if saved == now:
        return True
    if key == "data" and isinstance(saved, str) and isinstance(now, str) and now not in DATASETS:
        return _absolute(saved) == now  # `ds`, `ds/` and the absolute path are one folder
    return False


def _check_same_experiment(cfg: TrainConfig, run: RunFolder) -> int | None:
    """Refuse a resume that would change the experiment; returns the old epochs when ``--extend`` lengthens it."""
    saved = _saved_config(run)
    if not saved:
        return None
    now = to_dict(cfg)
    # an option newer than the run's config.yaml: the run had its default
    defaults = to_dict(TrainConfig())
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUMABLE_CHANGES and not _same(k, saved.get(k), v)}
    extend_from = None
    if cfg.extend and "epochs" in diff:
        old, new = diff.pop("epochs")
        if new <= old:
            raise ConfigError(f"--extend true lengthens a run: {run.root} has {old} epochs, --epochs {new} is not more")
        extend_from = old
    if diff:
        shown = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in diff.items())
        hint = " To train the run for more epochs, add --extend true." if set(diff) == {"epochs"} else ""
        raise ConfigError(f"cannot resume {run.root} with a different experiment ({shown}).{hint} Resume with "
                          f"the run's own options (--config {run.config} --resume {run.root}), or start a new "
                          "--output.")
    return extend_from


def _read_first_batch(data: Data, batch_size: int) -> None:
    """Decode the first training batch, so that an unreadable dataset fails before the run folder is written."""
    dataset = data.train_loader.dataset
    for key in itertools.islice(iter(data.train_sampler), batch_size):
        dataset[key]


def _write_run_folder(cfg: TrainConfig, dist: Dist, plan: Plan, data: Data, stack: ExitStack) -> None:
    """After a successful set-up: create and lock a new run folder, write config.yaml and the subset."""
    run = plan.run
    barrier()  # every rank has read the folder before the main rank writes into it
    if dist.main:
        if plan.fresh:
            run.root.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run.lock)
            stack.callback(lock.release)
            if run.holds_run():  # another process started a run here during the set-up
                raise ConfigError(f"run folder {run.root} was filled by another run while this one was being "
                                  "set up; choose another --output")
        # the experiment's options; `resume` is this session's (a path in it would outlive a move of the run)
        text = yaml.safe_dump(to_dict(dataclasses.replace(cfg, output=str(run.root), resume=None)), sort_keys=False)
        atomic_write(run.config, lambda tmp: tmp.write_text(text))
        indices = data.train_loader.dataset.indices
        if indices is not None:
            record = {"seed": cfg.seed, "per_class": cfg.per_class, "train_fraction": cfg.train_fraction,
                      "size": int(len(indices)), "indices": np.asarray(indices).tolist()}
            atomic_write(run.subset, lambda tmp: tmp.write_text(json.dumps(record)))
    barrier()


def _restore(plan: Plan, cfg: TrainConfig, dist: Dist, parts: Parts, state: LoopState, data: Data,
             tally: EpochTally) -> list[str]:
    """Load the checkpoint into the parts and the loop state; returns what the banner should say."""
    path = plan.resume_from
    meta = ckpt.read_metadata(path / ckpt.WEIGHTS)
    if meta.get("num_classes") != len(data.classes):
        raise ConfigError(f"checkpoint {path} has {meta.get('num_classes')} classes, the data has {len(data.classes)}")
    saved = ckpt.load_state(path)
    if saved["world"] != dist.world:
        raise ConfigError(f"checkpoint {path} was written by {saved['world']} processes; resume it with "
                          f"{saved['world']} (the data order and the batches depend on it), not {dist.world}")
    parts.model.load_state_dict(ckpt.load_weights(path / ckpt.WEIGHTS, dist.device), strict=True)
    if parts.ema is not None:
        parts.ema.module.load_state_dict(ckpt.load_weights(path / ckpt.EMA_WEIGHTS, dist.device), strict=True)
    parts.objective.load_state_dict(saved.get("objective", {}), strict=True)
    parts.optimizer.load_state_dict(saved["optimizer"])
    if parts.scaler is not None and saved.get("scaler"):
        parts.scaler.load_state_dict(saved["scaler"])
    for f in dataclasses.fields(LoopState):
        setattr(state, f.name, saved["loop"][f.name])
    _set_rng_state(saved["rng"][dist.rank], dist.device)
    notes = [f"resuming from {path}"]
    changed = _follow_data_change(saved, state, data)
    if changed:
        notes.append(changed)
    if changed or plan.extend_from is not None:  # the schedule is the new one, at the resumed step
        parts.scheduler.step_update(num_updates=state.global_step)
    else:
        parts.scheduler.load_state_dict(saved["scheduler"])
    if plan.extend_from is not None:
        notes.append(f"extending the run from {plan.extend_from} to {cfg.epochs} epochs: the learning-rate and "
                     f"lambda schedules are recomputed for {cfg.epochs} epochs (lr now "
                     f"{parts.optimizer.param_groups[0]['lr']:.3g})")
    tally.reset(saved.get("epoch_tally") if state.step_in_epoch else None)
    return notes


def _follow_data_change(saved: dict[str, Any], state: LoopState, data: Data) -> str | None:
    """Adapt ``state`` to a training set whose size changed since the checkpoint; ``None`` if it did not."""
    before = saved.get("data") or {}
    old_steps, old_size = before.get("steps_per_epoch"), before.get("train_size")
    if old_steps is None and state.epoch > 0:  # a checkpoint from before the data size was stored
        old_steps = (state.global_step - state.step_in_epoch) // state.epoch
    if (old_steps in (None, data.steps_per_epoch) and old_size in (None, data.train_size)
            and state.step_in_epoch < data.steps_per_epoch):
        return None
    then = f"{old_size} images, " if old_size is not None else ""
    text = (f"the training set changed since the checkpoint ({then}{old_steps or 'more'} steps/epoch then, "
            f"{data.train_size} images, {data.steps_per_epoch} steps/epoch now)")
    if state.step_in_epoch:
        text += f"; the data position inside epoch {state.epoch + 1} is no longer valid: that epoch restarts"
        state.step_in_epoch = 0
    state.global_step = state.epoch * data.steps_per_epoch
    return text + f"; the schedule continues at step {state.global_step}"


def _save(run: RunFolder, cfg: TrainConfig, dist: Dist, parts: Parts, state: LoopState, metadata: dict[str, Any],
          data: Data, tally: dict[str, Any], previous: str | None) -> str | None:
    """Checkpoint the run (main rank; every rank sends its RNG states); returns the checkpoint's name."""
    rngs = gather_objects(_rng_state(dist.device))  # every rank's generators, in rank order
    name = None
    if dist.main:
        payload = {
            "loop": dataclasses.asdict(state),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "rng": rngs,
            "world": dist.world,
            "data_order": {"seed": cfg.seed, "epoch": state.epoch, "samples_done": state.step_in_epoch * cfg.batch_size},
            "data": {"train_size": data.train_size, "steps_per_epoch": data.steps_per_epoch},
            "epoch_tally": tally,
            "objective": parts.objective.state_dict(),  # the auxiliary loss's own parameters (DRLoc's MLP)
        }
        meta = {**metadata, "epoch": state.epoch, "step": state.global_step}
        name = ckpt.save_checkpoint(run.root, state.global_step, parts.model, payload, meta,
                                    ema=parts.ema.module if parts.ema is not None else None, previous=previous).name
    barrier()
    return name


def _save_best(run: RunFolder, dist: Dist, parts: Parts, metadata: dict[str, Any]) -> None:
    if dist.main:
        ckpt.save_weights(parts.model, run.best, metadata)
        if parts.ema is not None:
            ckpt.save_weights(parts.ema.module, run.best_ema, metadata)


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


def _build_data(cfg: TrainConfig, dist: Dist) -> Data:
    from .data.classes import check_same_classes, class_count_warnings, class_counts

    raw_train = open_dataset(cfg.data, cfg.data_root, "train", cfg.download)
    raw_val = open_dataset(cfg.data, cfg.data_root, "val", cfg.download)
    check_same_classes(raw_train.classes, raw_val.classes, f"the train split of {cfg.data}", "its val split",
                       "Give both splits the same classes (for a folder: the same class folders, spelled the same).")
    indices = None
    if cfg.per_class is not None or cfg.train_fraction is not None:
        indices = stratified_subset(raw_train.targets, per_class=cfg.per_class, fraction=cfg.train_fraction, seed=cfg.seed)
    classes = raw_train.classes or [str(i) for i in range(int(raw_train.targets.max()) + 1)]
    train_counts = class_counts(raw_train.targets if indices is None else raw_train.targets[indices], len(classes),
                                "the training set")
    val_indices = None
    if cfg.val_per_class is not None:  # seed 0 for every run: all seeds are scored on the same images
        val_indices = stratified_subset(raw_val.targets, per_class=cfg.val_per_class, seed=0, option="val_per_class")
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
    steps = (len(train_ds) // dist.world) // cfg.batch_size
    if steps == 0:
        raise ConfigError(f"the training set has {len(train_ds)} images: fewer than one batch of {cfg.batch_size} "
                          f"per process ({dist.world} processes); lower --batch-size")
    return Data(train_loader, train_sampler, val_loader, val_sampler, classes, steps, len(train_ds), len(val_ds),
                warnings)


def _build_parts(cfg: TrainConfig, data: Data, dist: Dist, layout: str) -> Parts:
    _seed_everything(cfg.seed)  # the same initial weights (and EMA copy) on every rank
    model = create_model(
        cfg.model, len(data.classes), img_size=cfg.img_size, drop_path=cfg.drop_path,
        model_kwargs=cfg.model_kwargs, layout=layout, query=cfg.query,
    ).to(dist.device)
    amp = resolve_amp(cfg.amp, dist.device)
    optimizer, scheduler, scaler, ema, mixup, objective = _build_training(cfg, model, data, dist, amp)
    return Parts(model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler, mixup=mixup,
                 objective=objective, amp=amp)


def _build_training(cfg: TrainConfig, model, data: Data, dist: Dist, amp: str):
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size * dist.world / 512
    mixup_active = (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0
    objective = _build_objective(cfg, model, mixup_active).to(dist.device)
    optimizer = create_optimizer_v2(_optimized(model, objective), opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=data.steps_per_epoch,
    )
    scaler = torch.amp.GradScaler(dist.device.type) if amp == "fp16" and dist.device.type == "cuda" else None
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    mixup = None
    if mixup_active:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=len(data.classes))
    return optimizer, scheduler, scaler, ema, mixup, objective


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
        "lambda": cfg.lambda_, "data": cfg.data, "objective": _objective_name(cfg),
    }


def _objective_name(cfg: TrainConfig) -> str:
    """``--objective``, or ``baseline`` when no auxiliary term is trained."""
    return cfg.objective if cfg.sar else "baseline"


# --- what the run prints ----------------------------------------------------------------------


def _banner(cfg, dist, data: Data, layout, parts: Parts, plan: Plan) -> str:
    params = sum(p.numel() for p in parts.model.parameters()) / 1e6
    what = _objective_text(cfg)
    lines = [
        f"sarvit train: {cfg.model} ({params:.2f}M params, last block {layout}) - {what}",
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
    terms = [k.removeprefix("train_") for k in row if k.startswith("train_") and k != "train_loss"]
    parts = ", ".join(f"{t} {row['train_' + t]:.4f}" for t in terms)
    text = f"epoch {row['epoch']}: loss {row['train_loss']:.4f} ({parts}), {row['images_per_sec']:.0f} img/s"
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
        "best_top1": state.best_top1,
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
