"""Run a study's trainings: one ``sarvit train`` (or ``sarvit pretrain``) process per run,
finished runs skipped.

Each run is ``python -m sarvit train --config RECIPE --<option> <value> ... --output
RUN --resume auto`` (``pretrain``: the same, ``method`` as ``--method``; under
``torchrun`` when asked), its output appended to ``<runs>/logs/<id>.log``. A pretrain
study with a probe then runs ``python -m sarvit linprobe --config PROBE_RECIPE
--<option> <value> ... --checkpoint RUN --output RUN/linprobe --seed SEED --resume auto``
in the same slot, its output appended to the same log. A study with a ``transfer`` section
then runs each of its stages, ``python -m sarvit detect|segment --config STAGE_RECIPE
--<option> <value> ... --backbone RUN --output RUN/<command> --seed SEED --resume auto``,
in the same slot and log. A run whose folder holds ``summary.json`` (and whose probe and
stage folders do) is finished and skipped; an interrupted one continues from its last
checkpoint (a finished training runs only its unfinished probe and stages, each resumed
from its own checkpoint), so killing the study loses at most the unfinished part of the
runs in flight. ``jobs`` runs go side by side (each with
``cores / jobs`` threads, or one GPU of ``devices`` each).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config import ConfigError, load_config, to_dict, validate_with_libraries
from ..errors import UserError
from ..runs import RunFolder
from .spec import Run, Stage, Study, config_options, probe_options, stage_options

__all__ = ["RunStatus", "status_of", "train_command", "probe_command", "stage_command", "commands_of",
           "all_commands", "check_runs", "check_folders", "check_output", "check_writable", "run_study", "MARKER"]


@dataclass
class RunStatus:
    run: Run
    state: str  # "finished" | "interrupted" (has a checkpoint) | "new"


def _after_training(run: Run) -> dict[str, Path]:
    """The folders of what runs after ``run``'s training, in order: ``{"probe": ..., "detect": ..., ...}``."""
    return {**({"probe": run.probe} if run.probe is not None else {}), **run.stages}


def status_of(run: Run) -> str:
    """finished (the run, its probe and every transfer stage it has) | interrupted (a checkpoint, or a
    finished training whose probe or stages are to run) | new."""
    folder = RunFolder(run.folder)
    if folder.summary.is_file():
        if all(RunFolder(f).summary.is_file() for f in _after_training(run).values()):
            return "finished"
        return "interrupted"
    return "interrupted" if folder.holds_run() else "new"


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _launcher(torchrun: int) -> list[str]:
    launcher = [sys.executable, "-m"]
    if torchrun:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}", "-m"]
    return launcher


def _flags(options: dict[str, Any]) -> list[str]:
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", _cli_value(value)]
    return args


def train_command(study: Study, run: Run, torchrun: int = 0) -> list[str]:
    """The ``sarvit train`` (``sarvit pretrain``) command line of one run (``torchrun`` > 0: that many
    processes)."""
    args = ["sarvit", study.run_command, "--config", study.recipe, *_flags(run.options)]
    return _launcher(torchrun) + args + ["--output", str(run.folder.resolve()), "--resume", "auto"]


def probe_command(study: Study, run: Run, torchrun: int = 0) -> list[str]:
    """The ``sarvit linprobe`` command line of one run's probe: its backbone, its seed, ``RUN/linprobe``."""
    assert study.probe is not None and run.probe is not None, "a study without a probe has no probe command"
    args = ["sarvit", "linprobe", "--config", study.probe.recipe, *_flags(study.probe.options)]
    return _launcher(torchrun) + args + ["--checkpoint", str(run.folder.resolve()), "--output",
                                         str(run.probe.resolve()), "--seed", str(run.seed), "--resume", "auto"]


def stage_command(study: Study, run: Run, stage: Stage, torchrun: int = 0) -> list[str]:
    """The ``sarvit detect`` / ``sarvit segment`` command line of one run's transfer stage: its weights as the
    backbone, its seed, ``RUN/<command>``."""
    folder = run.stages[stage.command]
    args = ["sarvit", stage.command, "--config", stage.recipe, *_flags(stage.options)]
    return _launcher(torchrun) + args + ["--backbone", str(run.folder.resolve()), "--output", str(folder.resolve()),
                                         "--seed", str(run.seed), "--resume", "auto"]


