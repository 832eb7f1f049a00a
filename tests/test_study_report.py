"""The report of a study: statistics against hand computations, runs.csv, report.md/html, a headless browser."""

import base64
import csv
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sarvit.cli import main
from sarvit.study.report import read_run, write_report
from sarvit.study.spec import Run, Study
from sarvit.study.stats import band, paired_difference, spread

from .conftest import make_image_folder, tiny_train_args

T_975_1 = 12.706204736  # Student t quantile, 0.975 and 1 degree of freedom (printed t tables: 12.706)


# --- statistics -----------------------------------------------------------------------------------


def test_paired_difference_two_seeds_hand_computed():
    d = paired_difference({0: 11.0, 1: 13.0}, {0: 10.0, 1: 10.0})  # d = [1, 3]
    assert d.n == 2 and d.seeds == (0, 1)
    assert d.mean == pytest.approx(2.0)
    half = T_975_1 * math.sqrt(2) / math.sqrt(2)  # t * sd / sqrt(n), sd = sqrt(2)
    assert (d.low, d.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert (round(d.low, 2), round(d.high, 2)) == (-10.71, 14.71)
    # t = 2 on 1 degree of freedom, a Cauchy variable: p = 1 - 2 atan(2) / pi
    assert d.p_value == pytest.approx(1 - 2 * math.atan(2) / math.pi)


def test_paired_difference_uses_only_shared_seeds():
    d = paired_difference({0: 5.0, 1: 7.0, 2: 100.0}, {0: 4.0, 1: 4.0, 3: -50.0})
    assert d.seeds == (0, 1) and d.mean == pytest.approx(2.0)
    one = paired_difference({0: 5.0}, {0: 4.0, 1: 3.0})
    assert one.n == 1 and one.mean == pytest.approx(1.0)
    assert math.isnan(one.low) and math.isnan(one.high) and math.isnan(one.p_value)
    assert paired_difference({0: 1.0}, {1: 1.0}).n == 0


def test_paired_difference_three_seeds_by_hand():
    d = paired_difference({0: 3.0, 1: 1.0, 2: 8.0}, {0: 1.0, 1: 0.0, 2: 2.0})  # d = [2, 1, 6]
    sd = math.sqrt(((2 - 3) ** 2 + (1 - 3) ** 2 + (6 - 3) ** 2) / 2)  # sqrt(7)
    t_975_2 = 4.302652730  # t table, 2 degrees of freedom
    assert d.mean == pytest.approx(3.0)
    assert d.high == pytest.approx(3 + t_975_2 * sd / math.sqrt(3))
    assert d.low == pytest.approx(3 - t_975_2 * sd / math.sqrt(3))


def test_spread_is_the_sample_std():
    s = spread([1.0, 2.0, 4.0])
    assert s.n == 3 and s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    one = spread([5.0, float("nan")])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.std)


def test_band_over_seeds_with_different_epochs():
    b = band([([1, 2, 3], [10.0, 20.0, 30.0]), ([1, 2], [14.0, 16.0])])
    np.testing.assert_array_equal(b.epochs, [1, 2, 3])
    np.testing.assert_allclose(b.mean, [12.0, 18.0, 30.0])
    np.testing.assert_allclose(b.low, [10.0, 16.0, 30.0])
    np.testing.assert_allclose(b.high, [14.0, 20.0, 30.0])
    np.testing.assert_array_equal(b.count, [2, 2, 1])


# --- fake run folders -------------------------------------------------------------------------------

# final val top-1 per (method, seed); SAR - baseline over the shared seeds 0, 1: d = [1, 3]
TOP1 = {("baseline", 0): 50.0, ("baseline", 1): 60.0, ("baseline", 2): 70.0, ("SAR", 0): 51.0, ("SAR", 1): 63.0}
CELL = "100/class"


