"""`python -m steel_seg.evaluate`: score a checkpoint, or an MLflow run's best model, on a split.

    python -m steel_seg.evaluate --run-id <RUN_ID> --split test --tta hflip
    python -m steel_seg.evaluate --config experiments/unet_dice.yaml --checkpoint outputs/unet_dice/<stamp>/best.pdparams
    python -m steel_seg.evaluate --model export/unet_dice --split val [--data /data/severstal]

With `--run-id` the run's own resolved config and `checkpoints/best.pdparams` are used, so the
data, size and model are exactly those it was trained with.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from steel_seg.run import _quiet_third_party


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steel_seg.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="MLflow run whose config.yaml and checkpoints/best.pdparams to use")
    source.add_argument("--checkpoint", help="a best.pdparams or last.pdckpt file (needs --config)")
    source.add_argument("--model", type=Path, help="an export folder (python -m steel_seg.export): scored at the training size and at the original size")
    parser.add_argument("--config", help="experiment YAML the checkpoint was trained with")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--split", choices=["train", "val", "test"], default=None, help="default: eval.split of the config")
    parser.add_argument("--tta", nargs="*", default=None, help="TTA views, e.g. hflip vflip (default: eval.tta of the config)")
    parser.add_argument("--merge", choices=["mean", "gmean", "max"], default=None)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", help="with --model: data.root, if not the one of the export's training config")
    parser.add_argument("--backend", default="auto", help="with --model: backend to score (default: the export's fastest)")
    parser.add_argument("--output", help="write the scores as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


    from steel_seg.checkpoint import load_weights
    from steel_seg.config import ConfigError, load_experiment
    from steel_seg.data.errors import DataError
    from steel_seg.data.loader import BatchLoader
    from steel_seg.data.prepare import prepare_data, resolve_source
    from steel_seg.evaluation import evaluate
    from steel_seg.experiment import ExperimentError, check_runnable, select_device, with_demo_profile
    from steel_seg.metrics import format_scores
    from steel_seg.models import build_model
    from steel_seg.transforms import eval_pipeline
    from steel_seg.tta import resolve_views

    try:
        if args.model:
            return _evaluate_export(args)
        with tempfile.TemporaryDirectory() as tmp:
            if args.run_id:
                from steel_seg.tracking import download_artifact

                config_path = download_artifact(args.tracking_uri, args.run_id, "config.yaml", Path(tmp))
                checkpoint = download_artifact(args.tracking_uri, args.run_id, "checkpoints/best.pdparams", Path(tmp))
            else:
                if not args.config:
                    raise ConfigError("--checkpoint needs --config (the experiment YAML it was trained with)")
                config_path, checkpoint = Path(args.config), Path(args.checkpoint)
            config = load_experiment(config_path, args.overrides)
            check_runnable(config)
            source = resolve_source(config.data)
            if source[1] and not args.run_id:  # a run's config is already resolved
                config = with_demo_profile(config, args.overrides)
            select_device(config.train.device)
            data = prepare_data(config.data, progress=not args.no_progress, source=source)
            model = build_model(config.model.type, data.num_classes, config.model.backbone, **config.model.kwargs())
            load_weights(model, checkpoint)
            split = args.split or config.eval.split
            size = tuple(config.data.size)
            loader = BatchLoader(data.cache, data.split(split), eval_pipeline(size), config.eval.batch_size or config.train.batch_size)
            plain = evaluate(model, loader, data.num_classes, data.class_names, progress=not args.no_progress)
            out = {"split": split, "checkpoint": str(checkpoint), "scores": plain.scores, "ms_per_image": plain.ms_per_image}
            print(f"{split} split, {plain.images} images, {plain.ms_per_image:.1f} ms/image")
            print(format_scores(plain.scores, data.class_names))
            views = config.eval.tta if args.tta is None else args.tta
            if views:
                merge = args.merge or config.eval.tta_merge
                tta = evaluate(model, loader, data.num_classes, data.class_names, resolve_views(views), merge, progress=not args.no_progress)
                out["tta"] = {"views": views, "merge": merge, "scores": tta.scores, "ms_per_image": tta.ms_per_image}
                print(f"\nwith TTA {views} ({merge}), {tta.ms_per_image:.1f} ms/image ({tta.seconds / max(plain.seconds, 1e-9):.1f}x):")
                print(format_scores(tta.scores, data.class_names))
            if args.output:
                Path(args.output).write_text(json.dumps(out, indent=2, default=float))
        return 0
    except (ConfigError, ExperimentError, DataError, FileNotFoundError, ValueError) as exc:  # SpecError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _evaluate_export(args) -> int:
    """Score an export folder at the training size (vs the run's logged mIoU) and at the original size."""
    from steel_seg.config import load_experiment
    from steel_seg.data.prepare import prepare_data, resolve_source
    from steel_seg.deploy.predictor import Predictor
    from steel_seg.deploy.scoring import score_at_model_size, score_at_original_size
    from steel_seg.metrics import format_scores

    config_path = Path(args.config) if args.config else args.model / "training_config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{args.model} has no training_config.yaml; pass --config (the experiment YAML it was trained with)")
    overrides = list(args.overrides) + ([f"data.root={args.data}"] if args.data else [])
    config = load_experiment(config_path, overrides)
    data = prepare_data(config.data, progress=not args.no_progress, source=resolve_source(config.data))
    split = args.split or config.eval.split
    plain = Predictor(args.model, backend=args.backend, tta=[])  # the run's logged scores are without TTA
    if plain.class_names != data.class_names:
        raise ValueError(f"the export's classes {plain.class_names} differ from the data's {data.class_names}")
    small = score_at_model_size(plain, data, split, progress=not args.no_progress)
    full = score_at_original_size(Predictor(args.model, backend=args.backend, tta=args.tta), data, split, progress=not args.no_progress)
    logged = plain.spec.source.get("metrics", {}).get(f"final_{split}_miou")
    print(f"export {args.model} on backend {plain.backend}, {split} split, {small.images} images")
    print(f"\nat the training size {plain.spec.preprocess.size[0]}x{plain.spec.preprocess.size[1]} ({small.ms_per_image:.1f} ms/image):")
    print(format_scores(small.scores, data.class_names))
    if logged is not None:
        print(f"mIoU {small.scores['miou']:.4f}; the run logged final_{split}_miou {logged:.4f} (difference {small.scores['miou'] - logged:+.2e})")
    print(f"\nat the original size, after upsampling and post-processing ({full.ms_per_image:.1f} ms/image):")
    print(format_scores(full.scores, data.class_names))
    if args.output:
        out = {"split": split, "model": str(args.model), "backend": plain.backend, "logged_miou": logged,
               "model_size": small.scores, "original_size": full.scores}
        Path(args.output).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
