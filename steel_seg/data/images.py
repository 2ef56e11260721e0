"""Reading images and labels from disk, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from steel_seg.data.errors import BadSampleError
from steel_seg.data.integrity import head_and_tail, truncation_problem
from steel_seg.data.paddlex_layout import Sample, read_label_png
from steel_seg.transforms import Resize


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; a missing, empty, truncated or undecodable file is a BadSampleError."""
    if not path.is_file():
        raise BadSampleError(path, "image file not found")
    # imdecode instead of imread: imread cannot tell a missing file from a corrupt one.
    data = np.fromfile(path, dtype=np.uint8)
    problem = truncation_problem(head_and_tail(data)) if data.size else None
    if problem:
        raise BadSampleError(path, problem)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise BadSampleError(path, "unreadable image (empty or not a decodable JPEG/PNG/BMP)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Image and label at full size; their sizes must agree."""
    image = read_image(sample.image)
    label = read_label_png(sample.label)
    if image.shape[:2] != label.shape:
        raise BadSampleError(
            sample.label,
            f"label is {label.shape[1]}x{label.shape[0]} but image {sample.image.name} is "
            f"{image.shape[1]}x{image.shape[0]}",
        )
    return image, label


def resize_pair(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize to size=(width, height) exactly as the training pipeline's Resize does.

    Sharing the transform keeps cached pixels identical to what an uncached run would see
    (bilinear image, centre-sampled nearest label).
    """
    if image.shape[1::-1] == tuple(size):
        return image, label
    return Resize(tuple(size))(image, label, None)
