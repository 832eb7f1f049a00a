import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import sarvit
from sarvit.cli import main
from sarvit.data import build_transform, open_dataset
from sarvit.factory import load_model
from sarvit.runlog import read_metrics
from tests.conftest import TINY_MODEL, make_image_folder, python_cli, tiny_train_args
from tests.test_entropy import loop_entropy

REQUIRED = {"epoch", "step", "train_loss", "train_ce", "lr", "lambda", "images_per_sec", "epoch_time",
            "val_top1", "val_top5", "val_loss", "val_se", "val_components"}


def run_cli(args):
    assert main([str(a) for a in args]) == 0


def weights(path: Path) -> dict:
    return load_file(str(path))


def plain_loop_metrics(run: Path, data: Path, which: str = "last") -> dict:
    """Top-1/top-5, mean SE and components per head of a run's saved weights: one image at a time."""
    model, _ = load_model(run, which=which)
    model.eval()
    raw = open_dataset(str(data), split="val")
    transform = build_transform("imagefolder", 16, False, crop_pct=1.0)
    top1, top5, entropies, components = [], [], [], []
    for image, target in (raw.dataset[i] for i in range(len(raw.dataset))):
        with torch.no_grad():
            logits, S = model.forward_with_similarity(transform(image)[None])
        ranked = logits[0].argsort(descending=True).tolist()
        top1.append(ranked[0] == target)
        top5.append(target in ranked[:5])
        entropies.append(loop_entropy(S[0]).mean().item())
        components.append(np.mean([
            len(np.unique(sarvit.connected_components(s > s.mean()).numpy())) - 1 for s in S[0]]))
    return {"top1": 100 * np.mean(top1), "top5": 100 * np.mean(top5), "se": np.mean(entropies),
            "components": np.mean(components), "images": len(top1)}


def test_training_run_writes_a_complete_run_folder(image_folder, tmp_path):
    out = tmp_path / "run"
    run_cli(tiny_train_args(image_folder, out, "--per-class", "10"))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["per_class"] == 10 and cfg["lambda"] == 0.01 and cfg["output"] == str(out)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert REQUIRED | {"train_se"} <= set(rows[-1])
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    last = (out / "checkpoints" / "last").resolve()
    assert last.name == f"step-{rows[-1]['step']:08d}" and {p.name for p in last.iterdir()} == {
        "model.safetensors", "state.pt", "manifest.json"}
    assert (out / "best.safetensors").is_file() and json.loads((out / "summary.json").read_text())["epochs"] == 2
    subset = json.loads((out / "subset_indices.json").read_text())
    targets = open_dataset(str(image_folder)).targets
    assert subset["size"] == 40 and np.bincount(targets[subset["indices"]]).tolist() == [10] * 4

    # the logged validation metrics, recomputed with a plain loop over the saved final weights
    model, meta = load_model(out, which="last")
    model.eval()
    raw = open_dataset(str(image_folder), split="val")
    transform = build_transform("imagefolder", 16, False, crop_pct=1.0)
    correct, entropies, components = 0, [], []
    for image, target in (raw.dataset[i] for i in range(len(raw.dataset))):
        with torch.no_grad():
            logits, S = model.forward_with_similarity(transform(image)[None])
        correct += int(logits.argmax(1).item() == target)
        entropies.append(loop_entropy(S[0]).mean().item())
        components.append(np.mean([
            len(np.unique(sarvit.connected_components(s > s.mean()).numpy())) - 1 for s in S[0]]))
    assert rows[-1]["val_top1"] == pytest.approx(100 * correct / len(raw.dataset))
    assert rows[-1]["val_se"] == pytest.approx(np.mean(entropies), abs=1e-5)
    assert rows[-1]["val_components"] == pytest.approx(np.mean(components))
    assert meta["num_classes"] == 4 and meta["layout"] == "C" and meta["sar"] is True


def test_baseline_weights_load_into_the_plain_timm_model(image_folder, tmp_path):
    out = tmp_path / "base"
    run_cli(tiny_train_args(image_folder, out, "--sar", "false", "--epochs", "1"))
    rows = read_metrics(out / "metrics.jsonl")
    assert "train_se" not in rows[0] and "val_se" in rows[0]
    sar_model, meta = load_model(out)
    assert meta["layout"] == "A"
    # the documented one-liner: timm reads the safetensors file as pretrained weights
    plain = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "best.safetensors"), num_classes=4),
        num_classes=4, img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0,
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(x), sar_model.eval()(x))
    sar = tmp_path / "sar"
    run_cli(tiny_train_args(image_folder, sar, "--epochs", "1"))
    plain.load_state_dict(weights(sar / "best.safetensors"), strict=True)  # SAR weights, timm's keys


