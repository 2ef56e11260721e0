"""A pipeline's results as the study reads them: per-stage tables over seeds, significance of each
stage's winner, the reproduction report against the seed study, links into MLflow's UI.

Everything is read back from MLflow (steel_seg.tracking.read_pipeline), so it works on any store;
the math is steel_seg.pipeline.stats; rendering is plain text, Markdown and CSV.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field

from steel_seg.pipeline.stats import ALPHA, Summary, Verdict, stage_verdict, summarize, welch_p

FINISHED = "FINISHED"
FAILED_STATUSES = ("FAILED", "KILLED")
BEST_OF = re.compile(r"^best_of\((?P<stage>[^()]+)\)$")
# Loss names as the seed study's table writes them.
LOSS_SHORT = {"CrossEntropyLoss": "CE", "LovaszSoftmaxLoss": "Lovasz", "DiceLoss": "Dice", "BCELoss": "BCE"}


# ---------------------------------------------------------------------------------------------
# What was run


@dataclass
class VariantRun:
    """One seed of one variant, as MLflow has it."""

    run_id: str
    seed: int | None
    status: str
    params: dict
    tags: dict
    metrics: dict

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def failure_reason(self) -> str:
        return self.tags.get("failure_reason", "")

    @property
    def reused_from(self) -> str | None:
        return self.tags.get("steel_seg.reused_from")


@dataclass
class VariantResult:
    name: str
    from_: str | None = None
    reference_miou: float | None = None
    """The seed study's published mIoU as a fraction (as pipeline.json has it; a value above 1 is read as %)."""
    runs: list[VariantRun] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        """Per-seed values of `metric` from the FINISHED runs, in seed order."""
        return [r.metrics[metric] for r in self.runs if r.finished and metric in r.metrics]

    def mean(self, metric: str) -> float:
        """Mean over the finished seeds, NaN when there are none (as the table shows it)."""
        return summarize(self.values(metric)).mean

    @property
    def failed(self) -> list[VariantRun]:
        return [r for r in self.runs if r.status in FAILED_STATUSES]

    @property
    def example(self) -> VariantRun | None:
        """The run whose settings the table shows: a finished one if any."""
        return next((r for r in self.runs if r.finished), self.runs[0] if self.runs else None)


@dataclass
class StageResult:
    name: str
    index: int
    evaluate_only: bool
    from_: str | None
    run_id: str | None
    variants: list[VariantResult]
    verdict: Verdict

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"stage {self.name!r} has no variant {name!r}; its variants: {', '.join(v.name for v in self.variants)}")


@dataclass(frozen=True)
class Conclusion:
    claim: str
    better: str
    worse: str


@dataclass
class PipelineResults:
    uri: str
    name: str
    metric: str
    seeds: list
    parent_run_id: str
    experiment_id: str
    experiment_name: str
    stages: list[StageResult]
    conclusions: list[Conclusion]
    class_names: list[str]
    demo_data: bool
    alpha: float = ALPHA

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"pipeline {self.name!r} has no stage {name!r}; its stages: {', '.join(s.name for s in self.stages)}")

    @property
    def prefix(self) -> str:
        """'final_val_' for the metric 'final_val_miou': where per-class IoU and Dice are found."""
        return self.metric[: -len("miou")] if self.metric.endswith("miou") else ""


# ---------------------------------------------------------------------------------------------
# Reading


