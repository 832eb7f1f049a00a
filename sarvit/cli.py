"""The ``sarvit`` command line: a thin layer over the library.

    sarvit train --config RECIPE [--option value ...]
    sarvit eval --checkpoint RUN_DIR_OR_FILE [--data NAME]
    sarvit demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from . import __version__
from .config import FIELDS, ConfigError, load_config

__all__ = ["main", "build_parser"]

# errors a user can act on: printed as one message, without a traceback
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, TypeError)


# the options of `sarvit train`, in groups: (title, first field of the group)
TRAIN_GROUPS = (("data", "data"), ("model", "model"), ("SAR", "sar"), ("optimisation", "epochs"),
                ("augmentation and regularisation", "smoothing"), ("run", "seed"))


def _metavar(name: str) -> str:
    from .config import CHOICES, _field_type

    if name in CHOICES:
        return "|".join(str(c) for c in CHOICES[name] if c is not None)
    kind, _ = _field_type(name)
    return {bool: "true|false", int: "N", float: "X", dict: "YAML", tuple: "LO,HI"}.get(kind, "TEXT")


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
    starts = {first: title for title, first in TRAIN_GROUPS}
    group = p
    for name, f in FIELDS.items():
        if name in starts:
            group = p.add_argument_group(f"{starts[name]} options")
        flag = "--lambda" if name == "lambda_" else "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=_metavar(name),
                           help=f"{f.metadata.get('help', '')} (default: {default})")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate saved weights: accuracy, spatial entropy, components per head",
        description="Evaluate weights saved by `sarvit train` (a run folder or a .safetensors file) on a "
        "dataset's validation/test split.",
    )
    p.add_argument("--checkpoint", required=True, help="run folder or .safetensors file")
    p.add_argument("--which", default="best", choices=["best", "last", "best_ema"], help="weights of a run folder")
    p.add_argument("--data", help="dataset name or ImageFolder root (default: the one the model was trained on)")
    p.add_argument("--data-root", help="folder where the named dataset lies")
    p.add_argument("--img-size", type=int, help="input resolution (default: the training resolution)")
    p.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction (default: the run's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--output", help="also write the metrics to this JSON file")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="baseline vs SAR on 100 Fashion-MNIST images a class; prints a table, writes a report",
        description="Train a 14x14-grid ViT twice on a small labelled subset of Fashion-MNIST (baseline and SAR, "
        "same seed and budget), evaluate both on the 10,000 test images, and write a report folder.",
    )
    p.add_argument("--output", help="report folder (default: reports/demo-<date>-<time>)")
    p.add_argument("--epochs", type=int, help="override the demo recipe's epochs")
    p.add_argument("--per-class", type=int, help="override the demo recipe's images per class")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sarvit",
        description="SAR: spatial-entropy regularisation for vision transformers (train, evaluate, demo).",
    )
    parser.add_argument("--version", action="version", version=f"sarvit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    sub.add_parser("recipes", help="list the YAML recipes shipped with sarvit")
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
    train(load_config(args.config, overrides))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint, which=args.which, data=args.data, data_root=args.data_root, img_size=args.img_size,
        crop_pct=args.crop_pct, batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
    )
    print(json.dumps(metrics, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
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


def _message(err: BaseException) -> str:
    """The error's own words; a DataLoader worker's re-raised error carries a traceback
    in its message, of which only the last line is the error."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"train": _cmd_train, "eval": _cmd_eval, "demo": _cmd_demo, "recipes": _cmd_recipes}
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return commands[args.command](args)
    except USER_ERRORS as err:
        if os.environ.get("SARVIT_DEBUG"):
            raise
        print(f"sarvit {args.command}: error: {_message(err)}\n(set SARVIT_DEBUG=1 to see the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sarvit {args.command}: interrupted; `--resume auto` continues from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
