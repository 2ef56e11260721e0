"""Pipeline results: significance on hand-made values, and compare reading a store the test writes.

The store has the executor's layout (parent run with pipeline.json, stage runs, variant runs per
seed) with made-up metrics, so nothing is trained: two invocations, the latest with 2 stages of
2 variants x 2 seeds, a variant whose seeds both failed, and a run reused from the first one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from steel_seg import compare as compare_cli
from steel_seg.pipeline.compare import (
    check_conclusion,
    load_results,
    render_csv,
    render_markdown,
    render_terminal,
    reproduction_report,
    stage_links,
    stage_runs_links,
    stage_table,
)
from steel_seg.pipeline.stats import stage_verdict, summarize, welch_p

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as the CLI does

# ---------------------------------------------------------------------------------------------
# Statistics on hand-made values


def test_summary_is_mean_sample_std_and_t_interval():
    s = summarize([0.50, 0.52, 0.54])
    assert s.n == 3
    assert s.mean == pytest.approx(0.52)
    assert s.std == pytest.approx(0.02)  # ddof=1
    assert s.ci95 == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)  # t(0.975, 2)
    assert s.format(100) == "52.0 ± 2.0 (n=3)"
    one = summarize([0.4])
    assert (one.mean, one.std, one.n) == (0.4, 0.0, 1)
    assert one.format(100) == "40.0 (n=1)"
    assert summarize([]).n == 0


def test_welch_p_cannot_tell_from_single_runs_or_identical_seeds():
    assert welch_p([0.5], [0.4, 0.41]) is None
    assert welch_p([0.5, 0.5], [0.4, 0.4]) is None  # zero variance on both sides
    assert welch_p([0.50, 0.51, 0.52], [0.40, 0.41, 0.42]) < 0.001


def test_clearly_separated_seeds_resolve_the_stage():
    verdict = stage_verdict({"flip": [0.40, 0.41, 0.42], "flip_distort_crop": [0.50, 0.51, 0.52]})
    assert verdict.winner == "flip_distort_crop"
    assert verdict.resolved
    assert verdict.ties == []
    assert verdict.p_values["flip"] < 0.05
    assert "Welch" in verdict.method and "0.05" in verdict.method


def test_overlapping_seeds_are_not_resolved():
    verdict = stage_verdict({"lovasz": [0.560, 0.570, 0.565], "dice": [0.562, 0.571, 0.566], "ce": [0.40, 0.41, 0.40]})
    assert verdict.winner == "dice"
    assert not verdict.resolved
    assert verdict.ties == ["lovasz"]  # ce is clearly below; lovasz is within noise
    assert verdict.p_values["lovasz"] > 0.05
    assert "within noise" in verdict.reason and "lovasz" in verdict.reason


def test_single_runs_are_never_resolved():
    verdict = stage_verdict({"unet": [0.60], "fastscnn": [0.30]})
    assert verdict.winner == "unet"
    assert not verdict.resolved
    assert verdict.ties == ["fastscnn"]
    assert "single runs cannot be resolved" in verdict.reason


def test_a_variant_without_results_cannot_win_and_blocks_resolution():
    verdict = stage_verdict({"unet": [0.50, 0.51, 0.52], "fastscnn": [0.40, 0.41, 0.42], "hrnet": []})
    assert verdict.winner == "unet"
    assert not verdict.resolved
    assert "no finished run of hrnet" in verdict.reason


# ---------------------------------------------------------------------------------------------
# A store with the executor's layout

CLASSES = ["background", "pits", "lines"]  # labels.txt order, not alphabetical
LOSS_CE = "CrossEntropyLoss*1"
LOSS_LOVASZ = "CrossEntropyLoss*0.8+LovaszSoftmaxLoss*0.2"
LOSS_DICE = "CrossEntropyLoss*0.8+DiceLoss*0.2"
# stage -> variant -> (model, backbone, loss, per-seed mIoU or an error per seed)
LATEST = {
    "baselines": {
        "unet": ("UNet", "none", LOSS_CE, [0.46, 0.47]),
        "fastscnn": ("FastSCNN", "none", LOSS_CE, [0.39, 0.40]),
        "hrnet": ("FCN", "HRNet_W18", LOSS_CE, ["MemoryError: out of memory", "MemoryError: out of memory"]),
    },
    "loss": {
        "lovasz": ("UNet", "none", LOSS_LOVASZ, [0.560, 0.566]),  # seed 0 is reused from the first invocation
        "dice": ("UNet", "none", LOSS_DICE, [0.562, 0.568]),
    },
}
PLAN = {
    "name": "tiny_study",
    "metric": "final_val_miou",
    "seeds": [0, 1],
    "stages": [
        {"name": "baselines", "index": 0, "evaluate_only": False, "from": None, "variants": [
            {"name": "unet", "from": None, "reference_miou": 0.462},
            {"name": "fastscnn", "from": None, "reference_miou": 0.389},
            {"name": "hrnet", "from": None, "reference_miou": 0.438},
        ]},
        {"name": "loss", "index": 1, "evaluate_only": False, "from": "best_of(baselines)", "variants": [
            {"name": "lovasz", "from": "best_of(baselines)", "reference_miou": 0.564},
            {"name": "dice", "from": "best_of(baselines)", "reference_miou": 0.567},
        ]},
    ],
    "conclusions": [
        {"claim": "the mixed loss helps", "better": "best_of(loss)", "worse": "baselines.unet"},
        {"claim": "Dice beats Lovasz", "better": "loss.dice", "worse": "loss.lovasz"},
        {"claim": "FastSCNN beats UNet", "better": "baselines.fastscnn", "worse": "baselines.unet"},
        {"claim": "HRNet beats UNet", "better": "baselines.hrnet", "worse": "baselines.unet"},
    ],
}


def _variant_run(client, exp, stage_run, stage, variant, seed, spec, outcome, start, extra_tags=None) -> str:
    model, backbone, loss, _ = spec
    tags = {
        "steel_seg.role": "variant", "steel_seg.pipeline": PLAN["name"], "stage": stage, "variant": variant,
        "seed": str(seed), "mlflow.parentRunId": stage_run, "model": model, "backbone": backbone, "loss": loss,
        "augment": "flip_distort_crop" if stage == "loss" else "flip", "include_defect_free": "false",
        "demo_data": "true", **(extra_tags or {}),
    }
    run = client.create_run(exp, start_time=start, tags=tags, run_name=f"{stage}/{variant}/seed{seed}")
    rid = run.info.run_id
    params = {"model.type": model, "train.epochs": "10" if stage == "baselines" else "100", "data.size": "[400, 64]",
              "train.batch_size": "16", "train.learning_rate": "0.01", "train.seed": str(seed), "eval.tta": "[]"}
    if backbone != "none":
        params["model.backbone.type"] = backbone
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    if isinstance(outcome, str):
        client.set_tag(rid, "failure_reason", f"Traceback (most recent call last):\n  ...\n{outcome}")
        client.set_terminated(rid, "FAILED")
        return rid
    metrics = {"final_val_miou": outcome, "final_val_kaggle_dice": outcome + 0.4, "final_val_ms_per_image": 12.5}
    for i, name in enumerate(CLASSES):
        metrics[f"final_val_iou_{name}"] = outcome + 0.1 * (1 - i)
    client.log_batch(rid, metrics=[Metric(k, v, start, 0) for k, v in metrics.items()])
    client.set_terminated(rid, "FINISHED")
    return rid


def write_study(uri: str, artifact_root: Path) -> dict:
    """Two invocations of tiny_study into one experiment; returns the ids the tests check."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("tiny_study", artifact_location=artifact_root.as_uri())
    t0 = int(time.time() * 1000) - 3_600_000
    ids: dict = {"experiment_id": exp}

    # First invocation: only the loss stage's lovasz seed 0, which the second invocation reuses.
    first = client.create_run(exp, start_time=t0, run_name="tiny_study",
                              tags={"steel_seg.role": "pipeline", "steel_seg.pipeline": "tiny_study"}).info.run_id
    client.log_dict(first, PLAN, "pipeline.json")
    first_stage = client.create_run(exp, start_time=t0 + 1, tags={"steel_seg.role": "stage", "stage": "loss", "stage_index": "1",
                                                                   "mlflow.parentRunId": first}).info.run_id
    original = _variant_run(client, exp, first_stage, "loss", "lovasz", 0, LATEST["loss"]["lovasz"], 0.560, t0 + 2)
    client.log_text(original, "\n".join(CLASSES) + "\n", "labels.txt")
    # An earlier-only variant of the first invocation that must not leak into the latest one.
    _variant_run(client, exp, first_stage, "loss", "focal", 0, ("UNet", "none", LOSS_CE, None), 0.99, t0 + 3)
    for run_id in (first_stage, first):
        client.set_terminated(run_id, "FINISHED")
    ids["first_parent"], ids["original"] = first, original

    # Second (latest) invocation: everything.
    t1 = t0 + 600_000
    parent = client.create_run(exp, start_time=t1, run_name="tiny_study",
                               tags={"steel_seg.role": "pipeline", "steel_seg.pipeline": "tiny_study"}).info.run_id
    client.log_dict(parent, PLAN, "pipeline.json")
    ids["parent"], ids["runs"] = parent, {}
    for index, (stage, variants) in enumerate(LATEST.items()):
        stage_run = client.create_run(exp, start_time=t1 + 10 * index + 1, run_name=stage, tags={
            "steel_seg.role": "stage", "steel_seg.pipeline": "tiny_study", "stage": stage, "stage_index": str(index),
            "mlflow.parentRunId": parent}).info.run_id
        ids[f"stage_{stage}"] = stage_run
        for variant, spec in variants.items():
            for seed, outcome in enumerate(spec[3]):
                start = t1 + 10 * index + 2 + seed
                if (stage, variant, seed) == ("loss", "lovasz", 0):
                    rid = _variant_run(client, exp, stage_run, stage, variant, seed, spec, outcome, start,
                                       {"steel_seg.reused_from": original})
                else:
                    rid = _variant_run(client, exp, stage_run, stage, variant, seed, spec, outcome, start)
                ids["runs"][(stage, variant, seed)] = rid
        client.set_terminated(stage_run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return ids


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, write_study(uri, root / "mlartifacts")


def test_load_results_reads_the_latest_invocation(study):
    uri, ids = study
    results = load_results(uri, experiment="tiny_study")
    assert results.parent_run_id == ids["parent"]
    assert results.name == "tiny_study" and results.seeds == [0, 1]
    assert [s.name for s in results.stages] == ["baselines", "loss"]
    assert results.stage("loss").run_id == ids["stage_loss"]
    assert [v.name for v in results.stage("loss").variants] == ["lovasz", "dice"]  # no "focal" from the first one
    assert results.class_names == CLASSES  # order from labels.txt of the reused run's original
    assert results.demo_data
    lovasz = results.stage("loss").variant("lovasz")
    assert [r.seed for r in lovasz.runs] == [0, 1]
    assert lovasz.runs[0].reused_from == ids["original"] and lovasz.runs[1].reused_from is None
    assert lovasz.values("final_val_miou") == pytest.approx([0.560, 0.566])
    # The same invocation by id; the first one is still reachable by its id.
    assert load_results(uri, parent_run_id=ids["parent"]).parent_run_id == ids["parent"]
    first = load_results(uri, parent_run_id=ids["first_parent"])
    assert [v.name for v in first.stage("loss").variants] == ["lovasz", "dice", "focal"]


def test_stage_tables_show_mean_std_failures_and_significance(study):
    uri, ids = study
    results = load_results(uri, parent_run_id=ids["parent"])
    rows = {r.variant: r for r in stage_table(results, "baselines")}
    unet = rows["unet"]
    assert (unet.arch, unet.backbone, unet.epochs, unet.resolution) == ("UNet", "", "10", "400x64")
    assert (unet.batch_size, unet.learning_rate, unet.loss, unet.augment, unet.defect_free) == ("16", "0.01", "CE", "flip", "no")
    assert unet.miou.format(100) == "46.5 ± 0.7 (n=2)"
    assert unet.iou["pits"] == pytest.approx(0.465) and unet.iou["background"] == pytest.approx(0.565)
    assert unet.kaggle_dice == pytest.approx(0.865)
    assert unet.winner and unet.resolved and unet.mark == "best"  # p ~ 0.02 against fastscnn
    assert rows["fastscnn"].p_vs_best < 0.05
    hrnet = rows["hrnet"]
    assert hrnet.status == "failed" and hrnet.miou.n == 0
    assert hrnet.error == "seed 0: MemoryError: out of memory"
    assert (hrnet.arch, hrnet.backbone) == ("FCN", "HRNet_W18")

    loss = {r.variant: r for r in stage_table(results, "loss")}
    assert loss["dice"].winner and not loss["dice"].resolved
    assert loss["dice"].mark == "best, *not resolved*"
    assert loss["lovasz"].loss == "CE 0.8 + Lovasz 0.2" and loss["dice"].loss == "CE 0.8 + Dice 0.2"
    assert loss["lovasz"].status == "finished (1 reused)"
    assert "within noise" in loss["lovasz"].mark

    terminal = render_terminal(results)
    assert "46.5 ± 0.7 (n=2)" in terminal and "NOT RESOLVED" in terminal
    assert "failed: seed 0: MemoryError: out of memory" in terminal
    assert "Not compared (no finished run): hrnet" in terminal
    header = next(line for line in terminal.splitlines() if line.startswith("variant"))
    for column in ("arch", "backbone", "epochs", "resolution", "batch", "lr", "loss", "augment", "defect-free",
                   "mIoU %", "IoU pits %", "Kaggle Dice %", "status", "vs best"):
        assert column in header

    markdown = render_markdown(results, "loss")
    assert "| dice | UNet |" in markdown and "best, *not resolved*" in markdown
    table = list(csv.DictReader(io.StringIO(render_csv(results, "baselines"))))
    assert [r["variant"] for r in table] == ["unet", "fastscnn", "hrnet"]
    assert float(table[0]["miou_mean"]) == pytest.approx(0.465) and float(table[0]["miou_std"]) == pytest.approx(0.0070711, rel=1e-4)
    assert table[0]["miou_n"] == "2" and table[0]["winner"] == "true" and table[0]["resolved"] == "true"
    assert table[2]["status"] == "failed" and table[2]["miou_mean"] == ""


def test_compare_links_select_each_stages_finished_runs(study):
    uri, ids = study
    results = load_results(uri, parent_run_id=ids["parent"])
    links = stage_links(results)
    from urllib.parse import unquote

    url = links["baselines"]
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?runs=%5B%22")
    query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
    run_ids = json.loads(unquote(query["runs"]))
    assert run_ids == [ids["runs"][("baselines", v, s)] for v in ("unet", "fastscnn") for s in (0, 1)]  # not hrnet's failed runs
    assert json.loads(unquote(query["experiments"])) == [ids["experiment_id"]]

    runs_url = stage_runs_links(results)["loss"]
    assert runs_url.startswith(f"http://127.0.0.1:5000/#/experiments/{ids['experiment_id']}/runs?workflowType=machine_learning&")
    query = dict(part.split("=", 1) for part in runs_url.split("?", 1)[1].split("&"))
    assert unquote(query["searchFilter"]) == f"tags.`mlflow.parentRunId` = '{ids['stage_loss']}'"
    assert unquote(query["orderByKey"]) == "metrics.`final_val_miou`" and query["orderByAsc"] == "false"


def test_reproduction_report_verdicts(study):
    uri, ids = study
    results = load_results(uri, parent_run_id=ids["parent"])
    verdicts = {c.claim: check_conclusion(results, c) for c in results.conclusions}
    assert verdicts["the mixed loss helps"].verdict == "supports"
    assert verdicts["the mixed loss helps"].better_label == "best_of(loss) = dice (not resolved)"
    assert verdicts["Dice beats Lovasz"].verdict == "cannot resolve"
    assert "within noise" in verdicts["Dice beats Lovasz"].why
    assert verdicts["FastSCNN beats UNet"].verdict == "contradicts"
    assert verdicts["HRNet beats UNet"].verdict == "cannot resolve"
    assert "no finished run of baselines.hrnet" in verdicts["HRNet beats UNet"].why

    report = reproduction_report(results)
    assert "| baselines | unet | 46.20 | 46.5 ± 0.7 (n=2) | +0.3 | finished |" in report
    assert "| baselines | hrnet | 43.80 | — | — | failed |" in report
    assert "| loss | dice | 56.70 | 56.5 ± 0.4 (n=2) | -0.2 | finished |" in report
    assert report.count("| *supports* |") == 1 and report.count("| *contradicts* |") == 1
    assert report.count("| *cannot resolve* |") == 2
    assert "synthetic demo data" in report


def test_compare_cli_prints_and_logs_to_the_parent_run(study, capsys, tmp_path):
    uri, ids = study
    assert compare_cli.main(["--tracking-uri", uri, "--log"]) == 0
    out = capsys.readouterr().out
    assert f"run {ids['parent']}" in out
    assert "Stage 1 of 2: baselines" in out and "Stage 2 of 2: loss, from best_of(baselines)" in out
    assert "46.5 ± 0.7 (n=2)" in out and "56.5 ± 0.4 (n=2)" in out
    assert "compare baselines: http://127.0.0.1:5000/#/compare-runs?runs=" in out
    assert "loss runs, best final_val_miou first: http://127.0.0.1:5000/#/experiments/" in out
    assert f"all runs: http://127.0.0.1:5000/#/experiments/{ids['experiment_id']}/runs?workflowType=machine_learning" in out
    assert "# Reproduction report: tiny_study" in out

    client = MlflowClient(tracking_uri=uri)
    parent = ids["parent"]
    listed = {a.path for folder in ("results", "plots") for a in client.list_artifacts(parent, folder)}
    assert listed == {
        "results/baselines.md", "results/baselines.csv", "results/loss.md", "results/loss.csv",
        "results/all_stages.md", "results/all_stages.csv", "plots/baselines.png", "plots/loss.png",
    }
    assert client.get_run(parent).info.status == "FINISHED"  # logging did not reopen the run
    local = Path(client.download_artifacts(parent, "", str(tmp_path)))
    baselines_md = (local / "results" / "baselines.md").read_text()
    assert "| unet | UNet |  | 10 | 400x64 | 16 | 0.01 | CE | flip | no | 46.5 ± 0.7 (n=2) |" in baselines_md
    assert "failed: seed 0: MemoryError: out of memory" in baselines_md
    all_md = (local / "results" / "all_stages.md").read_text()
    assert "## Stage 2 of 2: loss" in all_md and "Compare in MLflow: <http://127.0.0.1:5000/#/compare-runs" in all_md
    rows = list(csv.DictReader(io.StringIO((local / "results" / "loss.csv").read_text())))
    assert {r["variant"]: r["miou_n"] for r in rows} == {"lovasz": "2", "dice": "2"}
    report = (local / "reproduction_report.md").read_text()
    assert "| the mixed loss helps |" in report and "*supports*" in report
    for stage in ("baselines", "loss"):
        with Image.open(local / "plots" / f"{stage}.png") as image:
            image.load()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_compare_cli_errors_name_what_exists(study, capsys, tmp_path):
    uri, ids = study
    assert compare_cli.main(["--tracking-uri", uri, "--experiment", "no_such_study"]) == 1
    err = capsys.readouterr().err
    assert "no MLflow experiment 'no_such_study'" in err and "tiny_study" in err

    assert compare_cli.main(["--tracking-uri", uri, "--parent", ids["stage_loss"]]) == 1
    err = capsys.readouterr().err
    assert "is a stage run of a pipeline" in err and ids["parent"] in err and ids["first_parent"] in err

    assert compare_cli.main(["--tracking-uri", uri, "--parent", "0" * 32]) == 1
    assert f"Pipeline runs there, newest first: {ids['parent']}" in capsys.readouterr().err

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(tracking_uri=empty).create_experiment("other", artifact_location=(tmp_path / "a").as_uri())
    assert compare_cli.main(["--tracking-uri", empty]) == 1
    err = capsys.readouterr().err
    assert "no pipeline runs" in err and "other" in err


def test_evaluate_only_stage_shows_tta_and_time_per_image():
    from steel_seg.pipeline.compare import PipelineResults, StageResult, VariantResult, VariantRun

    def run(seed, tta, miou, ms):
        metrics = {"final_val_miou": miou, "final_val_kaggle_dice": 0.9, "final_val_ms_per_image": ms}
        return VariantRun(f"r{tta}{seed}", seed, "FINISHED", {"eval.tta": tta, "model.type": "UNet"}, {"model": "UNet"}, metrics)

    variants = [
        VariantResult("plain", runs=[run(0, "[]", 0.50, 10.0), run(1, "[]", 0.52, 12.0)]),
        VariantResult("hflip", runs=[run(0, '["hflip"]', 0.51, 20.0), run(1, '["hflip"]', 0.53, 22.0)]),
    ]
    verdict = stage_verdict({v.name: v.values("final_val_miou") for v in variants})
    stage = StageResult("tta", 0, True, "best_of(loss)", None, variants, verdict)
    results = PipelineResults("sqlite://", "p", "final_val_miou", [0, 1], "parent", "1", "e", [stage], [], [], False)
    text = render_terminal(results)
    header = next(line for line in text.splitlines() if line.startswith("variant"))
    assert "TTA" in header and "ms/image" in header
    rows = {r.variant: r for r in stage_table(results, "tta")}
    assert (rows["plain"].tta, rows["hflip"].tta) == ("none", "hflip")
    assert rows["hflip"].ms_per_image == pytest.approx(21.0)
    assert "evaluation only" in text and "NOT RESOLVED" in text
