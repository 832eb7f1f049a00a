"""Pre-trained backbones for fine-tuning (Table 7, appendix E.4) and linear probing (appendix C).

``load_pretrained(model, source)`` copies a pre-trained backbone into a freshly built model
(``sarvit.factory.create_model``) and returns a :class:`LoadReport`: what was loaded, what was
dropped and why, what keeps its fresh initialisation (the classifier head), and which position
embeddings were resampled to the model's grid. The sources it reads:

    a run folder of ``sarvit pretrain``    ``backbone.safetensors`` (timm key names, no head)
    a run folder of ``sarvit train``       ``best.safetensors``, else the newest intact checkpoint
    a checkpoint folder                    its ``model.safetensors``
    a ``.safetensors`` file                with or without sarvit's metadata
    a timm / DeiT state dict               ``.pth``, ``.pt``, ``.bin``: the dict itself, or under
                                           ``"model"`` or ``"state_dict"``; ``module.`` prefixes
    a DINO checkpoint                      ``{"teacher": ..., "student": ...}`` (teacher by default),
                                           keys under ``module.``/``backbone.``; its ``head.*`` is
                                           the projection head
    a MoCo v3 checkpoint                   ``"state_dict"`` with ``module.base_encoder.`` and
                                           ``module.momentum_encoder.`` (base encoder by default);
                                           the encoder's ``head.*`` and ``predictor.*`` are
                                           projection heads

``pretrained_layout(source)`` and ``finetune_layout(...)`` carry appendix E.4's rule: fine-tuning
keeps the last block the backbone was pre-trained with, whether or not the SE term is trained.

Nothing here imports torch or timm at import time: the command line checks the layout rule
before it builds a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UserError, WeightsNotFound
from .runs import BACKBONE, RunFolder

__all__ = [
    "BACKBONE", "WHICH", "HEAD", "PROJECTION", "UNEXPECTED", "Checkpoint", "LoadReport", "weights_file",
    "read_checkpoint", "load_pretrained", "pretrained_layout", "finetune_layout", "backbone_architecture",
]

WHICH = {"teacher": "DINO", "student": "DINO", "base": "MoCo v3", "momentum": "MoCo v3"}

# why a tensor of the checkpoint was not loaded
HEAD = "head of another task"
PROJECTION = "projection head"
UNEXPECTED = "unexpected (not in the model)"
PRETRAINING = "the pre-training's other network and state"

_HEAD_NAMES = ("head", "head_dist", "heads", "fc", "classifier")  # top-level names of classifier heads
_SHOWN = 6  # key names a report line spells out before "+N more"


@dataclass(frozen=True)
class Checkpoint:
    """The tensors of one pre-trained network, under the model's (timm's) key names.

    ``projection``: keys of ``state`` that belong to a self-supervised projection head.
    """

    path: Path
    kind: str  # in words: "sarvit run folder (best.safetensors)", "DINO checkpoint (teacher)", ...
    state: dict[str, Any]  # name -> tensor
    metadata: dict[str, Any] = field(default_factory=dict)
    projection: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did to the model.

    ``dropped`` maps each checkpoint key that was not loaded to why (:data:`HEAD`,
    :data:`PROJECTION`, :data:`UNEXPECTED`); ``initialised`` lists the model keys that keep
    their fresh initialisation; ``resampled`` maps a key to its ``(old grid, new grid)``.
    """

    path: Path
    kind: str
    loaded: tuple[str, ...]
    dropped: dict[str, str]
    initialised: tuple[str, ...]
    resampled: dict[str, tuple[tuple[int, int], tuple[int, int]]]
    metadata: dict[str, Any]

    def text(self) -> str:
        """The lines the command line prints."""
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.kind})"]
        for key, (old, new) in self.resampled.items():
            lines.append(f"  resampled {key}: grid {old[0]}x{old[1]} -> {new[0]}x{new[1]} (bicubic)")
        for why in dict.fromkeys(self.dropped.values()):
            keys = [k for k, w in self.dropped.items() if w == why]
            lines.append(f"  dropped {len(keys)} ({why}): {_names(keys)}")
        if self.initialised:
            lines.append(f"  newly initialised {len(self.initialised)} (classifier head): {_names(self.initialised)}")
        return "\n".join(lines)


