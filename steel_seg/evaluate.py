"""`python -m steel_seg.evaluate`: score a checkpoint, or an MLflow run's best model, on a split.

    python -m steel_seg.evaluate --run-id <RUN_ID> --split test --tta hflip,blur
    python -m steel_seg.evaluate --run-id <RUN_ID> --tta hflip,blur --choose-on val --report-on test
    python -m steel_seg.evaluate --run-id <RUN_ID> --sensitivity [--write-deploy export/unet_dice]
    python -m steel_seg.evaluate --config experiments/unet_dice.yaml --checkpoint outputs/unet_dice/<stamp>/best.pdparams
    python -m steel_seg.evaluate --model export/unet_dice --split val [--data /data/severstal]

With `--run-id` the run's own resolved config and `checkpoints/best.pdparams` are used, so the
data, size and model are exactly those it was trained with, and TTA results are logged as a
run nested under it (plain and TTA metrics, per-class IoU and recall, ms/image of each):
- `--tta V1,V2` compares plain and TTA on `--split`;
- `--choose-on val --report-on test` scores plain and every subset of the views (under each
  `--merge`, comma-separated) on one split and reports the best against plain on the other;
- `--sensitivity` cuts the choice split into quintiles of sharpness, brightness, contrast and
  defect area, derives candidate views from how the scores move, and chooses among them as
  above; the recommendation is printed and logged.
`--write-deploy FOLDER` writes the evaluated, chosen or recommended views into that export's
deploy.yaml, so the Predictor runs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from steel_seg.run import _quiet_third_party

MERGE_NAMES = ("mean", "weighted", "logits_mean", "gmean", "max")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steel_seg.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="MLflow run whose config.yaml and checkpoints/best.pdparams to use")
    source.add_argument("--checkpoint", help="a best.pdparams or last.pdckpt file (needs --config)")
    source.add_argument("--model", type=Path, help="an export folder (python -m steel_seg.export): scored at the training size and at the original size")
    parser.add_argument("--config", help="experiment YAML the checkpoint was trained with")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--split", choices=["train", "val", "test"], default=None, help="default: eval.split of the config")
    parser.add_argument("--tta", nargs="*", default=None, help="TTA views, e.g. hflip,blur or hflip+blur:5 scale:1.25 (default: eval.tta of the config)")
    parser.add_argument("--merge", default=None, help=f"{', '.join(MERGE_NAMES)}; with --choose-on a comma-separated list to choose among")
    parser.add_argument("--weights", default=None, help="with --merge weighted: one per view, the original first, e.g. 0.5,0.5")
    parser.add_argument("--choose-on", choices=["train", "val", "test"], default=None, help="with --run-id: choose the views on this split ...")
    parser.add_argument("--report-on", choices=["train", "val", "test"], default=None, help="... and report them against plain on this one (default test)")
    parser.add_argument("--choose-by", default="miou", help="metric to choose by: miou (default), defect_recall, kaggle_dice, iou_<class>, recall_<class>")
    parser.add_argument("--sensitivity", action="store_true", help="with --run-id: seed 000's sensitivity analysis and the views it suggests")
    parser.add_argument("--write-deploy", type=Path, metavar="FOLDER", help="write the views and merge into this export's deploy.yaml")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", help="with --model: data.root, if not the one of the export's training config")
    parser.add_argument("--backend", default="auto", help="with --model: backend to score (default: the export's fastest)")
    parser.add_argument("--output", help="write the scores as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, the original first (e.g. 0.5,0.5), got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("alembic").setLevel(logging.WARNING)

    from steel_seg.config import ConfigError
    from steel_seg.data.errors import DataError
    from steel_seg.experiment import ExperimentError

    try:
        if args.model:
            return _evaluate_export(args)
        if (args.choose_on or args.sensitivity or args.write_deploy) and not args.run_id:
            raise ValueError("--choose-on, --sensitivity and --write-deploy work on an MLflow run: give --run-id")
        if args.report_on and not (args.choose_on or args.sensitivity):
            raise ValueError("--report-on goes with --choose-on (or --sensitivity)")
        if args.run_id:
            return _evaluate_run(args)
        return _evaluate_checkpoint(args)
    except (ConfigError, ExperimentError, DataError, FileNotFoundError, ValueError) as exc:  # SpecError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _evaluate_run(args) -> int:
    """A finished run re-scored with TTA, logged as a nested run under it."""
    from steel_seg.deploy.tta import parse_view, resolve, split_names
    from steel_seg.metrics import format_scores
    from steel_seg.tta_analysis import reevaluate

    progress = not args.no_progress
    weights = _weights(args.weights)
    for view in split_names(args.tta):  # name errors before the model and data are loaded
        parse_view(view)
    for merge in (args.merge or "mean").split(","):
        if merge.strip() not in MERGE_NAMES:
            raise ValueError(f"unknown TTA merge `{merge.strip()}`; known: {', '.join(MERGE_NAMES)}")
    if args.write_deploy:
        _check_export_folder(args.write_deploy, args.run_id)
    loaded = reevaluate.load_run(args.tracking_uri, args.run_id, args.overrides, progress)
    config = loaded.config
    views = split_names(config.eval.tta if args.tta is None else args.tta)
    if args.sensitivity:
        merge = args.merge or "mean"
        outcome = reevaluate.sensitivity(loaded, args.choose_on or "val", args.report_on or "test", merge, args.choose_by, progress)
    elif args.choose_on:
        if not views:
            raise ValueError("--choose-on needs views to choose among: --tta hflip,blur (or eval.tta in the run's config)")
        merges = [m.strip() for m in (args.merge or config.eval.tta_merge).split(",") if m.strip()]
        outcome = reevaluate.choose_tta(loaded, views, merges, weights if args.weights else config.eval.tta_weights,
                                        args.choose_on, args.report_on or "test", args.choose_by, progress)
    else:
        split = args.split or config.eval.split
        if not views:
            result = reevaluate.score(loaded, reevaluate.PLAIN, split, progress)
            print(f"{split} split, {result.images} images, {result.ms_per_image:.1f} ms/image (no TTA: nothing logged)")
            print(format_scores(result.scores, loaded.data.class_names))
            _write_json(args.output, {"split": split, "scores": result.scores, "ms_per_image": result.ms_per_image})
            return 0
        merge = args.merge or config.eval.tta_merge
        plan = resolve(views, merge, weights if args.weights else (config.eval.tta_weights if merge == config.eval.tta_merge else None))
        outcome = reevaluate.evaluate_tta(loaded, plan, split, progress)
        plain, tta = outcome.details["plain"], outcome.details["tta"]
        _write_json(args.output, {
            "split": split, "scores": plain.scores, "ms_per_image": plain.ms_per_image, "nested_run_id": outcome.nested_run_id,
            "tta": {**plan.as_spec(), "scores": tta.scores, "ms_per_image": tta.ms_per_image},
        })
    print(outcome.summary)
    if args.output and (args.sensitivity or args.choose_on):
        choice = outcome.details.get("choice")
        _write_json(args.output, {
            "nested_run_id": outcome.nested_run_id, "plan": outcome.plan.as_spec(),
            "recommendation": outcome.details.get("recommendation"),
            "choice": None if choice is None else {
                "choose_on": choice.choose_on, "report_on": choice.report_on, "metric": choice.metric, "chosen": choice.chosen,
                "candidates": choice.candidates, "plain": choice.plain.scores, "best": choice.best.scores,
                "ms_per_image": {"plain": choice.plain.ms_per_image, "best": choice.best.ms_per_image},
            },
        })
    if args.write_deploy:
        from steel_seg.deploy.spec import set_tta

        spec = outcome.plan.as_spec()
        set_tta(args.write_deploy, spec["views"], spec["merge"], spec.get("weights"),
                chosen={"run_id": args.run_id, "nested_run_id": outcome.nested_run_id,
                        "how": "sensitivity" if args.sensitivity else ("choice" if args.choose_on else "evaluated")})
        print(f"wrote TTA {outcome.plan.describe()} into {args.write_deploy / 'deploy.yaml'}")
    return 0


def _check_export_folder(folder: Path, run_id: str) -> None:
    """--write-deploy only into an export of the same run (checked before any work)."""
    from steel_seg.deploy.spec import read_spec

    exported = read_spec(folder).source.get("run_id")
    if exported and exported != run_id:
        raise ValueError(f"--write-deploy {folder}: that export is of run {exported}, not {run_id}; export this run first")


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=float))


def _evaluate_checkpoint(args) -> int:
    """A checkpoint file under an experiment YAML: printed (and --output), not logged."""
    from steel_seg.checkpoint import load_weights
    from steel_seg.config import ConfigError, load_experiment
    from steel_seg.data.loader import BatchLoader
    from steel_seg.data.prepare import prepare_data, resolve_source
    from steel_seg.deploy.tta import resolve
    from steel_seg.evaluation import evaluate
    from steel_seg.experiment import check_runnable, select_device, with_demo_profile
    from steel_seg.metrics import format_scores
    from steel_seg.models import build_model
    from steel_seg.transforms import eval_pipeline

    if not args.config:
        raise ConfigError("--checkpoint needs --config (the experiment YAML it was trained with)")
    config = load_experiment(Path(args.config), args.overrides)
    check_runnable(config)
    source = resolve_source(config.data)
    if source[1]:
        config = with_demo_profile(config, args.overrides)
    select_device(config.train.device)
    data = prepare_data(config.data, progress=not args.no_progress, source=source)
    model = build_model(config.model.type, data.num_classes, config.model.backbone, **config.model.kwargs())
    load_weights(model, Path(args.checkpoint))
    split = args.split or config.eval.split
    loader = BatchLoader(data.cache, data.split(split), eval_pipeline(tuple(config.data.size)), config.eval.batch_size or config.train.batch_size)
    plain = evaluate(model, loader, data.num_classes, data.class_names, progress=not args.no_progress)
    out = {"split": split, "checkpoint": str(args.checkpoint), "scores": plain.scores, "ms_per_image": plain.ms_per_image}
    print(f"{split} split, {plain.images} images, {plain.ms_per_image:.1f} ms/image")
    print(format_scores(plain.scores, data.class_names))
    views = config.eval.tta if args.tta is None else args.tta
    if views:
        merge = args.merge or config.eval.tta_merge
        plan = resolve(views, merge, _weights(args.weights) if args.weights else config.eval.tta_weights)
        tta = evaluate(model, loader, data.num_classes, data.class_names, plan, progress=not args.no_progress)
        out["tta"] = {**plan.as_spec(), "scores": tta.scores, "ms_per_image": tta.ms_per_image}
        print(f"\nwith TTA {plan.describe()}, {tta.ms_per_image:.1f} ms/image ({tta.seconds / max(plain.seconds, 1e-9):.1f}x):")
        print(format_scores(tta.scores, data.class_names))
    _write_json(args.output, out)
    return 0


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
