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
