"""Kaggle Severstal submission: one `ImageId,ClassId,EncodedPixels` row per image and defect class."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from steel_seg.data.rle import rle_encode

HEADER = ("ImageId", "ClassId", "EncodedPixels")


def submission_rows(image_id: str, mask: np.ndarray, class_ids) -> list[tuple[str, int, str]]:
    """Rows for one image's (H, W) class-id mask; Kaggle expects a row even for absent classes ('')."""
    if mask.ndim != 2:
        raise ValueError(f"{image_id}: expected an (H, W) class-id mask, got shape {mask.shape}")
    return [(image_id, int(c), rle_encode(mask == c)) for c in class_ids]


def write_submission(path, rows: Iterable[tuple[str, int, str]]) -> Path:
    """Write the CSV to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HEADER)
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a submission is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
