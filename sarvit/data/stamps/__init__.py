"""``sarvit data stamps``: a masked classification + segmentation benchmark from real photographs, offline.

Photographic cut-outs with alpha from the Debian package ``tuxpaint-stamps-default``
(GPL-2, ``/usr/share/tuxpaint/stamps``) are pasted with random scale, flip, colour jitter
and position on random crops of real photographs and textures bundled with scikit-image
and scikit-learn. Seven classes by Tux Paint's folders (birds, fish, flowers, fruit,
insects, mammals, vegetables), split by object, deterministic from a seed.

Modules: ``catalog`` (the photograph rule, classes, split by object), ``backgrounds``,
``compose`` (pasting, masks), ``coco`` (RLE and boxes), ``build`` (the folder),
``readme`` (the dataset's README, which documents the layout).

    from sarvit.data.stamps import build_stamps
    summary = build_stamps("data/stamps", seed=0)   # train/ val/ images/ masks/ train_masks/ annotations.json README.md
"""

from .build import DEFAULT_STAMPS_DIR, StampsNotFound, StampsSummary, StampsWriteError, build_stamps
from .catalog import CLASSES, find_stamps, is_photograph, split_by_object

__all__ = [
    "build_stamps", "StampsSummary", "StampsNotFound", "StampsWriteError", "DEFAULT_STAMPS_DIR",
    "CLASSES", "find_stamps", "is_photograph", "split_by_object",
]
