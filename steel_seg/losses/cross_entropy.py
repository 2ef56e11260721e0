"""Softmax cross-entropy with class weights and an ignore label, safe under Paddle 3 promotion."""

from __future__ import annotations

from collections.abc import Sequence

import paddle
import paddle.nn.functional as F

from steel_seg.losses._inputs import (
    check_class_weights,
    class_weight_tensor,
    prepare_inputs,
    register_class_weight,
)


def cross_entropy(
    logits: paddle.Tensor,
    label: paddle.Tensor,
    weight: paddle.Tensor | None = None,
    ignore_index: int = 255,
) -> paddle.Tensor:
    """Mean negative log-likelihood over the non-ignored pixels.

    With class weights `w` it is the weighted mean: sum(w[y] * nll) / sum(w[y]) over valid
    pixels, as in PyTorch and PaddleSeg. When no pixel counts the result is 0, still attached
    to the graph so `backward()` works and yields zero gradients.
    """
    logits, target, valid = prepare_inputs(logits, label, ignore_index)
    log_probs = F.log_softmax(logits, axis=1)
    nll = -paddle.take_along_axis(log_probs, target.unsqueeze(1), axis=1).squeeze(1)
    # Multiplying by the mask (not indexing) keeps shapes static and gives ignored pixels an
    # exact zero gradient.
    pixel_weight = valid.astype(nll.dtype)
    if weight is not None:
        class_of_pixel = paddle.gather(weight.astype(nll.dtype), target.flatten())
        pixel_weight = pixel_weight * class_of_pixel.reshape(target.shape)
    total = (pixel_weight * nll).sum()
    norm = pixel_weight.sum()
    return total / paddle.where(norm > 0, norm, paddle.ones_like(norm))


class CrossEntropyLoss(paddle.nn.Layer):
    """Softmax cross-entropy averaged over non-ignored pixels (class-weighted mean if weighted)."""

    def __init__(self, weight: Sequence[float] | None = None, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index
        register_class_weight(self, check_class_weights(weight, "CrossEntropyLoss"))

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        weight = class_weight_tensor(self, logits, "CrossEntropyLoss")
        return cross_entropy(logits, label, weight, self.ignore_index)
