"""Training configuration: YAML -> dataclass -> function arguments.

One flat dataclass, ``TrainConfig``. A YAML recipe sets any subset of its fields (the
key ``lambda`` is the field ``lambda_``); ``--key value`` options on the command line
override them; ``validate`` rejects values that would silently change the experiment.
The resolved configuration is written into the run folder as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TrainConfig", "ConfigError", "load_config", "apply_overrides", "validate", "to_dict", "parse_value", "recipe_path"]


def option(default: Any, help: str = "") -> Any:
    """A config field with its command-line help."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and what to do."""


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------
    data: str = option("fashion_mnist", "dataset name (cifar10, cifar100, flowers102, oxford_pets, stanford_cars, "
                       "imagenet, imagenet100, fashion_mnist) or an ImageFolder root with train/ and val/")
    data_root: str | None = option(None, "folder where the named dataset lies")
    download: bool = option(False, "let torchvision download the datasets it can fetch")
    img_size: int = option(224, "input resolution")
    per_class: int | None = option(None, "train on a stratified subset of N images per class")
    train_fraction: float | None = option(None, "train on a stratified subset: this fraction of every class")
    workers: int = option(4, "data-loading processes per training process")
    # --- model ------------------------------------------------------------------------
    model: str = option("vit_small_patch16_224", "timm model name (a VisionTransformer)")
    model_kwargs: dict = option({}, "extra timm.create_model arguments, e.g. '{depth: 6, patch_size: 2}'")
    drop_path: float = option(0.1, "stochastic depth rate")
    # --- SAR ----------------------------------------------------------------------------
    sar: bool = option(True, "add lambda * L_se to the loss (false: the plain baseline)")
    lambda_: float = option(0.01, "weight of the spatial-entropy term")
    lambda_schedule: str = option("constant", "constant (the paper) | warmup_cosine (the published code)")
    lambda_warmup_epochs: int = option(10, "linear lambda warm-up length for warmup_cosine")
    layout: str | None = option(None, "last block, a row of Table 1(b): A|B|C|D; default C with SAR, A without")
    query: str = option("auto", "query of the similarity maps: auto | cls | mean")
    # --- optimisation (DeiT) -------------------------------------------------------------
    epochs: int = option(300, "training epochs")
    batch_size: int = option(128, "batch size per process")
    lr: float | None = option(None, "learning rate; default base_lr * global batch / 512")
    base_lr: float = option(5e-4, "learning rate for a global batch of 512")
    opt: str = option("adamw", "timm optimizer name")
    weight_decay: float = option(0.05, "weight decay (not on norms and biases)")
    momentum: float = option(0.9, "momentum, for optimizers that use it")
    clip_grad: float | None = option(None, "clip the gradient norm to this value")
    sched: str = option("cosine", "timm learning-rate schedule")
    warmup_epochs: int = option(5, "linear learning-rate warm-up epochs")
    warmup_lr: float = option(1e-6, "learning rate at the start of the warm-up")
    min_lr: float = option(1e-5, "learning rate at the end of the schedule")
    # --- augmentation and regularisation -------------------------------------------------
    smoothing: float = option(0.1, "label smoothing")
    mixup: float = option(0.8, "Mixup alpha (0: off)")
    cutmix: float = option(1.0, "CutMix alpha (0: off)")
    mixup_prob: float = option(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = option(0.5, "probability of CutMix instead of Mixup")
    auto_augment: str | None = option("rand-m9-mstd0.5-inc1", "timm RandAugment policy (none: off)")
    reprob: float = option(0.25, "random-erasing probability")
    color_jitter: float = option(0.3, "colour jitter (used when auto_augment is off)")
    hflip: float = option(0.5, "horizontal-flip probability")
    scale: tuple = option((0.08, 1.0), "random-resized-crop area range, e.g. 0.08,1")
    interpolation: str = option("bicubic", "resize interpolation")
    crop_pct: float = option(0.875, "evaluation centre-crop fraction")
    model_ema: bool = option(False, "keep an exponential moving average of the weights")
    model_ema_decay: float = option(0.99996, "EMA decay per step")
    # --- run ----------------------------------------------------------------------------
    seed: int = option(0, "seed of the initialisation, the subset, the data order and the augmentation")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    amp: str = option("auto", "auto (bf16 on CUDA when supported, else fp16; none on CPU) | none | bf16 | fp16")
    compile: bool = option(False, "torch.compile the training forward")
    output: str | None = option(None, "run folder; default runs/<data>-<model>-<sar|baseline>-seed<seed>")
    resume: str | None = option(None, "auto (continue --output if it has a checkpoint) | a run or checkpoint folder")
    checkpoint_interval: int = option(0, "also checkpoint every N optimizer steps inside an epoch (0: epoch ends)")
    eval_interval: int = option(1, "evaluate every N epochs (and always after the last)")
    log_interval: int = option(20, "refresh the progress bar every N steps (one host sync each)")
    deterministic: bool = option(False, "torch.use_deterministic_algorithms(True)")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_KEY_ALIASES = {"lambda": "lambda_"}
CHOICES = {
    "lambda_schedule": ("constant", "warmup_cosine"),
    "amp": ("auto", "none", "bf16", "fp16"),
    "query": ("auto", "cls", "mean"),
    "layout": (None, "A", "B", "C", "D", "standard", "no_msa_skip", "sar", "no_skips"),
}


def field_name(key: str) -> str:
    """``"batch-size"`` / ``"batch_size"`` / ``"lambda"`` -> the dataclass field name."""
    key = key.replace("-", "_")
    key = _KEY_ALIASES.get(key, key)
    if key not in FIELDS:
        close = difflib.get_close_matches(key, list(FIELDS) + ["lambda"], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown option {key!r}{hint}")
    return key


def _field_type(name: str) -> tuple[type, bool]:
    """The non-None type of a field and whether it admits None: ``int | None`` -> (int, True)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def parse_value(name: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the type of field ``name``."""
    kind, optional = _field_type(name)
    if isinstance(value, str) and value.lower() in ("none", "null", "") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
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
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {kind.__name__}") from None


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


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- YAML recipe (a path or a shipped recipe's name) <- ``overrides``."""
    values: dict[str, Any] = {}
    if path is not None:
        recipe = recipe_path(str(path))
        loaded = yaml.safe_load(recipe.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{recipe}: a recipe is a YAML mapping of option: value")
        values.update(loaded)
    values.update(overrides or {})
    return apply_overrides(TrainConfig(), values)


def apply_overrides(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    changes = {}
    for key, value in values.items():
        name = field_name(key)
        changes[name] = parse_value(name, value)
    return validate(dataclasses.replace(cfg, **changes))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject values that are wrong or contradict each other; return ``cfg``."""
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            shown = ", ".join(str(o) for o in options if o is not None)
            raise ConfigError(f"{name} must be one of {shown}; got {getattr(cfg, name)!r}")
    if cfg.lambda_ < 0:
        raise ConfigError(f"lambda must be >= 0 (it weights a loss to minimise); got {cfg.lambda_}")
    if cfg.per_class is not None and cfg.train_fraction is not None:
        raise ConfigError("give --per-class or --train-fraction, not both")
    if cfg.per_class is not None and cfg.per_class < 1:
        raise ConfigError(f"per_class must be >= 1; got {cfg.per_class}")
    if cfg.train_fraction is not None and not 0 < cfg.train_fraction <= 1:
        raise ConfigError(f"train_fraction must be in (0, 1]; got {cfg.train_fraction}")
    positive = ("epochs", "batch_size", "img_size", "eval_interval", "log_interval")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1; got {getattr(cfg, name)}")
    for name in ("workers", "checkpoint_interval", "warmup_epochs", "lambda_warmup_epochs", "drop_path",
                 "weight_decay", "smoothing", "mixup", "cutmix", "reprob", "base_lr"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0; got {getattr(cfg, name)}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise ConfigError(f"lr must be > 0; got {cfg.lr}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0 and cfg.batch_size % 2:
        raise ConfigError(f"Mixup/CutMix pair samples within a batch: batch_size must be even, got {cfg.batch_size}")
    if len(cfg.scale) != 2 or not 0 < cfg.scale[0] <= cfg.scale[1] <= 1:
        raise ConfigError(f"scale must be two numbers 0 < lo <= hi <= 1; got {cfg.scale}")
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """YAML-ready dict, with ``lambda`` spelled as in recipes."""
    out = {}
    for name, value in dataclasses.asdict(cfg).items():
        out["lambda" if name == "lambda_" else name] = list(value) if isinstance(value, tuple) else value
    return out


def resolved_layout(cfg: TrainConfig) -> str:
    """The last-block layout: C (Eq. 10-11) with SAR, A (standard) without, unless set."""
    return cfg.layout or ("C" if cfg.sar else "A")


def default_output(cfg: TrainConfig) -> str:
    name = Path(cfg.data).name if Path(cfg.data).is_dir() else cfg.data
    return f"runs/{name}-{cfg.model}-{'sar' if cfg.sar else 'baseline'}-seed{cfg.seed}"
