"""Mask folders: `images/` beside `masks/`, with one mask per image or one folder of masks per class.

The layout most data sets outside Kaggle come in. `convert_mask_folders` writes it as a SEG
layout with the same seeded, stratified split as a Kaggle folder.

    one mask per image     images/NAME.jpg + masks/NAME.png           (0 = background, k = class k)
    one folder per class   images/NAME.jpg + masks/<class>/NAME.png   (binary; no file = class absent)

Masks have no ignore value here: 255 means "defect" in a binary 0/255 mask. A data set that
needs ignore pixels belongs in the SEG layout directly.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from steel_seg.data.errors import BadSampleError, DataError
from steel_seg.data.paddlex_layout import SegDataset, write_seg_dataset
from steel_seg.data.prepare import image_shape
from steel_seg.data.split import stratified_split

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# Lossless only: a JPEG mask has compression noise at every edge and cannot be read back exactly.
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
BINARY_THRESHOLD = 128


def is_mask_folder(root: Path) -> bool:
    return (Path(root) / "images").is_dir() and (Path(root) / "masks").is_dir()


def read_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 mask values: palette indices, never colours; a 1-bit mask reads as 0/255."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            values = np.asarray(image)
    except (OSError, ValueError) as exc:
        raise BadSampleError(path, f"unreadable mask ({exc})") from None
    if mode == "1":
        return values.astype(np.uint8) * 255
    if values.ndim == 3:
        # Grey masks saved as RGB(A) are common; real colour masks would need a colour -> class table.
        colour = values[..., : 3 if values.shape[-1] >= 3 else 1]
        if not (colour == colour[..., :1]).all():
            raise BadSampleError(
                path, f"colour mask (mode {mode}, channels differ): store one channel of class ids or 0/255"
            )
        values = colour[..., 0]
    if values.dtype.kind not in "ui" or values.max(initial=0) > 255 or values.min(initial=0) < 0:
        raise BadSampleError(path, f"mask values must be 0..255 integers, got {values.dtype} up to {values.max()}")
    return values.astype(np.uint8, copy=False)


def _files_by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> tuple[dict[str, Path], list[Path]]:
    """Visible files of `folder` with one of `suffixes`, by stem; and the other files, unused.

    Two files with one stem (a.png and a.bmp) are an error: which one is meant is a guess.
    """
    found: dict[str, Path] = {}
    others = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in suffixes:
            others.append(path)
            continue
        if path.stem in found:
            raise DataError(f"{found[path.stem]} and {path}: two {what} files named {path.stem!r}; keep one")
        found[path.stem] = path
    return found, others


def _names(paths, limit: int = 5) -> str:
    paths = list(paths)
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _check_unique(class_names: list[str]) -> None:
    duplicates = sorted({n for n in class_names if class_names.count(n) > 1})
    if duplicates or not all(class_names):
        raise DataError(f"class names must be unique and non-empty, got {class_names}")


@dataclass
class MaskFolder:
    """A mask folder's files: images by stem, and masks by stem (one per image) or by class."""

    root: Path
    images: dict[str, Path]
    per_class: bool
    masks: dict[str, Path]  # one mask per image: stem -> mask
    class_masks: dict[str, dict[str, Path]]  # one folder per class: class folder -> stem -> mask


