"""Synthetic steel-strip images with labelled defects, written in the Kaggle Severstal layout.

The demo run and the tests use this instead of the real data set (which may not be shared).
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from steel_seg.data.rle import rle_encode

CLASS_NAMES = ("background", "pits", "lines", "scratches", "blotches")  # index = class id
DEFECT_CLASSES = (1, 2, 3, 4)

# Weights of an image's first defect class and the chance of a second, tuned so that among
# images with defects about 73% contain class 3, 15% class 1, 14% class 4, 5% class 2 and 6%
# two classes, close to Severstal's 77%, 13%, 12%, 4% and 6% (of 6666 images with defects).
PRIMARY_CLASS_WEIGHTS = np.array([0.125, 0.04, 0.72, 0.115])
SECOND_CLASS_PROBABILITY = 0.06

# Sizes below are in pixels of a 256-pixel-high strip and scale with the image height.
REFERENCE_HEIGHT = 256
MIN_WIDTH, MIN_HEIGHT = 64, 32
JPEG_QUALITY = 90
PLACEMENT_ATTEMPTS = 6


# ----------------------------------------------------------------------------- class choice


def choose_classes(rng: np.random.Generator, defect_free_fraction: float = 0.5) -> set[int]:
    """The defect classes of one image: empty with `defect_free_fraction`, else one or two."""
    if rng.random() < defect_free_fraction:
        return set()
    weights = PRIMARY_CLASS_WEIGHTS / PRIMARY_CLASS_WEIGHTS.sum()
    first = int(rng.choice(DEFECT_CLASSES, p=weights))
    classes = {first}
    if rng.random() < SECOND_CLASS_PROBABILITY:
        others = [c for c in DEFECT_CLASSES if c != first]
        rest = np.array([weights[c - 1] for c in others])
        classes.add(int(rng.choice(others, p=rest / rest.sum())))
    return classes


# ----------------------------------------------------------------------------- helpers


def _smooth_noise(rng, grid_hw, width, height, interpolation=cv2.INTER_CUBIC) -> np.ndarray:
    """Unit-variance noise on a coarse grid, resized to (height, width): cheap low frequencies."""
    grid = rng.standard_normal(grid_hw, dtype=np.float32)
    return cv2.resize(grid, (width, height), interpolation=interpolation)


def _blob_polygon(rng, center, radii, angle, roughness, points=40) -> np.ndarray:
    """Vertices of a rotated ellipse whose radius wobbles by a few random harmonics."""
    t = np.linspace(0.0, 2 * np.pi, points, endpoint=False)
    radius = np.ones_like(t)
    for k in range(2, 6):
        radius += roughness * rng.normal() / k * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    radius = np.clip(radius, 0.3, None)
    x, y = radii[0] * radius * np.cos(t), radii[1] * radius * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    xy = np.stack([center[0] + c * x - s * y, center[1] + s * x + c * y], axis=1)
    return np.round(xy).astype(np.int32)


def _fill(shape, polygon) -> np.ndarray:
    layer = np.zeros(shape, dtype=np.uint8)
    cv2.fillPoly(layer, [polygon], 1)
    return layer.astype(bool)


def _support(delta: np.ndarray, min_change: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep only changes of at least `min_change` grey levels, so the mask is exactly where
    the image was altered rather than where a blur left an invisible tail."""
    mask = np.abs(delta) >= min_change
    return np.where(mask, delta, 0).astype(np.float32), mask


# ----------------------------------------------------------------------------- background