def _names(keys) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


# --- where the weights are ---------------------------------------------------------------------


def weights_file(source: str | Path) -> Path:
    """The weights file of ``source``: the file itself, or the one a run or checkpoint folder holds.

    A run folder: ``backbone.safetensors`` (``sarvit pretrain``), else ``best.safetensors``, else
    the ``model.safetensors`` of its newest intact checkpoint (``sarvit train``).

    Raises:
        WeightsNotFound: no such path, or a folder without weights; the message lists where it looked.
    """
    from .checkpoint import STATE, WEIGHTS, find_checkpoint

    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise WeightsNotFound(f"no such file or run folder: {path}; give a weights file (.safetensors, .pth, .pt, "
                              ".bin) or the run folder of sarvit train / sarvit pretrain")
    if (path / STATE).is_file() and (path / WEIGHTS).is_file():  # a checkpoint folder
        return path / WEIGHTS
    run = RunFolder(path)
    for candidate in (path / BACKBONE, run.best):
        if candidate.is_file():
            return candidate
    found = find_checkpoint(path)
    if found.path is not None:
        return found.path / WEIGHTS
    skipped = f" (skipped: {'; '.join(found.skipped)})" if found.skipped else ""
    raise WeightsNotFound(f"{path} holds no pre-trained weights; looked for {path / BACKBONE}, {run.best} and an "
                          f"intact checkpoint under {run.checkpoints}{skipped}; give the weights file itself")


# --- reading a checkpoint in any of the formats ----------------------------------------------


def read_checkpoint(source: str | Path, which: str | None = None) -> Checkpoint:
    """The pre-trained network ``source`` holds, its keys renamed to timm's.

    Args:
        source: a weights file or a run / checkpoint folder (see :func:`weights_file`).
        which: ``"teacher"`` (default) or ``"student"`` of a DINO checkpoint; ``"base"``
            (default) or ``"momentum"`` encoder of a MoCo v3 checkpoint; ``None`` otherwise.

    Raises:
        UserError: a missing or unreadable file, a file with no tensors, or a ``which``
            that the checkpoint does not offer.
    """
    if which is not None and which not in WHICH:
        raise ConfigError(f"which must be one of {', '.join(WHICH)} (the network of a DINO or MoCo v3 checkpoint); "
                          f"got {which!r}")
    path = weights_file(source)
    if path.suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
        if metadata.get("task") in _SSL_PREFIXES and metadata.get("num_classes", 0) == 0 and \
                any(k.startswith(tuple(_SSL_PREFIXES[metadata["task"]].values())) for k in state):
            return _ssl_checkpoint(path, state, metadata, which)
        _refuse_which(which, path, "a safetensors file")
        return Checkpoint(path, _safetensors_kind(Path(source), path, metadata), state, metadata)
    return _unwrap(_read_pickle(path), which, path)


# the networks of a `sarvit pretrain` checkpoint (model.safetensors of a checkpoint folder): which -> key prefix
_SSL_PREFIXES = {"dino": {"teacher": "teacher.backbone.", "student": "student.backbone."},
                 "mocov3": {"base": "encoder.backbone.", "momentum": "momentum_encoder.backbone."}}


def _ssl_checkpoint(path: Path, state: dict, metadata: dict, which: str | None) -> Checkpoint:
    """The backbone of one network of a ``sarvit pretrain`` checkpoint (DINO's teacher, MoCo v3's base
    encoder by default); the heads, the other network and DINO's centre are projection parts."""
    task = metadata["task"]
    prefixes = _SSL_PREFIXES[task]
    which = which or next(iter(prefixes))
    if which not in prefixes:
        raise ConfigError(f"{path} is a sarvit {task} checkpoint: which must be {' or '.join(prefixes)}, "
                          f"not {which!r}")
    prefix = prefixes[which]
    backbone = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return Checkpoint(path, f"sarvit {task} checkpoint ({which})", {**backbone, **rest}, metadata,
                      projection=frozenset(rest))