def open_mask_folder(root: str | Path) -> MaskFolder:
    """List a mask folder and check that images and masks pair up; errors name the files."""
    root = Path(root)
    if not is_mask_folder(root):
        raise DataError(f"{root}: not a mask folder (needs images/ and masks/)")
    images, _ = _files_by_stem(root / "images", IMAGE_SUFFIXES, "image")
    if not images:
        raise DataError(f"{root / 'images'}: no images ({', '.join(IMAGE_SUFFIXES)})")
    mask_dir = root / "masks"
    class_dirs = sorted(p for p in mask_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    masks, other_files = _files_by_stem(mask_dir, MASK_SUFFIXES, "mask")
    if class_dirs and masks:
        raise DataError(
            f"{mask_dir}: holds both mask files ({_names(masks.values(), 2)}) and class folders "
            f"({_names(class_dirs, 2)}); use one mask per image or one folder per class, not both"
        )
    if class_dirs:
        class_masks = {}
        for folder in class_dirs:
            class_masks[folder.name], ignored = _files_by_stem(folder, MASK_SUFFIXES, "mask")
            _refuse_orphans(folder, class_masks[folder.name], images, ignored)
        return MaskFolder(root, images, True, {}, class_masks)
    _refuse_orphans(mask_dir, masks, images, other_files)
    unmasked = sorted(set(images) - set(masks))
    if unmasked:
        hint = f" ({_names(other_files, 3)} not used: masks must be {'/'.join(MASK_SUFFIXES)})" if other_files else ""
        raise DataError(
            f"{len(unmasked)} image(s) without a mask in {mask_dir}: {_names(images[s] for s in unmasked)}; "
            f"expected e.g. {mask_dir / (unmasked[0] + '.png')} (an all-zero mask for a defect-free image){hint}"
        )
    return MaskFolder(root, images, False, masks, {})


def _refuse_orphans(folder: Path, masks: dict[str, Path], images: dict[str, Path], ignored: list[Path]) -> None:
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(
            f"{len(orphans)} mask(s) in {folder} without an image of the same name in images/: "
            f"{_names(masks[s] for s in orphans)}"
        )
    if ignored:
        log.warning(
            "%s: ignoring %d file(s) that are not %s masks: %s", folder, len(ignored), "/".join(MASK_SUFFIXES), _names(ignored)
        )


@dataclass(frozen=True)
class MaskCoding:
    """How the set's mask values read: binary masks at a threshold, or class ids.

    Decided once for the whole set, from every mask's values, so that one image's mask is never
    read differently from another's.
    """

    binary: bool
    threshold: int = 1  # binary only: values >= threshold are the defect


def _binary_coding(maxima: dict[Path, int]) -> MaskCoding:
    """0/1 masks at 1; 0/255 masks (anti-aliased edges allowed) at 128.

    A mask whose values all lie below 128 in a 0/255 set would silently become empty: an error.
    """
    if max(maxima.values(), default=0) <= 1:
        return MaskCoding(True, 1)
    faint = sorted(p for p, m in maxima.items() if 0 < m < BINARY_THRESHOLD)
    if faint:
        example = max(maxima, key=maxima.get)
        raise DataError(
            f"{_names(faint, 3)}: mask values are all below {BINARY_THRESHOLD} (max {maxima[faint[0]]}), but other "
            f"masks (e.g. {example}) are 0/255, binarised at >= {BINARY_THRESHOLD}: these would become empty; "
            "store every mask the same way (0/1 or 0/255)"
        )
    return MaskCoding(True, BINARY_THRESHOLD)


def _per_image_coding(values: dict[Path, frozenset[int]], class_names: list[str] | None) -> tuple[MaskCoding, list[str]]:
    """One mask per image: 0/255 masks are binary (class 1), anything else holds class ids.

    Returns the coding and the defect class names (given, or `defect_k` for ids 1..max).
    """
    with_255 = sorted(p for p, v in values.items() if 255 in v)
    if with_255:
        if class_names is not None and len(class_names) != 1:
            raise DataError(
                f"{_names(with_255, 3)}: masks holding 255 are read as binary 0/255 masks (one defect class), "
                f"but --classes names {len(class_names)} classes; store class ids 1..{len(class_names)} instead"
            )
        coding = _binary_coding({p: max(v) for p, v in values.items()})
        return coding, class_names or ["defect_1"]
    ids = sorted(set().union(*values.values()) - {0})
    if class_names is not None:
        beyond = sorted(p for p, v in values.items() if max(v) > len(class_names))
        if beyond:
            raise DataError(
                f"{_names(beyond, 3)}: mask value {max(values[beyond[0]])} is not a class id: --classes names "
                f"{len(class_names)} classes (ids 1..{len(class_names)})"
            )
        return MaskCoding(False), class_names
    missing = sorted(set(range(1, max(ids, default=0) + 1)) - set(ids))
    if missing:
        raise DataError(
            f"the masks in {next(iter(values)).parent} hold values {ids}, so ids 1..{max(ids)}, but "
            f"{len(missing)} of those never occur (e.g. {missing[:5]}): "
            f"pass --classes naming ids 1..{max(ids)} in order (or, for binary masks stored as 0/{max(ids)}, "
            "rewrite them as 0/1 or 0/255)"
        )
    return MaskCoding(False), [f"defect_{i}" for i in ids]


def _class_ids(folder: MaskFolder, class_names: list[str] | None) -> dict[str, int]:
    """Class folder -> id: `class_names` order, else the folders sorted by name."""
    if class_names is None:
        return {name: i for i, name in enumerate(sorted(folder.class_masks), start=1)}
    unknown = sorted(set(folder.class_masks) - set(class_names))
    if unknown:
        near = difflib.get_close_matches(unknown[0], class_names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise DataError(
            f"{folder.root / 'masks' / unknown[0]}: class folder {unknown[0]!r} is not in --classes "
            f"({', '.join(class_names)}){hint}"
        )
    for name in sorted(set(class_names) - set(folder.class_masks)):
        log.warning("%s: no class folder %r: class %r is absent from every image", folder.root / "masks", name, name)
    return {name: i for i, name in enumerate(class_names, start=1)}


def convert_mask_folders(
    root: str | Path,
    out_dir: Path,
    class_names: list[str] | None = None,
    ratios=(0.7, 0.2, 0.1),
    seed: int = 0,
    *,
    skip_bad: bool = False,
    on_skip=None,
    progress: bool = True,
) -> SegDataset:
    """Convert a mask folder into a SEG layout with a stratified split.

    `class_names` are the defect classes in id order (background is id 0). One folder per class:
    where two classes' masks overlap, the later class id wins. Every mask is read twice (once to
    split by class set and check sizes, once to write) so memory does not grow with the set.
    """
    folder = open_mask_folder(root)
    if class_names is not None:
        _check_unique(class_names)
    ids = _class_ids(folder, class_names) if folder.per_class else {}
    bad: dict[str, BadSampleError] = {}
    shapes: dict[str, tuple[int, int]] = {}
    values: dict[Path, frozenset[int]] = {}

    def scan(stem: str, mask_path: Path) -> None:
        mask = read_mask(mask_path)
        if mask.shape != shapes[stem]:
            image = folder.images[stem]
            raise BadSampleError(
                mask_path,
                f"mask is {mask.shape[1]}x{mask.shape[0]} but its image {image} is {shapes[stem][1]}x{shapes[stem][0]}",
            )
        values[mask_path] = frozenset(np.unique(mask).tolist())

    for stem in tqdm(sorted(folder.images), desc="reading masks", unit="img", disable=not progress, leave=False):
        try:
            shapes[stem] = image_shape(folder.images[stem])
            for mask_path in _masks_of(folder, stem, ids):
                scan(stem, mask_path)
        except BadSampleError as exc:
            if not skip_bad:
                raise
            bad[stem] = exc

    if folder.per_class:
        coding = _binary_coding({p: max(v) for p, v in values.items()})
        names = sorted(ids, key=ids.get)
    else:
        coding, names = _per_image_coding(values, class_names) if values else (MaskCoding(False), class_names or [])
    if not names:
        raise DataError(f"{folder.root / 'masks'}: no defect classes found (no class folders); pass --classes")

    def classes_of(stem: str) -> frozenset[int]:
        if stem in bad:
            return frozenset()
        if folder.per_class:
            return frozenset(
                ids[c] for c, path in _class_mask_paths(folder, stem, ids) if max(values[path]) >= coding.threshold
            )
        found = values[folder.masks[stem]]
        return frozenset({1} if max(found) >= coding.threshold else set()) if coding.binary else found - {0}

    classes = {stem: classes_of(stem) for stem in folder.images}
    split = stratified_split({s: c for s, c in classes.items() if c}, ratios, seed)
    # A bad sample goes to defect_free: it is skipped there, and cannot shift the others between splits.
    split["defect_free"] = sorted(s for s, c in classes.items() if not c)

    def label_of(image: Path) -> np.ndarray:
        stem = image.stem
        if stem in bad:
            raise bad[stem]
        if not folder.per_class:
            mask = read_mask(folder.masks[stem])
            return (mask >= coding.threshold).astype(np.uint8) if coding.binary else mask
        label = np.zeros(shapes[stem], np.uint8)
        for name, path in _class_mask_paths(folder, stem, ids):  # in id order: the later id wins
            label[read_mask(path) >= coding.threshold] = ids[name]
        return label

    return write_seg_dataset(
        Path(out_dir),
        ["background", *names],
        {name: [folder.images[s] for s in stems] for name, stems in split.items()},
        label_of,
        skip_bad=skip_bad,
        on_skip=on_skip,
        progress=progress,
    )


def _class_mask_paths(folder: MaskFolder, stem: str, ids: dict[str, int]) -> list[tuple[str, Path]]:
    """(class folder, mask) of one image, in class id order; a missing file is an absent class."""
    found = [(name, folder.class_masks[name].get(stem)) for name in sorted(ids, key=ids.get) if name in folder.class_masks]
    return [(name, path) for name, path in found if path is not None]


def _masks_of(folder: MaskFolder, stem: str, ids: dict[str, int]) -> list[Path]:
    if folder.per_class:
        return [path for _, path in _class_mask_paths(folder, stem, ids)]
    return [folder.masks[stem]]