def fake_run(folder: Path, method: str, seed: int, finished: bool = True) -> None:
    """A run folder written by hand: config.yaml, two epochs of metrics.jsonl, summary.json."""
    folder.mkdir(parents=True)
    sar = method == "SAR"
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": "somewhere", "epochs": 2, "seed": seed, "sar": sar,
                                                        "output": str(folder), "lr": 0.001}))
    final = TOP1.get((method, seed), 40.0)
    rows = []
    for epoch, top1 in ((1, final + 5.0 if seed == 1 else final - 5.0), (2, final)):  # seed 1: best at epoch 1
        row = {"epoch": epoch, "step": 10 * epoch, "train_loss": 2.0 - 0.1 * epoch + seed,
               "train_ce": 1.9 - 0.1 * epoch, "epoch_time": 1.5 + epoch + seed, "val_top1": top1,
               "val_top5": top1 + 20, "val_se": 3.0 - 0.5 * epoch - (0.4 if sar else 0.0) + 0.1 * seed,
               "val_components": 4.0 + epoch + seed}
        if sar:
            row["train_se"] = 0.7 - 0.1 * epoch
        rows.append(row)
    if not finished:
        rows = rows[:1]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (folder / "summary.json").write_text(json.dumps({"run_dir": str(folder), "epochs": 2}))


def fake_study(root: Path, missing=(("SAR", 2),), failed=()) -> Study:
    runs = []
    for method in ("baseline", "SAR"):
        for seed in (0, 1, 2):
            options = {"per_class": 100, "epochs": 2, "seed": seed, **({"sar": False} if method == "baseline" else {})}
            run = Run(id=f"{method.lower()}-seed-{seed}", method=method, cell=CELL, seed=seed, options=options,
                      folder=root / "runs" / f"{method.lower()}-seed-{seed}")
            if (method, seed) not in missing:
                fake_run(run.folder, method, seed, finished=(method, seed) not in failed)
            runs.append(run)
    return Study(name="fake", title="Baseline against SAR (fake runs)", description="Does SAR help? A `test` study.",
                 recipe="stamps_cpu", methods=["baseline", "SAR"], baseline="baseline", cells=[CELL], seeds=[0, 1, 2],
                 runs=runs, command="sarvit study fake.yaml --output out")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    study = fake_study(root)
    path = write_report(study, root / "report")
    return study, path


def test_runs_csv_values_from_the_run_folders(report):
    study, path = report
    rows = {r["id"]: r for r in csv.DictReader(open(path.parent / "runs.csv"))}
    assert list(rows) == [r.id for r in study.runs]
    b1 = rows["baseline-seed-1"]
    assert (b1["method"], b1["cell"], b1["seed"], b1["status"]) == ("baseline", CELL, "1", "finished")
    assert float(b1["final_val_top1"]) == 60.0 and float(b1["final_val_top5"]) == 80.0
    assert float(b1["best_val_top1"]) == 65.0 and b1["best_epoch"] == "1"  # seed 1 peaked at epoch 1
    assert float(rows["baseline-seed-0"]["best_val_top1"]) == 50.0 and rows["baseline-seed-0"]["best_epoch"] == "2"
    assert float(b1["final_val_se"]) == pytest.approx(3.0 - 1.0 + 0.1)
    assert float(b1["final_val_components"]) == 4.0 + 2 + 1
    assert float(b1["wall_time_s"]) == pytest.approx((1.5 + 1 + 1) + (1.5 + 2 + 1))
    assert b1["epochs_done"] == "2"
    assert float(b1["train_loss"]) == pytest.approx(2.0 - 0.2 + 1) and b1["train_se"] == ""
    assert float(rows["sar-seed-0"]["train_se"]) == pytest.approx(0.5)
    # the option that varies (sar) gets a column, those shared (per_class, epochs) do not; seed has its own
    assert b1["sar"] == "False" and rows["sar-seed-0"]["sar"] == "True"  # not set by the run: its config.yaml
    assert "per_class" not in b1 and list(b1).count("seed") == 1
    missing = rows["sar-seed-2"]
    assert missing["status"] == "missing" and missing["final_val_top1"] == "" and missing["wall_time_s"] == ""


def test_unfinished_run_status(tmp_path):
    study = fake_study(tmp_path, missing=(), failed=(("SAR", 2),))
    record = read_run(study.runs[-1])
    assert record.status == "unfinished" and record.epochs_done == 1


def _section(text: str, heading: str) -> str:
    """The text from ``heading`` to the next heading of its level or above."""
    start = text.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    following = re.search(rf"^#{{1,{level}}} ", text[start + len(heading):], re.M)
    return text[start: start + len(heading) + (following.start() if following else len(text))]


