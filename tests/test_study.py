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
            "in100_table1a_lambda", "in100_table1b_rows", "in100_table3_fractions", "in1k_table4_drloc",
            "cpu_fmnist_ssl"} <= set(names)
    from sarvit.study.spec import config_options, probe_options

    for name in names:
        study = load_study(name, extra={"data_root": "/data"} if name.startswith("in") else None)
        assert len(study.runs) == len(study.cells) * len(study.methods) * len(study.seeds)
        assert len(study.seeds) >= 3, f"{name}: a comparison needs several seeds"
        for run in study.runs:
            load_config(study.recipe, config_options(run.options), command=study.run_command)
            if study.probe is not None:
                load_config(study.probe.recipe, probe_options(study.probe, run), command="linprobe")


def test_the_ssl_study_compares_each_family_with_sar_against_its_own_baseline():
    from sarvit.study.spec import config_options

    study = load_study("cpu_fmnist_ssl")
    assert study.run_command == "pretrain" and study.probe is not None and study.cells == ["DINO", "MoCo v3"]
    seen = {}
    for run in study.runs:
        cfg = load_config(study.recipe, config_options(run.options), command="pretrain")
        seen.setdefault((run.cell, run.method), set()).add((cfg.task, cfg.sar))
    assert seen == {("DINO", "no SAR"): {("dino", False)}, ("DINO", "SAR"): {("dino", True)},
                    ("MoCo v3", "no SAR"): {("mocov3", False)}, ("MoCo v3", "SAR"): {("mocov3", True)}}
    assert study.baseline == "no SAR" and [r.seed for r in study.runs[:3]] == [0, 1, 2]


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


# --- pretrain studies: sarvit pretrain, then a linear probe ------------------------------------------


def ssl_study(tmp_path: Path, data: Path, probe_options: dict | None = None, **spec) -> Path:
    """A study of two tiny DINO runs (with and without SAR) a seed, each probed for one epoch."""
    kwargs = yaml.safe_load(TINY_MODEL[TINY_MODEL.index("--model-kwargs") + 1])
    options = {"data": str(data), "model": "vit_tiny_patch16_224", "model_kwargs": kwargs, "img_size": 16,
               "local_crop_size": 8, "local_crops_number": 2, "per_class": 12, "val_per_class": 5, "epochs": 1,
               "batch_size": 8, "out_dim": 64, "warmup_epochs": 0, "warmup_teacher_temp_epochs": 0,
               "eval_interval": 1, "device": "cpu"}
    probe = {"data": str(data), "img_size": 16, "per_class": 12, "val_per_class": 5, "n_last_blocks": 2, "epochs": 1,
             "batch_size": 8, "eval_interval": 1, "device": "cpu", **(probe_options or {})}
    base = {"command": "pretrain", "recipe": "fashion_mnist_dino_cpu", "options": options,
            "methods": {"dino": {"method": "dino", "sar": False}, "dino_sar": {"method": "dino", "sar": True}},
            "baseline": "dino", "probe": {"recipe": "fashion_mnist_linprobe_cpu", "options": probe}}
    base.update(spec)
    return write_study(tmp_path / "ssl.yaml", **base)


