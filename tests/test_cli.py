import errno
import json
import subprocess
import sys

import pytest
import torch

from sarvit import checkpoint as ckpt
from sarvit import cli, distributed
from sarvit.cli import main
from sarvit.errors import ConfigError, user_message

from tests.conftest import TINY_MODEL, tiny_train_args

HINT = "(set SARVIT_DEBUG=1 to see the traceback)"


def one_line_error(capsys, command: str) -> str:
    """The message ``main`` printed: one error line and the hint, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1] == HINT and "Traceback" not in err, err
    assert lines[0].startswith(f"sarvit {command}: error: ")
    return lines[0].removeprefix(f"sarvit {command}: error: ")


# --- start-up: no torch, no timm for help, option errors and recipes --------------------------------


def test_help_option_errors_and_recipes_answer_without_torch_or_timm():
    code = """
import runpy, sys
sys.argv = ["sarvit", "--help"]
try:
    runpy.run_module("sarvit.cli", run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
from sarvit.cli import main
fast = ["--data", "/nonexistent", "--epochs", "1", "--device", "cpu"]  # were an option let through
assert main(["train", "--lambda", "-1", *fast]) == 2
assert main(["train", "--config", "fashion_mnist_cpu", "--clip-grad", "-1", *fast]) == 2
assert main(["recipes"]) == 0
assert main(["eval", "--checkpoint", "/nonexistent/run"]) == 2
import sarvit
assert sarvit.__version__ and "attach" in sarvit.__all__
print("HEAVY", sorted(m for m in ("torch", "timm", "sarvit.train", "sarvit.factory") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "lambda must be >= 0; got -1" in proc.stderr and "clip_grad must be > 0 or none; got -1" in proc.stderr
    assert "fashion_mnist_cpu" in proc.stdout  # the recipes were listed
    assert "no such file or run folder: /nonexistent/run" in proc.stderr


def test_a_reader_that_leaves_early_gets_no_traceback():
    proc = subprocess.run(f"{sys.executable} -m sarvit.cli recipes | head -c 1", shell=True, capture_output=True,
                          text=True)
    assert len(proc.stdout) == 1 and "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr, proc.stderr


def test_a_disk_full_in_a_background_writer_is_one_line(monkeypatch, capsys):
    import threading

    def writes_in_a_thread(args):  # as TensorBoard's event writer does
        def write():
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/tensorboard/events")

        thread = threading.Thread(target=write)
        thread.start()
        thread.join()
        return 0

    monkeypatch.setattr(cli, "_cmd_recipes", writes_in_a_thread)
    assert main(["recipes"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip() == ("sarvit recipes: error in a background writer: no space left on device while writing "
                           "/runs/x/tensorboard/events: free space and `--resume auto`")


def test_the_public_names_still_import_lazily():
    import sarvit
    from sarvit.surgery import attach

    assert sarvit.attach is attach and set(sarvit.__all__) <= set(dir(sarvit))
    with pytest.raises(AttributeError, match="no attribute 'atach'"):
        sarvit.atach


# --- option errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--clip-grad", "-1"], "clip_grad must be > 0 or none; got -1"),
    (["--lambda", "nan"], "lambda must be a finite number >= 0; got nan"),
    (["--auto-augment", "rand-bogus"], "'bogus' is none of them"),
    (["--interpolation", "cubicc"], "interpolation must be one of"),
    (["--device", "gpu0"], "device must be auto, cpu, cuda, cuda:N (N a GPU index) or mps; got 'gpu0'"),
    (["--model-kwargs", "{depth: [2"], "model_kwargs: malformed YAML '{depth: [2' (line 1, column 11"),
])
def test_train_option_errors_are_one_line(tmp_path, capsys, args, message):
    fast = ["--data", str(tmp_path / "none"), "--epochs", "1", "--device", "cpu"]  # were an option let through
    assert main(["train", "--output", str(tmp_path / "run"), *fast, *args]) == 2
    assert message in one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_malformed_recipe_names_the_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 2\nscale: [0.5, 1\n")
    assert main(["train", "--config", str(recipe)]) == 2
    message = one_line_error(capsys, "train")
    assert message.startswith(f"{recipe}: malformed YAML at line 3")


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "argument --batch-size: batch_size must be >= 1; got 0"),
    (["--crop-pct", "5"], "argument --crop-pct: crop_pct must be in (0, 1]; got 5"),
    (["--img-size", "-32"], "argument --img-size: img_size must be >= 1; got -32"),
    (["--workers", "two"], "argument --workers: workers: cannot read 'two' as int"),
    (["--device", "gpu0"], "argument --device: device must be auto, cpu"),
])
def test_eval_options_are_range_checked_by_the_parser(capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main(["eval", "--checkpoint", "somewhere", *args])
    assert exit.value.code == 2 and message in capsys.readouterr().err


# --- environment faults -----------------------------------------------------------------------------------


def test_disk_full_while_training_names_the_file(image_folder, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)  # the safetensors writer of every weights file
    out = tmp_path / "run"
    assert main(tiny_train_args(image_folder, out, "--epochs", "1")) == 2
    message = one_line_error(capsys, "train")
    assert message == f"no space left on device while writing {out}/best.safetensors: free space and `--resume auto`"
    assert (out / "config.yaml").is_file() and not list(out.glob(".*tmp*"))  # nothing half-written left


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4416 vs 4320"),
    RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),
    RuntimeError("basic_ios::clear: iostream error"),
    "safetensors",
])
def test_failed_torch_and_safetensors_writes_read_as_disk_full(tmp_path, error):
    if error == "safetensors":
        from safetensors import SafetensorError

        error = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                '"No space left on device" })')

    def write(tmp):
        raise error

    with pytest.raises(type(error)) as caught:
        ckpt.atomic_write(tmp_path / "state.pt", write)
    assert user_message(caught.value) == (f"no space left on device while writing {tmp_path}/state.pt: "
                                          "free space and `--resume auto`")


