"""`python -m steel_seg.compare`: a pipeline's results, read back from MLflow.

    python -m steel_seg.compare                          # the latest pipeline run in the store
    python -m steel_seg.compare --experiment severstal_seed_study
    python -m steel_seg.compare --parent <RUN_ID> --tracking-uri http://mlflow:5000 --log

Prints a table per stage (mean ± std over seeds; a winner within noise of another variant is
marked not resolved, by Welch's t-test at p > 0.05), links to MLflow's comparison of each
stage's runs, and the reproduction report against the seed study. `--log` also writes them to
the pipeline's parent run: results/<stage>.md|.csv, results/all_stages.md, reproduction_report.md
and plots/<stage>.png.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steel_seg.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--parent", metavar="RUN_ID", help="the pipeline's parent run (default: the latest pipeline run)")
    which.add_argument("--experiment", metavar="NAME", help="MLflow experiment whose latest pipeline run to show")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--log", action="store_true", help="also log the tables, plots and report to the parent run")
    parser.add_argument("--ui", default=None, metavar="URL", help="MLflow UI address used in the printed links (default http://127.0.0.1:5000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow draws a progress bar for every artifact download, even of one small JSON file.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)

    from steel_seg.pipeline.compare import load_results, log_results, render_links, render_terminal, reproduction_report

    try:
        results = load_results(args.tracking_uri, parent_run_id=args.parent, experiment=args.experiment)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"pipeline {results.name}: run {results.parent_run_id} in experiment {results.experiment_name!r} ({results.uri})\n")
    print(render_terminal(results))
    print(render_links(results, args.ui))
    print()
    print(reproduction_report(results))
    if args.log:
        written = log_results(results.uri, results.parent_run_id, results)
        print(f"logged {len(written)} artifacts to run {results.parent_run_id}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
