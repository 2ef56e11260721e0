"""Kaggle Severstal layout: `train.csv` (either column layout) and `train_images/`.

Both layouts are read into one shape: image id -> {class id: (RLE, CSV line)}. Images in
`train_images/` without rows (or with only empty EncodedPixels) are defect-free.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steel_seg.data.errors import BadSampleError, DataError
from steel_seg.data.rle import RLEError, rle_decode

NUM_DEFECT_CLASSES = 4
CLASS_NAMES = ("background", "defect_1", "defect_2", "defect_3", "defect_4")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

NEW_HEADER = ["ImageId", "ClassId", "EncodedPixels"]
OLD_HEADER = ["ImageId_ClassId", "EncodedPixels"]


@dataclass(frozen=True)
class Run:
    """One CSV row's mask: its RLE string and where it was read, for error messages."""

    rle: str
    where: str


def _class_id(text: str, where: str) -> int:
    try:
        class_id = int(text)
    except ValueError:
        raise DataError(f"{where}: ClassId {text!r} is not an integer") from None
    if not 1 <= class_id <= NUM_DEFECT_CLASSES:
        raise DataError(f"{where}: ClassId {class_id} is outside 1..{NUM_DEFECT_CLASSES}")
    return class_id


def read_train_csv(csv_path: str | Path) -> dict[str, dict[int, Run]]:
    """Read `train.csv` in the current or the old (`<id>.jpg_<k>`) layout.

    Returns image id -> {class id -> Run} for non-empty masks only; ids listed with empty
    EncodedPixels map to {} (known, defect-free). Duplicate (image, class) rows are errors.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found; a Kaggle folder holds train.csv and train_images/")
    records: dict[str, dict[int, Run]] = {}
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if header == NEW_HEADER:
            old = False
        elif header == OLD_HEADER:
            old = True
        else:
            raise DataError(
                f"{csv_path}:1: unknown header {header}; expected "
                f"{','.join(NEW_HEADER)} or the old {','.join(OLD_HEADER)}"
            )
        for row in reader:
            line = reader.line_num
            where = f"{csv_path}:{line}"
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: expected {len(header)} columns, got {len(row)}: {row}")
            if old:
                image_id, sep, class_text = row[0].strip().rpartition("_")
                if not sep or not image_id:
                    raise DataError(f"{where}: ImageId_ClassId {row[0]!r} is not `<id>.jpg_<k>`")
                rle = row[1]
            else:
                image_id, class_text, rle = row[0].strip(), row[1].strip(), row[2]
            class_id = _class_id(class_text, where)
            classes = records.setdefault(image_id, {})
            if not rle.strip():
                continue
            where = f"{where} (ImageId {image_id}, ClassId {class_id})"
            if class_id in classes:
                raise DataError(
                    f"{where}: second mask for the same image and class "
                    f"(first at {classes[class_id].where})"
                )
            classes[class_id] = Run(rle.strip(), where)
    return records


def label_map(runs: dict[int, Run], shape: tuple[int, int]) -> np.ndarray:
    """The (H, W) uint8 class-id map for one image: 0 background, k where class k's mask is."""
    label = np.zeros(shape, dtype=np.uint8)
    for class_id in sorted(runs):
        mask = rle_decode(runs[class_id].rle, shape, where=runs[class_id].where)
        clash = mask & (label > 0)
        if clash.any():
            other = int(label[clash][0])
            raise RLEError(
                f"{runs[class_id].where}: mask overlaps class {other} of the same image "
                f"({int(clash.sum())} pixels); Severstal classes never overlap"
            )
        label[mask] = class_id
    return label


def pixel_count(rle: str) -> int:
    """Mask area straight from the run lengths, without decoding."""
    return int(np.asarray(rle.split()[1::2], dtype=np.int64).sum())


@dataclass(frozen=True)
class KaggleFolder:
    """A Kaggle Severstal folder: every image under train_images/ and the masks of each."""

    root: Path
    csv_path: Path
    image_dir: Path
    runs: dict[str, dict[int, Run]]
    image_ids: tuple[str, ...]

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / image_id

    def classes_of(self, image_id: str) -> frozenset[int]:
        return frozenset(self.runs.get(image_id, {}))

    def label(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        """Label map for `image_id` at the image's own `shape` (height, width)."""
        try:
            return label_map(self.runs.get(image_id, {}), shape)
        except RLEError as exc:
            raise BadSampleError(self.csv_path, str(exc)) from None


def is_kaggle_folder(root: Path) -> bool:
    return (root / "train.csv").is_file() and (root / "train_images").is_dir()


def open_kaggle_folder(root: str | Path) -> KaggleFolder:
    """Read a Kaggle folder. CSV rows naming images that are not on disk are an error."""
    root = Path(root)
    if not is_kaggle_folder(root):
        raise DataError(f"{root}: not a Kaggle Severstal folder (needs train.csv and train_images/)")
    runs = read_train_csv(root / "train.csv")
    image_dir = root / "train_images"
    on_disk = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = sorted(set(runs) - set(on_disk))
    if missing:
        example = ", ".join(missing[:5])
        raise DataError(
            f"{root / 'train.csv'}: {len(missing)} image(s) listed but not in {image_dir}: {example}"
        )
    return KaggleFolder(root, root / "train.csv", image_dir, runs, tuple(on_disk))
