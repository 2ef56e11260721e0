"""RunTracker against a real temporary sqlite store, read back with MlflowClient as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from steel_seg.tracking import (  # noqa: E402
    RunTracker,
    describe_store,
    download_artifact,
    flatten_params,
    resolve_tracking_uri,
)

CONFIG = {
    "name": "unet_dice",
    "data": {"size": [400, 64], "root": "/data/steel", "include_defect_free": False},
    "train": {"epochs": 10, "learning_rate": 0.01, "resume": None},
    "loss": {"use_mixed_loss": [["CrossEntropyLoss", 0.8], ["DiceLoss", 0.2]]},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module: creating its tables takes about a second."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def status_of(uri: str, run_id: str) -> str:
    return MlflowClient(uri).get_run(run_id).info.status


# ---------------------------------------------------------------------------------------------
# Pure helpers


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(None)
    assert default == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert Path(default[len("sqlite:///"):]).is_absolute()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(None) == "http://tracking:5000"
    assert resolve_tracking_uri("sqlite:///runs.db") == "sqlite:///runs.db"


def test_flatten_params_renders_config_values():
    flat = flatten_params({**CONFIG, "extra": {"seed": np.int64(3), "tags": {}}})
    assert flat == {
        "name": "unet_dice",
        "data.size": "[400, 64]",
        "data.root": "/data/steel",
        "data.include_defect_free": "False",
        "train.epochs": "10",
        "train.learning_rate": "0.01",
        "train.resume": "None",
        "loss.use_mixed_loss": '[["CrossEntropyLoss", 0.8], ["DiceLoss", 0.2]]',
        "extra.seed": "3",
        "extra.tags": "{}",
    }
    assert json.loads(flat["data.size"]) == [400, 64]


def test_describe_store_says_how_to_open_the_ui(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = describe_store(uri, experiment_id="7")
    assert f"mlflow ui --backend-store-uri {uri}" in text
    assert "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in text
    assert str(tmp_path / "mlartifacts") in text
    assert "http://tracking:5000/#/experiments/7/runs" in describe_store("http://tracking:5000", "7")


# ---------------------------------------------------------------------------------------------
# A whole run


def test_everything_logged_reads_back(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # artifacts must not land in ./mlruns of the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "best.pdparams").write_bytes(b"\x00weights\x01")
    (checkpoint_dir / "train_state.json").write_text('{"epoch": 2}')
    report = tmp_path / "report.md"
    report.write_text("# report\nmIoU 0.5\n")
    figure = plt.figure()
    plt.plot([1, 2, 3])
    records = [
        {"image": "JPEGImages/a.jpg", "label": "Annotations/a.png", "split": "train"},
        {"image": "JPEGImages/b.jpg", "label": "Annotations/b.png", "split": "train"},
    ]

    tracker = RunTracker(uri, "steel", run_name="unet-dice", tags={"stage": "loss"})
    with tracker.start() as t:
        t.log_params(CONFIG)
        t.set_tags({"arch": "UNet", "num_classes": 5})
        t.log_metrics({"train_loss": np.float32(0.75), "lr": 0.01}, step=1)
        t.log_metrics({"train_loss": np.float64(0.5), "lr": 0.005, "val_iou/defect_2": float("nan")}, step=2)
        t.log_artifact(report)
        t.log_artifact(checkpoint_dir, artifact_path="checkpoints")
        t.log_dict({"miou": 0.5, "iou": [0.9, 0.1]}, "eval/scores.json")
        t.log_text("hello steel", "notes/readme.txt")
        t.log_figure(figure, "plots/curve.png")
        t.log_dataset(records, source=str(tmp_path / "data"), name="steel-train", digest="d1g3st", context="train")
    assert not plt.fignum_exists(figure.number), "log_figure should close the figure"
    assert mlflow.active_run() is None

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unet-dice"
    assert run.data.params["train.epochs"] == "10"
    assert run.data.params["data.size"] == "[400, 64]"
    assert run.data.params["train.resume"] == "None"
    assert {"stage": "loss", "arch": "UNet", "num_classes": "5"}.items() <= run.data.tags.items()

    history = client.get_metric_history(tracker.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.75), (2, 0.5)]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "lr")] == [1, 2]
    assert "val_iou/defect_2" not in run.data.metrics  # NaN is skipped, not stored

    top = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert top == {"report.md", "checkpoints", "eval", "notes", "plots"}
    inner = {a.path for a in client.list_artifacts(tracker.run_id, "checkpoints/ckpt")}
    assert inner == {"checkpoints/ckpt/best.pdparams", "checkpoints/ckpt/train_state.json"}
    got = tmp_path / "got"
    weights = download_artifact(uri, tracker.run_id, "checkpoints/ckpt/best.pdparams", dst=got)
    assert weights.read_bytes() == b"\x00weights\x01" and weights.parent == got
    assert download_artifact(uri, tracker.run_id, "report.md").read_text() == report.read_text()
    assert json.loads(download_artifact(uri, tracker.run_id, "eval/scores.json").read_text()) == {"miou": 0.5, "iou": [0.9, 0.1]}
    assert download_artifact(uri, tracker.run_id, "notes/readme.txt").read_text() == "hello steel"
    assert download_artifact(uri, tracker.run_id, "plots/curve.png").read_bytes()[:4] == b"\x89PNG"

    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "steel-train"
    assert dataset_input.dataset.digest == "d1g3st"
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == 2
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "train"

    artifact_root = (tmp_path / "mlartifacts").as_uri()
    assert run.info.artifact_uri.startswith(artifact_root)
    assert client.get_experiment(tracker.experiment_id).artifact_location.startswith(artifact_root)
    assert not (elsewhere / "mlruns").exists() and not (tmp_path / "mlruns").exists()
    assert tracker.ui_url() == f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}?workflowType=machine_learning"


def test_missing_artifact_error_lists_what_the_run_has(store):
    with RunTracker(store, "steel") as t:
        t.log_text("x", "model/deploy.yaml")
    with pytest.raises(FileNotFoundError, match=r"no artifact 'best\.pdparams'.*model/"):
        download_artifact(store, t.run_id, "best.pdparams")


def test_log_metrics_rejects_a_list_with_the_key_named(store):
    with RunTracker(store, "steel") as t:
        with pytest.raises(TypeError, match="'val_iou'.*single number"):
            t.log_metrics({"val_iou": [0.9, 0.1]}, step=1)


# ---------------------------------------------------------------------------------------------
# How runs end


def test_crash_inside_with_marks_run_failed(store):
    tracker = RunTracker(store, "steel")
    with pytest.raises(RuntimeError, match="boom"):
        with tracker:
            raise RuntimeError("loss became nan: boom")
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "RuntimeError: loss became nan: boom"
    assert mlflow.active_run() is None


def test_keyboard_interrupt_marks_run_killed(store):
    tracker = RunTracker(store, "steel")
    with pytest.raises(KeyboardInterrupt):
        with tracker:
            raise KeyboardInterrupt
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["failure_reason"] == "KeyboardInterrupt"


def test_long_failure_reason_is_truncated(store):
    tracker = RunTracker(store, "steel").start()
    tracker.fail("x" * 20000)
    reason = MlflowClient(store).get_run(tracker.run_id).data.tags["failure_reason"]
    assert 4900 < len(reason) <= 5000 and reason.endswith("(truncated)")
    assert status_of(store, tracker.run_id) == "FAILED"


def test_resume_continues_the_same_run(store):
    with RunTracker(store, "steel") as first:
        first.log_params(CONFIG)
        first.log_metrics({"train_loss": 1.0}, step=1)
    run_id = first.run_id

    second = RunTracker(store, "steel").start(resume_run_id=run_id)
    assert second.run_id == run_id
    assert status_of(store, run_id) == "RUNNING"
    second.log_params(CONFIG)  # same values: skipped, no error
    second.log_params({"train": {"resumed_from_epoch": 1}})
    second.log_metrics({"train_loss": 0.5}, step=2)
    with pytest.raises(ValueError, match=r"train\.epochs: logged '10', now '100'") as info:
        second.log_params({"train": {"epochs": 100}})
    assert "start a new run" in str(info.value)
    second.finish()

    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "10"
    assert run.data.params["train.resumed_from_epoch"] == "1"
    assert [m.step for m in MlflowClient(store).get_metric_history(run_id, "train_loss")] == [1, 2]


def test_resume_of_unknown_run_says_what_to_check(store):
    with pytest.raises(ValueError, match="cannot resume MLflow run 'f00'.*tracking.uri"):
        RunTracker(store, "steel").start(resume_run_id="f00")


def test_nested_run_points_at_its_parent(store):
    with RunTracker(store, "ablation", run_name="study") as parent:
        for stage in ("baseline", "loss"):
            with RunTracker(store, "ablation", run_name=stage).start(parent_run_id=parent.run_id) as child:
                child.log_metrics({"val_miou": 0.5}, step=1)
                assert mlflow.active_run() is None
            run = MlflowClient(store).get_run(child.run_id)
            assert run.data.tags["mlflow.parentRunId"] == parent.run_id
            assert run.info.status == "FINISHED"
            assert child.experiment_id == parent.experiment_id
        assert status_of(store, parent.run_id) == "RUNNING"
    assert status_of(store, parent.run_id) == "FINISHED"
    assert mlflow.active_run() is None


def test_disabled_tracker_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    figure = plt.figure()
    with RunTracker(uri, "steel", enabled=False) as t:
        t.log_params(CONFIG)
        t.set_tags({"a": 1})
        t.log_metrics({"loss": 1.0}, step=1)
        t.log_artifact(tmp_path / "does-not-matter")
        t.log_dict({"a": 1}, "a.json")
        t.log_text("a", "a.txt")
        t.log_figure(figure, "a.png")
        t.log_dataset([{"image": "a"}], source="x", name="n", digest="d", context="train")
        t.fail("not recorded")
    assert t.run_id is None and t.experiment_id is None and t.ui_url() == ""
    assert not plt.fignum_exists(figure.number)
    assert list(tmp_path.iterdir()) == []


def test_a_run_whose_process_was_killed_is_marked_killed_and_a_live_one_is_left(tmp_path):
    import signal
    import subprocess
    import sys

    from steel_seg.tracking import reap_dead_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = (
        "import sys, time\n"
        "from steel_seg.tracking import RunTracker\n"
        f"t = RunTracker({uri!r}, 'dead').start()\n"
        "print(t.run_id, flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        dead_id = child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)  # no handler runs: the run stays RUNNING
        child.wait()
    client = MlflowClient(uri)
    assert client.get_run(dead_id).info.status == "RUNNING"

    live = RunTracker(uri, "dead").start()
    experiment_id = client.get_run(dead_id).info.experiment_id
    assert reap_dead_runs(uri, experiment_id) == [dead_id]
    dead = client.get_run(dead_id)
    assert dead.info.status == "KILLED" and "died without ending the run" in dead.data.tags["failure_reason"]
    assert client.get_run(live.run_id).info.status == "RUNNING"  # alive: never touched
    with pytest.raises(ValueError, match="live process"):
        RunTracker(uri, "dead").start(resume_run_id=live.run_id)
    live.finish()

    resumed = RunTracker(uri, "dead").start(resume_run_id=dead_id)  # a killed run can be resumed
    assert client.get_run(dead_id).info.status == "RUNNING" and "failure_reason" not in client.get_run(dead_id).data.tags
    resumed.finish()


def test_a_dataset_logged_by_two_runs_at_once_is_linked_to_both(store):
    """Parallel runs record the same new dataset: the store checks, then inserts, and the slower
    run hits the unique key; it links the (now existing) dataset on a second try."""
    from mlflow.exceptions import MlflowException

    record = dict(records=[{"image": "a.jpg"}], source="/data", name="race-train", digest="r4ce", context="training")
    with RunTracker(store, "race") as first:
        first.log_dataset(**record)
    with RunTracker(store, "race") as second:
        real, calls = second._client.log_inputs, []

        def collide(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name")
            return real(*args, **kwargs)

        second._client.log_inputs = collide
        second.log_dataset(**record)
    assert len(calls) == 2
    for run_id in (first.run_id, second.run_id):
        inputs = MlflowClient(store).get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("race-train", "r4ce")]
