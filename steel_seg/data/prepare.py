"""From a data config to ready-to-train splits: find or make the data, convert, split, cache.

Whatever the source (Kaggle folder, SEG folder, or the built-in demo), training always reads
a SEG layout through the resized cache. Converted layouts and caches live under
`data.work_dir`, keyed by fingerprints, so reruns reuse them and changed sources rebuild them.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from steel_seg.data import kaggle
from steel_seg.data.cache import ResizedCache, build_cache
from steel_seg.data.errors import BadSampleError, DataError
from steel_seg.data.label_values import LabelMapping
from steel_seg.data.paddlex_layout import (
    SegDataset,
    Sample,
    is_seg_layout,
    open_seg_dataset,
    read_label_png,
    write_seg_dataset,
)
from steel_seg.data.split import stratified_split
from steel_seg.data.synthetic import GENERATOR_VERSION

log = logging.getLogger(__name__)
CONVERT_VERSION = 1


@dataclass
class PreparedData:
    """Splits of one data set, all readable through `cache`."""

    source: Path
    is_demo: bool
    seg: SegDataset
    cache: ResizedCache
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    defect_free: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    label_mapping: LabelMapping = LabelMapping()
    """data.label_map / data.mask_threshold: apply it to any label read from `seg` directly."""

    def read_label(self, sample: Sample) -> np.ndarray:
        """A sample's full-size label as training sees it (mapping applied)."""
        return self.label_mapping.apply(read_label_png(sample.label))

    @property
    def class_names(self) -> list[str]:
        return self.seg.class_names

    @property
    def num_classes(self) -> int:
        return self.seg.num_classes

    def split(self, name: str) -> list[Sample]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def demo_dir(work_dir: Path, num_images: int, seed: int, class_mix: str = "moderate", defect_free_fraction: float = 0.3) -> Path:
    free = f"{defect_free_fraction:.3f}".rstrip("0").rstrip(".")
    name = f"severstal_synth_v{GENERATOR_VERSION}_{class_mix}_free{free}_n{num_images}_seed{seed}"
    return Path(work_dir) / "demo" / name


