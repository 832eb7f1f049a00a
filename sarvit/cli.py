"""The ``sarvit`` command line: a thin layer over the library.

    sarvit train --config RECIPE [--option value ...]
    sarvit pretrain --method dino|mocov3 [--sar true|false] [--option value ...]
    sarvit finetune --pretrained RUN_OR_FILE [--option value ...]
    sarvit linprobe --checkpoint RUN_OR_FILE --data NAME [--option value ...]
    sarvit eval --checkpoint RUN_DIR_OR_FILE [--data NAME]
    sarvit demo
    sarvit study STUDY.yaml [--jobs N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from . import __version__
from .config import (CHOICES, COMMAND_TASKS, FIELDS, RULES, TASK_DEFAULTS, ConfigError, check_field, load_config,
                     parse_value, task_fields)
from .errors import user_message

__all__ = ["main", "build_parser"]

# `sarvit.errors.UserError` and environment faults (full disk, read-only folder) are printed
# as one line without a traceback (`sarvit.errors.user_message`); anything else is a bug.


# the options of the training commands, in groups: (title, first field of the group)
TRAIN_GROUPS = (("data", "data"), ("model", "model"), ("SAR", "sar"), ("optimisation", "epochs"),
                ("augmentation and regularisation", "smoothing"), ("self-supervised", "task"),
                ("transfer", "pretrained"), ("run", "seed"))


def _checked(name: str):
    """An argparse ``type``: read and range-check a value as the ``TrainConfig`` field ``name``."""

    def convert(text: str):
        try:
            value = parse_value(name, text)
            check_field(name, value)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    convert.__name__ = name
    return convert


def _metavar(name: str) -> str:
    from .config import _field_type

    if name in CHOICES:
        return "|".join(str(c) for c in CHOICES[name] if c is not None)
    kind, _ = _field_type(name)
    return {bool: "true|false", int: "N", float: "X", dict: "YAML", tuple: "LO,HI"}.get(kind, "TEXT")


def _add_config_options(p, tasks: tuple[str, ...], flags: dict[str, str] | None = None,
                        required: tuple[str, ...] = (), helps: dict[str, str] | None = None) -> None:
    """One option per field the ``tasks`` read (``sarvit.config.task_fields``), in titled groups;
    ``flags`` renames some (field -> flag), ``required`` must be given, ``helps`` replaces some
    fields' help text for this command."""
    flags, helps = flags or {}, helps or {}
    p.allow_abbrev = False  # `--checkpoint` must not be read as --checkpoint-interval
    order = list(FIELDS)
    starts = [(order.index(first), title) for title, first in TRAIN_GROUPS]
    task_defaults = TASK_DEFAULTS.get(tasks[0], {}) if len(tasks) == 1 else {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    read = {name for task in tasks for name in task_fields(task)}
    for name in (n for n in order if n in read):
        if name == "task" and name not in flags:
            continue
        title = [t for i, t in starts if i <= order.index(name)][-1]
        group = groups.get(title) or groups.setdefault(title, p.add_argument_group(f"{title} options"))
        f = FIELDS[name]
        flag = flags.get(name) or ("--lambda" if name == "lambda_" else "--" + name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = task_defaults.get(name, default)
        rule = RULES[name]
        admits = f"{rule.requirement()}; " if rule.range is not None else ""
        shown = "required" if name in required else f"default: {default}"
        text = f"{helps.get(name, f.metadata.get('help', ''))} ({admits}{shown})"
        metavar = _metavar(name)
        if name == "task":  # `sarvit pretrain --method`
            metavar = "|".join(COMMAND_TASKS["pretrain"])
            text = "the self-supervised method (required, unless the recipe sets `task`)"
        group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=metavar, help=text)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (baseline or SAR) from a YAML recipe",
        description="Train a timm ViT with or without the SAR spatial-entropy term. A YAML recipe sets the "
        "defaults (--config, a path or the name of a recipe shipped with sarvit, see `sarvit recipes`); every "
        "option below overrides it. Under torchrun it trains on several GPUs or nodes.",
        epilog="example: sarvit train --config fashion_mnist_cpu --sar false --output runs/fmnist-baseline",
    )
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe: a file, or a shipped recipe's name")
    _add_config_options(p, ("supervised",))


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune pre-trained weights (SAR in pre-training, fine-tuning, both: Table 7)",
        description="`sarvit train` from pre-trained weights: a sarvit run folder (train or pretrain) or weights "
        "file, a timm state dict, or a DINO / MoCo v3 checkpoint. The classifier head is new; the keys used, "
        "dropped and newly initialised are printed. A backbone pre-trained with SAR keeps its Eq. 10-11 last block "
        "when fine-tuned without the SE term (--sar false); one pre-trained without SAR keeps the standard block "
        "when the SE term is added (appendix E.4).",
        epilog="example: sarvit finetune --pretrained runs/dino-sar --config cifar100_finetune --sar true",
    )
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe: a file, or a shipped recipe's name")
    _add_config_options(p, ("supervised",), required=("pretrained",))


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pre-training: DINO or MoCo v3, with or without SAR (appendix C)",
        description="Pre-train a ViT without labels with DINO (multi-crop self-distillation) or MoCo v3 "
        "(momentum contrast); with --sar true the student / query encoder gets the Eq. 10-11 last block and "
        "lambda * L_se on the global views. Same run folders, checkpoints, exact resume and torchrun as `sarvit "
        "train`. Labels are read only for the 20-NN monitor. The run folder gets backbone.safetensors for "
        "`sarvit linprobe` and `sarvit finetune`.",
        epilog="example: sarvit pretrain --config fashion_mnist_dino_cpu --sar true --output runs/dino-sar",
    )
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe: a file, or a shipped recipe's name")
    _add_config_options(p, COMMAND_TASKS["pretrain"], flags={"task": "--method"})