def load_results(uri: str | None, parent_run_id: str | None = None, experiment: str | None = None, alpha: float = ALPHA) -> PipelineResults:
    """The pipeline invocation `parent_run_id` (default: the latest of `experiment`, else of the
    store) with its stages, variants and seeds, and each stage's verdict."""
    from steel_seg.tracking import read_pipeline

    record = read_pipeline(uri, parent_run_id=parent_run_id, experiment=experiment)
    plan = record.plan
    metric = plan.get("metric") or "final_val_miou"
    runs_by_stage: dict[str, list] = {}
    for run in record.variants:
        runs_by_stage.setdefault(run.tags.get("stage", ""), []).append(run)
    stage_run_ids = {r.tags.get("stage"): r.run_id for r in sorted(record.stages, key=lambda r: r.start_time)}

    stages = []
    planned = sorted(plan.get("stages", []), key=lambda s: s.get("index", 0))
    for position, spec in enumerate(planned):
        name = spec["name"]
        variants = _variants(spec.get("variants", []), runs_by_stage.get(name, []))
        # Variants without a finished run are left out, as the executor does when it picks the
        # winner that later stages inherit: the table then agrees with the stage run's tags.
        scored = {v.name: v.values(metric) for v in variants if v.values(metric)}
        verdict = stage_verdict(scored, alpha=alpha)
        stages.append(StageResult(
            name=name, index=int(spec.get("index", position)), evaluate_only=bool(spec.get("evaluate_only")),
            from_=spec.get("from"), run_id=stage_run_ids.get(name), variants=variants, verdict=verdict,
        ))
    conclusions = [Conclusion(c["claim"], c["better"], c["worse"]) for c in plan.get("conclusions", [])]
    return PipelineResults(
        uri=record.uri, name=plan.get("name") or record.parent.tags.get("steel_seg.pipeline", record.parent.name),
        metric=metric, seeds=list(plan.get("seeds", [])), parent_run_id=record.parent.run_id,
        experiment_id=record.experiment_id, experiment_name=record.experiment_name, stages=stages,
        conclusions=conclusions, class_names=_class_names(record, metric), alpha=alpha,
        demo_data=any(r.tags.get("demo_data") == "true" for r in record.variants),
    )


def _variants(specs: list[dict], runs: list) -> list[VariantResult]:
    """Variants in the plan's order (and any run of an unplanned variant after them), one run per
    seed: a FINISHED run of a seed wins over failed attempts of it, else the latest attempt."""
    variants = {s["name"]: VariantResult(s["name"], s.get("from"), _fraction(s.get("reference_miou"))) for s in specs}
    by_seed: dict[tuple[str, str], object] = {}
    for run in sorted(runs, key=lambda r: r.start_time):
        key = (run.tags.get("variant", "?"), run.tags.get("seed", run.run_id))
        kept = by_seed.get(key)
        if kept is None or run.status == FINISHED or kept.status != FINISHED:
            by_seed[key] = run
    for (variant, seed), run in by_seed.items():
        variants.setdefault(variant, VariantResult(variant))
        variants[variant].runs.append(VariantRun(run.run_id, _int(seed), run.status, run.params, run.tags, run.metrics))
    for v in variants.values():
        v.runs.sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0, r.run_id))
    return list(variants.values())


def _class_names(record, metric: str) -> list[str]:
    """Class order from a trained run's labels.txt; else background first, the rest by name."""
    from steel_seg.tracking import run_artifact_text

    prefix = metric[: -len("miou")] if metric.endswith("miou") else ""
    names = {k[len(prefix) + len("iou_"):] for r in record.variants for k in r.metrics if k.startswith(f"{prefix}iou_")}
    if not names:
        return []
    trained = next((r for r in record.variants if r.status == FINISHED and "steel_seg.reused_from" not in r.tags), None)
    originals = [trained.run_id] if trained else []
    originals += [r.tags["steel_seg.reused_from"] for r in record.variants if "steel_seg.reused_from" in r.tags][:1]
    for run_id in originals:
        text = run_artifact_text(record.uri, run_id, "labels.txt")
        if text:
            ordered = [line.strip() for line in text.splitlines() if line.strip() in names]
            return ordered + sorted(names - set(ordered))
    return sorted(names, key=lambda n: (n != "background", n))