def ensure_demo_data(
    work_dir: Path, num_images: int, seed: int, class_mix: str = "moderate", defect_free_fraction: float = 0.3, progress: bool = True
) -> Path:
    """Generate the synthetic Kaggle-format demo data once (atomically) and return its folder."""
    from steel_seg.data.synthetic import generate_dataset

    target = demo_dir(work_dir, num_images, seed, class_mix, defect_free_fraction)
    if kaggle.is_kaggle_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".generating-", dir=target.parent))
    try:
        log.info("generating %d synthetic demo images (seed %d) in %s", num_images, seed, target)
        generate_dataset(
            tmp, num_images=num_images, seed=seed, defect_free_fraction=defect_free_fraction,
            progress=progress, overwrite=True, class_mix=class_mix,
        )
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _kaggle_key(folder: kaggle.KaggleFolder, ratios, seed: int) -> str:
    digest = hashlib.sha1(f"v{CONVERT_VERSION}|{list(ratios)}|{seed}\n".encode())
    digest.update(folder.csv_path.read_bytes())
    for image_id in folder.image_ids:
        stat = folder.image_path(image_id).stat()
        digest.update(f"{image_id}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError) as exc:
        raise BadSampleError(path, f"unreadable image ({exc})") from None
    return height, width


def convert_kaggle(
    kaggle_root: Path | kaggle.KaggleFolder,
    out_dir: Path,
    ratios=(0.7, 0.2, 0.1),
    seed: int = 0,
    *,
    skip_bad: bool = False,
    on_skip=None,
    progress: bool = True,
) -> SegDataset:
    """Convert a Kaggle folder into a SEG layout with a stratified split.

    Images with defects are split train/val/test by their set of classes; defect-free images
    go to `defect_free_list.txt`. A skipped bad image is removed after splitting, so it does
    not shift the others between splits.
    """
    folder = kaggle_root if isinstance(kaggle_root, kaggle.KaggleFolder) else kaggle.open_kaggle_folder(kaggle_root)
    classes = {image_id: folder.classes_of(image_id) for image_id in folder.image_ids}
    split = stratified_split({i: c for i, c in classes.items() if c}, ratios, seed)
    split["defect_free"] = sorted(i for i, c in classes.items() if not c)

    def label_of(source: Path):
        return folder.label(source.name, image_shape(source))

    return write_seg_dataset(
        Path(out_dir),
        list(kaggle.CLASS_NAMES),
        {name: [folder.image_path(i) for i in ids] for name, ids in split.items()},
        label_of,
        skip_bad=skip_bad,
        on_skip=on_skip,
        progress=progress,
    )


SKIPPED_FILE = "skipped.tsv"


def _read_skipped(root: Path) -> list[tuple[str, str]]:
    path = root / SKIPPED_FILE
    if not path.is_file():
        return []
    return [tuple(line.split("\t", 1)) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _converted(kaggle_root: Path, work_dir: Path, ratios, seed: int, skip_bad: bool, skipped: list, progress: bool = True) -> SegDataset:
    """The cached conversion of a Kaggle folder, converting first if needed.

    Images skipped as bad are remembered in the converted folder, so every later run that
    reuses the conversion still reports them.
    """
    folder = kaggle.open_kaggle_folder(kaggle_root)
    key = _kaggle_key(folder, ratios, seed) + ("-skipbad" if skip_bad else "")
    target = Path(work_dir) / "converted" / f"{kaggle_root.resolve().name}-{key}"
    if is_seg_layout(target):
        skipped += _read_skipped(target)
        return open_seg_dataset(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        log.info("converting %s to the SEG layout in %s", kaggle_root, target)
        new_skips: list[tuple[str, str]] = []
        convert_kaggle(
            folder, tmp, ratios, seed, skip_bad=skip_bad, on_skip=lambda p, r: new_skips.append((p, r)), progress=progress
        )
        (tmp / SKIPPED_FILE).write_text("".join(f"{p}\t{r}\n" for p, r in new_skips), encoding="utf-8")
        skipped += new_skips
        # Lists hold relative paths, so the renamed folder stays valid.
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_seg_dataset(target)


def _demo(data, progress: bool) -> Path:
    demo = data.demo
    return ensure_demo_data(data.work_dir, demo.num_images, demo.seed, demo.class_mix, demo.defect_free_fraction, progress)


def resolve_source(data, progress: bool = True) -> tuple[Path, bool]:
    """The data folder to use and whether it is the demo; falls back to the demo loudly."""
    if data.root is None:
        log.warning("data.root is not set: using the built-in synthetic demo data")
        return _demo(data, progress), True
    root = Path(data.root)
    if not root.exists():
        if not data.fallback_to_demo:
            raise DataError(f"data.root {root} does not exist (set data.root, e.g. --set data.root=/path/to/severstal)")
        log.warning(
            "data.root %s does not exist: falling back to the synthetic demo data. "
            "Point data.root at a Kaggle Severstal folder to train on real data.",
            root,
        )
        return _demo(data, progress), True
    return root, False


def open_source(root: Path, data, skipped: list, progress: bool = True) -> SegDataset:
    fmt = data.format
    if fmt == "auto":
        fmt = "kaggle" if kaggle.is_kaggle_folder(root) else "paddlex" if is_seg_layout(root) else None
    if fmt == "kaggle":
        return _converted(root, data.work_dir, data.split.ratios, data.split.seed, data.on_bad_sample == "skip", skipped, progress)
    if fmt == "paddlex":
        return open_seg_dataset(root)
    raise DataError(
        f"{root}: neither a Kaggle folder (train.csv + train_images/) nor a SEG dataset "
        "(labels.txt + train_list.txt); set data.format if detection is wrong"
    )


def prepare_data(data, progress: bool = True, source: tuple[Path, bool] | None = None) -> PreparedData:
    """Make `data` (a DataConfig) ready: source, conversion, split, cache; report skips.

    `source` is `resolve_source(data)`'s answer when the caller already asked.
    """
    source, is_demo = source or resolve_source(data, progress)
    skipped: list[tuple[str, str]] = []
    seg = open_source(source, data, skipped, progress)
    samples = seg.all_samples()
    if not samples:
        raise DataError(f"{seg.root}: the split lists are empty")
    cache = build_cache(
        samples,
        tuple(data.size),
        Path(data.work_dir) / "cache",
        skip_bad=data.on_bad_sample == "skip",
        progress=progress,
        num_classes=seg.num_classes,
        label_mapping=LabelMapping.from_config(data),
    )
    skipped += cache.skipped
    usable = lambda items: [s for s in items if cache.index_of(s) is not None]  # noqa: E731
    defect_free = usable(seg.splits.get("defect_free", []))
    train = usable(seg.splits["train"]) + (defect_free if data.include_defect_free else [])
    for path, reason in skipped:
        log.warning("skipped bad sample %s: %s", path, reason)
    return PreparedData(
        source=source,
        is_demo=is_demo,
        seg=seg,
        cache=cache,
        train=train,
        val=usable(seg.splits["val"]),
        test=usable(seg.splits["test"]),
        defect_free=defect_free,
        skipped=skipped,
        label_mapping=LabelMapping.from_config(data),
    )


def require_splits(data: PreparedData, needs: dict[str, str]) -> None:
    """Refuse, before any run starts, a split that the run needs and that has no usable sample.

    `needs` maps split -> why it is needed (e.g. {"val": "validation after each epoch"}). The
    error names the list file and says what to do; for a converted Kaggle folder, that the 7:2:1
    split of its images with defects left nothing for it.
    """
    from steel_seg.data.paddlex_layout import LIST_FILES

    problems = []
    for split, why in needs.items():
        if data.split(split):
            continue
        listed = len(data.seg.splits.get(split, []))
        path = data.seg.root / LIST_FILES[split]
        state = "does not exist" if not path.is_file() else (
            "lists no sample" if not listed else f"lists {listed} sample(s), all skipped as bad (see the warnings above)")
        fix = (f"add `image label` lines to it (PaddleX SEG layout)" if data.seg.root.resolve() == data.source.resolve()
               else f"{data.source} has too few images with defects for data.split's ratios: add images or change data.split")
        problems.append(f"  - {path} {state}: the {split} split is empty, but it is needed for {why}; {fix}")
    if problems:
        raise DataError("the data cannot be used for this run:\n" + "\n".join(problems))
