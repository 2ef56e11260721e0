"""Running a staged pipeline for real: tiny models on generated data, read back from MLflow.

Covers the MLflow tree (parent, stage, variant runs and their tags), reuse on rerun, invalidation
of exactly the stages downstream of a change, a failing variant among parallel workers on one
sqlite store, resuming a crashed variant, and the tables compare reads from the store.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pipeline_support import write_tiny_experiment

from steel_seg.data.synthetic import generate_dataset
from steel_seg.experiment import RecordingEvents
from steel_seg.pipeline.compare import load_results, render_terminal
from steel_seg.pipeline.executor import preview_reuse, run_pipeline
from steel_seg.pipeline.plan import dry_run_text, load_pipeline
from steel_seg.run import main as run_main

pytestmark = pytest.mark.slow

DICE = '"loss.use_mixed_loss=[[CrossEntropyLoss, 0.8], [DiceLoss, 0.2]]"'

STUDY = f"""\
name: tiny_study
repeats: 2
stages:
  - name: base
    variants:
      slow_lr: {{config: tiny.yaml, set: [train.learning_rate=0.001]}}
      fast_lr: {{config: tiny.yaml, set: [train.learning_rate=0.02]}}
  - name: loss
    from: best_of(base)
    variants:
      ce: {{set: [train.max_steps_per_epoch=2]}}
      ce_dice: {{set: [train.max_steps_per_epoch=2, {DICE}]}}
  - name: tta
    from: best_of(loss)
    evaluate_only: true
    variants:
      plain: {{set: ["eval.tta=[]"]}}
      flip: {{set: ["eval.tta=[hflip]"]}}
conclusions:
  - {{claim: Dice helps, better: loss.ce_dice, worse: loss.ce}}
"""


@pytest.fixture(scope="module")
def kaggle_root(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data") / "kaggle", num_images=24, seed=1)


def write_study(tmp_path: Path, kaggle_root: Path, text: str = STUDY) -> Path:
    write_tiny_experiment(tmp_path, kaggle_root, f"sqlite:///{tmp_path / 'mlflow.db'}", "study")
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def client_for(tmp_path: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_experiment_by_name("study").experiment_id


def children(client: MlflowClient, experiment_id: str, parent: str) -> list:
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)


def statuses(outcome) -> dict[str, set[str]]:
    """stage -> the set of what happened to its variant runs (trained, reused, ...)."""
    return {s.name: {o.status for o in s.outcomes} for s in outcome.stages}


def trained_runs(client: MlflowClient, experiment_id: str) -> list:
    """Variant runs that did the work (copies made for reuse left out)."""
    runs = client.search_runs([experiment_id], "tags.`steel_seg.role` = 'variant'", max_results=1000)
    return [r for r in runs if "steel_seg.reused_from" not in r.data.tags]


def test_study_tree_reuse_and_downstream_invalidation(tmp_path, kaggle_root, capsys):
    path = write_study(tmp_path, kaggle_root)
    assert run_main([str(path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    client, experiment_id = client_for(tmp_path)

    # The tree: one parent, a run per stage, a run per variant and seed, all tagged.
    parents = client.search_runs([experiment_id], "tags.`steel_seg.role` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    stages = {r.data.tags["stage"]: r for r in children(client, experiment_id, parent.info.run_id)}
    assert set(stages) == {"base", "loss", "tta"}
    for name, stage in stages.items():
        assert stage.data.tags["steel_seg.role"] == "stage" and stage.info.status == "FINISHED"
        runs = children(client, experiment_id, stage.info.run_id)
        assert sorted((r.data.tags["variant"], r.data.tags["seed"]) for r in runs) == sorted(
            (v, s) for v in {"base": ["slow_lr", "fast_lr"], "loss": ["ce", "ce_dice"], "tta": ["plain", "flip"]}[name]
            for s in ("0", "1")
        )
        for run in runs:
            assert run.info.status == "FINISHED" and "final_val_miou" in run.data.metrics
            assert run.data.tags["stage"] == name and run.data.params["train.seed"] == run.data.tags["seed"]
        assert stage.data.tags["winner"] in {r.data.tags["variant"] for r in runs}
        assert "compare-runs" in stage.data.tags["compare_url"]
    # Distinguishing settings are params; the loss stage built on the base winner's settings.
    base_winner = stages["base"].data.tags["winner"]
    lr = {"slow_lr": "0.001", "fast_lr": "0.02"}[base_winner]
    for run in children(client, experiment_id, stages["loss"].info.run_id):
        assert run.data.params["train.learning_rate"] == lr
    tta_runs = children(client, experiment_id, stages["tta"].info.run_id)
    assert {r.data.tags["variant"] for r in tta_runs} == {"plain", "flip"}
    assert {r.data.params["eval.tta"] for r in tta_runs} == {"[]", '["hflip"]'}
    assert all(r.data.tags["evaluate_only"] == "true" for r in tta_runs)
    # The tables and report went to the terminal and onto the parent run.
    assert "stage base" in printed and "slow_lr" in printed and "Dice helps" in printed
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pipeline.json", "results", "plots", "reproduction_report.md"} <= artifacts
    table = load_results(f"sqlite:///{tmp_path / 'mlflow.db'}", parent.info.run_id)
    assert [len(v.values("final_val_miou")) for s in table.stages for v in s.variants] == [2] * 6
    assert "±" in render_terminal(table)
    trained = len(trained_runs(client, experiment_id))
    assert trained == 12

    # Rerun: everything reused, nothing trained; the dry run says so beforehand.
    pipeline = load_pipeline(path)
    assert "12 reused from earlier runs, 0 to run" in dry_run_text(pipeline, preview_reuse(pipeline))
    again = run_pipeline(pipeline, progress=False)
    assert statuses(again) == {"base": {"reused"}, "loss": {"reused"}, "tta": {"reused"}}
    assert len(trained_runs(client, experiment_id)) == trained
    assert [s.winner for s in again.stages] == [stages[n].data.tags["winner"] for n in ("base", "loss", "tta")]

    # A change to the loss stage retrains it and re-evaluates the stage built on it; base is kept.
    path.write_text(STUDY.replace("train.max_steps_per_epoch=2", "train.max_steps_per_epoch=3"))
    changed = run_pipeline(load_pipeline(path), progress=False)
    assert statuses(changed) == {"base": {"reused"}, "loss": {"trained"}, "tta": {"evaluated"}}
    assert len(trained_runs(client, experiment_id)) == trained + 8

    # --force retrains even what is unchanged.
    forced = preview_reuse(load_pipeline(path), force=True)
    assert forced == {}


def test_parallel_workers_share_one_sqlite_store_and_a_failure_stays_local(tmp_path, kaggle_root):
    text = """\
