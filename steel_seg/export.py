"""`python -m steel_seg.export`: export the best run of an experiment for deployment.

    python -m steel_seg.export --experiment severstal_seed_study
    python -m steel_seg.export --run-id <RUN_ID> --onnx --tune-postprocess --out export/unet_dice

Picks the FINISHED run with the highest --metric (or the given run), loads its config and best
checkpoint from MLflow, writes a self-contained export folder (inference program, deploy.yaml,
README), checks every backend against the training-time model, logs the export back to the run
and registers it in the Model Registry (alias `champion`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from steel_seg.run import _quiet_third_party


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steel_seg.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", help="MLflow experiment whose best FINISHED run to export")
    parser.add_argument("--run-id", help="export this run instead of the best one")
    parser.add_argument("--metric", default="final_val_miou", help="metric that picks the best run (higher is better)")
    parser.add_argument("--out", type=Path, help="export folder (default: export/<experiment name of the run>)")
    parser.add_argument("--onnx", action="store_true", help='also convert to ONNX and check ONNX Runtime (pip install -e ".[onnx]")')
    parser.add_argument("--tune-postprocess", action="store_true", help="search per-class thresholds and minimum areas on the validation split")
    parser.add_argument("--force", action="store_true", help="replace an existing export folder")
    parser.add_argument("--register", default="steel-seg", metavar="NAME", help="registered model name (default steel-seg)")
    parser.add_argument("--no-register", action="store_true", help="do not register in the Model Registry")
    parser.add_argument("--data", help="data.root to use for tuning if the run's data moved")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--tta", default=None, help="TTA views for deploy.yaml instead of the run's eval.tta, e.g. hflip,blur ('' for none)")
    parser.add_argument("--tta-merge", default=None, help="with --tta: mean (default), weighted, logits_mean, gmean, max")
    parser.add_argument("--tta-weights", default=None, help="with --tta-merge weighted: one per view, the original first, e.g. 0.5,0.5")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def summary(outcome) -> str:
    spec = outcome.spec
    lines = [f"exported run {outcome.run_id} ({outcome.metric} = {outcome.metric_value}) to {outcome.folder}"]
    lines.append(f"  {'backend':<12} {'ms/image':>9} {'rel. diff':>10} {'argmax':>9}")
    for name, check in sorted(spec.backends.items(), key=lambda kv: kv[1].ms_per_image or 0):
        mark = "  (default)" if name == spec.default_backend else ""
        lines.append(f"  {name:<12} {check.ms_per_image:>9.1f} {check.max_rel_diff:>10.1e} {check.argmax_agreement:>9.4%}{mark}")
    for name, why in spec.rejected.items():
        lines.append(f"  {name:<12} not offered: {why}")
    tuned = spec.postprocess.tuned
    if tuned:
        changed = ", ".join(
            f"{c}: threshold {t:g}, min area {a}" for c, t, a in zip(spec.classes[1:], spec.postprocess.thresholds[1:], spec.postprocess.min_areas[1:]) if t or a
        ) or "none (plain argmax is best)"
        lines.append(f"  post-processing tuned on {tuned['split']} ({tuned['images']} images): Kaggle Dice {tuned['before']:.4f} -> {tuned['after']:.4f}; {changed}")
    if outcome.model_version:
        lines.append(f"  registered as models:/{outcome.registered_name}/{outcome.model_version} (alias champion)")
    lines.append(f"  try it: python -m steel_seg.predict --model {outcome.folder} IMAGES... --out predictions/")
    return "\n".join(lines)


def _tta_option(args) -> dict | None:
    if args.tta is None:
        if args.tta_merge or args.tta_weights:
            raise ValueError("--tta-merge and --tta-weights go with --tta VIEWS")
        return None
    try:
        weights = [float(w) for w in args.tta_weights.split(",")] if args.tta_weights else None
    except ValueError:
        raise ValueError(f"--tta-weights must be comma-separated numbers, got {args.tta_weights!r}") from None
    return {"views": args.tta, "merge": args.tta_merge or "mean", "weights": weights}


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("alembic").setLevel(logging.WARNING)

    from steel_seg.config import ConfigError
    from steel_seg.data.errors import DataError
    from steel_seg.deploy.export import ExportError
    from steel_seg.deploy.program import ProgramExportError
    from steel_seg.deploy.release import export_run
    from steel_seg.deploy.spec import SpecError

    if not args.experiment and not args.run_id:
        print("error: give --experiment NAME (its best run is exported) or --run-id ID", file=sys.stderr)
        return 2
    register = None if args.no_register else args.register
    try:
        outcome = export_run(
            tracking_uri=args.tracking_uri, experiment=args.experiment, metric=args.metric, run_id=args.run_id,
            out=args.out, onnx=args.onnx, tune_postprocess=args.tune_postprocess, force=args.force,
            register=register, data_root=args.data, progress=not args.no_progress, tta=_tta_option(args),
        )
    except (ConfigError, DataError, ExportError, ProgramExportError, SpecError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