def _safetensors_kind(source: Path, path: Path, metadata: dict) -> str:
    source = source.expanduser()
    if source.is_dir():
        folder = "sarvit pretrain run folder" if path.name == BACKBONE else "sarvit run folder"
        return f"{folder}: {path.relative_to(source)}"
    return "safetensors file" + (" written by sarvit" if metadata else "")


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """The tensors and sarvit's metadata ({} for a foreign file) of a safetensors file."""
    from .checkpoint import load_weights

    metadata = _safetensors_metadata(path)
    return _guard_safetensors(path, lambda: load_weights(path)), metadata


def _safetensors_metadata(path: Path) -> dict:
    from .checkpoint import read_metadata

    return _guard_safetensors(path, lambda: read_metadata(path))


def _guard_safetensors(path: Path, read):
    """``read()``, a damaged file turned into a UserError."""
    import json

    from safetensors import SafetensorError

    try:
        return read()
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} as safetensors ({err}); the file may be truncated or damaged: copy it "
                        "again, or give another file") from None


def _read_pickle(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors, containers and argparse options only)."""
    import argparse
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO and DeiT save their `args`
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle at all
            raise UserError(f"cannot read {path} as a PyTorch or safetensors file; give a .safetensors, .pth, .pt "
                            "or .bin file of weights") from None
        raise UserError(f"{path} holds Python objects besides tensors ({found.group(1)}), which sarvit does not "
                        "unpickle; if you trust the file, re-save its state dict alone with "
                        "torch.save(state_dict, 'weights.pth')") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise UserError(f"cannot read {path} as a PyTorch or safetensors file ({type(err).__name__}: {err}); "
                        "give a .safetensors, .pth, .pt or .bin file of weights") from None


def _unwrap(obj: Any, which: str | None, path: Path) -> Checkpoint:
    """Recognise the format of a ``torch.load``-ed object and take out the network's tensors."""
    if isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("teacher", "student")):
        return _dino(obj, which or "teacher", path)
    inner, where = _inner_state(obj)
    state = _strip(inner, "module.")
    if any(k.startswith(("base_encoder.", "momentum_encoder.")) for k in state):
        return _moco(state, which or "base", path)
    _refuse_which(which, path, "a checkpoint of one network")
    if any(k.startswith("backbone.") for k in state):
        backbone, projection = _split_backbone(_tensors(state, path))
        return Checkpoint(path, f"DINO-format state dict{where}", backbone, projection=projection)
    return Checkpoint(path, f"state dict{where}", _tensors(state, path))


def _inner_state(obj: Any) -> tuple[dict, str]:
    """The state dict of a checkpoint: the object itself, or under ``"model"`` / ``"state_dict"``."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key], f" (under {key!r})"
        return obj, ""
    raise UserError(f"the file holds a {type(obj).__name__}, not a dict of tensors; give a state dict")


def _strip(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _tensors(state: dict, path: Path) -> dict:
    """The tensors of ``state``; a UserError when there are none."""
    import torch

    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        shown = ", ".join(map(str, list(state)[:10])) or "nothing"
        raise UserError(f"{path} holds no tensors to load (its top-level keys: {shown}); give a state dict, a "
                        "DINO or MoCo v3 checkpoint, or a sarvit run folder")
    return tensors


def _refuse_which(which: str | None, path: Path, what: str) -> None:
    if which is None:
        return
    if path.name == BACKBONE:
        raise ConfigError(f"which={which!r}: {path} holds one network, the one a pre-training evaluates (DINO: the "
                          "teacher, MoCo v3: the base encoder); for another, give the run's checkpoint folder "
                          f"({path.parent / 'checkpoints' / 'last'}) with the same which")
    raise ConfigError(f"which={which!r} picks the network of a {WHICH[which]} checkpoint, but {path} is {what}; "
                      "leave which unset")


def _dino(obj: dict, which: str, path: Path) -> Checkpoint:
    """DINO's ``checkpoint.pth``: ``{"teacher": wrapper state, "student": wrapper state, ...}``."""
    if which not in ("teacher", "student"):
        raise ConfigError(f"{path} is a DINO checkpoint: which must be teacher or student, not {which!r}")
    if not isinstance(obj.get(which), dict):
        raise UserError(f"the DINO checkpoint {path} holds no {which}; use which="
                        f"{'student' if which == 'teacher' else 'teacher'}")
    state = _tensors(_strip(obj[which], "module."), path)
    backbone, projection = _split_backbone(state)
    return Checkpoint(path, f"DINO checkpoint ({which})", backbone, projection=projection)


