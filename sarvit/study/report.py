"""The evidence of a finished study: ``write_report(study, output)``.

Reads the run folders of a :class:`~.spec.Study` (``config.yaml``, ``metrics.jsonl``,
``summary.json``, the weights) and writes into ``output``:

    runs.csv            one row per run: status, the options that vary, final and best metrics
    figures/            curves per grid cell, the attention figure, each transfer stage's predictions (PNG)
    jaccard/            per-image Jaccard scores of every run (when the study names masks)
    report.md           the report, GitHub-renderable, figures linked relatively
    report.html         the same report in one file: figures as data URIs, CSS inline, no script

A run is finished when its ``summary.json`` exists (and, in a pretrain study with a probe,
its probe's). Runs that are missing or unfinished are listed, and every number is computed
from the runs that finished (a paired difference over the seeds where both methods
finished). Every file is written atomically.

A pretrain study's headline metric is the linear probe's final validation top-1 (the
k-NN top-1 without a probe); beside it the pre-training's final 20-NN top-1, the
backbone's spatial entropy and components, and curves of the pre-training's loss terms
and k-NN top-1. Its attention figure and Jaccard use each run's exported backbone
(``backbone.safetensors`` for ``last``, ``best.safetensors`` for ``best``); the per-head
table is left out (it evaluates a classifier).

A study with a ``transfer`` section gets a Transfer section: per stage (``sarvit detect``:
box mAP@0.5, COCO box mAP, mask mAP@0.5; ``sarvit segment``: mIoU, pixel accuracy) and grid
cell, the values of each stage's last evaluated epoch over the seeds whose stage finished,
the paired difference of the headline to the baseline, and the ``predictions.png`` of each
method's first seed. A run's ``status`` is its training's (and probe's); each stage has its
own (``detect_status``, ... in runs.csv), and the run list names the unfinished stages.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..runlog import read_metrics
from ..runs import RunFolder, atomic_write
from .stats import PairedDifference, Spread, band, paired_difference, spread

if TYPE_CHECKING:
    from .spec import Run, Study

__all__ = ["RunRecord", "StageRecord", "MethodRow", "StageRow", "read_run", "compare", "compare_stage", "runs_table",
           "write_report", "PAIRING"]

PAIRING = ("paired by seed: the same seed gives the same training subset, initial weights and data order; "
           "differences are method minus baseline, averaged over the seeds where both finished, with a 95% "
           "Student-t confidence interval and the paired t-test's two-sided p-value (SciPy)")
BEST_EPOCH_CAVEAT = ("best-epoch top-1 picks the epoch with the best validation top-1 on the validation set itself: "
                     "an optimistic number, shown for reference only; compare methods on the final epoch")
FIXED_COLUMNS = ["id", "method", "cell", "seed", "status"]
METRIC_COLUMNS = ["final_val_top1", "final_val_top5", "best_val_top1", "best_epoch", "final_val_se",
                  "final_val_components"]
PRETRAIN_COLUMNS = ["final_val_knn_top1", "best_val_knn_top1", "best_epoch", "final_val_se", "final_val_components"]
PROBE_COLUMNS = ["probe_status", "probe_val_top1", "probe_val_top5", "probe_val_se", "probe_val_components",
                 "probe_wall_time_s"]
# a transfer stage's validation keys in runs.csv and its tables, the headline (best-checkpoint score) first
STAGE_METRICS = {"detect": ("val_map_50", "val_map", "val_mask_map_50"), "segment": ("val_miou", "val_pixel_acc")}
METRIC_NAMES = {"val_map_50": "box mAP@0.5", "val_map": "COCO box mAP", "val_mask_map_50": "mask mAP@0.5",
                "val_miou": "mIoU", "val_pixel_acc": "pixel accuracy"}
STAGE_TITLES = {"detect": "Detection (Mask R-CNN, ViTDet simple feature pyramid)",
                "segment": "Semantic segmentation (semantic FPN head)"}
SSL_TASKS = ("dino", "mocov3")


# --- what a run folder says ---------------------------------------------------------------------


@dataclass
class RunRecord:
    """One run of the study and what its folder holds."""

    run: Any  # a spec.Run
    status: str  # finished | unfinished (stopped or failed: no summary.json) | missing
    final: dict = field(default_factory=dict)  # the last evaluated epoch's val_* values
    best_top1: float = math.nan
    best_epoch: int | None = None
    train: dict = field(default_factory=dict)  # the last epoch's train_<term> values
    wall_seconds: float = math.nan  # sum of epoch_time
    epochs_done: int = 0
    curves: dict = field(default_factory=dict)  # key -> (epochs, values), keys of figures.CURVE_PANELS
    config: dict = field(default_factory=dict)  # its config.yaml
    probe_status: str = ""  # of its linear probe (pretrain studies with a probe): as ``status``
    probe: dict = field(default_factory=dict)  # the probe's last evaluated epoch's val_* values
    probe_wall_seconds: float = math.nan
    stages: dict = field(default_factory=dict)  # transfer command (detect, segment) -> its StageRecord

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def pretrained(self) -> bool:
        """A ``sarvit pretrain`` run (DINO or MoCo v3)."""
        return self.config.get("task") in SSL_TASKS


@dataclass
class StageRecord:
    """What a transfer stage's folder (``RUN/detect``, ``RUN/segment``) holds."""

    status: str  # as RunRecord.status
    final: dict = field(default_factory=dict)  # the last evaluated epoch's val_* values (fractions, as logged)
    wall_seconds: float = math.nan  # sum of epoch_time
    figure: Path | None = None  # its predictions.png, once finished

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def _status(folder: RunFolder) -> str:
    if folder.summary.is_file():
        return "finished"
    return "unfinished" if folder.holds_run() else "missing"


def _last_evaluated(rows: list[dict], key: str) -> dict:
    """The ``val_*`` values of the last row that holds ``key``."""
    evaluated = [r for r in rows if key in r]
    return {k: v for k, v in evaluated[-1].items() if k.startswith("val_")} if evaluated else {}