def test_comparison_table_numbers(report):
    _, path = report
    text = path.read_text()
    table = _section(text, "### cell 100/class")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines() if line.startswith("| ")}
    base, sar = rows["baseline"], rows["SAR"]
    # baseline: 50, 60, 70 -> 60 +- 10; SAR: 51, 63 -> 57 +- sqrt(72)
    assert base[1:3] == ["3", "60.00 ± 10.00"] and base[3] == "(baseline)"
    assert sar[1:3] == ["2", f"57.00 ± {math.sqrt(72):.2f}"]
    assert sar[3] == "+2.00 [-10.71, +14.71]" and sar[4] == "2"
    assert sar[5] == f"{1 - 2 * math.atan(2) / math.pi:.3g}"
    # best epoch: baseline 50 (seed 0, last epoch), 65 (seed 1, epoch 1), 70 (seed 2, last epoch)
    assert base[6] == f"{np.mean([50, 65, 70]):.2f} ± {np.std([50, 65, 70], ddof=1):.2f}"
    se = [3.0 - 1.0 + 0.1 * s for s in (0, 1, 2)]
    assert base[7] == f"{np.mean(se):.3f} ± {np.std(se, ddof=1):.3f}"
    assert base[9] == f"{np.mean([(2.5 + s) + (3.5 + s) for s in (0, 1, 2)]):.1f} s"
    assert "paired by seed: the same seed gives the same training subset, initial weights and data order" \
        in text.lower()
    assert "optimistic" in text


def test_report_header_and_missing_runs(report):
    study, path = report
    text = path.read_text()
    assert text.startswith(f"# {study.title}\n")
    assert study.command in text and "stamps_cpu" in text and "Does SAR help?" in text
    assert re.search(r"sarvit \S+, torch \S+, timm \S+", text) and "device: " in text and "date: " in text
    missing = _section(text, "## Missing runs")
    assert "sar-seed-2" in missing and "baseline-seed-2" not in missing
    assert text.rstrip().endswith(missing.rstrip())  # the report ends with the missing runs
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):  # figures linked relatively, and there
        assert not link.startswith(("/", "http")) and (path.parent / link).is_file()
    with Image.open(path.parent / "figures" / "curves-01-100-class.png") as im:
        assert im.format == "PNG" and im.width > 600


def test_html_is_self_contained(report):
    _, path = report
    page = (path.parent / "report.html").read_text()
    assert 'src="http' not in page and 'href="http' not in page and "<script" not in page and "<link" not in page
    assert '<a href="runs.csv">' in page
    assert not re.search(r"url\(", page)
    images = re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)
    assert len(images) == len(list((path.parent / "figures").glob("*.png"))) >= 1
    figure = (path.parent / "figures" / "curves-01-100-class.png").read_bytes()
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[0].split(",", 1)[1]) == figure
    assert "+2.00 [-10.71, +14.71]" in page and "sar-seed-2" in page


def test_a_rewritten_report_leaves_no_temporary_file(report, tmp_path):
    study, path = report
    write_report(study, path.parent)
    assert not [p for p in path.parent.rglob("*") if ".tmp-" in p.name]


# --- headless browser -------------------------------------------------------------------------------


def _render(page: Path, out: Path) -> np.ndarray:
    """A screenshot of ``page`` by Debian's chromium, as a (H, W, 3) array."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed: scripts/install-system-deps.sh installs it (Debian package chromium)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={out.parent / 'chromium-profile'}", f"--screenshot={out}",
                    "--window-size=1200,2000", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(out) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def _ink(pixels: np.ndarray) -> int:
    return int((pixels.min(axis=2) < 200).sum())  # not white


def _dark(pixels: np.ndarray) -> int:
    return int((pixels.max(axis=2) < 90).sum())  # text


def _colour(pixels: np.ndarray) -> int:
    return int((pixels.max(axis=2) - pixels.min(axis=2) > 30).sum())  # coloured: lines and bands of the figures


def test_report_renders_in_a_headless_browser(report, tmp_path):
    _, path = report
    page = (path.parent / "report.html").read_text()
    full = _render(path.parent / "report.html", tmp_path / "full.png")
    assert full.shape[:2] == (2000, 1200)
    assert _ink(full) > 0.02 * full.shape[0] * full.shape[1]
    no_tables = tmp_path / "no-tables.html"
    no_tables.write_text(re.sub(r"<table>.*?</table>", "", page, flags=re.S))
    no_figures = tmp_path / "no-figures.html"
    no_figures.write_text(re.sub(r"<figure>.*?</figure>", "", page, flags=re.S))
    without_tables = _render(no_tables, tmp_path / "no-tables.png")
    without_figures = _render(no_figures, tmp_path / "no-figures.png")
    assert _dark(full) > _dark(without_tables) + 1500  # the tables' text is drawn
    assert _colour(full) > _colour(without_figures) + 5000  # the curves are drawn
    assert _ink(full) > _ink(without_figures)


# --- real runs: attention figure and Jaccard -----------------------------------------------------------


def _masked_folder(root: Path, count: int = 3, size: int = 16) -> Path:
    """images/ + masks/ : a coloured square (class 1) on noise."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[2 + i: 10 + i, 3: 11] = 1
        pixels[mask == 1] = (220, 40, 40)
        Image.fromarray(pixels).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"im{i}.png")
    return root