def _add_linprobe(sub) -> None:
    p = sub.add_parser(
        "linprobe",
        help="linear probing of a frozen backbone (DINO's protocol)",
        description="Train a linear classifier on the frozen backbone's features (the class tokens of the last "
        "--n-last-blocks blocks after the final norm, optionally with the mean patch token), DINO's protocol: SGD, "
        "random-resized crops and flips for training, one centre crop for evaluation; top-1 and top-5.",
        epilog="example: sarvit linprobe --checkpoint runs/dino-sar --config fashion_mnist_linprobe_cpu",
    )
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe: a file, or a shipped recipe's name")
    _add_config_options(p, ("linprobe",), flags={"pretrained": "--checkpoint"}, required=("pretrained",))


def _dense_helps(data: str) -> dict[str, str]:
    """The help texts ``sarvit detect`` / ``segment`` give where ``sarvit train``'s do not fit."""
    return {"data": f"the dataset: {data}",
            "pretrained": "the backbone to fine-tune: a sarvit run folder or weights file, a timm state dict, a "
                          "DINO or MoCo v3 checkpoint",
            "output": "run folder; default runs/<command>-<backbone>-<data>-seed<seed>"}


def _add_dense(sub) -> None:
    """``sarvit detect`` and ``sarvit segment``: ViTDet transfer (Tables 5 and 6, appendix E.3)."""
    p = sub.add_parser(
        "detect",
        help="fine-tune a pre-trained ViT for object detection: ViTDet + Mask R-CNN (Table 5)",
        description="Fine-tune the backbone of --backbone (a run folder or weights file; the SAR last block is "
        "kept) with ViTDet's simple feature pyramid and torchvision's Mask R-CNN (Faster R-CNN when the data has "
        "no masks, or with --dense-masks false). --data voc2007 (--data-root: the folder holding VOCdevkit/; "
        "trainval / test) or coco_json:DIR (DIR/annotations_train.json + annotations_val.json, or one "
        "annotations.json whose images[].split says train or val, as `sarvit data stamps` writes). Validation: "
        "COCO mAP and VOC mAP@0.5 of boxes (and masks); the best checkpoint by box mAP@0.5. Same run folders, "
        "checkpoints, exact resume and torchrun as `sarvit train`.",
        epilog="example: sarvit detect --backbone runs/stamps-sar --data coco_json:data/stamps "
        "--config stamps_detect_cpu --output runs/stamps-sar-detect",
    )
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe: a file, or a shipped recipe's name")
    _add_config_options(p, ("detect",), flags={"pretrained": "--backbone"}, required=("pretrained",),
                        helps=_dense_helps("voc2007 (--data-root: the folder holding VOCdevkit/) or coco_json:DIR"))
    p = sub.add_parser(
        "segment",
        help="fine-tune a pre-trained ViT for semantic segmentation: ViTDet pyramid + FPN head (Table 6)",
        description="Fine-tune the backbone of --backbone (the SAR last block is kept) with ViTDet's simple feature "
        "pyramid and a semantic FPN head, pixel cross-entropy (255 ignored). --data voc2012 (--data-root; "
        "ImageSets/Segmentation train / val) or masks:DIR (DIR/images + DIR/masks for validation, "
        "DIR/train_masks with DIR/train_images or DIR/train/ for training, DIR/classes.txt, as `sarvit data "
        "stamps` writes). Validation: mIoU; the best checkpoint by mIoU.",
        epilog="example: sarvit segment --backbone runs/stamps-sar --data masks:data/stamps "
        "--config stamps_segment_cpu --output runs/stamps-sar-segment",
    )
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe: a file, or a shipped recipe's name")
    _add_config_options(p, ("segment",), flags={"pretrained": "--backbone"}, required=("pretrained",),
                        helps=_dense_helps("voc2012 (--data-root: the folder holding VOCdevkit/) or masks:DIR"))


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate saved weights: accuracy, spatial entropy, components per head",
        description="Evaluate weights saved by `sarvit train` (a run folder or a .safetensors file) on a "
        "dataset's validation/test split.",
    )
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder (RUN/checkpoints/step-N) "
                   "or .safetensors file")
    p.add_argument("--which", default="best", choices=["best", "last", "best_ema"], help="weights of a run folder")
    p.add_argument("--data", help="dataset name or ImageFolder root (default: the one the model was trained on)")
    p.add_argument("--data-root", help="folder where the named dataset lies")
    p.add_argument("--img-size", type=_checked("img_size"),
                   help="input resolution (default: the training resolution; another one resamples the position "
                   "embeddings)")
    p.add_argument("--crop-pct", type=_checked("crop_pct"), default=None,
                   help="centre-crop fraction (default: the run's)")
    p.add_argument("--batch-size", type=_checked("batch_size"), default=256)
    p.add_argument("--workers", type=_checked("workers"), default=4)
    p.add_argument("--device", type=_checked("device"), default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--amp", default="auto", choices=CHOICES["amp"])
    p.add_argument("--output", help="also write the metrics to this JSON file (checked writable before the run)")
    _add_robustness_options(p)


def _add_robustness_options(p) -> None:
    g = p.add_argument_group(
        "robustness options",
        "ImageNet-C style corruptions applied on the fly to any dataset, or the real ImageNet-C / ImageNet-A folders "
        "(--data imagenet_c|imagenet_a --data-root DIR). Results go to corruptions.json (imagenet_c.json, "
        "imagenet_a.json) in the run folder, or to --output.",
    )
    g.add_argument("--corruptions", nargs="?", const="common", metavar="LIST",
                   help="evaluate under corruptions: common (the 15 of ImageNet-C, the default), validation (the 4 "
                   "extra), all, or a comma-separated list of names")
    g.add_argument("--severities", metavar="1,2,3,4,5", help="corruption severities (default: 1,2,3,4,5)")
    g.add_argument("--corruption-reference", metavar="RUN_OR_JSON",
                   help="normalise the corruption errors (CE, mCE) by a reference: a run folder evaluated with "
                   "--corruptions, a JSON file of errors (%%), or alexnet (ImageNet-C's); without it the mean "
                   "error is reported unnormalised")
    g.add_argument("--seed", type=int, default=0, help="seed of the corruptions, drawn per image (default: 0)")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="baseline vs SAR on 100 Fashion-MNIST images a class; prints a table, writes a report",
        description="Train a 14x14-grid ViT twice on a small labelled subset of Fashion-MNIST (baseline and SAR, "
        "same seed and budget), evaluate both on the 10,000 test images, and write a report folder.",
    )
    p.add_argument("--output", help="report folder (default: reports/demo-<date>-<time>)")
    p.add_argument("--epochs", type=_checked("epochs"), help="override the demo recipe's epochs")
    p.add_argument("--per-class", type=_checked("per_class"), help="override the demo recipe's images per class")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --output")


