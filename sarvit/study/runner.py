"""Run a study's trainings: one ``sarvit train`` (or ``sarvit pretrain``) process per run,
finished runs skipped.

Each run is ``python -m sarvit train --config RECIPE --<option> <value> ... --output
RUN --resume auto`` (``pretrain``: the same, ``method`` as ``--method``; under
``torchrun`` when asked), its output appended to ``<runs>/logs/<id>.log``. A pretrain
study with a probe then runs ``python -m sarvit linprobe --config PROBE_RECIPE
--<option> <value> ... --checkpoint RUN --output RUN/linprobe --seed SEED --resume auto``
in the same slot, its output appended to the same log. A run whose folder holds
``summary.json`` (and whose probe folder does, when probed) is finished and skipped; an
interrupted one continues from its last checkpoint (a finished pre-training with an
unfinished probe runs only the probe), so killing the study loses at most the
unfinished part of the runs in flight. ``jobs`` runs go side by side (each with
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
from .spec import Run, Study, config_options, probe_options

__all__ = ["RunStatus", "status_of", "train_command", "probe_command", "commands_of", "check_runs", "check_output",
           "check_writable", "run_study", "MARKER"]


@dataclass
class RunStatus:
    run: Run
    state: str  # "finished" | "interrupted" (has a checkpoint) | "new"


def status_of(run: Run) -> str:
    """finished (the run, and its probe when it has one) | interrupted (a checkpoint, or a finished
    pre-training whose probe is to run) | new."""
    folder = RunFolder(run.folder)
    if folder.summary.is_file():
        if run.probe is None or RunFolder(run.probe).summary.is_file():
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


def commands_of(study: Study, run: Run, torchrun: int = 0) -> list[tuple[str, list[str]]]:
    """What is left to do for ``run``: ``[(stage, command)]``, stages ``train`` and ``probe``, in order."""
    todo = []
    if not RunFolder(run.folder).summary.is_file():
        todo.append(("train", train_command(study, run, torchrun)))
    if run.probe is not None and not RunFolder(run.probe).summary.is_file():
        todo.append(("probe", probe_command(study, run, torchrun)))
    return todo


def check_runs(study: Study) -> None:
    """Before the first run: the folders can be written, the masks of ``jaccard`` exist, and the checks
    only timm can make (model, optimizer, schedule, data), once per distinct configuration; a pretrain
    study's probes too. The configurations are checked before any folder is made."""
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
        for run in study.runs:
            check_probe_folder(study, run)
    check_output(study)
    check_writable(Path(study.runs_dir), "--runs")


# options of a probe that do not change what it computes: a probe may finish with others
_NEUTRAL = {"output", "resume", "extend", "pretrained", "device", "workers", "log_interval", "checkpoint_interval"}


def check_probe_folder(study: Study, run: Run) -> None:
    """A probe folder that exists was made with the options the study gives it now: a finished probe of
    other options would be reported as this study's, an interrupted one resumed with the wrong ones."""
    saved = RunFolder(run.probe).config
    if not saved.is_file():
        return
    try:
        old = load_config(saved, command="linprobe")
    except ConfigError:
        return  # a damaged config.yaml: the probe itself says what is wrong when it resumes
    from ..pretrained import backbone_architecture

    # the probe builds the backbone's own architecture (its sarvit metadata), as `sarvit linprobe` records it
    new = backbone_architecture(load_config(study.probe.recipe, probe_options(study.probe, run), command="linprobe"))
    before, now = to_dict(old), to_dict(new)
    changed = sorted(k for k in set(before) | set(now) if k not in _NEUTRAL and before.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(f"study {study.name}: the probe {run.probe} was made with other options ({shown}); "
                          "restore the study's probe options, or move that folder away to probe again")


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
    """Run every unfinished run of ``study`` (and its probe); returns the runs that failed.

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
                if job.stage == "probe":
                    what = "probing"
                say(f"[{job.index}/{total}] {what} {_label(run)} (log {job.log})")
            proc = _wait_any(running)
            job = running.pop(proc)
            run = job.status.run
            stage_done = RunFolder(run.probe if job.stage == "probe" else run.folder).summary.is_file()
            if stage_done and job.stages:  # the pre-training finished: its probe, in the same slot
                launch(job)
                say(f"[{job.index}/{total}] probing {_label(run)}")
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
                what = " (its probe)" if job.stage == "probe" else ""
                say(f"[{job.index}/{total}] FAILED {_label(run)}{what} (exit {proc.returncode}); last lines of "
                    f"{job.log}:\n{_tail(job.log)}")
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


def _label(run: Run) -> str:
    return f"{run.method}" + (f" | {run.cell}" if run.cell else "") + f" | seed {run.seed}"


def _result(run: Run) -> str:
    import json

    try:
        final = json.loads(RunFolder(run.folder).summary.read_text())["final"]
        if "knn_top1" not in final:
            return f"val top-1 {final['top1']:.2f}"
        text = f"k-NN top-1 {final['knn_top1']:.2f}"
        if run.probe is not None:
            text += f", probe top-1 {json.loads(RunFolder(run.probe).summary.read_text())['final']['top1']:.2f}"
        return text
    except (OSError, ValueError, KeyError, TypeError):
        return "no summary"
