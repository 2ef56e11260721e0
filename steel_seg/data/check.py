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

    def pixel_share(self, class_id: int) -> float:
        return self.pixels_per_class[class_id] / self.total_pixels if self.total_pixels else 0.0

    def size_mismatches(self) -> dict[tuple[int, int], int]:
        """Sizes other than the most common one (width, height) -> image count."""
        if not self.sizes:
            return {}
        common, _ = self.sizes.most_common(1)[0]
        return {s: n for s, n in self.sizes.items() if s != common}


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


def check_seg(root: Path, progress: bool = True) -> DatasetReport:
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
        counts = np.bincount(label.ravel(), minlength=256)
        if counts[len(dataset.class_names) : 255].any():
            bad = int(np.flatnonzero(counts[len(dataset.class_names) : 255])[0]) + len(dataset.class_names)
            report.problems.append((str(sample.label), f"class id {bad} not in labels.txt"))
        present = [k for k in range(1, len(dataset.class_names)) if counts[k]]
        if not present:
            report.num_defect_free += 1
        for class_id in range(len(dataset.class_names)):
            report.pixels_per_class[class_id] += int(counts[class_id])
            if class_id and counts[class_id]:
                report.images_per_class[class_id] += 1
    return report


def check_dataset(root: str | Path, progress: bool = True) -> DatasetReport:
    root = Path(root)
    if kaggle.is_kaggle_folder(root):
        return check_kaggle(root, progress)
    if is_seg_layout(root):
        return check_seg(root, progress)
    raise DataError(f"{root}: neither a Kaggle folder (train.csv + train_images/) nor a SEG dataset (labels.txt + lists)")


def format_report(report: DatasetReport) -> str:
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
    sizes = ", ".join(f"{w}x{h}: {c}" for (w, h), c in report.sizes.most_common())
    lines.append(f"sizes:   {sizes or 'none readable'}")
    mismatched = report.size_mismatches()
    lines.append(
        "size mismatches: "
        + (", ".join(f"{c} image(s) at {w}x{h}" for (w, h), c in mismatched.items()) if mismatched else "none")
    )
    lines.append(f"problems: {len(report.problems) or 'none'}")
    for path, reason in report.problems:
        lines.append(f"  - {path}: {reason}")
    return "\n".join(lines)
