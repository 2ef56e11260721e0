"""`python -m steel_seg.evaluate`: score a checkpoint, or an MLflow run's best model, on a split.

    python -m steel_seg.evaluate --run-id <RUN_ID> --split test --tta hflip
    python -m steel_seg.evaluate --config experiments/unet_dice.yaml --checkpoint outputs/unet_dice/<stamp>/best.pdparams

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
    parser.add_argument("--config", help="experiment YAML the checkpoint was trained with")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--split", choices=["train", "val", "test"], default=None, help="default: eval.split of the config")
    parser.add_argument("--tta", nargs="*", default=None, help="TTA views, e.g. hflip vflip (default: eval.tta of the config)")
    parser.add_argument("--merge", choices=["mean", "gmean", "max"], default=None)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
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
    except (ConfigError, ExperimentError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
