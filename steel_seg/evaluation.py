"""Evaluate a model on a split: predictions, metrics, and what to show (overlays)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import paddle
from tqdm import tqdm

from steel_seg.metrics import SegmentationEvaluator
from steel_seg.tta import VIEWS, View, predict_probs


@dataclass
class EvalResult:
    scores: dict
    seconds: float
    images: int
    examples: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (cache row, prediction)

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(self.images, 1)


@paddle.no_grad()
def evaluate(
    model: paddle.nn.Layer,
    loader,
    num_classes: int,
    class_names: list[str] | None = None,
    views: list[View] | None = None,
    merge: str = "mean",
    keep_examples: int = 0,
    progress: bool = True,
    desc: str = "eval",
    combine=None,
) -> EvalResult:
    """Metrics over the whole loader (confusion matrix accumulated over all batches).

    Keeps the predictions of the first `keep_examples` images that contain defects (or any
    images, if too few do) for overlays. `combine(evaluator)`, when given, adds in what other
    processes counted on their shards of the set (data-parallel validation).
    """
    was_training = model.training
    model.eval()
    evaluator = SegmentationEvaluator(num_classes, class_names=class_names)
    views = views or [VIEWS["identity"]]
    examples: list[tuple[int, np.ndarray]] = []
    spare: list[tuple[int, np.ndarray]] = []
    seconds, count = 0.0, 0
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
            start = time.perf_counter()
            probs = predict_probs(model, paddle.to_tensor(batch.images), views, merge)
            pred = probs.argmax(axis=1).numpy().astype(np.int64)
            seconds += time.perf_counter() - start
            count += len(batch)
            evaluator.update(pred, batch.labels)
            for row, p, y in zip(batch.rows, pred, batch.labels):
                target = examples if ((y > 0) & (y != 255)).any() else spare
                if len(target) < keep_examples:
                    target.append((row, p.astype(np.uint8)))
    finally:
        model.train(was_training)
    if combine is not None:
        combine(evaluator)
        count = evaluator.num_images
    examples = (examples + spare)[:keep_examples]
    return EvalResult(evaluator.result(), seconds, count, examples)