def _add_attention(sub) -> None:
    p = sub.add_parser(
        "attention",
        help="draw the last block's attention, 60%%-mass masks and components of checkpoints, per head",
        description="One row pair per image, one column group per checkpoint, one column per head: the post-softmax "
        "attention of the query ([CLS], or the mean patch query of a model without one) with the outline of its "
        "60% mass, and the connected components of ReLU(S - mean). Images "
        "are resized to --img-size without a crop; checkpoints trained at another size are resampled.",
        epilog="example: sarvit attention --checkpoint runs/baseline --checkpoint runs/sar --data voc2012 "
        "--data-root ~/data --images 4 --img-size 480 --output attention.png",
    )
    p.add_argument("--checkpoint", action="append", required=True, help="run folder or weights file; repeat to compare")
    p.add_argument("--data", help="dataset name, ImageFolder root, voc2012, or a folder with images/ and masks/")
    p.add_argument("--data-root", help="folder where the named dataset lies")
    p.add_argument("--images", type=int, default=4, help="number of images (evenly spaced over the split; default 4)")
    p.add_argument("--image-dir", help="a folder of image files to draw instead of --data")
    p.add_argument("--img-size", type=int, help="input size (default: the first checkpoint's training size)")
    p.add_argument("--which", default="best", choices=["best", "last", "best_ema"], help="weights of a run folder")
    p.add_argument("--mass", type=float, default=0.6, help="attention mass the outline keeps (default 0.6)")
    p.add_argument("--model", help="architecture of weights not written by sarvit: a timm name "
                   "(vit_small_patch16_224, t2t_vit_14, pvt_small, cvt_13, swin_tiny_patch4_window7_224, pvt_v2_b0, "
                   "...) or torchvision:vit_b_16")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", required=True, help="the PNG file to write")


