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


def _convert(args) -> int:
    from steel_seg.data.prepare import convert_kaggle

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DataError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    skipped: list[tuple[str, str]] = []
    seg = convert_kaggle(
        Path(args.kaggle_dir),
        out,
        ratios=tuple(args.ratios),
        seed=args.seed,
        skip_bad=args.skip_bad,
        on_skip=lambda p, r: skipped.append((p, r)),
        progress=not args.quiet,
    )
    sizes = "  ".join(f"{k}={len(v)}" for k, v in seg.splits.items())
    print(f"wrote SEG layout to {out}: {sizes}")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    return 0


def _demo(args) -> int:
    from steel_seg.data.synthetic import generate_dataset

    out = generate_dataset(Path(args.out), num_images=args.num_images, seed=args.seed, progress=not args.quiet, overwrite=args.overwrite)
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

    convert = sub.add_parser("convert", help="Kaggle folder -> PaddleX SEG layout with a 7:2:1 split")
    convert.add_argument("kaggle_dir")
    convert.add_argument("out")
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
