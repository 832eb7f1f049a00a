"""Run a study's trainings: one ``sarvit train`` process per run, finished runs skipped.

Each run is ``python -m sarvit train --config RECIPE --<option> <value> ... --output
RUN --resume auto`` (under ``torchrun`` when asked), its output appended to
``<runs>/logs/<id>.log``. A run whose folder holds ``summary.json`` is finished and
skipped; an interrupted one continues from its last checkpoint, so killing the study
loses at most the unfinished part of the runs in flight. ``jobs`` runs go side by side
(each with ``cores / jobs`` threads, or one GPU of ``devices`` each).
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

from ..config import ConfigError, load_config, validate_with_libraries
from ..errors import UserError
from ..runs import RunFolder
from .spec import Run, Study

__all__ = ["RunStatus", "status_of", "train_command", "check_runs", "check_output", "check_writable", "run_study", "MARKER"]


@dataclass
class RunStatus:
    run: Run
    state: str  # "finished" | "interrupted" (has a checkpoint) | "new"


def status_of(run: Run) -> str:
    folder = RunFolder(run.folder)
    if folder.summary.is_file():
        return "finished"
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


def train_command(study: Study, run: Run, torchrun: int = 0) -> list[str]:
    """The ``sarvit train`` command line of one run (``torchrun`` > 0: that many processes)."""
    launcher = [sys.executable, "-m"]
    if torchrun:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}", "-m"]
    args = ["sarvit", "train", "--config", study.recipe]
    for key, value in run.options.items():
        args += [f"--{key.replace('_', '-')}", _cli_value(value)]
    return launcher + args + ["--output", str(run.folder.resolve()), "--resume", "auto"]


def check_runs(study: Study) -> None:
    """Before the first run: the folders can be written, the masks of ``jaccard`` exist, and the checks
    only timm can make (model, optimizer, schedule, data), once per distinct configuration."""
    check_output(study)
    check_writable(Path(study.runs_dir), "--runs")
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
            validate_with_libraries(load_config(study.recipe, run.options))
        except ConfigError as err:
            where = f"method {run.method!r}" + (f", cell {run.cell!r}" if run.cell else "")
            raise ConfigError(f"study {study.name}: {where}: {err}") from None


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
    """Run every unfinished run of ``study``; returns the runs that failed.

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
    running: dict[subprocess.Popen, tuple[RunStatus, int, float, Path, int]] = {}
    failed: list[Run] = []
    durations: list[float] = []
    done = counts["finished"]
    total = len(statuses)
    queue = list(todo)
    started_index = counts["finished"]

    def stop(signum, _frame):
        raise KeyboardInterrupt(signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or running:
            while queue and slots.free:
                status = queue.pop(0)
                slot = slots.free.pop(0)
                started_index += 1
                run = status.run
                log = logs / f"{run.id}.log"
                command = train_command(study, run, torchrun)
                with log.open("a") as handle:
                    handle.write(f"\n$ {shlex.join(command)}\n")
                    handle.flush()
                    proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=slots.env(slot),
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
                what = "resuming" if status.state == "interrupted" else "starting"
                say(f"[{started_index}/{total}] {what} {_label(run)} (log {log})")
                running[proc] = (status, slot, time.monotonic(), log, started_index)
            proc = _wait_any(running)
            status, slot, began, log, index = running.pop(proc)
            slots.free.append(slot)
            seconds = time.monotonic() - began
            run = status.run
            if status_of(run) == "finished":  # also when another study sharing the run finished it
                done += 1
                durations.append(seconds)
                left = total - done - len(failed)
                eta = sum(durations) / len(durations) * left / jobs
                say(f"[{index}/{total}] finished {_label(run)} in {_minutes(seconds)}: {_result(run)}"
                    + (f"; {left} to go, about {_minutes(eta)} left" if left else ""))
            else:
                failed.append(run)
                say(f"[{index}/{total}] FAILED {_label(run)} (exit {proc.returncode}); last lines of {log}:\n"
                    f"{_tail(log)}")
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
        summary = json.loads(RunFolder(run.folder).summary.read_text())
        return f"val top-1 {summary['final']['top1']:.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return "no summary"