def test_pretrain_and_probe_commands(tmp_path):
    from sarvit.study.runner import commands_of, probe_command

    study = load_study(ssl_study(tmp_path, tmp_path / "data", {"epochs": 3}), tmp_path / "out")
    assert study.run_command == "pretrain" and len(study.runs) == 4
    run = study.runs[3]
    assert (run.method, run.seed) == ("dino_sar", 1) and run.probe == run.folder / "linprobe"
    command = train_command(study, run)
    assert command[:5] == [sys.executable, "-m", "sarvit", "pretrain", "--config"]
    assert Path(command[5]).name == "fashion_mnist_dino_cpu.yaml"
    assert command[command.index("--method") + 1] == "dino" and command[command.index("--sar") + 1] == "true"
    assert command[-4:] == ["--output", str(run.folder.resolve()), "--resume", "auto"]
    probe = probe_command(study, run)
    assert probe[:5] == [sys.executable, "-m", "sarvit", "linprobe", "--config"]
    assert Path(probe[5]).name == "fashion_mnist_linprobe_cpu.yaml"
    assert probe[probe.index("--epochs") + 1] == "3"
    assert probe[-8:] == ["--checkpoint", str(run.folder.resolve()), "--output",
                          str((run.folder / "linprobe").resolve()), "--seed", "1", "--resume", "auto"]
    assert [stage for stage, _ in commands_of(study, run)] == ["train", "probe"]
    # the commands parse: each is the configuration the study checked
    from sarvit.cli import build_parser
    from sarvit.config import FIELDS

    def parsed(argv, command):
        args = build_parser().parse_args(argv)
        return load_config(args.config, {k: v for k, v in vars(args).items() if k in FIELDS}, command=command)

    cfg = parsed(command[3:], "pretrain")
    assert (cfg.task, cfg.sar, cfg.seed, cfg.img_size, cfg.out_dim) == ("dino", True, 1, 16, 64)
    assert cfg.model_kwargs == yaml.safe_load(TINY_MODEL[TINY_MODEL.index("--model-kwargs") + 1])
    cfg = parsed(probe[3:], "linprobe")
    assert (cfg.task, cfg.pretrained, cfg.seed, cfg.epochs, cfg.n_last_blocks) == (
        "linprobe", str(run.folder.resolve()), 1, 3, 2)
    # --set probe.X sets it in every probe, --set X in every pre-training
    again = load_study(ssl_study(tmp_path, tmp_path / "data"), tmp_path / "out", extra={"probe.epochs": "4",
                                                                                        "epochs": "2"})
    assert again.probe.options["epochs"] == 4 and again.runs[0].options["epochs"] == 2
    assert again.runs[0].id != study.runs[0].id