def test_real_runs_attention_figure_and_jaccard(tmp_path):
    data = make_image_folder(tmp_path / "data")
    masked = _masked_folder(tmp_path / "masked")
    runs = []
    for method, extra in (("baseline", ["--sar", "false"]), ("SAR", [])):
        folder = tmp_path / "runs" / method
        assert main(tiny_train_args(data, folder, "--epochs", "1", *extra)) == 0
        runs.append(Run(id=method, method=method, cell="", seed=0, options={"sar": method == "SAR"}, folder=folder))
    study = Study(name="real", title="Tiny", description="Two tiny runs.", recipe="cli", methods=["baseline", "SAR"],
                  baseline="baseline", cells=[""], seeds=[0], runs=runs, command="sarvit study tiny.yaml",
                  attention={"images": 2}, jaccard={"data": str(masked), "img_size": 16})
    path = write_report(study, tmp_path / "report")
    text = path.read_text()
    with Image.open(path.parent / "figures" / "attention.png") as im:
        assert im.format == "PNG" and im.width > im.height / 3
    assert "(figures/attention.png)" in text
    jaccard = _section(text, "## Jaccard")
    for method in ("baseline", "SAR"):
        scores = list(csv.DictReader(open(path.parent / "jaccard" / f"{method}.csv")))
        assert len(scores) == 3
        expected = np.mean([float(s["mean"]) for s in scores])  # the mean over images of the per-image CSV
        row = next(line for line in jaccard.splitlines() if line.startswith(f"| {method} |"))
        assert f"{expected:.3f} ± n/a" in row
    assert "+" in next(line for line in jaccard.splitlines() if line.startswith("| SAR |"))  # n = 1 pair: mean only
    page = (path.parent / "report.html").read_text()
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == 2  # curves + attention


# --- pretrain studies: k-NN from the pre-training, top-1 from its probe ---------------------------------

# (final k-NN top-1, probe top-1) per (method, seed)
SSL = {("dino", 0): (40.0, 60.0), ("dino", 1): (44.0, 62.0), ("dino", 2): (48.0, 70.0),
       ("dino_sar", 0): (41.0, 63.0), ("dino_sar", 1): (46.0, 63.0), ("dino_sar", 2): (47.0, None)}


def fake_pretrain_run(folder: Path, method: str, seed: int) -> None:
    """A pre-training run folder written by hand (two epochs, the first one best by k-NN) and its probe."""
    knn, probe = SSL[(method, seed)]
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"task": "dino", "seed": seed, "sar": method == "dino_sar",
                                                        "data": "somewhere", "epochs": 2}))
    rows = [{"epoch": e, "train_dino": 9.0 - e, "train_loss": 9.0 - e, "epoch_time": 10.0,
             "val_knn_top1": knn + (5.0 if e == 1 else 0.0), "val_se": 0.5 + 0.1 * seed, "val_components": 2.0}
            for e in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"final": {"knn_top1": knn}}))
    if probe is None:
        return
    (folder / "linprobe").mkdir()
    (folder / "linprobe" / "config.yaml").write_text(yaml.safe_dump({"task": "linprobe", "seed": seed}))
    row = {"epoch": 1, "train_loss": 1.0, "epoch_time": 4.0, "val_top1": probe, "val_top5": 100.0, "val_se": 0.5,
           "val_components": 2.0}
    (folder / "linprobe" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "linprobe" / "summary.json").write_text(json.dumps({"final": {"top1": probe}}))


