"""Training configuration: YAML -> dataclass -> function arguments.

One flat dataclass, ``TrainConfig``. A YAML recipe sets any subset of its fields (the
key ``lambda`` is the field ``lambda_``); ``--key value`` options on the command line
override them; ``validate`` rejects values that would silently change the experiment.
The resolved configuration is written into the run folder as ``config.yaml``.

Every field declares, beside its default and help, the values it admits (``option(...,
range=..., choices=..., check=...)``): ``validate`` checks each field against that one
declaration, without importing torch or timm. ``validate_with_libraries`` adds the
checks only timm can make (augmentation policy, optimizer, scheduler, model).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError

__all__ = [
    "TrainConfig", "ConfigError", "Rule", "load_config", "apply_overrides", "validate", "validate_with_libraries",
    "check_field", "to_dict", "parse_value", "recipe_path", "task_fields", "TASKS",
]


# --- what a field admits ------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """The values a field admits: an interval, a list of choices and/or a grammar.

    ``range = (lo, hi, brackets)``: ``lo``/``hi`` may be None (unbounded); brackets
    ``"[]"``, ``"[)"``, ``"(]"`` or ``"()"`` say which ends are allowed. Floats must
    also be finite. ``check(value)`` returns what the value must be when it is wrong,
    else None.
    """

    range: tuple | None = None
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None

    def requirement(self) -> str:
        """``"in [0, 1)"``, ``">= 1"``, ``"one of a, b"``: what the rule asks, in words."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices if c is not None)
        if self.range is None:
            return ""
        lo, hi, brackets = self.range
        if hi is None:
            return f"{'>=' if brackets[0] == '[' else '>'} {lo}"
        if lo is None:
            return f"{'<=' if brackets[1] == ']' else '<'} {hi}"
        return f"in {brackets[0]}{lo}, {hi}{brackets[1]}"

    def problem(self, value: Any) -> str | None:
        """What ``value`` must be, when it breaks the rule; None when it is fine."""
        if isinstance(value, float) and not math.isfinite(value):
            return " ".join(("a finite number", self.requirement())).strip()
        if self.choices is not None and value not in self.choices:
            return self.requirement()
        if self.range is not None and not _in_range(value, *self.range):
            return self.requirement()
        if self.check is not None:
            return self.check(value)
        return None


def _in_range(value: float, lo: float | None, hi: float | None, brackets: str) -> bool:
    above = lo is None or (value >= lo if brackets[0] == "[" else value > lo)
    below = hi is None or (value <= hi if brackets[1] == "]" else value < hi)
    return above and below


def option(default: Any, help: str = "", *, range: tuple | None = None, choices: tuple | None = None,
           check: Callable[[Any], str | None] | None = None) -> Any:
    """A config field with its command-line help and the values it admits (see :class:`Rule`)."""
    if range is not None and len(range) == 2:
        range = (*range, "[]")
    metadata = {"help": help, "rule": Rule(range, choices, check)}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# intervals used below
POSITIVE = (0, None, "()")
NON_NEGATIVE = (0, None, "[)")
AT_LEAST_ONE = (1, None, "[)")
PROBABILITY = (0, 1, "[]")
FRACTION = (0, 1, "(]")
OPEN_UNIT = (0, 1, "()")
HALF_OPEN_UNIT = (0, 1, "[)")
SEED = (0, 2**32 - 1, "[]")

TASKS = ("supervised", "dino", "mocov3", "linprobe", "detect", "segment")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
DEVICE_SYNTAX = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "a non-empty text"


def _name(value: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z0-9_]+", value) else "a name of letters, digits and underscores"


def _device(value: str) -> str | None:
    return None if DEVICE_SYNTAX.fullmatch(value) else "auto, cpu, cuda, cuda:N (N a GPU index) or mps"


# timm's augmentation grammar: "<policy>-<key><value>-...", see timm.data.auto_augment
_INT, _FLOAT, _BIT = r"\d+", r"\d+(\.\d+)?", r"[01]"
_SHOWN_PATTERN = {_INT: "N", _FLOAT: "X", _BIT: "0|1"}
AUTO_AUGMENT_KEYS = {
    "rand": {"mstd": _FLOAT, "mmax": _INT, "inc": _BIT, "m": _INT, "n": _INT, "p": _FLOAT, "t": r"weights|3aw|3a"},
    "augmix": {"mstd": _FLOAT, "m": _INT, "w": _INT, "d": _INT, "a": _FLOAT, "b": _BIT},
    **{policy: {"mstd": _FLOAT} for policy in ("original", "originalr", "v0", "v0r", "3a")},
}


