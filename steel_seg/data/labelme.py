"""Labelme JSON annotations (polygons, rectangles, circles) as class-id masks and a SEG layout.

Shapes are filled in file order, so a later shape paints over an earlier one. Labelme has no
holes; the convention is a shape labelled `_background_` (or `background`) drawn after the outer
polygon, which paints background (0) inside it. Other shape types (line, linestrip, point, mask)
have no area we can fill and are errors naming the file and shape, never dropped in silence
(`--skip-bad` skips the whole image and reports it).

Only images with a JSON are converted: Labelme writes no file for an image never opened, so a
missing JSON cannot tell "defect-free" from "not annotated yet". Save an empty annotation in
Labelme to mark an image defect-free.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from steel_seg.data.errors import BadSampleError, DataError
from steel_seg.data.paddlex_layout import SegDataset, write_seg_dataset
from steel_seg.data.prepare import image_shape
from steel_seg.data.split import stratified_split

log = logging.getLogger(__name__)

BACKGROUND_LABELS = ("_background_", "background")  # compared case-insensitively
FILLED_SHAPES = {"polygon": 3, "rectangle": 2, "circle": 2}  # shape type -> points it needs
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def is_background(label: str) -> bool:
    return label.lower() in BACKGROUND_LABELS


@dataclass(frozen=True)
class Shape:
    label: str
    kind: str
    points: np.ndarray  # (N, 2) float x, y in pixels
    index: int  # position in the file's "shapes", for errors


@dataclass(frozen=True)
class Annotation:
    """One Labelme file: where its image is, the size it claims, and its shapes in file order."""

    json_path: Path
    image_path: Path  # imagePath relative to the JSON (may not exist)
    image_data: str | None
    size: tuple[int, int] | None  # (height, width) from imageHeight/imageWidth, if given
    shapes: tuple[Shape, ...]


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadSampleError(path, f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadSampleError(path, f"unreadable ({exc})") from None


def is_labelme_file(path: Path) -> bool:
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and "shapes" in content


def _json_files(root: Path) -> list[Path]:
    """Every *.json under `root`, skipping hidden files and folders (.git, .venv, ...)."""
    return sorted(p for p in root.rglob("*.json") if not any(part.startswith(".") for part in p.relative_to(root).parts))


def is_labelme_folder(root: Path) -> bool:
    root = Path(root)
    return root.is_dir() and any(is_labelme_file(p) for p in _json_files(root)[:50])


def _parse_shape(shape, index: int, path: Path) -> Shape:
    where = f"shapes[{index}]"
    if not isinstance(shape, dict):
        raise BadSampleError(path, f"{where}: expected an object with label and points, got {shape!r:.60}")
    label = shape.get("label")
    if not isinstance(label, str) or not label.strip():
        raise BadSampleError(path, f"{where}: missing or empty label")
    # Labelme before 3.x wrote no shape_type: those shapes are polygons.
    kind = shape.get("shape_type") or "polygon"
    if kind not in FILLED_SHAPES:
        raise BadSampleError(
            path,
            f"{where} (label {label!r}) is a {kind!r}: only {', '.join(FILLED_SHAPES)} shapes have an area to fill; "
            "redraw it as a polygon or delete it",
        )
    try:
        points = np.asarray(shape.get("points"), dtype=float)
    except (TypeError, ValueError):
        points = np.empty((0,))
    if points.ndim != 2 or points.shape[1] != 2 or not np.isfinite(points).all():
        raise BadSampleError(path, f"{where} (label {label!r}): points must be a list of [x, y] numbers")
    if len(points) < FILLED_SHAPES[kind]:
        raise BadSampleError(
            path, f"{where} (label {label!r}): a {kind} needs at least {FILLED_SHAPES[kind]} points, got {len(points)}"
        )
    return Shape(label.strip(), kind, points, index)


def read_labelme_json(path: str | Path) -> Annotation:
    """Read one Labelme file; a malformed file or shape is a BadSampleError naming it."""
    return parse_labelme(Path(path), _load_json(Path(path)))


def parse_labelme(path: Path, content) -> Annotation:
    """A Labelme file's parsed JSON as an Annotation; `path` is for errors and imagePath."""
    if not isinstance(content, dict) or not isinstance(content.get("shapes"), list):
        raise BadSampleError(path, "not a Labelme file (no \"shapes\" list)")
    # Labelme on Windows writes imagePath with backslashes.
    image_rel = str(content.get("imagePath") or "").replace("\\", "/")
    image_path = path.parent / image_rel if image_rel else path.with_suffix(".jpg")
    height, width = content.get("imageHeight"), content.get("imageWidth")
    size = (int(height), int(width)) if isinstance(height, int) and isinstance(width, int) else None
    shapes = tuple(_parse_shape(s, i, path) for i, s in enumerate(content["shapes"]))
    data = content.get("imageData")
    return Annotation(path, image_path, data if isinstance(data, str) and data else None, size, shapes)


