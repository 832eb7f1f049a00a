"""`sarvit pretrain` (DINO, MoCo v3, with and without SAR), `sarvit linprobe` and `sarvit finetune`
on seconds-long CPU runs, through the command line."""

import math

import pytest
import torch
from safetensors.torch import load_file

from sarvit import checkpoint as ckpt
from sarvit.cli import main
from sarvit.runlog import read_metrics
from tests.conftest import TINY_MODEL

TINY = TINY_MODEL[:2] + TINY_MODEL[4:]  # the tiny ViT without its --img-size


DINO_TINY = ["--local-crop-size", "8", "--local-crops-number", "2", "--out-dim", "64", "--warmup-teacher-temp-epochs", "1"]


def pretrain_args(data, output, *extra, dino_options=True):
    """A tiny DINO run (16 px global and 8 px local crops on a 4x4 grid ViT, 6 steps an epoch);
    ``dino_options=False`` leaves out the DINO-only options (for --method mocov3)."""
    return [
        "pretrain", "--config", "fashion_mnist_dino_cpu", "--data", str(data), "--output", str(output), *TINY,
        "--img-size", "16", *(DINO_TINY if dino_options else []), "--per-class", "12", "--val-per-class", "5",
        "--epochs", "2", "--batch-size", "8", "--warmup-epochs", "1", "--eval-interval", "1", "--device", "cpu",
        *extra,
    ]


def probe_args(data, backbone, output, *extra):
    return [
        "linprobe", "--config", "fashion_mnist_linprobe_cpu", "--checkpoint", str(backbone), "--data", str(data),
        "--img-size", "16", "--per-class", "12", "--val-per-class", "5", "--n-last-blocks", "2", "--epochs", "2",
        "--batch-size", "8", "--eval-interval", "1", "--output", str(output), "--device", "cpu", *extra,
    ]


def run_ok(args):
    assert main([str(a) for a in args]) == 0


def run_fails(args, capsys) -> str:
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def dino_sar(tmp_path_factory):
    from tests.conftest import make_image_folder

    root = tmp_path_factory.mktemp("pretrain")
    data = make_image_folder(root / "data")
    out = root / "dino-sar"
    run_ok(pretrain_args(data, out, "--sar", "true"))
    return data, out


@pytest.mark.parametrize("method,sar", [("dino", "false"), ("mocov3", "true")])
def test_pretrain_logs_the_method_terms_and_writes_a_timm_backbone(image_folder, tmp_path, method, sar):
    import timm

    out = tmp_path / "run"
    run_ok(pretrain_args(image_folder, out, "--method", method, "--sar", sar, dino_options=method == "dino"))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    term = "train_dino" if method == "dino" else "train_moco"
    for r in rows:
        assert math.isfinite(r[term]) and 0.0 <= r["val_knn_top1"] <= 100.0
        assert ("train_se" in r) == (sar == "true")
        if sar == "true":  # loss = term + lambda * se
            assert r["train_loss"] == pytest.approx(r[term] + 0.01 * r["train_se"], rel=1e-5)
    backbone = load_file(str(out / "backbone.safetensors"))
    meta = ckpt.read_metadata(out / "backbone.safetensors")
    assert meta["task"] == method and meta["layout"] == ("C" if sar == "true" else "A")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, embed_dim=24, depth=2,
                              num_heads=2, mlp_ratio=2.0)
    assert set(backbone) == set(model.state_dict())  # timm's own key names, no head
    # the exported backbone is the evaluated one: DINO's teacher, MoCo v3's base encoder
    state = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    prefix = "teacher.backbone." if method == "dino" else "encoder.backbone."
    assert all(torch.equal(backbone[k], state[prefix + k]) for k in backbone)


def test_dino_teacher_follows_the_momentum_schedule(image_folder, tmp_path, monkeypatch):
    """Between the checkpoints of steps 4 and 5 the teacher moves by w_t <- m w_t + (1 - m) w_s."""
    from tests.test_resume import interrupt_after_checkpoint

    out = tmp_path / "run"
    interrupt_after_checkpoint(monkeypatch, 5)
    args = pretrain_args(image_folder, out, "--epochs", "1", "--checkpoint-interval", "1", "--momentum-teacher", "0.9")
    assert main([str(a) for a in args]) == 130
    before, after = (load_file(str(out / "checkpoints" / f"step-{n:08d}" / "model.safetensors")) for n in (4, 5))
    # the 5th of 6 steps (index 4): cosine from 0.9 at index 0 to 1 at the last index (5)
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 4 / 5) + 1) / 2
    for key in ("blocks.0.mlp.fc1.weight", "blocks.1.attn.qkv.weight", "cls_token"):
        want = m * before["teacher.backbone." + key] + (1 - m) * after["student.backbone." + key]
        torch.testing.assert_close(after["teacher.backbone." + key], want)
        assert not torch.equal(after["teacher.backbone." + key], before["teacher.backbone." + key])