name: workers
repeats: 2
stages:
  - name: base
    variants:
      a: {config: tiny.yaml}
      b: {config: tiny.yaml, set: [train.learning_rate=0.02]}
      corrupt_weights: {config: tiny.yaml, set: [model.pretrained=CORRUPT]}
      broken_data: {config: tiny.yaml, set: [data.root=BROKEN]}
  - name: next
    variants:
      after_a: {from: base.a, set: [train.max_steps_per_epoch=1]}
      after_corrupt: {from: base.corrupt_weights}
"""
    # Two real failures: pretrained weights that are not a state dict fail inside the run (which
    # ends FAILED with the reason); a malformed CSV row fails at data preparation, before any run.
    corrupt = tmp_path / "corrupt.pdparams"
    corrupt.write_bytes(b"not a pickle" * 10)
    broken = tmp_path / "broken"
    shutil.copytree(kaggle_root, broken)
    rows = (broken / "train.csv").read_text().splitlines()
    image, class_id, _ = rows[1].split(",")
    rows[1] = f"{image},{class_id},5 10 20"
    (broken / "train.csv").write_text("\n".join(rows) + "\n")
    text = text.replace("BROKEN", str(broken)).replace("CORRUPT", str(corrupt))
    path = write_study(tmp_path, kaggle_root, text)
    outcome = run_pipeline(load_pipeline(path), workers=2, progress=False)

    by_key = {(o.stage, o.variant, o.seed): o for s in outcome.stages for o in s.outcomes}
    for seed in (0, 1):
        assert by_key[("base", "a", seed)].status == "trained"
        assert by_key[("base", "b", seed)].status == "trained"
        corrupt_run = by_key[("base", "corrupt_weights", seed)]
        assert corrupt_run.status == "failed" and "corrupt.pdparams" in corrupt_run.error
        bad_data = by_key[("base", "broken_data", seed)]
        assert bad_data.status == "failed" and "train.csv:2 " in bad_data.error and str(broken) in bad_data.error
        assert by_key[("next", "after_a", seed)].status == "trained"
        skipped = by_key[("next", "after_corrupt", seed)]
        assert skipped.status == "skipped" and "base.corrupt_weights" in skipped.error
    assert outcome.stages[0].winner in {"a", "b"}

    # Nothing lost: every run the workers wrote is in the store, complete.
    client, experiment_id = client_for(tmp_path)
    variants = client.search_runs([experiment_id], "tags.`steel_seg.role` = 'variant'", max_results=100)
    finished = [r for r in variants if r.info.status == "FINISHED"]
    failed = [r for r in variants if r.info.status == "FAILED"]
    assert len(variants) == 8 and len(finished) == 6 and len(failed) == 2  # broken data: no run at all
    assert all(r.data.tags["variant"] == "corrupt_weights" and "corrupt.pdparams" in r.data.tags["failure_reason"] for r in failed)
    n_params = {len(r.data.params) for r in finished}
    assert len(n_params) == 1
    for run in finished:
        assert {"final_val_miou", "train_loss"} <= set(run.data.metrics)
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pdparams"]
    assert len({r.data.tags["steel_seg.pid"] for r in finished if r.data.tags["stage"] == "base"}) == 2  # two processes


def test_a_crashed_variant_is_resumed_from_its_checkpoint_on_rerun(tmp_path, kaggle_root, monkeypatch):
    text = """\
name: crash
stages:
  - name: only
    variants:
      v: {config: tiny.yaml, set: [train.epochs=2]}
"""
    path = write_study(tmp_path, kaggle_root, text)
    real = RecordingEvents.on_epoch_end

    def crash_after_first(self, record):
        real(self, record)
        if record["epoch"] == 1:
            raise RuntimeError("simulated crash after epoch 1")

    monkeypatch.setattr(RecordingEvents, "on_epoch_end", crash_after_first)
    first = run_pipeline(load_pipeline(path), progress=False)
    [crashed] = first.stages[0].outcomes
    assert crashed.status == "failed" and "simulated crash" in crashed.error
    client, experiment_id = client_for(tmp_path)
    [run] = client.search_runs([experiment_id], "tags.`steel_seg.role` = 'variant'")
    assert run.info.status == "FAILED" and "simulated crash" in run.data.tags["failure_reason"]

    monkeypatch.setattr(RecordingEvents, "on_epoch_end", real)
    second = run_pipeline(load_pipeline(path), progress=False)
    [resumed] = second.stages[0].outcomes
    assert resumed.status == "resumed" and resumed.run_id == run.info.run_id
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert run.data.tags["mlflow.parentRunId"] == second.stages[0].run_id  # moved to the invocation that finished it
