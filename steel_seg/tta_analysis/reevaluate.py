"""Re-score a finished run's best model with TTA, as a nested MLflow run under it.

Three protocols, each one nested run (tag `steel_seg.role`):
- `tta_evaluation`: plain and TTA on one split, each timed alone;
- `tta_choice`: candidate plans scored on one split (they share forward passes), the best
  reported against plain on another split, each timed alone there;
- `sensitivity`: seed 000's analysis on the choice split, candidate views derived from it,
  then the choice protocol over them, ending in a recommendation.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steel_seg.deploy.tta import TTAPlan, resolve, split_names

ROLE_TAG = "steel_seg.role"
PLAIN = TTAPlan()


@dataclass
class LoadedRun:
    run_id: str
    run_name: str
    experiment: str
    uri: str
    config: object
    data: object
    model: object


def load_run(uri: str | None, run_id: str, overrides=(), progress: bool = True) -> LoadedRun:
    """A FINISHED run's model (best checkpoint) with its own resolved config and data."""
    from steel_seg import tracking
    from steel_seg.checkpoint import load_weights
    from steel_seg.config import load_experiment
    from steel_seg.data.prepare import prepare_data, resolve_source
    from steel_seg.experiment import check_runnable, select_device
    from steel_seg.models import build_model

    run = tracking.finished_run(uri, run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = tracking.download_artifact(uri, run_id, "config.yaml", Path(tmp))
        checkpoint = tracking.download_artifact(uri, run_id, "checkpoints/best.pdparams", Path(tmp))
        config = load_experiment(config_path, list(overrides))
        check_runnable(config)
        select_device(config.train.device)
        data = prepare_data(config.data, progress=progress, source=resolve_source(config.data))
        model = build_model(config.model.type, data.num_classes, config.model.backbone, **config.model.kwargs())
        load_weights(model, checkpoint)
    return LoadedRun(run_id, run.info.run_name or "", tracking.experiment_name(uri, run.info.experiment_id),
                     tracking.resolve_tracking_uri(uri), config, data, model)


def _loader(loaded: LoadedRun, split: str):
    from steel_seg.data.loader import BatchLoader
    from steel_seg.transforms import eval_pipeline

    samples = loaded.data.split(split)
    if not samples:
        raise ValueError(f"the {split} split of run {loaded.run_id}'s data is empty; choose another split")
    config = loaded.config
    return BatchLoader(loaded.data.cache, samples, eval_pipeline(tuple(config.data.size)), config.eval.batch_size or config.train.batch_size)


def score(loaded: LoadedRun, plan: TTAPlan, split: str, progress: bool = True, per_image: bool = False):
    """One plan on one split, timed alone (the time is this plan's own cost)."""
    from steel_seg.evaluation import evaluate

    return evaluate(loaded.model, _loader(loaded, split), loaded.data.num_classes, loaded.data.class_names, plan,
                    progress=progress, desc=f"{split} {plan.describe()}", per_image=per_image, batched=loaded.config.eval.tta_batched)


# ---------------------------------------------------------------------------------------------
# What is compared and how


def defect_recall(scores: dict) -> float:
    """Mean pixel recall over the defect classes (seed 000 judged TTA by the defect recall)."""
    kept = [r for r in scores["recall"][1:] if not math.isnan(r)]
    return float(np.mean(kept)) if kept else math.nan


def metric_value(scores: dict, metric: str, class_names: list[str]) -> float:
    """`miou`, `defect_recall`, `kaggle_dice`, or `<iou|recall|f1>_<class name>`."""
    if metric == "defect_recall":
        return defect_recall(scores)
    if metric in ("miou", "kaggle_dice", "pixel_accuracy"):
        return float(scores[metric])
    kind, _, name = metric.partition("_")
    if kind in ("iou", "recall", "f1", "precision") and name in class_names:
        return float(scores[kind][class_names.index(name)])
    known = ["miou", "defect_recall", "kaggle_dice"] + [f"{k}_{c}" for k in ("iou", "recall") for c in class_names]
    raise ValueError(f"unknown metric `{metric}` to choose by; known: {', '.join(known)}")


def check_metric(metric: str, class_names: list[str]) -> None:
    """Raise before any work if `metric_value` would not know `metric`."""
    n = len(class_names)
    probe = {"miou": 0.0, "kaggle_dice": 0.0, "pixel_accuracy": 0.0, **{k: [0.0] * n for k in ("iou", "recall", "f1", "precision")}}
    metric_value(probe, metric, class_names)


def candidate_plans(views: list[str], merges: list[str], weights=None, norm=None) -> dict[str, TTAPlan]:
    """Plain, then every non-empty subset of `views` under every merge.

    With `weighted`, `weights` has one value per view of the full set (the original first); a
    subset keeps its own views' weights.
    """
    names = split_names(views)
    plans = {"none": PLAIN}
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(range(len(names)), size):
            for merge in merges:
                w = None
                if merge == "weighted":
                    if weights is None:
                        raise ValueError("merge `weighted` needs --weights, one per view with the original first")
                    if len(weights) != len(names) + 1:
                        raise ValueError(f"--weights: {len(weights)} value(s) for {len(names) + 1} views (the original, {', '.join(names)})")
                    w = [weights[0]] + [weights[i + 1] for i in subset]
                plan = resolve([names[i] for i in subset], merge, w, norm)
                plans[plan.describe()] = plan
    return plans


@dataclass
class Arm:
    """One plan's scores on one split, with its own time."""

    plan: TTAPlan
    split: str
    scores: dict
    ms_per_image: float
    images: int


def arm(plan: TTAPlan, split: str, result) -> Arm:
    return Arm(plan, split, result.scores, result.ms_per_image, result.images)


@dataclass
class Choice:
    """Candidates scored on `choose_on`, the best (by `metric`) reported on `report_on`."""

    metric: str
    choose_on: str
    report_on: str
    candidates: dict[str, dict]
    """Candidate name -> scores on `choose_on`."""
    chosen: str
    plan: TTAPlan
    plain: Arm
    best: Arm
    reasons: dict[str, str] = field(default_factory=dict)
    """Candidate name -> why it was tried (sensitivity)."""
    reported: dict[str, Arm] = field(default_factory=dict)
    """Candidate name -> its scores on `report_on`, timed alone."""

    @property
    def images_on_choice_split(self) -> int:
        return int(next(iter(self.candidates.values()))["num_images"])


def choose(loaded: LoadedRun, plans: dict[str, TTAPlan], choose_on: str, report_on: str, metric: str = "miou",
           progress: bool = True, reasons: dict[str, str] | None = None) -> Choice:
    """Score `plans` on `choose_on` and take the best by `metric` (plain wins ties, then fewer
    views); then score every plan on `report_on`, each timed alone there. Only the choice
    split decides: the report split shows whether the choice holds."""
    from steel_seg.evaluation import evaluate_candidates

    names = loaded.data.class_names
    check_metric(metric, names)
    results = evaluate_candidates(loaded.model, _loader(loaded, choose_on), loaded.data.num_classes, plans, names,
                                  progress=progress, desc=f"candidates on {choose_on}")
    values = {name: metric_value(r.scores, metric, names) for name, r in results.items()}
    chosen = sorted(values, key=lambda n: (-_sortable(values[n]), len(plans[n].views)))[0]
    reported = {name: arm(plan, report_on, score(loaded, plan, report_on, progress)) for name, plan in plans.items()}
    plain = next(a for a in reported.values() if a.plan.is_plain)
    return Choice(metric, choose_on, report_on, {n: r.scores for n, r in results.items()}, chosen, plans[chosen], plain,
                  reported[chosen], dict(reasons or {}), reported)


def _sortable(value: float) -> float:
    return -math.inf if math.isnan(value) else value


# ---------------------------------------------------------------------------------------------
# Text and records


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def comparison_table(a: Arm, b: Arm, class_names: list[str], label_a: str = "plain", label_b: str = "TTA") -> str:
    """Markdown: mIoU, defect recall, per-class IoU and recall, ms/image; b's change beside it."""
    rows = [("mIoU", a.scores["miou"], b.scores["miou"]), ("defect recall (mean)", defect_recall(a.scores), defect_recall(b.scores)),
            ("Kaggle Dice", a.scores["kaggle_dice"], b.scores["kaggle_dice"])]
    rows += [(f"IoU {c}", a.scores["iou"][i], b.scores["iou"][i]) for i, c in enumerate(class_names)]
    rows += [(f"recall {c}", a.scores["recall"][i], b.scores["recall"][i]) for i, c in enumerate(class_names)]
    lines = [f"| {a.split} split, {a.images} images | {label_a} | {label_b} | change |", "|---|---|---|---|"]
    for name, x, y in rows:
        change = "n/a" if math.isnan(x) or math.isnan(y) else f"{y - x:+.4f}"
        lines.append(f"| {name} | {_fmt(x)} | {_fmt(y)} | {change} |")
    ratio = b.ms_per_image / a.ms_per_image if a.ms_per_image else math.nan
    lines.append(f"| ms/image | {a.ms_per_image:.1f} | {b.ms_per_image:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


def candidates_table(choice: Choice, class_names: list[str]) -> str:
    """Every candidate on both splits; the choice was made on the first alone."""
    c, r = choice.choose_on, choice.report_on
    lines = [f"| candidate | {c} mIoU | {c} defect recall | {r} mIoU | {r} defect recall | {r} ms/image | why |",
             "|---|---|---|---|---|---|---|"]
    for name, scores in choice.candidates.items():
        mark = " **(chosen)**" if name == choice.chosen else ""
        rep = choice.reported.get(name)
        test = [_fmt(rep.scores["miou"]), _fmt(defect_recall(rep.scores)), f"{rep.ms_per_image:.1f}"] if rep else ["", "", ""]
        lines.append(f"| {name}{mark} | {_fmt(scores['miou'])} | {_fmt(defect_recall(scores))} | " + " | ".join(test)
                     + f" | {choice.reasons.get(name, '')} |")
    return "\n".join(lines)


def arm_metrics(prefix: str, a: Arm, class_names: list[str]) -> dict[str, float]:
    from steel_seg.experiment import _final_metrics

    metrics = _final_metrics(prefix, a.scores, class_names, a.ms_per_image)
    metrics[f"{prefix}defect_recall"] = defect_recall(a.scores)
    return metrics


def gain_metrics(prefix: str, plain: Arm, other: Arm) -> dict[str, float]:
    return {
        f"{prefix}miou_gain": other.scores["miou"] - plain.scores["miou"],
        f"{prefix}defect_recall_gain": defect_recall(other.scores) - defect_recall(plain.scores),
        f"{prefix}time_ratio": other.ms_per_image / plain.ms_per_image if plain.ms_per_image else math.nan,
    }


def plan_tags(plan: TTAPlan) -> dict[str, str]:
    return {"tta_views": ",".join(plan.extra_views) or "none", "tta_merge": plan.merge,
            "tta_weights": json.dumps(list(plan.weights)) if plan.weights else ""}


def nested_tracker(loaded: LoadedRun, run_name: str, role: str, tags: dict[str, str]):
    """A run under the training run (same experiment), started; use as a context manager."""
    from steel_seg.tracking import RunTracker

    tracker = RunTracker(loaded.uri, loaded.experiment, run_name, {ROLE_TAG: role, "evaluated_run": loaded.run_id, **tags})
    return tracker.start(parent_run_id=loaded.run_id)


def recommendation_text(choice: Choice, class_names: list[str]) -> str:
    """What to use, with the gain on both splits and the cost, and each candidate that did not help."""
    metric = choice.metric

    def value(scores):
        return metric_value(scores, metric, class_names)

    plain_choice, plain_report = value(choice.candidates["none"]), value(choice.plain.scores)
    lines = []
    for name, scores in choice.candidates.items():
        if name == "none":
            continue
        gain = value(scores) - plain_choice
        rep = choice.reported.get(name)
        held = f", on {choice.report_on} {value(rep.scores) - plain_report:+.4f}" if rep else ""
        cost = f", {rep.ms_per_image / choice.plain.ms_per_image:.2f}x the time" if rep and choice.plain.ms_per_image else ""
        lines.append(f"- {name}: {'helps' if gain > 0 else 'does not help'} on {choice.choose_on} ({metric} {gain:+.4f} vs plain{held}{cost})")
    if choice.plan.is_plain:
        head = (f"Recommendation: no TTA. No candidate beat plain on {choice.choose_on} by {metric}; "
                f"plain on {choice.report_on}: mIoU {choice.plain.scores['miou']:.4f}, {choice.plain.ms_per_image:.1f} ms/image.")
    else:
        test_gain = value(choice.best.scores) - plain_report
        ratio = choice.best.ms_per_image / choice.plain.ms_per_image if choice.plain.ms_per_image else math.nan
        confirmed = "confirmed" if test_gain > 0 else "NOT confirmed"
        head = (f"Recommendation: TTA {choice.chosen}. Chosen on {choice.choose_on} ({metric} "
                f"{value(choice.candidates[choice.chosen]) - plain_choice:+.4f}); on {choice.report_on} "
                f"{metric} {test_gain:+.4f} ({confirmed}), mIoU {choice.plain.scores['miou']:.4f} -> {choice.best.scores['miou']:.4f}, "
                f"defect recall {defect_recall(choice.plain.scores):.4f} -> {defect_recall(choice.best.scores):.4f}; "
                f"cost {choice.plain.ms_per_image:.1f} -> {choice.best.ms_per_image:.1f} ms/image ({ratio:.2f}x).")
    return "\n".join([head, *lines])


# ---------------------------------------------------------------------------------------------
# The three protocols, each recorded as one nested run


@dataclass
class Outcome:
    summary: str
    nested_run_id: str | None
    plan: TTAPlan
    """What to deploy: the evaluated plan, the chosen one, or the recommended one."""
    details: dict = field(default_factory=dict)


def _header(loaded: LoadedRun) -> str:
    return f"run {loaded.run_id} ({loaded.run_name}, {loaded.config.model.type})"


def evaluate_tta(loaded: LoadedRun, plan: TTAPlan, split: str, progress: bool = True) -> Outcome:
    """Plain and `plan` on `split`, each timed alone; one nested run (role tta_evaluation)."""
    from steel_seg import plots

    names = loaded.data.class_names
    tracker = nested_tracker(loaded, f"tta {','.join(plan.extra_views) or 'none'} on {split}", "tta_evaluation",
                             {**plan_tags(plan), "split": split})
    with tracker:
        plain = arm(PLAIN, split, score(loaded, PLAIN, split, progress))
        tta = arm(plan, split, score(loaded, plan, split, progress))
        table = comparison_table(plain, tta, names, "plain", f"TTA {plan.describe()}")
        tracker.log_metrics({**arm_metrics(f"plain_{split}_", plain, names), **arm_metrics(f"tta_{split}_", tta, names),
                             **gain_metrics(f"tta_{split}_", plain, tta)})
        tracker.log_text(table + "\n", "tta_summary.md")
        tracker.log_dict({"split": split, "plan": plan.as_spec(), "plain": plain.scores, "tta": tta.scores,
                          "ms_per_image": {"plain": plain.ms_per_image, "tta": tta.ms_per_image}}, "tta_results.json")
        tracker.log_figure(plots.tta_comparison_figure(names, [("plain", plain.scores, plain.ms_per_image),
                                                               (f"TTA {plan.describe()}", tta.scores, tta.ms_per_image)], split),
                           "plots/tta_per_class.png")
    summary = "\n".join([f"{_header(loaded)}: TTA {plan.describe()} vs plain, both on the {split} split", "", table, "",
                         f"nested run {tracker.run_id}: {tracker.ui_url()}"])
    return Outcome(summary, tracker.run_id, plan, {"plain": plain, "tta": tta})


def _choice_record(tracker, loaded: LoadedRun, choice: Choice) -> tuple[str, str]:
    """Log a choice (candidates on one split, chosen vs plain on the other); (tables, recommendation)."""
    from steel_seg import plots

    names = loaded.data.class_names
    candidates = candidates_table(choice, names)
    report = comparison_table(choice.plain, choice.best, names, "plain", f"chosen: {choice.chosen}")
    recommendation = recommendation_text(choice, names)
    metrics = {**arm_metrics(f"plain_{choice.report_on}_", choice.plain, names),
               **arm_metrics(f"chosen_{choice.report_on}_", choice.best, names),
               **gain_metrics(f"chosen_{choice.report_on}_", choice.plain, choice.best)}
    for name, scores in choice.candidates.items():
        metrics[f"candidates/{_metric_key(name)}/{choice.choose_on}_miou"] = scores["miou"]
        metrics[f"candidates/{_metric_key(name)}/{choice.choose_on}_defect_recall"] = defect_recall(scores)
        if name in choice.reported:
            rep = choice.reported[name]
            metrics[f"candidates/{_metric_key(name)}/{choice.report_on}_miou"] = rep.scores["miou"]
            metrics[f"candidates/{_metric_key(name)}/{choice.report_on}_defect_recall"] = defect_recall(rep.scores)
            metrics[f"candidates/{_metric_key(name)}/{choice.report_on}_ms_per_image"] = rep.ms_per_image
    tracker.log_metrics(metrics)
    tracker.set_tags({**plan_tags(choice.plan), "chosen": choice.chosen, "choose_on": choice.choose_on,
                      "report_on": choice.report_on, "choose_by": choice.metric})
    text = (f"## Candidates, chosen on {choice.choose_on} ({choice.images_on_choice_split} images) by {choice.metric}, "
            f"each also scored on {choice.report_on} ({choice.plain.images} images)\n\n"
            f"{candidates}\n\n## Chosen vs plain, on {choice.report_on}\n\n{report}\n\n## Recommendation\n\n{recommendation}\n")
    tracker.log_text(text, "tta_choice.md")
    tracker.log_text(recommendation + "\n", "recommendation.txt")
    tracker.log_dict({"choose_on": choice.choose_on, "report_on": choice.report_on, "metric": choice.metric,
                      "chosen": choice.chosen, "plan": choice.plan.as_spec(), "candidates": choice.candidates,
                      "report": {name: {"scores": a.scores, "ms_per_image": a.ms_per_image} for name, a in choice.reported.items()}},
                     "tta_choice.json")
    arms = [("plain", choice.plain.scores, choice.plain.ms_per_image)]
    if not choice.plan.is_plain:
        arms.append((f"chosen: {choice.chosen}", choice.best.scores, choice.best.ms_per_image))
    tracker.log_figure(plots.tta_comparison_figure(names, arms, choice.report_on), "plots/tta_per_class.png")
    return text, recommendation


def _metric_key(name: str) -> str:
    """A candidate's name as an MLflow metric-name suffix: `hflip, blur:3 (mean)` -> `hflip+blur_3/mean`."""
    key = name.replace(", ", "+").replace(" (", "/").replace(")", "").replace(":", "_").replace(" ", "_")
    return "".join(ch if ch.isalnum() or ch in "_-./+" else "_" for ch in key).replace("+", "_and_")


def choose_tta(loaded: LoadedRun, views: list[str], merges: list[str], weights, choose_on: str, report_on: str,
               metric: str = "miou", progress: bool = True) -> Outcome:
    """Every subset of `views` (and plain) under each merge, chosen on one split, reported on another."""
    if choose_on == report_on:
        raise ValueError(f"--choose-on and --report-on are both {choose_on}: report on a split the choice did not see")
    check_metric(metric, loaded.data.class_names)
    plans = candidate_plans(views, merges, weights)
    tracker = nested_tracker(loaded, f"tta choice on {choose_on}, report on {report_on}", "tta_choice",
                             {"candidates": "; ".join(plans)})
    with tracker:
        choice = choose(loaded, plans, choose_on, report_on, metric, progress)
        text, _ = _choice_record(tracker, loaded, choice)
    summary = "\n".join([f"{_header(loaded)}", "", text, f"nested run {tracker.run_id}: {tracker.ui_url()}"])
    return Outcome(summary, tracker.run_id, choice.plan, {"choice": choice})


def sensitivity(loaded: LoadedRun, choose_on: str = "val", report_on: str = "test", merge: str = "mean",
                metric: str = "miou", progress: bool = True) -> Outcome:
    """Seed 000's analysis on `choose_on`, candidate views from it (and the training flips),
    each candidate chosen-on / reported-on as `choose_tta` does; one nested run (role sensitivity)."""
    from steel_seg import plots
    from steel_seg.tta_analysis import sensitivity as sens

    if choose_on == report_on:
        raise ValueError(f"--choose-on and --report-on are both {choose_on}: report on a split the choice did not see")
    names = loaded.data.class_names
    check_metric(metric, names)
    tracker = nested_tracker(loaded, f"sensitivity on {choose_on}, report on {report_on}", "sensitivity",
                             {"choose_on": choose_on, "report_on": report_on})
    with tracker:
        plain = score(loaded, PLAIN, choose_on, progress, per_image=True)
        cache = loaded.data.cache
        features = [sens.image_features(np.asarray(cache.images[r]), np.asarray(cache.labels[r])) for r in plain.rows]
        tables = [sens.feature_table(f, [x[f] for x in features], plain.image_confusion, names) for f in sens.FEATURES]
        flips = training_flips(loaded.config.augment)
        found = sens.candidate_views(tables, flips)
        plans = {"none": PLAIN}
        reasons = {}
        for c in found:
            plan = resolve([c.view], merge, [0.5, 0.5] if merge == "weighted" else None)
            plans[plan.describe()] = plan
            reasons[plan.describe()] = c.reason
        markdown = sens.tables_markdown(tables)
        tracker.log_text(markdown, "sensitivity/sensitivity.md")
        tracker.log_text(sens.tables_csv(tables), "sensitivity/sensitivity.csv")
        for t in tables:
            tracker.log_figure(plots.sensitivity_figure(t), f"sensitivity/{t.feature}.png")
        tracker.log_dict({"features": {r: x for r, x in zip(map(str, plain.rows), features)}}, "sensitivity/image_features.json")
        if len(plans) == 1:
            choice = None
            recommendation = ("Recommendation: no TTA. The analysis suggested no view: no feature moved the defect classes' "
                              f"F1 by {sens.MIN_SPREAD} or more across its quintiles, and training used no flips.")
            tracker.log_text(recommendation + "\n", "recommendation.txt")
            tracker.set_tags(plan_tags(PLAIN))
            choice_text = ""
        else:
            choice = choose(loaded, plans, choose_on, report_on, metric, progress, reasons)
            choice_text, recommendation = _choice_record(tracker, loaded, choice)
        tracker.set_tags({"recommended": choice.chosen if choice else "none"})
    lines = [f"{_header(loaded)}: sensitivity of the plain model on the {choose_on} split ({plain.images} images)", "", markdown]
    lines += ["Candidate views:"] + [f"- {c.view}: {c.reason}" for c in found] if found else ["Candidate views: none"]
    lines += ["", choice_text or recommendation, f"nested run {tracker.run_id}: {tracker.ui_url()}"]
    return Outcome("\n".join(lines), tracker.run_id, choice.plan if choice else PLAIN,
                   {"tables": tables, "candidates": found, "choice": choice, "recommendation": recommendation})


def training_flips(augment) -> list[str]:
    """TTA views matching the flips a config trained with (named sets or transform lists)."""
    from steel_seg.transforms import train_pipeline

    names = {type(t).__name__ for t in getattr(train_pipeline(augment, (64, 32)), "transforms", [])}
    return [view for cls, view in (("RandomHorizontalFlip", "hflip"), ("RandomVerticalFlip", "vflip")) if cls in names]