def test_dino_weight_decay_follows_its_cosine_schedule(image_folder, tmp_path):
    out = tmp_path / "run"
    run_ok(pretrain_args(image_folder, out, "--epochs", "1", "--weight-decay", "0.04", "--weight-decay-end", "0.4"))
    state = torch.load(out / "checkpoints" / "last" / "state.pt", weights_only=False)
    decays = [g["weight_decay"] for g in state["optimizer"]["param_groups"]]
    # the last of 6 steps ran at progress 5/6 of the single epoch
    t = 5 / 6
    want = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * t))
    assert decays == [pytest.approx(want), 0.0]  # biases and norms never decay


@pytest.mark.parametrize("method", ["dino", "mocov3"])
def test_pretrain_resumed_mid_epoch_gives_bitwise_the_same_run(image_folder, tmp_path, monkeypatch, method):
    from tests.test_resume import interrupt_after_checkpoint

    extra = ["--method", method, "--sar", "true", "--checkpoint-interval", "4", "--drop-path", "0.1"]
    dino = method == "dino"
    full = tmp_path / "full"
    run_ok(pretrain_args(image_folder, full, *extra, dino_options=dino))
    cut = tmp_path / "cut"
    interrupt_after_checkpoint(monkeypatch, 4)  # inside epoch 1
    assert main([str(a) for a in pretrain_args(image_folder, cut, *extra, dino_options=dino)]) == 130
    monkeypatch.undo()
    run_ok(pretrain_args(image_folder, cut, *extra, "--resume", "auto", dino_options=dino))
    a = load_file(str(full / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # student, teacher, centre
    ra, rb = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    term = "train_dino" if method == "dino" else "train_moco"
    assert [r[term] for r in ra] == [r[term] for r in rb]
    assert [r["val_knn_top1"] for r in ra] == [r["val_knn_top1"] for r in rb]


def test_linprobe_trains_only_a_linear_layer_on_the_frozen_backbone(dino_sar, tmp_path, capsys):
    data, run = dino_sar
    before = (run / "backbone.safetensors").read_bytes()
    out = tmp_path / "probe"
    capsys.readouterr()
    run_ok(probe_args(data, run, out))
    printed = capsys.readouterr().out
    assert "loaded 30 tensors" in printed and "class tokens of the last 2 block(s)" in printed
    weights = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    assert set(weights) == {"linear.weight", "linear.bias"} and weights["linear.weight"].shape == (4, 2 * 24)
    assert (run / "backbone.safetensors").read_bytes() == before
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["val_top1"] >= 0 and "val_top5" in rows[-1]
    meta = ckpt.read_metadata(out / "checkpoints" / "last" / "model.safetensors")
    assert meta["layout"] == "C" and meta["task"] == "linprobe"


def test_linprobe_refuses_to_resume_on_a_changed_backbone(dino_sar, tmp_path, capsys):
    import shutil

    data, run = dino_sar
    copy = tmp_path / "backbone.safetensors"
    shutil.copy(run / "backbone.safetensors", copy)
    out = tmp_path / "probe"
    run_ok(probe_args(data, copy, out, "--epochs", "1"))
    weights = load_file(str(copy))
    weights["norm.weight"] = weights["norm.weight"] + 1
    ckpt_meta = ckpt.read_metadata(copy)
    from safetensors.torch import save_file
    import json

    save_file(weights, str(copy), metadata={ckpt.METADATA_KEY: json.dumps(ckpt_meta)})
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "lock"}
    err = run_fails(probe_args(data, copy, out, "--epochs", "2", "--extend", "true", "--resume", "auto"), capsys)
    assert "changed since this probe started" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "lock"} == before  # nothing changed


