"""`python -m steel_seg.run CONFIG.yaml`: run one experiment, or every experiment of a pipeline.

    python -m steel_seg.run experiments/unet_dice.yaml --set train.epochs=3
    python -m steel_seg.run experiments/unet_dice.yaml --print-config
    python -m steel_seg.run experiments/unet_dice.yaml --resume
    python -m steel_seg.run pipeline.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import yaml


def _quiet_third_party() -> None:
    # Paddle warns about ccache on import and PaddleSeg logs every model it builds.
    warnings.filterwarnings("ignore", message=".*ccache.*")
    warnings.filterwarnings("ignore", message=".*always track global mean and variance.*")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # measured faster on CPU
    # MLflow draws a progress bar for every artifact download, even of one small file.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steel_seg.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML, or a pipeline YAML listing experiments")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys, e.g. train.epochs=3 model.type=UNet")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--check", action="store_true", help="validate the config (and model/loss/augment names) and exit")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR", help="continue from the last checkpoint (latest run of this experiment, or RUN_DIR)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return parser


def is_pipeline(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "experiments" in data


def pipeline_entries(path: Path) -> list[tuple[Path, list[str]]]:
    """Experiments of a pipeline file: `experiments: [file, {config: file, set: [k=v]}]`."""
    from steel_seg.config import ConfigError

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown = set(data) - {"experiments", "set", "name"}
    if unknown:
        raise ConfigError(f"{path}: unknown pipeline key(s) {sorted(unknown)}; expected experiments, set, name")
    common = list(data.get("set") or [])
    entries = []
    for i, item in enumerate(data["experiments"] or []):
        if isinstance(item, str):
            entries.append((path.parent / item, common))
        elif isinstance(item, dict) and "config" in item and set(item) <= {"config", "set"}:
            entries.append((path.parent / item["config"], common + list(item.get("set") or [])))
        else:
            raise ConfigError(f"{path}: experiments[{i}] must be a path or {{config: path, set: [KEY=VALUE]}}, got {item!r}")
    for file, _ in entries:
        if not file.is_file():
            raise ConfigError(f"{path}: experiment file not found: {file}")
    return entries


def _stop_on_sigterm() -> None:
    """A job scheduler's SIGTERM ends the run like Ctrl-C: MLflow run KILLED, checkpoint kept."""

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party()
    args = build_parser().parse_args(argv)
    import paddle  # noqa: F401  - Paddle installs its own SIGTERM handler on import; ours goes after

    _stop_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("alembic").setLevel(logging.WARNING)

    from steel_seg.config import ConfigError, dump_config, load_experiment
    from steel_seg.data.errors import DataError
    from steel_seg.experiment import ExperimentError, check_runnable, run_experiment

    path = Path(args.config)
    try:
        entries = pipeline_entries(path) if is_pipeline(path) else [(path, [])]
        configs = [load_experiment(file, sets + args.overrides) for file, sets in entries]
        if args.print_config:
            print("\n---\n".join(dump_config(c) for c in configs))
            return 0
        for config in configs:  # everything is checked before any work starts
            check_runnable(config)
        if args.check:
            print(f"ok: {len(configs)} experiment(s) valid")
            return 0
        if args.resume and len(configs) > 1:
            raise ConfigError("--resume applies to a single experiment, not a pipeline")
        results = []
        for config, (_, sets) in zip(configs, entries):
            result = run_experiment(config, resume=args.resume, progress=not args.no_progress, overrides=sets + args.overrides)
            print(result.summary)
            results.append(result)
        if len(results) > 1:
            print("\n" + comparison_table(results))
        return 0
    except (ConfigError, ExperimentError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the MLflow run is marked KILLED; continue it with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - report, the MLflow run is already marked FAILED
        from steel_seg.trainer import NonFiniteLoss

        if isinstance(exc, NonFiniteLoss):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


def comparison_table(results) -> str:
    lines = [f"{'experiment':<28} {'mIoU':>7} {'kaggle dice':>12} {'best ep':>8}  run"]
    for r in results:
        lines.append(f"{r.name:<28} {r.scores['miou']:>7.4f} {r.scores['kaggle_dice']:>12.4f} {r.best_epoch:>8}  {r.run_id or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
