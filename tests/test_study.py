"""`sarvit study`: the study file, its expansion into runs, and running them (skip, resume, failures)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import yaml

from sarvit.config import ConfigError, load_config
from sarvit.runs import RunFolder
from sarvit.study.runner import run_study, status_of, train_command
from sarvit.study.spec import load_study, run_id

from .conftest import TINY_MODEL, make_image_folder, python_cli


def write_study(path: Path, **spec) -> Path:
    base = {"name": "s", "recipe": "fashion_mnist_cpu", "methods": {"baseline": {"sar": False}, "SAR": {}},
            "baseline": "baseline", "seeds": [0, 1]}
    base.update(spec)
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


# --- the study file ---------------------------------------------------------------------------


def test_expansion_is_cells_by_methods_by_seeds(tmp_path):
    grid = {"size": {"small": {"per_class": 10}, "large": {"per_class": 20, "epochs": 3}}, "lambda": [0.1, 1]}
    study = load_study(write_study(tmp_path / "s.yaml", grid=grid, options={"epochs": 2}), tmp_path / "out")
    assert study.cells == ["small, lambda=0.1", "small, lambda=1", "large, lambda=0.1", "large, lambda=1"]
    assert len(study.runs) == 4 * 2 * 2
    first = study.runs[0]
    assert (first.cell, first.method, first.seed) == ("small, lambda=0.1", "baseline", 0)
    assert first.options == {"epochs": 2, "per_class": 10, "lambda": 0.1, "sar": False, "seed": 0}
    # a cell's options override the study's; the method's override the cell's
    large = next(r for r in study.runs if r.cell.startswith("large") and r.method == "SAR")
    assert large.options["epochs"] == 3
    assert study.runs_dir == tmp_path / "out" / "runs" and first.folder.parent == study.runs_dir
    assert len({r.id for r in study.runs}) == len(study.runs)


def test_the_same_run_in_two_studies_has_one_folder_and_an_edit_makes_a_new_one(tmp_path):
    a = load_study(write_study(tmp_path / "a.yaml", name="a", options={"per_class": 10}), tmp_path / "a")
    b = load_study(write_study(tmp_path / "b.yaml", name="b", grid={"n": {"x": {"per_class": 10}}},
                               methods={"plain": {"sar": False}}, baseline="plain"), tmp_path / "b")
    assert a.runs[0].options == b.runs[0].options
    assert a.runs[0].id == b.runs[0].id
    c = load_study(write_study(tmp_path / "c.yaml", options={"per_class": 11}), tmp_path / "c")
    assert c.runs[0].id != a.runs[0].id
    text = resources.files("sarvit").joinpath("configs", "fashion_mnist_cpu.yaml").read_text()
    assert run_id(text, a.runs[0].options) == a.runs[0].id
    assert run_id(text + "\n# edited", a.runs[0].options) != a.runs[0].id  # the recipe's text counts


@pytest.mark.parametrize("spec, message", [
    ({"methods": {"x": {"bogus_option": 1}}, "baseline": "x"}, "methods.x: unknown option 'bogus_option'"),
    ({"methods": {"x": {"seed": 3}}, "baseline": "x"}, "'seed' is set by the study itself"),
    ({"options": {"output": "o"}}, "'output' is set by the study itself"),
    ({"baseline": "nobody"}, "baseline 'nobody' is not one of the methods (baseline, SAR)"),
    ({"seeds": [0, 0]}, "seeds repeat a value"),
    ({"seeds": [-1]}, "seeds must be a non-empty list of integers >= 0"),
    ({"seeds": "0"}, "seeds must be a non-empty list"),
    ({"methods": {}}, "methods must name at least one method"),
    ({"methods": {"x": {"lambda": -1}}, "baseline": "x"}, "method 'x': lambda must be >= 0; got -1"),
    ({"grid": {"epochs": []}}, "grid.epochs must be a non-empty list"),
    ({"grid": {"epochz": [1, 2]}}, "grid.epochz: unknown option 'epochz'; did you mean epochs"),
    ({"name": "a b"}, "name must be a short identifier"),
    ({"recipe": "no_such_recipe"}, "neither a file nor a shipped recipe"),
    ({"colour": 1}, "unknown key(s) colour"),
    ({"grid": {"size": {"a": {"per_class": 1}, "b": {"per_class": 1}}}}, "set the same options"),
    ({"attention": {"images": 0}}, "attention.images must be a whole number >= 1; got 0"),
    ({"attention": {"seed": 7}}, "attention.seed 7 is not one of the seeds [0, 1]"),
    ({"attention": {"cell": "huge"}}, "attention.cell 'huge' is not a cell of the grid"),
    ({"attention": {"colour": 1}}, "attention: unknown key(s) colour"),
    ({"jaccard": {"which": "first"}}, "jaccard.which must be one of best, last, best_ema"),
    ({"jaccard": {"img_size": 480}}, "jaccard.data must name the masks"),
    ({"heads": "yes"}, "heads must be true or false"),
])
def test_bad_study_files_are_refused_before_anything_runs(tmp_path, spec, message):
    with pytest.raises(ConfigError) as err:
        load_study(write_study(tmp_path / "s.yaml", **spec), tmp_path / "out")
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_malformed_and_missing_study_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load_study(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="shipped studies: .*cpu_table1b_rows"):
        load_study("no_such_study")


def test_every_shipped_study_expands_and_its_runs_validate():
    folder = resources.files("sarvit").joinpath("studies")
    names = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
    assert {"cpu_fmnist_methods", "cpu_table1b_rows", "cpu_table1a_lambda", "cpu_stamps_jaccard",
            "in100_table1a_lambda", "in100_table1b_rows", "in100_table3_fractions", "in1k_table4_drloc"} <= set(names)
    for name in names:
        study = load_study(name, extra={"data_root": "/data"} if name.startswith("in") else None)
        assert len(study.runs) == len(study.cells) * len(study.methods) * len(study.seeds)
        assert len(study.seeds) >= 3, f"{name}: a comparison needs several seeds"
        for run in study.runs:
            load_config(study.recipe, run.options)


def test_table1b_rows_are_the_papers_layouts():
    study = load_study("cpu_table1b_rows")
    rows = {r.method[0]: load_config(study.recipe, r.options) for r in study.runs if r.seed == 0}
    expected = {"A": (False, "A"), "B": (False, "B"), "C": (False, "C"), "D": (False, "D"), "E": (True, "A"),
                "F": (True, "C")}
    from sarvit.config import resolved_layout

    assert {k: (cfg.sar, resolved_layout(cfg)) for k, cfg in rows.items()} == expected


def test_train_command_spells_every_option(tmp_path):
    study = load_study(write_study(tmp_path / "s.yaml", options={
        "model_kwargs": {"depth": 2}, "scale": [0.5, 1.0], "auto_augment": None}), tmp_path / "out")
    run = study.runs[0]
    command = train_command(study, run)
    assert command[:5] == [sys.executable, "-m", "sarvit", "train", "--config"]
    i = command.index("--model-kwargs")
    assert yaml.safe_load(command[i + 1]) == {"depth": 2}
    assert command[command.index("--scale") + 1] == "0.5,1.0"
    assert command[command.index("--auto-augment") + 1] == "none"
    assert command[command.index("--sar") + 1] == "false"
    assert command[-4:] == ["--output", str(run.folder.resolve()), "--resume", "auto"]
    launched = train_command(study, run, torchrun=4)
    assert launched[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]


# --- running ----------------------------------------------------------------------------------


def tiny_study(tmp_path: Path, data: Path, epochs: int = 1, **spec) -> Path:
    kwargs = yaml.safe_load(TINY_MODEL[TINY_MODEL.index("--model-kwargs") + 1])
    options = {"data": str(data), "model": "vit_tiny_patch16_224", "img_size": 16, "model_kwargs": kwargs,
               "epochs": epochs, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0, "workers": 0, "auto_augment": None,
               "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "scale": [0.5, 1.0], "crop_pct": 1.0, "device": "cpu",
               "per_class": None}
    return write_study(tmp_path / "tiny.yaml", options=options, **spec)


def test_runs_finish_and_a_second_pass_skips_them(tmp_path):
    data = make_image_folder(tmp_path / "data")
    study = load_study(tiny_study(tmp_path, data, seeds=[0]), tmp_path / "out")
    lines = []
    assert run_study(study, say=lines.append) == []
    assert all(status_of(r) == "finished" for r in study.runs)
    for run in study.runs:  # each run is the training its options describe
        saved = yaml.safe_load(RunFolder(run.folder).config.read_text())
        assert saved["sar"] == run.options.get("sar", True) and saved["seed"] == run.seed
    assert any(line.startswith("[2/2] finished SAR | seed 0") for line in lines)
    # the per-head table: the heads of the last weights, whose mean is the final validation SE the run logged
    from sarvit.study.report import write_report

    report = write_report(dataclasses.replace(study, heads=True), tmp_path / "report").read_text()
    table = report.split("## Spatial entropy per head")[1]
    assert "SE, head rank 1" in table
    for run in study.runs:
        row = next(line for line in table.splitlines() if line.startswith(f"| {run.method} |"))
        heads = [float(cell.split()[0]) for cell in row.split("|")[3:5]]
        assert heads == sorted(heads)
        final = json.loads(RunFolder(run.folder).summary.read_text())["final"]["se"]
        assert sum(heads) / 2 == pytest.approx(final, abs=1e-3)  # printed with 3 decimals
    stamps = [RunFolder(r.folder).summary.stat().st_mtime_ns for r in study.runs]
    again = []
    assert run_study(study, say=again.append) == []
    assert again == [f"sarvit study s: 2 runs (2 finished, 0 to resume, 0 new), 1 at a time; runs in {study.runs_dir}"]
    assert [RunFolder(r.folder).summary.stat().st_mtime_ns for r in study.runs] == stamps


def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path):
    data = make_image_folder(tmp_path / "data")
    # batch 64 > the 48 training images: the second method's runs stop with a clear error
    study = load_study(tiny_study(tmp_path, data, seeds=[0], methods={"ok": {"sar": False}, "bad": {"batch_size": 64}},
                                  baseline="ok"), tmp_path / "out")
    lines = []
    failed = run_study(study, say=lines.append)
    assert [r.method for r in failed] == ["bad"]
    assert status_of(study.runs[0]) == "finished"
    report = next(line for line in lines if "FAILED bad" in line)
    assert "fewer than one batch of 64" in report  # the log's last lines come with it


@pytest.mark.slow
def test_a_killed_study_resumes_its_interrupted_run_and_skips_finished_ones(tmp_path):
    data = make_image_folder(tmp_path / "data", train=30)  # 120 images: 15 steps an epoch
    spec = tiny_study(tmp_path, data, epochs=2, seeds=[0], methods={"SAR": {"checkpoint_interval": 1}}, baseline="SAR")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*python_cli(), "study", str(spec), "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    study = load_study(spec, out)
    folder = RunFolder(study.runs[0].folder)
    deadline = time.monotonic() + 120
    while not list(folder.root.glob("checkpoints/step-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted" in output and "Run the same command again" in output
    assert status_of(study.runs[0]) == "interrupted"  # a checkpoint, no summary
    again = subprocess.run([*python_cli(), "study", str(spec), "--output", str(out)], capture_output=True, text=True,
                           env=env, timeout=300)
    assert "1 to resume" in again.stdout and "resuming SAR | seed 0" in again.stdout
    assert status_of(study.runs[0]) == "finished"
    rows = [json.loads(line) for line in folder.metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows if "epoch" in r] == [1, 2]
    log = (study.runs_dir / "logs" / f"{study.runs[0].id}.log").read_text()
    assert "resuming from" in log


def test_cli_lists_runs_with_their_commands_and_refuses_bad_options(tmp_path):
    spec = write_study(tmp_path / "s.yaml", options={"per_class": 10})
    listed = subprocess.run([*python_cli(), "study", str(spec), "--output", str(tmp_path / "out"), "--list"],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("new ") for line in lines)
    assert "baseline | - | seed 1:" in lines[1] and "--sar false --seed 1 --output" in lines[1]
    assert not (tmp_path / "out").exists()  # listing writes nothing
    for args, message in ((["--jobs", "0"], "jobs must be >= 1; got 0"), (["--set", "epochs"], "write OPTION=VALUE"),
                          (["--set", "epochs=0"], "epochs must be >= 1; got 0"),
                          (["--devices", ","], "names no GPU")):
        bad = subprocess.run([*python_cli(), "study", str(spec), *args], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


def test_refusals_found_before_any_run(tmp_path):
    """Mistakes the review found only after hours of training are now refused at start-up."""
    spec = write_study(tmp_path / "s.yaml", options={"per_class": 10})
    # a key given twice would silently drop a method
    twice = tmp_path / "twice.yaml"
    twice.write_text(spec.read_text().replace("methods:\n", "methods:\n  SAR: {lambda: 0.1}\n", 1))
    with pytest.raises(ConfigError, match="the key 'SAR' is given twice"):
        load_study(twice)
    # two methods that train the same configuration (sar is true by default)
    with pytest.raises(ConfigError, match="methods 'a' and 'b' train the same configuration"):
        load_study(write_study(tmp_path / "same.yaml", methods={"a": {}, "b": {"sar": True}}, baseline="a"))
    with pytest.raises(ConfigError, match="two grid axes set lr"):
        load_study(write_study(tmp_path / "axes.yaml", grid={"x": {"p": {"lr": 0.1}}, "y": {"q": {"lr": 0.2}}}))
    with pytest.raises(ConfigError, match="seeds is missing"):
        load_study(write_study(tmp_path / "noseed.yaml", seeds=None))
    # values are read as the option's type: 1e-2 written as text is the run of 0.01
    a = load_study(write_study(tmp_path / "a.yaml", options={"lr": "1e-2"}), tmp_path / "oa")
    b = load_study(write_study(tmp_path / "b.yaml", options={"lr": 0.01}), tmp_path / "ob")
    assert a.runs[0].id == b.runs[0].id
    c = load_study(spec, tmp_path / "oc", extra={"epochs": "3", "per_class": "12"})  # --set wins over the file
    assert c.runs[0].options["epochs"] == 3 and c.runs[0].options["per_class"] == 12


def test_unwritable_output_missing_masks_and_a_foreign_report_are_refused_at_start(tmp_path):
    from sarvit.study.runner import check_runs

    spec = write_study(tmp_path / "s.yaml", options={"per_class": 10})
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write into --output"):
        check_runs(load_study(spec, blocker / "out"))
    masks = write_study(tmp_path / "m.yaml", options={"per_class": 10}, jaccard={"data": str(tmp_path / "nomasks")})
    with pytest.raises(ConfigError, match="jaccard.data"):
        check_runs(load_study(masks, tmp_path / "out"))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "study.txt").write_text("another\n")
    with pytest.raises(ConfigError, match="holds the report of the study 'another'"):
        check_runs(load_study(spec, tmp_path / "theirs"))
