"""PaddleX / PaddleSeg SEG layout: JPEGImages/, Annotations/ (class-id PNGs), labels.txt, lists.

Lists hold `image_path label_path` a line, relative to the dataset root. Besides PaddleX's
train/val/test lists we write `defect_free_list.txt`: defect-free images held apart from the
split, so adding them to training never moves an image between val and test.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from steel_seg.data.errors import BadSampleError, DataError

LIST_FILES = {
    "train": "train_list.txt",
    "val": "val_list.txt",
    "test": "test_list.txt",
    "defect_free": "defect_free_list.txt",
}
IGNORE_INDEX = 255


@dataclass(frozen=True)
class Sample:
    """One image and its class-id label PNG (absolute paths); `name` is the image's file name."""

    image: Path
    label: Path

    @property
    def name(self) -> str:
        return self.image.name


def _palette() -> list[int]:
    """Distinct colours for ids 0..4 (black background), grey for the rest, white for ignore."""
    colours = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200)]
    colours += [(128, 128, 128)] * (256 - len(colours))
    colours[IGNORE_INDEX] = (255, 255, 255)
    return [c for rgb in colours for c in rgb]


def write_label_png(path: Path, label: np.ndarray) -> None:
    """Save a class-id map as a palette PNG (pixel value = class id, viewable in colour)."""
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"label must be a 2-D uint8 class-id map, got {label.shape} {label.dtype}")
    image = Image.fromarray(label, mode="P")
    image.putpalette(_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=False)


def read_label_png(path: Path) -> np.ndarray:
    """Class ids from a single-channel or palette PNG (palette indices, never the colours)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise BadSampleError(
                    path, f"label PNG has mode {image.mode}; expected class ids (mode P or L)"
                )
            label = np.asarray(image)
    except BadSampleError:
        raise
    except (OSError, ValueError) as exc:
        raise BadSampleError(path, f"unreadable label ({exc})") from None
    if label.max(initial=0) > IGNORE_INDEX:
        raise BadSampleError(path, f"label value {int(label.max())} is above 255")
    return label.astype(np.uint8, copy=False)


def read_labels_txt(root: Path) -> list[str]:
    path = root / "labels.txt"
    if not path.is_file():
        raise DataError(f"{path}: not found; a SEG dataset lists its class names there, one a line")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < 2:
        raise DataError(f"{path}: needs at least two classes (background first), got {names}")
    return names


def read_list(root: Path, list_name: str) -> list[Sample]:
    """Read one list file; errors name the file and line. A missing list is an empty split."""
    path = root / list_name
    if not path.is_file():
        return []
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{number}: expected `image_path label_path`, got {line!r}")
        samples.append(Sample(root / parts[0], root / parts[1]))
    return samples


def write_list(root: Path, list_name: str, samples: list[Sample]) -> None:
    lines = [f"{s.image.relative_to(root).as_posix()} {s.label.relative_to(root).as_posix()}\n" for s in samples]
    tmp = root / f".{list_name}.tmp"
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(root / list_name)


def is_seg_layout(root: Path) -> bool:
    return (root / "labels.txt").is_file() and any((root / f).is_file() for f in LIST_FILES.values())


@dataclass(frozen=True)
class SegDataset:
    """A SEG-layout folder read back: class names and the samples of each list."""

    root: Path
    class_names: list[str]
    splits: dict[str, list[Sample]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def all_samples(self) -> list[Sample]:
        seen: dict[Path, Sample] = {}
        for samples in self.splits.values():
            for sample in samples:
                seen.setdefault(sample.image, sample)
        return list(seen.values())


def open_seg_dataset(root: str | Path) -> SegDataset:
    root = Path(root)
    if not is_seg_layout(root):
        raise DataError(
            f"{root}: not a SEG dataset (needs labels.txt and train_list.txt / val_list.txt)"
        )
    names = read_labels_txt(root)
    return SegDataset(root, names, {split: read_list(root, f) for split, f in LIST_FILES.items()})


def write_seg_dataset(
    root: Path,
    class_names: list[str],
    splits: dict[str, list[Path]],
    label_of: Callable[[Path], np.ndarray],
    *,
    skip_bad: bool = False,
    on_skip: Callable[[str, str], None] | None = None,
    link_images: bool = True,
    progress: bool = False,
) -> SegDataset:
    """Write images (hard-linked or copied), label PNGs and every list into `root`.

    `splits` maps a split name (train/val/test/defect_free) to source image paths and
    `label_of(source)` gives each one's class-id map, one at a time (a full data set's labels
    do not fit in memory together). A BadSampleError stops the write unless `skip_bad`, in
    which case the image is left out and reported to `on_skip`.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.txt").write_text("".join(f"{n}\n" for n in class_names), encoding="utf-8")
    total = sum(len(v) for v in splits.values())
    bar = tqdm(total=total, desc="converting", unit="img", disable=not progress, leave=False)
    out: dict[str, list[Sample]] = {}
    for split, sources in splits.items():
        samples = []
        for source in sources:
            bar.update()
            sample = Sample(root / "JPEGImages" / source.name, root / "Annotations" / f"{source.stem}.png")
            try:
                label = label_of(source)
            except BadSampleError as exc:
                if not skip_bad:
                    raise
                if on_skip:
                    on_skip(str(exc.path), exc.reason)
                continue
            place_image(source, sample.image, link=link_images)
            write_label_png(sample.label, label)
            samples.append(sample)
        write_list(root, LIST_FILES[split], samples)
        out[split] = samples
    bar.close()
    return SegDataset(root, list(class_names), out)


def place_image(source: Path, target: Path, link: bool = True) -> None:
    """Hard-link (no extra disk for 12k JPEGs) or copy `source` to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    if link:
        try:
            target.hardlink_to(source)
            return
        except OSError:
            pass  # other file system: copy instead
    shutil.copy2(source, target)