def read_run(run) -> RunRecord:
    """Read ``run.folder`` (and ``run.probe``): status, final and best validation values, training terms,
    wall time."""
    from .figures import CURVE_PANELS

    folder = RunFolder(run.folder)
    record = RunRecord(run, _status(folder))
    probe = getattr(run, "probe", None)
    if probe is not None:
        _read_probe(record, RunFolder(probe))
        if record.finished and record.probe_status != "finished":
            record.status = "unfinished"  # pre-trained, not probed yet
    for command, stage in getattr(run, "stages", {}).items():
        record.stages[command] = _read_stage(command, RunFolder(stage))
    if record.status == "missing":
        return record
    record.config = folder.read_config(f"the run {run.id} has a damaged config.yaml")
    rows = [r for r in read_metrics(folder.metrics) if "epoch" in r]
    score = "val_knn_top1" if record.pretrained else "val_top1"
    evaluated = [r for r in rows if score in r]
    if evaluated:
        record.final = _last_evaluated(rows, score)
        best = max(evaluated, key=lambda r: r[score])  # the first of equal values, as training keeps it
        record.best_top1, record.best_epoch = best[score], best["epoch"]
    if rows:
        record.train = {k: v for k, v in rows[-1].items() if k.startswith("train_")}
        record.wall_seconds = float(sum(r.get("epoch_time", 0.0) for r in rows))
        record.epochs_done = int(rows[-1]["epoch"])
    for key in CURVE_PANELS:
        points = [(r["epoch"], r[key]) for r in rows if key in r]
        record.curves[key] = ([p[0] for p in points], [p[1] for p in points])
    return record


def _read_probe(record: RunRecord, folder: RunFolder) -> None:
    record.probe_status = _status(folder)
    if record.probe_status == "missing":
        return
    rows = [r for r in read_metrics(folder.metrics) if "epoch" in r]
    record.probe = _last_evaluated(rows, "val_top1")
    record.probe_wall_seconds = float(sum(r.get("epoch_time", 0.0) for r in rows)) if rows else math.nan


def _read_stage(command: str, folder: RunFolder) -> StageRecord:
    from ..dense.tasks import FIGURE  # the predictions figure a dense run draws at its end

    record = StageRecord(_status(folder))
    if record.status == "missing":
        return record
    rows = [r for r in read_metrics(folder.metrics) if "epoch" in r]
    record.final = _last_evaluated(rows, STAGE_METRICS[command][0])
    record.wall_seconds = float(sum(r.get("epoch_time", 0.0) for r in rows)) if rows else math.nan
    figure = folder.root / FIGURE
    record.figure = figure if record.finished and figure.is_file() else None
    return record


# --- options ------------------------------------------------------------------------------------


def _text(value) -> str:
    """A value as one table cell: numbers and words as written, lists and mappings as JSON."""
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def option_split(options: list[dict]) -> tuple[dict, list[str]]:
    """``(shared, varying)``: the options every one of ``options`` sets to the same value, and the names
    of the others (in first-seen order)."""
    names = list(dict.fromkeys(k for o in options for k in o))
    shared, varying = {}, []
    for name in names:
        values = {json.dumps(o[name], sort_keys=True, default=str) if name in o else None for o in options}
        if len(values) == 1:
            shared[name] = options[0][name]
        else:
            varying.append(name)
    return shared, varying


# --- runs.csv ---------------------------------------------------------------------------------


def _metric_values(r: RunRecord, pretrain: bool, probed: bool) -> list:
    """The values of :data:`METRIC_COLUMNS` (train) or :data:`PRETRAIN_COLUMNS` (+ :data:`PROBE_COLUMNS`)."""
    if not pretrain:
        return [r.final.get("val_top1"), r.final.get("val_top5"), r.best_top1, r.best_epoch,
                r.final.get("val_se"), r.final.get("val_components")]
    values = [r.final.get("val_knn_top1"), r.best_top1, r.best_epoch, r.final.get("val_se"),
              r.final.get("val_components")]
    if probed:
        values += [r.probe_status, r.probe.get("val_top1"), r.probe.get("val_top5"), r.probe.get("val_se"),
                   r.probe.get("val_components"), r.probe_wall_seconds]
    return values


def _stage_commands(records: list[RunRecord]) -> list[str]:
    """The transfer commands of the study's runs, in the study's order."""
    return list(dict.fromkeys(c for r in records for c in r.stages))


def stage_columns(command: str) -> list[str]:
    """The runs.csv columns of a transfer stage: its status, its final validation values, its wall time."""
    return [f"{command}_status", *(f"{command}_{key}" for key in STAGE_METRICS[command]), f"{command}_wall_time_s"]


def _stage_values(r: RunRecord, command: str) -> list:
    stage = r.stages.get(command, StageRecord("missing"))
    return [stage.status, *(stage.final.get(key) for key in STAGE_METRICS[command]), stage.wall_seconds]


