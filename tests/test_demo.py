import json

import pytest

from sarvit.data.sources import DEBIAN_FASHION_MNIST
from sarvit.demo import run_demo


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_demo_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_demo(str(out), epochs=1, per_class=5)
    printed = capsys.readouterr().out
    assert "about 10 minutes" in printed and "| baseline |" in printed and "| sar |" in printed
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for run in ("baseline", "sar"):
        r = saved["runs"][run]
        assert 0 <= r["top1"] <= 100 and r["components_per_head"] >= 1
        assert (out / run / "best.safetensors").is_file()
    assert (out / "attention.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "10,000 test images" in report and "attention.png" in report