def _split_backbone(state: dict) -> tuple[dict, frozenset[str]]:
    """DINO's ``MultiCropWrapper`` keys: ``backbone.*`` -> timm names, ``head.*`` the projection head."""
    out = {(k.removeprefix("backbone.") if k.startswith("backbone.") else k): v for k, v in state.items()}
    projection = frozenset(k for k in state if k.startswith("head."))
    return out, projection


def _moco(state: dict, which: str, path: Path) -> Checkpoint:
    """MoCo v3's ``checkpoint.pth.tar``: ``state_dict`` keys ``module.{base,momentum}_encoder.*``,
    ``module.predictor.*``; the encoder's ``head`` is the projection MLP."""
    if which not in ("base", "momentum"):
        raise ConfigError(f"{path} is a MoCo v3 checkpoint: which must be base or momentum, not {which!r}")
    prefix = f"{which}_encoder."
    encoder = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        raise UserError(f"the MoCo v3 checkpoint {path} holds no {which} encoder ({prefix}*)")
    if which == "base":
        encoder.update({k: v for k, v in state.items() if k.startswith("predictor.")})
    projection = frozenset(k for k in encoder if k.startswith(("head.", "predictor.")))
    return Checkpoint(path, f"MoCo v3 checkpoint ({which} encoder)", _tensors(encoder, path), projection=projection)


# --- loading into a model ----------------------------------------------------------------------


def load_pretrained(model, source: str | Path, which: str | None = None, keep_head: bool = False) -> LoadReport:
    """Copy the pre-trained backbone of ``source`` into ``model``, in place.

    Args:
        model: a freshly built model, e.g. ``sarvit.factory.create_model(name, num_classes, ...)``.
        source: a weights file or a run / checkpoint folder (see the module docstring).
        which: the network of a DINO (``teacher``/``student``) or MoCo v3 (``base``/``momentum``)
            checkpoint; ``None`` takes the teacher / base encoder.
        keep_head: also load the classifier head when its shape fits (the same classes);
            by default the head is the one of another task and keeps its fresh initialisation.

    Returns:
        A :class:`LoadReport`. The absolute position embedding is resampled with timm's
        ``resample_abs_pos_embed`` (bicubic) when the checkpoint's grid differs from the model's.

    Raises:
        UserError: no weights, nothing that fits the model, tensors the model needs that the
            checkpoint lacks, or shapes that differ (other than the head and ``pos_embed``).
    """
    ckpt = read_checkpoint(source, which)
    target = model.state_dict()
    heads = _head_keys(model)
    loaded, dropped, resampled, mismatched = {}, {}, {}, []
    order = [k for k in target if k in ckpt.state] + [k for k in ckpt.state if k not in target]  # the model's
    for key in order:
        tensor = ckpt.state[key]
        why = _drop_reason(key, tensor, target, heads, ckpt.projection, keep_head)
        if why is not None:
            dropped[key] = why
        elif tensor.shape == target[key].shape:
            loaded[key] = tensor
        elif key == "pos_embed" and tensor.shape[-1] == target[key].shape[-1]:
            loaded[key], resampled[key] = _resample_pos_embed(model, tensor, ckpt)
        else:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(target[key].shape)}")
    _check_fit(ckpt, target, heads, loaded, dropped, mismatched)
    model.load_state_dict(loaded, strict=False)
    initialised = tuple(k for k in target if k in heads and k not in loaded)
    return LoadReport(ckpt.path, ckpt.kind, tuple(loaded), dropped, initialised, resampled, ckpt.metadata)