def runs_table(records: list[RunRecord], pretrain: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of ``runs.csv``: one row per run, the options that vary across the study,
    the final and best validation metrics (``pretrain``: k-NN, and the probe's when probed), each transfer
    stage's status, final values (fractions, as logged) and wall time, every final training term, wall time
    and epochs. An option a run did not set shows the value its ``config.yaml`` holds (the recipe's or the
    default)."""
    _, varying = option_split([r.run.options for r in records])
    varying = [v for v in varying if v not in FIXED_COLUMNS]
    terms = sorted({k for r in records for k in r.train})
    probed = any(getattr(r.run, "probe", None) is not None for r in records)
    metrics = [*PRETRAIN_COLUMNS, *(PROBE_COLUMNS if probed else [])] if pretrain else METRIC_COLUMNS
    commands = _stage_commands(records)
    metrics = [*metrics, *(column for c in commands for column in stage_columns(c))]
    header = [*FIXED_COLUMNS, *varying, *metrics, *terms, "wall_time_s", "epochs_done"]
    rows = []
    for r in records:
        values = [*_metric_values(r, pretrain, probed), *(v for c in commands for v in _stage_values(r, c))]
        rows.append([r.run.id, r.run.method, r.run.cell, str(r.run.seed), r.status,
                     *(_text(r.run.options[v] if v in r.run.options else r.config.get(v)) for v in varying),
                     *(_number(v) for v in values), *(_number(r.train.get(t)) for t in terms),
                     _number(r.wall_seconds), str(r.epochs_done) if r.status != "missing" else ""])
    return header, rows


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _fixed(value, digits: int = 2) -> str:
    """A number for a table a person reads (runs.csv keeps every digit)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(header)
    out.writerows(rows)
    return buffer.getvalue()


# --- the comparison of one cell -------------------------------------------------------------------


@dataclass(frozen=True)
class MethodRow:
    """One method in one cell: spreads over its finished seeds and the paired difference to the baseline."""

    method: str
    top1: Spread
    difference: PairedDifference | None  # None for the baseline itself
    best_top1: Spread
    se: Spread
    components: Spread
    wall: Spread


def _by_seed(records: list[RunRecord], value) -> dict[int, float]:
    return {r.run.seed: value(r) for r in records if r.finished}


def compare(records: list[RunRecord], cell: str, methods: list[str], baseline: str) -> list[MethodRow]:
    """The rows of the comparison table of ``cell``, one per method in ``methods`` order."""
    in_cell = [r for r in records if r.run.cell == cell and r.finished]
    top1 = lambda r: r.final.get("val_top1", math.nan)  # noqa: E731
    reference = _by_seed([r for r in in_cell if r.run.method == baseline], top1)
    rows = []
    for method in methods:
        mine = [r for r in in_cell if r.run.method == method]
        rows.append(MethodRow(
            method=method,
            top1=spread([top1(r) for r in mine]),
            difference=None if method == baseline else paired_difference(_by_seed(mine, top1), reference),
            best_top1=spread([r.best_top1 for r in mine]),
            se=spread([r.final.get("val_se", math.nan) for r in mine]),
            components=spread([r.final.get("val_components", math.nan) for r in mine]),
            wall=spread([r.wall_seconds for r in mine]),
        ))
    return rows


@dataclass(frozen=True)
class PretrainRow:
    """One method of a pretrain study in one cell: the probe's top-1 (``None`` unprobed) and the k-NN top-1,
    each with its paired difference to the baseline, and the backbone's SE and components."""

    method: str
    probe: Spread | None
    probe_difference: PairedDifference | None  # None for the baseline itself, or unprobed
    knn: Spread
    knn_difference: PairedDifference | None
    best_knn: Spread
    se: Spread
    components: Spread
    wall: Spread  # pre-training and probe


def _spread_and_difference(in_cell: list[RunRecord], method: str, baseline: str, value):
    mine = [r for r in in_cell if r.run.method == method]
    reference = _by_seed([r for r in in_cell if r.run.method == baseline], value)
    return (spread([value(r) for r in mine]),
            None if method == baseline else paired_difference(_by_seed(mine, value), reference))


def compare_pretrain(records: list[RunRecord], cell: str, methods: list[str], baseline: str,
                     probed: bool) -> list[PretrainRow]:
    """The rows of the comparison table of ``cell`` in a pretrain study, one per method in ``methods`` order."""
    in_cell = [r for r in records if r.run.cell == cell and r.finished]
    probe_top1 = lambda r: r.probe.get("val_top1", math.nan)  # noqa: E731
    knn = lambda r: r.final.get("val_knn_top1", math.nan)  # noqa: E731
    wall = lambda r: r.wall_seconds + (r.probe_wall_seconds if probed else 0.0)  # noqa: E731
    rows = []
    for method in methods:
        mine = [r for r in in_cell if r.run.method == method]
        probe, probe_difference = _spread_and_difference(in_cell, method, baseline, probe_top1) if probed else (
            None, None)
        rows.append(PretrainRow(method, probe, probe_difference,
                                *_spread_and_difference(in_cell, method, baseline, knn),
                                best_knn=spread([r.best_top1 for r in mine]),
                                se=spread([r.final.get("val_se", math.nan) for r in mine]),
                                components=spread([r.final.get("val_components", math.nan) for r in mine]),
                                wall=spread([wall(r) for r in mine])))
    return rows


@dataclass(frozen=True)
class StageRow:
    """One method in one cell of a transfer stage: its headline (%) over the seeds whose stage finished, the
    paired difference to the baseline, the stage's other values (%) and its wall time."""

    method: str
    headline: Spread
    difference: PairedDifference | None  # None for the baseline itself
    others: dict  # validation key -> Spread, the keys of STAGE_METRICS after the headline
    wall: Spread


def compare_stage(records: list[RunRecord], cell: str, methods: list[str], baseline: str,
                  command: str) -> list[StageRow]:
    """The rows of the ``command`` (detect, segment) table of ``cell``, one per method in ``methods`` order:
    each stage's last evaluated epoch, in %."""
    done = [r for r in records if r.run.cell == cell and command in r.stages and r.stages[command].finished]

    def by_seed(method: str, key: str) -> dict[int, float]:
        return {r.run.seed: 100.0 * r.stages[command].final.get(key, math.nan) for r in done
                if r.run.method == method}

    headline, *others = STAGE_METRICS[command]
    rows = []
    for method in methods:
        mine = by_seed(method, headline)
        rows.append(StageRow(
            method=method, headline=spread(list(mine.values())),
            difference=None if method == baseline else paired_difference(mine, by_seed(baseline, headline)),
            others={key: spread(list(by_seed(method, key).values())) for key in others},
            wall=spread([r.stages[command].wall_seconds for r in done if r.run.method == method])))
    return rows


def stage_header(command: str, shown: list[str]) -> list[str]:
    """The header of a stage's table; ``shown``: the keys after the headline that the table shows."""
    name = METRIC_NAMES[STAGE_METRICS[command][0]]
    return ["method", "seeds", f"final {name} (%)", f"Δ {name} vs baseline [95% CI]", "pairs", "p",
            *(f"final {METRIC_NAMES[key]} (%)" for key in shown), "fine-tuning time / run ‡"]


def stage_table(rows: list[StageRow], shown: list[str]) -> list[list[str]]:
    return [[r.method, str(r.headline.n), _mean_std(r.headline), _difference(r.difference),
             "" if r.difference is None else str(r.difference.n), _p_value(r.difference),
             *(_mean_std(r.others[key]) for key in shown), _duration(r.wall)] for r in rows]


def _mean_std(s: Spread, digits: int = 2) -> str:
    if s.n == 0:
        return "n/a"
    if s.n < 2:
        return f"{s.mean:.{digits}f} ± n/a"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _difference(d: PairedDifference | None, digits: int = 2) -> str:
    if d is None:
        return "(baseline)"
    if d.n == 0:
        return "n/a (no shared seed)"
    if d.n < 2:
        return f"{d.mean:+.{digits}f} [n/a]"
    if math.isnan(d.low):  # the same difference on every seed: no spread, no t-interval
        return f"{d.mean:+.{digits}f} [n/a: the same on every seed]"
    return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"


def _p_value(d: PairedDifference | None) -> str:
    if d is None:
        return ""
    return "n/a" if math.isnan(d.p_value) else f"{d.p_value:.3g}"


def _duration(s: Spread) -> str:
    if s.n == 0:
        return "n/a"
    seconds = s.mean
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


COMPARISON_HEADER = ["method", "seeds", "final val top-1 (%)", "Δ top-1 vs baseline [95% CI]", "pairs", "p",
                     "best-epoch top-1 (%) †", "val SE", "components/head", "training time / run ‡"]


def comparison_table(rows: list[MethodRow]) -> list[list[str]]:
    return [[r.method, str(r.top1.n), _mean_std(r.top1), _difference(r.difference),
             "" if r.difference is None else str(r.difference.n), _p_value(r.difference), _mean_std(r.best_top1),
             _mean_std(r.se, 3), _mean_std(r.components), _duration(r.wall)] for r in rows]


def pretrain_header(probed: bool) -> list[str]:
    headline = "probe top-1" if probed else "k-NN top-1"
    return ["method", "seeds", f"final {headline} (%)", f"Δ {headline} vs baseline [95% CI]", "pairs", "p",
            *(["final k-NN top-1 (%)", "Δ k-NN top-1 [95% CI]", "p (k-NN)"] if probed else []),
            "best-epoch k-NN top-1 (%) †", "backbone SE", "components/head", "time / run ‡"]


def pretrain_table(rows: list[PretrainRow]) -> list[list[str]]:
    out = []
    for r in rows:
        head, head_difference = (r.probe, r.probe_difference) if r.probe is not None else (r.knn, r.knn_difference)
        knn = [] if r.probe is None else [_mean_std(r.knn), _difference(r.knn_difference), _p_value(r.knn_difference)]
        out.append([r.method, str(head.n), _mean_std(head), _difference(head_difference),
                    "" if head_difference is None else str(head_difference.n), _p_value(head_difference), *knn,
                    _mean_std(r.best_knn), _mean_std(r.se, 3), _mean_std(r.components), _duration(r.wall)])
    return out


# --- the document: blocks rendered to markdown and to HTML ---------------------------------------


@dataclass
class Block:
    kind: str  # heading | text | code | table | image | items | details
    text: str = ""
    level: int = 2
    header: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    path: Path | None = None  # an image's file
    link: str = ""  # an image's path relative to the report


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind == "heading":
            out.append(f"{'#' * b.level} {b.text}")
        elif b.kind == "text":
            out.append(b.text)
        elif b.kind == "code":
            out.append(f"```\n{b.text}\n```")
        elif b.kind in ("table", "details"):
            table = "\n".join(["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                               "|" + "|".join("---" for _ in b.header) + "|",
                               *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows)])
            out.append(f"<details><summary>{html.escape(b.text)}</summary>\n\n{table}\n\n</details>"
                       if b.kind == "details" else table)
        elif b.kind == "image":
            out.append(f"![{b.text}]({b.link})")
        elif b.kind == "items":
            out.append("\n".join(f"- {item}" for item in b.rows))
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with markdown's `code`, **bold** and relative [links](path) as HTML (a link to
    another site stays text: the page refers to nothing outside its folder)."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\[([^\]]+)\]\(([^):]+)\)", r'<a href="\2">\1</a>', text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _html_table(header: list, rows: list) -> str:
    head = "".join(f"<th>{_inline(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; }
th { background: #f6f8fa; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #d0d7de; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained page: CSS inline, every figure a data URI, no script, no external resource."""
    out = []
    for b in blocks:
        if b.kind == "heading":
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif b.kind == "text":
            out.append("".join(f"<p>{_inline(p)}</p>" for p in b.text.split("\n\n")))
        elif b.kind == "code":
            out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "table":
            out.append(_html_table(b.header, b.rows))
        elif b.kind == "details":
            out.append(f"<details><summary>{_inline(b.text)}</summary>{_html_table(b.header, b.rows)}</details>")
        elif b.kind == "image":
            out.append(f'<figure><img src="{_data_uri(b.path)}" alt="{html.escape(b.text, quote=True)}"></figure>')
        elif b.kind == "items":
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in b.rows) + "</ul>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(out) + "\n</body>\n</html>\n")


# --- the sections ---------------------------------------------------------------------------------


def _environment() -> list[str]:
    import timm
    import torch

    from .. import __version__

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s))"
    else:
        device = f"CPU only: {platform.machine()}, {os.cpu_count()} cores"
    return [f"date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"versions: sarvit {__version__}, torch {torch.__version__}, timm {timm.__version__}, "
            f"Python {platform.python_version()}",
            f"device: {device}"]