def _fraction(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value / 100.0 if value > 1.0 else value


def _int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Per-stage tables


@dataclass
class StageRow:
    """One variant of a stage, aggregated over its seeds (values are fractions, not %)."""

    variant: str
    arch: str
    backbone: str
    epochs: str
    resolution: str
    batch_size: str
    learning_rate: str
    loss: str
    augment: str
    defect_free: str
    tta: str
    miou: Summary
    iou: dict[str, float]
    kaggle_dice: float
    ms_per_image: float
    status: str
    error: str
    winner: bool
    resolved: bool
    p_vs_best: float | None
    mark: str
    run_ids: list[str]
    seed_values: list[float]
    reference_miou: float | None


def stage_table(results: PipelineResults, stage: str | StageResult) -> list[StageRow]:
    """The rows of one stage: settings as in the seed study's table, mean ± std over seeds, status,
    and the winner mark (*not resolved* when the best is within noise of another variant)."""
    stage = results.stage(stage) if isinstance(stage, str) else stage
    verdict = stage.verdict
    rows = []
    for v in stage.variants:
        run = v.example
        p, t = (run.params, run.tags) if run else ({}, {})
        prefix = results.prefix
        values = v.values(results.metric)
        winner = v.name == verdict.winner
        status, error = _status(v)
        rows.append(StageRow(
            variant=v.name,
            arch=t.get("model") or p.get("model.type", ""),
            backbone=_backbone(t.get("backbone") or p.get("model.backbone.type", "")),
            epochs=p.get("train.epochs", ""),
            resolution=_resolution(p.get("data.size", "")),
            batch_size=p.get("train.batch_size", ""),
            learning_rate=p.get("train.learning_rate", ""),
            loss=_loss(t.get("loss", "")),
            augment=t.get("augment") or p.get("augment", ""),
            defect_free=_yes_no(t.get("include_defect_free") or p.get("data.include_defect_free", "")),
            tta=_tta(p.get("eval.tta", "")),
            miou=summarize(values),
            iou={c: v.mean(f"{prefix}iou_{c}") for c in results.class_names},
            kaggle_dice=v.mean(f"{prefix}kaggle_dice"),
            ms_per_image=v.mean(f"{prefix}ms_per_image"),
            status=status,
            error=error,
            winner=winner,
            resolved=verdict.resolved,
            p_vs_best=verdict.p_values.get(v.name),
            mark=_mark(v.name, verdict, results.alpha),
            run_ids=[r.run_id for r in v.runs],
            seed_values=values,
            reference_miou=v.reference_miou,
        ))
    return rows


def _status(v: VariantResult) -> tuple[str, str]:
    """('finished' | 'failed' | '1 of 3 failed' | 'running' | 'no runs', first failure reason)."""
    if not v.runs:
        return "no runs", ""
    failed = v.failed
    error = ""
    if failed:
        first = failed[0]
        reason = (first.failure_reason.strip().splitlines() or [first.status])[-1]
        error = f"seed {first.seed}: {reason}" if first.seed is not None else reason
    finished = [r for r in v.runs if r.finished]
    running = [r for r in v.runs if r.status not in FAILED_STATUSES and not r.finished]
    reused = sum(1 for r in finished if r.reused_from)
    if failed and not finished:
        status = "failed"
    elif failed:
        status = f"{len(failed)} of {len(v.runs)} failed"
    elif running:
        status = f"{len(running)} running"
    else:
        status = "finished"
    if reused:
        status += f" ({reused} reused)"
    return status, error


def _mark(name: str, verdict: Verdict, alpha: float) -> str:
    if verdict.winner is None:
        return ""
    if name == verdict.winner:
        return "best" if verdict.resolved else "best, *not resolved*"
    if name not in verdict.p_values:
        return ""
    p = verdict.p_values[name]
    if p is None:
        return "cannot tell"
    return f"p = {p:.2g}" + (", within noise" if p > alpha else "")


def _backbone(value: str) -> str:
    return "" if value in ("", "none", "None") else value


def _resolution(value: str) -> str:
    try:
        size = json.loads(value)
        return "x".join(str(s) for s in size) if isinstance(size, list) else str(size)
    except (TypeError, ValueError):
        return value


def _loss(label: str) -> str:
    """'CrossEntropyLoss*0.8+DiceLoss*0.2' -> 'CE 0.8 + Dice 0.2'; a single term is just 'CE'."""
    if not label:
        return ""
    terms = []
    for term in label.split("+"):
        name, _, weight = term.partition("*")
        terms.append((LOSS_SHORT.get(name, name), weight))
    if len(terms) == 1:
        return terms[0][0]
    return " + ".join(f"{name} {weight}".strip() for name, weight in terms)


def _yes_no(value: str) -> str:
    return {"true": "yes", "false": "no"}.get(str(value).lower(), str(value))


def _tta(value: str) -> str:
    try:
        views = json.loads(value) if value else []
    except ValueError:
        return value
    return "+".join(views) if views else "none"


# ---------------------------------------------------------------------------------------------
# Rendering


def _columns(results: PipelineResults, stage: StageResult) -> list[tuple[str, object]]:
    """(header, cell function) of a stage's table; TTA and timing only for evaluate-only stages."""
    pct = _percent
    columns = [
        ("variant", lambda r: r.variant),
        ("arch", lambda r: r.arch),
        ("backbone", lambda r: r.backbone),
        ("epochs", lambda r: r.epochs),
        ("resolution", lambda r: r.resolution),
        ("batch", lambda r: r.batch_size),
        ("lr", lambda r: r.learning_rate),
        ("loss", lambda r: r.loss),
        ("augment", lambda r: r.augment),
        ("defect-free", lambda r: r.defect_free),
    ]
    if stage.evaluate_only:
        columns += [("TTA", lambda r: r.tta), ("ms/image", lambda r: "" if math.isnan(r.ms_per_image) else f"{r.ms_per_image:.1f}")]
    columns.append(("mIoU %", lambda r: r.miou.format(scale=100, digits=1)))
    columns += [(f"IoU {c} %", (lambda c: lambda r: pct(r.iou.get(c, math.nan)))(c)) for c in results.class_names]
    columns += [
        ("Kaggle Dice %", lambda r: pct(r.kaggle_dice)),
        ("status", lambda r: r.status + (f": {_short(r.error)}" if r.error else "")),
        ("vs best", lambda r: r.mark),
    ]
    return columns


def _percent(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stage_heading(results: PipelineResults, stage: StageResult) -> str:
    kind = ", evaluation only" if stage.evaluate_only else ""
    source = f", from {stage.from_}" if stage.from_ else ""
    return f"Stage {stage.index + 1} of {len(results.stages)}: {stage.name}{kind}{source}"


def _verdict_line(stage: StageResult, markdown: bool) -> str:
    v = stage.verdict
    unscored = [x.name for x in stage.variants if x.name != v.winner and x.name not in v.p_values]
    left_out = f" Not compared (no finished run): {', '.join(unscored)}." if unscored and v.winner else ""
    if v.winner is None:
        return f"No winner: {v.reason}."
    state = "resolved" if v.resolved else ("*not resolved*" if markdown else "NOT RESOLVED")
    return f"Winner: {v.winner} ({state}: {v.reason}).{left_out}"


def render_markdown(results: PipelineResults, stage: str | None = None, links: bool = True) -> str:
    """Markdown tables, one per stage (or just `stage`), each under its verdict and method."""
    stages = [results.stage(stage)] if stage else results.stages
    compare = stage_links(results) if links else {}
    runs = stage_runs_links(results) if links else {}
    out = [] if stage else [f"# {results.name}: results by stage", "", _provenance(results), ""]
    for s in stages:
        columns = _columns(results, s)
        rows = stage_table(results, s)
        out += [f"## {_stage_heading(results, s)}", "", _verdict_line(s, markdown=True), ""]
        out.append("| " + " | ".join(h for h, _ in columns) + " |")
        out.append("|" + "|".join("---" for _ in columns) + "|")
        for row in rows:
            out.append("| " + " | ".join(_md_cell(str(cell(row))) for _, cell in columns) + " |")
        out += ["", f"Method: {s.verdict.method}.", ""]
        if s.name in runs:
            out += [f"Runs in MLflow, best first: <{runs[s.name]}>", ""]
        if s.name in compare:
            out += [f"Compare in MLflow: <{compare[s.name]}>", ""]
    if links and not stage:
        from steel_seg.tracking import experiment_runs_url

        out += [f"All runs: <{experiment_runs_url(results.experiment_id)}>", ""]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_csv(results: PipelineResults, stage: str | None = None) -> str:
    """Machine-readable rows (fractions, not %), one per variant; all stages unless `stage`."""
    stages = [results.stage(stage)] if stage else results.stages
    header = [
        "stage", "variant", "arch", "backbone", "epochs", "resolution", "batch_size", "learning_rate", "loss",
        "augment", "defect_free", "tta", "miou_mean", "miou_std", "miou_n", "miou_ci95", "miou_seeds",
        *[f"iou_{c}" for c in results.class_names], "kaggle_dice", "ms_per_image", "reference_miou",
        "status", "error", "winner", "resolved", "p_vs_best", "run_ids",
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for s in stages:
        for r in stage_table(results, s):
            writer.writerow([
                s.name, r.variant, r.arch, r.backbone, r.epochs, r.resolution, r.batch_size, r.learning_rate, r.loss,
                r.augment, r.defect_free, r.tta, _num(r.miou.mean), _num(r.miou.std), r.miou.n, _num(r.miou.ci95),
                " ".join(f"{v:.6g}" for v in r.seed_values),
                *[_num(r.iou.get(c)) for c in results.class_names], _num(r.kaggle_dice), _num(r.ms_per_image),
                _num(r.reference_miou), r.status, r.error, str(r.winner).lower(),
                str(r.resolved).lower() if r.winner else "", _num(r.p_vs_best), " ".join(r.run_ids),
            ])
    return buffer.getvalue()


def _num(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def render_terminal(results: PipelineResults, stage: str | None = None) -> str:
    """Aligned text tables for the terminal (numbers right-aligned), one per stage."""
    stages = [results.stage(stage)] if stage else results.stages
    out = []
    for s in stages:
        columns = _columns(results, s)
        cells = [[str(cell(r)).replace("*", "") for _, cell in columns] for r in stage_table(results, s)]
        headers = [h for h, _ in columns]
        widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
        numeric = [all(_looks_numeric(row[i]) for row in cells) if cells else False for i in range(len(headers))]

        def line(values):
            return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

        out += [_stage_heading(results, s), "  " + _verdict_line(s, markdown=False), ""]
        out.append(line(headers))
        out.append("  ".join("-" * w for w in widths))
        out += [line(row) for row in cells]
        out.append("")
    return "\n".join(out)


def _looks_numeric(text: str) -> bool:
    return bool(re.match(r"^[-—0-9.]", text)) if text else True


def _provenance(results: PipelineResults) -> str:
    seeds = ", ".join(str(s) for s in results.seeds) or "?"
    text = (
        f"Pipeline run `{results.parent_run_id}` in experiment `{results.experiment_name}` "
        f"(id {results.experiment_id}); seeds {seeds}; metric `{results.metric}`, shown in %."
    )
    if results.demo_data:
        text += (
            " These runs trained on the synthetic demo data: the seed study's figures are on real Severstal"
            " data, so numbers are not comparable; the verdicts test its claims on this data only."
        )
    return text


# ---------------------------------------------------------------------------------------------
# Links into MLflow's UI


def stage_links(results: PipelineResults, host: str | None = None) -> dict[str, str]:
    """Per stage, MLflow's side-by-side comparison of its FINISHED variant runs."""
    from steel_seg.tracking import UI_HOST, compare_runs_url

    links = {}
    for s in results.stages:
        run_ids = [r.run_id for v in s.variants for r in v.runs if r.finished]
        if run_ids:
            links[s.name] = compare_runs_url(run_ids, [results.experiment_id], host or UI_HOST)
    return links


def stage_runs_links(results: PipelineResults, host: str | None = None) -> dict[str, str]:
    """Per stage, the runs table filtered to its variant runs (failed ones too), best mIoU first."""
    from steel_seg.tracking import UI_HOST, child_runs_url

    return {
        s.name: child_runs_url(results.experiment_id, s.run_id, results.metric, host or UI_HOST)
        for s in results.stages if s.run_id
    }


def experiment_link(results: PipelineResults, host: str | None = None) -> str:
    """The experiment's runs table in the training view; nested runs expand under the pipeline run."""
    from steel_seg.tracking import UI_HOST, experiment_runs_url

    return experiment_runs_url(results.experiment_id, host or UI_HOST)


def render_links(results: PipelineResults, host: str | None = None) -> str:
    lines = [f"MLflow (start it with: mlflow ui --backend-store-uri {results.uri})",
             f"  all runs: {experiment_link(results, host)}"]
    compare, runs = stage_links(results, host), stage_runs_links(results, host)
    for s in results.stages:
        if s.name in runs:
            lines.append(f"  {s.name} runs, best {results.metric} first: {runs[s.name]}")
        if s.name in compare:
            lines.append(f"  compare {s.name}: {compare[s.name]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reproduction report


@dataclass
class ClaimCheck:
    conclusion: Conclusion
    better_label: str
    worse_label: str
    better: Summary
    worse: Summary
    p: float | None
    verdict: str  # supports | contradicts | cannot resolve
    why: str


def side_values(results: PipelineResults, ref: str) -> tuple[str, list[float]]:
    """'STAGE.VARIANT' or 'best_of(STAGE)' -> (label, per-seed values of the metric)."""
    ref = ref.strip()
    match = BEST_OF.match(ref)
    if match:
        stage = results.stage(match["stage"].strip())
        winner = stage.verdict.winner
        if winner is None:
            raise KeyError(f"{ref}: stage {stage.name!r} has no winner ({stage.verdict.reason})")
        label = f"{ref} = {winner}" + ("" if stage.verdict.resolved else " (not resolved)")
        return label, stage.variant(winner).values(results.metric)
    stage_name, dot, variant = ref.rpartition(".")
    if not dot:
        raise KeyError(f"{ref!r} is neither STAGE.VARIANT nor best_of(STAGE)")
    return ref, results.stage(stage_name).variant(variant).values(results.metric)


def check_conclusion(results: PipelineResults, conclusion: Conclusion) -> ClaimCheck:
    """supports / contradicts when Welch's test separates the two sides (p <= alpha); else cannot resolve."""
    try:
        better_label, better = side_values(results, conclusion.better)
        worse_label, worse = side_values(results, conclusion.worse)
    except KeyError as exc:
        reason = exc.args[0] if exc.args else str(exc)
        empty = summarize([])
        return ClaimCheck(conclusion, conclusion.better, conclusion.worse, empty, empty, None, "cannot resolve", str(reason))
    b, w = summarize(better), summarize(worse)
    p = welch_p(better, worse)
    if b.n == 0 or w.n == 0:
        missing = better_label if b.n == 0 else worse_label
        verdict, why = "cannot resolve", f"no finished run of {missing}"
    elif p is None:
        why = "single runs cannot be resolved (n=1)" if min(b.n, w.n) < 2 else "identical scores on every seed"
        verdict = "cannot resolve"
    elif p > results.alpha:
        verdict, why = "cannot resolve", f"difference {100 * (b.mean - w.mean):+.1f} points is within noise (p = {p:.2g} > {results.alpha:g})"
    elif b.mean > w.mean:
        verdict, why = "supports", f"{100 * (b.mean - w.mean):+.1f} points, p = {p:.2g}"
    else:
        verdict, why = "contradicts", f"{100 * (b.mean - w.mean):+.1f} points, p = {p:.2g}"
    return ClaimCheck(conclusion, better_label, worse_label, b, w, p, verdict, why)


def reproduction_report(results: PipelineResults) -> str:
    """Markdown: the seed study's published mIoU beside ours, then each of its conclusions with
    our verdict (supports / contradicts / cannot resolve)."""
    out = [f"# Reproduction report: {results.name}", "", _provenance(results), "",
           "## Published mIoU beside ours", ""]
    rows = [(s, v) for s in results.stages for v in s.variants if v.reference_miou is not None]
    if rows:
        out += ["| stage | variant | seed study mIoU % | ours mIoU % (mean ± std, n) | difference | status |",
                "|---|---|---|---|---|---|"]
        for s, v in rows:
            ours = summarize(v.values(results.metric))
            diff = "—" if ours.n == 0 else f"{100 * (ours.mean - v.reference_miou):+.1f}"
            status, _ = _status(v)
            out.append(f"| {s.name} | {v.name} | {100 * v.reference_miou:.2f} | {ours.format(100, 1)} | {diff} | {status} |")
    else:
        out.append("No variant of this pipeline names a published mIoU (`reference_miou`).")
    out += ["", "## The seed study's conclusions", ""]
    if results.conclusions:
        out += ["| claim | better | worse | ours: better | ours: worse | p | verdict | why |",
                "|---|---|---|---|---|---|---|---|"]
        for c in results.conclusions:
            check = check_conclusion(results, c)
            p = "—" if check.p is None else f"{check.p:.2g}"
            out.append(
                f"| {_md_cell(c.claim)} | {_md_cell(check.better_label)} | {_md_cell(check.worse_label)} | "
                f"{check.better.format(100, 1)} | {check.worse.format(100, 1)} | {p} | *{check.verdict}* | {_md_cell(check.why)} |"
            )
    else:
        out.append("pipeline.json lists no conclusions to check.")
    out += ["", f"Method: Welch's t-test (two-sided, unequal variances) on the per-seed `{results.metric}`; "
            f"*supports* / *contradicts* when p <= {results.alpha:g}, *cannot resolve* when p > {results.alpha:g} "
            "or either side has fewer than 2 finished seeds. `best_of(STAGE)` is that stage's highest mean.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Logging back to the parent run


def stage_figure(results: PipelineResults, stage: str | StageResult):
    """The stage's bar chart: mean mIoU per variant (%), std error bars, seeds, published values."""
    from steel_seg.plots import stage_bar_chart

    stage = results.stage(stage) if isinstance(stage, str) else stage
    rows = stage_table(results, stage)
    return stage_bar_chart(
        [r.variant for r in rows],
        [100 * r.miou.mean for r in rows],
        [100 * r.miou.std for r in rows],
        seeds=[[100 * v for v in r.seed_values] for r in rows],
        references=[None if r.reference_miou is None else 100 * r.reference_miou for r in rows],
        winner=stage.verdict.winner,
        resolved=stage.verdict.resolved,
        title=f"{stage.name}: {results.metric}",
    )


def result_artifacts(results: PipelineResults) -> tuple[dict[str, str], dict[str, object]]:
    """({artifact path: text}, {artifact path: figure}) as log_results writes them."""
    texts, figures = {}, {}
    for s in results.stages:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", s.name)
        texts[f"results/{safe}.md"] = render_markdown(results, s.name)
        texts[f"results/{safe}.csv"] = render_csv(results, s.name)
        figures[f"plots/{safe}.png"] = stage_figure(results, s)
    texts["results/all_stages.md"] = render_markdown(results)
    texts["results/all_stages.csv"] = render_csv(results)
    texts["reproduction_report.md"] = reproduction_report(results)
    return texts, figures


def log_results(uri: str | None, parent_run_id: str | None, results: PipelineResults) -> list[str]:
    """Log the per-stage tables (Markdown, CSV), all stages, the reproduction report and a bar
    chart per stage to the parent run; returns the artifact paths written."""
    from steel_seg.tracking import log_to_run

    texts, figures = result_artifacts(results)
    log_to_run(uri or results.uri, parent_run_id or results.parent_run_id, texts, figures)
    return sorted([*texts, *figures])


def report_after_run(uri: str | None, parent_run_id: str, host: str | None = None) -> str:
    """What `steel_seg.run pipeline.yaml` prints at the end: tables, links and the reproduction
    report, read back from MLflow as `steel_seg.compare` does; also logged to the parent run, and
    each stage run is tagged with the link to its comparison."""
    from steel_seg.tracking import log_to_run

    results = load_results(uri, parent_run_id=parent_run_id)
    written = log_results(uri, parent_run_id, results)
    links = stage_links(results, host)
    for s in results.stages:
        if s.run_id and s.name in links:
            log_to_run(results.uri, s.run_id, tags={"compare_url": links[s.name]})
    return "\n".join([
        render_terminal(results), render_links(results, host), "", reproduction_report(results), "",
        f"logged to pipeline run {results.parent_run_id}: {', '.join(written)}",
    ])