def check_labels(annotation: Annotation, class_names: list[str]) -> None:
    """An unknown label stops the conversion (it is the class list that is wrong, not the image)."""
    for shape in annotation.shapes:
        if is_background(shape.label) or shape.label in class_names:
            continue
        near = difflib.get_close_matches(shape.label, class_names, n=1, cutoff=0.5)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise DataError(
            f"{annotation.json_path}: unknown label {shape.label!r} (shapes[{shape.index}]); known labels: "
            f"{', '.join(class_names)}, and _background_ for holes.{hint} Fix the label or add it to --classes."
        )


def rasterise(shapes, shape: tuple[int, int], class_ids: dict[str, int]) -> np.ndarray:
    """(H, W) uint8 class ids: shapes filled in order, background labels painting 0.

    Points are rounded to the nearest pixel and cv2 fills the boundary too, so touching
    polygons share their edge pixels with whichever comes later.
    """
    label = np.zeros(shape, np.uint8)
    for item in shapes:
        value = 0 if is_background(item.label) else class_ids[item.label]
        points = np.round(item.points).astype(np.int32)
        if item.kind == "polygon":
            cv2.fillPoly(label, [points], int(value))
        elif item.kind == "rectangle":
            (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
            cv2.rectangle(label, (int(x0), int(y0)), (int(x1), int(y1)), int(value), thickness=-1)
        else:  # circle: centre, then a point on the circle
            radius = int(round(float(np.linalg.norm(item.points[1] - item.points[0]))))
            cv2.circle(label, (int(points[0][0]), int(points[0][1])), radius, int(value), thickness=-1)
    return label


def _image_from_data(annotation: Annotation, staging: Path) -> Path:
    """Write the JSON's embedded imageData as a JPEG in `staging` (the image file is missing)."""
    try:
        raw = base64.b64decode(annotation.image_data, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise BadSampleError(annotation.json_path, f"imageData is not base64 ({exc})") from None
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise BadSampleError(annotation.json_path, "imageData does not decode to an image")
    target = staging / f"{annotation.image_path.stem}.jpg"
    if raw[:2] == b"\xff\xd8":
        target.write_bytes(raw)  # already a JPEG: keep its bytes, no second compression
    else:
        cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return target


def _locate_image(annotation: Annotation, staging: Path) -> Path:
    if annotation.image_path.is_file():
        return annotation.image_path
    if annotation.image_data:
        return _image_from_data(annotation, staging)
    raise BadSampleError(
        annotation.json_path,
        f"image {annotation.image_path} (imagePath) not found and the JSON holds no imageData",
    )


def _check_size(annotation: Annotation, image: Path) -> tuple[int, int]:
    shape = image_shape(image)
    if annotation.size and annotation.size != shape:
        raise BadSampleError(
            annotation.json_path,
            f"imageHeight x imageWidth is {annotation.size[0]}x{annotation.size[1]} but the image {image} is "
            f"{shape[0]}x{shape[1]} (height x width); was the image resized after annotation?",
        )
    return shape


def convert_labelme(
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
    """Convert a folder of Labelme JSON files (searched recursively) into a SEG layout.

    `class_names` are the defect labels in id order (background is id 0); without them, the
    sorted set of labels found. Images are split like a Kaggle folder: stratified by the set of
    classes left after rasterising, seeded; images whose mask is empty go to defect_free.
    """
    root, out_dir = Path(root), Path(out_dir)
    if class_names is not None:
        refused = [n for n in class_names if is_background(n)]
        if refused or len(set(class_names)) != len(class_names) or not all(class_names):
            raise DataError(
                f"--classes must list unique defect labels without background (id 0 is implied), got {class_names}"
            )
    annotations: dict[str, Annotation] = {}  # item name -> annotation
    bad: dict[str, BadSampleError] = {}
    for path in tqdm(_json_files(root), desc="reading Labelme", unit="file", disable=not progress, leave=False):
        try:
            content = _load_json(path)
            if not (isinstance(content, dict) and "shapes" in content):
                log.info("%s: not a Labelme file (no \"shapes\"), ignored", path)
                continue
            annotation = parse_labelme(path, content)
        except BadSampleError as exc:
            if not skip_bad:
                raise
            bad[path.name] = exc
            continue
        name = annotation.image_path.stem
        if name in annotations:
            raise DataError(
                f"{annotations[name].json_path} and {path} both annotate an image named {name!r}; "
                "the SEG layout keeps one file per name: rename one image"
            )
        annotations[name] = annotation
    if not annotations and not bad:
        raise DataError(f"{root}: no Labelme JSON files (*.json with \"shapes\")")
    _warn_unannotated(root, annotations.values())

    if class_names is None:
        labels = {s.label for a in annotations.values() for s in a.shapes if not is_background(s.label)}
        class_names = sorted(labels)
        if not class_names:
            raise DataError(f"{root}: the Labelme files hold no labels; pass --classes to name the defect classes")
    for annotation in annotations.values():
        check_labels(annotation, class_names)
    class_ids = {name: i for i, name in enumerate(class_names, start=1)}

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".labelme-image-data-", dir=out_dir))
    try:
        sources: dict[str, Path] = {}
        shapes: dict[str, tuple[int, int]] = {}
        classes: dict[str, frozenset[int]] = {}
        for name, annotation in annotations.items():
            try:
                sources[name] = _locate_image(annotation, staging)
                shapes[name] = _check_size(annotation, sources[name])
            except BadSampleError as exc:
                if not skip_bad:
                    raise
                bad[name] = exc
                sources[name] = annotation.json_path
                continue
            found = np.unique(rasterise(annotation.shapes, shapes[name], class_ids))
            classes[name] = frozenset(found.tolist()) - {0}
        for name, exc in bad.items():
            sources.setdefault(name, exc.path)
            classes[name] = frozenset()
        by_source = {sources[name]: name for name in sources}

        split = stratified_split({n: c for n, c in classes.items() if c}, ratios, seed)
        # A bad sample goes to defect_free, where it is skipped: it cannot shift the others between splits.
        split["defect_free"] = sorted(n for n, c in classes.items() if not c)

        def label_of(source: Path) -> np.ndarray:
            name = by_source[source]
            if name in bad:
                raise bad[name]
            return rasterise(annotations[name].shapes, shapes[name], class_ids)

        return write_seg_dataset(
            out_dir,
            ["background", *class_names],
            {split_name: [sources[n] for n in names] for split_name, names in split.items()},
            label_of,
            skip_bad=skip_bad,
            on_skip=on_skip,
            progress=progress,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _warn_unannotated(root: Path, annotations) -> None:
    referenced = {a.image_path.resolve() for a in annotations}
    images = [
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    left_out = sorted(p for p in images if p.resolve() not in referenced)
    if left_out:
        shown = ", ".join(str(p) for p in left_out[:3]) + (" ..." if len(left_out) > 3 else "")
        log.warning(
            "%d image(s) under %s have no Labelme JSON and are left out (%s); save an empty annotation in "
            "Labelme to include an image as defect-free",
            len(left_out), root, shown,
        )
