"""Data commands: `python -m steel_seg.data {check,convert,demo} ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steel_seg.data.errors import DataError


def _check(args) -> int:
    from steel_seg.data.check import check_dataset, format_report
    from steel_seg.data.label_values import LabelMapping

    mapping = LabelMapping(tuple(sorted(args.label_map.items())), args.mask_threshold)
    report = check_dataset(args.dataset, progress=not args.quiet, mapping=mapping)
    print(format_report(report, size=args.size))
    return 1 if report.problems else 0


SOURCES = ("kaggle", "masks", "labelme")


def detect_source(src: Path) -> str:
    """Which converter a folder needs; a folder that fits two is an error asking for --from."""
    from steel_seg.data.kaggle import is_kaggle_folder
    from steel_seg.data.labelme import is_labelme_folder
    from steel_seg.data.mask_folders import is_mask_folder

    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    if is_kaggle_folder(src):
        return "kaggle"
    found = [name for name, fits in (("labelme", is_labelme_folder), ("masks", is_mask_folder)) if fits(src)]
    if len(found) > 1:
        raise DataError(
            f"{src} looks like both a {found[0]} and a {found[1]} folder; pass --from {found[0]} or --from {found[1]}"
        )
    if not found:
        raise DataError(
            f"{src}: not a known source: a Kaggle folder (train.csv + train_images/), Labelme JSON files "
            "(*.json with \"shapes\") or a mask folder (images/ + masks/); pass --from if detection is wrong"
        )
    return found[0]


def class_list(text: str) -> list[str]:
    """`--classes a,b,c`: defect class names in id order (background, id 0, is implied)."""
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected unique comma-separated names like scratch,pit, got {text!r}")
    if any(name.lower() in ("background", "_background_") for name in names):
        raise argparse.ArgumentTypeError("list the defect classes only: background is implied as id 0")
    return names


def _convert(args) -> int:
    src, out = Path(args.src), Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DataError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    source = args.source or detect_source(src)
    skipped: list[tuple[str, str]] = []
    common = dict(
        ratios=tuple(args.ratios),
        seed=args.seed,
        skip_bad=args.skip_bad,
        on_skip=lambda p, r: skipped.append((p, r)),
        progress=not args.quiet,
    )
    if source == "kaggle":
        from steel_seg.data.prepare import convert_kaggle

        if args.classes:
            raise DataError("--classes does not apply to a Kaggle folder: its classes are ClassId 1-4 (defect_1..defect_4)")
        seg = convert_kaggle(src, out, **common)
    elif source == "masks":
        from steel_seg.data.mask_folders import convert_mask_folders

        seg = convert_mask_folders(src, out, args.classes, **common)
    else:
        from steel_seg.data.labelme import convert_labelme

        seg = convert_labelme(src, out, args.classes, **common)
    sizes = "  ".join(f"{k}={len(v)}" for k, v in seg.splits.items())
    print(f"wrote SEG layout to {out}: {sizes}")
    if source != "kaggle" and args.classes is None:
        names = ", ".join(seg.class_names)
        print(f"classes (ids 0..{seg.num_classes - 1}): {names}; pass --classes to set names and order")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    return 0


def _demo(args) -> int:
    from steel_seg.data.synthetic import generate_dataset

    out = generate_dataset(Path(args.out), num_images=args.num_images, seed=args.seed, progress=not args.quiet,
                           overwrite=args.overwrite, class_mix=args.class_mix,
                           defect_free_fraction=args.defect_free_fraction)
    print(f"wrote {args.num_images} synthetic images to {out} (train.csv + train_images/)")
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size is WIDTHxHEIGHT, e.g. 400x64; got {text!r}") from None
    return width, height


def _label_map(text: str) -> dict[int, int]:
    try:
        return {int(k): int(v) for k, v in (item.split(":") for item in text.split(",") if item)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"label map is VALUE:ID pairs, e.g. 255:1 or 128:1,255:1; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steel_seg.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="summarise a Kaggle or SEG data set and list problems")
    check.add_argument("dataset", help="Kaggle folder (train.csv + train_images/) or SEG folder")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.add_argument("--size", type=_size, default=(400, 64), metavar="WxH", help="data.size the set will be resized to (default 400x64)")
    check.add_argument("--label-map", type=_label_map, default={}, metavar="V:ID,...", help="as data.label_map, e.g. 255:1")
    check.add_argument("--mask-threshold", type=int, default=None, metavar="T", help="as data.mask_threshold, e.g. 128")
    check.set_defaults(func=_check)

    convert = sub.add_parser(
        "convert", help="Kaggle folder, mask folders or Labelme JSON -> PaddleX SEG layout with a 7:2:1 split"
    )
    convert.add_argument("src", help="Kaggle folder, mask folder (images/ + masks/) or folder of Labelme JSON")
    convert.add_argument("out")
    convert.add_argument("--from", dest="source", choices=SOURCES, help="source format (default: detected)")
    convert.add_argument(
        "--classes", type=class_list, metavar="A,B,C",
        help="defect class names in id order (background is id 0). labelme: the allowed labels (default: the "
        "labels found, sorted); masks: names of mask values 1.. (default: defect_1..) or the order of the class "
        "folders (default: sorted)",
    )
    convert.add_argument("--ratios", type=float, nargs=3, default=[0.7, 0.2, 0.1], metavar=("TRAIN", "VAL", "TEST"))
    convert.add_argument("--seed", type=int, default=0)
    convert.add_argument("--skip-bad", action="store_true", help="skip unreadable images / bad masks and report them")
    convert.add_argument("--overwrite", action="store_true")
    convert.add_argument("--quiet", action="store_true")
    convert.set_defaults(func=_convert)

    demo = sub.add_parser("demo", help="write the synthetic Kaggle-format demo data set")
    demo.add_argument("out")
    demo.add_argument("--num-images", type=int, default=240)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--class-mix", choices=["moderate", "severstal"], default="moderate",
                      help="severstal: the real set's class shares (class 2 in ~5%% of defect images); "
                           "moderate (the demo's): same order, every class learnable in minutes")
    demo.add_argument("--defect-free-fraction", type=float, default=0.3,
                      help="share of images without defects (the demo's 0.3; Severstal has ~0.47)")
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