def test_an_output_below_a_regular_file_is_named(image_folder, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(tiny_train_args(image_folder, blocker / "run", "--epochs", "1")) == 2
    message = one_line_error(capsys, "train")
    assert message.startswith(f"Not a directory: {blocker}/run; check that path")


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied", "/data/runs/x"),
    OSError(errno.EROFS, "Read-only file system", "/data/runs/x"),
    FileExistsError(errno.EEXIST, "File exists", "/data/runs/x"),
])
def test_read_only_and_forbidden_folders_are_named(error):
    assert user_message(error) == (f"{error.strerror}: /data/runs/x; check that path (--output must be a folder "
                                   "this user can write, on a writable file system)")


def test_eval_output_is_checked_before_evaluating(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the checkpoint does not exist either: a check after the evaluation would report that instead
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--output", str(blocker / "m.json")]) == 2
    expected = f"cannot write --output {blocker}/m.json: {blocker} is a file, not a folder"
    assert one_line_error(capsys, "eval") == expected
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path)]) == 2
    assert one_line_error(capsys, "eval").startswith(f"--output {tmp_path} is a folder")


def test_eval_output_in_a_read_only_folder(tmp_path, capsys, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    out = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--output", str(out)]) == 2
    assert one_line_error(capsys, "eval") == (f"cannot write --output {out}: Read-only file system; choose a file "
                                              "in a writable folder")


def test_eval_writes_its_output_atomically(image_folder, tmp_path, capsys):
    from sarvit.factory import create_model

    kwargs = {"patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    model = create_model("vit_tiny_patch16_224", 4, img_size=16, model_kwargs=kwargs)
    meta = {"model": "vit_tiny_patch16_224", "model_kwargs": kwargs, "img_size": 16, "num_classes": 4,
            "classes": [f"class{c}" for c in range(4)], "layout": "C", "query": "cls", "data": str(image_folder)}
    ckpt.save_weights(model, tmp_path / "w.safetensors", meta)
    out = tmp_path / "new" / "metrics.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "w.safetensors"), "--output", str(out), "--device", "cpu",
                 "--workers", "0", "--crop-pct", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed and printed["images"] == 20
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json"]  # no probe or temporary file left


# --- devices --------------------------------------------------------------------------------------------


def test_devices_this_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "_mps_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--device cuda: CUDA is not available on this machine \(it has cpu\)"):
        distributed.pick_device("cuda", 0)
    with pytest.raises(ConfigError, match=r"--device mps: Apple's MPS is not available .*\(it has cpu\)"):
        distributed.pick_device("mps", 0)
    with pytest.raises(ConfigError, match=r"--device 'gpu0' is not a device: .*this machine has cpu$"):
        distributed.pick_device("gpu0", 0)
    assert distributed.pick_device("auto", 0) == torch.device("cpu")


def test_a_gpu_index_beyond_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed, "_mps_available", lambda: False)
    with pytest.raises(ConfigError, match="no GPU of index 3 .*this machine has cpu, cuda:0, cuda:1$"):
        distributed.pick_device("cuda:3", 0)
    assert distributed.pick_device("cuda", 1) == torch.device("cuda", 1)  # torchrun's local rank


# --- bugs keep their traceback ----------------------------------------------------------------------


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors(monkeypatch, capsys):
    def buggy(args):
        raise ValueError("an index went wrong deep inside")

    monkeypatch.setattr(cli, "_cmd_recipes", buggy)
    with pytest.raises(ValueError, match="deep inside"):
        main(["recipes"])
    monkeypatch.setenv("SARVIT_DEBUG", "1")
    with pytest.raises(ConfigError, match="lambda must be >= 0"):
        main(["train", "--lambda", "-1"])
    monkeypatch.setenv("SARVIT_DEBUG", "0")
    assert main(["train", "--lambda", "-1"]) == 2


def test_model_family_error_is_one_line(image_folder, tmp_path, capsys):
    argv = [a for a in tiny_train_args(image_folder, tmp_path / "run", "--epochs", "1") if a not in TINY_MODEL]
    assert main([*argv, "--model", "resnet18", "--img-size", "32"]) == 2
    assert "SAR supports these families: timm VisionTransformer" in one_line_error(capsys, "train")