def all_commands(study: Study, run: Run, torchrun: int = 0) -> list[tuple[str, list[str]]]:
    """Everything ``run`` is: ``[(stage, command)]``, stages ``train``, ``probe``, then the transfer commands
    (``detect``, ``segment``) in the study's order."""
    todo = [("train", train_command(study, run, torchrun))]
    if run.probe is not None:
        todo.append(("probe", probe_command(study, run, torchrun)))
    for stage in study.transfer:
        todo.append((stage.command, stage_command(study, run, stage, torchrun)))
    return todo


def stage_folder(run: Run, stage: str) -> Path:
    """The folder of ``stage`` (train, probe, detect, segment) of ``run``."""
    return run.folder if stage == "train" else _after_training(run)[stage]


def commands_of(study: Study, run: Run, torchrun: int = 0) -> list[tuple[str, list[str]]]:
    """What is left to do for ``run``: :func:`all_commands` without the stages whose folder holds a summary."""
    return [(stage, command) for stage, command in all_commands(study, run, torchrun)
            if not RunFolder(stage_folder(run, stage)).summary.is_file()]


def check_runs(study: Study) -> None:
    """Before the first run: the folders can be written, the masks of ``jaccard`` exist, and the checks
    only timm can make (model, optimizer, schedule, data), once per distinct configuration; a pretrain
    study's probes and the transfer stages too, and that the probe and stage folders that exist were made
    with today's options. The configurations are checked before any folder is made."""
    if study.jaccard:
        from ..data.masks import open_masked

        try:
            open_masked(study.jaccard["data"], study.jaccard.get("data_root"))
        except UserError as err:
            raise ConfigError(f"study {study.name}: jaccard.data: {err}") from None
    seen = set()
    for run in study.runs:
        options = {k: v for k, v in run.options.items() if k != "seed"}
        key = repr(sorted(options.items(), key=lambda kv: kv[0]))
        if key in seen:
            continue
        seen.add(key)
        try:
            validate_with_libraries(load_config(study.recipe, config_options(run.options), command=study.run_command))
        except ConfigError as err:
            where = f"method {run.method!r}" + (f", cell {run.cell!r}" if run.cell else "")
            raise ConfigError(f"study {study.name}: {where}: {err}") from None
    if study.probe is not None:
        try:
            validate_with_libraries(load_config(study.probe.recipe, probe_options(study.probe, study.runs[0]),
                                                command="linprobe"))
        except ConfigError as err:
            raise ConfigError(f"study {study.name}: probe: {err}") from None
    for stage in study.transfer:
        from ..dense.tasks import check_dense_config, open_dense_data

        try:
            cfg = check_dense_config(load_config(stage.recipe, stage_options(stage, study.runs[0]),
                                                 command=stage.command))
            open_dense_data(cfg)  # the stage's data exist: found now, not after every training
        except UserError as err:
            raise ConfigError(f"study {study.name}: transfer.{stage.command}: {err}") from None
    check_folders(study)
    check_output(study)
    check_writable(Path(study.runs_dir), "--runs")


# options of a probe that do not change what it computes: a probe may finish with others
_NEUTRAL = {"output", "resume", "extend", "pretrained", "device", "workers", "log_interval", "checkpoint_interval"}


def check_folders(study: Study) -> None:
    """The probe and transfer-stage folders that exist were made with the options the study gives them now
    (before a run, and before ``--report-only`` reports them under the study's options)."""
    for run in study.runs:
        if study.probe is not None:
            check_probe_folder(study, run)
        for stage in study.transfer:
            check_stage_folder(study, run, stage)


def _other_options(folder: Path, command: str, expected) -> str | None:
    """How the run in ``folder`` (a probe or a transfer stage) was made otherwise than with ``expected()``
    (a config), as ``"epochs 5 -> 3, ..."``; None when it matches, has no config.yaml, or a damaged one (the
    command itself says what is wrong when it resumes)."""
    saved = RunFolder(folder).config
    if not saved.is_file():
        return None
    try:
        old = load_config(saved, command=command)
    except ConfigError:
        return None
    before, now = to_dict(old), to_dict(expected())
    changed = sorted(k for k in set(before) | set(now) if k not in _NEUTRAL and before.get(k) != now.get(k))
    return ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed) or None


