"""Evaluation metrics in pure NumPy: pixel scores, Kaggle Severstal Dice, image-level detection.

Convention for undefined values: any ratio whose denominator is zero is NaN, never 0 or 1.
A class that appears in neither the labels nor the predictions of the whole evaluation set has
no IoU (NaN), and mIoU is the NaN-mean over classes, so it leaves such a class out. PaddleSeg /
PaddleX instead score an empty class as IoU 0 and keep it in the mean; the two agree whenever
every class occurs somewhere in the set, and ours does not punish a model for a class the data
never asked about. Background (class 0) is included in mIoU, as PaddleX reports it.
The one exception is the Kaggle Dice: an (image, class) pair with both masks empty scores 1,
because that is how the Severstal competition scored it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_ids(values: np.ndarray, num_classes: int, what: str, extra: str = "") -> None:
    """Raise if `values` holds a class id outside 0..num_classes-1."""
    if values.size == 0:
        return
    low, high = values.min(), values.max()
    if low >= 0 and high < num_classes:
        return
    bad = np.unique(values[(values < 0) | (values >= num_classes)])
    shown = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
    raise ValueError(
        f"{what} contains class id(s) {shown}, but num_classes is {num_classes} "
        f"(valid ids are 0..{num_classes - 1}{extra}). Check num_classes in the config, or "
        f"how the masks were encoded."
    )


def _as_int_array(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        # Catches the common slip of passing logits or probabilities instead of class ids.
        raise ValueError(
            f"{what} must hold integer class ids, got dtype {arr.dtype}; "
            f"if these are scores, take argmax over the class axis first"
        )
    return arr.astype(np.int64, copy=False)


def _checked(pred, label, num_classes: int, ignore_index: int):
    """Validate a prediction/label pair; return int64 arrays and the mask of counted pixels."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    pred = _as_int_array(pred, "pred")
    label = _as_int_array(label, "label")
    if pred.shape != label.shape:
        raise ValueError(
            f"pred and label shapes differ: pred {pred.shape}, label {label.shape}; "
            f"they must be the same (N, H, W) or (H, W)"
        )
    valid = label != ignore_index
    # Predictions are checked everywhere, even under ignored pixels: an out-of-range id is a bug
    # in the model head or post-processing wherever it appears.
    _check_ids(pred, num_classes, "pred")
    _check_ids(label[valid], num_classes, "label", f", plus ignore_index {ignore_index}")
    return pred, label, valid


def _as_batch(x, what: str) -> np.ndarray:
    """View (H, W) as a batch of one, and (N, 1, H, W) (PaddleSeg's argmax keepdim) as (N, H, W)."""
    arr = np.asarray(x)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return arr
    if arr.ndim == 4 and arr.shape[1] == 1:
        return arr[:, 0]
    raise ValueError(
        f"{what} must have shape (N, H, W), (H, W) or (N, 1, H, W); got {arr.shape}"
    )


# ---------------------------------------------------------------------------------------------
# Pixel-level scores from the confusion matrix