def _add_jaccard(sub) -> None:
    p = sub.add_parser(
        "jaccard",
        help="Jaccard similarity of the thresholded attention with object masks (Table 11 protocol)",
        description="Per head keep 60% of the post-softmax attention mass of the query ([CLS] or mean patch query) at"
        " --img-size x --img-size, upsample "
        "it by the key grid's stride, take the best IoU over heads for each object class of an image (0 and 255 "
        "excluded), average over the objects, then over the images. Void pixels (255) count in the union, as in the "
        "published evaluation, unless --void-fix. The query is the class token, or the mean patch query for models "
        "without one (Swin, PVT v2).",
        epilog="example: sarvit jaccard --checkpoint runs/sar --data voc2012 --data-root ~/data --output sar-voc.csv",
    )
    p.add_argument("--checkpoint", required=True, help="run folder or weights file")
    p.add_argument("--data", required=True, help="voc2012, or a folder with images/ and masks/ (same stems)")
    p.add_argument("--data-root", help="for voc2012: the folder holding VOCdevkit/VOC2012 (or VOC2012)")
    p.add_argument("--img-size", type=int, default=480, help="input size, a multiple of the key grid's stride: "
                   "the patch size of a ViT, 32 for PVT, CvT and Swin (default 480)")
    p.add_argument("--void-fix", action="store_true", help="leave void pixels out of intersection and union")
    p.add_argument("--mass", type=float, default=0.6, help="attention mass each head keeps (default 0.6)")
    p.add_argument("--which", default="best", choices=["best", "last", "best_ema"], help="weights of a run folder")
    p.add_argument("--model", help="architecture of weights not written by sarvit: a timm name "
                   "(vit_small_patch16_224, t2t_vit_14, pvt_small, cvt_13, swin_tiny_patch4_window7_224, pvt_v2_b0, "
                   "...) or torchvision:vit_b_16")
    p.add_argument("--output", help="per-image CSV (default: jaccard-<data>-<size>[-voidfix].csv in the run folder)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")


