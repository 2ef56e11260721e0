"""Data-parallel training on CPU: 2 processes through paddle.distributed.launch (gloo).

The equivalence tests use `TinyConvNet` (tests/ddp_entry.py), a model without BatchNorm:
Paddle has no SyncBatchNorm kernel on CPU, and per-rank BatchNorm statistics would make two
half batches differ from one whole batch. With it, 2 processes with the global batch split
end with the weights of 1 process, and the summed validation confusion matrices give the
same mIoU. A rank that dies fails the run; --resume under DDP finishes it.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
import yaml
from mlflow.tracking import MlflowClient

from steel_seg.config import load_experiment
from steel_seg.data.loader import BatchLoader
from steel_seg.data.synthetic import generate_dataset
from steel_seg.distributed import World, launch_command
from steel_seg.experiment import ExperimentError, check_parallel
from steel_seg.metrics import SegmentationEvaluator
from steel_seg.run import _without_option
from steel_seg.run import main as run_main

ENTRY = Path(__file__).with_name("ddp_entry.py")


# ---------------------------------------------------------------------------------------------
# The parts, in one process


class _Cache:
    """Just enough of ResizedCache for BatchLoader: rows are the sample ids."""

    def __init__(self, n: int):
        self.n = n

    def index_of(self, sample):
        return sample

    def pair(self, row):
        return np.full((2, 2, 3), row, np.float32), np.full((2, 2), row % 3, np.uint8)


def _rows(loader) -> list[list[int]]:
    return [batch.rows for batch in loader]


def test_shards_split_every_global_batch_into_disjoint_parts():
    cache = _Cache(10)
    make = lambda shard: BatchLoader(cache, list(range(10)), lambda i, l, rng: (i, l), 4, shuffle=True, drop_last=True,
                                     seed=3, shard=shard)
    whole, first, second = make((0, 1)), make((0, 2)), make((1, 2))
    for epoch in (1, 2):
        for loader in (whole, first, second):
            loader.set_epoch(epoch)
        assert len(first) == len(second) == len(whole) == 2
        for full, a, b in zip(_rows(whole), _rows(first), _rows(second)):
            assert len(a) == len(b) == 2 and not set(a) & set(b) and sorted(a + b) == sorted(full)
    with pytest.raises(ValueError, match="rank"):
        make((2, 2))


def test_merged_evaluators_score_like_one_evaluator_over_everything():
    rng = np.random.default_rng(0)
    preds, labels = rng.integers(0, 3, (6, 8, 8)), rng.integers(0, 3, (6, 8, 8))
    one = SegmentationEvaluator(3)
    one.update(preds, labels)
    parts = [SegmentationEvaluator(3) for _ in range(2)]
    parts[0].update(preds[0::2], labels[0::2])
    parts[1].update(preds[1::2], labels[1::2])
    merged = SegmentationEvaluator(3)
    for part in parts:
        merged.merge(part.state())
    want, got = one.result(), merged.result()
    assert got["confusion_matrix"] == want["confusion_matrix"] and got["num_images"] == 6
    assert got["miou"] == pytest.approx(want["miou"]) and got["kaggle_dice"] == pytest.approx(want["kaggle_dice"])
    # An average of the two halves' mIoU is not the same thing.
    assert np.mean([p.result()["miou"] for p in parts]) != pytest.approx(want["miou"], abs=1e-9)


def test_global_batch_must_split_evenly(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "train": {"batch_size": 3}}))
    config = load_experiment(path)
    check_parallel(config, World(0, 1))
    check_parallel(config, World(0, 3))
    with pytest.raises(ExperimentError, match="train.batch_size 3 is the global batch.*2 processes"):
        check_parallel(config, World(1, 2))
    assert run_main([str(path), "--nproc", "2", "--check"]) == 2  # refused before anything is launched


def test_launch_command_names_the_interpreter_then_the_module():
    command = launch_command(["c.yaml", "--set", "train.epochs=1"], 2, "logs")
    assert command[1:6] == ["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir"]
    assert command[7:] == [sys.executable, "-m", "steel_seg.run", "c.yaml", "--set", "train.epochs=1"]
    assert _without_option(["c.yaml", "--nproc", "2", "--log-dir=x", "--no-progress"], "--nproc") == ["c.yaml", "--log-dir=x", "--no-progress"]


# ---------------------------------------------------------------------------------------------
# Two real processes


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Tiny data, a config for TinyConvNet, and the single-process reference run."""
    import ddp_entry  # noqa: F401 - registers TinyConvNet in PaddleSeg's registry, as for the ranks

    root = tmp_path_factory.mktemp("ddp")
    kaggle = generate_dataset(root / "kaggle", num_images=16, seed=1)
    config = {
        "name": "tiny",
        "data": {"root": str(kaggle), "work_dir": str(root / "work"), "size": [64, 32], "fallback_to_demo": False},
        "model": {"type": "TinyConvNet"},
        "augment": "flip",
        "train": {"epochs": 2, "batch_size": 4, "max_steps_per_epoch": 3, "learning_rate": 0.05,
                  "output_dir": str(root / "single")},
        "eval": {"num_overlays": 1},
        "tracking": {"uri": f"sqlite:///{root / 'single.db'}", "experiment": "ddp"},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_main([str(path), "--no-progress"]) == 0
    return root, path


def _weights(output_dir: Path) -> dict[str, np.ndarray]:
    (checkpoint,) = glob.glob(str(output_dir / "tiny" / "*" / "last.pdckpt"))
    return {k: v.numpy() for k, v in paddle.load(checkpoint)["model"].items()}


def _max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _launch(root: Path, path: Path, name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The entry script on 2 processes, with its own output folder, store and launcher logs."""
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(root / f"log_{name}"),
               str(ENTRY), str(path), "--no-progress", *args,
               "--set", f"train.output_dir={root / name}", f"tracking.uri=sqlite:///{root / (name + '.db')}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def _runs(root: Path, name: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{root / (name + '.db')}")
    return client, client.search_runs([client.get_experiment_by_name("ddp").experiment_id])


def _history(client: MlflowClient, run, metric: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one(study):
    root, path = study
    calls = root / "calls"
    done = _launch(root, path, "ddp", env={"DDP_TEST_CALLS": str(calls)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    single, ddp = _weights(root / "single"), _weights(root / "ddp")
    difference = _max_difference(single, ddp)
    print(f"max abs weight difference, 2 processes vs 1: {difference:.3g}")
    assert difference < 1e-5
    paddle.seed(0)  # the initial weights (train.seed 0): training moved them far beyond the tolerance
    import ddp_entry

    initial = {k: v.numpy() for k, v in ddp_entry.TinyConvNet(5).state_dict().items()}
    assert _max_difference(initial, ddp) > 1e-2

    # One MLflow run, with the metrics of the single-process run.
    client_1, (run_1,) = _runs(root, "single")
    client_2, runs = _runs(root, "ddp")
    assert len(runs) == 1
    run_2 = runs[0]
    assert run_2.info.status == "FINISHED" and run_2.data.tags["world_size"] == "2" and run_1.data.tags["world_size"] == "1"
    for metric in ("val_miou", "train_loss"):
        got, want = _history(client_2, run_2, metric), _history(client_1, run_1, metric)
        assert [s for s, _ in got] == [1, 2] and np.allclose([v for _, v in got], [v for _, v in want], rtol=1e-5, atol=1e-6)
    assert run_2.data.metrics["final_val_miou"] == pytest.approx(run_1.data.metrics["final_val_miou"], abs=1e-6)
    assert {a.path for a in client_2.list_artifacts(run_2.info.run_id, "checkpoints")} == {"checkpoints/best.pdparams"}

    # Rank 0 alone wrote checkpoints and talked to MLflow.
    rank0, rank1 = ((calls / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    assert rank1 == []
    assert any("last.pdckpt" in line for line in rank0) and any("best.pdparams" in line for line in rank0)
    assert "mlflow client" in rank0
    assert len(list((root / "ddp" / "tiny").iterdir())) == 1  # one output folder, chosen by rank 0


def _wait_for_status(client: MlflowClient, run_id: str, status: str, seconds: float = 30) -> object:
    deadline = time.monotonic() + seconds
    while True:
        run = client.get_run(run_id)
        if run.info.status == status or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


@pytest.mark.slow
def test_a_dying_rank_fails_the_run_and_resume_finishes_it_to_the_same_weights(study):
    root, path = study
    died = _launch(root, path, "die", env={"DDP_TEST_DIE_AT": "1:2"})  # rank 1 exits at the start of epoch 2
    assert died.returncode != 0
    assert "Container rank 1 status failed" in died.stdout + died.stderr  # the launcher names the rank and its log
    client, (run,) = _runs(root, "die")
    assert run.info.status == "FAILED", run.data.tags
    reason = run.data.tags["failure_reason"]
    assert "another rank has most likely stopped" in reason and "workerlog" in reason
    assert "a collective operation failed" in (root / "log_die" / "workerlog.0").read_text()

    resumed = _launch(root, path, "die", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client, runs = _runs(root, "die")
    assert [r.info.run_id for r in runs] == [run.info.run_id] and runs[0].info.status == "FINISHED"
    assert "failure_reason" not in runs[0].data.tags
    assert [s for s, _ in _history(client, runs[0], "val_miou")] == [1, 2]
    assert _max_difference(_weights(root / "single"), _weights(root / "die")) < 1e-5


@pytest.mark.slow
def test_rank_0_killed_outright_still_ends_its_run_failed(study):
    root, path = study
    died = _launch(root, path, "kill0", env={"DDP_TEST_DIE_AT": "0:2"})  # no Python cleanup runs in rank 0
    assert died.returncode != 0
    client, (run,) = _runs(root, "kill0")
    run = _wait_for_status(client, run.info.run_id, "FAILED")
    assert run.info.status == "FAILED"
    assert "rank 0" in run.data.tags["failure_reason"] and "died without ending the run" in run.data.tags["failure_reason"]


@pytest.mark.slow
def test_nproc_runs_a_paddleseg_model_on_two_processes_as_one_run(study):
    root, _ = study
    config = yaml.safe_load((root / "tiny.yaml").read_text())
    config["model"] = {"type": "FastSCNN"}  # BatchNorm: statistics per rank on CPU (no SyncBN kernel)
    config["train"].update(output_dir=str(root / "nproc"), sync_bn=True, epochs=1)
    config["tracking"]["uri"] = f"sqlite:///{root / 'nproc.db'}"
    path = root / "fastscnn.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_main([str(path), "--nproc", "2", "--no-progress", "--log-dir", str(root / "log_nproc")]) == 0
    assert "no SyncBatchNorm kernel on CPU" in (root / "log_nproc" / "workerlog.0").read_text()
    client, runs = _runs(root, "nproc")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["world_size"] == "2"
    assert "final_val_miou" in runs[0].data.metrics
    (folder,) = (root / "nproc" / "tiny").iterdir()
    assert {p.name for p in folder.iterdir()} >= {"last.pdckpt", "best.pdparams", "config.yaml", "metrics.json"}
    assert "training done; rank 0 records the run" in (root / "log_nproc" / "workerlog.1").read_text()