@pytest.mark.parametrize("spec, message", [
    ({"probe": {"recipe": "fashion_mnist_linprobe_cpu", "options": {"epochs": 0}}},
     "probe: epochs must be >= 1; got 0"),
    ({"probe": {"recipe": "fashion_mnist_linprobe_cpu", "options": {"seed": 3}}}, "'seed' is set by the study itself"),
    ({"probe": {"recipe": "fashion_mnist_linprobe_cpu", "options": {"checkpoint": "x"}}},
     "'checkpoint' is set by the study itself"),
    ({"probe": {"recipe": "fashion_mnist_linprobe_cpu", "options": {"mixup": 0.5}}},
     "not an option of `sarvit linprobe`"),
    ({"probe": {"options": {}}}, "probe.recipe must name a sarvit linprobe recipe"),
    ({"probe": {"recipe": "fashion_mnist_linprobe_cpu", "epochs": 3}}, "probe: unknown key(s) epochs"),
    ({"command": "finetune"}, "command must be one of train, pretrain"),
    ({"command": "train"}, "probe: only a pretrain study"),
    ({"methods": {"x": {"method": "supervised"}}, "baseline": "x"}, "task supervised is `sarvit train`'s"),
    ({"methods": {"x": {"mixup": 0.2}}, "baseline": "x"}, "not an option of `sarvit pretrain --method"),
])
def test_bad_pretrain_studies_are_refused_before_anything_runs(tmp_path, spec, message):
    with pytest.raises(ConfigError) as err:
        load_study(ssl_study(tmp_path, tmp_path / "data", **spec), tmp_path / "out")
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_probe_option_only_the_libraries_refuse_stops_the_study_with_nothing_written(tmp_path, capsys):
    from sarvit.cli import main

    spec = ssl_study(tmp_path, make_image_folder(tmp_path / "data"), {"model": "no_such_model"})
    capsys.readouterr()
    assert main(["study", str(spec), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "probe:" in err and "no_such_model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ssl_runs(tmp_path_factory):
    """The tiny pretrain study, run once: 2 methods x 2 seeds, each pre-trained and probed for one epoch."""
    root = tmp_path_factory.mktemp("ssl")
    data = make_image_folder(root / "data", val=20)  # 80 probe images: top-1 in steps of 1.25
    # a slow probe (lr 0.003, one epoch) stops at a different top-1 for each backbone: a difference with a spread
    study = load_study(ssl_study(root, data, {"val_per_class": None, "lr": 0.003}, seeds=[0, 1],
                                 attention={"images": 2}), root / "out")
    lines = []
    failed = run_study(study, jobs=2, threads=1, say=lines.append)
    return study, failed, lines


def test_a_pretrain_study_pretrains_then_probes_every_run(ssl_runs):
    study, failed, lines = ssl_runs
    assert failed == [] and all(status_of(r) == "finished" for r in study.runs)
    for run in study.runs:
        saved = yaml.safe_load(RunFolder(run.folder).config.read_text())
        assert (saved["task"], saved["sar"], saved["seed"]) == ("dino", run.method == "dino_sar", run.seed)
        probe = yaml.safe_load(RunFolder(run.probe).config.read_text())
        assert (probe["task"], probe["seed"], probe["epochs"]) == ("linprobe", run.seed, 1)
        assert Path(probe["pretrained"]) == run.folder.resolve()
        log = (study.runs_dir / "logs" / f"{run.id}.log").read_text()
        assert log.count("-m sarvit pretrain ") == log.count("-m sarvit linprobe ") == 1
        assert log.index("-m sarvit pretrain ") < log.index("-m sarvit linprobe ")  # one log, pre-training first
    assert sum("probing" in line for line in lines) == 4
    assert any(line.startswith("[") and "finished dino_sar | seed 1" in line and "probe top-1" in line
               for line in lines)


def test_a_finished_run_with_an_unfinished_probe_is_completed_without_retraining(ssl_runs):
    study, _, _ = ssl_runs
    gone, cut = study.runs[0], study.runs[3]
    import shutil

    shutil.rmtree(gone.probe)  # never probed
    RunFolder(cut.probe).summary.unlink()  # probed up to its last checkpoint, then stopped
    pretrain_stamps = {r.id: (RunFolder(r.folder).summary.stat().st_mtime_ns, RunFolder(r.folder).metrics.read_text())
                       for r in study.runs}
    assert status_of(gone) == status_of(cut) == "interrupted"
    lines = []
    assert run_study(study, say=lines.append) == []
    assert "4 runs (2 finished, 2 to resume, 0 new)" in lines[0]
    assert sum("probing" in line for line in lines) == 2 and not any("starting" in line for line in lines)
    assert all(status_of(r) == "finished" for r in study.runs)
    for r in study.runs:  # no pre-training ran again
        assert (RunFolder(r.folder).summary.stat().st_mtime_ns, RunFolder(r.folder).metrics.read_text()) \
            == pretrain_stamps[r.id]
    for run in (gone, cut):
        log = (study.runs_dir / "logs" / f"{run.id}.log").read_text()
        assert log.count("-m sarvit pretrain ") == 1 and log.count("-m sarvit linprobe ") == 2


def test_a_probe_edited_after_it_ran_is_refused_at_start(ssl_runs, tmp_path):
    from sarvit.study.runner import check_runs

    study, _, _ = ssl_runs
    edited = dataclasses.replace(study, probe=dataclasses.replace(study.probe, options={**study.probe.options,
                                                                                          "epochs": 2}))
    with pytest.raises(ConfigError, match=r"was made with other options \(epochs 1 -> 2\)"):
        check_runs(edited)
    check_runs(study)  # the options it was made with


def test_the_report_of_a_pretrain_study_holds_the_probes_numbers(ssl_runs, tmp_path):
    import csv
    import math

    import numpy as np
    from scipy import stats

    from sarvit.study.report import write_report

    study, _, _ = ssl_runs
    path = write_report(study, tmp_path / "report")
    probe = {r.id: json.loads(RunFolder(r.probe).summary.read_text())["final"] for r in study.runs}
    pretrain = {r.id: json.loads(RunFolder(r.folder).summary.read_text()) for r in study.runs}
    rows = {row["id"]: row for row in csv.DictReader(open(path.parent / "runs.csv"))}
    for run in study.runs:  # every digit, as the runs wrote them
        row = rows[run.id]
        assert row["status"] == row["probe_status"] == "finished"
        assert float(row["probe_val_top1"]) == probe[run.id]["top1"]
        assert float(row["probe_val_top5"]) == probe[run.id]["top5"]
        assert float(row["final_val_knn_top1"]) == pretrain[run.id]["final"]["knn_top1"]
        assert float(row["best_val_knn_top1"]) == pretrain[run.id]["best_knn_top1"]
        assert float(row["final_val_se"]) == pretrain[run.id]["final"]["se"]
    text = path.read_text()
    table = text.split("### all runs")[1].split("\n\n")[1]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
             for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")}

    def of(method, value):
        return [value(r) for r in study.runs if r.method == method]  # seeds 0, 1 in order

    base, sar = of("dino", lambda r: probe[r.id]["top1"]), of("dino_sar", lambda r: probe[r.id]["top1"])
    assert cells["dino"][2] == f"{np.mean(base):.2f} ± {np.std(base, ddof=1):.2f}"
    assert cells["dino_sar"][2] == f"{np.mean(sar):.2f} ± {np.std(sar, ddof=1):.2f}"
    test = stats.ttest_rel(sar, base)
    mean = np.mean(np.subtract(sar, base))
    interval = test.confidence_interval(0.95)
    if math.isnan(interval.low):  # the same difference on both seeds: no interval
        assert cells["dino_sar"][3] == f"{mean:+.2f} [n/a: the same on every seed]"
    else:
        assert cells["dino_sar"][3] == f"{mean:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"
    assert cells["dino_sar"][5] == ("n/a" if math.isnan(test.pvalue) else f"{test.pvalue:.3g}")
    assert cells["dino_sar"][4] == "2" and cells["dino"][3] == "(baseline)"
    knn = of("dino", lambda r: pretrain[r.id]["final"]["knn_top1"])
    assert cells["dino"][6] == f"{np.mean(knn):.2f} ± {np.std(knn, ddof=1):.2f}"
    assert not math.isnan(float(cells["dino_sar"][10].split()[0]))  # the backbone's SE
    figures = sorted(p.name for p in (path.parent / "figures").glob("*.png"))
    assert figures == ["attention.png", "curves-01-all.png"]
    assert "probed by `sarvit linprobe`" in text and "Spatial entropy per head" not in text


# --- transfer stages: sarvit detect / sarvit segment on every run's weights ----------------------------

TRANSFER = {"detect": {"recipe": "stamps_detect_cpu", "options": {"epochs": 3, "dense_size": 64}},
            "segment": {"recipe": "stamps_segment_cpu"}}


def test_transfer_stages_and_their_exact_commands(tmp_path):
    from sarvit.cli import build_parser
    from sarvit.config import FIELDS
    from sarvit.study.runner import all_commands, stage_command

    plain = load_study(write_study(tmp_path / "plain.yaml"), tmp_path / "out")
    study = load_study(write_study(tmp_path / "s.yaml", transfer=TRANSFER), tmp_path / "out")
    assert [(s.command, Path(s.recipe).name, s.options) for s in study.transfer] == [
        ("detect", "stamps_detect_cpu.yaml", {"epochs": 3, "dense_size": 64}),
        ("segment", "stamps_segment_cpu.yaml", {})]
    # the training runs are those of the same study without transfer: studies share them
    assert [r.id for r in study.runs] == [r.id for r in plain.runs]
    run = study.runs[3]
    assert (run.method, run.seed) == ("SAR", 1)
    assert run.stages == {"detect": run.folder / "detect", "segment": run.folder / "segment"}
    detect = str(resources.files("sarvit").joinpath("configs", "stamps_detect_cpu.yaml"))
    segment = str(resources.files("sarvit").joinpath("configs", "stamps_segment_cpu.yaml"))
    folder = str(run.folder.resolve())
    assert stage_command(study, run, study.transfer[0]) == [
        sys.executable, "-m", "sarvit", "detect", "--config", str(Path(detect).resolve()), "--epochs", "3",
        "--dense-size", "64", "--backbone", folder, "--output", folder + "/detect", "--seed", "1", "--resume", "auto"]
    assert stage_command(study, run, study.transfer[1], torchrun=2) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "sarvit", "segment",
        "--config", str(Path(segment).resolve()), "--backbone", folder, "--output", folder + "/segment", "--seed", "1",
        "--resume", "auto"]
    assert [stage for stage, _ in all_commands(study, run)] == ["train", "detect", "segment"]
    # the command parses into the configuration the study checked
    args = build_parser().parse_args(stage_command(study, run, study.transfer[0])[3:])
    cfg = load_config(args.config, {k: v for k, v in vars(args).items() if k in FIELDS}, command="detect")
    assert (cfg.task, cfg.pretrained, cfg.seed, cfg.epochs, cfg.dense_size, cfg.output) == (
        "detect", folder, 1, 3, 64, folder + "/detect")
    # --set detect.X / segment.X set it in every such stage, over the file's options; runs are untouched
    again = load_study(write_study(tmp_path / "s.yaml", transfer=TRANSFER), tmp_path / "out",
                       extra={"detect.epochs": "2", "segment.epochs": "7", "epochs": "4"})
    assert again.transfer[0].options == {"epochs": 2, "dense_size": 64}
    assert again.transfer[1].options == {"epochs": 7} and again.runs[0].options["epochs"] == 4


@pytest.mark.parametrize("transfer, extra, message", [
    ({"classify": {"recipe": "stamps_detect_cpu"}}, None,
     "transfer: unknown stage(s) classify; a stage is one of detect, segment"),
    ({"detect": {"options": {"epochs": 2}}}, None, "transfer.detect.recipe must name a sarvit detect recipe"),
    ({"detect": {"recipe": "stamps_detect_cpu", "epochs": 2}}, None, "transfer.detect: unknown key(s) epochs"),
    ({"detect": {"recipe": "stamps_detect_cpu", "options": {"epochs": 0}}}, None,
     "transfer.detect: epochs must be >= 1; got 0"),
    ({"segment": {"recipe": "stamps_segment_cpu", "options": {"dense_size": 16}}}, None,
     "transfer.segment: dense_size must be in [32, 4096]"),
    ({"segment": {"recipe": "stamps_segment_cpu", "options": {"dense_rois": 64}}}, None,
     "not an option of `sarvit segment`"),
    ({"detect": {"recipe": "stamps_segment_cpu"}}, None, "task segment is `sarvit segment`'s, not `sarvit detect`'s"),
    ({"detect": {"recipe": "stamps_detect_cpu", "options": {"backbone": "runs/x"}}}, None,
     "transfer.detect.options: 'backbone' is set by the study itself"),
    ({"segment": {"recipe": "stamps_segment_cpu", "options": {"pretrained": "runs/x"}}}, None,
     "transfer.segment.options: 'pretrained' is set by the study itself"),
    ({"detect": {"recipe": "stamps_detect_cpu", "options": {"seed": 3}}}, None, "'seed' is set by the study itself"),
    ({"detect": {"recipe": "stamps_detect_cpu", "options": {"output": "o"}}}, None,
     "'output' is set by the study itself"),
    ({"detect": {"recipe": "stamps_detect_cpu", "options": {"resume": "auto"}}}, None,
     "'resume' is set by the study itself"),
    ({}, None, "transfer: name at least one stage (detect, segment)"),
    ({"segment": {"recipe": "stamps_segment_cpu"}}, {"detect.epochs": "2"},
     "--set detect.epochs: the study has no transfer.detect stage"),
    ({"detect": {"recipe": "stamps_detect_cpu"}}, {"detect.epochz": "2"}, "--set detect: unknown option 'epochz'"),
    ({"detect": {"recipe": "stamps_detect_cpu"}}, {"detect.backbone": "x"}, "'backbone' is set by the study itself"),
])
def test_bad_transfer_sections_are_refused_before_anything_runs(tmp_path, transfer, extra, message):
    with pytest.raises(ConfigError) as err:
        load_study(write_study(tmp_path / "s.yaml", transfer=transfer), tmp_path / "out", extra=extra)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--set segment.epochs: the study has no transfer.segment stage"):
        load_study(write_study(tmp_path / "plain.yaml"), tmp_path / "out", extra={"segment.epochs": "2"})


def test_a_pretrain_study_probes_then_transfers(tmp_path):
    from sarvit.study.runner import commands_of

    study = load_study(ssl_study(tmp_path, tmp_path / "data", transfer={"segment": {"recipe": "stamps_segment_cpu"}}),
                       tmp_path / "out")
    run = study.runs[0]
    assert run.stages == {"segment": run.folder / "segment"} and run.probe == run.folder / "linprobe"
    assert [stage for stage, _ in commands_of(study, run)] == ["train", "probe", "segment"]


def _summary(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text("{}")


def test_a_run_is_finished_only_with_every_stage_and_an_interrupted_stage_resumes(tmp_path):
    from sarvit.study.runner import commands_of

    study = load_study(write_study(tmp_path / "s.yaml", transfer=TRANSFER, seeds=[0]), tmp_path / "out")
    run = study.runs[0]
    assert status_of(run) == "new" and [s for s, _ in commands_of(study, run)] == ["train", "detect", "segment"]
    _summary(run.folder)  # trained, no stage yet
    assert status_of(run) == "interrupted" and [s for s, _ in commands_of(study, run)] == ["detect", "segment"]
    (run.folder / "detect" / "checkpoints" / "step-00000004").mkdir(parents=True)  # detect stopped mid-way
    assert status_of(run) == "interrupted"
    todo = commands_of(study, run)
    assert [s for s, _ in todo] == ["detect", "segment"]
    assert todo[0][1][-6:] == ["--output", str((run.folder / "detect").resolve()), "--seed", "0", "--resume", "auto"]
    _summary(run.folder / "detect")
    assert status_of(run) == "interrupted" and [s for s, _ in commands_of(study, run)] == ["segment"]
    _summary(run.folder / "segment")
    assert status_of(run) == "finished" and commands_of(study, run) == []
    (run.folder / "summary.json").unlink()  # stages cannot stand for an unfinished training
    assert status_of(run) == "interrupted" and [s for s, _ in commands_of(study, run)] == ["train"]


DENSE_FAST = {"dense_size": 32, "dense_channels": 8, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "workers": 0,
              "device": "cpu", "epochs": 1}


@pytest.mark.slow
def test_a_study_trains_then_fine_tunes_and_a_failed_stage_lets_the_other_run(tmp_path):
    """One tiny training, then detect (first on missing data: it fails) and segment; the second pass runs only
    the failed stage."""
    from tests.dense_fixtures import write_coco, write_masks

    from sarvit.study.report import write_report

    data = make_image_folder(tmp_path / "data")
    coco, masks = write_coco(tmp_path / "coco", train=8, val=4), write_masks(tmp_path / "masks", train=8, val=4)
    transfer = {"detect": {"recipe": "stamps_detect_cpu", "options": {**DENSE_FAST, "data": f"coco_json:{coco}"}},
                "segment": {"recipe": "stamps_segment_cpu", "options": {**DENSE_FAST, "data": f"masks:{masks}"}}}
    spec = tiny_study(tmp_path, data, seeds=[0], methods={"SAR": {}}, baseline="SAR", transfer=transfer)
    broken = load_study(spec, tmp_path / "out", extra={"detect.data": f"coco_json:{tmp_path / 'nothing'}"})
    run = broken.runs[0]
    lines = []
    assert run_study(broken, say=lines.append) == [run]
    assert any("FAILED SAR | seed 0 (its detect stage)" in line for line in lines)
    assert RunFolder(run.folder).summary.is_file() and RunFolder(run.stages["segment"]).summary.is_file()
    assert not RunFolder(run.stages["detect"]).summary.is_file() and status_of(run) == "interrupted"
    trained = {p: RunFolder(p).summary.stat().st_mtime_ns for p in (run.folder, run.stages["segment"])}
    study = load_study(spec, tmp_path / "out")
    lines = []
    assert run_study(study, say=lines.append) == []
    assert "1 run (0 finished, 1 to resume, 0 new)" in lines[0]
    assert status_of(run) == "finished"
    assert {p: RunFolder(p).summary.stat().st_mtime_ns for p in trained} == trained  # nothing ran twice
    log = (study.runs_dir / "logs" / f"{run.id}.log").read_text()
    assert [log.count(f"-m sarvit {c} ") for c in ("train", "detect", "segment")] == [1, 2, 1]
    for command, key in (("detect", "map_50"), ("segment", "miou")):
        saved = yaml.safe_load(RunFolder(run.stages[command]).config.read_text())
        assert (saved["task"], saved["seed"], saved["epochs"]) == (command, 0, 1)
        assert Path(saved["pretrained"]) == run.folder.resolve()
    # the report: each stage's final value (its summary, in %), its predictions copied beside the report
    report = write_report(study, tmp_path / "report")
    text = report.read_text()
    for command, key, title in (("detect", "map_50", "### Detection"), ("segment", "miou", "### Semantic")):
        final = json.loads(RunFolder(run.stages[command]).summary.read_text())["final"][key]
        row = next(line for line in text.split(title)[1].splitlines() if line.startswith("| SAR |"))
        assert row.split("|")[3].strip() == f"{100 * final:.2f} ± n/a"
        figure = tmp_path / "report" / "figures" / f"{command}-SAR-seed0.png"
        assert figure.read_bytes() == (run.stages[command] / "predictions.png").read_bytes()
        assert f"(figures/{command}-SAR-seed0.png)" in text


def test_stage_data_that_do_not_exist_are_refused_before_any_training(tmp_path):
    from sarvit.study.runner import check_runs

    study = load_study(write_study(tmp_path / "s.yaml", transfer=TRANSFER, seeds=[0]), tmp_path / "out",
                       extra={"detect.data": f"coco_json:{tmp_path / 'nothing'}"})
    with pytest.raises(ConfigError, match=r"transfer\.detect: .*nothing"):
        check_runs(study)
    assert not study.runs_dir.exists()


def test_a_stage_folder_made_with_other_options_is_refused_at_start(tmp_path, capsys):
    from sarvit.config import to_dict
    from sarvit.dense.tasks import check_dense_config
    from sarvit.pretrained import backbone_architecture
    from sarvit.study.runner import check_runs
    from sarvit.study.spec import stage_options
    from tests.dense_fixtures import write_backbone_run, write_coco, write_masks

    coco, masks = write_coco(tmp_path / "coco", train=4, val=2), write_masks(tmp_path / "masks", train=4, val=2)
    study = load_study(write_study(tmp_path / "s.yaml", transfer=TRANSFER, seeds=[0]), tmp_path / "out",
                       extra={"detect.data": f"coco_json:{coco}", "segment.data": f"masks:{masks}"})
    run, detect = study.runs[1], study.transfer[0]
    write_backbone_run(run.folder)  # what the stage fine-tunes: a tiny ViT, its architecture in its metadata

    def made_with(options: dict) -> None:  # config.yaml as `sarvit detect` writes it (data made absolute)
        cfg = backbone_architecture(check_dense_config(load_config(
            detect.recipe, {**stage_options(detect, run), **options}, command="detect")))
        run.stages["detect"].mkdir(parents=True, exist_ok=True)
        RunFolder(run.stages["detect"]).config.write_text(yaml.safe_dump(to_dict(cfg)))

    import os

    spelled = os.path.relpath(run.folder)  # the same backbone, spelled otherwise
    made_with({"epochs": 5, "workers": 0, "pretrained": spelled})
    with pytest.raises(ConfigError, match=r"the detect stage .*/detect was made with other options \(epochs 5 -> 3\)"):
        check_runs(study)
    from sarvit.cli import main

    capsys.readouterr()  # nor reported under epochs 3 by --report-only
    assert main(["study", str(tmp_path / "s.yaml"), "--output", str(tmp_path / "out"), "--report-only",
                 "--set", f"detect.data=coco_json:{coco}", "--set", f"segment.data=masks:{masks}"]) == 2
    assert "was made with other options (epochs 5 -> 3)" in capsys.readouterr().err
    made_with({"workers": 0, "pretrained": spelled})  # what a study need not match: workers, the path spelling
    check_runs(study)


def test_the_dense_study_adds_stages_to_the_runs_of_the_jaccard_study():
    from sarvit.study.spec import stage_options

    dense, jaccard = load_study("cpu_stamps_dense"), load_study("cpu_stamps_jaccard")
    assert [(r.id, r.method, r.seed, r.options) for r in dense.runs] == \
        [(r.id, r.method, r.seed, r.options) for r in jaccard.runs]
    assert (dense.recipe, dense.baseline, dense.methods, dense.seeds) == (
        jaccard.recipe, jaccard.baseline, jaccard.methods, jaccard.seeds)
    assert not dense.attention and not dense.jaccard
    assert [(s.command, Path(s.recipe).name, s.options) for s in dense.transfer] == [
        ("detect", "stamps_detect_cpu.yaml", {}), ("segment", "stamps_segment_cpu.yaml", {})]
    for run in dense.runs:
        assert run.stages == {"detect": run.folder / "detect", "segment": run.folder / "segment"}
        for stage in dense.transfer:
            cfg = load_config(stage.recipe, stage_options(stage, run), command=stage.command)
            assert (cfg.task, cfg.pretrained, cfg.seed) == (stage.command, str(run.folder), run.seed)