def _head_keys(model) -> set[str]:
    """The state-dict keys of the model's classifier head(s)."""
    get = getattr(model, "get_classifier", None)
    classifier = get() if callable(get) else None
    names = {name for name, m in model.named_modules() if name and (m is classifier or name in _HEAD_NAMES)}
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}


def _drop_reason(key: str, tensor, target: dict, heads: set[str], projection: frozenset, keep_head: bool):
    """Why the checkpoint's ``key`` is not loaded (``None``: it is, if its shape fits)."""
    if key in projection:
        return PROJECTION if key.split(".", 1)[0] in ("head", "predictor") or ".head." in key else PRETRAINING
    if key in heads:
        return None if keep_head and tensor.shape == target[key].shape else HEAD
    if key not in target:
        return HEAD if key.split(".", 1)[0] in _HEAD_NAMES else UNEXPECTED
    return None


def _resample_pos_embed(model, posemb, ckpt: Checkpoint):
    """``(1, prefix + h*w, C)`` -> ``(1, prefix + H*W, C)`` on the model's grid ``(H, W)``."""
    import math

    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    side = math.isqrt(posemb.shape[1] - prefix)
    if side * side != posemb.shape[1] - prefix:
        raise UserError(f"pos_embed of {ckpt.path} has {posemb.shape[1] - prefix} positions after {prefix} prefix "
                        "token(s), not a square grid; sarvit resamples square grids only")
    new = tuple(model.patch_embed.grid_size)
    out = resample_abs_pos_embed(posemb, new_size=list(new), old_size=[side, side], num_prefix_tokens=prefix)
    return out, ((side, side), new)


def _check_fit(ckpt: Checkpoint, target: dict, heads: set[str], loaded: dict, dropped: dict, mismatched: list):
    """One UserError, naming the keys, for a checkpoint of another architecture."""
    described = _described(ckpt.metadata)
    if mismatched:
        raise UserError(f"the weights in {ckpt.path} do not fit the model (shapes differ): {_names(mismatched)}; "
                        f"{described}")
    if not loaded:
        raise UserError(f"none of the {len(ckpt.state)} tensors in {ckpt.path} ({ckpt.kind}) is a parameter of the "
                        f"model (looked for timm key names such as {_names(list(target)[:3])}); {described}")
    missing = [k for k in target if k not in loaded and k not in heads]
    if missing:
        raise UserError(f"{ckpt.path} lacks {len(missing)} tensors the model needs: {_names(missing)}; {described}")
    extra = _extra_layers(dropped, target)
    if extra:
        raise UserError(f"{ckpt.path} holds layers the model lacks: {_names(extra)}; {described}")


def _extra_layers(dropped: dict, target: dict) -> list[str]:
    """Unexpected keys that are another copy of a model layer (``blocks.7.*`` for a 6-block model):
    a deeper network, of which only part would load."""
    patterns = {re.sub(r"\.\d+\.", ".#.", k) for k in target}
    return [k for k, why in dropped.items() if why == UNEXPECTED and re.sub(r"\.\d+\.", ".#.", k) in patterns]


def _described(metadata: dict) -> str:
    if "model" in metadata:
        return (f"the checkpoint is a {metadata['model']} with model_kwargs {metadata.get('model_kwargs') or {}}: "
                "create the model with the same --model and --model-kwargs")
    return "create the model with the architecture the checkpoint was trained with (--model, --model-kwargs)"


# --- the last-block layout (appendix E.4) -----------------------------------------------------