def check_probe_folder(study: Study, run: Run) -> None:
    """A probe folder that exists was made with the options the study gives it now: a finished probe of
    other options would be reported as this study's, an interrupted one resumed with the wrong ones."""
    from ..pretrained import backbone_architecture

    # the probe builds the backbone's own architecture (its sarvit metadata), as `sarvit linprobe` records it
    shown = _other_options(run.probe, "linprobe", lambda: backbone_architecture(
        load_config(study.probe.recipe, probe_options(study.probe, run), command="linprobe")))
    if shown:
        raise ConfigError(f"study {study.name}: the probe {run.probe} was made with other options ({shown}); "
                          "restore the study's probe options, or move that folder away to probe again")


def check_stage_folder(study: Study, run: Run, stage: Stage) -> None:
    """A transfer stage's folder that exists was made with the options the study gives it now (as
    :func:`check_probe_folder`; the data compared as the stage records it, its folder made absolute)."""
    from ..dense.tasks import check_dense_config
    from ..pretrained import backbone_architecture

    # the stage builds the backbone's own architecture (its sarvit metadata), as `sarvit detect` records it
    folder = run.stages[stage.command]
    shown = _other_options(folder, stage.command, lambda: backbone_architecture(check_dense_config(
        load_config(stage.recipe, stage_options(stage, run), command=stage.command))))
    if shown:
        raise ConfigError(f"study {study.name}: the {stage.command} stage {folder} was made with other options "
                          f"({shown}); restore the study's transfer.{stage.command} options, or move that folder "
                          "away to run it again")


MARKER = "study.txt"  # in a report folder: the name of the study whose report it holds


def check_output(study: Study) -> None:
    """The report folder can be written and holds no other study's report."""
    output = Path(study.output)
    marker = output / MARKER
    if marker.is_file() and marker.read_text().strip() != study.name:
        raise ConfigError(f"{output} holds the report of the study {marker.read_text().strip()!r}, not of "
                          f"{study.name!r}; choose another --output")
    check_writable(output, "--output")


def check_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write into {what} {folder}: {err.strerror or err}; choose a folder you can "
                          "write to") from None