def _shown_path(path: str) -> str:
    """A path as a reader can use it: a shipped file by its place in the package, one under the working
    folder relative to it, else as given."""
    from importlib import resources

    package = Path(str(resources.files("sarvit"))).resolve()
    resolved = Path(path).resolve()
    if resolved.is_relative_to(package):
        return f"sarvit/{resolved.relative_to(package).as_posix()}"
    if resolved.is_relative_to(Path.cwd().resolve()):
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    return str(path)


def _header(study, records: list[RunRecord]) -> list[Block]:
    shared, _ = option_split([r.run.options for r in records])
    finished_configs = [r.config for r in records if r.config]
    config_shared, _ = option_split(finished_configs) if finished_configs else ({}, [])
    config_shared.pop("output", None)
    for key in ("data", "data_root"):  # as the study wrote them, not as the machine resolved them
        if key in config_shared and key in shared:
            config_shared[key] = shared[key]
        elif isinstance(config_shared.get(key), str) and os.path.isabs(config_shared[key]):
            config_shared[key] = _shown_path(config_shared[key])
    shared_text = ", ".join(f"`{k}={_text(v)}`" for k, v in shared.items()) or "none"
    blocks = [
        Block("heading", study.title, level=1),
        Block("text", study.description),
        Block("text", "Command that made this study:"),
        Block("code", study.command),
        Block("items", rows=[
            f"recipe: `{_shown_path(study.recipe)}`; options every run shared on top of it: {shared_text}",
            *_probe_line(study),
            *_transfer_lines(study),
            f"methods: {', '.join(study.methods)} (baseline: **{study.baseline}**)",
            f"grid cells: {', '.join(c or '(none)' for c in study.cells)}; seeds: {', '.join(map(str, study.seeds))}",
            f"runs: {len(records)}, finished {sum(r.finished for r in records)}",
            *_environment(),
        ]),
    ]
    if config_shared:
        blocks.append(Block("details", "every option of config.yaml the runs shared", header=["option", "value"],
                            rows=[[k, _text(v)] for k, v in config_shared.items()]))
    return blocks


