"""COCO-style records: uncompressed run-length encoding, boxes and areas of instance masks.

The RLE is COCO's uncompressed form, which ``pycocotools.mask.frPyObjects`` reads:
``{"size": [H, W], "counts": [n0, n1, ...]}``, the mask flattened in column-major
(Fortran) order, runs alternating 0s and 1s and starting with a (possibly empty) run
of 0s.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rle_encode", "bbox", "annotation"]


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> ``{"size": [H, W], "counts": [...]}``."""
    pixels = mask.ravel(order="F").astype(np.int8)  # (H*W,) column-major
    changes = np.flatnonzero(np.diff(pixels)) + 1
    bounds = np.concatenate([[0], changes, [pixels.size]])
    counts = np.diff(bounds).tolist()
    if pixels.size and pixels[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def bbox(mask: np.ndarray) -> list[int]:
    """The tight box ``[x, y, width, height]`` (pixels) around a non-empty (H, W) bool mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("an empty instance mask has no box")
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def annotation(index: int, image_id: int, category_id: int, mask: np.ndarray, stamp: str) -> dict:
    """One instance: box, area, ``iscrowd`` 0, RLE segmentation and the source stamp's name."""
    return {
        "id": index, "image_id": image_id, "category_id": category_id, "bbox": bbox(mask),
        "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle_encode(mask), "stamp": stamp,
    }
