"""`python -m steel_seg.predict`: masks, overlays and a Kaggle submission from an export folder.

    python -m steel_seg.predict --model export/unet_dice data/test_images/ --out predictions/
    python -m steel_seg.predict --model export/unet_dice "shots/*.jpg" --backend onednn --tta hflip
    python -m steel_seg.predict --model export/unet_dice data/test_images/ --benchmark

Writes `masks/<name>.png` (class ids, palette PNG), `overlays/<name>.jpg` and `submission.csv`
(ImageId,ClassId,EncodedPixels; one row per image and defect class, empty where none). An
unreadable input is reported by name, listed in `skipped.txt`, and the rest go on.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

from steel_seg.deploy.images import IMAGE_SUFFIXES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steel_seg.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="export folder (python -m steel_seg.export)")
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default predictions/)")
    parser.add_argument("--backend", default="auto", help="auto (fastest checked at export) or a backend name from deploy.yaml")
    parser.add_argument("--tta", nargs="*", default=None, help="TTA views (default: deploy.yaml's; --tta alone turns TTA off)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--no-postprocess", action="store_true", help="plain argmax: ignore the thresholds and minimum areas")
    parser.add_argument("--no-overlays", action="store_true")
    parser.add_argument("--benchmark", action="store_true", help="measure every offered backend on these images and exit")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def expand_inputs(items: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files from paths, folders (their images, sorted) and globs; what matched nothing is reported."""
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                missing.append((item, f"folder has no images ({', '.join(IMAGE_SUFFIXES)})"))
            files += found
        elif path.is_file():
            files.append(path)
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                missing.append((item, "pattern matched no file"))
            files += found
        else:
            missing.append((item, "no such file or folder"))
    return list(dict.fromkeys(files)), missing


def _unique_stems(files: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for path in files:
        n = seen.get(path.stem, 0)
        seen[path.stem] = n + 1
        stems.append(path.stem if n == 0 else f"{path.stem}_{n}")
    return stems


def benchmark(model: Path, files: list[Path], threads: int | None, batch_size: int) -> str:
    """Whole-path ms per image of every backend the export offers, measured here."""
    from steel_seg.deploy.images import UnreadableImage, read_rgb
    from steel_seg.deploy.predictor import Predictor
    from steel_seg.deploy.spec import read_spec

    images = []
    for path in files[:16]:
        try:
            images.append(read_rgb(path))
        except UnreadableImage as exc:
            print(f"skipped: {exc}", file=sys.stderr)
    if not images:
        raise ValueError("no readable image to benchmark on")
    spec = read_spec(model)
    rows = []
    for backend in spec.backends:
        try:
            predictor = Predictor(model, backend=backend, threads=threads, batch_size=1)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is a row, not a crash
            rows.append((backend, None, f"cannot run here: {exc}"))
            continue
        rows.append((backend, predictor.time_per_image(images), ""))
    timed = [r for r in rows if r[1] is not None]
    fastest = min(timed, key=lambda r: r[1])[0] if timed else None
    lines = [f"{len(images)} images, batch 1, whole predict path; measured at export: default {spec.default_backend}"]
    for backend, ms, note in rows:
        at_export = spec.backends[backend].ms_per_image
        shown = f"{ms:9.1f}" if ms is not None else f"{'-':>9}"
        lines.append(f"  {backend:<12} {shown} ms/image  (engine at export {at_export} ms){'  <- fastest here' if backend == fastest else ''} {note}")
    if fastest and fastest != spec.default_backend:
        lines.append(f"use --backend {fastest} here (auto picks {spec.default_backend}, the fastest where it was exported)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from steel_seg.run import _quiet_third_party

    _quiet_third_party()
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from steel_seg.deploy.images import UnreadableImage, read_rgb
    from steel_seg.deploy.predictor import Predictor
    from steel_seg.deploy.spec import SpecError
    from steel_seg.deploy.submission import submission_rows, write_submission

    files, skipped = expand_inputs(args.inputs)
    try:
        if args.benchmark:
            print(benchmark(args.model, files, args.threads, args.batch_size))
            return 0
        predictor = Predictor(args.model, backend=args.backend, threads=args.threads, tta=args.tta,
                              batch_size=args.batch_size, postprocess=not args.no_postprocess)
    except (SpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from steel_seg.data.paddlex_layout import write_label_png
    from steel_seg.plots import overlay

    masks_dir, overlays_dir = args.out / "masks", args.out / "overlays"
    masks_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_overlays:
        overlays_dir.mkdir(exist_ok=True)
    import cv2

    rows, done, start = [], 0, time.perf_counter()
    stems = _unique_stems(files)
    bar = tqdm(total=len(files), desc=f"predict ({predictor.backend})", unit="img", disable=args.no_progress)
    for first in range(0, len(files), args.batch_size):
        batch = []
        for path, stem in zip(files[first:first + args.batch_size], stems[first:first + args.batch_size]):
            try:
                batch.append((path, stem, read_rgb(path)))
            except UnreadableImage as exc:
                skipped.append((str(path), exc.reason))
                tqdm.write(f"skipped {path}: {exc.reason}", file=sys.stderr)
                bar.update(1)
        for (path, stem, image), (mask, _) in zip(batch, predictor.predict_arrays([b[2] for b in batch])):
            write_label_png(masks_dir / f"{stem}.png", mask)
            if not args.no_overlays:
                cv2.imwrite(str(overlays_dir / f"{stem}.jpg"), cv2.cvtColor(overlay(image, mask), cv2.COLOR_RGB2BGR))
            rows += submission_rows(path.name, mask, range(1, predictor.spec.num_classes))
            done += 1
            bar.update(1)
    bar.close()
    write_submission(args.out / "submission.csv", rows)
    seconds = time.perf_counter() - start
    print(f"{done} image(s) predicted with {predictor.backend} in {seconds:.1f} s -> {args.out}/ (masks/, "
          f"{'' if args.no_overlays else 'overlays/, '}submission.csv)")
    skipped_file = args.out / "skipped.txt"
    if skipped:
        skipped_file.write_text("".join(f"{name}\t{reason}\n" for name, reason in skipped))
        print(f"{len(skipped)} input(s) skipped, listed in {skipped_file}:", file=sys.stderr)
        for name, reason in skipped:
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1 if done == 0 else 0
    skipped_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
