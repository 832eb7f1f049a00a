"""The training run of any task: run folder, lock, resume, checkpoints, epochs, logs.

``run(cfg, task)`` owns what every kind of training shares, written once: the run folder
(``sarvit.runs``) is written only once the set-up has succeeded (data opened, model,
optimizer and schedule built, first batch decoded) and only by the process holding its
lock; devices, DistributedDataParallel and ``torch.compile``; the epoch loop
(``sarvit.engine.train_one_epoch``: AMP, gradient clipping, the schedule); validation
and the best checkpoint; checkpoints every epoch (and every ``checkpoint_interval``
steps) that restore the run bit for bit: weights, optimizer, scheduler, scaler, EMA,
every RNG, the position in the data order, the running sums of the epoch in progress,
and the task's own state. A task (:class:`Task`) owns its data, models, loss terms,
optimizer and what it validates, saves and prints.

Resuming:

- ``--resume auto`` continues ``--output`` from its newest intact checkpoint; when
  ``checkpoints/last`` is missing or damaged it falls back to the checkpoint before it
  (with a warning), and it refuses a folder that holds a run but no intact checkpoint.
- ``--resume RUN`` continues the run in the folder RUN, wherever it was moved to.
- Only the options in ``task.resumable`` may differ from the run's ``config.yaml``;
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
from typing import Any, Protocol

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from .config import to_dict
from .data import DATASETS
from .distributed import Dist, barrier, gather_objects, init_distributed, shutdown
from .engine import LoopState, Tally, train_one_epoch
from .errors import ConfigError
from .runlog import RunLog, read_metrics
from .runs import RunFolder, RunLock, atomic_write, remove, run_folder_of

__all__ = ["Data", "Plan", "Task", "run", "seed_everything", "epoch_text", "steps_per_epoch", "learning_rate",
           "grad_scaler", "BASE_RESUMABLE"]

# options that may change when any run is resumed: they do not alter the experiment
BASE_RESUMABLE = frozenset({"resume", "output", "workers", "log_interval", "device", "eval_interval",
                            "checkpoint_interval", "compile", "download", "data_root", "extend"})


@dataclass
class Data:
    """The task's data as the loop needs it."""

    train_loader: Any
    train_sampler: Any  # sarvit.data's sampler: set_epoch(epoch, start=samples already done)
    val_loader: Any
    val_sampler: Any
    steps_per_epoch: int
    train_size: int
    val_size: int
    classes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # about the classes' counts, printed and summarised


@dataclass
class Plan:
    """Where the run goes and what it continues from, decided before anything is written."""

    run: RunFolder
    fresh: bool  # the folder holds no run yet: it is created (and locked) after the set-up
    resume_from: Path | None = None
    extend_from: int | None = None  # the planned epochs of a run that --extend lengthens
    notes: list = field(default_factory=list)  # printed in the banner
    warnings: list = field(default_factory=list)  # printed to stderr


class Task(Protocol):
    """One kind of training, as the loop sees it.

    ``build()`` sets ``data`` (:class:`Data`), ``model`` (saved as the checkpoint's
    ``model.safetensors``), ``ema`` (timm ``ModelEmaV3`` or None), ``objective`` (a module
    whose ``state_dict`` holds the task's extra state: DRLoc's MLP, DINO's centre), ``optimizer``,
    ``scheduler`` (timm, stepped per update), ``scaler`` (fp16 on CUDA, else None), ``amp``,
    ``step`` (:class:`sarvit.engine.Step`) and ``net`` (the module DDP and ``torch.compile``
    wrap and ``step`` calls). Only main-rank methods write files.
    """

    command: str  # the command, for messages ("train", "pretrain", ...)
    resumable: frozenset  # options that may change on resume

    def default_output(self) -> str: ...
    def build(self) -> None: ...
    def check_checkpoint(self, meta: dict, path: Path) -> None: ...
    def metadata(self) -> dict[str, Any]: ...
    def validate(self, epoch: int) -> dict[str, float]: ...
    def score(self, row: dict[str, Any]) -> float | None: ...
    def save_best(self, run: RunFolder, metadata: dict[str, Any]) -> None: ...
    def after_epoch(self, run: RunFolder, metadata: dict[str, Any]) -> None: ...
    def banner(self, plan: Plan, dist: Dist) -> str: ...
    def epoch_line(self, row: dict[str, Any]) -> str: ...
    def summary(self, run: RunFolder, state: LoopState, seconds: float) -> dict[str, Any]: ...
    def summary_text(self, summary: dict[str, Any]) -> str: ...
    def finish(self, run: RunFolder) -> None: ...


