"""Lovasz-Softmax loss (Berman et al., CVPR 2018): a convex surrogate of the per-class IoU.

The whole batch is flattened into one set of pixels (IoU over the batch, not per image).
Ignored pixels are not removed by indexing, which would need a device sync and dynamic
shapes; their errors are set to 0 instead. A zero error sorts last and contributes
error * gradient = 0, and sorting it last leaves the gradient of every earlier pixel
unchanged, so this equals dropping those pixels.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

from steel_seg.losses._inputs import prepare_inputs

CLASS_MODES = ("present", "all")


def lovasz_grad(truth_sorted: paddle.Tensor) -> paddle.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss at errors sorted in decreasing order.

    `truth_sorted` is (P, C): 1 where the pixel belongs to the class, in the order of that
    class's sorted errors. Returns the (P, C) weights that multiply the sorted errors.
    """
    total = truth_sorted.sum(axis=0, keepdim=True)
    intersection = total - truth_sorted.cumsum(axis=0)
    union = total + (1.0 - truth_sorted).cumsum(axis=0)  # >= 1 at every position
    jaccard = 1.0 - intersection / union
    return paddle.concat([jaccard[:1], jaccard[1:] - jaccard[:-1]], axis=0)


def lovasz_softmax(
    logits: paddle.Tensor,
    label: paddle.Tensor,
    classes: str = "present",
    ignore_index: int = 255,
) -> paddle.Tensor:
    """Lovasz-Softmax over the flattened batch.

    `classes="present"` averages over classes that occur in the (non-ignored) label, "all"
    over every class. With no valid pixel (or no present class) the loss is 0.
    """
    if classes not in CLASS_MODES:
        raise ValueError(f"classes must be one of {list(CLASS_MODES)}, got {classes!r}")
    logits, target, valid = prepare_inputs(logits, label, ignore_index)
    num_classes = logits.shape[1]
    probs = F.softmax(logits, axis=1).transpose([0, 2, 3, 1]).reshape([-1, num_classes])
    mask = valid.reshape([-1, 1]).astype(probs.dtype)
    truth = F.one_hot(target.reshape([-1]), num_classes).astype(probs.dtype) * mask
    errors = (truth - probs).abs() * mask
    order = paddle.argsort(errors, axis=0, descending=True)
    errors_sorted = paddle.take_along_axis(errors, order, axis=0)
    truth_sorted = paddle.take_along_axis(truth, order, axis=0)
    per_class = (errors_sorted * lovasz_grad(truth_sorted)).sum(axis=0)
    if classes == "all":
        return per_class.mean()
    present = (truth.sum(axis=0) > 0).astype(per_class.dtype)
    count = present.sum()
    return (per_class * present).sum() / paddle.where(count > 0, count, paddle.ones_like(count))


class LovaszSoftmaxLoss(paddle.nn.Layer):
    """Lovasz-Softmax loss on softmax probabilities, batch flattened, ignored pixels dropped."""

    def __init__(self, ignore_index: int = 255, classes: str = "present"):
        super().__init__()
        if classes not in CLASS_MODES:
            raise ValueError(
                f"LovaszSoftmaxLoss: classes must be one of {list(CLASS_MODES)}, got {classes!r}"
            )
        self.ignore_index = ignore_index
        self.classes = classes

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
        return lovasz_softmax(logits, label, self.classes, self.ignore_index)
