"""Test-time augmentation for training-time (dygraph) models.

The views, merges and the batching runner live in `steel_seg.deploy.tta` (NumPy and OpenCV
only), so evaluation and the deployed Predictor run exactly the same TTA; this module plugs a
Paddle model into that runner and builds plans from `eval.*` settings.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import paddle

from steel_seg.deploy.tta import MERGES, TTAPlan, ViewRunner, resolve, split_names  # noqa: F401 - re-exported

Tensor = paddle.Tensor


def main_logits(outputs) -> Tensor:
    """PaddleSeg models return a list (main head first, auxiliary heads after)."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def dygraph_forward(model: paddle.nn.Layer):
    """batch (N, C, H, W) float32 NumPy -> main-head logits as NumPy, on the current device.

    On a GPU the logits come back to the host once per forward pass (written for GPU, tested on
    CPU only): the merge and argmax run in NumPy, as in the Predictor.
    """
    def forward(batch: np.ndarray) -> np.ndarray:
        return main_logits(model(paddle.to_tensor(batch))).numpy()
    return forward


def plan_from_eval(eval_config) -> TTAPlan:
    """The TTA plan of an `eval` config section (views, merge, weights)."""
    return resolve(eval_config.tta, eval_config.tta_merge, eval_config.tta_weights)


def resolve_views(names: Sequence[str], merge: str = "mean", weights: Sequence[float] | None = None) -> TTAPlan:
    """Kept for callers that only have view names: `resolve` with the default normalisation."""
    return resolve(names, merge, weights)
