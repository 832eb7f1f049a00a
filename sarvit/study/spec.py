"""A study file: a grid of ``sarvit train`` (or ``sarvit pretrain``) runs, expanded into runs with
stable folders.

    name: fmnist_methods
    title: SAR against the baselines on Fashion-MNIST
    recipe: fashion_mnist_cpu          # a shipped recipe's name, or a path relative to this file
    options: {epochs: 20}              # set in every run
    baseline: baseline                 # compared with every other method, paired by seed
    methods:                           # the rows of the table: a label and the options it sets
      baseline: {sar: false}
      SAR: {}
    grid:                              # further axes; every cell runs every method
      data size:                       # labelled cells ...
        100/class: {per_class: 100}
        500/class: {per_class: 500, epochs: 8}
      lambda: [0.001, 0.01]            # ... or the values of one option ("lambda=0.001")
    seeds: [0, 1, 2]
    attention: {images: 6}             # optional: the attention figure (cell, seed: which runs)
    jaccard: {data: data/stamps}       # optional: Jaccard against the masks of this data
    heads: true                        # optional: spatial entropy and components of every head
    runs: runs                         # optional: where run folders live, relative to the output
                                       # (``sarvit study --runs DIR`` overrides it)
    command: train                     # optional: train (the default) or pretrain

A self-supervised study (``command: pretrain``) runs ``sarvit pretrain`` with a pretrain
recipe; a method's ``method`` option is the ``--method`` flag (dino, mocov3). With a
``probe`` section every pre-trained backbone then gets a linear probe (``sarvit linprobe``,
in ``RUN/linprobe``, the run's seed), and the probe's final top-1 heads the report:

    command: pretrain
    recipe: fashion_mnist_dino_cpu
    methods: {no SAR: {sar: false}, SAR: {sar: true}}
    baseline: no SAR
    grid:                              # one cell per method family: each SAR run is compared
      family:                          # with the run of its own family (paired by seed)
        DINO: {method: dino}
        MoCo v3: {method: mocov3}
    seeds: [0, 1, 2]
    probe:
      recipe: fashion_mnist_linprobe_cpu
      options: {epochs: 20}            # set in every probe (``--set probe.epochs=5`` overrides)

A ``transfer`` section (in a train or a pretrain study) fine-tunes every run's weights for
dense prediction once its training (and probe) finished: ``sarvit detect`` (Mask R-CNN on
the ViTDet simple feature pyramid, Table 5) in ``RUN/detect`` and ``sarvit segment`` (a
semantic FPN head, Table 6) in ``RUN/segment``, each with the run's seed; the report gets a
table per stage (box mAP@0.5, mIoU) with the paired differences to the baseline:

    transfer:                          # keys: detect, segment (either or both)
      detect: {recipe: stamps_detect_cpu, options: {epochs: 4}}   # --set detect.epochs=2 overrides
      segment: {recipe: stamps_segment_cpu}

The study sets each stage's ``backbone`` (the run's folder), ``output``, ``seed`` and
``resume`` itself; the recipe's data must hold instances (detect) or masks (segment).

Comparisons pair runs of one grid cell, so the cells are how a study with several
baselines is written: one cell per baseline (here per method family), the same methods in
each. A single ``baseline`` compares every method with that one.

A run's folder name is a readable slug of the options it sets plus a hash of those
options and of the recipe's text: the same run in two studies (rows A, C and F of
Table 1(b) are also the baseline, "C" and SAR of the methods study) shares one folder
when both studies point ``runs`` at the same place, and editing an option makes a
new run instead of clashing with a finished one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..config import (ConfigError, field_name, load_config, parse_value, read_recipe, recipe_path, shown_name,
                      to_dict, yaml_problem)

__all__ = ["Run", "Probe", "Stage", "Study", "load_study", "run_id", "study_path", "config_options",
           "probe_options", "stage_options", "PROBE_FOLDER", "TRANSFER_COMMANDS"]

# options a study decides itself: each run's folder, resuming, and the seed of each run
RESERVED = {"output", "resume", "extend", "seed"}
KEYS = {"name", "title", "description", "recipe", "options", "baseline", "methods", "grid", "seeds", "attention",
        "jaccard", "heads", "runs", "command", "probe", "transfer"}
COMMANDS = ("train", "pretrain")  # what a study's runs are
PROBE_FOLDER = "linprobe"  # a pre-training run's probe lies in RUN/linprobe
PROBE_KEYS = {"recipe", "options"}
TRANSFER_COMMANDS = ("detect", "segment")  # the dense stages of a transfer section; RUN/<command> is a stage's folder
# options naming the weights a stage starts from: the study gives each probe or stage its run's folder
BACKBONE_KEYS = {"linprobe": ("checkpoint", "pretrained"), "detect": ("backbone", "pretrained"),
                 "segment": ("backbone", "pretrained")}
METHOD = "method"  # the pretrain option that chooses DINO or MoCo v3: the field ``task``, the flag --method


@dataclass(frozen=True)
class Run:
    id: str  # folder name under the study's runs folder
    method: str  # the method's label
    cell: str  # the grid cell's label ("" without a grid)
    seed: int
    options: dict  # every option the run sets on top of the recipe (study options, cell, method, seed)
    folder: Path
    probe: Path | None = None  # the folder of its linear probe (a pretrain study with a probe)
    stages: dict = field(default_factory=dict)  # transfer command (detect, segment) -> its folder, RUN/<command>


@dataclass(frozen=True)
class Probe:
    """The linear probe of every run of a pretrain study: ``sarvit linprobe --config recipe``."""

    recipe: str  # path of the probe's recipe
    options: dict  # what every probe sets on top of it (not the checkpoint, output or seed: the run's)


@dataclass(frozen=True)
class Stage:
    """A transfer stage of every run: ``sarvit <command> --config recipe --backbone RUN``."""

    command: str  # detect | segment
    recipe: str  # path of the stage's recipe
    options: dict  # what every stage of this command sets on top of it (not the backbone, output or seed)


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    description: str
    recipe: str  # path of the base recipe
    methods: list[str]
    baseline: str
    cells: list[str]
    seeds: list[int]
    runs: list[Run]  # cell-major, then method, then seed
    command: str = ""
    attention: dict = field(default_factory=dict)
    jaccard: dict = field(default_factory=dict)
    heads: bool = False  # a table of every head's spatial entropy and components
    options: dict = field(default_factory=dict)  # what every run sets on top of the recipe
    runs_dir: Path | None = None  # where the run folders lie
    output: Path | None = None  # the report folder
    run_command: str = "train"  # train | pretrain: the sarvit command of every run
    probe: Probe | None = None  # pretrain studies: the linear probe of every run
    transfer: tuple = ()  # the Stage of every transfer command, in the file's order


def _problem(path: Path, text: str) -> ConfigError:
    return ConfigError(f"study {path}: {text}")


def _mapping(path: Path, where: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _problem(path, f"{where} must be a mapping of option: value; got {value!r}")
    return value


def _options(path: Path, where: str, value: Any, command: str = "train") -> dict[str, Any]:
    """A mapping of ``sarvit <command>`` options, keys spelled as in recipes (``lambda``, ``per_class``;
    ``method`` for pretrain), values read as the option's type (``"1e-2"`` and ``0.01`` are one value,
    so one run)."""
    out = {}
    for key, item in _mapping(path, where, value).items():
        if str(key).replace("-", "_") in BACKBONE_KEYS.get(command, ()):
            what = "probe" if command == "linprobe" else f"{command} stage"
            raise _problem(path, f"{where}: {key!r} is set by the study itself (each {what} reads its run's "
                                 "backbone); remove it")
        try:
            if command == "pretrain" and str(key) in (METHOD, "task"):
                name, item = "task", parse_value("task", item) if item is not None else None
                out[METHOD] = item
                continue
            name = field_name(key)
            item = parse_value(name, item) if item is not None else None
        except ConfigError as err:
            raise _problem(path, f"{where}: {err}") from None
        if isinstance(item, tuple):
            item = list(item)
        if name in RESERVED:
            raise _problem(path, f"{where}: {shown_name(name)!r} is set by the study itself (seeds: the seeds list; "
                                 "output/resume: each run's folder); remove it")
        out[shown_name(name)] = item
    return out


def _cells(path: Path, grid: Any, command: str = "train") -> list[tuple[str, dict]]:
    """``grid`` -> ``[(label, options)]``, the product of its axes in file order."""
    axes = []
    for axis, values in _mapping(path, "grid", grid).items():
        if isinstance(values, dict) and values:
            axes.append([(str(label), _options(path, f"grid.{axis}.{label}", opts, command))
                         for label, opts in values.items()])
        elif isinstance(values, list) and values:
            name = _options(path, f"grid.{axis}", {axis: None}, command)  # the axis must be an option
            key = next(iter(name))
            axes.append([(f"{key}={'none' if v is None else v}", {key: v}) for v in values])
        else:
            raise _problem(path, f"grid.{axis} must be a non-empty list of values of the option {axis!r}, or a "
                                 "mapping of cell label: options")
    cells = []
    for combo in itertools.product(*axes):
        label = ", ".join(lab for lab, _ in combo)
        merged: dict[str, Any] = {}
        for _, opts in combo:
            twice = sorted(set(merged) & set(opts))
            if twice:
                raise _problem(path, f"two grid axes set {', '.join(twice)}; give each option to one axis")
            merged.update(opts)
        cells.append((label, merged))
    return cells or [("", {})]


def _seeds(path: Path, seeds: Any) -> list[int]:
    if seeds is None:
        raise _problem(path, "seeds is missing: list the seeds every method runs with, e.g. seeds: [0, 1, 2] "
                             "(a difference needs at least two)")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            and s >= 0 for s in seeds):
        raise _problem(path, f"seeds must be a non-empty list of integers >= 0; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _problem(path, f"seeds repeat a value: {seeds}")
    return list(seeds)


# the options that tell runs apart most often come first in a run's folder name
_FIRST = ("seed", "method", "objective", "sar", "layout", "lambda", "per_class", "train_fraction", "model", "data")


def _slug(options: dict[str, Any]) -> str:
    parts = []
    order = {key: i for i, key in enumerate(_FIRST)}
    for key, value in sorted(options.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        parts.append(f"{key}-{text}")
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(parts)).strip("_")
    return slug[:90].rstrip("_-") or "recipe"


def run_id(recipe_text: str, options: dict[str, Any]) -> str:
    """``<slug of the options>-<8 hex digits>``: the hash covers the options and the recipe's text."""
    blob = json.dumps({"recipe": recipe_text, "options": options}, sort_keys=True, default=str)
    return f"{_slug(options)}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def study_path(spec: str | Path) -> Path:
    """A study file given as a path, or by the name of a study shipped in ``sarvit/studies``."""
    path = Path(spec).expanduser()
    if path.exists() or path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        return path
    shipped = resources.files("sarvit").joinpath("studies", f"{str(spec).removesuffix('.yaml')}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name.removesuffix(".yaml") for p in resources.files("sarvit").joinpath("studies").iterdir()
                   if p.name.endswith(".yaml"))
    raise ConfigError(f"study {str(spec)!r} is neither a file nor a shipped study; shipped studies: {', '.join(names)}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read(path: Path) -> dict:
    try:
        loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"study file {path} does not exist; give the path of a study YAML file "
                          "or the name of a shipped study") from None
    except IsADirectoryError:
        raise ConfigError(f"study file {path} is a folder; give the path of a study YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"study {path}: malformed YAML at {yaml_problem(err)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"study {path} is not a text file; a study is a YAML mapping") from None
    if not isinstance(loaded, dict):
        raise _problem(path, "a study is a YAML mapping with name, recipe, methods, baseline, seeds, ...")
    unknown = sorted(set(loaded) - KEYS)
    if unknown:
        raise _problem(path, f"unknown key(s) {', '.join(map(str, unknown))}; a study has {', '.join(sorted(KEYS))}")
    return loaded


def _recipe(path: Path, recipe: Any) -> Path:
    if not isinstance(recipe, str) or not recipe:
        raise _problem(path, "recipe must name a sarvit train recipe (a shipped recipe's name or a YAML path)")
    local = (path.parent / recipe).expanduser()
    return local if local.is_file() else recipe_path(recipe)


_WEIGHTS = ("best", "last", "best_ema")
_FIGURE_KEYS = {"attention": {"images", "cell", "seed", "which", "img_size"},
                "jaccard": {"data", "data_root", "img_size", "which"}}


def _figure_options(path: Path, key: str, value: Any, cells: list[str], seeds: list[int]) -> dict:
    """The ``attention`` / ``jaccard`` sections, checked now rather than when the report is written."""
    options = dict(_mapping(path, key, value))
    unknown = sorted(set(map(str, options)) - _FIGURE_KEYS[key])
    if unknown:
        raise _problem(path, f"{key}: unknown key(s) {', '.join(unknown)}; it takes {', '.join(sorted(_FIGURE_KEYS[key]))}")

    def whole(name: str, low: int) -> None:
        item = options.get(name)
        if item is not None and (not isinstance(item, int) or isinstance(item, bool) or item < low):
            raise _problem(path, f"{key}.{name} must be a whole number >= {low}; got {item!r}")

    whole("images", 1)
    whole("img_size", 1)
    if options.get("cell") is not None and options["cell"] not in cells:
        raise _problem(path, f"{key}.cell {options['cell']!r} is not a cell of the grid ({', '.join(map(repr, cells))})")
    if options.get("seed") is not None and options["seed"] not in seeds:
        raise _problem(path, f"{key}.seed {options['seed']!r} is not one of the seeds {seeds}")
    if options.get("which", "last") not in _WEIGHTS:
        raise _problem(path, f"{key}.which must be one of {', '.join(_WEIGHTS)}; got {options['which']!r}")
    if key == "jaccard" and options:
        if not isinstance(options.get("data"), str) or not options["data"]:
            raise _problem(path, "jaccard.data must name the masks to score against (a folder with images/ and "
                                 "masks/, e.g. data/stamps, or voc2012)")
    return options


def config_options(options: dict[str, Any]) -> dict[str, Any]:
    """A run's options as ``sarvit.config.load_config`` takes them (``method`` is the field ``task``)."""
    return {("task" if key == METHOD else key): value for key, value in options.items()}


def _command(path: Path, value: Any) -> str:
    if value is None:
        return "train"
    if value not in COMMANDS:
        raise _problem(path, f"command must be one of {', '.join(COMMANDS)} (the sarvit command of every run); "
                             f"got {value!r}")
    return value


def _probe(path: Path, value: Any, command: str, forced: dict[str, Any]) -> Probe | None:
    """The ``probe`` section: its recipe and the options every probe sets (``--set probe.X=V`` last)."""
    if value is None:
        if forced:
            raise _problem(path, f"--set probe.{next(iter(forced))}: the study has no probe section")
        return None
    if command != "pretrain":
        raise _problem(path, "probe: only a pretrain study (command: pretrain) probes its runs; remove the probe "
                             "section or set command: pretrain")
    spec = _mapping(path, "probe", value)
    unknown = sorted(set(map(str, spec)) - PROBE_KEYS)
    if unknown:
        raise _problem(path, f"probe: unknown key(s) {', '.join(unknown)}; it takes {', '.join(sorted(PROBE_KEYS))}")
    if not isinstance(spec.get("recipe"), str) or not spec["recipe"]:
        raise _problem(path, "probe.recipe must name a sarvit linprobe recipe (a shipped recipe's name, e.g. "
                             "fashion_mnist_linprobe_cpu, or a YAML path)")
    recipe = _recipe(path, spec["recipe"])
    read_recipe(recipe)
    options = {**_options(path, "probe.options", spec.get("options"), "linprobe"),
               **_options(path, "--set probe", forced, "linprobe")}
    return Probe(str(recipe.resolve()), options)


def probe_options(probe: Probe, run: Run) -> dict[str, Any]:
    """Every option of ``run``'s probe on top of the probe's recipe: the probe's, the run's checkpoint and seed."""
    return {**probe.options, "pretrained": str(run.folder), "seed": run.seed}


def _transfer(path: Path, value: Any, forced: dict[str, dict[str, Any]]) -> tuple[Stage, ...]:
    """The ``transfer`` section: per command (detect, segment) its recipe and the options every stage of it
    sets (``--set detect.X=V`` last)."""
    spec = _mapping(path, "transfer", value)
    unknown = sorted(set(map(str, spec)) - set(TRANSFER_COMMANDS))
    if unknown:
        raise _problem(path, f"transfer: unknown stage(s) {', '.join(unknown)}; a stage is one of "
                             f"{', '.join(TRANSFER_COMMANDS)} (the sarvit command it runs)")
    if value is not None and not spec:
        raise _problem(path, f"transfer: name at least one stage ({', '.join(TRANSFER_COMMANDS)}), or remove it")
    for command, options in forced.items():
        if command not in spec:
            raise _problem(path, f"--set {command}.{next(iter(options))}: the study has no transfer.{command} stage")
    stages = []
    for command, item in spec.items():
        where = f"transfer.{command}"
        item = _mapping(path, where, item)
        unknown = sorted(set(map(str, item)) - PROBE_KEYS)
        if unknown:
            raise _problem(path, f"{where}: unknown key(s) {', '.join(unknown)}; it takes "
                                 f"{', '.join(sorted(PROBE_KEYS))}")
        if not isinstance(item.get("recipe"), str) or not item["recipe"]:
            raise _problem(path, f"{where}.recipe must name a sarvit {command} recipe (a shipped recipe's name, e.g. "
                                 f"stamps_{command}_cpu, or a YAML path)")
        recipe = _recipe(path, item["recipe"])
        read_recipe(recipe)
        options = {**_options(path, f"{where}.options", item.get("options"), command),
                   **_options(path, f"--set {command}", forced.get(command), command)}
        stages.append(Stage(command, str(recipe.resolve()), options))
    return tuple(stages)


def stage_options(stage: Stage, run: Run) -> dict[str, Any]:
    """Every option of ``run``'s ``stage`` on top of the stage's recipe: the stage's, the run's folder as the
    backbone and the run's seed."""
    return {**stage.options, "pretrained": str(run.folder), "seed": run.seed}


def _split_extra(extra: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """``--set`` options: ``(of every run, of every probe, {stage command: of every such stage})``;
    ``probe.epochs=5`` is a probe's, ``detect.epochs=2`` a detect stage's."""
    runs, probes, stages = {}, {}, {}
    for key, value in (extra or {}).items():
        prefix, dot, name = str(key).partition(".")
        if dot and prefix == "probe":
            probes[name] = value
        elif dot and prefix in TRANSFER_COMMANDS:
            stages.setdefault(prefix, {})[name] = value
        else:
            runs[key] = value
    return runs, probes, stages


def load_study(path: str | Path, output: str | Path | None = None, command: str = "",
               runs: str | Path | None = None, extra: dict[str, Any] | None = None) -> Study:
    """Read and expand a study file; every run's options are range-checked here, before anything runs.

    ``path``: a study file, or the name of a shipped one. ``output`` (default
    ``results/<name>``) holds the report; runs lie in ``runs`` if given, else in the
    folder the file's ``runs`` key names (relative to ``output``; default ``runs``).
    ``extra``: options set in every run on top of the file's ``options`` (``--set``);
    ``probe.<option>`` ones in every probe, ``detect.<option>`` / ``segment.<option>`` in every
    such transfer stage.
    """
    path = study_path(path)
    spec = _read(path)
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise _problem(path, f"name must be a short identifier (letters, digits, _ . -); got {name!r}")
    run_command = _command(path, spec.get("command"))
    recipe = _recipe(path, spec.get("recipe"))
    read_recipe(recipe)  # a malformed recipe is named now
    recipe_text = recipe.read_text()
    extra_runs, extra_probes, extra_stages = _split_extra(extra)
    common = _options(path, "options", spec.get("options"), run_command)
    forced = _options(path, "--set", extra_runs, run_command)  # set in every run, over the file's cells and methods
    probe = _probe(path, spec.get("probe"), run_command, extra_probes)
    transfer = _transfer(path, spec.get("transfer"), extra_stages)
    methods = {str(k): _options(path, f"methods.{k}", v, run_command)
               for k, v in _mapping(path, "methods", spec.get("methods")).items()}
    if not methods:
        raise _problem(path, "methods must name at least one method (label: options), e.g. 'SAR: {}'")
    baseline = str(spec.get("baseline", next(iter(methods))))
    if baseline not in methods:
        raise _problem(path, f"baseline {baseline!r} is not one of the methods ({', '.join(methods)})")
    cells = _cells(path, spec.get("grid"), run_command)
    seeds = _seeds(path, spec.get("seeds"))
    output = Path(output) if output is not None else Path("results") / name
    runs_key = spec.get("runs", "runs")
    if not isinstance(runs_key, str) or not runs_key:
        raise _problem(path, f"runs must be a folder (relative to the output); got {runs_key!r}")
    runs_dir = Path(runs) if runs is not None else output / runs_key
    runs = []
    for cell, cell_options in cells:
        resolved: dict[str, str] = {}  # the full configuration of each method in this cell -> its label
        for method, method_options in methods.items():
            for seed in seeds:
                options = {**common, **cell_options, **method_options, **forced, "seed": seed}
                where = f"method {method!r}" + (f", cell {cell!r}" if cell else "")
                try:
                    cfg = load_config(recipe, config_options(options), command=run_command)
                except ConfigError as err:
                    raise _problem(path, f"{where}: {err}") from None
                if seed == seeds[0]:
                    same = resolved.setdefault(repr(sorted(to_dict(cfg).items())), method)
                    if same != method:
                        raise _problem(path, f"methods {same!r} and {method!r} train the same configuration"
                                             + (f" in cell {cell!r}" if cell else "") + "; make them differ")
                rid = run_id(recipe_text, options)
                folder = runs_dir / rid
                run = Run(rid, method, cell, seed, options, folder, folder / PROBE_FOLDER if probe else None,
                          {stage.command: folder / stage.command for stage in transfer})
                if probe is not None and not runs:  # the probe's options are the same for every run but its seed
                    try:
                        load_config(probe.recipe, probe_options(probe, run), command="linprobe")
                    except ConfigError as err:
                        raise _problem(path, f"probe: {err}") from None
                for stage in transfer if not runs else ():  # so are a stage's
                    try:
                        load_config(stage.recipe, stage_options(stage, run), command=stage.command)
                    except ConfigError as err:
                        raise _problem(path, f"transfer.{stage.command}: {err}") from None
                runs.append(run)
    ids = [r.id for r in runs]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise _problem(path, f"two methods or cells set the same options (runs {', '.join(twice)}); "
                             "give each method/cell different options")
    attention = _figure_options(path, "attention", spec.get("attention"), [c for c, _ in cells], seeds)
    jaccard = _figure_options(path, "jaccard", spec.get("jaccard"), [c for c, _ in cells], seeds)
    heads = spec.get("heads", False)
    if not isinstance(heads, bool):
        raise _problem(path, f"heads must be true or false; got {heads!r}")
    for key in ("title", "description"):
        if not isinstance(spec.get(key, ""), str):
            raise _problem(path, f"{key} must be text; got {spec[key]!r}")
    return Study(
        name=name, title=spec.get("title", name), description=spec.get("description", "").strip(),
        recipe=str(recipe.resolve()), methods=list(methods), baseline=baseline, cells=[c for c, _ in cells],
        seeds=seeds, runs=runs, command=command, attention=attention, jaccard=jaccard, heads=heads,
        options={**common, **forced}, runs_dir=runs_dir, output=output, run_command=run_command, probe=probe,
        transfer=transfer,
    )
