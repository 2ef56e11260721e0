"""`python -m steel_seg.run CONFIG.yaml`: run one experiment, or a staged pipeline of them.

    python -m steel_seg.run experiments/unet_dice.yaml --set train.epochs=3
    python -m steel_seg.run experiments/unet_dice.yaml --print-config
    python -m steel_seg.run experiments/unet_dice.yaml --resume
    python -m steel_seg.run experiments/unet_dice.yaml --nproc 2        # data-parallel, 2 processes
    python -m steel_seg.run pipeline.yaml --dry-run
    python -m steel_seg.run pipeline.yaml --profile smoke --workers 2
    python -m steel_seg.run pipeline.yaml --executor ray --address auto   # variants as Ray tasks
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


def _quiet_third_party(threads: bool = True) -> None:
    # Paddle warns about ccache on import and PaddleSeg logs every model it builds.
    warnings.filterwarnings("ignore", message=".*ccache.*")
    warnings.filterwarnings("ignore", message=".*always track global mean and variance.*")
    if threads:  # measured faster on CPU (paddle.distributed.launch sets 1 a rank unless it is set)
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
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
    parallel = parser.add_argument_group("data-parallel training (one experiment)")
    parallel.add_argument("--nproc", type=int, default=None, metavar="N",
                          help="train on N processes of this machine (GPUs, or CPU processes over gloo) through "
                               "paddle.distributed.launch; train.batch_size is the global batch")
    parallel.add_argument("--log-dir", default="log", help="where the launcher writes each process's output (workerlog.N)")
    pipeline = parser.add_argument_group("pipelines")
    pipeline.add_argument("--dry-run", action="store_true", help="print the resolved plan (stages, variants, seeds, reuse) and exit")
    pipeline.add_argument("--executor", choices=("local", "ray"), default="local",
                          help="local: this machine (--workers); ray: each variant a Ray task (needs the cluster extra)")
    pipeline.add_argument("--address", help="--executor ray: the cluster to join (auto, or host:port); default: a local Ray")
    pipeline.add_argument("--workers", type=int, default=None, help="--executor local: run independent variants in N parallel processes")
    pipeline.add_argument("--force", action="store_true", help="retrain variants that already have a finished run")
    pipeline.add_argument("--profile", help="a profile of the pipeline file, e.g. smoke")
    return parser


def is_pipeline(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "stages" in data


def run_pipeline_file(path: Path, args) -> int:
    from steel_seg.pipeline import plan as planning
    from steel_seg.pipeline.executor import outcome_text, preview_reuse, run_pipeline

    pipeline = planning.load_pipeline(path, args.overrides, profile=args.profile)
    planning.check_pipeline(pipeline)  # every variant, before any work starts (--set is in pipeline.overrides)
    if args.check:
        print(f"ok: pipeline {pipeline.name} valid")
        return 0
    if args.dry_run:
        print(planning.dry_run_text(pipeline, preview_reuse(pipeline, force=args.force)))
        return 0
    outcome = run_pipeline(pipeline, force=args.force, progress=not args.no_progress, check=False, executor=_executor(args))
    print(outcome_text(outcome))
    from steel_seg.pipeline.compare import report_after_run

    print(report_after_run(outcome.tracking_uri, outcome.parent_run_id))
    return 1 if outcome.failed else 0


def _launch(argv: list[str], args) -> int:
    """`--nproc N`: check the config here, then start N ranks through Paddle's launcher."""
    from steel_seg.config import ConfigError, dump_config, load_experiment
    from steel_seg.distributed import launch

    if args.nproc < 1:
        print("error: --nproc must be 1 or more", file=sys.stderr)
        return 2
    if is_pipeline(Path(args.config)):
        print("error: --nproc trains one experiment on several processes; a pipeline runs its variants with "
              "--workers N (this machine) or --executor ray (a cluster)", file=sys.stderr)
        return 2
    from steel_seg.distributed import World
    from steel_seg.experiment import ExperimentError, check_parallel, check_runnable

    try:  # a typo fails here, not in N processes
        config = load_experiment(Path(args.config), args.overrides)
        check_runnable(config)
        check_parallel(config, World(0, args.nproc))
    except (ConfigError, ExperimentError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check or args.print_config:
        print("ok: experiment valid" if args.check else dump_config(config))
        return 0
    rest = _without_option(argv, "--nproc")
    return launch(_without_option(rest, "--log-dir"), args.nproc, args.log_dir)


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            out.append(item)
    return out


def _executor(args):
    from steel_seg.pipeline.executor import ExecutorError, LocalExecutor

    if args.executor == "local":
        if args.address:
            raise ExecutorError("--address is for --executor ray")
        return LocalExecutor(args.workers or 1)
    if args.workers:
        raise ExecutorError("--workers is for --executor local; on Ray, `resources:` in the pipeline file decides "
                            "how many variants run at once")
    from steel_seg.pipeline.ray_executor import RayExecutor

    return RayExecutor(args.address)


def _stop_on_sigterm() -> None:
    """A job scheduler's SIGTERM ends the run like Ctrl-C: MLflow run KILLED, checkpoint kept.

    In a data-parallel job SIGTERM comes from paddle.distributed.launch stopping the ranks
    after one failed: that is a failure of the run (FAILED), not an interruption.
    """
    from steel_seg.distributed import launched_world, stopped_by_launcher

    world = launched_world()

    def stop(signum, frame):
        if world.parallel:
            raise stopped_by_launcher(world)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.nproc is not None:
        _quiet_third_party(threads=False)  # the ranks share the cores (distributed.launch)
        return _launch(argv, args)
    _quiet_third_party()
    import paddle  # noqa: F401  - Paddle installs its own SIGTERM handler on import; ours goes after

    _stop_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("alembic").setLevel(logging.WARNING)

    from steel_seg.config import ConfigError, dump_config, load_experiment
    from steel_seg.data.errors import DataError
    from steel_seg.distributed import RankFailure
    from steel_seg.pipeline.executor import ExecutorError
    from steel_seg.experiment import AlreadyComplete, ExperimentError, check_runnable, run_experiment

    path = Path(args.config)
    try:
        if is_pipeline(path):
            if args.resume:
                raise ConfigError("--resume applies to a single experiment; rerunning a pipeline resumes it")
            return run_pipeline_file(path, args)
        config = load_experiment(path, args.overrides)
        if args.print_config:
            print(dump_config(config))
            return 0
        check_runnable(config)  # before any work starts
        if args.check:
            print("ok: experiment valid")
            return 0
        try:
            result = run_experiment(config, resume=args.resume, progress=not args.no_progress, overrides=args.overrides)
        except AlreadyComplete as exc:
            print(exc)
            return 0
        print(result.summary)
        return 0
    except (ConfigError, ExperimentError, DataError, ExecutorError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RankFailure as exc:
        print(f"error: {exc}; the MLflow run is marked FAILED", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the MLflow run is marked KILLED; continue it with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - report, the MLflow run is already marked FAILED
        from steel_seg.trainer import NonFiniteLoss

        if isinstance(exc, NonFiniteLoss):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
