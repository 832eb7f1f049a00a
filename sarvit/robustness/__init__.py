"""Robustness to common corruptions (ImageNet-C, Table 8 of the paper) and ImageNet-A.

- ``corruptions``: the 15 + 4 corruption types applied on the fly, seeded per image.
- ``views``: datasets yielding an image's clean and corrupted tensors.
- ``scores``: corruption error, mCE and relative mCE, references, the printed table.
- ``evaluate``: ``evaluate_corruptions(model, dataset, transform, ...)`` and the
  checkpoint wrapper behind ``sarvit eval --corruptions`` / ``--data imagenet_c|imagenet_a``.
"""

from .corruptions import corrupt_array, corruption_names, image_seed, resolve_corruptions, resolve_severities
from .evaluate import (
    evaluate_checkpoint_corruptions, evaluate_corruptions, evaluate_imagenet_a, evaluate_imagenet_c, format_results,
    predict,
)
from .scores import ALEXNET_ERRORS, Reference, corruption_errors, load_reference, relative_corruption_errors, summarise
from .views import CorruptedViews, SingleView, split_eval_transform

__all__ = [
    "corrupt_array", "corruption_names", "image_seed", "resolve_corruptions", "resolve_severities",
    "evaluate_corruptions", "evaluate_imagenet_c", "evaluate_imagenet_a", "evaluate_checkpoint_corruptions",
    "format_results", "predict", "ALEXNET_ERRORS", "Reference", "corruption_errors", "relative_corruption_errors",
    "load_reference", "summarise", "CorruptedViews", "SingleView", "split_eval_transform",
]
