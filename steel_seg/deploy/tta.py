"""Test-time augmentation views on NumPy batches, for the Predictor.

Same views and merges as training's `steel_seg.tta` (flips undo themselves; probabilities are
merged, never hard masks), on arrays instead of Paddle tensors.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import numpy as np

# View name -> axes of an NCHW batch to flip.
FLIP_AXES: dict[str, tuple[int, ...]] = {"identity": (), "hflip": (3,), "vflip": (2,), "hvflip": (2, 3)}


def _gmean(stack: np.ndarray) -> np.ndarray:
    merged = np.exp(np.log(np.clip(stack, 1e-8, None)).mean(axis=0))
    return merged / merged.sum(axis=1, keepdims=True)


MERGES = {"mean": lambda s: s.mean(axis=0), "gmean": _gmean, "max": lambda s: s.max(axis=0)}


def resolve(views: Sequence[str], merge: str = "mean") -> list[str]:
    """Identity first, then each named view once; unknown names are errors with a suggestion."""
    if merge not in MERGES:
        raise ValueError(f"unknown TTA merge `{merge}`; known: {', '.join(MERGES)}")
    names = ["identity"]
    for view in views:
        if view not in FLIP_AXES:
            close = difflib.get_close_matches(view, list(FLIP_AXES), n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(f"unknown TTA view `{view}`.{hint} Known: {', '.join(FLIP_AXES)}")
        if view not in names:
            names.append(view)
    return names


def augment(batch: np.ndarray, view: str) -> np.ndarray:
    axes = FLIP_AXES[view]
    return np.ascontiguousarray(np.flip(batch, axes)) if axes else batch


def merge(probs: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """Merge de-augmented probability batches (each N, C, H, W)."""
    return probs[0] if len(probs) == 1 else MERGES[how](np.stack(probs))