def test_existing_run_folder_is_never_overwritten(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(tiny_train_args(image_folder, out, "--epochs", "1"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(tiny_train_args(image_folder, out, "--epochs", "1")) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("args,message", [
    (["--model", "vit_smal_patch16_224"], "unknown model 'vit_smal_patch16_224'"),
    (["--lambda", "-1"], "lambda must be >= 0"),
    (["--batch-size", "64"], "fewer than one batch"),
    (["--per-class", "50"], "more images than 4 classes"),
])
def test_bad_experiments_fail_with_a_clear_message(image_folder, tmp_path, capsys, args, message):
    argv = tiny_train_args(image_folder, tmp_path / "run")
    if args[0] == "--model":  # the tiny model's arguments would not fit another name anyway
        argv = [a for a in argv if a not in TINY_MODEL]
    argv += args
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_dataset_names_the_places_it_looked(tmp_path, capsys):
    assert main(["train", "--data", "cifar10", "--data-root", str(tmp_path / "nope"), "--output",
                 str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cifar10" in err and str(tmp_path / "nope") in err and "--download" in err


def test_resume_refuses_a_different_experiment(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(tiny_train_args(image_folder, out, "--epochs", "1"))
    assert main(tiny_train_args(image_folder, out, "--epochs", "1", "--lambda", "0.1", "--resume", "auto")) == 2
    assert "different experiment" in capsys.readouterr().err


def test_eval_command(image_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run_cli(tiny_train_args(image_folder, out, "--epochs", "1"))
    capsys.readouterr()
    run_cli(["eval", "--checkpoint", out, "--which", "last", "--device", "cpu", "--workers", "0"])
    metrics = json.loads(capsys.readouterr().out)
    row = read_metrics(out / "metrics.jsonl")[-1]
    expected = plain_loop_metrics(out, image_folder)
    assert metrics["images"] == expected["images"] == 20
    for key in ("top1", "top5", "se", "components"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5), key
    other = make_image_folder(tmp_path / "three", classes=3)
    assert main(["eval", "--checkpoint", str(out), "--data", str(other), "--device", "cpu", "--workers", "0"]) == 2
    assert "the model has 4 classes" in capsys.readouterr().err
    # as many classes, one of another name: refused, the names listed
    renamed = make_image_folder(tmp_path / "renamed", classes=4, train=1, val=2)
    (renamed / "val" / "class3").rename(renamed / "val" / "zebra")
    assert main(["eval", "--checkpoint", str(out), "--data", str(renamed), "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "only in the checkpoint: 1 ('class3')" in err and "1 ('zebra')" in err and "Traceback" not in err
    # a dataset without class names (targets only) is checked by its labels alone
    def unnamed(*args, **kwargs):
        return dataclasses.replace(open_dataset(*args, **kwargs), classes=[])

    monkeypatch.setattr("sarvit.evaluation.open_dataset", unnamed)
    run_cli(["eval", "--checkpoint", out, "--which", "last", "--device", "cpu", "--workers", "0"])
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(row["val_top1"])


def test_train_and_val_with_different_class_names_are_refused(image_folder, tmp_path, capsys):
    (image_folder / "val" / "class3").rename(image_folder / "val" / "zebra")
    out = tmp_path / "run"
    assert main(tiny_train_args(image_folder, out)) == 2
    err = capsys.readouterr().err
    assert "only in the train split" in err and "1 ('class3')" in err and "only in its val split: 1 ('zebra')" in err
    assert "Traceback" not in err and not (out / "checkpoints").exists()


def test_one_class_data_trains_with_a_warning(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=1)
    out = tmp_path / "run"
    run_cli(tiny_train_args(data, out, "--epochs", "1"))
    err = capsys.readouterr().err
    assert err.count("warning: the training set has one class only ('class0')") == 1
    # what the warning is about: one output, so every val image counts as right
    assert read_metrics(out / "metrics.jsonl")[-1]["val_top1"] == 100.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(Path(__file__).parent.parent))
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(image_folder, tmp_path):
    common = ["--epochs", "2", "--reprob", "0.5", "--auto-augment", "rand-m9-mstd0.5-inc1", "--workers", "0"]
    single = tmp_path / "single"
    subprocess.run(python_cli() + tiny_train_args(image_folder, single, *common, "--batch-size", "8"),
                   check=True, env=_env(2), capture_output=True)
    double = tmp_path / "double"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "sarvit.cli"]
    proc = subprocess.run(launcher + tiny_train_args(image_folder, double, *common, "--batch-size", "4"),
                          env=_env(1), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = weights(single / "checkpoints" / "last" / "model.safetensors")
    b = weights(double / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):
            # The key bias adds q.b to every logit of a row: softmax and Eq. 5's mean subtraction
            # cancel it, so its gradient is round-off noise, which AdamW scales up to lr-sized
            # steps. Compare the query and value biases only.
            c = x.shape[0] // 3
            x, y = torch.cat([x[:c], x[2 * c:]]), torch.cat([y[:c], y[2 * c:]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=k)
    ra, rb = read_metrics(single / "metrics.jsonl"), read_metrics(double / "metrics.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [6, 12]
    assert ra[-1]["val_top1"] == pytest.approx(rb[-1]["val_top1"])
    # and a different seed does give different weights (the comparison can fail)
    other = tmp_path / "other"
    subprocess.run(python_cli() + tiny_train_args(image_folder, other, *common, "--batch-size", "8", "--seed", "1"),
                   check=True, env=_env(2), capture_output=True)
    c = weights(other / "checkpoints" / "last" / "model.safetensors")
    assert not torch.allclose(a["head.weight"], c["head.weight"], atol=1e-3)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_bitwise_the_same_weights(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=4, train=24, val=4)
    # Mixup/CutMix (NumPy RNG), drop-path (torch RNG), RandAugment and erasing (per-sample seeds)
    common = ["--epochs", "6", "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.1", "--reprob", "0.25",
              "--auto-augment", "rand-m9-mstd0.5-inc1", "--checkpoint-interval", "5", "--eval-interval", "3"]
    full = tmp_path / "full"
    subprocess.run(python_cli() + tiny_train_args(data, full, *common), check=True, env=_env(1), capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(python_cli() + tiny_train_args(data, killed, *common, "--workers", "2"),
                            env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last"
    deadline = time.time() + 300
    # epoch 3 has steps 25-36: kill as soon as the interval checkpoint of step 25 is the last one
    while proc.poll() is None and time.time() < deadline:
        if last.is_symlink() and os.readlink(last) == "step-00000025":
            break
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    state = torch.load(killed / "checkpoints" / "last" / "state.pt", weights_only=False)
    assert 0 < state["loop"]["step_in_epoch"] < 12  # the checkpoint it resumes from is mid-epoch

    resumed = subprocess.run(python_cli() + tiny_train_args(data, killed, *common, "--resume", "auto"),
                             env=_env(1), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    a = weights(full / "checkpoints" / "last" / "model.safetensors")
    b = weights(killed / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in read_metrics(killed / "metrics.jsonl")] == list(range(1, 7))
    sa = torch.load(full / "checkpoints" / "last" / "state.pt", weights_only=False)
    sb = torch.load(killed / "checkpoints" / "last" / "state.pt", weights_only=False)
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_unreadable_image_is_named(image_folder, tmp_path, capsys, workers):
    (image_folder / "train" / "class2" / "broken.png").write_bytes(b"not a png at all")
    assert main(tiny_train_args(image_folder, tmp_path / "run", "--workers", workers)) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err and "Traceback" not in err


def test_model_ema_and_bf16_autocast(image_folder, tmp_path):
    out = tmp_path / "run"
    run_cli(tiny_train_args(image_folder, out, "--epochs", "1", "--model-ema", "true", "--model-ema-decay", "0.5",
                            "--amp", "bf16", "--clip-grad", "1.0"))
    row = read_metrics(out / "metrics.jsonl")[-1]
    assert {"val_ema_top1", "val_ema_se"} <= set(row)
    assert (out / "best_ema.safetensors").is_file()
    assert (out / "checkpoints" / "last" / "ema.safetensors").is_file()
    ema, model = weights(out / "best_ema.safetensors"), weights(out / "best.safetensors")
    assert not torch.equal(ema["head.weight"], model["head.weight"])


@pytest.mark.slow
def test_torch_compile_training(image_folder, tmp_path):
    out = tmp_path / "run"
    run_cli(tiny_train_args(image_folder, out, "--epochs", "1", "--compile", "true"))
    row = read_metrics(out / "metrics.jsonl")[-1]
    expected = plain_loop_metrics(out, image_folder)
    assert row["val_top1"] == pytest.approx(expected["top1"]) and row["val_se"] == pytest.approx(expected["se"], abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_training_with_amp(image_folder, tmp_path, amp):
    out = tmp_path / amp
    run_cli([a if a != "cpu" else "cuda" for a in tiny_train_args(image_folder, out, "--amp", amp)])
    rows = read_metrics(out / "metrics.jsonl")
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["train_se"]) for r in rows)


@pytest.mark.slow
def test_the_se_term_lowers_the_spatial_entropy_it_is_trained_on(image_folder, tmp_path):
    # End to end: the sign and the path of the SE gradient through the model and the loop.
    se = {}
    for lam in ("0", "5"):
        out = tmp_path / f"lam{lam}"
        run_cli(tiny_train_args(image_folder, out, "--epochs", "10", "--lambda", lam, "--lr", "3e-3",
                                "--model-kwargs", "{patch_size: 2, embed_dim: 24, depth: 2, num_heads: 2}"))
        se[lam] = read_metrics(out / "metrics.jsonl")[-1]["val_se"]
    assert se["5"] < 0.5 * se["0"], se


def test_eval_normalises_with_the_statistics_of_the_training_data(tmp_path, capsys):
    """A Fashion-MNIST model evaluated on an ImageFolder copy keeps Fashion-MNIST's normalisation."""
    from sarvit.checkpoint import save_weights
    from sarvit.data.pipeline import DATASET_STATS

    names = [f"class{c}" for c in range(4)]
    folder = make_image_folder(tmp_path / "copy", classes=4, train=1, val=6)
    torch.manual_seed(0)
    model = sarvit.create_model("vit_tiny_patch16_224", 4, img_size=16, layout="A",
                                model_kwargs=dict(patch_size=4, embed_dim=24, depth=2, num_heads=2))
    meta = {"model": "vit_tiny_patch16_224", "model_kwargs": dict(patch_size=4, embed_dim=24, depth=2, num_heads=2),
            "img_size": 16, "num_classes": 4, "classes": names, "layout": "A", "query": "cls", "data": "fashion_mnist"}
    weights = save_weights(model, tmp_path / "fm.safetensors", meta)
    capsys.readouterr()
    run_cli(["eval", "--checkpoint", weights, "--data", folder, "--crop-pct", "1.0", "--device", "cpu",
             "--workers", "0"])
    got = json.loads(capsys.readouterr().out)

    def plain_loss(mean, std) -> float:
        raw = open_dataset(str(folder), split="val")
        losses = []
        for image, target in (raw.dataset[i] for i in range(len(raw.dataset))):
            x = torch.from_numpy(np.asarray(image.resize((16, 16), 3), dtype=np.float32) / 255).permute(2, 0, 1)
            x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
            with torch.no_grad():
                losses.append(torch.nn.functional.cross_entropy(model.eval()(x[None]), torch.tensor([target])).item())
        return float(np.mean(losses))

    fm, imagenet = plain_loss(*DATASET_STATS["fashion_mnist"]), plain_loss((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert abs(fm - imagenet) > 1e-3  # the two normalisations do give different results
    assert got["loss"] == pytest.approx(fm, abs=1e-4)


# --- auxiliary objectives beside SAR (--objective) -------------------------------------------

SE_FAMILY = {"sar": "se", "sar_softmax": "se_softmax", "sar_cosine": "se_cosine", "tv": "tv", "entropy": "entropy"}


@pytest.mark.parametrize("objective", sorted(SE_FAMILY))
def test_each_map_objective_trains_and_logs_its_term(image_folder, tmp_path, capsys, objective):
    out = tmp_path / objective
    capsys.readouterr()
    run_cli(tiny_train_args(image_folder, out, "--epochs", "1", "--objective", objective, "--lambda", "0.5"))
    printed = capsys.readouterr().out
    term = SE_FAMILY[objective]
    row = read_metrics(out / "metrics.jsonl")[-1]
    assert {f"train_{term}", "val_se", "val_components"} <= set(row)
    assert {k for k in row if k.startswith("train_")} == {"train_loss", "train_ce", f"train_{term}"}
    # a constant weight: the mean loss is the mean CE plus 0.5 times the mean term
    assert row["train_loss"] == pytest.approx(row["train_ce"] + 0.5 * row[f"train_{term}"], rel=1e-5)
    assert f"objective {objective} (lambda=0.5, constant)" in printed and "last block C" in printed
    assert f", {term} {row[f'train_{term}']:.4f})" in printed  # the epoch line shows the term
    summary = json.loads((out / "summary.json").read_text())
    _, meta = load_model(out)
    assert summary["objective"] == meta["objective"] == objective and meta["layout"] == "C"
    if objective == "tv":  # the validation SE stays the SE of the pre-softmax maps, whatever the objective
        expected = plain_loop_metrics(out, image_folder)
        assert row["val_se"] == pytest.approx(expected["se"], abs=1e-5)


def _param_groups_by_hand(run: Path) -> tuple[int, int]:
    """(decayed, not decayed) parameter counts of the tiny backbone, as timm groups them."""
    model, _ = load_model(run)
    skip = {"pos_embed", "cls_token", "dist_token"}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = sum(1 for n, p in trainable if p.ndim > 1 and not n.endswith(".bias") and n not in skip)
    return decayed, len(trainable) - decayed


def test_drloc_trains_its_mlp_which_checkpoints_keep_and_exports_leave_out(image_folder, tmp_path, capsys):
    out = tmp_path / "drloc"
    capsys.readouterr()
    run_cli(tiny_train_args(image_folder, out, "--objective", "drloc", "--drloc-warmup-epochs", "1",
                            "--drloc-pairs", "16"))
    printed = capsys.readouterr().out
    assert "objective drloc (DRLoc, drloc_lambda=0.1" in printed and "last block A" in printed
    rows = read_metrics(out / "metrics.jsonl")
    assert all("train_drloc" in r and "train_se" not in r for r in rows)
    # the weight: linear warm-up over epoch 1, linear decay over epoch 2 (the last step of 6 each)
    assert rows[0]["lambda"] == pytest.approx(0.1 * 5 / 6) and rows[1]["lambda"] == pytest.approx(0.1 * 1 / 6)
    keys = {f"drloc.head.mlp.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    first = torch.load(out / "checkpoints" / "step-00000006" / "state.pt", weights_only=False)
    last = torch.load(out / "checkpoints" / "step-00000012" / "state.pt", weights_only=False)
    assert set(first["objective"]) == set(last["objective"]) == keys
    assert last["objective"]["drloc.head.mlp.0.weight"].shape == (512, 2 * 24)
    assert all(not torch.equal(first["objective"][k], last["objective"][k]) for k in keys)  # trained
    decayed, not_decayed = _param_groups_by_hand(out)
    groups = {g["weight_decay"]: len(g["params"]) for g in last["optimizer"]["param_groups"]}
    assert groups == {0.05: decayed + 3, 0.0: not_decayed + 3}  # the MLP's 3 weights decay, its 3 biases not
    assert len(last["optimizer"]["state"]) == decayed + not_decayed + 6  # AdamW moments of every parameter
    plain = set(timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=4, embed_dim=24,
                                  depth=2, num_heads=2, mlp_ratio=2.0).state_dict())
    for exported in (out / "best.safetensors", out / "checkpoints" / "last" / "model.safetensors"):
        assert set(weights(exported)) == plain, exported  # the backbone only
    capsys.readouterr()
    run_cli(["eval", "--checkpoint", out, "--which", "last", "--device", "cpu", "--workers", "0"])
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(rows[-1]["val_top1"])


def test_sar_false_is_the_plain_baseline_whatever_the_objective(image_folder, tmp_path, capsys):
    out = tmp_path / "base"
    capsys.readouterr()
    run_cli(tiny_train_args(image_folder, out, "--epochs", "1", "--sar", "false", "--objective", "drloc"))
    assert "baseline (no auxiliary term)" in capsys.readouterr().out
    row = read_metrics(out / "metrics.jsonl")[-1]
    assert {k for k in row if k.startswith("train_")} == {"train_loss", "train_ce"}
    assert row["train_loss"] == row["train_ce"]
    state = torch.load(out / "checkpoints" / "last" / "state.pt", weights_only=False)
    assert state["objective"] == {}  # no DRLoc MLP built
    _, meta = load_model(out)
    assert meta["objective"] == "baseline" and meta["layout"] == "A"


def test_an_unknown_objective_is_refused_with_the_choices(image_folder, tmp_path, capsys):
    assert main(tiny_train_args(image_folder, tmp_path / "run", "--objective", "bogus")) == 2
    err = capsys.readouterr().err
    assert "objective must be one of sar, sar_softmax, sar_cosine, tv, entropy, drloc; got 'bogus'" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
