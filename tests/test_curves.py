"""curves.png from metrics.jsonl: what is drawn is what was logged, for runs of any age."""

import json

import pytest
from PIL import Image

from sarvit.analysis.curves import plot_curves, write_curves
from sarvit.cli import main
from sarvit.errors import UserError

SAR_ROWS = [
    {"epoch": 1, "train_loss": 2.1, "train_ce": 2.0, "train_se": 1.3, "lr": 1e-3, "lambda": 0.01},
    {"epoch": 2, "train_loss": 1.6, "train_ce": 1.5, "train_se": 0.9, "val_top1": 40.0, "val_top5": 90.0,
     "val_se": 0.8, "val_components": 2.5},
    {"epoch": 3, "train_loss": 1.2, "train_ce": 1.1, "train_se": 0.6},
    {"epoch": 4, "train_loss": 1.0, "train_ce": 0.9, "train_se": 0.4, "val_top1": 55.5, "val_top5": 97.0,
     "val_se": 0.5, "val_components": 1.5},
]


def lines(fig):
    """label -> (x, y) of every line of every panel."""
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ax in fig.axes for ln in ax.get_lines()}


def test_panels_hold_the_logged_values():
    drawn = lines(plot_curves(SAR_ROWS))
    assert drawn["total"] == ([1, 2, 3, 4], [2.1, 1.6, 1.2, 1.0])
    assert drawn["cross-entropy"][1] == [2.0, 1.5, 1.1, 0.9]
    assert drawn["spatial entropy (right)"][1] == [1.3, 0.9, 0.6, 0.4]
    assert drawn["top-1"] == ([2, 4], [40.0, 55.5])  # only the evaluated epochs
    assert drawn["top-5"][1] == [90.0, 97.0]
    by_title = {ax.get_title(): ax for ax in plot_curves(SAR_ROWS).axes}
    assert list(by_title["validation: mean spatial entropy (last block)"].get_lines()[0].get_ydata()) == [0.8, 0.5]
    assert list(by_title["validation: connected components per head"].get_lines()[0].get_ydata()) == [2.5, 1.5]


def test_old_baseline_run_and_torn_line(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "train_se"} for r in SAR_ROWS]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 5, "train_lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert main(["curves", str(tmp_path)]) == 0
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1100, 770)  # 10 x 7 inches at 110 dpi
    assert "spatial entropy (right)" not in lines(plot_curves(rows))
    assert not list(tmp_path.glob(".curves.png.tmp*"))


def test_missing_metrics_say_what_to_give(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        write_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no epoch"):
        write_curves(tmp_path)
    assert not (tmp_path / "curves.png").exists()