def test_pretrain_report_numbers_by_hand(tmp_path):
    from sarvit.study.spec import Probe

    runs = []
    for method in ("dino", "dino_sar"):
        for seed in (0, 1, 2):
            folder = tmp_path / "runs" / f"{method}-{seed}"
            fake_pretrain_run(folder, method, seed)
            runs.append(Run(id=f"{method}-{seed}", method=method, cell="", seed=seed,
                            options={"method": "dino", "sar": method == "dino_sar", "seed": seed}, folder=folder,
                            probe=folder / "linprobe"))
    study = Study(name="ssl", title="DINO against DINO + SAR (fake runs)", description="", recipe="stamps_cpu",
                  methods=["dino", "dino_sar"], baseline="dino", cells=[""], seeds=[0, 1, 2], runs=runs,
                  command="sarvit study ssl.yaml", run_command="pretrain", probe=Probe("stamps_cpu", {"epochs": 1}))
    path = write_report(study, tmp_path / "report")
    text = path.read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in _section(text, "### all runs").splitlines() if line.startswith("| ")}
    base, sar = rows["dino"], rows["dino_sar"]
    # probe top-1: dino 60, 62, 70 -> 64 +- sqrt(28); dino_sar 63, 63 (seed 2 not probed) -> d = [3, 1]
    assert base[1:4] == ["3", f"64.00 ± {math.sqrt(28):.2f}", "(baseline)"]
    assert sar[1:3] == ["2", "63.00 ± 0.00"]
    half = T_975_1 * math.sqrt(2) / math.sqrt(2)  # d = [3, 1]: mean 2, sd sqrt(2)
    assert sar[3] == f"+2.00 [{2 - half:+.2f}, {2 + half:+.2f}]" and sar[4] == "2"
    assert sar[5] == f"{1 - 2 * math.atan(2) / math.pi:.3g}"  # t = 2 on 1 degree of freedom
    # k-NN top-1 of the finished (probed) runs: dino 40, 44, 48; dino_sar 41, 46 -> d = [1, 2]
    assert base[6] == "44.00 ± 4.00" and sar[6] == f"43.50 ± {math.sqrt(12.5):.2f}"
    assert sar[7] == f"+1.50 [{1.5 - T_975_1 * math.sqrt(0.5) / math.sqrt(2):+.2f}, " \
                     f"{1.5 + T_975_1 * math.sqrt(0.5) / math.sqrt(2):+.2f}]"
    assert base[9] == "49.00 ± 4.00"  # best epoch: the first, 5 points higher
    assert base[12] == "24.0 s"  # two pre-training epochs of 10 s and a probe epoch of 4 s
    table = {r["id"]: r for r in csv.DictReader(open(path.parent / "runs.csv"))}
    assert table["dino_sar-2"]["status"] == "unfinished" and table["dino_sar-2"]["probe_status"] == "missing"
    assert table["dino_sar-2"]["probe_val_top1"] == "" and float(table["dino_sar-2"]["final_val_knn_top1"]) == 47.0
    assert float(table["dino-1"]["probe_val_top1"]) == 62.0 and float(table["dino-1"]["best_val_knn_top1"]) == 49.0
    assert "`dino_sar-2` (dino_sar, all runs, seed 2): unfinished (pre-trained; its probe is missing)" in text
    with Image.open(path.parent / "figures" / "curves-01-all.png") as im:
        assert im.format == "PNG" and im.width > 3 * 400  # three panels: the DINO loss, k-NN top-1, SE


# --- transfer stages: detect and segment folders written by hand ----------------------------------------

# final box mAP@0.5 per (method, seed) (fractions, as the dense tasks log them); SAR seed 2 stopped after epoch 1
DETECT = {("baseline", 0): 0.40, ("baseline", 1): 0.50, ("baseline", 2): 0.45, ("SAR", 0): 0.44, ("SAR", 1): 0.53,
          ("SAR", 2): 0.60}
# final mIoU per (method, seed); baseline seed 1 never segmented
SEGMENT = {("baseline", 0): 0.30, ("baseline", 2): 0.36, ("SAR", 0): 0.35, ("SAR", 1): 0.20, ("SAR", 2): 0.38}


