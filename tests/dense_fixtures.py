"""Tiny dense datasets written by the tests: coloured squares with exact boxes and masks, and a tiny
ViT backbone in a run folder."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {1: (220, 30, 30), 2: (30, 200, 30), 3: (40, 60, 230)}  # class id -> RGB
TINY_VIT = {"patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def squares(seed: int, height: int = 40, width: int = 48):
    """An image with 1-2 squares of classes 1..3 on grey noise: (image (H, W, 3) uint8, [(label, (H, W) bool)])."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 140, (height, width, 3)).astype(np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, 3))):
        label = int(rng.integers(1, 4))
        side = int(rng.integers(10, 18))
        y, x = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        mask = np.zeros((height, width), bool)
        mask[y:y + side, x:x + side] = True
        for earlier in objects:  # later squares hide earlier ones
            earlier[1][mask] = False
        image[mask] = COLOURS[label]
        objects.append((label, mask))
    return image, [(label, mask) for label, mask in objects if mask.any()]


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def write_coco(root: Path, train: int = 8, val: int = 4, shared: bool = True) -> Path:
    """``root/images/*.png`` and COCO instances (compressed RLE): one annotations.json with images[].split
    (``shared``) or annotations_train.json + annotations_val.json."""
    (root / "images").mkdir(parents=True)
    files = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    ann_id = 1
    for i in range(train + val):
        split = "train" if i < train else "val"
        image, objects = squares(i)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        files[split]["images"].append({"id": i + 1, "file_name": f"images/{i}.png", "height": image.shape[0],
                                       "width": image.shape[1], "split": split})
        for label, mask in objects:
            ys, xs = np.nonzero(mask)
            files[split]["annotations"].append({
                "id": ann_id, "image_id": i + 1, "category_id": label, "iscrowd": 0, "area": int(mask.sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                "segmentation": _rle(mask)})
            ann_id += 1
    categories = [{"id": k, "name": n} for k, n in ((1, "red"), (2, "green"), (3, "blue"))]
    if shared:
        merged = {"images": files["train"]["images"] + files["val"]["images"],
                  "annotations": files["train"]["annotations"] + files["val"]["annotations"], "categories": categories}
        (root / "annotations.json").write_text(json.dumps(merged))
    else:
        for split, content in files.items():
            (root / f"annotations_{split}.json").write_text(json.dumps({**content, "categories": categories}))
    return root


def write_masks(root: Path, train: int = 8, val: int = 4) -> Path:
    """The masks:DIR layout: images/ + masks/ (val), train_images/ + train_masks/, classes.txt; a void border."""
    for name in ("images", "masks", "train_images", "train_masks"):
        (root / name).mkdir(parents=True)
    for i in range(train + val):
        image, objects = squares(100 + i)
        ids = np.zeros(image.shape[:2], np.uint8)
        for label, mask in objects:
            ids[mask] = label
        ids[0, :] = 255  # a void row
        prefix = "train_" if i < train else ""
        Image.fromarray(image).save(root / f"{prefix}images" / f"s{i}.png")
        Image.fromarray(ids, mode="L").save(root / f"{prefix}masks" / f"s{i}.png")
    (root / "classes.txt").write_text("background\nred\ngreen\nblue\n")
    return root


def write_backbone_run(root: Path, layout: str = "C") -> Path:
    """A run folder holding best.safetensors of a tiny ViT (patch 4, trained at 16 px) with sarvit's metadata."""
    import torch

    from sarvit.checkpoint import save_weights
    from sarvit.factory import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 4, img_size=16, model_kwargs=TINY_VIT, layout=layout)
    root.mkdir(parents=True)
    save_weights(model, root / "best.safetensors", {"model": "vit_tiny_patch16_224", "model_kwargs": TINY_VIT,
                                                    "layout": layout, "query": "auto", "img_size": 16,
                                                    "num_classes": 4})
    return root
