"""Evaluate a model on a split: predictions, metrics, and what to show (overlays)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import paddle
from tqdm import tqdm

from steel_seg.deploy.tta import TTAPlan, ViewRunner, finish, merge_outputs
from steel_seg.metrics import SegmentationEvaluator, per_image_confusion
from steel_seg.tta import dygraph_forward

PLAIN = TTAPlan()


@dataclass
class EvalResult:
    scores: dict
    seconds: float
    images: int
    examples: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (cache row, prediction)
    rows: list[int] = field(default_factory=list)
    """Cache rows in evaluation order (with `per_image`)."""
    image_confusion: np.ndarray | None = None
    """(N, C, C) confusion matrix of each image (with `per_image`), rows true."""
    forward_passes: int = 0

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(self.images, 1)


@paddle.no_grad()
def evaluate(
    model: paddle.nn.Layer,
    loader,
    num_classes: int,
    class_names: list[str] | None = None,
    tta: TTAPlan | None = None,
    keep_examples: int = 0,
    progress: bool = True,
    desc: str = "eval",
    per_image: bool = False,
    batched: bool = True,
    combine=None,
) -> EvalResult:
    """Metrics over the whole loader (confusion matrix accumulated over all batches).

    `tta` None (or a plan of the original alone) is plain evaluation. The time covers the
    model, TTA and argmax, not loading. Keeps the predictions of the first `keep_examples`
    images that contain defects (or any images, if too few do) for overlays.
    `combine(evaluator)`, when given, adds in what other processes counted on their shards of
    the set (data-parallel validation).
    """
    was_training = model.training
    model.eval()
    plan = tta or PLAIN
    runner = ViewRunner(dygraph_forward(model), batched=batched)
    evaluator = SegmentationEvaluator(num_classes, class_names=class_names)
    examples: list[tuple[int, np.ndarray]] = []
    spare: list[tuple[int, np.ndarray]] = []
    rows: list[int] = []
    matrices: list[np.ndarray] = []
    seconds, count = 0.0, 0
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
            start = time.perf_counter()
            pred = runner.probs(batch.images, plan).argmax(axis=1)
            seconds += time.perf_counter() - start
            count += len(batch)
            evaluator.update(pred, batch.labels)
            if per_image:
                rows += list(batch.rows)
                matrices.append(per_image_confusion(pred, batch.labels, num_classes))
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
    confusion = np.concatenate(matrices) if matrices else None
    return EvalResult(evaluator.result(), seconds, count, examples, rows, confusion, runner.passes)


@paddle.no_grad()
def evaluate_candidates(
    model: paddle.nn.Layer,
    loader,
    num_classes: int,
    candidates: Mapping[str, TTAPlan],
    class_names: list[str] | None = None,
    progress: bool = True,
    desc: str = "candidates",
) -> dict[str, EvalResult]:
    """Scores of several TTA plans on one split, each distinct view run once per batch.

    For choosing among plans: the candidates share forward passes, so their `seconds` are not
    their own cost (time the chosen one alone for that). All plans must share one
    normalisation.
    """
    was_training = model.training
    model.eval()
    runner = ViewRunner(dygraph_forward(model))
    plans = dict(candidates)
    views = list(dict.fromkeys(v for plan in plans.values() for v in plan.views))
    norm = next(iter(plans.values())).norm
    evaluators = {name: SegmentationEvaluator(num_classes, class_names=class_names) for name in plans}
    count = 0
    start = time.perf_counter()
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
            raw = runner.forward_views(batch.images, views, norm)
            done: dict[tuple[int, bool], np.ndarray] = {}

            def output(i: int, as_logits: bool) -> np.ndarray:
                if (i, as_logits) not in done:
                    done[i, as_logits] = finish(views[i], *raw[i], as_logits)
                return done[i, as_logits]

            for name, plan in plans.items():
                outs = [output(views.index(v), plan.uses_logits) for v in plan.views]
                evaluators[name].update(merge_outputs(outs, plan.merge, plan.weights).argmax(axis=1), batch.labels)
            count += len(batch)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    return {name: EvalResult(ev.result(), seconds, count) for name, ev in evaluators.items()}
