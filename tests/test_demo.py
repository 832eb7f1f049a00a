import json

import numpy as np
import pytest
import torch
import yaml

from sarvit.data import build_transform, open_dataset
from sarvit.data.sources import DEBIAN_FASHION_MNIST
from sarvit.demo import run_demo
from sarvit.factory import load_model
from sarvit.runlog import read_metrics


def plain_top1(run, data: str) -> float:
    """Top-1 (%) of a run's final weights on the test split, by a plain loop over batches of images."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    model, _ = load_model(run, which="last")
    model.eval()
    raw = open_dataset(data, split="val")
    transform = build_transform(data, cfg["img_size"], False, interpolation=cfg["interpolation"],
                                crop_pct=cfg["crop_pct"])
    correct = 0
    for start in range(0, len(raw.dataset), 500):
        batch = [raw.dataset[i] for i in range(start, min(start + 500, len(raw.dataset)))]
        x = torch.stack([transform(image) for image, _ in batch])  # (B, 3, H, W)
        with torch.no_grad():
            predicted = model(x).argmax(1).numpy()
        correct += int((predicted == np.array([t for _, t in batch])).sum())
    return 100 * correct / len(raw.dataset)


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_demo_reports_what_its_runs_measured(tmp_path, capsys):
    out = tmp_path / "demo"
    run_demo(str(out), epochs=1, per_class=5)
    printed = capsys.readouterr().out
    saved = json.loads((out / "summary.json").read_text())
    assert saved["train_images"] == 50 and saved["epochs"] == 1
    report = (out / "report.md").read_text()
    for name in ("baseline", "sar"):
        r, rows = saved["runs"][name], read_metrics(out / name / "metrics.jsonl")
        assert [row["epoch"] for row in rows] == [1]
        # the report's numbers are the run's own records ...
        assert (r["top1"], r["top5"], r["spatial_entropy"], r["components_per_head"]) == (
            rows[-1]["val_top1"], rows[-1]["val_top5"], rows[-1]["val_se"], rows[-1]["val_components"])
        assert r["train_seconds"] == pytest.approx(sum(row["epoch_time"] for row in rows))
        # ... and top-1 is what the final weights score on the 10,000 test images
        assert rows[-1]["val_top1"] == pytest.approx(plain_top1(out / name, "fashion_mnist"), abs=1e-6)
        line = f"| {name} | {r['top1']:.2f} | {r['top5']:.2f} | {r['spatial_entropy']:.3f} |"
        assert line in printed and line in report
    delta = saved["runs"]["sar"]["top1"] - saved["runs"]["baseline"]["top1"]
    assert f"{abs(delta):.2f} top-1 points" in report
    assert (out / "attention.png").stat().st_size > 10_000


def test_the_demo_writes_only_into_a_folder_of_its_own(tmp_path, monkeypatch):
    from sarvit import demo

    trained = []
    monkeypatch.setattr(demo, "train", lambda cfg: trained.append(cfg) or {})  # nothing may be trained
    run = tmp_path / "run"  # a training run's folder
    run.mkdir()
    (run / "summary.json").write_text("{}")
    (run / "config.yaml").write_text("epochs: 1\n")
    with pytest.raises(demo.ConfigError, match=r"holds files the demo did not write \(config.yaml\)"):
        run_demo(str(run))
    with pytest.raises(demo.ConfigError, match="holds files the demo did not write"):
        run_demo(str(run), resume=True)
    with pytest.raises(demo.ConfigError, match="give its report folder with --output"):
        run_demo(None, resume=True)
    report = tmp_path / "report"
    (report / "baseline").mkdir(parents=True)
    with pytest.raises(demo.ConfigError, match="already holds a demo; add --resume"):
        run_demo(str(report))
    assert trained == [] and (run / "summary.json").read_text() == "{}"
