"""One experiment end to end: check the config, prepare data, train, evaluate, record.

This is the glue between the typed config and the parts that know nothing of it: the data
layer, the model registry, the losses, the trainer and the tracker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from steel_seg.config import ExperimentConfig, dump_config, validate_experiment
from steel_seg.config.loader import RawConfig, apply_overrides, deep_merge
from steel_seg.data.loader import BatchLoader
from steel_seg.data.prepare import PreparedData, prepare_data, require_splits, resolve_source
from steel_seg.metrics import format_scores
from steel_seg.transforms import eval_pipeline, train_pipeline

log = logging.getLogger(__name__)


class ExperimentError(ValueError):
    """A config that validated but cannot run (unknown model, loss or view)."""


class AlreadyComplete(ExperimentError):
    """`--resume` of a run that finished every epoch: there is nothing to continue."""


@dataclass
class ExperimentResult:
    name: str
    run_id: str | None
    output_dir: Path
    scores: dict
    tta_scores: dict | None
    best_epoch: int
    summary: str


def check_runnable(config: ExperimentConfig) -> None:
    """Everything that can be checked without data: model, loss, augmentation, TTA views."""
    from steel_seg.losses import build_loss
    from steel_seg.models import check_model_spec
    from steel_seg.tta import plan_from_eval

    problems = []
    for what, check in (
        ("model", lambda: check_model_spec(config.model.type, config.model.backbone, config.model.kwargs())),
        ("loss.use_mixed_loss", lambda: build_loss(config.loss.terms())),
        ("augment", lambda: train_pipeline(config.augment, config.data.size)),
        ("eval.tta", lambda: plan_from_eval(config.eval)),
    ):
        try:
            check()
        except (ValueError, TypeError) as exc:
            problems.append(f"  - {what}: {exc}")
    if problems:
        raise ExperimentError(f"config {config.name} cannot run:\n" + "\n".join(problems))


def with_demo_profile(config: ExperimentConfig, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The config with `demo_profile` merged in (used only on demo data).

    Command-line overrides are applied again on top: `--set train.epochs=1` beats the profile.
    """
    if not config.demo_profile:
        return config
    raw = RawConfig(deep_merge(config.model_dump(mode="json"), config.demo_profile), {})
    return validate_experiment(apply_overrides(raw, list(overrides)), source=f"{config.name} demo_profile")


def select_device(preference: str) -> str:
    import paddle

    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if preference == "gpu" and not has_gpu:
        raise ExperimentError("train.device is gpu but Paddle has no CUDA device here; use auto or cpu")
    device = "gpu" if preference in ("gpu", "auto") and has_gpu else "cpu"
    paddle.set_device(device)
    return device


def config_hash(config: ExperimentConfig) -> str:
    return hashlib.sha1(dump_config(config).encode()).hexdigest()[:12]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def loss_label(config: ExperimentConfig) -> str:
    return "+".join(f"{name}*{weight:g}" for name, weight in config.loss.terms())


def augment_label(config: ExperimentConfig) -> str:
    return config.augment if isinstance(config.augment, str) else "custom"


def run_dir(config: ExperimentConfig, resume: bool | str | None) -> Path:
    """A new timestamped folder (results are never overwritten), or the one to resume."""
    base = Path(config.train.output_dir) / str(config.name)
    if isinstance(resume, str):
        path = Path(resume)
        return path.parent if path.is_file() else path
    if resume:
        candidates = sorted(p.parent for p in base.glob("*/last.pdckpt"))
        if not candidates:
            raise ExperimentError(f"--resume: no checkpoint under {base}/*/last.pdckpt")
        return candidates[-1]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base / stamp, 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{n}"
    return path


class RecordingEvents:
    """Forwards training events to the tracker as metrics with the epoch as step."""

    def __init__(self, tracker, class_names: list[str]):
        self.tracker, self.class_names = tracker, class_names

    def on_train_start(self, info: dict) -> None:
        self.tracker.log_params({"steps_per_epoch": info["steps_per_epoch"]})

    def on_evaluation(self, epoch: int, result) -> None:
        pass  # logged with the epoch record

    def on_epoch_end(self, record: dict) -> None:
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("epoch", "step")}
        for name, iou in zip(self.class_names, record.get("val_iou", [])):
            metrics[f"val_iou_{name}"] = iou
        self.tracker.log_metrics(metrics, step=record["epoch"])


