"""The pipeline on Ray: variants as Ray tasks on a local Ray (ray.init(num_cpus=2)) started here,
logging to a real MLflow tracking server on 127.0.0.1, read back over HTTP."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_server import running_server
from pipeline_support import write_tiny_experiment
from steel_seg.data.synthetic import generate_dataset
from steel_seg.pipeline.executor import ExecutorError, outcome_text, run_pipeline
from steel_seg.pipeline.plan import load_pipeline
from steel_seg.pipeline.ray_executor import RayExecutor
from steel_seg.run import main as run_main

STUDY = """\
name: ray_study
resources: {cpus: 1}
stages:
  - name: base
    variants:
      slow_lr: {config: tiny.yaml, set: [train.learning_rate=0.001]}
      fast_lr: {config: tiny.yaml, set: [train.learning_rate=0.02]}
      corrupt_weights: {config: tiny.yaml, set: [model.pretrained=CORRUPT]}
  - name: loss
    from: best_of(base)
    variants:
      ce: {}
"""


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


def write_study(tmp_path: Path, kaggle_root: Path, uri: str) -> Path:
    write_tiny_experiment(tmp_path, kaggle_root, uri, "ray_study")
    corrupt = tmp_path / "corrupt.pdparams"
    corrupt.write_bytes(b"not a pickle" * 10)
    path = tmp_path / "pipeline.yaml"
    path.write_text(STUDY.replace("CORRUPT", str(corrupt)))
    return path


@pytest.mark.slow
def test_variants_run_as_ray_tasks_in_stage_order_and_a_failure_is_retried_once(tmp_path, ray_local, server):
    kaggle_root = generate_dataset(tmp_path / "kaggle", num_images=16, seed=1)
    pipeline = load_pipeline(write_study(tmp_path, kaggle_root, server))
    outcome = run_pipeline(pipeline, progress=False, executor=RayExecutor())
    print(outcome_text(outcome))
    by_key = {(o.stage, o.variant): o for s in outcome.stages for o in s.outcomes}
    assert {k: o.status for k, o in by_key.items()} == {
        ("base", "slow_lr"): "trained", ("base", "fast_lr"): "trained", ("base", "corrupt_weights"): "failed", ("loss", "ce"): "trained",
    }
    assert "failed twice (retried once)" in by_key[("base", "corrupt_weights")].error
    assert "corrupt.pdparams" in by_key[("base", "corrupt_weights")].error

    # Everything is on the server, read back over HTTP.
    client = MlflowClient(server)
    experiment_id = client.get_experiment_by_name("ray_study").experiment_id
    runs = client.search_runs([experiment_id], "tags.`steel_seg.role` = 'variant'", max_results=100)
    by_variant: dict[str, list] = {}
    for run in runs:
        by_variant.setdefault(run.data.tags["variant"], []).append(run)
    assert sorted(r.data.tags["steel_seg.attempt"] for r in by_variant["corrupt_weights"]) == ["1", "2"]
    assert all(r.info.status == "FAILED" for r in by_variant["corrupt_weights"])
    for name in ("slow_lr", "fast_lr", "ce"):
        (run,) = by_variant[name]
        assert run.info.status == "FINISHED" and "final_val_miou" in run.data.metrics
        assert run.data.tags["steel_seg.pid"] != str(os.getpid())  # trained in a Ray worker, not here
        assert "checkpoints/best.pdparams" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    # The loss stage started after the base stage ended, on the winner's settings.
    winner = outcome.stages[0].winner
    assert winner in ("slow_lr", "fast_lr")
    (ce,) = by_variant["ce"]
    assert ce.data.params["train.learning_rate"] == {"slow_lr": "0.001", "fast_lr": "0.02"}[winner]
    assert ce.info.start_time >= max(r.info.end_time for r in by_variant[winner] + by_variant["corrupt_weights"])
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["pipeline.executor"] == "ray"


def test_a_file_store_is_refused_with_the_server_to_use(tmp_path, ray_local):
    kaggle_root = tmp_path / "missing"
    path = write_study(tmp_path, kaggle_root, f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ExecutorError, match="use an MLflow tracking server: mlflow server --backend-store-uri"):
        run_pipeline(load_pipeline(path), progress=False, executor=RayExecutor())
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was created


def test_data_missing_on_a_worker_node_is_named(ray_local):
    with pytest.raises(ExecutorError, match=r"data.root is missing on Ray worker node\(s\): /nowhere/severstal on "):
        RayExecutor()._check_roots(["/nowhere/severstal"])


def test_without_ray_the_cli_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, tmp_path / "missing", "http://127.0.0.1:1")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: import raises ImportError
    assert run_main([str(path), "--executor", "ray", "--no-progress"]) == 2
    assert 'pip install -e ".[cluster]"' in capsys.readouterr().err
