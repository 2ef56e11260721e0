"""From "which run is best" to a registered, checked export folder.

Reads the run's own artifacts (resolved config, best checkpoint, class names, sample images),
never local paths the run happened to use, so a run trained elsewhere exports the same way.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steel_seg.deploy.export import ModelSource, export_model
from steel_seg.deploy.images import read_rgb
from steel_seg.deploy.spec import DeploySpec, read_spec

log = logging.getLogger(__name__)

SAMPLES_DIR = "deploy_samples"
"""Run artifact folder with a few original validation images, to check an export without data."""
LABELS_FILE = "labels.txt"


@dataclass
class ExportOutcome:
    folder: Path
    spec: DeploySpec
    run_id: str
    metric: str
    metric_value: float | None
    registered_name: str | None = None
    model_version: str | None = None
    notes: list[str] = field(default_factory=list)


def _run_metric(run, metric: str) -> float | None:
    return run.data.metrics.get(metric)


def _class_names(tracking_uri, run_id: str, tmp: Path, data) -> list[str]:
    from steel_seg.tracking import download_artifact

    try:
        return download_artifact(tracking_uri, run_id, LABELS_FILE, tmp).read_text().split()
    except FileNotFoundError:
        return list(data().class_names)


def _samples(tracking_uri, run_id: str, tmp: Path, data, count: int = 4) -> list[np.ndarray]:
    """Sample images the run logged; else the first validation images of its data."""
    from steel_seg.tracking import download_artifact

    try:
        folder = download_artifact(tracking_uri, run_id, SAMPLES_DIR, tmp)
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if files:
            return [read_rgb(p) for p in files[:count]]
    except FileNotFoundError:
        pass
    prepared = data()
    return [read_rgb(s.image) for s in (prepared.val or prepared.train)[:count]]


def export_run(
    *,
    tracking_uri: str | None,
    experiment: str | None,
    metric: str = "final_val_miou",
    run_id: str | None = None,
    out: Path | None = None,
    onnx: bool = False,
    tune_postprocess: bool = False,
    force: bool = False,
    register: str | None = "steel-seg",
    data_root: str | None = None,
    progress: bool = True,
    tta: dict | None = None,
) -> ExportOutcome:
    """Export the best FINISHED run of `experiment` (or `run_id`), log it back and register it.

    `tta` ({views, merge, weights}) replaces the run's eval.tta in deploy.yaml, e.g. the views
    `python -m steel_seg.evaluate --choose-on val` chose.
    """
    from steel_seg import tracking
    from steel_seg.config import load_experiment
    from steel_seg.data.prepare import prepare_data, resolve_source

    run = tracking.finished_run(tracking_uri, experiment, metric, run_id)
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config_path = tracking.download_artifact(tracking_uri, run_id, "config.yaml", tmp)
        weights = tracking.download_artifact(tracking_uri, run_id, "checkpoints/best.pdparams", tmp)
        overrides = [f"data.root={data_root}"] if data_root else []
        config = load_experiment(config_path, overrides)
        prepared = []

        def data():  # prepared only if something needs it (class names, samples, tuning)
            if not prepared:
                prepared.append(prepare_data(config.data, progress=progress, source=resolve_source(config.data)))
            return prepared[0]

        if tta is not None:
            from steel_seg.deploy.tta import resolve

            plan = resolve(tta.get("views"), tta.get("merge") or "mean", tta.get("weights"))  # checked before any work
            config = config.model_copy(update={"eval": config.eval.model_copy(update={
                "tta": plan.extra_views, "tta_merge": plan.merge, "tta_weights": list(plan.weights) if plan.weights else None})})
        name = str(config.name or run.info.run_name)
        folder = Path(out) if out else Path("export") / name
        source = ModelSource(
            model_type=config.model.type,
            backbone=config.model.backbone,
            kwargs=config.model.kwargs(),
            class_names=_class_names(tracking_uri, run_id, tmp, data),
            input_size=tuple(config.data.size),
            weights=weights,
            tta_views=list(config.eval.tta),
            tta_merge=config.eval.tta_merge,
            tta_weights=config.eval.tta_weights,
            config_yaml=config_path.read_text(),
            provenance={
                "run_id": run_id,
                "run_name": run.info.run_name,
                "experiment_id": run.info.experiment_id,
                "tracking_uri": tracking.resolve_tracking_uri(tracking_uri),
                "selected_by": metric,
                "metrics": {k: round(v, 6) for k, v in sorted(run.data.metrics.items()) if k.startswith("final_")},
            },
        )
        spec = export_model(source, folder, _samples(tracking_uri, run_id, tmp, data), onnx=onnx, force=force)
    outcome = ExportOutcome(folder, spec, run_id, metric, _run_metric(run, metric))
    if tune_postprocess:
        outcome.spec = tune_folder(folder, data(), progress=progress)
    _log_back(tracking_uri, outcome, register)
    return outcome


def tune_folder(folder: Path, data, split: str = "val", progress: bool = True) -> DeploySpec:
    """Search thresholds and minimum areas on `split` (original resolution); write them to deploy.yaml."""
    from tqdm import tqdm

    from steel_seg.deploy.predictor import Predictor
    from steel_seg.deploy.tune import PostprocessTuner

    predictor = Predictor(folder, tta=[], postprocess=False)
    tuner = PostprocessTuner(predictor.spec.num_classes)
    for sample in tqdm(data.split(split), desc=f"tuning post-processing on {split}", disable=not progress):
        (_, probs), = predictor.predict_arrays([read_rgb(sample.image)], return_probs=True)
        tuner.update(probs, data.read_label(sample))
    result = tuner.result()
    spec = read_spec(folder)
    spec.postprocess.thresholds = [float(t) for t in result.thresholds]
    spec.postprocess.min_areas = [int(a) for a in result.min_areas]
    spec.postprocess.tuned = {
        "split": split, "images": result.images, "metric": "kaggle_dice",
        "before": round(result.dice_before, 6), "after": round(result.dice_after, 6),
    }
    spec.write(folder)
    return spec


def _log_back(tracking_uri, outcome: ExportOutcome, register: str | None) -> None:
    from steel_seg import tracking

    spec = outcome.spec
    metrics = {f"export_{b}_ms": c.ms_per_image for b, c in spec.backends.items() if c.ms_per_image is not None}
    metrics.update({f"export_{b}_max_rel_diff": c.max_rel_diff for b, c in spec.backends.items()})
    tuned = spec.postprocess.tuned
    if tuned:
        metrics["postprocess_kaggle_dice_before"] = tuned["before"]
        metrics["postprocess_kaggle_dice_after"] = tuned["after"]
    tracking.log_export(tracking_uri, outcome.run_id, outcome.folder, metrics)
    if register:
        outcome.registered_name = register
        example = sorted((outcome.folder / "examples").glob("*"))[:1] if (outcome.folder / "examples").is_dir() else []
        outcome.model_version = tracking.register_export(
            tracking_uri, outcome.run_id, outcome.folder, model_name=register,
            example_image=example[0].read_bytes() if example else None,
            tags={"backend": spec.default_backend, outcome.metric: json.dumps(outcome.metric_value)},
        )