def _dataset_records(data: PreparedData, samples) -> list[dict]:
    root = data.seg.root
    return [{"image": str(s.image.relative_to(root)), "label": str(s.label.relative_to(root))} for s in samples]


def _digest(samples) -> str:
    return hashlib.sha1("\n".join(sorted(str(s.image) for s in samples)).encode()).hexdigest()[:12]


def _final_metrics(prefix: str, scores: dict, class_names: list[str], ms_per_image: float) -> dict:
    metrics = {
        f"{prefix}miou": scores["miou"],
        f"{prefix}pixel_accuracy": scores["pixel_accuracy"],
        f"{prefix}kappa": scores["kappa"],
        f"{prefix}kaggle_dice": scores["kaggle_dice"],
        f"{prefix}ms_per_image": ms_per_image,
    }
    for i, name in enumerate(class_names):
        for key in ("iou", "precision", "recall", "f1"):
            metrics[f"{prefix}{key}_{name}"] = scores[key][i]
        if i:
            metrics[f"{prefix}detection_recall_{name}"] = scores["detection_recall"][i - 1]
            metrics[f"{prefix}detection_precision_{name}"] = scores["detection_precision"][i - 1]
    return metrics


def run_experiment(
    config: ExperimentConfig,
    *,
    resume: bool | str | None = None,
    progress: bool = True,
    parent_run_id: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    tags: dict[str, str] | None = None,
) -> ExperimentResult:
    """Train and evaluate one experiment, recorded as one MLflow run.

    `overrides` are the command line's `--set` values, which also win over `demo_profile`.
    `tags` are added to the run's tags (the pipeline's stage, variant and seed).
    """
    from steel_seg import distributed
    from steel_seg.checkpoint import load_training_state, load_weights
    from steel_seg.tracking import RunTracker

    world = distributed.init_world()  # one process unless started by paddle.distributed.launch
    check_runnable(config)
    # Rank 0 first: it may generate the demo data, which the other ranks then find.
    source, is_demo = distributed.in_turn(world, lambda: resolve_source(config.data, progress and world.is_main))
    if is_demo and config.demo_profile:
        config = with_demo_profile(config, overrides)
        if world.is_main:
            log.warning("demo data: applying demo_profile %s", json.dumps(config.demo_profile))
        check_runnable(config)
    check_parallel(config, world)
    device = select_device(config.train.device)
    if config.train.amp and device != "gpu" and world.is_main:
        log.warning("train.amp is on but the device is %s: training in float32", device)

    def output_folder():
        out_dir, resume_run_id = run_dir(config, resume), None
        if resume:
            done = load_training_state(out_dir / "last.pdckpt")["progress"]
            resume_run_id = done.get("extra", {}).get("run_id")
            _refuse_complete(config, out_dir, done, resume_run_id)
        return out_dir, resume_run_id

    out_dir, resume_run_id = distributed.main_decides(world, output_folder)  # one folder, one run
    # Data first: an unusable data set is an error before any MLflow run exists.
    data = distributed.in_turn(world, lambda: prepare_data(config.data, progress=progress and world.is_main, source=(source, is_demo)))
    require_splits(data, _needed_splits(config))
    if len(data.train) < world.size:
        raise ExperimentError(f"the training split has {len(data.train)} image(s), fewer than the {world.size} processes")
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    tracking = config.tracking
    tracker = RunTracker(  # rank 0 alone talks to MLflow: one run, not one per process
        tracking.uri, tracking.experiment, tracking.run_name or config.name, {**tracking.tags, **(tags or {})},
        enabled=tracking.enabled and world.is_main,
    )
    tracker.start(resume_run_id=resume_run_id, parent_run_id=parent_run_id)
    distributed.guard_run(tracker.uri, tracker.run_id, world)  # FAILED even if rank 0 is killed
    with tracker:  # any exception below marks the run FAILED (KILLED on Ctrl-C)
        if world.is_main:
            _record_config(tracker, config, out_dir, is_demo, device)
            tracker.set_tags({"world_size": world.size})
        _record_data(tracker, data)
        trainer = _build_trainer(config, data, out_dir, tracker, progress, resume=bool(resume), world=world, device=device)
        state = trainer.fit(resume=bool(resume))
        if not world.is_main:  # rank 0 evaluates the best model and records the results
            return ExperimentResult(str(config.name), None, out_dir, {}, None, state.best_epoch,
                                    f"rank {world.rank} of {world.size}: training done; rank 0 records the run")

        if trainer.best_path.is_file():
            load_weights(trainer.model, trainer.best_path)
        final, tta = _final_evaluation(config, trainer.model, data, progress)
        _record_results(tracker, config, data, state, final, tta, out_dir)
        if trainer.best_path.is_file() and config.tracking.log_model:
            tracker.log_artifact(trainer.best_path, "checkpoints")
        summary = _summary(config, final, tta, state.best_epoch, out_dir, tracker, data)
    return ExperimentResult(
        str(config.name), tracker.run_id, out_dir, final.scores, None if tta is None else tta.scores, state.best_epoch, summary
    )