def pretrained_layout(source: str | Path) -> str | None:
    """The last-block layout (``"A"``..``"D"``, Table 1(b)) that ``source`` was trained with, from
    sarvit's metadata; ``None`` when unknown (a checkpoint from elsewhere: a standard block)."""
    path = weights_file(source)
    if path.suffix != ".safetensors":
        return None
    layout = _safetensors_metadata(path).get("layout")
    if layout is None:
        return None
    try:
        return _letter(layout)
    except ConfigError:
        raise UserError(f"{path} names an unknown last-block layout {layout!r} in its metadata; the file was "
                        "changed after sarvit wrote it") from None


_LAYOUT_LETTERS = {"A": "A", "B": "B", "C": "C", "D": "D",
                   "standard": "A", "no_msa_skip": "B", "sar": "C", "no_skips": "D"}


def _letter(layout: str) -> str:
    """``"sar"`` -> ``"C"``: a layout name or letter of Table 1(b) as its letter."""
    letter = _LAYOUT_LETTERS.get(str(layout), _LAYOUT_LETTERS.get(str(layout).upper()))
    if letter is None:
        raise ConfigError(f"unknown last-block layout {layout!r}; choose one of A (standard), B (no_msa_skip), "
                          "C (sar), D (no_skips)")
    return letter


def finetune_layout(source_layout: str | None, sar: bool, asked_layout: str | None) -> str:
    """The last-block layout to fine-tune with (appendix E.4: keep the pre-training architecture).

    Table 7:                                       the block fine-tuned
        SAR pre-training, no SAR fine-tuning       C (Eq. 10-11), trained with L_ce only
        no SAR pre-training, SAR fine-tuning       A (Eq. 1-2), trained with L_ce + lambda L_se
        both / neither                             C / A

    Args:
        source_layout: :func:`pretrained_layout` of the checkpoint (``None``: unknown, a standard block).
        sar: whether fine-tuning adds the SE term; it does not change the block.
        asked_layout: the layout the user set, or ``None``.

    Returns:
        A letter of Table 1(b). An asked layout wins only over a checkpoint of unknown layout
        (e.g. SAR weights trained elsewhere with Eq. 10-11).

    Raises:
        ConfigError: an unknown layout name, or an asked layout that contradicts the checkpoint's.
    """
    asked = None if asked_layout is None else _letter(asked_layout)
    if source_layout is None:
        return asked or "A"
    source = _letter(source_layout)
    if asked is not None and asked != source:
        term = "with" if sar else "without"
        raise ConfigError(f"the backbone was pre-trained with last-block layout {source}, and fine-tuning keeps the "
                          f"pre-training architecture (appendix E.4), {term} the SE term; leave the layout unset "
                          f"(--layout) or set it to {source}, instead of {asked_layout!r}")
    return source


def backbone_architecture(cfg):
    """``cfg`` with ``model`` and ``model_kwargs`` of the sarvit metadata of the weights ``cfg.pretrained``
    names, when they have it (linprobe, detect and segment build what was trained, and their
    config.yaml says what it is); a ``--model`` or ``--model-kwargs`` other than the default and
    the weights' own is refused."""
    import dataclasses

    from .config import TrainConfig

    path = weights_file(cfg.pretrained)
    meta = _safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    if meta.get("task") in ("detect", "segment"):  # a whole detector or segmenter, not a backbone
        raise ConfigError(f"{path} holds a `sarvit {meta['task']}` run's weights, not a backbone; give the backbone "
                          f"it was fine-tuned from ({meta.get('backbone', '`pretrained` in its config.yaml')})")
    if not meta.get("model"):
        return cfg
    kwargs = {k: v for k, v in (meta.get("model_kwargs") or {}).items() if k != "dynamic_img_size"}
    for flag, given, default, own in (("--model", cfg.model, TrainConfig().model, meta["model"]),
                                      ("--model-kwargs", cfg.model_kwargs, TrainConfig().model_kwargs, kwargs)):
        if given not in (default, own):
            raise ConfigError(f"{flag} {given}: the weights {path} are a {meta['model']} with model_kwargs {kwargs} "
                              f"(their sarvit metadata says so); leave {flag} out, the backbone is built as it was "
                              "trained")
    return dataclasses.replace(cfg, model=meta["model"], model_kwargs=kwargs)
