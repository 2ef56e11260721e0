"""Decoding input images, refusing files that are cut short.

A file cut short is refused before decoding (steel_seg.data.integrity says why): OpenCV would
decode it into a grey-filled image without an error.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from steel_seg.data.integrity import head_and_tail, truncation_problem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

class UnreadableImage(ValueError):
    """An input that is not a whole, decodable image; the message names it."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def decode_rgb(data: bytes | np.ndarray, name: str = "<bytes>") -> np.ndarray:
    """(H, W, 3) uint8 RGB from encoded bytes; an incomplete or undecodable file raises."""
    buffer = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buffer.size == 0:
        raise UnreadableImage(name, "empty file")
    problem = truncation_problem(head_and_tail(np.ascontiguousarray(buffer)))
    if problem:
        raise UnreadableImage(name, problem)
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None:
        raise UnreadableImage(name, "not a decodable image (JPEG/PNG/BMP/TIFF)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_rgb(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UnreadableImage(str(path), "no such file")
    return decode_rgb(np.fromfile(path, dtype=np.uint8), str(path))


def as_rgb(image: np.ndarray, name: str = "<array>") -> np.ndarray:
    """An array input as (H, W, 3) uint8 RGB: grey images are repeated over three channels."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise UnreadableImage(name, f"expected an (H, W, 3) RGB array, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise UnreadableImage(name, f"expected uint8 pixels, got {image.dtype}")
    return image[:, :, :3]
