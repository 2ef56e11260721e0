"""Decoding input images, refusing files that are cut short.

OpenCV decodes a JPEG truncated after its header into a grey-filled image with only a libjpeg
warning on stderr, so "it decoded" does not mean "it is whole". We check the end-of-image
marker (JPEG) and the IEND chunk (PNG) before decoding.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# Bytes some writers leave after the end marker (padding); still a whole file.
_TRAILING = b"\x00\r\n \t"


class UnreadableImage(ValueError):
    """An input that is not a whole, decodable image; the message names it."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def truncation_problem(data: bytes) -> str | None:
    """Why `data` is an incomplete JPEG/PNG, or None if it looks whole (or is another format)."""
    if data[:3] == b"\xff\xd8\xff":
        tail = data[-4096:].rstrip(_TRAILING)
        if not tail.endswith(b"\xff\xd9"):
            return "truncated JPEG (no end-of-image marker): the file was cut short, e.g. by an interrupted copy"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in data[-64:]:
            return "truncated PNG (no IEND chunk): the file was cut short"
    return None


def decode_rgb(data: bytes | np.ndarray, name: str = "<bytes>") -> np.ndarray:
    """(H, W, 3) uint8 RGB from encoded bytes; an incomplete or undecodable file raises."""
    buffer = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buffer.size == 0:
        raise UnreadableImage(name, "empty file")
    problem = truncation_problem(buffer.tobytes() if buffer.size < 8192 else buffer[:8].tobytes() + buffer[-4096:].tobytes())
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