def _add_curves(sub) -> None:
    p = sub.add_parser("curves", help="draw a run's training curves into RUN/curves.png",
                       description="Loss terms, validation top-1, spatial entropy and components per head "
                       "against epochs, from RUN/metrics.jsonl.")
    p.add_argument("run", metavar="RUN", help="run folder (holds metrics.jsonl)")


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study", help="run a grid of trainings over seeds and write a report",
        description="Expand a study file (methods x grid cells x seeds over any `sarvit train` option, or `sarvit "
        "pretrain` ones with a linear probe of every run: `command: pretrain`, `probe:`; `transfer:` fine-tunes "
        "every run's weights with `sarvit detect` / `sarvit segment` after its training) into runs, "
        "run those not finished yet (an interrupted run continues from its checkpoint), then write report.md, "
        "report.html (self-contained), runs.csv and figures/ into the output folder: mean +- std over seeds and "
        "each method's difference to the baseline with a paired 95% confidence interval.",
        epilog="example: sarvit study cpu_stamps_jaccard --jobs 2 (shipped studies: sarvit/studies/)",
    )
    p.add_argument("spec", metavar="STUDY", help="a study file, or the name of a shipped study (sarvit/studies/)")
    p.add_argument("--output", metavar="DIR", help="report folder (default results/<name>)")
    p.add_argument("--runs", metavar="DIR", help="where the run folders lie (default: the study file's `runs`, "
                   "relative to the output; else DIR/runs); studies that share it share identical runs")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="set a sarvit train option in every run, over what the study file says (repeatable), "
                   "e.g. --set data_root=/data/imagenet; probe.OPTION=VALUE sets it in every linear probe, "
                   "detect.OPTION=VALUE / segment.OPTION=VALUE in every such transfer stage")
    p.add_argument("--jobs", type=_positive_int("jobs"), default=1,
                   help="runs side by side (default 1); each gets cores/jobs threads, or one of --devices")
    p.add_argument("--threads", type=_positive_int("threads"), help="threads per run (default cores/jobs)")
    p.add_argument("--devices", metavar="LIST", help="GPUs for the parallel runs, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--torchrun", type=_positive_int("torchrun"), default=0, metavar="N",
                   help="run each training under torchrun with N processes")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="print the runs, their state and commands; run nothing")
    what.add_argument("--report-only", action="store_true", help="write the report from the runs that exist; run nothing")


