"""Preprocessing cache: every image and label resized once, stored as memory-mapped arrays.

Decoding a 1600x256 JPEG and resizing it costs far more than a training step's data needs;
the cache pays that once. It is keyed by a fingerprint of the source files (path, size,
mtime) and the target size, so a changed source or size builds a new cache instead of
serving stale pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from steel_seg.data.errors import BadSampleError
from steel_seg.data.images import read_sample, resize_pair
from steel_seg.data.label_values import LabelMapping
from steel_seg.data.paddlex_layout import Sample

CACHE_VERSION = 2  # bump when the stored format or the resizing changes


def fingerprint_samples(samples: Iterable[Sample]) -> str:
    """A hash of the files' paths, sizes and modification times (not their bytes: fast)."""
    digest = hashlib.sha1()
    for sample in sorted(samples, key=lambda s: str(s.image)):
        for path in (sample.image, sample.label):
            try:
                stat = path.stat()
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
            except FileNotFoundError:
                digest.update(f"{path}|missing\n".encode())
    return digest.hexdigest()


def cache_key(samples: list[Sample], size: tuple[int, int], num_classes: int | None = None, label_mapping: LabelMapping | None = None) -> str:
    mapping = label_mapping.key() if label_mapping else "raw"  # "raw" keeps existing caches valid
    text = f"v{CACHE_VERSION}|{size[0]}x{size[1]}|{num_classes}|{fingerprint_samples(samples)}"
    if mapping != "raw":
        text += f"|{mapping}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class ResizedCache:
    """Resized images (N, H, W, 3) and labels (N, H, W), uint8, memory-mapped read-only."""

    directory: Path
    images: np.ndarray
    labels: np.ndarray
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def index_of(self, sample: Sample) -> int | None:
        """Row of `sample` in the cache, or None if it was skipped as bad."""
        return self._index.get(str(sample.image))

    def pair(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Read-only views into the maps; our transforms never write into their inputs."""
        return self.images[row], self.labels[row]


def open_cache(directory: Path) -> ResizedCache:
    meta = json.loads((directory / "index.json").read_text())
    return ResizedCache(
        directory,
        np.load(directory / "images.npy", mmap_mode="r"),
        np.load(directory / "labels.npy", mmap_mode="r"),
        meta["names"],
        [tuple(s) for s in meta["skipped"]],
    )


def build_cache(
    samples: list[Sample],
    size: tuple[int, int],
    cache_root: Path,
    *,
    skip_bad: bool = False,
    progress: bool = True,
    on_skip: Callable[[str, str], None] | None = None,
    num_classes: int | None = None,
    label_mapping: LabelMapping | None = None,
) -> ResizedCache:
    """Open the cache for `samples` at `size`, building it first if absent or stale.

    A bad image or label raises BadSampleError unless `skip_bad`; skipped files are listed in
    the cache's `skipped` and passed to `on_skip`. With `num_classes`, a label holding an id
    outside 0..num_classes-1 (other than 255, ignore) is a bad sample too: found here, it
    names the file; found by the loss, it would be a crash mid-epoch. `label_mapping` (from
    data.label_map / data.mask_threshold) is applied to each full-size label first. The cache is written in a temporary
    directory and renamed into place, so an interrupted build leaves nothing half-written.
    """
    cache_root = Path(cache_root)
    directory = cache_root / cache_key(samples, size, num_classes, label_mapping)
    if (directory / "index.json").is_file():
        return open_cache(directory)

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_root))
    try:
        width, height = size
        names: list[str] = []
        skipped: list[tuple[str, str]] = []
        bar = tqdm(samples, desc=f"caching {width}x{height}", unit="img", disable=not progress, leave=False)
        with RowWriter(tmp / "images.npy", (len(samples), height, width, 3)) as images, \
                RowWriter(tmp / "labels.npy", (len(samples), height, width)) as labels:
            for sample in bar:
                try:
                    image, label = read_sample(sample)
                    if label_mapping:  # on the full-size values, before the nearest-neighbour resize
                        label = label_mapping.apply(label)
                    image, label = resize_pair(image, label, size)
                    if num_classes is not None:
                        check_class_ids(sample, label, num_classes)
                except BadSampleError as exc:
                    if not skip_bad:
                        raise
                    skipped.append((str(exc.path), exc.reason))
                    if on_skip:
                        on_skip(str(exc.path), exc.reason)
                    continue
                images.write(image)
                labels.write(label)
                names.append(str(sample.image))
        (tmp / "index.json").write_text(
            json.dumps({"version": CACHE_VERSION, "size": list(size), "names": names, "skipped": skipped})
        )
        try:
            os.replace(tmp, directory)
        except OSError:  # another process built it meanwhile: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_cache(directory)


def check_class_ids(sample: Sample, label: np.ndarray, num_classes: int) -> None:
    present = np.unique(label)
    bad = present[(present >= num_classes) & (present != 255)]
    if bad.size:
        shown = bad.tolist() if bad.size <= 8 else f"{bad[:8].tolist()[:-1]} ... {int(bad[-1])} ({bad.size} values)"
        reason = f"class id(s) {shown} outside 0..{num_classes - 1} (labels.txt lists {num_classes} classes; 255 = ignore)"
        if 255 in present:  # 0/255 masks with soft edges: say what they are and the fix
            reason += "; 0, 255 and values in between look like a binary mask with soft edges: set data.mask_threshold: 128"
        raise BadSampleError(sample.label, reason)


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy header of a C-ordered uint8 array of `shape`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


class RowWriter:
    """Writes a uint8 .npy file row by row with plain file writes.

    A writable memory map keeps every written page resident in the building process (at 12k
    images and 400x64, about 1 GB); written through the file, the pages belong to the OS's
    cache and the build's memory stays flat. Rows left unwritten (skipped samples) are cut off
    at the end by rewriting the header's row count (the old way loaded all kept rows to do it).
    """

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path, self.row_shape, self.rows = path, tuple(shape[1:]), 0
        self.header = npy_header(tuple(shape))
        self.file = path.open("wb")
        self.file.write(self.header)

    def write(self, row: np.ndarray) -> None:
        if row.dtype != np.uint8 or row.shape != self.row_shape:
            raise ValueError(f"{self.path.name}: row of {row.dtype} {row.shape}, expected uint8 {self.row_shape}")
        self.file.write(np.ascontiguousarray(row).tobytes())
        self.rows += 1

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.file.close()
        final = npy_header((self.rows, *self.row_shape))
        if exc_type is None and final != self.header:
            self._rewrite_header(final)

    def _rewrite_header(self, final: bytes) -> None:
        # NumPy pads the header with room for a longer shape (so it can grow in place), so a
        # smaller row count always fits in the same bytes.
        if len(final) != len(self.header):
            raise RuntimeError(f"{self.path}: the .npy header changed length; cannot shrink in place")
        with self.path.open("r+b") as handle:
            handle.write(final)
            handle.truncate(len(final) + self.rows * int(np.prod(self.row_shape)))