def run(cfg, task_type, *, check=None) -> dict[str, Any]:
    """Run (or resume) a run of ``task_type(cfg, dist)``; returns the summary the run folder also holds.

    ``check(cfg)`` (optional) validates ``cfg`` once torch and the libraries are imported.
    """
    dist = init_distributed(cfg.device)
    try:
        with ExitStack() as stack:  # holds the run folder's lock until the run ends, however it ends
            cfg = _absolute_paths(cfg)
            if check is not None:
                cfg = check(cfg)
            return _run(cfg, task_type(cfg, dist), dist, stack)
    finally:
        shutdown()


def _run(cfg, task: Task, dist: Dist, stack: ExitStack) -> dict[str, Any]:
    plan = _plan_run(cfg, task, dist, stack)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    task.build()
    _read_first_batch(task.data, cfg.batch_size)
    seed_everything(cfg.seed + dist.rank)  # drop-path and Mixup draw differently on each rank
    state = LoopState()
    tally = Tally(dist.device)
    if plan.resume_from is not None:  # before anything is written: a refused resume changes nothing
        plan.notes += _restore(plan, cfg, dist, task, state, tally)
    _write_run_folder(cfg, dist, plan, task.data, stack)
    net = task.net
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)
    metadata = task.metadata()
    log = RunLog(plan.run.root, dist.main, resume_epoch=state.epoch, resume_step=state.global_step)
    if dist.main:
        for warning in plan.warnings:
            print(f"sarvit {task.command}: warning: {warning}", file=sys.stderr, flush=True)
        print(task.banner(plan, dist), flush=True)
    # the checkpoint to keep besides the next one (`--resume RUN/checkpoints/last` names the folder it points to)
    kept = [plan.resume_from.resolve().name if plan.resume_from is not None else None]
    epoch_start = time.perf_counter()
    data = task.data

    def save() -> None:
        kept[0] = _save(plan.run, cfg, dist, task, state, metadata,
                        tally.state(time.perf_counter() - epoch_start), kept[0])

    def on_step() -> None:
        at_epoch_end = state.step_in_epoch == data.steps_per_epoch
        if cfg.checkpoint_interval and state.global_step % cfg.checkpoint_interval == 0 and not at_epoch_end:
            save()

    started = time.perf_counter()
    while state.epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        data.train_sampler.set_epoch(state.epoch, start=state.step_in_epoch * cfg.batch_size)
        row = train_one_epoch(
            net=net, step=task.step, optimizer=task.optimizer, scheduler=task.scheduler, loader=data.train_loader,
            state=state, steps_per_epoch=data.steps_per_epoch, dist=dist, tally=tally, scaler=task.scaler,
            clip_grad=cfg.clip_grad, log_interval=cfg.log_interval, on_step=on_step,
        )
        task.scheduler.step(state.epoch + 1)
        row = {"epoch": state.epoch + 1, "step": state.global_step, **row}
        last_epoch = state.epoch + 1 == cfg.epochs
        if (state.epoch + 1) % cfg.eval_interval == 0 or last_epoch:
            row.update(task.validate(state.epoch))
            score = task.score(row)
            if score is not None and score > state.best_score:
                state.best_score, state.best_epoch = score, state.epoch + 1
                if dist.main:
                    task.save_best(plan.run, {**metadata, "epoch": state.epoch + 1})
        row["epoch_time"] = tally.seconds + time.perf_counter() - epoch_start
        if plan.extend_from is not None:
            row["extended_from"] = plan.extend_from
        log.epoch(row, state.global_step)
        if dist.main:
            print(task.epoch_line(row))
            task.after_epoch(plan.run, {**metadata, "epoch": state.epoch + 1})
        state.epoch += 1
        state.step_in_epoch = 0
        tally.reset()
        save()
    log.close()
    summary = task.summary(plan.run, state, time.perf_counter() - started)
    if dist.main:
        atomic_write(plan.run.summary, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        task.finish(plan.run)
        print(task.summary_text(summary))
    barrier()
    return summary


def steps_per_epoch(train_size: int, batch_size: int, world: int) -> int:
    """Full batches per epoch on each of ``world`` processes; a ConfigError when there is none."""
    steps = (train_size // world) // batch_size
    if steps == 0:
        raise ConfigError(f"the training set has {train_size} images: fewer than one batch of {batch_size} "
                          f"per process ({world} processes); lower --batch-size")
    return steps


def learning_rate(cfg, world: int) -> float:
    """``--lr``, or ``--base-lr`` scaled by the global batch over 512."""
    return cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size * world / 512


def grad_scaler(amp: str, device: torch.device):
    """fp16 on CUDA needs a GradScaler; every other precision and device none."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" and device.type == "cuda" else None


def epoch_text(row: dict[str, Any]) -> str:
    """The start of an epoch's line: the loss, each term, images per second."""
    terms = [k.removeprefix("train_") for k in row if k.startswith("train_") and k != "train_loss"]
    parts = ", ".join(f"{t} {row['train_' + t]:.4f}" for t in terms)
    parts = f" ({parts})" if parts else ""
    return f"epoch {row['epoch']}: loss {row['train_loss']:.4f}{parts}, {row['images_per_sec']:.0f} img/s"


# --- run folder and resume ------------------------------------------------------------------


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _absolute_paths(cfg):
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


def _run_folder(cfg, task: Task) -> RunFolder:
    """The folder of the run: ``--output`` (or its default), or the run ``--resume RUN`` names."""
    if cfg.resume in (None, "auto"):
        return RunFolder(Path(cfg.output or _absolute(task.default_output())))
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


def _plan_run(cfg, task: Task, dist: Dist, stack: ExitStack) -> Plan:
    """Check the run folder, lock it (when it holds a run) and choose the checkpoint; writes nothing."""
    run = _run_folder(cfg, task)
    if not run.holds_run():
        if cfg.resume == "auto":
            return Plan(run, fresh=True, notes=[f"no run in {run.root} yet: starting a new one"])
        return Plan(run, fresh=True)
    other = _task_of(run)
    if other is not None and other != cfg.task:
        from .config import TASK_COMMAND

        raise ConfigError(f"run folder {run.root} holds a `sarvit {TASK_COMMAND.get(other, other)}` run, not a "
                          f"`sarvit {TASK_COMMAND[cfg.task]}` one; choose another --output (nothing there is "
                          "overwritten)")
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
    plan.extend_from = _check_same_experiment(cfg, task, run)
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


def _choose_checkpoint(cfg, run: RunFolder) -> tuple[Path | None, tuple[str, ...]]:
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


def _task_of(run: RunFolder) -> str | None:
    """The task of the run ``run`` holds, as its config.yaml says (None: no readable config.yaml)."""
    import yaml

    try:
        saved = yaml.safe_load(run.config.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return saved.get("task", "supervised") if isinstance(saved, dict) else None


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


def _check_same_experiment(cfg, task: Task, run: RunFolder) -> int | None:
    """Refuse a resume that would change the experiment; returns the old epochs when ``--extend`` lengthens it."""
    saved = _saved_config(run)
    if not saved:
        return None
    now = to_dict(cfg)
    # an option newer than the run's config.yaml: the run had its default
    defaults = to_dict(dataclasses.replace(type(cfg)(), task=cfg.task))
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in task.resumable and not _same(k, saved.get(k), v)}
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


def _write_run_folder(cfg, dist: Dist, plan: Plan, data: Data, stack: ExitStack) -> None:
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


def _restore(plan: Plan, cfg, dist: Dist, task: Task, state: LoopState, tally: Tally) -> list[str]:
    """Load the checkpoint into the parts and the loop state; returns what the banner should say."""
    path = plan.resume_from
    task.check_checkpoint(ckpt.read_metadata(path / ckpt.WEIGHTS), path)
    data = task.data
    saved = ckpt.load_state(path)
    if saved["world"] != dist.world:
        raise ConfigError(f"checkpoint {path} was written by {saved['world']} processes; resume it with "
                          f"{saved['world']} (the data order and the batches depend on it), not {dist.world}")
    task.model.load_state_dict(ckpt.load_weights(path / ckpt.WEIGHTS, dist.device), strict=True)
    if task.ema is not None:
        task.ema.module.load_state_dict(ckpt.load_weights(path / ckpt.EMA_WEIGHTS, dist.device), strict=True)
    task.objective.load_state_dict(saved.get("objective", {}), strict=True)
    task.optimizer.load_state_dict(saved["optimizer"])
    if task.scaler is not None and saved.get("scaler"):
        task.scaler.load_state_dict(saved["scaler"])
    # checkpoints written before LoopState.best_score was named so call it best_top1
    loop = {"best_score": saved["loop"].get("best_top1"), **saved["loop"]}
    for f in dataclasses.fields(LoopState):
        setattr(state, f.name, loop[f.name])
    _set_rng_state(saved["rng"][dist.rank], dist.device)
    notes = [f"resuming from {path}"]
    changed = _follow_data_change(saved, state, data)
    if changed:
        notes.append(changed)
    if changed or plan.extend_from is not None:  # the schedule is the new one, at the resumed step
        task.scheduler.step_update(num_updates=state.global_step)
    else:
        task.scheduler.load_state_dict(saved["scheduler"])
    if plan.extend_from is not None:
        notes.append(f"extending the run from {plan.extend_from} to {cfg.epochs} epochs: the schedules (learning "
                     f"rate, lambda, and a pre-training's teacher momentum and weight decay) are recomputed for "
                     f"{cfg.epochs} epochs (lr now "
                     f"{task.optimizer.param_groups[0]['lr']:.3g})")
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


def _save(run: RunFolder, cfg, dist: Dist, task: Task, state: LoopState, metadata: dict[str, Any],
          tally: dict[str, Any], previous: str | None) -> str | None:
    """Checkpoint the run (main rank; every rank sends its RNG states); returns the checkpoint's name."""
    rngs = gather_objects(_rng_state(dist.device))  # every rank's generators, in rank order
    name = None
    if dist.main:
        payload = {
            "loop": dataclasses.asdict(state),
            "optimizer": task.optimizer.state_dict(),
            "scheduler": task.scheduler.state_dict(),
            "scaler": task.scaler.state_dict() if task.scaler is not None else None,
            "rng": rngs,
            "world": dist.world,
            "data_order": {"seed": cfg.seed, "epoch": state.epoch, "samples_done": state.step_in_epoch * cfg.batch_size},
            "data": {"train_size": task.data.train_size, "steps_per_epoch": task.data.steps_per_epoch},
            "epoch_tally": tally,
            "objective": task.objective.state_dict(),  # the auxiliary loss's own parameters (DRLoc's MLP)
        }
        meta = {**metadata, "epoch": state.epoch, "step": state.global_step}
        name = ckpt.save_checkpoint(run.root, state.global_step, task.model, payload, meta,
                                    ema=task.ema.module if task.ema is not None else None, previous=previous).name
    barrier()
    return name


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