def _probe_line(study) -> list[str]:
    if not _is_pretrain(study):
        return []
    text = "runs: `sarvit pretrain` (the option `method` is its `--method`)"
    probe = getattr(study, "probe", None)
    if probe is None:
        return [text + "; no linear probe"]
    options = ", ".join(f"`{k}={_text(v)}`" for k, v in probe.options.items()) or "none"
    return [text + f"; each run's backbone then probed by `sarvit linprobe` with the recipe "
                   f"`{_shown_path(probe.recipe)}`, the run's seed and the options {options}"]


def _options_text(options: dict) -> str:
    return ", ".join(f"`{k}={_text(v)}`" for k, v in options.items()) or "none"


def _transfer_lines(study) -> list[str]:
    """What each transfer stage ran: its command, recipe and options."""
    return [f"transfer ({stage.command}): each run's weights then fine-tuned by `sarvit {stage.command}` "
            f"(`--backbone RUN`, in `RUN/{stage.command}`) with the recipe `{_shown_path(stage.recipe)}`, the run's "
            f"seed and the options {_options_text(stage.options)}" for stage in getattr(study, "transfer", ())]


def _cell_title(cell: str) -> str:
    return f"cell {cell}" if cell else "all runs"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "all"


def _results(study, records: list[RunRecord], output: Path) -> list[Block]:
    if _is_pretrain(study):
        return _pretrain_results(study, records, output)
    from .figures import TRAIN_PANELS, plot_cell_curves, save_png

    blocks = [Block("heading", "Results"),
              Block("text", f"Final-epoch validation top-1 per method, mean ± sample standard deviation (ddof=1) "
                            f"over the finished seeds. {PAIRING[0].upper() + PAIRING[1:]}. "
                            f"With fewer than two pairs there is no interval or p-value (n/a).\n\n"
                            f"† {BEST_EPOCH_CAVEAT[0].upper() + BEST_EPOCH_CAVEAT[1:]}.\n\n"
                            "‡ The sum of the epochs' times (training and validation), without the start-up of "
                            "each process; runs that shared the machine took longer.")]
    for i, cell in enumerate(study.cells):
        rows = compare(records, cell, study.methods, study.baseline)
        pairs = ", ".join(f"{r.method}: n={r.difference.n}" for r in rows if r.difference is not None)
        blocks += [Block("heading", _cell_title(cell), level=3),
                   Block("table", header=COMPARISON_HEADER, rows=comparison_table(rows)),
                   Block("text", f"Pairs with the baseline ({study.baseline}) by seed: {pairs or 'none'}.")]
        in_cell = [r for r in records if r.run.cell == cell and r.finished]
        panels = {key: {m: band([r.curves[key] for r in in_cell if r.run.method == m]) for m in study.methods}
                  for key in TRAIN_PANELS}
        path = output / "figures" / f"curves-{i + 1:02d}-{_slug(cell)}.png"
        save_png(plot_cell_curves(panels, f"{study.title}: {_cell_title(cell)}"), path)
        blocks.append(Block("image", f"curves of {_cell_title(cell)}", path=path,
                            link=path.relative_to(output).as_posix()))
    return blocks


def _is_pretrain(study) -> bool:
    return getattr(study, "run_command", "train") == "pretrain"


