"""Wall time of one 2-variant pipeline stage: --executor local (1 and 2 workers) vs Ray.

    python bench/pipeline_executors.py [--epochs 4] [--repeats 1]

All executors log to the same real `mlflow server` on 127.0.0.1 (Ray refuses a sqlite store),
train the same two FastSCNN variants on the same synthetic data (forced, never reused), in
turn, and the local Ray is started once (its start-up is printed apart). Other processes
share the CPU here: read the figures as ratios within one run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mlflow_server import running_server  # noqa: E402

from steel_seg.data.synthetic import generate_dataset  # noqa: E402
from steel_seg.pipeline.executor import LocalExecutor, run_pipeline  # noqa: E402
from steel_seg.pipeline.plan import load_pipeline  # noqa: E402

PIPELINE = """\
name: bench_executors
resources: {cpus: 1}
stages:
  - name: lr
    variants:
      slow: {config: exp.yaml, set: [train.learning_rate=0.005]}
      fast: {config: exp.yaml, set: [train.learning_rate=0.02]}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="training epochs per variant (6 steps of batch 4 each)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = generate_dataset(tmp / "kaggle", num_images=64, seed=1)
        with running_server(tmp / "server") as uri:
            config = {
                "name": "exp",
                "data": {"root": str(root), "work_dir": str(tmp / "work"), "size": [128, 32], "fallback_to_demo": False},
                "model": {"type": "FastSCNN"},
                "train": {"epochs": args.epochs, "batch_size": 4, "max_steps_per_epoch": 6, "output_dir": str(tmp / "out")},
                "eval": {"num_overlays": 0},
                "tracking": {"uri": uri, "experiment": "bench"},
            }
            (tmp / "exp.yaml").write_text(yaml.safe_dump(config))
            (tmp / "pipeline.yaml").write_text(PIPELINE)
            pipeline = load_pipeline(tmp / "pipeline.yaml")
            run_pipeline(pipeline, force=True, progress=False)  # warm: data cache built, imports done

            start = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
            print(f"ray.init(num_cpus=2): {time.perf_counter() - start:.1f} s (once, not counted below)")
            from steel_seg.pipeline.ray_executor import RayExecutor

            executors = {"local, 1 worker": lambda: LocalExecutor(1), "local, 2 workers": lambda: LocalExecutor(2),
                         "ray, 2 CPUs": RayExecutor}
            times: dict[str, list[float]] = {name: [] for name in executors}
            for _ in range(args.repeats):
                for name, make in executors.items():
                    start = time.perf_counter()
                    outcome = run_pipeline(pipeline, force=True, progress=False, executor=make())
                    times[name].append(time.perf_counter() - start)
                    assert not outcome.failed, outcome.failed
            ray.shutdown()
    base = min(times["local, 2 workers"])
    print(f"2 variants x {args.epochs} epochs x 6 steps (FastSCNN 128x32, batch 4), best of {args.repeats}:")
    for name, values in times.items():
        print(f"  {name:<18} {min(values):6.1f} s  ({min(values) / base:.2f}x local, 2 workers)")


if __name__ == "__main__":
    main()
