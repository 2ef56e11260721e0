"""A user's deploy path end to end: train a tiny run, export it from MLflow with the CLI, score
the export against the run's logged mIoU, predict a folder with a truncated JPEG in it, export
again and see the champion alias move."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from steel_seg import evaluate, export, predict
from steel_seg.config import load_experiment
from steel_seg.data.paddlex_layout import read_label_png
from steel_seg.data.rle import rle_decode
from steel_seg.data.synthetic import generate_dataset
from steel_seg.deploy.spec import read_spec
from steel_seg.experiment import run_experiment
from test_experiment import write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished UNet run at 64x32 on synthetic Severstal-like data (a few steps)."""
    root = tmp_path_factory.mktemp("deploy_cli")
    kaggle = generate_dataset(root / "kaggle", num_images=24, seed=3, width=256, height=64)
    config = write_config(
        root, kaggle, model={"type": "UNet"}, loss={"use_mixed_loss": False}, augment="flip",
        train={"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 4, "learning_rate": 0.05},
        eval={"tta": [], "num_overlays": 0},
    )
    result = run_experiment(load_experiment(config), progress=False)
    return root, config, result


def test_export_evaluate_predict_and_reexport(trained, tmp_path, capsys, monkeypatch):
    root, config, result = trained
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.chdir(root)  # the run's relative paths (work dir, outputs) resolve as they did
    out = tmp_path / "export"
    assert export.main(["--experiment", "tests", "--tracking-uri", uri, "--out", str(out), "--tune-postprocess", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"exported run {result.run_id}" in printed and "(default)" in printed

    spec = read_spec(out)
    assert spec.source["run_id"] == result.run_id and spec.preprocess.size == (64, 32)
    assert spec.postprocess.tuned["after"] >= spec.postprocess.tuned["before"]
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["postprocess_kaggle_dice_after"] == pytest.approx(spec.postprocess.tuned["after"])
    assert f"export_{spec.default_backend}_ms" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(result.run_id, "export/export")}
    assert {"export/export/deploy.yaml", "export/export/model.pdmodel"} <= logged
    assert client.get_model_version_by_alias("steel-seg", "champion").run_id == result.run_id

    # The export is the model that was measured: same mIoU on the same resized validation split.
    scores = tmp_path / "scores.json"
    assert evaluate.main(["--model", str(out), "--split", "val", "--no-progress", "--output", str(scores)]) == 0
    measured = json.loads(scores.read_text())
    assert abs(measured["model_size"]["miou"] - run.data.metrics["final_val_miou"]) <= 1e-3
    assert 0.0 <= measured["original_size"]["miou"] <= 1.0 and measured["original_size"]["num_images"] == measured["model_size"]["num_images"]

    # Predict a folder holding a truncated copy of an image: the rest go through, the bad one is named.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    images = sorted((root / "kaggle" / "train_images").glob("*.jpg"))[:3]
    for image in images:
        (inbox / image.name).write_bytes(image.read_bytes())
    (inbox / "cut.jpg").write_bytes(images[0].read_bytes()[:1500])
    preds = tmp_path / "preds"
    assert predict.main(["--model", str(out), str(inbox), "--out", str(preds), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "cut.jpg" in err and "truncated JPEG" in err
    assert "cut.jpg" in (preds / "skipped.txt").read_text()
    rows = list(csv.reader((preds / "submission.csv").open()))
    assert rows[0] == ["ImageId", "ClassId", "EncodedPixels"] and len(rows) == 1 + 3 * 4
    for image in images:
        mask = read_label_png(preds / "masks" / f"{image.stem}.png")
        assert (preds / "overlays" / f"{image.stem}.jpg").is_file()
        for image_id, class_id, rle in rows[1:]:
            if image_id == image.name:
                assert np.array_equal(rle_decode(rle, mask.shape), mask == int(class_id))

    assert predict.main(["--model", str(out), str(inbox), "--benchmark"]) == 0
    assert "ms/image" in capsys.readouterr().out

    # A second export never overwrites the first; with its own folder it becomes the champion.
    assert export.main(["--run-id", result.run_id, "--tracking-uri", uri, "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert export.main(["--run-id", result.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    versions = client.search_model_versions("name='steel-seg'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert int(client.get_model_version_by_alias("steel-seg", "champion").version) == 2


def test_export_errors_name_what_exists(trained, capsys):
    root, _, _ = trained
    uri = f"sqlite:///{root / 'mlflow.db'}"
    assert export.main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "experiments there: " in capsys.readouterr().err
    assert export.main(["--experiment", "tests", "--metric", "final_val_mIoU", "--tracking-uri", uri]) == 2
    assert "final_val_miou" in capsys.readouterr().err
