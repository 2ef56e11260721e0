"""Test-time augmentation: run the model on augmented views, undo each view, merge probabilities.

A view is a pair (augment the input, de-augment the output). Only geometric views need
undoing; merging happens on softmax probabilities, never on hard masks (seed 000: merge as
0.5 * original + 0.5 * augmented, which is `mean` over the identity and one view).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Sequence

import paddle
import paddle.nn.functional as F

Tensor = paddle.Tensor


@dataclass(frozen=True)
class View:
    name: str
    augment: Callable[[Tensor], Tensor]
    deaugment: Callable[[Tensor], Tensor]


def _flip(axes: list[int]) -> Callable[[Tensor], Tensor]:
    return lambda x: paddle.flip(x, axis=axes)


def _same(x: Tensor) -> Tensor:
    return x


VIEWS: dict[str, View] = {
    "identity": View("identity", _same, _same),
    "hflip": View("hflip", _flip([3]), _flip([3])),
    "vflip": View("vflip", _flip([2]), _flip([2])),
    "hvflip": View("hvflip", _flip([2, 3]), _flip([2, 3])),
}


def _gmean(stack: Tensor) -> Tensor:
    merged = paddle.exp(paddle.log(stack.clip(min=1e-8)).mean(axis=0))
    return merged / merged.sum(axis=1, keepdim=True)  # back to a distribution per pixel


MERGES: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda stack: stack.mean(axis=0),
    "gmean": _gmean,
    "max": lambda stack: stack.max(axis=0),
}


def resolve_views(names: Sequence[str]) -> list[View]:
    """The views to run: always the original first, then each named one once."""
    views = [VIEWS["identity"]]
    for name in names:
        if name not in VIEWS:
            close = difflib.get_close_matches(name, list(VIEWS), n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(f"eval.tta: unknown view `{name}`.{hint} Known: {', '.join(VIEWS)}")
        if VIEWS[name] not in views:
            views.append(VIEWS[name])
    return views


def main_logits(outputs) -> Tensor:
    """PaddleSeg models return a list (main head first, auxiliary heads after)."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def predict_probs(model: paddle.nn.Layer, images: Tensor, views: Sequence[View] = (VIEWS["identity"],), merge: str = "mean") -> Tensor:
    """Softmax probabilities (N, C, H, W), merged over `views`."""
    probs = [view.deaugment(F.softmax(main_logits(model(view.augment(images))), axis=1)) for view in views]
    if len(probs) == 1:
        return probs[0]
    if merge not in MERGES:
        raise ValueError(f"unknown TTA merge `{merge}`; known: {', '.join(MERGES)}")
    return MERGES[merge](paddle.stack(probs))
