"""Shared fixtures: small hand-built data sets in the Kaggle layout."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from steel_seg.data.rle import rle_encode

# (image id, {class id: (row0, row1, col0, col1)}) for a 32x64 (H x W) image.
TINY_LAYOUT = {
    "a.jpg": {1: (2, 6, 3, 9)},
    "b.jpg": {3: (10, 30, 5, 40)},
    "c.jpg": {3: (0, 8, 0, 64), 4: (20, 32, 10, 20)},
    "d.jpg": {},
    "e.jpg": {2: (5, 25, 30, 32)},
    "f.jpg": {},
}


def write_kaggle_folder(root: Path, layout: dict, shape=(32, 64), old_format=False, seed=0) -> dict[str, np.ndarray]:
    """Write train.csv + train_images/ for `layout`; returns each image's true label map."""
    rng = np.random.default_rng(seed)
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    labels = {}
    rows = []
    for image_id, boxes in layout.items():
        image = rng.integers(60, 200, size=(*shape, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "train_images" / image_id), image)
        label = np.zeros(shape, np.uint8)
        for class_id, (r0, r1, c0, c1) in boxes.items():
            label[r0:r1, c0:c1] = class_id
        labels[image_id] = label
        for class_id in range(1, 5):
            rle = rle_encode(label == class_id)
            if old_format:
                rows.append(f"{image_id}_{class_id},{rle}")
            elif rle:
                rows.append(f"{image_id},{class_id},{rle}")
    header = "ImageId_ClassId,EncodedPixels" if old_format else "ImageId,ClassId,EncodedPixels"
    (root / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    return labels


@pytest.fixture
def tiny_kaggle(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "kaggle"
    return root, write_kaggle_folder(root, TINY_LAYOUT)