def check_parallel(config: ExperimentConfig, world) -> None:
    """`train.batch_size` is the global batch: it must split evenly over the processes."""
    if config.train.batch_size % world.size:
        raise ExperimentError(
            f"config {config.name}: train.batch_size {config.train.batch_size} is the global batch and must divide "
            f"evenly over the {world.size} processes (e.g. {world.size * max(1, config.train.batch_size // world.size)})"
        )


def _needed_splits(config: ExperimentConfig) -> dict[str, str]:
    needs = {"train": "training", "val": "validation after each epoch"}
    needs.setdefault(config.eval.split, "the final evaluation (eval.split)")
    return needs


def _refuse_complete(config: ExperimentConfig, out_dir: Path, progress: dict, run_id: str | None) -> None:
    """Resuming a run that trained every epoch and FINISHED would only re-evaluate it: say so."""
    from steel_seg.tracking import run_status

    if progress.get("epoch", 0) < config.train.epochs or not run_id or not config.tracking.enabled:
        return
    if run_status(config.tracking.uri, run_id) != "FINISHED":
        return  # e.g. crashed in the final evaluation: resuming finishes it
    raise AlreadyComplete(
        f"{out_dir} is complete: all {config.train.epochs} epochs trained and MLflow run {run_id} FINISHED; "
        f"nothing to resume. To train longer: --resume --set train.epochs=N (N > {config.train.epochs}); "
        f"to score it again: python -m steel_seg.evaluate --run-id {run_id}"
    )


def _record_config(tracker, config: ExperimentConfig, out_dir: Path, is_demo: bool, device: str) -> None:
    resolved_yaml = dump_config(config)
    (out_dir / "config.yaml").write_text(resolved_yaml)
    tracker.log_params(config.model_dump(mode="json"))
    tracker.log_text(resolved_yaml, "config.yaml")
    tracker.set_tags(
        {
            "model": config.model.type,
            "backbone": (config.model.backbone or {}).get("type", "none"),
            "loss": loss_label(config),
            "augment": augment_label(config),
            "include_defect_free": str(config.data.include_defect_free).lower(),
            "config_hash": config_hash(config),
            "git_commit": git_commit() or "unknown",
            "demo_data": str(is_demo).lower(),
            "device": device,
            "output_dir": str(out_dir.resolve()),
        }
    )


def _record_data(tracker, data: PreparedData) -> None:
    tracker.set_tags({"data_fingerprint": data.cache.directory.name, "data_source": str(Path(data.source).resolve())})
    tracker.log_params({"data.num_train": len(data.train), "data.num_val": len(data.val), "data.num_test": len(data.test)})
    for context, samples in (("training", data.train), ("validation", data.val)):
        tracker.log_dataset(
            _dataset_records(data, samples),
            source=str(data.seg.root),
            name=f"{Path(data.source).name}-{context}",
            digest=_digest(samples),
            context=context,
        )
    if data.skipped:
        tracker.log_text("".join(f"{p}\t{r}\n" for p, r in data.skipped), "skipped_samples.tsv")
    # What an export needs from the data, kept with the run so export works where the data is not.
    from steel_seg.deploy.release import LABELS_FILE, SAMPLES_DIR

    tracker.log_text("\n".join(data.class_names) + "\n", LABELS_FILE)
    for sample in (data.val or data.train)[:4]:
        tracker.log_artifact(sample.image, SAMPLES_DIR)