def _auto_augment(value: str) -> str | None:
    head, *sections = value.split("-")
    if head not in AUTO_AUGMENT_KEYS:
        return ("none, rand-<sections> (RandAugment, e.g. rand-m9-mstd0.5-inc1), augmix-<sections> or an "
                "AutoAugment policy (original, originalr, v0, v0r, 3a)")
    keys = AUTO_AUGMENT_KEYS[head]
    for section in sections:
        key = next((k for k in keys if section.startswith(k) and re.fullmatch(keys[k], section[len(k):])), None)
        if key is None:
            shown = " ".join(f"{k}<{_SHOWN_PATTERN.get(keys[k], keys[k])}>" for k in keys)
            return f"{head}-<sections> with sections among {shown} ({section!r} is none of them)"
        if key == "p" and float(section[1:]) > 1:
            return f"{head}-<sections> with a probability p<= 1 ({section!r} is more)"
    return None


def _model_kwargs(value: dict) -> str | None:
    reserved = {"num_classes": "the dataset sets it", "img_size": "use --img-size", "image_size": "use --img-size",
                "drop_path_rate": "use --drop-path", "pretrained": "sarvit creates models without pretrained weights"}
    for key in value:
        if not isinstance(key, str):
            return f"a mapping of argument names to values; {key!r} is not a name"
        if key in reserved:
            return f"free of {key} ({reserved[key]})"
        if value[key] is None:  # timm drops None arguments: '{patch_size:8}' would silently mean nothing
            return (f"a mapping of argument names to values; {key!r} has none (write 'name: value', with a space "
                    "after the colon)")
    return None


