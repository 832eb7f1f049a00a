"""Resume, run-folder safety and set-up failures, on seconds-long CPU runs."""

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from sarvit import checkpoint as ckpt
from sarvit import config
from sarvit.cli import build_parser, main
from sarvit.config import FIELDS, load_config
from sarvit.runlog import read_metrics
from sarvit.runs import RunLock
from sarvit.train import train
from tests.conftest import make_image_folder, tiny_train_args


def run_ok(args):
    assert main([str(a) for a in args]) == 0


def run_fails(args, capsys) -> str:
    """Run the CLI expecting a user error; its message."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def interrupt_after_checkpoint(monkeypatch, step: int) -> None:
    """Stop the run (as Ctrl-C would) right after the checkpoint of ``step`` is complete."""
    real = ckpt.save_checkpoint

    def save(run_dir, at, *args, **kwargs):
        folder = real(run_dir, at, *args, **kwargs)
        if at == step:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(ckpt, "save_checkpoint", save)


def files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "lock"}


def cosine_lr(t: int, total: int, warmup: int, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6) -> float:
    """timm's cosine schedule by hand (per update, no warm-up prefix)."""
    if t < warmup:
        return warmup_lr + t * (lr - warmup_lr) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total))


def test_a_resumed_epoch_logs_the_means_of_all_its_steps_and_stale_temporaries_go(image_folder, tmp_path,
                                                                                   monkeypatch, capsys):
    extra = ["--checkpoint-interval", "4"]  # 6 steps an epoch: a checkpoint inside epoch 1
    run_ok(tiny_train_args(image_folder, tmp_path / "full", *extra))
    cut = tmp_path / "cut"
    interrupt_after_checkpoint(monkeypatch, 4)
    assert main(tiny_train_args(image_folder, cut, *extra)) == 130
    monkeypatch.undo()
    stale = [cut / ".metrics.jsonl.tmp-999999", cut / "checkpoints" / ".step-00000005.tmp-999999",
             cut / "checkpoints" / ".last.tmp-999999"]
    stale[0].write_text('{"epoch": 1')
    stale[1].mkdir()
    os.symlink("step-00000005", stale[2])
    capsys.readouterr()
    run_ok(tiny_train_args(image_folder, cut, *extra, "--resume", "auto"))
    printed = capsys.readouterr().out
    full, resumed = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(full, resumed, strict=True):
        for key in ("train_loss", "train_ce", "train_se", "lr", "val_top1"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    assert "removed 3 temporary file(s)" in printed and not [p for p in cut.rglob("*") if ".tmp-" in p.name]


def test_resume_after_the_training_set_shrank_restarts_the_epoch(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "data")  # 48 images: 6 steps of 8
    out = tmp_path / "run"
    interrupt_after_checkpoint(monkeypatch, 5)
    assert main(tiny_train_args(data, out, "--checkpoint-interval", "5")) == 130
    monkeypatch.undo()
    for c in range(4):  # the README's advice: remove the unreadable images, then --resume auto
        for i in range(4):
            (data / "train" / f"class{c}" / f"{i}.png").unlink()
    capsys.readouterr()
    run_ok(tiny_train_args(data, out, "--checkpoint-interval", "5", "--resume", "auto"))
    printed = capsys.readouterr().out
    assert "(48 images, 6 steps/epoch then, 32 images, 4 steps/epoch now)" in printed
    assert "epoch 1 is no longer valid: that epoch restarts" in printed
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [4, 8]
    # the schedule of 2 epochs of 4 steps (1 epoch of warm-up), not of 2 epochs of 6
    assert rows[0]["lr"] == pytest.approx(cosine_lr(4, 8, 4)) and rows[1]["lr"] == pytest.approx(cosine_lr(8, 8, 4))
    assert all("train_loss" in r for r in rows)


def test_resume_falls_back_to_the_previous_checkpoint_and_never_starts_over(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(tiny_train_args(image_folder, out))  # checkpoints of steps 6 and 12
    final = {k: v.clone() for k, v in load_file(str(out / "checkpoints" / "step-00000012" / "model.safetensors")).items()}
    args = tiny_train_args(image_folder, out, "--resume", "auto")
    weights = out / "checkpoints" / "step-00000012" / "model.safetensors"
    for damage in ("truncate weights", "truncate state", "dangling last"):
        if damage == "truncate weights":
            weights.write_bytes(weights.read_bytes()[:100])
        elif damage == "truncate state":
            state = out / "checkpoints" / "step-00000012" / "state.pt"
            state.write_bytes(state.read_bytes()[:-10])
        else:
            shutil.rmtree(out / "checkpoints" / "step-00000012")
        capsys.readouterr()
        run_ok(args)
        captured = capsys.readouterr()
        assert "resuming from" in captured.out and "step-00000006" in captured.out, damage
        assert "warning: checkpoints/last: step-00000012" in captured.err and "Traceback" not in captured.err
        again = load_file(str(out / "checkpoints" / "step-00000012" / "model.safetensors"))
        assert all((again[k] == final[k]).all() for k in final), damage  # epoch 2 trained again, same weights
        assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    shutil.rmtree(out / "checkpoints" / "step-00000012")
    before = files(out)
    err = run_fails(args, capsys)
    assert "no intact checkpoint" in err and "Nothing was changed" in err
    assert files(out) == before


@pytest.mark.parametrize("case", ["data", "batch", "model", "image", "library check"])
def test_a_failed_set_up_writes_nothing(tmp_path, monkeypatch, capsys, case):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = tiny_train_args(data, out)
    if case == "data":
        args = tiny_train_args(tmp_path / "no-such-data", out)
    elif case == "batch":
        args += ["--batch-size", "64"]
    elif case == "model":
        args += ["--model-kwargs", "{no_such_argument: 1}"]
    elif case == "image":
        for path in (data / "train" / "class0").iterdir():
            path.write_bytes(b"not an image")
    else:
        def refuse(cfg):
            raise config.ConfigError("refused by the library check")
        monkeypatch.setattr(config, "validate_with_libraries", refuse, raising=False)
    run_fails(args, capsys)
    assert not out.exists()
    if case == "batch":  # the corrected command then runs, without --resume
        run_ok(tiny_train_args(data, out, "--epochs", "1"))


def test_paths_are_absolute_and_a_moved_run_resumes_where_it_lies(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    data = make_image_folder(work / "ds")
    monkeypatch.chdir(work)
    run_ok(tiny_train_args(Path("ds"), Path("run"), "--epochs", "1"))
    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert saved["data"] == str(data) and saved["output"] == str(work / "run")
    for spelling in ("ds/", "./ds", str(data)):  # one folder, one experiment
        run_ok(tiny_train_args(spelling, "run", "--epochs", "1", "--resume", "auto"))
    monkeypatch.chdir(tmp_path)  # `sarvit eval` from elsewhere finds the data the run recorded
    capsys.readouterr()
    run_ok(["eval", "--checkpoint", work / "run", "--device", "cpu", "--workers", "0"])
    assert '"images": 20' in capsys.readouterr().out
    moved = tmp_path / "moved"
    shutil.move(work / "run", moved)
    err = run_fails(["train", "--config", moved / "config.yaml", "--resume", moved, "--output", tmp_path / "new"],
                    capsys)
    assert f"continues the run in {moved}" in err and not (tmp_path / "new").exists()
    run_ok(["train", "--config", moved / "config.yaml", "--resume", moved])
    assert yaml.safe_load((moved / "config.yaml").read_text())["output"] == str(moved)
    assert not (work / "run").exists()
    # the run's own config.yaml alone (as the refusal messages advise) also follows the moved run
    rows = len(read_metrics(moved / "metrics.jsonl"))
    run_ok(["train", "--config", moved / "config.yaml", "--resume", "auto", "--epochs", "2", "--extend", "true"])
    assert not (work / "run").exists()
    assert [r["epoch"] for r in read_metrics(moved / "metrics.jsonl")] == list(range(1, rows + 2))


def test_a_run_in_use_is_refused_and_a_dead_owner_is_taken_over(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(tiny_train_args(image_folder, out, "--epochs", "1"))
    before = files(out)
    held = RunLock(out / "lock")
    err = run_fails(tiny_train_args(image_folder, out, "--epochs", "1", "--resume", "auto"), capsys)
    assert f"in use by process {os.getpid()} on {socket.gethostname()}" in err
    assert files(out) == before
    held.release()
    child = subprocess.run([sys.executable, "-c", "import os, sys; from sarvit.runs import RunLock; "
                            "RunLock(sys.argv[1]); print(os.getpid()); os._exit(0)", str(out / "lock")],
                           capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    capsys.readouterr()
    run_ok(tiny_train_args(image_folder, out, "--epochs", "1", "--resume", "auto"))
    printed = capsys.readouterr().out
    assert f"from process {child.stdout.strip()} on {socket.gethostname()}" in printed
    assert "which is no longer running" in printed


def extended_config(argv: list) -> config.TrainConfig:
    """The configuration `sarvit train ARGV --extend true` makes."""
    args = build_parser().parse_args([str(a) for a in argv])
    overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
    if "extend" in FIELDS:
        return load_config(None, {**overrides, "extend": True})
    cfg = load_config(None, overrides)
    cfg.extend = True
    return cfg


def test_extend_lengthens_a_finished_run_only_when_asked(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(tiny_train_args(image_folder, out))  # 2 epochs of 6 steps
    longer = tiny_train_args(image_folder, out, "--epochs", "4", "--resume", "auto")
    assert "add --extend true" in run_fails(longer, capsys)
    with pytest.raises(config.ConfigError, match="different experiment"):
        train(extended_config(longer + ["--lambda", "0.1"]))
    capsys.readouterr()
    train(extended_config(longer))
    assert "extending the run from 2 to 4 epochs" in capsys.readouterr().out
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r.get("extended_from") for r in rows] == [None, None, 2, 2]
    # epoch 3 ends at step 18 of a 4-epoch schedule (6 warm-up steps), not of the 2-epoch one
    assert rows[2]["lr"] == pytest.approx(cosine_lr(18, 24, 6))
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 4


def test_a_run_stopped_while_writing_its_first_checkpoint_resumes(image_folder, tmp_path, monkeypatch, capsys):
    """Killed (or out of disk) between epoch 1's records and its checkpoint: the folder holds
    metrics.jsonl and best.safetensors but no checkpoint; --resume auto starts that epoch again."""
    run_ok(tiny_train_args(image_folder, tmp_path / "full"))
    out = tmp_path / "run"
    real = ckpt.save_checkpoint

    def disk_full(run_dir, step, *args, **kwargs):
        if step == 6:  # the first checkpoint, at the end of epoch 1
            raise OSError(28, "No space left on device")
        return real(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", disk_full)
    err = run_fails(tiny_train_args(image_folder, out), capsys)
    monkeypatch.undo()
    assert "no space left on device" in err
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1] and (out / "best.safetensors").exists()
    capsys.readouterr()
    run_ok(tiny_train_args(image_folder, out, "--resume", "auto"))
    assert "the run starts again from its first epoch" in capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    ours = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    reference = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors"))
    assert all((ours[k] == reference[k]).all() for k in reference)


def test_a_moved_run_resumes_from_its_own_config_and_from_resume_alone(image_folder, tmp_path, capsys):
    first = tmp_path / "first"
    run_ok(tiny_train_args(image_folder, first, "--epochs", "1"))
    run_ok(["train", "--config", first / "config.yaml", "--resume", first])  # config.yaml records this session
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    err = run_fails(["train", "--config", moved / "config.yaml"], capsys)  # not the path of the earlier session
    assert f"run folder {moved} already exists" in err and "--resume auto" in err and str(first) not in err
    run_ok(["train", "--config", moved / "config.yaml", "--resume", "auto", "--epochs", "2", "--extend", "true"])
    assert [r["epoch"] for r in read_metrics(moved / "metrics.jsonl")] == [1, 2]
    again = tmp_path / "again"
    shutil.move(moved, again)
    capsys.readouterr()
    run_ok(["train", "--resume", again, "--epochs", "3", "--extend", "true"])  # the run's options, from its folder
    assert "resuming from" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(again / "metrics.jsonl")] == [1, 2, 3]
    # config.yaml records that a session extended the run; a later session extends only when it asks
    assert yaml.safe_load((again / "config.yaml").read_text())["extend"] is True
    assert "add --extend true" in run_fails(["train", "--resume", again, "--epochs", "4"], capsys)
    assert "add --extend true" in run_fails(["train", "--config", again / "config.yaml", "--resume", "auto",
                                             "--epochs", "4"], capsys)
    assert not first.exists() and not moved.exists()


def test_resuming_from_checkpoints_last_keeps_the_checkpoint_it_points_to(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_ok(tiny_train_args(image_folder, out))  # checkpoints of steps 6 and 12
    interrupt_after_checkpoint(monkeypatch, 14)
    argv = tiny_train_args(image_folder, out, "--resume", out / "checkpoints" / "last", "--epochs", "3", "--extend",
                           "true", "--checkpoint-interval", "2")
    assert main([str(a) for a in argv]) == 130
    assert sorted(os.listdir(out / "checkpoints")) == ["last", "step-00000012", "step-00000014"]


def test_a_run_reached_through_a_symlink_is_one_run(image_folder, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    run = tmp_path / "link" / "run"
    run_ok(tiny_train_args(image_folder, run, "--epochs", "1"))  # recorded through the link
    run_ok(["train", "--config", run / "config.yaml", "--resume", run / "checkpoints" / "last", "--epochs", "2",
            "--extend", "true"])
    assert [r["epoch"] for r in read_metrics(real / "run" / "metrics.jsonl")] == [1, 2]


def test_drloc_resumed_mid_epoch_gives_bitwise_the_same_weights_mlp_and_optimizer(image_folder, tmp_path,
                                                                                   monkeypatch):
    import torch

    # drop-path (torch RNG) and the DRLoc pairs (torch RNG) both continue where the checkpoint left them
    extra = ["--objective", "drloc", "--drloc-warmup-epochs", "1", "--drloc-pairs", "8", "--drop-path", "0.1",
             "--checkpoint-interval", "4"]
    full = tmp_path / "full"
    run_ok(tiny_train_args(image_folder, full, *extra))
    cut = tmp_path / "cut"
    interrupt_after_checkpoint(monkeypatch, 4)  # inside epoch 1 (6 steps an epoch)
    assert main([str(a) for a in tiny_train_args(image_folder, cut, *extra)]) == 130
    monkeypatch.undo()
    run_ok(tiny_train_args(image_folder, cut, *extra, "--resume", "auto"))
    a = load_file(str(full / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(full / "checkpoints" / "last" / "state.pt", weights_only=False)
    sb = torch.load(cut / "checkpoints" / "last" / "state.pt", weights_only=False)
    assert sa["objective"].keys() == sb["objective"].keys() and len(sa["objective"]) == 6
    assert all(torch.equal(sa["objective"][k], sb["objective"][k]) for k in sa["objective"])
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(ga[k], gb[k]) for k in ga)
    ra, rb = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["train_drloc"] for r in ra] == [r["train_drloc"] for r in rb]


def test_a_run_from_before_an_option_existed_resumes_with_its_default(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(tiny_train_args(image_folder, out, "--epochs", "1"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    for key in ("objective", "drloc_lambda", "drloc_warmup_epochs", "drloc_pairs"):  # newer than that run
        del saved[key]
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    run_ok(tiny_train_args(image_folder, out, "--epochs", "2", "--extend", "true", "--resume", "auto"))
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    # a value other than the default is a different experiment
    err = run_fails(tiny_train_args(image_folder, out, "--epochs", "2", "--objective", "tv", "--resume", "auto"),
                    capsys)
    assert "objective: run has 'sar', now 'tv'" in err


def test_a_checkpoint_that_names_the_best_score_best_top1_still_resumes(image_folder, tmp_path):
    """Checkpoints written before LoopState.best_top1 became best_score keep their best epoch."""
    import json

    import torch

    out = tmp_path / "run"
    run_ok(tiny_train_args(image_folder, out))
    folder = ckpt.latest_checkpoint(out)
    state = torch.load(folder / ckpt.STATE, weights_only=False)
    state["loop"]["best_top1"] = state["loop"].pop("best_score")
    torch.save(state, folder / ckpt.STATE)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.STATE] = {"size": (folder / ckpt.STATE).stat().st_size,
                                     "sha256": ckpt.file_sha256(folder / ckpt.STATE)}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    run_ok(tiny_train_args(image_folder, out, "--resume", "auto", "--epochs", "3", "--extend", "true"))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "val_top1" in r]
    best = max(rows, key=lambda r: r["val_top1"])  # the first of equal scores, as training keeps it
    summary = json.loads((out / "summary.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert (summary["best_top1"], summary["best_epoch"]) == (best["val_top1"], best["epoch"])
