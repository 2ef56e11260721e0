"""Shared input checks for the losses: shapes, label dtype, the ignore mask, class weights."""

from __future__ import annotations

import math
from collections.abc import Sequence

import paddle

_INT_DTYPES = (paddle.int32, paddle.int64, paddle.int16, paddle.int8, paddle.uint8)
_HALF_DTYPES = (paddle.float16, paddle.bfloat16)


def prepare_inputs(
    logits: paddle.Tensor, label: paddle.Tensor, ignore_index: int
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Check shapes and return (logits, target, valid).

    `target` is `label` as int64 (N, H, W) with ignored pixels replaced by class 0, so it can
    index and one-hot safely; `valid` is the boolean (N, H, W) mask of pixels that count.
    Neither input is modified. Labels outside 0..C-1 (other than `ignore_index`) are not
    checked here, because that would force a device sync every step; Paddle's CPU kernels
    reject them, and the data pipeline validates masks when it reads them.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (N, C, H, W), got shape {list(logits.shape)}")
    if label.ndim == 4:
        if label.shape[1] != 1:
            raise ValueError(
                f"a 4-D label must be (N, 1, H, W), got shape {list(label.shape)}; "
                "pass class indices, not one-hot masks"
            )
        label = label.squeeze(1)
    n, _, h, w = logits.shape
    if list(label.shape) != [n, h, w]:
        raise ValueError(
            f"label shape {list(label.shape)} does not match logits {list(logits.shape)}; "
            f"expected [{n}, {h}, {w}] (or [{n}, 1, {h}, {w}])"
        )
    if label.dtype not in _INT_DTYPES:
        raise ValueError(f"label must hold integer class indices, got dtype {label.dtype}")
    if label.dtype != paddle.int64:
        label = label.astype("int64")
    if logits.dtype in _HALF_DTYPES:
        # Softmax, logs and sums over ~1e6 pixels lose too much in half precision.
        logits = logits.astype("float32")
    valid = label != ignore_index
    target = paddle.where(valid, label, paddle.zeros_like(label))
    return logits, target, valid


def check_class_weights(weight: Sequence[float] | None, owner: str) -> tuple[float, ...] | None:
    """Validate per-class weights given to `owner`; None means all classes weigh the same."""
    if weight is None:
        return None
    values = tuple(float(w) for w in weight)
    if not values:
        raise ValueError(f"{owner}: class weights are empty; give one weight per class or None")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"{owner}: class weights must be finite and >= 0, got {list(values)}")
    if not any(w > 0 for w in values):
        raise ValueError(f"{owner}: at least one class weight must be > 0, got {list(values)}")
    return values


def class_weight_tensor(
    layer: paddle.nn.Layer, logits: paddle.Tensor, owner: str
) -> paddle.Tensor | None:
    """The layer's `class_weight` buffer on the logits' device, checked against C.

    The buffer is moved at most once (when the layer was built before the device was chosen),
    so the hot path does no host-to-device copy.
    """
    weight = layer.class_weight
    if weight is None:
        return None
    num_classes = logits.shape[1]
    if weight.shape[0] != num_classes:
        raise ValueError(
            f"{owner}: {weight.shape[0]} class weights for {num_classes} classes; "
            "give one weight per class, background first"
        )
    if weight.place != logits.place:
        layer.class_weight = weight.to(logits.place)
        weight = layer.class_weight
    return weight.astype(logits.dtype)


def register_class_weight(layer: paddle.nn.Layer, weight: tuple[float, ...] | None) -> None:
    """Store weights as a non-persistable buffer: moves with the layer, stays out of checkpoints."""
    tensor = None if weight is None else paddle.to_tensor(weight, dtype="float32")
    layer.register_buffer("class_weight", tensor, persistable=False)