def confusion_matrix(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """Count pixels by (true class, predicted class): a (num_classes, num_classes) int64 matrix.

    Rows are the true class, columns the predicted one. Pixels whose label is `ignore_index`
    are not counted. Any shape works as long as `pred` and `label` match.
    Raises ValueError naming the bad value for ids outside 0..num_classes-1.
    """
    pred, label, valid = _checked(pred, label, num_classes, ignore_index)
    counts = np.bincount(label[valid] * num_classes + pred[valid], minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num/den as float, NaN where den is 0 (see the module docstring)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean ignoring NaN; NaN (without numpy's warning) if nothing is left."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def cohen_kappa(cm: np.ndarray) -> float:
    """Cohen's kappa (po - pe) / (1 - pe) of a confusion matrix; NaN if pe == 1 or cm is empty.

    pe == 1 only when labels and predictions are all one and the same class: agreement is then
    entirely expected by chance, and kappa is undefined.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    if total == 0:
        return math.nan
    po = np.trace(cm) / total
    pe = float(np.sum(cm.sum(axis=1) * cm.sum(axis=0))) / (total * total)
    if pe == 1.0:
        return math.nan
    return float((po - pe) / (1.0 - pe))


def segmentation_scores(cm: np.ndarray) -> dict:
    """Pixel-level scores from a confusion matrix (rows true, columns predicted).

    Returns plain Python floats and lists (JSON-serialisable; NaN where undefined):
    'miou' (NaN-mean of 'iou', background included), 'pixel_accuracy', 'kappa', and per class
    'iou' = tp/(tp+fp+fn), 'precision' = tp/(tp+fp), 'recall' = tp/(tp+fn),
    'f1' = 2tp/(2tp+fp+fn). F1 uses the count form so that a class present but never predicted
    gets F1 0 (its precision alone is NaN).
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp  # predicted as the class, truly something else
    fn = cm.sum(axis=1) - tp  # truly the class, predicted as something else
    iou = _ratio(tp, tp + fp + fn)
    return {
        "miou": _nanmean(iou),
        "pixel_accuracy": float(_ratio(tp.sum(), cm.sum())),
        "kappa": cohen_kappa(cm),
        "iou": iou.tolist(),
        "precision": _ratio(tp, tp + fp).tolist(),
        "recall": _ratio(tp, tp + fn).tolist(),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn).tolist(),
    }


# ---------------------------------------------------------------------------------------------
# Per-image scores: Kaggle Dice and image-level detection


def _per_image_confusion(pred: np.ndarray, label: np.ndarray, valid: np.ndarray, num_classes: int):
    """One confusion matrix per image of a validated (N, H, W) batch: (N, C, C), rows true.

    A single bincount over (image, true, pred) gives every per-image count the Dice and detection
    need, and summed over images it is the set's confusion matrix.
    """
    n = valid.shape[0]
    per_image = valid.reshape(n, -1).sum(axis=1)
    # Boolean indexing keeps C order, so image i owns the next per_image[i] counted pixels.
    image = np.repeat(np.arange(n, dtype=np.int64), per_image)
    flat = (image * num_classes + label[valid]) * num_classes + pred[valid]
    counts = np.bincount(flat, minlength=n * num_classes**2)
    return counts.reshape(n, num_classes, num_classes)


def _pixel_counts(per_image_cm: np.ndarray):
    """(intersection, predicted, true) pixel counts per (image, class), each (N, C)."""
    inter = np.diagonal(per_image_cm, axis1=1, axis2=2)
    return inter, per_image_cm.sum(axis=1), per_image_cm.sum(axis=2)


def _dice_from_counts(inter: np.ndarray, pred_px: np.ndarray, true_px: np.ndarray) -> np.ndarray:
    """Dice 2|P∩T| / (|P|+|T|), with both-empty scored 1 as in the Severstal competition."""
    den = (pred_px + true_px).astype(np.float64)
    dice = np.ones(den.shape)
    np.divide(2.0 * inter, den, out=dice, where=den != 0)
    return dice


def dice_pairs(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """Dice per (image, defect class) for a batch (N, H, W): an (N, num_classes - 1) array.

    Column j is class j + 1; background is excluded, as in the Kaggle Severstal metric.
    A pair with empty predicted and true masks scores 1; pixels labelled `ignore_index` are
    left out of both masks. (H, W) counts as a batch of one.
    """
    pred, label, valid = _checked(
        _as_batch(pred, "pred"), _as_batch(label, "label"), num_classes, ignore_index
    )
    inter, pred_px, true_px = _pixel_counts(_per_image_confusion(pred, label, valid, num_classes))
    return _dice_from_counts(inter[:, 1:], pred_px[:, 1:], true_px[:, 1:])


def per_image_confusion(pred, label, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """One confusion matrix per image of an (N, H, W) batch, (N, C, C) int64, rows true.

    Summed over any subset of images it is that subset's confusion matrix (the sensitivity
    analysis bins images by a feature this way).
    """
    pred, label, valid = _checked(_as_batch(pred, "pred"), _as_batch(label, "label"), num_classes, ignore_index)
    return _per_image_confusion(pred, label, valid, num_classes)


def _detection_counts(pred_px: np.ndarray, true_px: np.ndarray, min_pixels: int):
    """Image-level (tp, fp, fn) per class from per-image pixel counts, each summed over images."""
    predicted = pred_px > min_pixels
    present = true_px > 0
    return (
        np.sum(predicted & present, axis=0),
        np.sum(predicted & ~present, axis=0),
        np.sum(~predicted & present, axis=0),
    )


# ---------------------------------------------------------------------------------------------
# Accumulation over an evaluation set


class SegmentationEvaluator:
    """Accumulates every metric over batches; `result()` reports the whole set.

    `update(pred, label)` takes integer class-id arrays of shape (N, H, W) or (H, W)
    ((N, 1, H, W) is squeezed). `result()` returns everything from `segmentation_scores`, plus
    'kaggle_dice' (mean Dice over all (image, defect class) pairs), 'dice_per_class',
    'detection_precision' and 'detection_recall' (lists over defect classes 1..C-1),
    'num_images', 'confusion_matrix' (list of lists) and 'class_names'.
    An image counts as predicting defect class k when more than `min_pixels` of its pixels are
    predicted k. Before any update, scores are NaN and num_images is 0.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        min_pixels: int = 0,
    ):
        if num_classes < 2:
            raise ValueError(
                f"num_classes must be at least 2 (background plus one defect class), "
                f"got {num_classes}"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names but num_classes is {num_classes}: "
                f"give one name per class, background first"
            )
        if min_pixels < 0:
            raise ValueError(f"min_pixels must be 0 or more, got {min_pixels}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        if class_names is None:
            class_names = _default_names(num_classes)
        self.class_names = list(class_names)
        self.min_pixels = min_pixels
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        c = self.num_classes
        self._cm = np.zeros((c, c), dtype=np.int64)
        # Per-image Dice is kept (N x (C-1) floats, small) so the mean is exactly the
        # one-big-batch mean, independent of how the set was split into batches.
        self._dice: list[np.ndarray] = []
        self._det_tp = np.zeros(c - 1, dtype=np.int64)
        self._det_fp = np.zeros(c - 1, dtype=np.int64)
        self._det_fn = np.zeros(c - 1, dtype=np.int64)
        self._num_images = 0

    def update(self, pred, label) -> None:
        """Add one batch of predicted and true class-id masks."""
        pred, label, valid = _checked(
            _as_batch(pred, "pred"), _as_batch(label, "label"), self.num_classes, self.ignore_index
        )
        c = self.num_classes
        per_image_cm = _per_image_confusion(pred, label, valid, c)
        self._cm += per_image_cm.sum(axis=0)
        inter, pred_px, true_px = _pixel_counts(per_image_cm)
        self._dice.append(_dice_from_counts(inter[:, 1:], pred_px[:, 1:], true_px[:, 1:]))
        tp, fp, fn = _detection_counts(pred_px[:, 1:], true_px[:, 1:], self.min_pixels)
        self._det_tp += tp
        self._det_fp += fp
        self._det_fn += fn
        self._num_images += pred.shape[0]

    @property
    def num_images(self) -> int:
        return self._num_images

    def state(self) -> dict:
        """The accumulated counts (to combine evaluators that saw disjoint parts of a set)."""
        dice = np.concatenate(self._dice, axis=0) if self._dice else np.zeros((0, self.num_classes - 1))
        return {"cm": self._cm.copy(), "dice": dice, "det_tp": self._det_tp.copy(), "det_fp": self._det_fp.copy(),
                "det_fn": self._det_fn.copy(), "num_images": self._num_images}

    def merge(self, state: dict) -> None:
        """Add another evaluator's `state()`: confusion matrices and counts are summed, so the
        scores are those of one evaluator that saw both parts (not an average of two mIoUs)."""
        self._cm += state["cm"]
        if len(state["dice"]):
            self._dice.append(np.asarray(state["dice"]))
        self._det_tp += state["det_tp"]
        self._det_fp += state["det_fp"]
        self._det_fn += state["det_fn"]
        self._num_images += state["num_images"]

    def result(self) -> dict:
        """All scores over everything seen since the last reset, as JSON-serialisable values."""
        out = segmentation_scores(self._cm)
        if self._num_images:
            dice = np.concatenate(self._dice, axis=0)
            out["kaggle_dice"] = float(dice.mean())
            out["dice_per_class"] = dice.mean(axis=0).tolist()
        else:
            out["kaggle_dice"] = math.nan
            out["dice_per_class"] = [math.nan] * (self.num_classes - 1)
        out["detection_precision"] = _ratio(self._det_tp, self._det_tp + self._det_fp).tolist()
        out["detection_recall"] = _ratio(self._det_tp, self._det_tp + self._det_fn).tolist()
        out["num_images"] = self._num_images
        out["confusion_matrix"] = self._cm.tolist()
        out["class_names"] = list(self.class_names)
        return out


# ---------------------------------------------------------------------------------------------
# Report


def _default_names(num_classes: int) -> list[str]:
    return [f"class {i}" for i in range(num_classes)]


def _fmt(value) -> str:
    if value is None:
        return "-"
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def format_scores(result: dict, class_names: Sequence[str] | None = None) -> str:
    """Render `SegmentationEvaluator.result()` as a short plain-text table for the end of a run.

    Undefined values (NaN) print as "n/a"; metrics that do not apply to background print "-".
    `class_names` defaults to result['class_names'], then to "class i".
    """
    num_classes = len(result["iou"])
    if class_names is None:
        class_names = result.get("class_names") or _default_names(num_classes)
    names = list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    headers = ["class", "IoU", "precision", "recall", "F1", "Dice", "det P", "det R"]
    rows = []
    for k, name in enumerate(names):
        defect = k - 1  # index into the defect-only lists; background has none
        per_defect = [
            result.get(key, [None] * num_classes)[defect] if k > 0 else None
            for key in ("dice_per_class", "detection_precision", "detection_recall")
        ]
        rows.append(
            [str(name)]
            + [_fmt(result[key][k]) for key in ("iou", "precision", "recall", "f1")]
            + [_fmt(v) for v in per_defect]
        )
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

    lines = [line(headers)] + [line(r) for r in rows]
    lines.append("")
    for title, key in [
        ("mIoU", "miou"),
        ("pixel accuracy", "pixel_accuracy"),
        ("kappa", "kappa"),
        ("Kaggle Dice", "kaggle_dice"),
    ]:
        if key in result:  # a bare segmentation_scores() dict has no Kaggle Dice
            lines.append(f"{title:<15} {_fmt(result[key])}")
    if "num_images" in result:
        lines.append(f"{'images':<15} {result['num_images']}")
    return "\n".join(lines)