def _positive_int(name: str):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number >= 1; got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1; got {value}")
        return value

    convert.__name__ = name
    return convert


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="build the offline benchmark datasets",
                       description="Build benchmark datasets from data that ships offline.")
    datasets = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    s = datasets.add_parser(
        "stamps",
        help="a masked classification + segmentation benchmark from Tux Paint's photographic stamps",
        description="Paste the photographic cut-outs of the Debian package tuxpaint-stamps-default (7 classes, split "
        "by object) on random crops of real photographs bundled with scikit-image and scikit-learn. Writes train/ "
        "and val/ (an ImageFolder for `sarvit train --data DIR`), images/ + masks/ of the val images (class ids, "
        "255 void, for `sarvit jaccard --data DIR`), train_masks/ of the training images (for `sarvit segment "
        "--data masks:DIR`), annotations.json (COCO boxes and RLE masks of both splits, for `sarvit detect --data "
        "coco_json:DIR`) and a README. "
        "Same seed, same bytes; an existing non-empty DIR is never overwritten.",
        epilog="example: sarvit data stamps --output data/stamps && "
        "sarvit train --config stamps_cpu --data data/stamps --output runs/stamps-sar",
    )
    s.add_argument("--output", required=True, metavar="DIR", help="the dataset folder to create (absent or empty)")
    # defaults live in sarvit.data.stamps.build_stamps (imported only when the command runs)
    s.add_argument("--seed", type=int, default=argparse.SUPPRESS, metavar="N", help="split, objects and composition (default: 0)")
    s.add_argument("--size", type=int, default=argparse.SUPPRESS, metavar="PX", help="image side (default: 224)")
    s.add_argument("--train-per-class", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="training images per class (default: 100)")
    s.add_argument("--val-per-class", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="validation images per class (default: 30)")
    s.add_argument("--stamps-dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="the Tux Paint stamps (default: /usr/share/tuxpaint/stamps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sarvit",
        description="SAR: spatial-entropy regularisation for vision transformers (train, evaluate, demo).",
    )
    parser.add_argument("--version", action="version", version=f"sarvit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_pretrain(sub)
    _add_finetune(sub)
    _add_linprobe(sub)
    _add_dense(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_attention(sub)
    _add_jaccard(sub)
    _add_curves(sub)
    _add_study(sub)
    _add_data(sub)
    sub.add_parser("recipes", help="list the YAML recipes shipped with sarvit")
    return parser


def _run_config(args: argparse.Namespace, command: str):
    """The configuration of a training command: recipe <- options; a run's own config.yaml
    (``--config RUN/config.yaml`` or ``--resume RUN`` alone) continues that run where it lies."""
    from .runs import RunFolder, run_folder_of

    overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
    config = args.config
    if config is None and overrides.get("resume") not in (None, "auto"):
        run = RunFolder(run_folder_of(Path(overrides["resume"]).expanduser()))
        if run.config.is_file():  # `--resume RUN` alone: the run's own options
            config = str(run.config)
    if config and "output" not in overrides:
        recipe = Path(config).expanduser()
        if recipe.name == "config.yaml" and RunFolder(recipe.parent).holds_run():
            # a run's own options: the run is where that file lies now, not where it was written;
            # --resume and --extend are choices of the session that wrote it, not of this one
            overrides["output"] = os.path.abspath(recipe.parent)
            overrides.setdefault("resume", None)
            overrides.setdefault("extend", False)
    ignored: list[str] = []
    cfg = load_config(config, overrides, command=command, ignored=ignored)  # errors answer before torch is imported
    if ignored:
        print(f"sarvit {command}: note: --method {cfg.task} does not read these options of the recipe (they are "
              f"the other method's): {', '.join(ignored)}", file=sys.stderr)
    if command == "finetune" and cfg.pretrained is None:
        raise ConfigError("sarvit finetune needs --pretrained: a run folder or weights file to start from")
    if command == "linprobe" and cfg.pretrained is None:
        raise ConfigError("sarvit linprobe needs --checkpoint: the run folder or weights file to probe")
    if command in ("detect", "segment") and cfg.pretrained is None:
        raise ConfigError(f"sarvit {command} needs --backbone: the run folder or weights file to fine-tune")
    return cfg


# the training commands: command -> (module, function) run on the configuration
TRAINERS = {"train": ("train", "train"), "finetune": ("train", "train"), "pretrain": ("pretrain", "pretrain"),
            "linprobe": ("linprobe", "linprobe"), "detect": ("dense.tasks", "detect"),
            "segment": ("dense.tasks", "segment")}


def _cmd_training(command: str):
    """``sarvit train|finetune|pretrain|linprobe``: options checked, then the library imported and run."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        cfg = _run_config(args, command)
        module, function = TRAINERS[command]
        getattr(importlib.import_module(f".{module}", __package__), function)(cfg)
        return 0

    return run


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.output:
        check_writable_file(args.output)  # before minutes of evaluation, not after
    if not Path(args.checkpoint).expanduser().exists():  # answered before torch is imported
        from .errors import WeightsNotFound

        raise WeightsNotFound(f"no such file or run folder: {args.checkpoint}")
    if args.corruptions is not None or args.data in ("imagenet_c", "imagenet_a"):
        return _cmd_eval_corruptions(args)
    if args.severities or args.corruption_reference:
        raise ConfigError("--severities and --corruption-reference need --corruptions")
    from .evaluation import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint, which=args.which, data=args.data, data_root=args.data_root, img_size=args.img_size,
        crop_pct=args.crop_pct, batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
    )
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        from .checkpoint import atomic_write

        atomic_write(args.output, lambda tmp: tmp.write_text(text))
    return 0


def check_writable_file(path: str) -> None:
    """Raise ``ConfigError`` unless a file can be written at ``path`` (its folder is created)."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--output {path} is a folder; give a file name, e.g. {target / 'metrics.json'}")
    existing = next(p for p in target.absolute().parents if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"cannot write --output {path}: {existing} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write --output {path}: {err.strerror or err}; choose a file in a writable "
                          "folder") from None


def _cmd_eval_corruptions(args: argparse.Namespace) -> int:
    from .robustness import evaluate_checkpoint_corruptions

    evaluate_checkpoint_corruptions(
        args.checkpoint, which=args.which, data=args.data, data_root=args.data_root, img_size=args.img_size,
        crop_pct=args.crop_pct, corruptions=args.corruptions, severities=args.severities,
        reference=args.corruption_reference, seed=args.seed, batch_size=args.batch_size, workers=args.workers,
        device=args.device, amp=args.amp, output=args.output,
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, epochs=args.epochs, per_class=args.per_class, resume=args.resume)
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from importlib import resources

    import yaml

    for path in sorted(resources.files("sarvit").joinpath("configs").iterdir(), key=lambda p: p.name):
        if path.name.endswith(".yaml"):
            text = path.read_text()
            first = next((ln[1:].strip() for ln in text.splitlines() if ln.startswith("#")), "")
            yaml.safe_load(text)
            print(f"{path.name.removesuffix('.yaml'):32s} {first}")
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    from .analysis.gallery import attention_figure

    path = attention_figure(args.checkpoint, args.output, data=args.data, data_root=args.data_root, count=args.images,
                            image_dir=args.image_dir, img_size=args.img_size, which=args.which, mass=args.mass,
                            model_name=args.model, device=args.device)
    print(f"attention figure: {path}")
    return 0


def _cmd_jaccard(args: argparse.Namespace) -> int:
    from .analysis.protocol import default_output, run_jaccard

    output = args.output or default_output(args.checkpoint, args.data, args.img_size, args.void_fix)
    summary, _ = run_jaccard(args.checkpoint, args.data, data_root=args.data_root, img_size=args.img_size,
                             void_fix=args.void_fix, mass=args.mass, which=args.which, output=output,
                             batch_size=args.batch_size, workers=args.workers, device=args.device,
                             model_name=args.model)
    print(f"Jaccard {summary.jaccard:.4f} over {summary.images_scored} images and {summary.objects} objects "
          f"({summary.images - summary.images_scored} of {summary.images} images without objects left out); "
          f"{args.mass:.0%} mass, {args.img_size}x{args.img_size}, {summary.void_mode}")
    if output:
        print(f"per-image results: {output}")
    return 0


def _cmd_curves(args: argparse.Namespace) -> int:
    from .analysis.curves import write_curves

    print(f"curves: {write_curves(args.run)}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    import shlex

    from .study.spec import load_study

    # the command that runs the study (a --report-only pass rewrites the report of those same runs)
    argv = [a for a in sys.argv[2:] if a != "--report-only"] if sys.argv[1:2] == ["study"] else [args.spec]
    command = shlex.join(["sarvit", "study", *argv])
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write OPTION=VALUE, e.g. --set data_root=/data/imagenet")
        extra[key.strip()] = value
    study = load_study(args.spec, args.output, command=command, runs=args.runs, extra=extra)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    if args.devices is not None and not devices:
        raise ConfigError(f"--devices {args.devices!r} names no GPU; give indices such as 0,1")
    from .study.runner import all_commands, check_runs, run_study, status_of

    if args.list:
        for run in study.runs:
            print(f"{status_of(run):11s} {run.method} | {run.cell or '-'} | seed {run.seed}: "
                  + " && ".join(shlex.join(command) for _, command in all_commands(study, run, args.torchrun)))
        return 0
    failed = []
    if args.report_only:
        from .study.runner import check_folders, check_output

        check_folders(study)  # a probe or stage made with other options is not reported under today's
        check_output(study)
    else:
        check_runs(study)
        failed = run_study(study, jobs=args.jobs, threads=args.threads, devices=devices, torchrun=args.torchrun)
    from .study.report import write_report

    report = write_report(study, study.output)
    print(f"report: {report} (and report.html, runs.csv, figures/ beside it)")
    if failed:
        print(f"sarvit study: {len(failed)} run(s) failed; their logs are in {study.runs_dir / 'logs'}; "
              "fix the cause and run the same command again (finished runs are kept)", file=sys.stderr)
        return 1
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from .data.stamps import build_stamps

    names = ("seed", "size", "train_per_class", "val_per_class", "stamps_dir")
    summary = build_stamps(args.output, **{k: getattr(args, k) for k in names if hasattr(args, k)})
    print(summary.text())
    return 0


def _thread_fault_hook(command: str, default):
    """A ``threading.excepthook`` that words an environment fault in a background thread
    (TensorBoard's writer on a full disk) as one line, as the main thread's are; a bug there
    keeps its traceback."""

    def hook(args) -> None:
        message = user_message(args.exc_value) if args.exc_value is not None else None
        if message is None:
            default(args)
        else:
            print(f"sarvit {command}: error in a background writer: {message}", file=sys.stderr)

    return hook


def _owner_text(command: str | None, unknown: list[str]) -> str | None:
    """For an option of another command given to ``command``: which commands read it (None otherwise)."""
    from .config import FIELDS, owner_hint

    for token in unknown:
        name = token.removeprefix("--").partition("=")[0].replace("-", "_")
        name = "lambda_" if name == "lambda" else name
        if command in TRAINERS and token.startswith("--") and name in FIELDS and owner_hint(name):
            return (f"{token.partition('=')[0]} is not an option of `sarvit {command}`{owner_hint(name)}; "
                    "remove it")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        text = _owner_text(args.command, unknown)
        if text is None:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        print(f"sarvit {args.command}: error: {text}", file=sys.stderr)
        return 2
    commands = {**{name: _cmd_training(name) for name in TRAINERS}, "eval": _cmd_eval, "demo": _cmd_demo,
                "recipes": _cmd_recipes, "attention": _cmd_attention, "jaccard": _cmd_jaccard, "curves": _cmd_curves, "data": _cmd_data,
                "study": _cmd_study}
    if args.command is None:
        parser.print_help()
        return 2
    import threading

    debug = os.environ.get("SARVIT_DEBUG", "") not in ("", "0")
    hook = threading.excepthook
    if not debug:
        threading.excepthook = _thread_fault_hook(args.command, hook)
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        resumable = "; `--resume auto` continues from the last checkpoint"
        then = {"train": resumable, "pretrain": resumable, "finetune": resumable, "linprobe": resumable,
                "detect": resumable, "segment": resumable,
                "demo": "; `--resume` with the same --output continues it",
                "study": "; the same command continues it (finished runs are kept)"}.get(args.command, "")
        print(f"sarvit {args.command}: interrupted{then}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sarvit recipes | head -1`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        message = None if debug else user_message(err)
        if message is None:  # a bug, or SARVIT_DEBUG=1: the traceback
            raise
        print(f"sarvit {args.command}: error: {message}\n(set SARVIT_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    finally:
        threading.excepthook = hook


if __name__ == "__main__":
    sys.exit(main())
