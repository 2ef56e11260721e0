"""`check`: what a user needs to know about a data set before training on it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from steel_seg.data import kaggle
from steel_seg.data.errors import BadSampleError, DataError
from steel_seg.data.images import read_image
from steel_seg.data.label_values import LabelMapping, ValueDiagnosis, diagnose_label_values
from steel_seg.data.paddlex_layout import is_seg_layout, open_seg_dataset, read_label_png
from steel_seg.data.rle import RLEError


@dataclass
class DatasetReport:
    root: Path
    layout: str
    class_names: list[str]
    num_images: int = 0
    num_defect_free: int = 0
    images_per_class: Counter = field(default_factory=Counter)
    pixels_per_class: Counter = field(default_factory=Counter)
    total_pixels: int = 0
    sizes: Counter = field(default_factory=Counter)
    problems: list[tuple[str, str]] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    label_values: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    """Histogram of raw label values over all label files (SEG layout), before any mapping."""
    unknown_id_files: list[str] = field(default_factory=list)
    """Label files holding ids outside labels.txt (after the mapping): summarised, not listed."""
    diagnosis: ValueDiagnosis | None = None

    def pixel_share(self, class_id: int) -> float:
        return self.pixels_per_class[class_id] / self.total_pixels if self.total_pixels else 0.0


def check_kaggle(root: Path, progress: bool = True) -> DatasetReport:
    folder = kaggle.open_kaggle_folder(root)
    report = DatasetReport(root, "Kaggle Severstal (train.csv + train_images/)", list(kaggle.CLASS_NAMES))
    for image_id in tqdm(folder.image_ids, desc="checking", unit="img", disable=not progress, leave=False):
        report.num_images += 1
        try:
            image = read_image(folder.image_path(image_id))
        except BadSampleError as exc:
            report.problems.append((str(exc.path), exc.reason))
            continue
        height, width = image.shape[:2]
        report.sizes[(width, height)] += 1
        report.total_pixels += height * width
        runs = folder.runs.get(image_id, {})
        if not runs:
            report.num_defect_free += 1
        try:
            label = kaggle.label_map(runs, (height, width))
        except RLEError as exc:
            report.problems.append((str(folder.csv_path), str(exc)))
            continue
        counts = np.bincount(label.ravel(), minlength=len(kaggle.CLASS_NAMES))
        for class_id in runs:
            report.images_per_class[class_id] += 1
            report.pixels_per_class[class_id] += int(counts[class_id])
    report.pixels_per_class[0] = report.total_pixels - sum(report.pixels_per_class.values())
    return report


def check_seg(root: Path, progress: bool = True, mapping: LabelMapping = LabelMapping()) -> DatasetReport:
    dataset = open_seg_dataset(root)
    report = DatasetReport(root, "PaddleX SEG (JPEGImages/ + Annotations/ + lists)", dataset.class_names)
    report.split_sizes = {name: len(s) for name, s in dataset.splits.items() if s}
    for sample in tqdm(dataset.all_samples(), desc="checking", unit="img", disable=not progress, leave=False):
        report.num_images += 1
        try:
            image = read_image(sample.image)
            label = read_label_png(sample.label)
        except BadSampleError as exc:
            report.problems.append((str(exc.path), exc.reason))
            continue
        height, width = image.shape[:2]
        report.sizes[(width, height)] += 1
        if label.shape != (height, width):
            report.problems.append((str(sample.label), f"label is {label.shape[1]}x{label.shape[0]}, image {width}x{height}"))
            continue
        report.total_pixels += label.size
        report.label_values += np.bincount(label.ravel(), minlength=256)
        counts = np.bincount(mapping.apply(label).ravel(), minlength=256)
        if counts[len(dataset.class_names) : 255].any():
            report.unknown_id_files.append(str(sample.label))
        present = [k for k in range(1, len(dataset.class_names)) if counts[k]]
        if not present:
            report.num_defect_free += 1
        for class_id in range(len(dataset.class_names)):
            report.pixels_per_class[class_id] += int(counts[class_id])
            if class_id and counts[class_id]:
                report.images_per_class[class_id] += 1
    if report.unknown_id_files or not mapping:
        values = report.label_values if not mapping else _mapped_histogram(report.label_values, mapping)
        report.diagnosis = diagnose_label_values(values, len(dataset.class_names))
    if report.diagnosis is not None and report.diagnosis.pattern == "binary_0_255":
        report.problems.append((f"{root / 'Annotations'}", report.diagnosis.message))
    if report.unknown_id_files:
        files = report.unknown_id_files
        report.problems.append((
            files[0] if len(files) == 1 else f"{len(files)} label files (e.g. {files[0]})",
            report.diagnosis.message if report.diagnosis else "class ids not in labels.txt",
        ))
    return report


def _mapped_histogram(counts: np.ndarray, mapping: LabelMapping) -> np.ndarray:
    """The value histogram after `mapping`, computed on the histogram itself (no relabelling)."""
    out = np.zeros(256, np.int64)
    targets = mapping.apply(np.arange(256, dtype=np.uint8)[None, :])[0]
    np.add.at(out, targets, counts)
    return out


def check_dataset(root: str | Path, progress: bool = True, mapping: LabelMapping = LabelMapping()) -> DatasetReport:
    """Read every image and label of a Kaggle or SEG folder; `mapping` is data.label_map /
    data.mask_threshold as a training run would apply them (SEG labels only)."""
    root = Path(root)
    if kaggle.is_kaggle_folder(root):
        return check_kaggle(root, progress)
    if is_seg_layout(root):
        return check_seg(root, progress, mapping)
    raise DataError(f"{root}: neither a Kaggle folder (train.csv + train_images/) nor a SEG dataset (labels.txt + lists)")


def format_report(report: DatasetReport, size: tuple[int, int] = (400, 64), max_problems: int = 10) -> str:
    """The report as text that fits a terminal: sizes and problems are summarised, not listed."""
    n = report.num_images
    share = report.num_defect_free / n if n else 0.0
    lines = [
        f"dataset: {report.root}",
        f"layout:  {report.layout}",
        f"images:  {n}   defect-free: {report.num_defect_free} ({share:.1%})   with defects: {n - report.num_defect_free}",
    ]
    if report.split_sizes:
        lines.append("lists:   " + "  ".join(f"{k}={v}" for k, v in report.split_sizes.items()))
    lines.append("")
    lines.append(f"{'id':>3} {'class':<14} {'images':>7} {'% images':>9} {'pixel share':>12}")
    for class_id, name in enumerate(report.class_names):
        pixels = f"{report.pixel_share(class_id):>12.4%}"
        if class_id == 0:  # every image has background; only its pixel share says anything
            lines.append(f"{class_id:>3} {name:<14} {'-':>7} {'-':>9} {pixels}")
            continue
        images = report.images_per_class[class_id]
        lines.append(f"{class_id:>3} {name:<14} {images:>7} {images / n if n else 0:>9.1%} {pixels}")
    lines.append("")
    lines += size_summary(report.sizes, size)
    lines.append(f"problems: {len(report.problems) or 'none'}")
    for path, reason in report.problems[:max_problems]:
        lines.append(f"  - {path}: {reason}")
    if len(report.problems) > max_problems:
        lines.append(f"  ... and {len(report.problems) - max_problems} more")
    return "\n".join(lines)


def size_summary(sizes: Counter, size: tuple[int, int], top: int = 5) -> list[str]:
    """A few lines about image sizes however many there are, and what resizing to `size` does."""
    if not sizes:
        return ["sizes:   none readable"]
    width, height = size
    target = width / height
    if len(sizes) == 1:
        (w, h), count = next(iter(sizes.items()))
        stretch = target / (w / h)
        effect = ("keeps their aspect ratio" if abs(stretch - 1) < 0.01
                  else f"changes their aspect ratio from {w / h:.2f} to {target:.2f} ({_stretch(stretch)})")
        return [f"sizes:   all {count} images are {w}x{h}; resizing to {width}x{height} (data.size) {effect}"]
    ws = np.repeat([w for w, _ in sizes], list(sizes.values()))
    hs = np.repeat([h for _, h in sizes], list(sizes.values()))
    aspects = ws / hs
    common = ", ".join(f"{w}x{h} ({c})" for (w, h), c in sizes.most_common(top))
    if sizes.most_common(1)[0][1] == 1:
        common = "none: every image has its own size"
    lo, mid, hi = np.percentile(aspects, [0, 50, 100])
    stretches = target / aspects
    return [
        f"sizes:   {len(sizes)} distinct sizes over {int(sum(sizes.values()))} images; "
        f"width {ws.min()}..{ws.max()} (median {np.median(ws):g}), height {hs.min()}..{hs.max()} (median {np.median(hs):g})",
        f"         most common: {common}",
        f"         aspect ratio (width/height) {lo:.2f}..{hi:.2f} (median {mid:.2f})",
        f"         resizing to {width}x{height} (data.size, aspect {target:.2f}) makes them uniform, distorting shapes by "
        f"{_stretch(stretches.min())} to {_stretch(stretches.max())} (median {_stretch(float(np.median(stretches)))}); "
        f"{np.mean(np.abs(np.log(stretches)) > np.log(1.25)):.0%} of images are distorted by more than 1.25x",
    ]


def _stretch(factor: float) -> str:
    """Horizontal stretch factor as words: 2.0 -> 'x2.00 wider', 0.5 -> 'x2.00 narrower'."""
    if abs(factor - 1) < 0.01:
        return "unchanged"
    return f"x{factor:.2f} wider" if factor > 1 else f"x{1 / factor:.2f} narrower"
