"""Per-epoch records of a run: ``metrics.jsonl`` (one JSON line per epoch) and TensorBoard.

Only the main rank writes. Each line is flushed and fsynced as it is written, so a kill
loses at most the line being written; on resume the lines of the epochs that will be
trained again are dropped (atomically) and TensorBoard purges its events from the
resumed step on, so a resumed run's records read like an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .runs import RunFolder, atomic_write

__all__ = ["RunLog", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The complete lines of a ``metrics.jsonl`` (a torn last line is skipped)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunLog:
    def __init__(self, run_dir: str | Path, main: bool, resume_epoch: int = 0, resume_step: int = 0) -> None:
        self.main = main
        run = RunFolder(run_dir)
        self.path = run.metrics
        self.writer = None
        if not main:
            return
        kept = [r for r in read_metrics(self.path) if r.get("epoch", 0) <= resume_epoch]
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.tensorboard), purge_step=resume_step or None)

    def epoch(self, row: dict[str, Any], step: int) -> None:
        """Append one epoch's record (``row['epoch']`` counts from 1) and its scalars."""
        if "train_loss" not in row:
            raise ValueError(f"epoch {row.get('epoch')} trained no step; its record is not written")
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch":
                group = "val" if key.startswith("val_") else "train"
                self.writer.add_scalar(f"{group}/{key.removeprefix(group + '_')}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
