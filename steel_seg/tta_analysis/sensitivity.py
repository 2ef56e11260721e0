"""Seed 000's sensitivity analysis: how a model's per-class scores move with an image feature.

Per image: sharpness (variance of the Laplacian), brightness (mean grey), contrast (std of
grey), defect area (share of labelled defect pixels). Images are cut into quintiles of each
feature; each quintile's scores come from the sum of its images' confusion matrices. From the
trends it derives TTA views worth trying (e.g. defects score higher on blurrier images: try
`blur`). Pure NumPy/OpenCV: the caller evaluates and records.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from steel_seg.metrics import segmentation_scores

FEATURES = ("sharpness", "brightness", "contrast", "defect_area")
MIN_SPREAD = 0.02
"""A feature suggests a view only if the defect classes' mean F1 differs by at least this
much between its best and worst quintile."""


def image_features(image: np.ndarray, label: np.ndarray, ignore_index: int = 255) -> dict[str, float]:
    """The four features of one image (RGB or grey uint8, at the size the model sees) and its label."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    grey = grey.astype(np.float64)
    counted = label != ignore_index
    return {
        "sharpness": float(cv2.Laplacian(grey, cv2.CV_64F).var()),
        "brightness": float(grey.mean()),
        "contrast": float(grey.std()),
        "defect_area": float(((label > 0) & counted).sum() / max(int(counted.sum()), 1)),
    }


def quantile_bins(values, bins: int = 5) -> np.ndarray:
    """Bin index 0..bins-1 of each value by rank, equal values always in the same bin.

    A value's rank is the number of values strictly below it, and its bin is
    floor(rank * bins / n): with distinct values every bin gets n/bins of them (give or take
    one); ties can leave a bin empty rather than split equal images between two bins.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"quantile_bins needs a non-empty 1-D array, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("quantile_bins: values contain NaN")
    rank = np.searchsorted(np.sort(values), values, side="left")
    return (rank * bins) // values.size


@dataclass
class FeatureBin:
    index: int
    low: float
    high: float
    images: int
    f1: list[float]
    iou: list[float]


@dataclass
class FeatureTable:
    """Per-class F1 and IoU in each quintile of one feature, with the spread across quintiles."""

    feature: str
    class_names: list[str]
    bins: list[FeatureBin]
    f1_std: list[float] = field(default_factory=list)
    iou_std: list[float] = field(default_factory=list)

    def defect_f1(self) -> list[float]:
        """Mean F1 over the defect classes (background left out), per quintile."""
        return [_nanmean(b.f1[1:]) for b in self.bins]


def _nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def _nanstd(values) -> float:
    """Population std (ddof 0), as seed 000's table: 0.0643 over its five quintiles."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.std(kept)) if len(kept) > 1 else math.nan


def feature_table(feature: str, values, image_confusion: np.ndarray, class_names: list[str], bins: int = 5) -> FeatureTable:
    """Scores per quintile of `values` from per-image confusion matrices (N, C, C)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(image_confusion):
        raise ValueError(f"{feature}: {len(values)} values for {len(image_confusion)} images")
    index = quantile_bins(values, bins)
    rows = []
    for b in range(bins):
        members = index == b
        if not members.any():
            continue
        scores = segmentation_scores(image_confusion[members].sum(axis=0))
        rows.append(FeatureBin(b, float(values[members].min()), float(values[members].max()), int(members.sum()),
                               scores["f1"], scores["iou"]))
    table = FeatureTable(feature, list(class_names), rows)
    table.f1_std = [_nanstd([r.f1[c] for r in rows]) for c in range(len(class_names))]
    table.iou_std = [_nanstd([r.iou[c] for r in rows]) for c in range(len(class_names))]
    return table


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _range(low: float, high: float) -> str:
    return f"{low:.3g}-{high:.3g}"


def tables_markdown(tables: list[FeatureTable]) -> str:
    """One Markdown table per feature: quintile, range, images, then F1 and IoU per class."""
    out = []
    for t in tables:
        header = ["quintile", t.feature, "images"] + [f"F1 {c}" for c in t.class_names] + [f"IoU {c}" for c in t.class_names]
        out.append(f"### {t.feature}\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for b in t.bins:
            share = f"{20 * b.index}-{20 * (b.index + 1)}%"
            out.append("| " + " | ".join([share, _range(b.low, b.high), str(b.images)] + [_fmt(v) for v in b.f1] + [_fmt(v) for v in b.iou]) + " |")
        out.append("| " + " | ".join(["std", "", ""] + [_fmt(v) for v in t.f1_std] + [_fmt(v) for v in t.iou_std]) + " |")
        out.append("")
    return "\n".join(out)


def tables_csv(tables: list[FeatureTable]) -> str:
    """Long form: feature, quintile, low, high, images, class, f1, iou; std rows have quintile `std`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["feature", "quintile", "low", "high", "images", "class", "f1", "iou"])
    for t in tables:
        for b in t.bins:
            for c, name in enumerate(t.class_names):
                writer.writerow([t.feature, b.index + 1, f"{b.low:.6g}", f"{b.high:.6g}", b.images, name, _fmt(b.f1[c], 6), _fmt(b.iou[c], 6)])
        for c, name in enumerate(t.class_names):
            writer.writerow([t.feature, "std", "", "", "", name, _fmt(t.f1_std[c], 6), _fmt(t.iou_std[c], 6)])
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# From trends to candidate views

# Feature -> (view if defects score higher at high values, view if higher at low values).
# Sharpness has no "sharpen" view: defects that like sharp images suggest nothing to add.
VIEW_FOR_TREND = {
    "sharpness": (None, "blur"),
    "brightness": ("brightness:0.1", "brightness:-0.1"),
    "contrast": ("contrast:1.2", "contrast:0.8"),
    "defect_area": ("scale:1.25", "scale:0.8"),
}


@dataclass(frozen=True)
class Candidate:
    view: str
    reason: str


def trend(values: list[float]) -> float:
    """Least-squares slope of `values` over the quintile index (NaN quintiles left out)."""
    points = [(i, v) for i, v in enumerate(values) if not math.isnan(v)]
    if len(points) < 2:
        return math.nan
    x, y = np.array(points, dtype=np.float64).T
    return float(np.polyfit(x, y, 1)[0])


def candidate_views(tables: list[FeatureTable], training_flips: list[str] = ()) -> list[Candidate]:
    """Views suggested by the trends of the defect classes' F1, then the training flips (seed
    000's first method: the model has seen flipped images)."""
    found: list[Candidate] = []
    for t in tables:
        scores = t.defect_f1()
        kept = [s for s in scores if not math.isnan(s)]
        slope = trend(scores)
        if len(kept) < 2 or math.isnan(slope):
            continue
        spread = max(kept) - min(kept)
        if spread < MIN_SPREAD:
            continue
        up, down = VIEW_FOR_TREND.get(t.feature, (None, None))
        view = up if slope > 0 else down
        if view is None:
            continue
        where = "higher" if slope > 0 else "lower"
        found.append(Candidate(view, f"defect classes' F1 is better on images with {where} {t.feature.replace('_', ' ')} "
                                     f"(spread {spread:.3f} across quintiles): try `{view}`"))
    for flip in training_flips:
        found.append(Candidate(flip, f"trained with {flip} augmentation (seed 000's first method)"))
    unique: dict[str, Candidate] = {}
    for c in found:
        unique.setdefault(c.view, c)
    return list(unique.values())
