"""Severstal run-length encoding: 1-indexed `start length` pairs over column-major pixels."""

from __future__ import annotations

import numpy as np


class RLEError(ValueError):
    """A malformed run-length string; the message says where it came from."""


def _fail(where: str | None, problem: str) -> RLEError:
    prefix = f"{where}: " if where else ""
    return RLEError(f"{prefix}malformed EncodedPixels: {problem}")


def rle_decode(rle: str, shape: tuple[int, int], where: str | None = None) -> np.ndarray:
    """Decode `rle` into a boolean mask of `shape` (height, width).

    Pixels are numbered from 1, top to bottom and then left to right (Fortran order), as
    in Kaggle's Severstal `train.csv`. `where` (e.g. "train.csv row 12") prefixes errors.
    An empty or blank string is an empty mask.
    """
    height, width = shape
    total = height * width
    tokens = rle.split() if isinstance(rle, str) else []
    if len(tokens) % 2:
        raise _fail(where, f"odd number of tokens ({len(tokens)}); expected `start length` pairs")
    try:
        values = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        bad = next(t for t in tokens if not t.lstrip("-").isdigit())
        raise _fail(where, f"token {bad!r} is not an integer") from None
    starts, lengths = values[0::2], values[1::2]
    flat = np.zeros(total, dtype=bool)
    if len(starts) == 0:
        return flat.reshape((height, width), order="F")

    if (starts < 1).any():
        i = int(np.argmax(starts < 1))
        raise _fail(where, f"run {i + 1} starts at {starts[i]}; pixels are numbered from 1")
    if (lengths < 1).any():
        i = int(np.argmax(lengths < 1))
        raise _fail(where, f"run {i + 1} has length {lengths[i]}; lengths must be positive")
    ends = starts + lengths - 1  # last pixel of each run, inclusive
    if (ends > total).any():
        i = int(np.argmax(ends > total))
        raise _fail(
            where,
            f"run {i + 1} ({starts[i]} {lengths[i]}) ends at pixel {ends[i]}, past the "
            f"image's {total} pixels ({width}x{height})",
        )
    if len(starts) > 1:
        overlap = starts[1:] <= ends[:-1]
        if overlap.any():
            i = int(np.argmax(overlap))
            kind = "is not sorted" if starts[i + 1] < starts[i] else "overlaps the run before it"
            raise _fail(where, f"run {i + 2} ({starts[i + 1]} {lengths[i + 1]}) {kind}")

    # Mark run boundaries with +1/-1 and integrate: O(pixels), no Python loop over runs.
    edges = np.zeros(total + 1, dtype=np.int32)
    np.add.at(edges, starts - 1, 1)
    np.add.at(edges, ends, -1)
    flat = np.cumsum(edges[:-1]) > 0
    return flat.reshape((height, width), order="F")


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (non-zero = set) as Severstal RLE; an empty mask is ''."""
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {mask.shape}")
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])  # 0-based run starts and ends
    starts, ends = changes[0::2], changes[1::2]
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))
