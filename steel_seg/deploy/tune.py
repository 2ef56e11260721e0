"""Choose each defect class's probability threshold and minimum area on validation images for Kaggle Dice.

Post-processing of class c only moves class-c pixels to background, so every class is tuned on
its own: one pass over the images scores all candidates of all classes at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from steel_seg.deploy.postprocess import argmax_classes, below_threshold, bounding_slices

IGNORE = 255


@dataclass
class TuneResult:
    """Chosen values (one per class, index 0 = background = 0) and Kaggle Dice before and after."""

    thresholds: list[float]
    min_areas: list[int]
    dice_before: float
    dice_after: float
    per_class_before: list[float]
    per_class_after: list[float]
    images: int


class PostprocessTuner:
    """Streams (probabilities, label) pairs and keeps, per class and candidate, the sum of Dice.

    Only a (classes x thresholds x areas) table is kept, never the probability maps, so a
    validation set of any size fits. 0.0 and 0 are always candidates: they are plain argmax,
    the "before" score and the fallback when no candidate helps.
    """

    def __init__(
        self,
        num_classes: int,
        thresholds=(0.0, 0.3, 0.4, 0.5, 0.6, 0.7),
        min_areas=(0, 64, 256, 1024, 2048, 4096),
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= IGNORE:
            raise ValueError(f"num_classes must be an integer in 2..{IGNORE} (background + defects), got {num_classes!r}")
        for t in thresholds:
            if not 0.0 <= float(t) <= 1.0:
                raise ValueError(f"threshold candidate {t!r} is outside [0, 1]")
        for a in min_areas:
            if not float(a).is_integer() or a < 0:
                raise ValueError(f"min_area candidate {a!r} is not a non-negative whole number of pixels")
        self.num_classes = num_classes
        # Ascending with 0 first: np.argmax over the table then breaks ties toward the smaller change.
        self.thresholds = sorted({0.0, *(float(t) for t in thresholds)})
        self.min_areas = sorted({0, *(int(a) for a in min_areas)})
        self._areas = np.array(self.min_areas, dtype=np.int64)
        self._dice_sums = np.zeros((num_classes - 1, len(self.thresholds), len(self.min_areas)))
        self.images = 0

    def update(self, probs: np.ndarray, label: np.ndarray) -> None:
        """Score one image: `probs` (C, H, W) float, `label` (H, W) class ids with 255 = ignore."""
        if probs.ndim != 3 or probs.shape[0] != self.num_classes:
            raise ValueError(f"expected ({self.num_classes}, H, W) probabilities, got shape {probs.shape}")
        if probs.dtype.kind != "f":
            raise ValueError(f"expected floating-point probabilities, got dtype {probs.dtype}")
        if label.shape != probs.shape[1:]:
            raise ValueError(f"label shape {label.shape} does not match probabilities {probs.shape[1:]}")
        predicted = argmax_classes(probs)
        ignore = label == IGNORE
        if not ignore.any():
            ignore = None
        for c in range(1, self.num_classes):
            self._dice_sums[c - 1] += self._score_class(probs[c], predicted == c, label == c, ignore)
        self.images += 1

    def _score_class(self, class_probs, predicted, truth, ignore) -> np.ndarray:
        """Dice of one class on one image for every (threshold, min_area) candidate."""
        n_truth = int(np.count_nonzero(truth))
        empty_score = 1.0 if n_truth == 0 else 0.0
        scores = np.full((len(self.thresholds), len(self.min_areas)), empty_score)
        box = bounding_slices(predicted)
        if box is None:
            return scores
        # Every class-c pixel is inside the box, so its components are those of the whole image.
        predicted, class_probs, truth = predicted[box], class_probs[box], truth[box]
        ignore = None if ignore is None else ignore[box]
        previous_count = -1
        for i, threshold in enumerate(self.thresholds):
            # Same rule as probs_to_mask: a threshold of 0 keeps every pixel.
            kept = predicted & ~below_threshold(class_probs, threshold) if threshold > 0.0 else predicted.copy()
            count = int(np.count_nonzero(kept))
            if count == 0:
                break  # higher thresholds keep nothing either: scores stay `empty_score`
            if count == previous_count:
                scores[i] = scores[i - 1]  # kept only shrinks as the threshold grows: same mask
                continue
            previous_count = count
            # 8-connectivity as in probs_to_mask (cv2 4.5.5 also segfaults on some inputs with 4).
            n, components, stats, _ = cv2.connectedComponentsWithStats(kept.view(np.uint8), connectivity=8)
            area = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
            # min_area acts on whole components; Dice counts only pixels that are not ignored.
            counted = area if ignore is None else area - np.bincount(components[ignore], minlength=n)[1:]
            overlap = np.bincount(components[truth], minlength=n)[1:]
            keep = area[None, :] >= self._areas[:, None]
            n_pred = keep @ counted
            n_overlap = keep @ overlap
            denominator = n_pred + n_truth
            scores[i] = np.where(denominator == 0, 1.0, 2.0 * n_overlap / np.maximum(denominator, 1))
        return scores

    def table(self) -> np.ndarray:
        """Mean Dice per (defect class - 1, threshold, min_area), in the sorted candidate order."""
        if self.images == 0:
            raise ValueError("PostprocessTuner: no images scored yet; call update() first")
        return self._dice_sums / self.images

    def result(self) -> TuneResult:
        """Best candidate per class; ties go to the lower threshold, then the smaller area."""
        means = self.table()
        thresholds, min_areas = [0.0], [0]
        before, after = [], []
        for sums, table in zip(self._dice_sums, means):
            best = int(np.argmax(sums))  # first maximum in (threshold, area) order: smallest change
            i, j = divmod(best, table.shape[1])
            thresholds.append(self.thresholds[i])
            min_areas.append(self.min_areas[j])
            before.append(float(table[0, 0]))
            after.append(float(table[i, j]))
        return TuneResult(
            thresholds=thresholds,
            min_areas=min_areas,
            dice_before=float(np.mean(before)),
            dice_after=float(np.mean(after)),
            per_class_before=before,
            per_class_after=after,
            images=self.images,
        )