def _build_trainer(config: ExperimentConfig, data: PreparedData, out_dir: Path, tracker, progress: bool, resume: bool,
                   world=None, device: str = "cpu"):
    import paddle

    from steel_seg.distributed import SINGLE, wrap_model

    from steel_seg.losses import build_loss
    from steel_seg.models import build_model, load_pretrained
    from steel_seg.trainer import Trainer, TrainSettings

    paddle.seed(config.train.seed)  # the same initial weights for the same seed
    model = build_model(config.model.type, data.num_classes, config.model.backbone, **config.model.kwargs())
    if config.model.pretrained and not resume:
        report = load_pretrained(model, config.model.pretrained)
        tracker.log_dict(report.__dict__, "pretrained_load_report.json")
    class_weights = config.loss.class_weights
    loss_fn = build_loss(
        [(n, w, {"weight": class_weights}) if n == "CrossEntropyLoss" and class_weights else (n, w) for n, w in config.loss.terms()]
    )
    world = world or SINGLE
    shard = (world.rank, world.size)  # each process gets its part of every (global) batch
    train, size = config.train, tuple(config.data.size)
    train_loader = BatchLoader(
        data.cache, data.train, train_pipeline(config.augment, size), train.batch_size,
        shuffle=True, drop_last=len(data.train) >= train.batch_size, seed=train.seed,
        num_workers=train.num_workers, max_batches=train.max_steps_per_epoch, shard=shard,
    )
    val_loader = BatchLoader(data.cache, data.val, eval_pipeline(size), _eval_batch(config), num_workers=train.num_workers, shard=shard)
    model, network = wrap_model(model, world, train.sync_bn, device)
    settings = TrainSettings(
        epochs=train.epochs, learning_rate=train.learning_rate, momentum=train.momentum,
        weight_decay=train.weight_decay, lr_power=train.lr_power, end_lr=train.end_lr,
        eval_interval=train.eval_interval, seed=train.seed, amp=train.amp,
    )
    trainer = Trainer(
        model, loss_fn, train_loader, val_loader, settings, out_dir,
        num_classes=data.num_classes, class_names=data.class_names, aux_weights=config.loss.aux_weights,
        events=RecordingEvents(tracker, data.class_names), progress_bars=progress, world=world, network=network,
    )
    trainer.progress.extra["run_id"] = tracker.run_id  # so --resume continues this run
    return trainer


def _eval_batch(config: ExperimentConfig) -> int:
    return config.eval.batch_size or config.train.batch_size


def _final_evaluation(config: ExperimentConfig, model, data: PreparedData, progress: bool):
    """Scores on `eval.split`, plain and (if configured) with TTA."""
    from steel_seg.evaluation import evaluate
    from steel_seg.tta import plan_from_eval

    split = config.eval.split
    loader = BatchLoader(data.cache, data.split(split), eval_pipeline(tuple(config.data.size)), _eval_batch(config))
    final = evaluate(model, loader, data.num_classes, data.class_names, keep_examples=config.eval.num_overlays,
                     progress=progress, desc=f"final {split}")
    tta = None
    if config.eval.tta:
        tta = evaluate(model, loader, data.num_classes, data.class_names, plan_from_eval(config.eval),
                       progress=progress, desc=f"final {split} TTA", batched=config.eval.tta_batched)
    return final, tta


def _record_results(tracker, config: ExperimentConfig, data: PreparedData, state, final, tta, out_dir: Path) -> None:
    """Final metrics, metrics.json and the plots."""
    from steel_seg import plots

    split = config.eval.split
    metrics = _final_metrics(f"final_{split}_", final.scores, data.class_names, final.ms_per_image)
    if tta is not None:
        metrics.update(_final_metrics(f"final_{split}_tta_", tta.scores, data.class_names, tta.ms_per_image))
        metrics["tta_time_ratio"] = tta.seconds / max(final.seconds, 1e-9)
    metrics["best_epoch"] = state.best_epoch
    tracker.log_metrics(metrics)

    results = {
        "split": split,
        "best_epoch": state.best_epoch,
        "scores": final.scores,
        "ms_per_image": final.ms_per_image,
        "tta": None if tta is None else {
            "views": config.eval.tta, "merge": config.eval.tta_merge, "weights": config.eval.tta_weights,
            "scores": tta.scores, "ms_per_image": tta.ms_per_image,
        },
        "history": state.history,
    }
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
    tracker.log_artifact(out_dir / "metrics.json")
    tracker.log_figure(plots.training_curves(state.history, class_names=data.class_names), "plots/training_curves.png")
    tracker.log_figure(plots.confusion_matrix_figure(final.scores["confusion_matrix"], data.class_names), "plots/confusion_matrix.png")
    if final.examples:
        rows = [row for row, _ in final.examples]
        tracker.log_figure(
            plots.overlays_figure(
                [np.array(data.cache.images[r]) for r in rows],
                [np.array(data.cache.labels[r]) for r in rows],
                [prediction for _, prediction in final.examples],
                data.class_names,
                titles=[Path(data.cache.names[r]).name for r in rows],
            ),
            "plots/overlays.png",
        )