def _pretrain_results(study, records: list[RunRecord], output: Path) -> list[Block]:
    from .figures import PRETRAIN_PANELS, plot_cell_curves, save_png

    probed = study.probe is not None
    headline = ("The linear probe's final validation top-1 (`sarvit linprobe` on the frozen backbone each "
                "pre-training exported, with the run's seed)" if probed else
                "The pre-training's final weighted 20-NN top-1 on the validation images")
    knn = (" Beside it the pre-training's own final 20-NN top-1 and its paired difference." if probed else "")
    blocks = [Block("heading", "Results"),
              Block("text", f"{headline} per method, mean ± sample standard deviation (ddof=1) over the finished "
                            f"seeds.{knn} {PAIRING[0].upper() + PAIRING[1:]}. With fewer than two pairs there is no "
                            "interval or p-value (n/a). Backbone SE and components/head: the pre-trained backbone "
                            "on the validation images at the last evaluation.\n\n"
                            "† The epoch with the best 20-NN top-1, picked on the validation set itself: optimistic, "
                            "for reference only.\n\n"
                            "‡ The sum of the epochs' times (pre-training" + (" and probe" if probed else "") +
                            "), without the start-up of each process; runs that shared the machine took longer.")]
    for i, cell in enumerate(study.cells):
        rows = compare_pretrain(records, cell, study.methods, study.baseline, probed)
        pairs = ", ".join(f"{r.method}: n={(r.probe_difference or r.knn_difference).n}" for r in rows
                          if r.knn_difference is not None)
        blocks += [Block("heading", _cell_title(cell), level=3),
                   Block("table", header=pretrain_header(probed), rows=pretrain_table(rows)),
                   Block("text", f"Pairs with the baseline ({study.baseline}) by seed: {pairs or 'none'}.")]
        in_cell = [r for r in records if r.run.cell == cell and r.finished]
        panels = {}
        for key in PRETRAIN_PANELS:
            bands = {m: band([r.curves[key] for r in in_cell if r.run.method == m]) for m in study.methods}
            bands = {m: b for m, b in bands.items() if len(b.epochs)}  # a method that does not log this term
            if bands:
                panels[key] = bands
        if not panels:
            continue
        path = output / "figures" / f"curves-{i + 1:02d}-{_slug(cell)}.png"
        save_png(plot_cell_curves(panels, f"{study.title}: {_cell_title(cell)}"), path)
        blocks.append(Block("image", f"curves of {_cell_title(cell)}", path=path,
                            link=path.relative_to(output).as_posix()))
    return blocks


TRANSFER_TEXT = (
    "Each run's weights (`--backbone RUN`: a training's best-epoch weights, best.safetensors, or a pre-training's "
    "exported backbone) fine-tuned as a whole by the stage's command with the run's seed (the recipe and options "
    "are in the list at the top). The values are those of each stage's last evaluated epoch (the final "
    "validation, not the best checkpoint's), in %, mean ± sample standard deviation (ddof=1) over the seeds whose "
    "stage finished. Detection: box mAP@0.5 is the AP at IoU 0.5 (the headline: Table 5's criterion, computed "
    "with COCO's 101-point interpolation by pycocotools; VOC 2007's own tool interpolates at 11 points), COCO "
    "box mAP the mean over IoU 0.5:0.95, mask mAP@0.5 that of the instance masks. Segmentation: mIoU over the "
    "classes (the headline, Table 6's metric) and pixel accuracy. The difference of the headline to the baseline "
    "is {pairing}; with fewer than two pairs there is no interval or p-value (n/a).\n\n"
    "‡ The sum of the stage's epoch times, without the start-up of each process; runs that shared the machine "
    "took longer.")


def _figure_name(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9]+", "_", p).strip("_") or "all" for p in parts if p) + ".png"


def _stage_figures(study, records: list[RunRecord], command: str, cell: str, output: Path) -> list[Block]:
    """The ``predictions.png`` of each method's run at the study's first seed, copied into ``figures/``."""
    from shutil import copyfile

    seed = study.seeds[0]
    blocks, absent = [], []
    for method in study.methods:
        found = [r for r in records if r.run.cell == cell and r.run.method == method and r.run.seed == seed
                 and command in r.stages and r.stages[command].figure is not None]
        if not found:
            absent.append(method)
            continue
        path = output / "figures" / _figure_name(command, cell, method, f"seed{seed}")
        atomic_write(path, lambda tmp, source=found[0].stages[command].figure: copyfile(source, tmp))
        blocks.append(Block("image", f"{command} predictions of {method}, seed {seed}", path=path,
                            link=path.relative_to(output).as_posix()))
    if not blocks:
        return [Block("text", f"No predictions shown: no method has a finished {command} stage at seed {seed}.")]
    text = (f"Predictions beside the ground truth on validation images spread over the split, one run per method "
            f"(seed {seed}, the stage's last weights), in the order " + ", ".join(m for m in study.methods if m not in absent)
            + "." + (f" Not drawn (no finished stage at that seed): {', '.join(absent)}." if absent else ""))
    return [Block("text", text), *blocks]


def _transfer(study, records: list[RunRecord], output: Path) -> list[Block]:
    """The Transfer section: one table per stage command and grid cell, and the stages' predictions."""
    stages = getattr(study, "transfer", ())
    if not stages:
        return []
    blocks = [Block("heading", "Transfer"), Block("text", TRANSFER_TEXT.format(pairing=PAIRING))]
    for stage in stages:
        command = stage.command
        # the values after the headline that some finished stage logged (detection without masks: no mask mAP)
        shown = [key for key in STAGE_METRICS[command][1:]
                 if any(key in r.stages[command].final for r in records if command in r.stages)]
        for cell in study.cells:
            rows = compare_stage(records, cell, study.methods, study.baseline, command)
            pairs = ", ".join(f"{r.method}: n={r.difference.n}" for r in rows if r.difference is not None)
            title = STAGE_TITLES[command] + (f": {_cell_title(cell)}" if cell else "")
            blocks += [Block("heading", title, level=3),
                       Block("table", header=stage_header(command, shown), rows=stage_table(rows, shown)),
                       Block("text", f"`sarvit {command}`, last evaluated epoch. Pairs with the baseline "
                                     f"({study.baseline}) by seed: {pairs or 'none'}."),
                       *_stage_figures(study, records, command, cell, output)]
    return blocks


def _weights(record: RunRecord, which: str):
    """What the analysis loads of a run: its folder, or a pre-training's exported backbone (``last``: the
    backbone of the last epoch; ``best``: that of the best k-NN top-1)."""
    if not record.pretrained:
        return record.run.folder
    if which == "best_ema":
        raise UserError("a pre-training run has no best_ema weights; choose which: last or best")
    folder = RunFolder(record.run.folder)
    return folder.backbone if which == "last" else folder.best