def fake_stage(folder: Path, command: str, value: float, seed: int, finished: bool = True) -> None:
    """Three epochs: evaluated at epochs 1 and 2 (epoch 1 better), epoch 3 trains only; the final values are
    epoch 2's."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"task": command, "seed": seed}))
    rows = []
    for epoch in (1, 2, 3):
        row = {"epoch": epoch, "step": 4 * epoch, "train_loss": 1.0 / epoch, "epoch_time": 10.0 + epoch + seed}
        if epoch < 3:
            v = value + (0.1 if epoch == 1 else 0.0)
            if command == "detect":
                row.update({"val_map_50": v, "val_map": v / 2, "val_map_75": v / 3, "val_mask_map_50": v - 0.05,
                            "val_mask_map": v / 4})
            else:
                row.update({"val_miou": v, "val_pixel_acc": 0.9 - v / 10})
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows if finished else rows[:1])))
    if finished:
        (folder / "summary.json").write_text(json.dumps({"final": {}}))
        Image.new("RGB", (40, 20), (seed * 50, 100, 200 if command == "detect" else 0)).save(folder / "predictions.png")


@pytest.fixture(scope="module")
def transfer_report(tmp_path_factory):
    import dataclasses

    from sarvit.study.spec import Stage

    root = tmp_path_factory.mktemp("transfer")
    study = fake_study(root, missing=())
    runs = []
    for run in study.runs:
        stages = {"detect": run.folder / "detect", "segment": run.folder / "segment"}
        key = (run.method, run.seed)
        fake_stage(stages["detect"], "detect", DETECT[key], run.seed, finished=key != ("SAR", 2))
        if key in SEGMENT:
            fake_stage(stages["segment"], "segment", SEGMENT[key], run.seed)
        runs.append(dataclasses.replace(run, stages=stages))
    stages = (Stage("detect", "stamps_detect_cpu.yaml", {"epochs": 4}), Stage("segment", "stamps_segment_cpu.yaml", {}))
    study = dataclasses.replace(study, runs=runs, transfer=stages)
    return study, write_report(study, root / "report")


def _rows(section: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")}


def _expected_difference(sar: list[float], base: list[float]) -> str:
    from scipy import stats

    test = stats.ttest_rel(sar, base)
    interval = test.confidence_interval(0.95)
    mean = np.mean(np.subtract(sar, base))
    return f"{mean:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]", f"{test.pvalue:.3g}"


def test_transfer_tables_by_hand(transfer_report):
    _, path = transfer_report
    text = path.read_text()
    section = _section(text, "## Transfer")
    assert "last evaluated epoch" in section
    detect = _rows(_section(section, "### Detection (Mask R-CNN, ViTDet simple feature pyramid): cell 100/class"))
    base, sar = [40.0, 50.0, 45.0], [44.0, 53.0]  # %, epoch 2 of each run; SAR seed 2 unfinished
    assert detect["baseline"][1:4] == ["3", f"{np.mean(base):.2f} ± {np.std(base, ddof=1):.2f}", "(baseline)"]
    assert detect["SAR"][1:3] == ["2", f"{np.mean(sar):.2f} ± {np.std(sar, ddof=1):.2f}"]
    difference, p = _expected_difference(sar, base[:2])  # d = [4, 3] over seeds 0, 1
    assert detect["SAR"][3:6] == [difference, "2", p]
    assert difference == f"+3.50 [{3.5 - T_975_1 * math.sqrt(0.5) / math.sqrt(2):+.2f}, " \
                         f"{3.5 + T_975_1 * math.sqrt(0.5) / math.sqrt(2):+.2f}]"
    assert detect["SAR"][6] == f"{np.mean([22.0, 26.5]):.2f} ± {np.std([22.0, 26.5], ddof=1):.2f}"  # COCO box mAP
    assert detect["SAR"][7] == f"{np.mean([39.0, 48.0]):.2f} ± {np.std([39.0, 48.0], ddof=1):.2f}"  # mask mAP@0.5
    assert detect["baseline"][8] == f"{np.mean([(11 + 12 + 13) + 3 * s for s in (0, 1, 2)]):.1f} s"
    segment = _rows(_section(section, "### Semantic segmentation (semantic FPN head): cell 100/class"))
    base, sar = [30.0, 36.0], [35.0, 20.0, 38.0]  # baseline seeds 0, 2; SAR seeds 0, 1, 2
    assert segment["baseline"][1:3] == ["2", f"{np.mean(base):.2f} ± {np.std(base, ddof=1):.2f}"]
    assert segment["SAR"][1:3] == ["3", f"{np.mean(sar):.2f} ± {np.std(sar, ddof=1):.2f}"]
    assert segment["SAR"][3:6] == [*_expected_difference([35.0, 38.0], base)[:1], "2",
                                   _expected_difference([35.0, 38.0], base)[1]]  # d = [5, 2] over seeds 0, 2
    pixel = [100 * (0.9 - v / 10) for v in (0.35, 0.20, 0.38)]
    assert segment["SAR"][6] == f"{np.mean(pixel):.2f} ± {np.std(pixel, ddof=1):.2f}"
    assert section.index("### Detection") < section.index("### Semantic")
    assert text.index("## Results") < text.index("## Transfer") < text.index("## Runs")


def test_transfer_columns_of_runs_csv_and_the_run_list(transfer_report):
    study, path = transfer_report
    rows = {r["id"]: r for r in csv.DictReader(open(path.parent / "runs.csv"))}
    b1, s2 = rows["baseline-seed-1"], rows["sar-seed-2"]
    assert (b1["detect_status"], float(b1["detect_val_map_50"]), float(b1["detect_val_map"])) == (
        "finished", 0.50, 0.25)
    assert float(b1["detect_val_mask_map_50"]) == pytest.approx(0.45)
    assert float(b1["detect_wall_time_s"]) == (11 + 12 + 13) + 3 * 1
    assert (b1["segment_status"], b1["segment_val_miou"], b1["segment_wall_time_s"]) == ("missing", "", "")
    assert float(rows["sar-seed-1"]["segment_val_pixel_acc"]) == pytest.approx(0.9 - 0.02)
    assert s2["status"] == "finished" and s2["detect_status"] == "unfinished"
    assert float(s2["detect_val_map_50"]) == pytest.approx(0.70)  # its only (first) evaluation
    text = path.read_text()
    missing = _section(text, "## Missing runs")
    assert "`sar-seed-2` (SAR, cell 100/class, seed 2): finished (trained; its detect stage is unfinished)" in missing
    assert "`baseline-seed-1` (baseline, cell 100/class, seed 1): finished (trained; its segment stage is missing)" \
        in missing
    assert "baseline-seed-0" not in missing
    run_list = _rows(_section(text, "## Runs"))
    # status, final val top-1 (the training's), then each stage's headline in %, or its status
    assert run_list["sar-seed-2"][4:8] == ["finished", "40.00", "unfinished", "38.00"]
    assert run_list["baseline-seed-1"][4:8] == ["finished", "60.00", "50.00", "missing"]
    header = next(line for line in _section(text, "## Runs").splitlines() if line.startswith("| id"))
    assert "detect box mAP@0.5 (%)" in header and "segment mIoU (%)" in header


def test_transfer_method_text_and_predictions(transfer_report):
    study, path = transfer_report
    text = path.read_text()
    assert "transfer (detect): each run's weights then fine-tuned by `sarvit detect`" in text
    assert "`stamps_detect_cpu.yaml`" in text and "the options `epochs=4`" in text
    assert "transfer (segment)" in text and "the options none" in text
    figures = path.parent / "figures"
    for command, method in (("detect", "baseline"), ("detect", "SAR"), ("segment", "baseline"), ("segment", "SAR")):
        copied = figures / f"{command}-100_class-{method}-seed0.png"
        source = next(r for r in study.runs if r.method == method and r.seed == 0).stages[command] / "predictions.png"
        assert copied.read_bytes() == source.read_bytes()
        assert f"(figures/{copied.name})" in text
    page = (path.parent / "report.html").read_text()
    inlined = {base64.b64decode(src.split(",", 1)[1]) for src in re.findall(r'<img [^>]*src="([^"]+)"', page)}
    assert (figures / "detect-100_class-SAR-seed0.png").read_bytes() in inlined


def test_a_method_keeps_its_colour_in_a_panel_the_baseline_did_not_log():
    import numpy as np

    from sarvit.study.figures import plot_cell_curves
    from sarvit.study.stats import Band

    def band(shift: float) -> Band:
        epochs = np.arange(1, 4)
        return Band(epochs, epochs + shift, epochs + shift - 1, epochs + shift + 1, np.full(3, 2))

    fig = plot_cell_curves({"val_top1": {"baseline": band(0), "SAR": band(1)}, "train_se": {"SAR": band(2)}}, "t")
    top1, se = fig.axes[:2]
    colour = {line.get_label().split(" ")[0]: line.get_color() for line in top1.get_lines()}
    assert colour["baseline"] != colour["SAR"]
    assert [line.get_color() for line in se.get_lines()] == [colour["SAR"]]