def _scale(value: tuple) -> str | None:
    ok = len(value) == 2 and all(math.isfinite(v) for v in value) and 0 < value[0] <= value[1] <= 1
    return None if ok else "two numbers 0 < lo <= hi <= 1"


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------
    data: str = option("fashion_mnist", "dataset name (cifar10, cifar100, flowers102, oxford_pets, stanford_cars, "
                       "imagenet, imagenet100, fashion_mnist) or an ImageFolder root with train/ and val/",
                       check=_non_empty)
    data_root: str | None = option(None, "folder where the named dataset lies", check=_non_empty)
    download: bool = option(False, "let torchvision download the datasets it can fetch")
    img_size: int = option(224, "input resolution (a multiple of the model's patch size)", range=AT_LEAST_ONE)
    per_class: int | None = option(None, "train on a stratified subset of N images per class", range=AT_LEAST_ONE)
    train_fraction: float | None = option(None, "train on a stratified subset: this fraction of every class",
                                          range=FRACTION)
    val_per_class: int | None = option(None, "validate on a fixed stratified subset of N images per class (the "
                                       "same images for every seed)", range=AT_LEAST_ONE)
    workers: int = option(4, "data-loading processes per training process", range=NON_NEGATIVE)
    # --- model ------------------------------------------------------------------------
    model: str = option("vit_small_patch16_224", "timm model name (a VisionTransformer)", check=_non_empty)
    model_kwargs: dict = option({}, "extra timm.create_model arguments, e.g. '{depth: 6, patch_size: 2}'",
                                check=_model_kwargs)
    drop_path: float = option(0.1, "stochastic depth rate", range=HALF_OPEN_UNIT)
    # --- SAR ----------------------------------------------------------------------------
    sar: bool = option(True, "add lambda * L_se to the loss (false: the plain baseline)")
    lambda_: float = option(0.01, "weight of the spatial-entropy term", range=NON_NEGATIVE)
    lambda_schedule: str = option("constant", "constant (the paper) | warmup_cosine (the published code)",
                                  choices=("constant", "warmup_cosine"))
    lambda_warmup_epochs: int = option(10, "linear lambda warm-up length for warmup_cosine", range=NON_NEGATIVE)
    objective: str = option("sar", "auxiliary term (with --sar true): sar (L_se of S, Eq. 4) | sar_softmax (L_se of "
                            "the post-softmax maps) | sar_cosine (L_se of the cosine maps, Eq. 15) | tv (total "
                            "variation, Eq. 14) | entropy (entropy over positions, no components) | drloc (DRLoc)",
                            choices=("sar", "sar_softmax", "sar_cosine", "tv", "entropy", "drloc"))
    drloc_lambda: float = option(0.1, "weight of the DRLoc term (--objective drloc)", range=NON_NEGATIVE)
    drloc_warmup_epochs: int = option(20, "DRLoc weight: linear warm-up epochs (capped at --epochs), then linear "
                                      "decay to 0", range=NON_NEGATIVE)
    drloc_pairs: int = option(64, "DRLoc: position pairs sampled per image (m)", range=AT_LEAST_ONE)
    layout: str | None = option(None, "last block, a row of Table 1(b): A|B|C|D; default C with SAR, A for drloc "
                                "and without",
                                choices=(None, "A", "B", "C", "D", "standard", "no_msa_skip", "sar", "no_skips"))
    query: str = option("auto", "query of the similarity maps: auto | cls | mean", choices=("auto", "cls", "mean"))
    # --- optimisation (DeiT) -------------------------------------------------------------
    epochs: int = option(300, "training epochs", range=AT_LEAST_ONE)
    batch_size: int = option(128, "batch size per process", range=AT_LEAST_ONE)
    lr: float | None = option(None, "learning rate; default base_lr * global batch / 512", range=POSITIVE)
    base_lr: float = option(5e-4, "learning rate for a global batch of 512", range=POSITIVE)
    opt: str = option("adamw", "timm optimizer name", check=_name)
    weight_decay: float = option(0.05, "weight decay (not on norms and biases)", range=NON_NEGATIVE)
    momentum: float = option(0.9, "momentum, for optimizers that use it", range=HALF_OPEN_UNIT)
    clip_grad: float | None = option(None, "clip the gradient norm to this value", range=POSITIVE)
    sched: str = option("cosine", "timm learning-rate schedule", check=_name)
    warmup_epochs: int = option(5, "linear learning-rate warm-up epochs", range=NON_NEGATIVE)
    warmup_lr: float = option(1e-6, "learning rate at the start of the warm-up", range=NON_NEGATIVE)
    min_lr: float = option(1e-5, "learning rate at the end of the schedule", range=NON_NEGATIVE)
    # --- augmentation and regularisation -------------------------------------------------
    smoothing: float = option(0.1, "label smoothing", range=HALF_OPEN_UNIT)
    mixup: float = option(0.8, "Mixup alpha (0: off)", range=NON_NEGATIVE)
    cutmix: float = option(1.0, "CutMix alpha (0: off)", range=NON_NEGATIVE)
    mixup_prob: float = option(1.0, "probability of mixing a batch", range=PROBABILITY)
    mixup_switch_prob: float = option(0.5, "probability of CutMix instead of Mixup", range=PROBABILITY)
    auto_augment: str | None = option("rand-m9-mstd0.5-inc1", "timm RandAugment policy (none: off)",
                                      check=_auto_augment)
    reprob: float = option(0.25, "random-erasing probability", range=PROBABILITY)
    color_jitter: float = option(0.3, "colour jitter (used when auto_augment is off)", range=NON_NEGATIVE)
    hflip: float = option(0.5, "horizontal-flip probability", range=PROBABILITY)
    scale: tuple = option((0.08, 1.0), "random-resized-crop area range, e.g. 0.08,1", check=_scale)
    interpolation: str = option("bicubic", "resize interpolation, of the training crops and the evaluation images",
                                choices=INTERPOLATIONS)
    crop_pct: float = option(0.875, "evaluation centre-crop fraction", range=FRACTION)
    model_ema: bool = option(False, "keep an exponential moving average of the weights")
    model_ema_decay: float = option(0.99996, "EMA decay per step", range=OPEN_UNIT)
    # --- self-supervised pre-training (sarvit pretrain) ---------------------------------
    task: str = option("supervised", "what is trained, set by the command: supervised (train, finetune) | dino | "
                       "mocov3 (pretrain --method) | linprobe | detect | segment", choices=TASKS)
    global_crops_scale: tuple = option((0.4, 1.0), "DINO: area range of the 2 global crops, e.g. 0.4,1",
                                       check=_scale)
    local_crops_number: int = option(8, "DINO: local crops per image (the paper: 10)", range=NON_NEGATIVE)
    local_crops_scale: tuple = option((0.05, 0.4), "DINO: area range of the local crops", check=_scale)
    local_crop_size: int = option(96, "DINO: side of the local crops (a multiple of the patch size)",
                                  range=AT_LEAST_ONE)
    out_dim: int = option(65536, "DINO: output dimension of the projection head", range=AT_LEAST_ONE)
    norm_last_layer: bool = option(True, "DINO: weight-normalise the head's last layer with a fixed norm")
    warmup_teacher_temp: float = option(0.04, "DINO: teacher temperature at the start", range=POSITIVE)
    teacher_temp: float = option(0.04, "DINO: teacher temperature after the warm-up", range=POSITIVE)
    warmup_teacher_temp_epochs: int = option(0, "DINO: linear teacher-temperature warm-up epochs",
                                             range=NON_NEGATIVE)
    momentum_teacher: float = option(0.996, "DINO: teacher EMA momentum at the start (cosine to 1)",
                                     range=PROBABILITY)
    freeze_last_layer: int = option(1, "DINO: epochs during which the head's last layer does not learn",
                                    range=NON_NEGATIVE)
    weight_decay_end: float | None = option(None, "weight decay at the end of a cosine schedule from "
                                            "--weight-decay (DINO: 0.04 -> 0.4); none: constant",
                                            range=NON_NEGATIVE)
    moco_dim: int = option(256, "MoCo v3: output dimension of the projection and prediction heads",
                           range=AT_LEAST_ONE)
    moco_mlp_dim: int = option(4096, "MoCo v3: hidden dimension of the heads", range=AT_LEAST_ONE)
    moco_t: float = option(0.2, "MoCo v3: softmax temperature", range=POSITIVE)
    moco_m: float = option(0.99, "MoCo v3: momentum-encoder momentum at the start (cosine to 1)",
                           range=PROBABILITY)
    moco_min_crop: float = option(0.08, "MoCo v3: smallest crop area of a view", range=FRACTION)
    stop_grad_conv1: bool = option(True, "MoCo v3: keep the random patch projection fixed")
    # --- transfer: fine-tuning and linear probing ---------------------------------------
    pretrained: str | None = option(None, "start from these weights: a sarvit run folder or weights file, a timm "
                                    "state dict, a DINO or MoCo v3 checkpoint (finetune, linprobe)", check=_non_empty)
    pretrained_which: str | None = option(None, "which network of a DINO (teacher|student) or MoCo v3 "
                                          "(base|momentum) checkpoint; default the teacher / the base encoder",
                                          choices=(None, "teacher", "student", "base", "momentum"))
    n_last_blocks: int = option(4, "linear probe: concatenate the class tokens of the last N blocks (DINO: 4 "
                                "for ViT-S, 1 for ViT-B)", range=AT_LEAST_ONE)
    avgpool_patchtokens: bool = option(False, "linear probe: also concatenate the mean of the last block's "
                                       "patch tokens")
    dense_size: int = option(512, "detect, segment: side of the square training and evaluation inputs (E.3: 512), "
                             "a multiple of twice the patch size", range=(32, 4096))
    dense_channels: int = option(256, "detect, segment: channels of every pyramid level (ViTDet: 256)",
                                 range=AT_LEAST_ONE)
    dense_masks: bool = option(True, "detect: Mask R-CNN with the instance masks when the data has them (false: "
                               "Faster R-CNN, boxes only)")
    dense_rois: int = option(512, "detect: RoIs sampled per training image for the box and mask heads "
                             "(torchvision, Detectron2: 512)", range=AT_LEAST_ONE)
    warmup_steps: int = option(0, "detect, segment: linear learning-rate warm-up over N optimizer steps (E.3: 250); "
                               "replaces --warmup-epochs when > 0", range=NON_NEGATIVE)
    # --- run ----------------------------------------------------------------------------
    seed: int = option(0, "seed of the initialisation, the subset, the data order and the augmentation", range=SEED)
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps", check=_device)
    amp: str = option("auto", "auto (bf16 on CUDA when supported, else fp16; none on CPU) | none | bf16 | fp16",
                      choices=("auto", "none", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the training forward")
    output: str | None = option(None, "run folder; default runs/<data>-<model>-<sar|baseline>-seed<seed>",
                                check=_non_empty)
    resume: str | None = option(None, "auto (continue --output if it has a checkpoint) | a run or checkpoint folder",
                                check=_non_empty)
    checkpoint_interval: int = option(0, "also checkpoint every N optimizer steps inside an epoch (0: epoch ends)",
                                      range=NON_NEGATIVE)
    eval_interval: int = option(1, "evaluate every N epochs (and always after the last)", range=AT_LEAST_ONE)
    log_interval: int = option(20, "refresh the progress bar every N steps (one host sync each)", range=AT_LEAST_ONE)
    deterministic: bool = option(False, "torch.use_deterministic_algorithms(True)")
    extend: bool = option(False, "with --resume: continue a run for more --epochs (schedules follow the new length)")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
RULES: dict[str, Rule] = {name: f.metadata["rule"] for name, f in FIELDS.items()}
CHOICES = {name: rule.choices for name, rule in RULES.items() if rule.choices is not None}
_KEY_ALIASES = {"lambda": "lambda_"}

# the options each task reads; a run's config.yaml holds its task's options only
_SUPERVISED_ONLY = ("objective", "drloc_lambda", "drloc_warmup_epochs", "drloc_pairs", "smoothing", "mixup", "cutmix",
                    "mixup_prob", "mixup_switch_prob", "auto_augment", "reprob", "color_jitter", "model_ema",
                    "model_ema_decay")
_SSL_ONLY = tuple(n for n in FIELDS if list(FIELDS).index("global_crops_scale") <= list(FIELDS).index(n)
                  <= list(FIELDS).index("stop_grad_conv1"))
_DINO_ONLY = ("global_crops_scale", "local_crops_number", "local_crops_scale", "local_crop_size", "out_dim",
              "norm_last_layer", "warmup_teacher_temp", "teacher_temp", "warmup_teacher_temp_epochs",
              "momentum_teacher", "freeze_last_layer", "weight_decay_end")
_MOCO_ONLY = tuple(n for n in _SSL_ONLY if n not in _DINO_ONLY)
_TRANSFER = ("pretrained", "pretrained_which")
_PROBE_ONLY = ("n_last_blocks", "avgpool_patchtokens")
_DENSE_ONLY = ("dense_size", "dense_channels", "dense_masks", "dense_rois", "warmup_steps")
# what the dense tasks do not read: their inputs are dense_size squares, their subsets whole splits
_NOT_DENSE = ("download", "img_size", "per_class", "train_fraction", "val_per_class", "scale", "interpolation",
              "crop_pct", "hflip")
_SAR = ("sar", "lambda_", "lambda_schedule", "lambda_warmup_epochs", "layout", "query")
_CROPS = ("hflip", "scale")


def task_fields(task: str) -> tuple[str, ...]:
    """The fields of ``TrainConfig`` that ``task`` reads, in declaration order (``task`` included)."""
    if task == "supervised":
        skip = set(_SSL_ONLY) | set(_PROBE_ONLY) | set(_DENSE_ONLY)
    elif task in ("dino", "mocov3"):
        skip = (set(_SUPERVISED_ONLY) | set(_TRANSFER) | set(_PROBE_ONLY) | set(_CROPS) | set(_DENSE_ONLY)
                | set(_MOCO_ONLY if task == "dino" else _DINO_ONLY))
    elif task == "linprobe":
        skip = set(_SUPERVISED_ONLY) | set(_SSL_ONLY) | set(_SAR) | {"drop_path"} | set(_DENSE_ONLY)
    elif task in ("detect", "segment"):
        skip = (set(_SUPERVISED_ONLY) | set(_SSL_ONLY) | set(_PROBE_ONLY) | set(_SAR) | set(_NOT_DENSE)
                | ({"dense_masks", "dense_rois"} if task == "segment" else set()))
    else:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    return tuple(n for n in FIELDS if n not in skip)



def field_name(key: Any) -> str:
    """``"batch-size"`` / ``"batch_size"`` / ``"lambda"`` -> the dataclass field name."""
    key = str(key).replace("-", "_")
    key = _KEY_ALIASES.get(key, key)
    if key not in FIELDS:
        close = difflib.get_close_matches(key, list(FIELDS) + ["lambda"], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown option {key!r}{hint}")
    return key


def shown_name(name: str) -> str:
    """The name users write: ``lambda`` for the field ``lambda_``."""
    return "lambda" if name == "lambda_" else name


@functools.cache
def _field_type(name: str) -> tuple[type, bool]:
    """The non-None type of a field and whether it admits None: ``int | None`` -> (int, True)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def yaml_problem(err: yaml.YAMLError) -> str:
    """``"line 3, column 7: mapping values are not allowed here"`` from a YAML error."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(err, "problem", None) or str(err).splitlines()[0])


def parse_value(name: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the type of field ``name``."""
    kind, optional = _field_type(name)
    if isinstance(value, str) and value.lower() in ("none", "null", "") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{shown_name(name)} cannot be empty")
    try:
        return _convert(kind, value)
    except yaml.YAMLError as err:
        raise ConfigError(f"{shown_name(name)}: malformed YAML {value!r} ({yaml_problem(err)}); "
                          "write a mapping such as '{depth: 6, patch_size: 2}'") from None
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{shown_name(name)}: cannot read {value!r} as {kind.__name__}") from None


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ValueError(value)
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(value)  # YAML's `epochs: yes` is not a number
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind is float:
        return float(value)
    if kind is dict:
        value = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ValueError(value)
        return value
    if kind is tuple:
        items = value.split(",") if isinstance(value, str) else value
        return tuple(float(v) for v in items)
    if isinstance(value, (dict, list)):
        raise ValueError(value)
    return str(value)


def recipe_path(config: str) -> Path:
    """A recipe given as a path, or by the name of a recipe shipped in ``sarvit/configs``."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    shipped = resources.files("sarvit").joinpath("configs", f"{config.removesuffix('.yaml')}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name.removesuffix(".yaml") for p in resources.files("sarvit").joinpath("configs").iterdir()
                   if p.name.endswith(".yaml"))
    raise ConfigError(f"config {config!r} is neither a file nor a shipped recipe; recipes: {', '.join(names)}")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The option: value mapping of a YAML recipe (a path or a shipped recipe's name)."""
    recipe = recipe_path(str(path))
    try:
        loaded = yaml.safe_load(recipe.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{recipe}: malformed YAML at {yaml_problem(err)}; fix the recipe") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{recipe} is not a text file; a recipe is a YAML mapping of option: value") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{recipe}: a recipe is a YAML mapping of option: value")
    return loaded


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                command: str = "train", ignored: list | None = None) -> TrainConfig:
    """Defaults <- YAML recipe (a path or a shipped recipe's name) <- ``overrides``.

    ``command`` (train, finetune, pretrain, linprobe) says which options exist: a key that
    belongs to another command's task is refused, in the recipe as on the command line.
    One exception: a recipe's options of the other self-supervised method (a DINO recipe run
    with ``--method mocov3``) are left out and their names appended to ``ignored`` (for the
    command to say so); given on the command line, they are refused.
    """
    values: dict[str, Any] = {}
    overridden = {field_name(key) for key in overrides or {}}
    recipe: dict[str, Any] = {}
    if path is not None:
        recipe = read_recipe(path)
        try:  # a recipe's own mistakes name the recipe (those of values the command line replaces too)
            for key, value in recipe.items():
                name = field_name(key)
                if name not in overridden:
                    check_field(name, parse_value(name, value))
        except ConfigError as err:
            raise ConfigError(f"{recipe_path(str(path))}: {err}") from None
    task = _task_of(command, {**recipe, **(overrides or {})}, path)
    values = {**TASK_DEFAULTS.get(task, {}), **recipe, **(overrides or {}), "task": task}
    allowed = set(task_fields(task))
    other_method = set(_DINO_ONLY if task == "mocov3" else _MOCO_ONLY if task == "dino" else ())
    for key in list(values):
        name = field_name(key)
        if name in allowed:
            continue
        if name in other_method and name not in overridden:
            del values[key]
            if ignored is not None:
                ignored.append(shown_name(name))
            continue
        where = "--" + shown_name(name).replace("_", "-") if name in overridden else f"{shown_name(name)} in {path}"
        raise ConfigError(f"{where}: not an option of `sarvit {TASK_COMMAND[task]}`{owner_hint(name)}")
    return apply_overrides(TrainConfig(), values)


# a task's defaults where they differ from TrainConfig's (DeiT's): DINO's linear evaluation (eval_linear.py:
# SGD with momentum 0.9, no weight decay, lr 0.001 x batch / 256, no warm-up, cosine to 0, 100 epochs)
_E3 = {"epochs": 25, "batch_size": 8, "opt": "adamw", "lr": 1e-4, "warmup_steps": 250, "warmup_lr": 1e-6,
       "min_lr": 1e-6}  # appendix E.3, the paper's detection and segmentation fine-tuning
TASK_DEFAULTS = {"linprobe": {"opt": "sgd", "momentum": 0.9, "weight_decay": 0.0, "base_lr": 0.002,
                              "warmup_epochs": 0, "min_lr": 0.0, "epochs": 100},
                 "detect": {**_E3, "data": "voc2007"}, "segment": {**_E3, "data": "voc2012"}}

COMMAND_TASKS = {"train": ("supervised",), "finetune": ("supervised",), "pretrain": ("dino", "mocov3"),
                 "linprobe": ("linprobe",), "detect": ("detect",), "segment": ("segment",)}
TASK_COMMAND = {"supervised": "train", "dino": "pretrain --method dino", "mocov3": "pretrain --method mocov3",
                "linprobe": "linprobe", "detect": "detect", "segment": "segment"}


def _task_of(command: str, values: dict[str, Any], path) -> str:
    """The task the values ask for, refused when it is not ``command``'s."""
    tasks = COMMAND_TASKS[command]
    task = values.get("task", tasks[0] if len(tasks) == 1 else None)
    if task is None:
        raise ConfigError(f"sarvit {command} needs --method ({' or '.join(tasks)}), or a recipe that sets it")
    if task not in tasks:
        given = "--method" if command == "pretrain" else "the options"
        if "task" in (values.keys() if path is None else read_recipe(path).keys()) and path is not None:
            given = str(path)
        if task in TASK_COMMAND:
            raise ConfigError(f"{given}: task {task} is `sarvit {TASK_COMMAND[task]}`'s, not `sarvit {command}`'s")
        raise ConfigError(f"task must be one of {', '.join(tasks)} for sarvit {command}; got {task!r}")
    return task


def owner_hint(name: str) -> str:
    """`` (it is one of `sarvit train`, ...)``: the commands that read option ``name`` ("" for none)."""
    owners = [t for t in TASKS if name in task_fields(t)]
    if not owners:
        return ""
    commands = [TASK_COMMAND[t] for t in owners]
    if "pretrain --method dino" in commands and "pretrain --method mocov3" in commands:
        commands = [c for c in commands if not c.startswith("pretrain --method")] + ["pretrain"]
    return " (it is one of `sarvit " + "`, `sarvit ".join(dict.fromkeys(commands)) + "`)"


def apply_overrides(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    changes = {}
    for key, value in values.items():
        name = field_name(key)
        changes[name] = parse_value(name, value)
    return validate(dataclasses.replace(cfg, **changes))


def _shown_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def check_field(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` when ``value`` is not one field ``name`` admits."""
    _, optional = _field_type(name)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{shown_name(name)} cannot be empty")
    problem = RULES[name].problem(value)
    if problem is not None:
        alternative = " or none" if optional and RULES[name].range is not None else ""
        raise ConfigError(f"{shown_name(name)} must be {problem}{alternative}; got {_shown_value(value)}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject values that are out of range or contradict each other; return ``cfg``.

    Imports neither torch nor timm; :func:`validate_with_libraries` adds their checks.
    """
    for name in FIELDS:
        check_field(name, getattr(cfg, name))
    if cfg.per_class is not None and cfg.train_fraction is not None:
        raise ConfigError("give --per-class or --train-fraction, not both")
    mixing = cfg.task == "supervised" and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0  # others mix none
    if mixing and cfg.batch_size % 2:
        raise ConfigError(f"Mixup/CutMix pair samples within a batch: batch_size must be even, got {cfg.batch_size}")
    return cfg


# --- the checks that need timm ----------------------------------------------------------------------


def validate_with_libraries(cfg: TrainConfig) -> TrainConfig:
    """The checks only timm can make; call it once torch and timm are imported, before
    anything is written. Raises :class:`ConfigError` (or
    :class:`~sarvit.errors.UnsupportedModel`, for a model family SAR cannot rewire);
    returns ``cfg``.

    - ``auto_augment`` through timm's own parser,
    - ``opt`` is a timm optimizer and ``sched`` a schedule the trainer can step,
    - ``model`` is a timm model SAR supports, with ``model_kwargs`` and ``img_size``
      (built on the meta device: no memory, no weights),
    - ``data`` is a known dataset name or a folder.
    """
    validate(cfg)
    _check_auto_augment_with_timm(cfg.auto_augment, cfg.img_size)
    check_optimization_with_timm(cfg)
    _check_model(cfg)
    _check_data(cfg.data)
    return cfg


def check_optimization_with_timm(cfg: TrainConfig) -> None:
    """``opt`` is a timm optimizer (with its momentum and weight decay) and ``sched`` a schedule the
    loop can step per update; raises :class:`ConfigError`."""
    _check_optimizer(cfg.opt, cfg.momentum, cfg.weight_decay)
    _check_scheduler(cfg)


def _check_auto_augment_with_timm(policy: str | None, img_size: int) -> None:
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    if policy is None:
        return
    build = (rand_augment_transform if policy.startswith("rand") else
             augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform)
    try:
        build(policy, {"translate_const": int(img_size * 0.45), "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise ConfigError(f"auto_augment {policy!r}: timm cannot read it ({err or type(err).__name__}); "
                          "e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, or none") from None


def _check_optimizer(opt: str, momentum: float, weight_decay: float) -> None:
    import torch
    from timm.optim import create_optimizer_v2, list_optimizers

    known = list_optimizers()
    base = opt.lower().removeprefix("lookahead_")
    if base not in known:
        close = difflib.get_close_matches(base, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; timm has {', '.join(known)}"
        raise ConfigError(f"opt {opt!r} is not a timm optimizer{hint}")
    try:
        create_optimizer_v2(torch.nn.Linear(2, 2), opt=opt, lr=1e-3, weight_decay=weight_decay, momentum=momentum)
    except (ImportError, AssertionError, ValueError, RuntimeError) as err:
        raise ConfigError(f"opt {opt!r} cannot be created here: {err}") from None


def _check_scheduler(cfg: TrainConfig) -> None:
    import torch
    from timm.scheduler import create_scheduler_v2

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=cfg.lr or cfg.base_lr)
    try:  # the arguments the trainer passes: the schedule steps every optimizer step
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=1,
        )
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"sched {cfg.sched!r}: {err}; sarvit steps the schedule every optimizer step: use e.g. "
                          "cosine, tanh, step, multistep, poly or constant") from None
    if scheduler is None:
        raise ConfigError(f"sched {cfg.sched!r} makes no schedule; for a fixed learning rate use sched constant")


def _check_model(cfg: TrainConfig) -> None:
    import torch

    from .factory import create_model

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        create_model(cfg.model, 2, img_size=cfg.img_size, drop_path=cfg.drop_path, model_kwargs=cfg.model_kwargs,
                     layout=resolved_layout(cfg), query=cfg.query)


def _check_data(data: str) -> None:
    from .data import DATASETS

    if data not in DATASETS and not Path(data).expanduser().is_dir():
        raise ConfigError(f"data {data!r} is neither a dataset name ({', '.join(DATASETS)}) nor a folder "
                          "with train/ and val/ class sub-folders")


# --- what the trainer reads -------------------------------------------------------------------


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """YAML-ready dict of the options ``cfg.task`` reads, with ``lambda`` spelled as in recipes."""
    out = {}
    values = dataclasses.asdict(cfg)
    for name in task_fields(cfg.task):
        value = values[name]
        out[shown_name(name)] = list(value) if isinstance(value, tuple) else value
    return out


def resolved_layout(cfg: TrainConfig) -> str:
    """The last-block layout: C (Eq. 10-11) with an SE-family objective, A (standard) for DRLoc
    and without SAR, unless set."""
    return cfg.layout or ("C" if cfg.sar and cfg.objective != "drloc" else "A")


def default_output(cfg: TrainConfig) -> str:
    name = Path(cfg.data).name if Path(cfg.data).is_dir() else cfg.data
    return f"runs/{name}-{cfg.model}-{cfg.objective if cfg.sar else 'baseline'}-seed{cfg.seed}"