def _chosen_runs(study, records: list[RunRecord]) -> tuple[list[RunRecord], list[str]]:
    """The finished run of every method at the attention figure's cell and seed, and what is missing."""
    cell = study.attention.get("cell")
    cell = study.cells[0] if cell is None else cell
    seed = study.attention.get("seed")
    seed = study.seeds[0] if seed is None else seed
    chosen, absent = [], []
    for method in study.methods:
        found = [r for r in records if r.run.method == method and r.run.cell == cell and r.run.seed == seed
                 and r.finished]
        (chosen if found else absent).append(found[0] if found else method)
    return chosen, absent


def attention_figure_of_runs(chosen: list[RunRecord], path: Path, count: int, which: str = "last",
                             img_size: int | None = None, device: str = "auto") -> Path:
    """The attention figure of :mod:`sarvit.analysis.figures` for one run per method, on ``count`` validation
    images of the first run's data, every model at the first one's input size (default: its training size)."""
    from ..analysis import ModelMaps, attention_maps, load_analysis_model, plot_attention_figure
    from ..analysis.gallery import image_tensors, pick_images
    from ..analysis.protocol import resolve_device

    config = chosen[0].config
    images, captions = pick_images(config.get("data"), config.get("data_root"), count)
    dev = resolve_device(device)
    groups, shown = [], None
    for record in chosen:
        loaded = load_analysis_model(_weights(record, which), which=which, img_size=img_size, device=dev)
        img_size = loaded.img_size
        x, shown = image_tensors(images, img_size, loaded.mean, loaded.std)  # (B, 3, S, S), (B, S, S, 3)
        maps = attention_maps(loaded.model, x.to(dev))
        groups.append(ModelMaps(name=record.run.method, attn=maps.attn.cpu().numpy(),
                                mass=maps.mass_mask(0.6).cpu().numpy(), components=maps.components.cpu().numpy(),
                                entropy=maps.entropy.cpu().numpy()))
    plot_attention_figure(shown, groups, path, captions, title=f"Last block at {img_size}x{img_size}, per head: "
                          "[CLS] attention (post-softmax), its 60%-mass mask and components of ReLU(S - mean)")
    return path


def _attention(study, records: list[RunRecord], output: Path) -> list[Block]:
    if not study.attention:
        return []
    blocks = [Block("heading", "Attention maps")]
    chosen, absent = _chosen_runs(study, records)
    which = study.attention.get("which", "last")
    if not chosen:
        return blocks + [Block("text", "Not drawn: no method has a finished run at the chosen cell and seed.")]
    path = output / "figures" / "attention.png"
    try:
        attention_figure_of_runs(chosen, path, int(study.attention.get("images", 6)), which=which,
                                 img_size=study.attention.get("img_size"))
    except UserError as err:
        return blocks + [Block("text", f"Not drawn: {err}")]
    run = chosen[0].run
    text = (f"The same validation images through one run of every method ({_cell_title(run.cell)}, seed "
            f"{run.seed}, `{which}` weights): " + ", ".join(f"{r.run.method} = `{r.run.id}`" for r in chosen) + ".")
    if absent:
        text += f" Left out (no finished run there): {', '.join(absent)}."
    return blocks + [Block("text", text), Block("image", "attention maps", path=path,
                                                link=path.relative_to(output).as_posix())]


def _jaccard(study, records: list[RunRecord], output: Path) -> list[Block]:
    from ..analysis import run_jaccard

    data = (study.jaccard or {}).get("data")
    if not data:
        return []
    options = study.jaccard
    which, img_size = options.get("which", "last"), int(options.get("img_size", 480))
    blocks = [Block("heading", "Jaccard similarity with object masks"),
              Block("text", f"Masks: `{data}`. Per head the patches holding 60% of the [CLS] attention mass at "
                            f"{img_size}x{img_size}, best IoU over heads per object, mean over images (Table 11 "
                            f"protocol, void pixels counted in the union; `{which}` weights). Mean ± std over seeds; "
                            f"difference to the baseline {PAIRING.split(';')[0]}.")]
    scores: dict[str, float] = {}
    try:
        for r in records:
            if r.finished:
                out = output / "jaccard" / f"{r.run.id}.csv"
                out.parent.mkdir(parents=True, exist_ok=True)
                summary, _ = run_jaccard(_weights(r, which), data, data_root=options.get("data_root"),
                                         img_size=img_size, which=which, output=out, progress=False)
                scores[r.run.id] = summary.jaccard
    except UserError as err:
        return blocks + [Block("text", f"Not computed: {err}")]
    if not scores:
        return blocks + [Block("text", "Not computed: no run finished.")]
    for cell in study.cells:
        in_cell = [r for r in records if r.run.cell == cell and r.run.id in scores]
        of = lambda m: {r.run.seed: scores[r.run.id] for r in in_cell if r.run.method == m}  # noqa: E731
        rows = []
        for method in study.methods:
            d = None if method == study.baseline else paired_difference(of(method), of(study.baseline))
            rows.append([method, str(len(of(method))), _mean_std(spread(list(of(method).values())), 3),
                         _difference(d, 3), "" if d is None else str(d.n), _p_value(d)])
        blocks += [Block("heading", _cell_title(cell), level=3),
                   Block("table", header=["method", "seeds", "Jaccard", "Δ vs baseline [95% CI]", "pairs", "p"],
                         rows=rows)]
    return blocks


def _sorted_heads(values: list[float], order: list[int]) -> list[float]:
    return [values[i] for i in order]


