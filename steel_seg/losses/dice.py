"""Soft multi-class Dice loss on softmax probabilities, with an ignore label.

Reduction: intersections and sizes are summed over the whole batch and all pixels for each
class (one Dice per class, not per image), then the loss is 1 - the (weighted) mean over
classes. Per-batch sums keep small batches stable when a class is missing from one image; the
`smooth` term makes a class absent from both prediction and label count as Dice 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import paddle
import paddle.nn.functional as F

from steel_seg.losses._inputs import (
    check_class_weights,
    class_weight_tensor,
    prepare_inputs,
    register_class_weight,
)


def per_class_dice(
    logits: paddle.Tensor, label: paddle.Tensor, smooth: float = 1.0, ignore_index: int = 255
) -> paddle.Tensor:
    """Soft Dice of each class, shape (C,): (2*sum(p*g) + smooth) / (sum(p) + sum(g) + smooth)."""
    logits, target, valid = prepare_inputs(logits, label, ignore_index)
    num_classes = logits.shape[1]
    mask = valid.astype(logits.dtype).unsqueeze(1)
    probs = F.softmax(logits, axis=1) * mask
    truth = F.one_hot(target, num_classes).astype(logits.dtype).transpose([0, 3, 1, 2]) * mask
    axes = [0, 2, 3]
    intersection = (probs * truth).sum(axis=axes)
    size = probs.sum(axis=axes) + truth.sum(axis=axes)
    return (2.0 * intersection + smooth) / (size + smooth)


def dice_loss(
    logits: paddle.Tensor,
    label: paddle.Tensor,
    smooth: float = 1.0,
    weight: paddle.Tensor | None = None,
    ignore_index: int = 255,
) -> paddle.Tensor:
    """1 - mean over classes of the batch-summed soft Dice (weighted mean if `weight`)."""
    dice = per_class_dice(logits, label, smooth, ignore_index)
    if weight is None:
        return 1.0 - dice.mean()
    weight = weight.astype(dice.dtype)
    return 1.0 - (weight * dice).sum() / weight.sum()


class DiceLoss(paddle.nn.Layer):
    """Soft multi-class Dice loss; see the module docstring for how it reduces."""

    def __init__(
        self, smooth: float = 1.0, ignore_index: int = 255, weight: Sequence[float] | None = None
    ):
        super().__init__()
        if not (math.isfinite(smooth) and smooth > 0):
            # smooth = 0 turns a class absent from prediction and label into 0/0.
            raise ValueError(f"DiceLoss: smooth must be finite and > 0, got {smooth}")
        self.smooth = float(smooth)
        self.ignore_index = ignore_index
        register_class_weight(self, check_class_weights(weight, "DiceLoss"))

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        weight = class_weight_tensor(self, logits, "DiceLoss")
        return dice_loss(logits, label, self.smooth, weight, self.ignore_index)