def _minutes(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the training stops when the study process dies, even by SIGKILL (no orphan holds the run)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


class _Slots:
    """Environment of each parallel slot: its thread count and (optionally) its GPU."""

    def __init__(self, jobs: int, threads: int | None, devices: list[str] | None) -> None:
        self.jobs = jobs
        self.threads = threads if threads is not None else (max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None)
        self.devices = devices
        self.free = list(range(jobs))

    def env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
            env["MKL_NUM_THREADS"] = str(self.threads)
            env["NUMBA_NUM_THREADS"] = str(self.threads)
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = self.devices[slot % len(self.devices)]
        return env


def run_study(study: Study, *, jobs: int = 1, threads: int | None = None, devices: list[str] | None = None,
              torchrun: int = 0, say: Callable[[str], None] = print) -> list[Run]:
    """Run every unfinished run of ``study`` (and its probe and transfer stages); returns the runs that failed
    (a failed training runs nothing after it; a failed probe or stage lets the run's other stages run).

    Stops the trainings in flight and re-raises on SIGINT/SIGTERM (their checkpoints stay;
    the same command continues them).
    """
    statuses = [RunStatus(run, status_of(run)) for run in study.runs]
    todo = [s for s in statuses if s.state != "finished"]
    counts = {state: sum(s.state == state for s in statuses) for state in ("finished", "interrupted", "new")}
    say(f"sarvit study {study.name}: {len(statuses)} run{'s' if len(statuses) != 1 else ''} ({counts['finished']} finished, "
        f"{counts['interrupted']} to resume, {counts['new']} new), {jobs} at a time; runs in {study.runs_dir}")
    if not todo:
        return []
    logs = study.runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    slots = _Slots(jobs, threads, devices)
    running: dict[subprocess.Popen, _Job] = {}
    failed: list[Run] = []
    durations: list[float] = []
    done = counts["finished"]
    total = len(statuses)
    queue = list(todo)
    started_index = counts["finished"]

    def stop(signum, _frame):
        raise KeyboardInterrupt(signum)

    def launch(job: _Job) -> None:
        stage, command = job.stages.pop(0)
        job.stage = stage
        with job.log.open("a") as handle:
            handle.write(f"\n$ {shlex.join(command)}\n")
            handle.flush()
            proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=slots.env(job.slot),
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        running[proc] = job

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or running:
            while queue and slots.free:
                status = queue.pop(0)
                started_index += 1
                run = status.run
                job = _Job(status, slots.free.pop(0), time.monotonic(), logs / f"{run.id}.log", started_index,
                           commands_of(study, run, torchrun))
                if not job.stages:  # finished meanwhile by another study sharing the run
                    slots.free.append(job.slot)
                    done += 1
                    say(f"[{job.index}/{total}] finished {_label(run)} meanwhile: {_result(run)}")
                    continue
                launch(job)
                what = "resuming" if status.state == "interrupted" else "starting"
                if job.stage != "train":
                    what = _STAGE_VERB[job.stage] + (" (resuming)" if RunFolder(stage_folder(run, job.stage))
                                                     .holds_run() else "")
                say(f"[{job.index}/{total}] {what} {_label(run)} (log {job.log})")
            proc = _wait_any(running)
            job = running.pop(proc)
            run = job.status.run
            if not RunFolder(stage_folder(run, job.stage)).summary.is_file():  # this stage failed
                what = {"train": "", "probe": " (its probe)"}.get(job.stage, f" (its {job.stage} stage)")
                say(f"[{job.index}/{total}] FAILED {_label(run)}{what} (exit {proc.returncode}); last lines of "
                    f"{job.log}:\n{_tail(job.log)}")
                if job.stage == "train":
                    job.stages = []  # nothing runs on a training that did not finish
            if job.stages:  # the next stage, in the same slot (after a failed probe or stage: the others still run)
                launch(job)
                say(f"[{job.index}/{total}] {_STAGE_VERB[job.stage]} {_label(run)}")
                continue
            slots.free.append(job.slot)
            seconds = time.monotonic() - job.began
            if status_of(run) == "finished":  # also when another study sharing the run finished it
                done += 1
                durations.append(seconds)
                left = total - done - len(failed)
                eta = sum(durations) / len(durations) * left / jobs
                say(f"[{job.index}/{total}] finished {_label(run)} in {_minutes(seconds)}: {_result(run)}"
                    + (f"; {left} to go, about {_minutes(eta)} left" if left else ""))
            else:
                failed.append(run)
    except KeyboardInterrupt:
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        say(f"sarvit study {study.name}: interrupted; {len(running)} run(s) stopped at their last checkpoint. "
            "Run the same command again to continue.")
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return failed


@dataclass
class _Job:
    """One run in one slot: what is left of it (``[(stage, command)]``) and the stage in flight."""

    status: RunStatus
    slot: int
    began: float
    log: Path
    index: int
    stages: list
    stage: str = ""


def _wait_any(running: dict) -> subprocess.Popen:
    while True:
        for proc in running:
            if proc.poll() is not None:
                return proc
        time.sleep(0.5)


_STAGE_VERB = {"probe": "probing", "detect": "fine-tuning for detection",
               "segment": "fine-tuning for segmentation"}  # what the log line says a stage does


def _label(run: Run) -> str:
    return f"{run.method}" + (f" | {run.cell}" if run.cell else "") + f" | seed {run.seed}"


# a transfer stage's headline in summary.json's "final" (fractions) and how a log line names it
_STAGE_RESULT = {"detect": ("map_50", "box mAP@0.5"), "segment": ("miou", "mIoU")}


def _result(run: Run) -> str:
    import json

    def final(folder: Path) -> dict:
        return json.loads(RunFolder(folder).summary.read_text())["final"]

    try:
        trained = final(run.folder)
        if "knn_top1" not in trained:
            text = f"val top-1 {trained['top1']:.2f}"
        else:
            text = f"k-NN top-1 {trained['knn_top1']:.2f}"
            if run.probe is not None:
                text += f", probe top-1 {final(run.probe)['top1']:.2f}"
        for command, folder in run.stages.items():
            key, name = _STAGE_RESULT[command]
            text += f", {command} {name} {100 * final(folder)[key]:.2f}%"
        return text
    except (OSError, ValueError, KeyError, TypeError):
        return "no summary"
