"""Re-evaluating a finished run with TTA: nested runs under it, read back with MlflowClient."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from steel_seg.config import load_experiment
from steel_seg.data.synthetic import generate_dataset
from steel_seg.experiment import run_experiment
from steel_seg.tta_analysis import reevaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reeval")
    root = generate_dataset(tmp / "kaggle", num_images=40, seed=2)
    config = {
        "name": "tiny",
        "data": {"root": str(root), "work_dir": str(tmp / "work"), "size": [64, 32], "fallback_to_demo": False},
        "model": {"type": "FastSCNN"},
        "augment": "flip",
        "train": {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 3, "output_dir": str(tmp / "outputs")},
        "eval": {"num_overlays": 0},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "tests"},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_experiment(load_experiment(path), progress=False)
    return tmp, result


def children(client, run):
    return client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")


def test_reevaluation_writes_a_nested_run_with_plain_and_tta_metrics(trained):
    tmp, result = trained
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out_json = tmp / "eval.json"
    done = subprocess.run(
        [sys.executable, "-m", "steel_seg.evaluate", "--run-id", result.run_id, "--tracking-uri", uri,
         "--tta", "hflip,blur", "--split", "val", "--output", str(out_json), "--no-progress"],
        capture_output=True, text=True, cwd=tmp,
    )
    assert done.returncode == 0, done.stderr
    client = MlflowClient(uri)
    parent = client.get_run(result.run_id)
    (nested,) = children(client, parent)
    assert nested.info.status == "FINISHED" and parent.info.status == "FINISHED"
    tags = nested.data.tags
    assert tags["steel_seg.role"] == "tta_evaluation" and tags["tta_views"] == "hflip,blur:3" and tags["tta_merge"] == "mean"
    assert tags["split"] == "val" and tags["evaluated_run"] == result.run_id
    metrics = nested.data.metrics
    # Plain re-evaluation is the training run's own final evaluation, to the bit.
    assert metrics["plain_val_miou"] == parent.data.metrics["final_val_miou"]
    saved = json.loads(out_json.read_text())
    for arm, scores in (("plain", saved["scores"]), ("tta", saved["tta"]["scores"])):
        assert metrics[f"{arm}_val_ms_per_image"] > 0
        defined = [n for n, iou, recall in zip(scores["class_names"], scores["iou"], scores["recall"]) if iou == iou and recall == recall]
        assert len(defined) >= 2  # background and a defect class at least; NaN (class absent) is not logged
        for name in defined:
            assert metrics[f"{arm}_val_iou_{name}"] == pytest.approx(scores["iou"][scores["class_names"].index(name)])
            assert f"{arm}_val_recall_{name}" in metrics
    assert metrics["tta_val_time_ratio"] == pytest.approx(metrics["tta_val_ms_per_image"] / metrics["plain_val_ms_per_image"])
    artifacts = {a.path for a in client.list_artifacts(nested.info.run_id)} | {a.path for a in client.list_artifacts(nested.info.run_id, "plots")}
    assert {"tta_summary.md", "tta_results.json", "plots/tta_per_class.png"} <= artifacts
    assert saved["nested_run_id"] == nested.info.run_id and saved["tta"]["views"] == ["hflip", "blur:3"]
    assert "TTA hflip, blur:3 (mean)" in done.stdout and "val split" in done.stdout


def test_choose_on_val_report_on_test_and_the_sensitivity_analysis(trained):
    tmp, result = trained
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    loaded = reevaluate.load_run(uri, result.run_id, progress=False)
    chosen = reevaluate.choose_tta(loaded, ["hflip", "vflip"], ["mean", "max"], None, "val", "test", progress=False)
    choice = chosen.details["choice"]
    assert set(choice.candidates) == {"none", "hflip (mean)", "hflip (max)", "vflip (mean)", "vflip (max)",
                                      "hflip, vflip (mean)", "hflip, vflip (max)"}
    best = max(choice.candidates.values(), key=lambda s: s["miou"])["miou"]
    assert choice.candidates[choice.chosen]["miou"] == best
    assert choice.plain.split == choice.best.split == "test"
    assert set(choice.reported) == set(choice.candidates) and all(a.split == "test" for a in choice.reported.values())
    assert f"chosen on val ({choice.images_on_choice_split} images)" in chosen.summary and "also scored on test" in chosen.summary

    analysed = reevaluate.sensitivity(loaded, "val", "test", progress=False)
    client = MlflowClient(uri)
    nested = {r.data.tags["steel_seg.role"]: r for r in children(client, client.get_run(result.run_id))}
    assert {"tta_choice", "sensitivity"} <= set(nested)
    run = nested["sensitivity"]
    assert run.info.status == "FINISHED" and run.data.tags["choose_on"] == "val" and run.data.tags["report_on"] == "test"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "sensitivity")}
    assert {f"sensitivity/{f}.png" for f in ("sharpness", "brightness", "contrast", "defect_area")} <= files
    assert {"sensitivity/sensitivity.md", "sensitivity/sensitivity.csv"} <= files
    # Trained with flips, so hflip is always a candidate; every candidate is judged.
    assert any(c.view == "hflip" for c in analysed.details["candidates"])
    recommendation = analysed.details["recommendation"]
    assert recommendation.startswith("Recommendation:") and ("helps on val" in recommendation or "does not help on val" in recommendation)
    assert run.data.tags["recommended"] == analysed.details["choice"].chosen
    logged = client.download_artifacts(run.info.run_id, "recommendation.txt", str(tmp))
    assert Path(logged).read_text().strip() == recommendation


def test_bad_view_or_merge_is_an_error_before_any_run_is_logged(trained):
    tmp, result = trained
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    before = len(children(client, client.get_run(result.run_id)))
    for bad, message in ((["--tta", "hflip,blr"], "Did you mean `blur`?"), (["--tta", "hflip", "--merge", "meen"], "unknown TTA merge `meen`")):
        done = subprocess.run([sys.executable, "-m", "steel_seg.evaluate", "--run-id", result.run_id, "--tracking-uri", uri, *bad],
                              capture_output=True, text=True, cwd=tmp)
        assert done.returncode == 2 and message in done.stderr
    assert len(children(client, client.get_run(result.run_id))) == before