def _background(rng, width, height) -> tuple[np.ndarray, np.ndarray]:
    """Clean strip texture (float grey levels) and its rolling-mark component.

    The rolling marks are returned separately because some defects replace them.
    """
    scale = height / REFERENCE_HEIGHT
    base = rng.uniform(85, 150)
    illumination = rng.uniform(10, 24) * _smooth_noise(rng, (4, 8), width, height)
    # A tilt across the strip: one edge of the strip is often darker than the other.
    tilt = rng.uniform(-18, 18) * np.linspace(-1, 1, height, dtype=np.float32)[:, None]

    # Rows vary slowly along the strip: long thin horizontal marks of mixed widths.
    cols = max(2, width // 40)
    fine = _smooth_noise(rng, (height, cols), width, height, cv2.INTER_LINEAR)
    coarse_rows = max(2, height // 5)
    coarse = _smooth_noise(rng, (coarse_rows, max(2, width // 120)), width, height)
    rolling = rng.uniform(2.5, 6) * fine + rng.uniform(2, 5) * coarse

    grain = rng.standard_normal((height, width), dtype=np.float32)
    # Small renders stand in for downscaled big ones, where averaging has smoothed the grain.
    grain_level = rng.uniform(5, 9) * min(1.0, scale) ** 0.75
    grain = cv2.GaussianBlur(grain, (0, 0), 0.6 * max(scale, 0.5)) * grain_level
    image = base + illumination + tilt + rolling + grain
    return image.astype(np.float32), rolling.astype(np.float32)


def _oil_stains(rng, width, height) -> np.ndarray:
    """Unlabelled dark smudges: smooth, elongated along the strip, no texture of their own.

    Drawn at a quarter of the resolution because they are soft anyway.
    """
    scale = height / REFERENCE_HEIGHT
    small_w, small_h = max(8, width // 4), max(8, height // 4)
    layer = np.zeros((small_h, small_w), dtype=np.float32)
    for _ in range(rng.poisson(2.0)):
        center = (rng.uniform(0, small_w), rng.uniform(0, small_h))
        if rng.random() < 0.7:
            axes = (rng.uniform(15, 90) * scale, rng.uniform(4, 14) * scale)
        else:  # a rounder smudge, the size of a blotch but smooth inside
            axes = (rng.uniform(8, 25) * scale, rng.uniform(6, 18) * scale)
        polygon = _blob_polygon(rng, center, axes, rng.uniform(-0.2, 0.2), 0.25)
        cv2.fillPoly(layer, [polygon], float(rng.uniform(15, 45)))
    layer = cv2.GaussianBlur(layer, (0, 0), max(1.0, 4 * scale))
    return -cv2.resize(layer, (width, height), interpolation=cv2.INTER_LINEAR)


def _reflections(rng, width, height) -> np.ndarray:
    """Unlabelled bright bands from the light source, across or along the strip."""
    layer = np.zeros((height, width), dtype=np.float32)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    for _ in range(rng.poisson(0.8)):
        gain = rng.uniform(10, 30)
        if rng.random() < 0.6:
            # Across the strip, slightly slanted.
            center = rng.uniform(0, width) + rng.uniform(-0.3, 0.3) * (y - height / 2)
            spread = rng.uniform(15, 90) * height / REFERENCE_HEIGHT
            layer += gain * np.exp(-0.5 * ((x - center) / spread) ** 2)
        else:
            center = rng.uniform(0, height)
            spread = rng.uniform(8, 30) * height / REFERENCE_HEIGHT
            layer += gain * np.exp(-0.5 * ((y - center) / spread) ** 2)
    return layer


# ----------------------------------------------------------------------------- defects
# Each defect gets the surface so far and its rolling marks, and returns (delta, mask): the
# grey-level change and the pixels it changed.


def _pits(rng, surface, rolling) -> tuple[np.ndarray, np.ndarray]:
    """Class 1: a cluster of small roundish dots, dark with a bright rim or the reverse."""
    height, width = surface.shape
    scale = height / REFERENCE_HEIGHT
    layer = np.zeros((height, width), dtype=np.float32)
    center = np.array([rng.uniform(0, width), rng.uniform(0, height)])
    spread = np.array([rng.uniform(10, 60), rng.uniform(8, 35)]) * scale
    dark_core = rng.random() < 0.75
    core = -rng.uniform(30, 55) if dark_core else rng.uniform(30, 50)
    rim = rng.uniform(18, 32) * (1 if dark_core else -1)
    for _ in range(rng.integers(5, 25)):
        x, y = center + rng.normal(0, 1, 2) * spread
        r = rng.uniform(1.8, 4.5) * scale
        xy = (int(round(x * 4)), int(round(y * 4)))  # shift=2: quarter-pixel positions
        rim_radius = r + max(1.2, 2.2 * scale)
        cv2.circle(layer, xy, int(round(rim_radius * 4)), rim, -1, shift=2)
        cv2.circle(layer, xy, int(round(r * 4)), core, -1, shift=2)
    layer = cv2.GaussianBlur(layer, (0, 0), 0.7 * max(scale, 0.5))
    return _support(layer, 3.0)


def _lines(rng, surface, rolling) -> tuple[np.ndarray, np.ndarray]:
    """Class 2: one to three thin, slightly wavy cracks, mostly vertical or diagonal."""
    height, width = surface.shape
    scale = height / REFERENCE_HEIGHT
    layer = np.zeros((height, width), dtype=np.float32)
    origin = np.array([rng.uniform(0, width), rng.uniform(0, height)])
    base_angle = rng.uniform(-0.7, 0.7)  # radians from vertical
    value = -rng.uniform(30, 50) if rng.random() < 0.8 else rng.uniform(25, 40)
    for _ in range(rng.integers(1, 4)):
        length = rng.uniform(70, 260) * scale
        steps = 8
        angles = base_angle + rng.uniform(-0.15, 0.15) + np.cumsum(rng.normal(0, 0.08, steps))
        step = length / steps
        xy = np.cumsum(np.stack([np.sin(angles), np.cos(angles)], axis=1) * step, axis=0)
        start = origin + rng.normal(0, 12, 2) * scale - xy[steps // 2]
        points = np.vstack([start, start + xy])
        thickness = max(1, int(round(rng.uniform(1.5, 4) * scale)))
        cv2.polylines(layer, [np.round(points).astype(np.int32)], False, value, thickness)
    layer = cv2.GaussianBlur(layer, (0, 0), 0.6 * max(scale, 0.5))
    return _support(layer, 3.0)


def _scratches(rng, surface, rolling) -> tuple[np.ndarray, np.ndarray]:
    """Class 3: an elongated patch full of parallel scratches at an angle to the rolling marks."""
    height, width = surface.shape
    scale = height / REFERENCE_HEIGHT
    center = (rng.uniform(0, width), rng.uniform(0.15, 0.85) * height)
    radii = (rng.uniform(60, 320) * scale, rng.uniform(12, 60) * scale)
    polygon = _blob_polygon(rng, center, radii, rng.uniform(-0.35, 0.35), 0.2)
    mask = _fill((height, width), polygon)
    if not mask.any():
        return np.zeros((height, width), np.float32), mask

    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    angle = rng.choice([-1, 1]) * rng.uniform(0.35, 1.2)  # away from horizontal
    across = -np.sin(angle) * x + np.cos(angle) * y
    along = np.cos(angle) * x + np.sin(angle) * y
    offset = across - across.min()
    period = rng.uniform(4, 10) * max(scale, 0.4)
    count = int(offset.max() / (0.5 * period)) + 2
    # Irregular spacing and widths: machined-looking regular stripes would be too easy.
    edges = np.concatenate([[0.0], np.cumsum(rng.uniform(0.5, 1.5, count) * period)])
    index = np.searchsorted(edges, offset, side="right") - 1
    widths = rng.uniform(0.25, 0.6, count + 1) * period
    on_line = (offset - edges[index]) < widths[index]
    # Each scratch has its own strength and sign; some slots stay empty.
    strength = rng.normal(0, 1, count + 1) * (rng.random(count + 1) < 0.7)
    # Scratches fade in and out along their length.
    pieces = 6
    fade_grid = rng.standard_normal((count + 1, pieces)).astype(np.float32)
    piece = ((along - along.min()) / (np.ptp(along) + 1) * pieces).astype(np.int64)
    fade = fade_grid[index, piece]
    streaks = strength[index] * on_line * (0.6 + 0.4 * np.tanh(fade))
    texture = rng.uniform(16, 30) * streaks.astype(np.float32)
    texture = cv2.GaussianBlur(texture, (0, 0), 0.5 * max(scale, 0.5))

    local_mask = mask[y0:y1, x0:x1]
    delta = np.zeros((height, width), dtype=np.float32)
    # The scratched surface has lost its rolling marks and is slightly brighter or darker.
    shift = rng.uniform(-6, 6)
    delta[y0:y1, x0:x1] = np.where(
        local_mask, texture + shift - 0.7 * rolling[y0:y1, x0:x1], 0.0
    )
    return delta, mask


def _blotches(rng, surface, rolling) -> tuple[np.ndarray, np.ndarray]:
    """Class 4: a large irregular dark region, mottled inside, with soft edges.

    It darkens to about the level of the darker background (stains, shadowed bands) rather
    than by a fixed amount, so its darkness alone does not give it away.
    """
    height, width = shape = surface.shape
    scale = height / REFERENCE_HEIGHT
    region = np.zeros(shape, dtype=np.float32)
    center = np.array([rng.uniform(0, width), rng.uniform(0, height)])
    size = rng.uniform(30, 90) * scale
    # Several overlapping lobes make the outline irregular rather than elliptical.
    for _ in range(rng.integers(2, 5)):
        lobe = center + rng.normal(0, 0.6, 2) * size
        radii = (size * rng.uniform(0.5, 1.3), size * rng.uniform(0.4, 1.0))
        cv2.fillPoly(region, [_blob_polygon(rng, lobe, radii, rng.uniform(0, np.pi), 0.5)], 1.0)
    alpha = cv2.GaussianBlur(region, (0, 0), max(1.0, size / 6))
    mask = alpha > 0.25
    grid = (max(2, height // 20), max(2, width // 20))
    mottle = 1.0 + 0.5 * _smooth_noise(rng, grid, width, height)
    grit = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), 1.0) * 22
    if not mask.any():
        return np.zeros(shape, np.float32), mask
    dark_level = np.percentile(surface[::4, ::4], rng.uniform(5, 25))
    depth = max(15.0, float(surface[mask].mean()) - dark_level) + rng.uniform(-3, 8)
    delta = -depth * alpha * np.clip(mottle, 0.2, None) + alpha * (grit - 0.6 * rolling)
    return np.where(mask, delta, 0).astype(np.float32), mask


DEFECT_RENDERERS = {1: _pits, 2: _lines, 3: _scratches, 4: _blotches}
INSTANCES = {1: (1, 3), 2: (1, 2), 3: (1, 2), 4: (1, 2)}  # inclusive range per image


def _place_defect(rng, class_id, surface, rolling, labels):
    """Render one defect instance away from other classes' pixels.

    A few placements are tried; if all touch another class, the overlap is cut from both
    the change and the mask so the label still says exactly which pixels were altered.
    """
    taken = (labels != 0) & (labels != class_id)
    for _ in range(PLACEMENT_ATTEMPTS):
        delta, mask = DEFECT_RENDERERS[class_id](rng, surface, rolling)
        if mask.any() and not (mask & taken).any():
            return delta, mask
    keep = ~taken
    return np.where(keep, delta, 0).astype(np.float32), mask & keep


# ----------------------------------------------------------------------------- samples


def render_sample(
    rng: np.random.Generator,
    width: int = 1600,
    height: int = 256,
    classes: set[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3 uint8, R == G == B) and its label map (H, W uint8, 0 = background).

    `classes` are the defect classes to draw; None draws them with `choose_classes(rng)`.
    """
    _check_size(width, height)
    if classes is None:
        classes = choose_classes(rng)
    unknown = set(classes) - set(DEFECT_CLASSES)
    if unknown:
        raise ValueError(f"unknown defect classes {sorted(unknown)}; use ids from {DEFECT_CLASSES}")

    image, rolling = _background(rng, width, height)
    image += _oil_stains(rng, width, height)
    image += _reflections(rng, width, height)
    labels = np.zeros((height, width), dtype=np.uint8)
    for class_id in sorted(classes):
        low, high = INSTANCES[class_id]
        for _ in range(rng.integers(low, high + 1)):
            delta, mask = _place_defect(rng, class_id, image, rolling, labels)
            image += delta
            labels[mask] = class_id
    gray = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), labels


def image_id(index: int) -> str:
    return f"syn_{index:05d}.jpg"


def render_indexed_sample(
    seed: int,
    index: int,
    width: int = 1600,
    height: int = 256,
    defect_free_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Image and label map number `index` of the data set `generate_dataset(seed=seed)` writes.

    Each image has its own generator, so image k is the same whatever `num_images` is.
    """
    rng = np.random.default_rng([seed, index])
    classes = choose_classes(rng, defect_free_fraction)
    return render_sample(rng, width, height, classes)


def _check_size(width: int, height: int) -> None:
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(
            f"synthetic images must be at least {MIN_WIDTH}x{MIN_HEIGHT} (width x height), "
            f"got {width}x{height}"
        )


def label_rows(name: str, labels: np.ndarray) -> list[tuple[str, int, str]]:
    """`train.csv` rows for one image: one per class present, none if defect-free."""
    present = [c for c in DEFECT_CLASSES if (labels == c).any()]
    return [(name, c, rle_encode(labels == c)) for c in present]


# ----------------------------------------------------------------------------- data set


def generate_dataset(
    out_dir: str | Path,
    num_images: int = 200,
    seed: int = 0,
    width: int = 1600,
    height: int = 256,
    defect_free_fraction: float = 0.5,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write `train.csv` and `train_images/` (Kaggle Severstal layout) into `out_dir`.

    Same arguments give byte-identical files. Refuses to write over an existing `train.csv`
    unless `overwrite=True`. Returns `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    csv_path = out_dir / "train.csv"
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if not 0.0 <= defect_free_fraction <= 1.0:
        raise ValueError(f"defect_free_fraction must be in [0, 1], got {defect_free_fraction}")
    _check_size(width, height)
    if csv_path.exists() and not overwrite:
        raise FileExistsError(
            f"{csv_path} already exists; pass overwrite=True to replace the data set there, "
            "or choose another out_dir"
        )

    image_dir = out_dir / "train_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        # Images left over from a larger earlier run would otherwise look like part of this
        # one, and an old train.csv must not outlive a run that dies half way.
        for stale in image_dir.glob("syn_*.jpg"):
            stale.unlink()
        csv_path.unlink(missing_ok=True)

    rows: list[tuple[str, int, str]] = []
    indices = tqdm(range(num_images), desc="synthetic images", unit="img", disable=not progress)
    for index in indices:
        image, labels = render_indexed_sample(seed, index, width, height, defect_free_fraction)
        name = image_id(index)
        path = image_dir / name
        if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"could not write {path}; check that the folder is writable")
        rows.extend(label_rows(name, labels))

    # train.csv is written last: a run that dies half way leaves no train.csv, so rerunning
    # is not refused.
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["ImageId", "ClassId", "EncodedPixels"])
        writer.writerows(rows)
    return out_dir