def _summary(config, final, tta_result, best_epoch, out_dir, tracker, data) -> str:
    from steel_seg.tracking import describe_store
    from steel_seg.tta import plan_from_eval

    split = config.eval.split
    lines = [
        "",
        f"== {config.name}: {config.model.type}, loss {loss_label(config)}, augment {augment_label(config)}"
        + (" (demo data)" if data.is_demo else ""),
        f"best epoch {best_epoch}; {split} split, {final.images} images, {final.ms_per_image:.1f} ms/image",
        format_scores(final.scores, data.class_names),
    ]
    if tta_result is not None:
        lines.append(
            f"with TTA {plan_from_eval(config.eval).describe()}: mIoU {tta_result.scores['miou']:.4f} "
            f"vs {final.scores['miou']:.4f}, {tta_result.ms_per_image:.1f} ms/image "
            f"({tta_result.seconds / max(final.seconds, 1e-9):.1f}x the time)"
        )
    lines.append(f"outputs: {out_dir}")
    if tracker.run_id:
        lines.append(f"MLflow run {tracker.run_id}: {tracker.ui_url()}")
        lines.append(describe_store(tracker.uri, tracker.experiment_id))
    return "\n".join(lines)


def evaluate_checkpoint(
    config: ExperimentConfig,
    checkpoint: Path,
    *,
    progress: bool = True,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ExperimentResult:
    """Score a trained checkpoint under `config`'s eval settings (e.g. with or without TTA),
    recorded as its own run; no training. The pipeline's evaluate-only stages use it.

    `final_<split>_*` are the scores under those settings, so runs that differ only in TTA
    compare on the same metric names.
    """
    from steel_seg.checkpoint import load_weights
    from steel_seg.evaluation import evaluate
    from steel_seg.models import build_model
    from steel_seg.tracking import RunTracker
    from steel_seg.tta import plan_from_eval

    check_runnable(config)
    source = resolve_source(config.data, progress)
    if source[1] and config.demo_profile:  # the checkpoint was trained under the same profile
        config = with_demo_profile(config, overrides)
    device = select_device(config.train.device)
    data = prepare_data(config.data, progress=progress, source=source)
    require_splits(data, {config.eval.split: "the evaluation (eval.split)"})
    tracking = config.tracking
    tracker = RunTracker(tracking.uri, tracking.experiment, config.name, {**tracking.tags, **(tags or {})}, enabled=tracking.enabled)
    tracker.start(parent_run_id=parent_run_id)
    out_dir = run_dir(config, None)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tracker:
        _record_config(tracker, config, out_dir, source[1], device)
        tracker.set_tags({"evaluate_only": "true", "checkpoint": str(checkpoint)})
        _record_data(tracker, data)
        model = build_model(config.model.type, data.num_classes, config.model.backbone, **config.model.kwargs())
        load_weights(model, checkpoint)
        split = config.eval.split
        loader = BatchLoader(data.cache, data.split(split), eval_pipeline(tuple(config.data.size)), _eval_batch(config))
        result = evaluate(model, loader, data.num_classes, data.class_names, plan_from_eval(config.eval),
                          progress=progress, desc=f"{config.name} {split}", batched=config.eval.tta_batched)
        tracker.log_metrics(_final_metrics(f"final_{split}_", result.scores, data.class_names, result.ms_per_image))
        (out_dir / "metrics.json").write_text(json.dumps({"split": split, "tta": config.eval.tta, "scores": result.scores,
                                                          "ms_per_image": result.ms_per_image}, indent=2, default=float))
        tracker.log_artifact(out_dir / "metrics.json")
        summary = "\n".join([
            f"== {config.name}: evaluate {checkpoint.name} on {split}, TTA {config.eval.tta or 'none'}",
            format_scores(result.scores, data.class_names),
        ])
    return ExperimentResult(str(config.name), tracker.run_id, out_dir, result.scores, None, 0, summary)
