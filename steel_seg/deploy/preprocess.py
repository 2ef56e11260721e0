"""Model input from images: resize, normalise, NCHW; the same arithmetic as training's eval.

`tests/test_deploy.py` checks this against `steel_seg.transforms.eval_pipeline` bit for bit:
an export is only the measured model if it sees the pixels the run was scored on.
"""

from __future__ import annotations

import cv2
import numpy as np

from steel_seg.deploy.spec import Preprocess


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 to size=(width, height), bilinear as training's `Resize`."""
    if image.shape[1::-1] == tuple(size):
        return image
    return cv2.resize(image, tuple(size), interpolation=cv2.INTER_LINEAR)


def normalise(image: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 HWC -> float32 CHW, (x / 255 - mean) / std in float32 like training's Normalize."""
    mean = np.asarray(pre.mean, np.float32)
    std = np.asarray(pre.std, np.float32)
    scaled = (image.astype(np.float32) - np.zeros(3, np.float32)) / np.full(3, 255.0, np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).astype(np.float32).transpose(2, 0, 1))


def model_input(images: list[np.ndarray], pre: Preprocess) -> np.ndarray:
    """A batch (N, 3, H, W) float32 from RGB images of any size."""
    return np.stack([normalise(resize_image(image, pre.size), pre) for image in images])