def _heads(study, records: list[RunRecord]) -> list[Block]:
    """Every head's spatial entropy and components (the last weights on the run's validation images).

    Head indices mean nothing across seeds, so each run's heads are sorted by entropy, lowest
    first, and the k-th lowest heads are averaged over seeds.
    """
    if not study.heads:
        return []
    if _is_pretrain(study):
        return [Block("heading", "Spatial entropy per head"),
                Block("text", "Left out: the per-head table evaluates a classifier, and a pre-training run's "
                              "backbone has none; the backbone's SE and components are in the results table.")]
    from ..evaluation import evaluate_checkpoint

    blocks = [Block("heading", "Spatial entropy per head"),
              Block("text", "The last weights of every finished run on its validation images; per run the heads are "
                            "sorted by spatial entropy (rank 1: the lowest) and the heads of one rank averaged over seeds "
                            "(mean ± std). Components: connected components of the thresholded map, per image.")]
    measured: dict[str, tuple[list[float], list[float]]] = {}
    try:
        for r in records:
            if r.finished:
                config = r.config
                out = evaluate_checkpoint(r.run.folder, which="last", batch_size=int(config.get("batch_size", 64)),
                                          workers=0, val_per_class=config.get("val_per_class"), per_head=True,
                                          device=config.get("device", "auto"))
                order = sorted(range(len(out["se_heads"])), key=lambda h: out["se_heads"][h])
                measured[r.run.id] = (_sorted_heads(out["se_heads"], order),
                                      _sorted_heads(out["components_heads"], order))
    except UserError as err:
        return blocks + [Block("text", f"Not computed: {err}")]
    if not measured:
        return blocks + [Block("text", "Not computed: no run finished.")]
    count = max(len(v[0]) for v in measured.values())
    header = ["method", "seeds", *[f"SE, head rank {k + 1}" for k in range(count)],
              *[f"components, head rank {k + 1}" for k in range(count)]]
    for cell in study.cells:
        rows = []
        for method in study.methods:
            mine = [measured[r.run.id] for r in records
                    if r.run.cell == cell and r.run.method == method and r.run.id in measured]
            if not mine:
                continue
            se = [_mean_std(spread([m[0][k] for m in mine if k < len(m[0])]), 3) for k in range(count)]
            comp = [_mean_std(spread([m[1][k] for m in mine if k < len(m[1])]), 2) for k in range(count)]
            rows.append([method, str(len(mine)), *se, *comp])
        blocks += [Block("heading", _cell_title(cell), level=3), Block("table", header=header, rows=rows)]
    return blocks


def _stage_cell(r: RunRecord, command: str) -> str:
    """A stage's headline in the run list (%), or its status when it did not finish."""
    stage = r.stages.get(command, StageRecord("missing"))
    headline = STAGE_METRICS[command][0]
    return _fixed(100.0 * stage.final[headline]) if stage.finished and headline in stage.final else stage.status


def _missing_item(r: RunRecord) -> str | None:
    """The line of the missing list for ``r``: a run that did not finish, or a trained run whose probe or transfer
    stages did not (``None``: nothing is missing)."""
    trained = r.status != "missing" and RunFolder(r.run.folder).summary.is_file()
    left = [f"its {c} stage is {s.status}" for c, s in r.stages.items() if not s.finished] if trained else []
    if r.finished and not left:
        return None
    if r.probe_status and r.probe_status != "finished" and trained:
        left.insert(0, f"its probe is {r.probe_status}")
    what = "pre-trained" if r.pretrained else "trained"
    return (f"`{r.run.id}` ({r.run.method}, {_cell_title(r.run.cell)}, seed {r.run.seed}): "
            f"{r.status if not r.finished else 'finished'}" + (f" ({what}; {', '.join(left)})" if left else ""))


def _run_list(records: list[RunRecord], pretrain: bool = False, probed: bool = False) -> list[Block]:
    commands = _stage_commands(records)
    stage_heads = [f"{c} {METRIC_NAMES[STAGE_METRICS[c][0]]} (%)" for c in commands]
    if pretrain:
        header = ["id", "method", "cell", "seed", "status", *(["probe top-1"] if probed else []), "k-NN top-1",
                  *stage_heads, "epochs"]
        rows = [[r.run.id, r.run.method, r.run.cell, str(r.run.seed), r.status,
                 *([_fixed(r.probe.get("val_top1"))] if probed else []), _fixed(r.final.get("val_knn_top1")),
                 *(_stage_cell(r, c) for c in commands), str(r.epochs_done) if r.status != "missing" else ""]
                for r in records]
    else:
        header = ["id", "method", "cell", "seed", "status", "final val top-1", *stage_heads, "epochs"]
        rows = [[r.run.id, r.run.method, r.run.cell, str(r.run.seed), r.status, _fixed(r.final.get("val_top1")),
                 *(_stage_cell(r, c) for c in commands), str(r.epochs_done) if r.status != "missing" else ""]
                for r in records]
    missing = [item for item in map(_missing_item, records) if item is not None]
    done = "None: every run finished" + (" with every transfer stage." if commands else ".")
    stages = (" The status is the training's" + (" and probe's" if probed else "") + "; a stage column holds the "
              "stage's headline, or its own status while it has not finished." if commands else "")
    return [Block("heading", "Runs"),
            Block("text", "Every run of the study; all columns, the options that vary and the training terms are in "
                          "[runs.csv](runs.csv)." + stages),
            Block("table", header=header, rows=rows),
            Block("heading", "Missing runs"),
            Block("items", rows=missing) if missing else Block("text", done)]


# --- the entry point -------------------------------------------------------------------------------


def write_report(study: Study, output: Path) -> Path:
    """Write ``runs.csv``, ``figures/``, ``report.md`` and ``report.html`` of ``study`` into ``output``;
    returns the path of ``report.md``."""
    output = Path(output)
    (output / "figures").mkdir(parents=True, exist_ok=True)
    records = [read_run(run) for run in study.runs]
    atomic_write(output / "study.txt", lambda tmp: tmp.write_text(study.name + "\n"))  # whose report this is
    pretrain, probed = _is_pretrain(study), getattr(study, "probe", None) is not None
    header, rows = runs_table(records, pretrain)
    atomic_write(output / "runs.csv", lambda tmp: tmp.write_text(_csv_text(header, rows)))
    blocks = [*_header(study, records), *_results(study, records, output), *_transfer(study, records, output),
              *_attention(study, records, output),
              *_jaccard(study, records, output), *_heads(study, records), *_run_list(records, pretrain, probed)]
    atomic_write(output / "report.html", lambda tmp: tmp.write_text(to_html(blocks, study.title)))
    return atomic_write(output / "report.md", lambda tmp: tmp.write_text(to_markdown(blocks)))