def test_finetune_keeps_the_pretrained_last_block_and_reports_the_keys(dino_sar, tmp_path, capsys):
    data, run = dino_sar
    out = tmp_path / "ft"
    capsys.readouterr()
    run_ok(["finetune", "--pretrained", run, "--data", data, *TINY, "--img-size", "16", "--sar", "false",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--auto-augment", "none", "--mixup", "0",
            "--cutmix", "0", "--output", out, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "last block C" in printed and "baseline" in printed  # SAR's block, without the SE term (E.4)
    assert "newly initialised 2 (classifier head): head.weight, head.bias" in printed
    start = load_file(str(run / "backbone.safetensors"))
    # the first checkpoint's weights moved from the backbone by training, but not the frozen LN2 of block C
    tuned = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    assert torch.equal(tuned["blocks.1.norm2.weight"], start["blocks.1.norm2.weight"])
    assert ckpt.read_metadata(out / "checkpoints" / "last" / "model.safetensors")["layout"] == "C"


def test_finetune_refuses_another_architecture_and_a_contradicting_layout(dino_sar, tmp_path, capsys):
    data, run = dino_sar
    common = ["finetune", "--pretrained", run, "--data", data, "--img-size", "16", "--epochs", "1", "--batch-size", "8",
              "--output", tmp_path / "ft", "--device", "cpu"]
    err = run_fails(common + ["--model", "vit_tiny_patch16_224", "--model-kwargs", "{patch_size: 4, embed_dim: 24, "
                              "depth: 3, num_heads: 2, mlp_ratio: 2.0}"], capsys)
    assert "pass --model vit_tiny_patch16_224 --model-kwargs" in err
    err = run_fails(common + [*TINY, "--layout", "A"], capsys)
    assert "layout" in err
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("args,message", [
    (["pretrain"], "sarvit pretrain needs --method"),
    (["pretrain", "--method", "supervised"], "task supervised is `sarvit train`'s"),
    (["linprobe", "--data", "fashion_mnist"], "sarvit linprobe needs --checkpoint"),
    (["finetune", "--data", "fashion_mnist"], "sarvit finetune needs --pretrained"),
])
def test_commands_refuse_options_of_other_tasks(args, message, capsys):
    assert message in run_fails(args, capsys)


def test_a_recipe_option_of_another_command_is_refused(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: dino\nmixup: 0.5\n")
    err = run_fails(["pretrain", "--config", recipe], capsys)
    assert f"mixup in {recipe}: not an option of `sarvit pretrain --method dino` (it is one of `sarvit train`)" in err
    assert main(["pretrain", "--method", "dino", "--mixup", "0.5"]) == 2  # on the command line: the same words
    assert "--mixup is not an option of `sarvit pretrain` (it is one of `sarvit train`); remove it" in \
        capsys.readouterr().err


def test_the_other_method_s_options_are_refused_on_the_command_line_and_named_from_a_recipe(image_folder, tmp_path,
                                                                                         capsys):
    err = run_fails(pretrain_args(image_folder, tmp_path / "a", "--method", "mocov3", "--teacher-temp", "0.05",
                                  dino_options=False), capsys)
    assert "--teacher-temp: not an option of `sarvit pretrain --method mocov3` (it is one of `sarvit pretrain " \
           "--method dino`)" in err and not (tmp_path / "a").exists()
    err = run_fails(pretrain_args(image_folder, tmp_path / "b", "--moco-t", "0.5"), capsys)
    assert "--moco-t: not an option of `sarvit pretrain --method dino`" in err
    # the DINO recipe with --method mocov3: its DINO options are named and left out, not applied
    out = tmp_path / "moco"
    capsys.readouterr()
    run_ok(pretrain_args(image_folder, out, "--method", "mocov3", "--epochs", "1", dino_options=False))
    err = capsys.readouterr().err
    assert "--method mocov3 does not read these options of the recipe" in err and "weight_decay_end" in err
    saved = (out / "config.yaml").read_text()
    assert "teacher_temp" not in saved and "weight_decay_end" not in saved and "moco_t: 0.2" in saved
    state = torch.load(out / "checkpoints" / "last" / "state.pt", weights_only=False)
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.04, 0.0}  # no DINO decay schedule


def test_a_pretrain_run_is_not_resumed_by_sarvit_train(dino_sar, capsys):
    _, run = dino_sar
    err = run_fails(["train", "--config", run / "config.yaml", "--resume", "auto"], capsys)
    assert "`sarvit pretrain --method dino`" in err


def test_local_crops_must_fit_the_patch_grid(image_folder, tmp_path, capsys):
    err = run_fails(pretrain_args(image_folder, tmp_path / "run", "--local-crop-size", "6"), capsys)
    assert "local_crop_size 6 is not a multiple" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dino", "mocov3"])
def test_pretrain_under_torchrun_with_two_processes(image_folder, tmp_path, method):
    """DDP over gloo: the student / query encoder is wrapped, MoCo v3 gathers the keys of both ranks."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    args = pretrain_args(image_folder, out, "--method", method, "--sar", "true", "--batch-size", "4",
                         "--epochs", "1", dino_options=method == "dino")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sarvit", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 steps/epoch of 4 x 2 process(es)" in done.stdout
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 1 and math.isfinite(rows[0]["train_loss"]) and "val_knn_top1" in rows[0]
    state = torch.load(out / "checkpoints" / "last" / "state.pt", weights_only=False)
    assert state["world"] == 2 and len(state["rng"]) == 2


def test_attention_reads_a_pretrained_backbone(dino_sar, tmp_path):
    """`sarvit attention` draws a pretrain run's backbone (no classifier) beside a supervised run."""
    data, run = dino_sar
    out = tmp_path / "attention.png"
    run_ok(["attention", "--checkpoint", run, "--data", data, "--images", "2", "--output", out, "--device", "cpu"])
    from PIL import Image

    assert Image.open(out).size[0] > 100


@pytest.mark.parametrize("which,prefix", [(None, "teacher.backbone."), ("student", "student.backbone.")])
def test_a_pretrain_checkpoint_folder_gives_the_chosen_network(dino_sar, which, prefix):
    from sarvit.factory import create_model
    from sarvit.pretrained import PRETRAINING, PROJECTION, load_pretrained

    _, run = dino_sar
    folder = run / "checkpoints" / "last"
    model = create_model("vit_tiny_patch16_224", 4, img_size=16, layout="C",
                         model_kwargs={"patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0})
    report = load_pretrained(model, folder, which)
    saved = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    backbone_keys = [k for k in saved if k.startswith(prefix)]
    assert len(report.loaded) == len(backbone_keys) == 30
    assert all(torch.equal(state[k.removeprefix(prefix)], saved[k]) for k in backbone_keys)
    other = "student." if which is None else "teacher."
    assert all(report.dropped[k] == PRETRAINING for k in saved if k.startswith(other + "backbone."))
    assert all(report.dropped[k] == PROJECTION for k in saved if ".head." in k)
    assert report.dropped["criterion.center"] == PRETRAINING and report.initialised == ("head.weight", "head.bias")


def test_jaccard_scores_a_pretrained_backbone(dino_sar, tmp_path):
    import csv

    from tests.test_jaccard import masked_folder

    _, run = dino_sar
    data = masked_folder(tmp_path / "masked", size=32)
    scores = tmp_path / "scores.csv"
    run_ok(["jaccard", "--checkpoint", run, "--which", "last", "--data", data, "--img-size", "16", "--output", scores,
            "--workers", "0", "--device", "cpu"])
    with scores.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["objects"] for r in rows] == ["2", "2", "2", "0"]
    assert all(0.0 <= float(r["mean"]) <= 1.0 for r in rows[:3])


def test_review_refusals_of_the_transfer_commands(dino_sar, tmp_path, capsys):
    data, run = dino_sar
    # another command's flag is not read as a prefix of one of this command's
    with pytest.raises(SystemExit):
        main(["pretrain", "--method", "dino", "--checkpoint", str(run)])
    assert "unrecognized arguments: --checkpoint" in capsys.readouterr().err
    # a pretrain checkpoint folder holds the whole DINO module: the analysis says what to give instead
    err = run_fails(["attention", "--checkpoint", run / "checkpoints" / "last", "--data", data, "--output",
                     tmp_path / "a.png", "--device", "cpu"], capsys)
    assert "holds the whole dino module" in err and "backbone.safetensors" in err
    # --pretrained-which on the exported backbone names the checkpoint folder holding the other network
    err = run_fails(probe_args(data, run, tmp_path / "p", "--pretrained-which", "student"), capsys)
    assert str(run / "checkpoints" / "last") in err and not (tmp_path / "p").exists()
    # local crops larger than the global ones
    err = run_fails(pretrain_args(data, tmp_path / "big", "--local-crop-size", "32"), capsys)
    assert "local_crop_size 32 is larger than the global crops" in err


def test_linprobe_defaults_are_dino_s_protocol():
    from sarvit.config import load_config

    cfg = load_config(None, {"pretrained": "run"}, command="linprobe")
    # eval_linear.py: SGD, momentum 0.9, no weight decay, lr 0.001 x batch / 256 (= 0.002 x batch / 512), no warm-up
    assert (cfg.opt, cfg.momentum, cfg.weight_decay, cfg.base_lr, cfg.warmup_epochs, cfg.min_lr, cfg.epochs) == \
        ("sgd", 0.9, 0.0, 0.002, 0, 0.0, 100)
    assert load_config(None, {}, command="train").opt == "adamw"  # sarvit train keeps DeiT's
