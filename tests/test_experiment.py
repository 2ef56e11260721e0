"""End to end: a tiny real run, read back from MLflow the way a user would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
import yaml
from mlflow.tracking import MlflowClient

from steel_seg.config import load_experiment
from steel_seg.data.errors import DataError
from steel_seg.data.prepare import prepare_data
from steel_seg.data.synthetic import generate_dataset
from steel_seg.experiment import AlreadyComplete, RecordingEvents, run_experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kaggle_root(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data") / "kaggle", num_images=24, seed=1)


def write_config(tmp_path: Path, kaggle_root: Path, **sections) -> Path:
    config = {
        "name": "tiny",
        "data": {"root": str(kaggle_root), "work_dir": str(tmp_path / "work"), "size": [64, 32], "fallback_to_demo": False},
        "model": {"type": "FastSCNN"},
        "loss": {"use_mixed_loss": [["CrossEntropyLoss", 0.8], ["DiceLoss", 0.2]]},
        "augment": "flip_distort_crop",
        "train": {"epochs": 2, "batch_size": 2, "max_steps_per_epoch": 3, "output_dir": str(tmp_path / "outputs")},
        "eval": {"tta": ["hflip"], "num_overlays": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_run_records_everything_in_mlflow(tmp_path, kaggle_root):
    result = run_experiment(load_experiment(write_config(tmp_path, kaggle_root)), progress=False)
    client, run = only_run(tmp_path)
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"

    params = run.data.params
    assert params["train.epochs"] == "2" and params["model.type"] == "FastSCNN" and params["data.size"] == "[64, 32]"
    tags = run.data.tags
    assert tags["model"] == "FastSCNN" and tags["loss"] == "CrossEntropyLoss*0.8+DiceLoss*0.2"
    assert tags["augment"] == "flip_distort_crop" and tags["include_defect_free"] == "false"
    assert len(tags["config_hash"]) == 12 and tags["data_fingerprint"] and "git_commit" in tags

    history = client.get_metric_history(run.info.run_id, "val_miou")
    assert [m.step for m in history] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "loss_DiceLoss")) == 2
    assert "val_iou_defect_3" in run.data.metrics
    metrics = run.data.metrics
    for key in ("final_val_miou", "final_val_tta_miou", "final_val_kaggle_dice", "final_val_iou_defect_3", "tta_time_ratio"):
        assert key in metrics, key
    assert metrics["final_val_miou"] == pytest.approx(result.scores["miou"])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "checkpoints", "plots", "labels.txt", "deploy_samples"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/training_curves.png", "plots/confusion_matrix.png", "plots/overlays.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/best.pdparams"}
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path)))
    stored = json.loads(local.read_text())
    assert stored["scores"]["miou"] == pytest.approx(result.scores["miou"]) and len(stored["history"]) == 2
    config_back = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert config_back["loss"]["use_mixed_loss"] == [["CrossEntropyLoss", 0.8], ["DiceLoss", 0.2]]

    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs}
    assert inputs == {"kaggle-training": {"mlflow.data.context": "training"}, "kaggle-validation": {"mlflow.data.context": "validation"}}
    assert (result.output_dir / "last.pdckpt").is_file() and (result.output_dir / "best.pdparams").is_file()


def test_data_error_stops_before_any_run_exists(tmp_path, kaggle_root):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(kaggle_root), str(broken)], check=True)
    bad = sorted((broken / "train_images").iterdir())[3]
    bad.write_bytes(b"garbage")
    with pytest.raises(Exception, match=bad.name):
        run_experiment(load_experiment(write_config(tmp_path, broken)), progress=False)
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()]
    )


def test_an_empty_validation_split_is_an_error_before_any_run(tmp_path, kaggle_root):
    seg = prepare_data(load_experiment(write_config(tmp_path, kaggle_root)).data, progress=False).seg.root
    empty = tmp_path / "seg_no_val"
    shutil.copytree(seg, empty)
    (empty / "val_list.txt").write_text("")
    config = load_experiment(write_config(tmp_path, empty))
    with pytest.raises(DataError) as info:
        run_experiment(config, progress=False)
    message = str(info.value)
    assert f"{empty / 'val_list.txt'} lists no sample: the val split is empty" in message
    assert "validation after each epoch" in message and "add `image label` lines" in message
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()]
    )
    # The command line says it the same way, without a traceback.
    out = subprocess.run([sys.executable, "-m", "steel_seg.run", str(tmp_path / "tiny.yaml"), "--no-progress"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "the val split is empty" in out.stderr and "Traceback" not in out.stderr


def test_nan_loss_stops_with_a_clear_message(tmp_path, kaggle_root, monkeypatch):
    import steel_seg.losses as losses

    real = losses.build_loss

    def poisoned(terms, **kw):
        loss = real(terms, **kw)
        forward = loss.forward
        loss.forward = lambda logits, label: forward(logits, label) * float("nan")
        return loss

    monkeypatch.setattr(losses, "build_loss", poisoned)
    from steel_seg.trainer import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="loss became nan at epoch 1, step 1"):
        run_experiment(load_experiment(write_config(tmp_path, kaggle_root)), progress=False)
    _, run = only_run(tmp_path)
    assert run.info.status == "FAILED" and "NonFiniteLoss" in run.data.tags["failure_reason"]
    assert not list((tmp_path / "outputs").glob("*/*/last.pdckpt"))  # nothing from a diverged step


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in paddle.load(str(path))["model"].items()}


def test_resume_continues_the_same_run_to_the_same_weights(tmp_path, kaggle_root, monkeypatch):
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    straight = run_experiment(load_experiment(write_config(straight_dir, kaggle_root)), progress=False)

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    config = load_experiment(write_config(interrupted, kaggle_root))
    real = RecordingEvents.on_epoch_end

    def stop_after_first(self, record):
        real(self, record)
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RecordingEvents, "on_epoch_end", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, progress=False)
    client, run = only_run(interrupted)
    assert run.info.status == "KILLED"

    monkeypatch.setattr(RecordingEvents, "on_epoch_end", real)
    resumed = run_experiment(config, resume=True, progress=False)
    client, run = only_run(interrupted)  # still one run, continued
    assert resumed.run_id == run.info.run_id and run.info.status == "FINISHED"
    assert "failure_reason" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]

    a, b = _weights(straight.output_dir / "last.pdckpt"), _weights(resumed.output_dir / "last.pdckpt")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert resumed.scores["miou"] == pytest.approx(straight.scores["miou"])

    # Resuming it again has nothing to do: it says so instead of re-evaluating.
    with pytest.raises(AlreadyComplete, match=f"complete: all 2 epochs trained and MLflow run {run.info.run_id} FINISHED"):
        run_experiment(config, resume=True, progress=False)
    client, again = only_run(interrupted)
    assert again.info.end_time == run.info.end_time


def test_cli_reports_config_errors_before_any_work(tmp_path, kaggle_root):
    path = write_config(tmp_path, kaggle_root)
    out = subprocess.run(
        [sys.executable, "-m", "steel_seg.run", str(path), "--set", "train.batchsize=4"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "train.batchsize (--set train.batchsize=4): unknown key `batchsize`; did you mean `batch_size`?" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "work").exists()

    out = subprocess.run([sys.executable, "-m", "steel_seg.run", str(path), "--set", "model.type=Unet"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Did you mean UNet" in out.stderr

    out = subprocess.run([sys.executable, "-m", "steel_seg.run", str(path), "--print-config"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0
    assert yaml.safe_load(out.stdout)["train"]["batch_size"] == 2


def test_evaluate_command_scores_a_run(tmp_path, kaggle_root):
    result = run_experiment(load_experiment(write_config(tmp_path, kaggle_root)), progress=False)
    out_json = tmp_path / "eval.json"
    out = subprocess.run(
        [sys.executable, "-m", "steel_seg.evaluate", "--run-id", result.run_id, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--split", "val", "--tta", "hflip", "--output", str(out_json), "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    scores = json.loads(out_json.read_text())
    assert scores["scores"]["miou"] == pytest.approx(result.scores["miou"])
    assert scores["tta"]["scores"]["miou"] == pytest.approx(result.tta_scores["miou"])
    assert "mIoU" in out.stdout


def test_sigterm_marks_the_run_killed_and_keeps_the_checkpoint(tmp_path, kaggle_root):
    import signal
    import time

    path = write_config(tmp_path, kaggle_root, train={"epochs": 500, "max_steps_per_epoch": 1})
    process = subprocess.Popen(
        [sys.executable, "-m", "steel_seg.run", str(path), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    deadline = time.monotonic() + 180
    while not list((tmp_path / "outputs").glob("tiny/*/last.pdckpt")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)  # what a job scheduler sends
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "continue it with --resume" in err
    _, run = only_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "KeyboardInterrupt: signal SIGTERM"
    checkpoint = next((tmp_path / "outputs").glob("tiny/*/last.pdckpt"))
    assert paddle.load(str(checkpoint))["progress"]["epoch"] >= 1  # intact, loadable
