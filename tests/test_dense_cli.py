"""`sarvit detect` and `sarvit segment`: seconds-long runs on tiny squares, exact resume, bad options refused."""

import json

import pytest
import yaml
from safetensors.torch import load_file

from sarvit import checkpoint as ckpt
from sarvit.cli import main
from tests.dense_fixtures import TINY_VIT, write_backbone_run, write_coco, write_masks

FAST = ["--dense-size", "32", "--dense-channels", "8", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1",
        "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {"vit": write_backbone_run(root / "vit"), "coco": write_coco(root / "coco", train=8, val=4),
            "masks": write_masks(root / "masks", train=8, val=4)}


def args(command, tiny, output, *extra):
    data = f"coco_json:{tiny['coco']}" if command == "detect" else f"masks:{tiny['masks']}"
    return [command, "--backbone", str(tiny["vit"]), "--data", data, "--output", str(output), *FAST, *extra]


@pytest.mark.parametrize("command,score", [("detect", "val_map_50"), ("segment", "val_miou")])
def test_a_run_writes_records_best_checkpoint_and_figure(tiny, tmp_path, command, score):
    out = tmp_path / "run"
    assert main(args(command, tiny, out, "--epochs", "1")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in rows if "epoch" in r and score in r]
    assert len(epoch) == 1 and 0.0 <= epoch[0][score] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == command and summary["best_epoch"] == 1
    meta = ckpt.read_metadata(out / "best.safetensors")
    assert meta["task"] == command and meta["layout"] == "C" and meta["num_classes"] == (3 if command == "detect" else 4)
    assert (out / "predictions.png").stat().st_size > 1000
    recorded = yaml.safe_load((out / "config.yaml").read_text())  # the backbone's architecture, not the default's
    assert (recorded["model"], recorded["model_kwargs"]) == ("vit_tiny_patch16_224", TINY_VIT)


def _interrupt_after(monkeypatch, step):
    real = ckpt.save_checkpoint

    def save(run_dir, at, *a, **k):
        folder = real(run_dir, at, *a, **k)
        if at == step:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(ckpt, "save_checkpoint", save)


@pytest.mark.parametrize("command", ["segment", "detect"])
def test_resume_mid_epoch_gives_bitwise_equal_weights(tiny, tmp_path, monkeypatch, command):
    """8 images, batch 4: 2 steps an epoch; stopped after step 3 (inside epoch 2) and resumed."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("--epochs", "2", "--checkpoint-interval", "1", "--eval-interval", "2")
    assert main(args(command, tiny, straight, *extra)) == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        assert main(args(command, tiny, resumed, *extra)) == 130
    assert main(args(command, tiny, resumed, *extra, "--resume", "auto")) == 0
    a = load_file(str(straight / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("bad,message", [
    (["--dense-size", "16"], "dense_size must be in [32, 4096]"),
    (["--dense-size", "36"], "dense_size must be a multiple of twice the backbone's patch size (8)"),
    (["--warmup-steps", "-3"], "warmup_steps must be >= 0"),
    (["--img-size", "64"], "--img-size is not an option of `sarvit detect` (it is one of `sarvit train`"),
    (["--lambda", "0.1"], "--lambda is not an option of `sarvit detect` (it is one of `sarvit train`, `sarvit pretrain`)"),
    (["--no-such-option", "1"], "unrecognized arguments: --no-such-option 1"),
    (["--data", "voc2012"], "no detection dataset 'voc2012'"),
    (["--data", "coco_json:"], "--data coco_json:: name the folder after the colon"),
    (["--model-kwargs", "{depth: 12}"], "--model-kwargs {'depth': 12}: the weights"),  # the backbone's own: depth 2
])
def test_bad_options_are_refused_before_anything_is_written(tiny, tmp_path, capsys, bad, message):
    out = tmp_path / "run"
    if "unrecognized" in message:  # an option of no command: argparse refuses it
        with pytest.raises(SystemExit):
            main(args("detect", tiny, out, "--epochs", "1", *bad))
    else:
        assert main(args("detect", tiny, out, "--epochs", "1", *bad)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_backbone_is_required(tiny, tmp_path, capsys):
    assert main(["segment", "--data", f"masks:{tiny['masks']}", "--output", str(tmp_path / "r")]) == 2
    assert "needs --backbone" in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command,score", [("detect", "val_map_50"), ("segment", "val_miou")])
def test_a_run_under_torchrun_with_two_processes(tiny, tmp_path, command, score):
    """DDP over gloo: 8 images, 2 per process, 2 steps an epoch; validation gathered over both ranks."""
    import os
    import subprocess
    import sys

    import torch

    out = tmp_path / "run"
    argv = args(command, tiny, out, "--epochs", "1", "--batch-size", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sarvit", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 steps/epoch of 2 x 2 process(es)" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0.0 <= rows[0][score] <= 1.0
    state = torch.load(out / "checkpoints" / "last" / "state.pt", weights_only=False)
    assert state["world"] == 2 and len(state["rng"]) == 2


def test_an_odd_batch_is_accepted(tiny, tmp_path, capsys):
    """No Mixup pairs samples in a dense task (sarvit train refuses an odd batch for it)."""
    assert main(args("segment", tiny, tmp_path / "run", "--epochs", "1", "--batch-size", "3")) == 0
    assert "done:" in capsys.readouterr().out


def test_a_damaged_backbone_file_is_refused_clearly(tiny, tmp_path, capsys):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_text("hello")
    out = tmp_path / "run"
    assert main(["detect", "--backbone", str(damaged), "--data", f"coco_json:{tiny['coco']}", "--output", str(out),
                 *FAST]) == 2
    assert "cannot read" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]])
def test_an_output_holding_another_commands_run_is_named(tiny, tmp_path, capsys, resume):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("task: detect\nepochs: 3\n")
    before = (out / "config.yaml").read_text()
    assert main(args("segment", tiny, out, "--epochs", "1", *resume)) == 2
    assert "holds a `sarvit detect` run, not a `sarvit segment` one; choose another --output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"] and (out / "config.yaml").read_text() == before


def test_a_dense_run_is_not_taken_for_a_backbone(tiny, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(args("segment", tiny, first, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(["detect", "--backbone", str(first), "--data", f"coco_json:{tiny['coco']}",
                 "--output", str(tmp_path / "second"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "holds a `sarvit segment` run's weights, not a backbone" in err and str(tiny["vit"]) in err
    assert not (tmp_path / "second").exists()
