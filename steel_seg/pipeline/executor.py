"""Running a pipeline plan: stage by stage, winners feeding later stages, one MLflow tree.

Layout: one parent run per invocation, a child run per stage, a nested run per variant and
seed. A variant whose resolved config and data already have a FINISHED run is reused (a copy
tagged `steel_seg.reused_from` keeps the tree complete); a crashed or killed one is resumed
from its last checkpoint; runs left RUNNING by a dead process are marked KILLED first.
Independent variants of a stage run in parallel: in worker processes of this machine
(`LocalExecutor`, `workers > 1`) or as tasks on a Ray cluster (`ray_executor.RayExecutor`);
stages run in order, so a `best_of` always sees the finished stage it names.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from steel_seg.config import ExperimentConfig, dump_config
from steel_seg.config.loader import RawConfig
from steel_seg.pipeline import plan as planning

log = logging.getLogger(__name__)


class ExecutorError(ValueError):
    """The pipeline cannot run on the chosen executor (missing package, unshared store or data)."""


@dataclass
class Job:
    stage: str
    variant: str
    seed: int
    config: ExperimentConfig
    overrides: list[str] = field(default_factory=list)
    """The settings that win over the config's demo_profile, as `--set` does for one experiment."""
    evaluate_only: bool = False
    checkpoint_run: str | None = None
    """For evaluate-only stages: the run whose best checkpoint is scored."""


@dataclass
class VariantOutcome:
    stage: str
    variant: str
    seed: int
    status: str  # trained | resumed | reused | evaluated | failed | skipped
    run_id: str | None = None
    origin_run_id: str | None = None
    """The run holding the artifacts (checkpoint): for a reused run, the original."""
    score: float | None = None
    error: str | None = None
    config: ExperimentConfig | None = None


@dataclass
class StageOutcome:
    name: str
    run_id: str | None
    outcomes: list[VariantOutcome] = field(default_factory=list)
    winner: str | None = None
    resolved: bool = False
    method: str = ""

    def scores(self) -> dict[str, list[float]]:
        per: dict[str, list[float]] = {}
        for o in self.outcomes:
            if o.score is not None:
                per.setdefault(o.variant, []).append(o.score)
        return per


@dataclass
class PipelineOutcome:
    parent_run_id: str | None
    experiment_id: str | None
    stages: list[StageOutcome]
    tracking_uri: str

    @property
    def failed(self) -> list[VariantOutcome]:
        return [o for s in self.stages for o in s.outcomes if o.status in ("failed", "skipped")]


# ---------------------------------------------------------------------------------------------
# Jobs, in this process or in a worker


def _worker_init(threads: int, gpus: int, counter) -> None:
    """Give each worker process its share of the machine, before it imports Paddle: CPU threads
    split between workers, or one GPU each (worker i gets GPU i mod count; not tested here: no GPU)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if gpus:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)


def run_job(job_data: dict) -> dict:
    """Run one variant (train, resume or evaluate); returns a plain dict (crosses processes)."""
    from steel_seg.config import validate_experiment

    if job_data.get("omp_threads"):  # a Ray task: its share of the CPUs, before Paddle loads
        os.environ["OMP_NUM_THREADS"] = str(job_data["omp_threads"])
    resume = job_data.get("resume")
    if resume and not (Path(resume) / "last.pdckpt").is_file():
        resume = None  # the crashed run's checkpoint is on another machine: train afresh
    try:
        config = validate_experiment(RawConfig(job_data["config"]), source=job_data["name"])
        tags = job_data["tags"]
        if job_data["evaluate_only"]:
            from steel_seg.experiment import evaluate_checkpoint
            from steel_seg.tracking import download_artifact
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = download_artifact(config.tracking.uri, job_data["checkpoint_run"], "checkpoints/best.pdparams", Path(tmp))
                result = evaluate_checkpoint(config, checkpoint, progress=job_data["progress"],
                                             parent_run_id=job_data["parent"], tags=tags, overrides=job_data["overrides"])
        else:
            from steel_seg.experiment import run_experiment

            result = run_experiment(config, resume=resume, progress=job_data["progress"],
                                    parent_run_id=job_data["parent"], overrides=job_data["overrides"], tags=tags)
        return {"run_id": result.run_id, "scores": {"miou": result.scores["miou"]}, "summary": result.summary}
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported as this variant's failure; the others go on
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


# ---------------------------------------------------------------------------------------------
# Where jobs run


class LocalExecutor:
    """A stage's jobs in this process, or in `workers` processes of this machine."""

    name = "local"
    local = True

    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)

    @property
    def parallel(self) -> bool:
        return self.workers > 1

    def check(self, pipeline, configs: list[ExperimentConfig]) -> None:
        """Nothing to check: the store and the data are this machine's."""

    def job_settings(self, stage) -> dict:
        return {"threads": max(1, (os.cpu_count() or 1) // self.workers)}

    def run(self, pending: list[tuple[Job, dict]]) -> list[tuple[Job, dict, dict]]:
        if self.workers == 1 or len(pending) <= 1:
            return [(job, data, run_job(data)) for job, data in pending]
        import multiprocessing

        results = []
        context = multiprocessing.get_context("spawn")  # Paddle does not survive fork
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_init,
                                 initargs=(pending[0][1]["threads"], _gpu_count(), context.Value("i", 0))) as pool:
            futures = {pool.submit(run_job, data): (job, data) for job, data in pending}
            for future in as_completed(futures):
                job, data = futures[future]
                try:
                    results.append((job, data, future.result()))
                except Exception as exc:  # noqa: BLE001 - a worker that died is this variant's failure
                    results.append((job, data, {"error": f"worker process died: {type(exc).__name__}: {exc}"}))
        return results


# ---------------------------------------------------------------------------------------------
# The runner


class PipelineRunner:
    def __init__(self, pipeline, *, workers: int = 1, force: bool = False, progress: bool = True, executor=None):
        self.pipeline = pipeline  # the command line's --set is in pipeline.overrides
        self.executor = executor or LocalExecutor(workers)
        self.force = force
        self.progress = progress and not self.executor.parallel
        self.winners: dict[str, tuple[str, dict[int, VariantOutcome]]] = {}
        self.results: dict[str, dict[str, dict[int, VariantOutcome]]] = {}
        self._fingerprints: dict[str, str] = {}

    # -- configs -----------------------------------------------------------------------------

    def _reference(self, ref, seed: int) -> VariantOutcome | None:
        """The outcome a `from:` reference points at for `seed` (a winner, or a fixed variant)."""
        if ref is None:
            return None
        if ref.kind == "best_of":
            contenders = [self.winners[s] for s in ref.stages if s in self.winners]
            if len(contenders) != len(ref.stages):
                return None
            best = max(contenders, key=lambda w: _mean(o.score for o in w[1].values()))
            return best[1].get(seed) or next(iter(best[1].values()))
        by_seed = self.results.get(ref.stages[0], {}).get(ref.variant, {})
        done = [o for o in by_seed.values() if o.score is not None]
        return by_seed[seed] if seed in by_seed and by_seed[seed].score is not None else (done[0] if done else None)

    def jobs_for(self, stage) -> tuple[list[Job], list[VariantOutcome]]:
        jobs, blocked = [], []
        for variant in stage.variants:
            ref = variant.from_
            for seed in self.pipeline.seeds:
                base = self._reference(ref, seed)
                if ref is not None and base is None:
                    blocked.append(VariantOutcome(stage.name, variant.name, seed, "skipped",
                                                  error=f"needs {ref.text}, which has no finished run"))
                    continue
                config = planning.resolve_variant(self.pipeline, variant, seed, base.config if base else None)
                overrides = planning.run_overrides(self.pipeline, variant, seed)
                checkpoint_run = base.origin_run_id if stage.evaluate_only and base else None
                jobs.append(Job(stage.name, variant.name, seed, config, overrides, stage.evaluate_only, checkpoint_run))
        return jobs, blocked

    # -- reuse -------------------------------------------------------------------------------

    @staticmethod
    def _effective(job: Job) -> ExperimentConfig:
        """The config the run records (and hashes): with its demo_profile merged on demo data."""
        from steel_seg.data.prepare import resolve_source
        from steel_seg.experiment import with_demo_profile

        _, is_demo = resolve_source(job.config.data)
        return with_demo_profile(job.config, job.overrides) if is_demo and job.config.demo_profile else job.config

    def _fingerprint(self, config: ExperimentConfig) -> str | None:
        """The prepared data's cache key, or None when the data cannot be prepared: that variant
        then runs and fails inside its own MLflow run, with the reason, and the others go on."""
        from steel_seg.data.prepare import prepare_data

        key = json.dumps(config.data.model_dump(mode="json"), sort_keys=True)
        if key not in self._fingerprints:
            try:
                self._fingerprints[key] = prepare_data(config.data, progress=self.progress).cache.directory.name
            except Exception as exc:  # noqa: BLE001 - reported by the variant's own run
                log.warning("cannot prepare the data of %s: %s", config.name, exc)
                self._fingerprints[key] = None
        return self._fingerprints[key]

    def previous_run(self, job: Job, statuses=("FINISHED",)):
        """A run of the same resolved config on the same data (and, evaluating, the same
        checkpoint), or None; always None with `force`."""
        from steel_seg.experiment import config_hash
        from steel_seg.tracking import runs_with_config

        if self.force:
            return None
        effective = self._effective(job)
        fingerprint = self._fingerprint(effective)
        if fingerprint is None:
            return None
        want = {"data_fingerprint": fingerprint, "steel_seg.checkpoint_run": job.checkpoint_run or ""}
        for run in runs_with_config(effective.tracking.uri, effective.tracking.experiment, config_hash(effective), statuses):
            if all(run.data.tags.get(k, "") == v for k, v in want.items()):
                return run
        return None

    # -- running -----------------------------------------------------------------------------

    def _tags(self, job: Job) -> dict[str, str]:
        return {"steel_seg.role": "variant", "steel_seg.pipeline": self.pipeline.name, "stage": job.stage,
                "variant": job.variant, "seed": str(job.seed), "steel_seg.checkpoint_run": job.checkpoint_run or ""}

    def _job_data(self, job: Job, stage, parent: str, resume: str | None) -> dict:
        return {
            "name": job.config.name, "config": job.config.model_dump(mode="json"), "tags": self._tags(job), "parent": parent,
            "overrides": job.overrides, "progress": self.progress, "evaluate_only": job.evaluate_only,
            "checkpoint_run": job.checkpoint_run, "resume": resume, **self.executor.job_settings(stage),
        }

    def run_stage(self, stage, stage_tracker) -> StageOutcome:
        """Run (or reuse) every variant and seed of `stage` under its stage run; decide the winner."""
        from steel_seg.tracking import copy_run

        outcome = StageOutcome(stage.name, stage_tracker.run_id)
        jobs, blocked = self.jobs_for(stage)
        outcome.outcomes += blocked
        pending = []
        for job in jobs:
            done = self.previous_run(job)
            if done is not None:
                run_id = copy_run(job.config.tracking.uri, done.info.run_id, stage_tracker.run_id, str(job.config.name), self._tags(job))
                outcome.outcomes.append(VariantOutcome(job.stage, job.variant, job.seed, "reused", run_id, done.info.run_id,
                                                       done.data.metrics.get(self.pipeline.metric), config=job.config))
                continue
            resume = None
            if not job.evaluate_only:
                broken = self.previous_run(job, statuses=("FAILED", "KILLED"))
                out_dir = Path(broken.data.tags.get("output_dir", "")) if broken is not None else None
                if out_dir is not None and (out_dir / "last.pdckpt").is_file():
                    resume = str(out_dir)
            pending.append((job, self._job_data(job, stage, stage_tracker.run_id, resume)))
        for job, data, result in self.executor.run(pending):
            if "error" in result:
                log.error("%s.%s seed %d failed: %s", job.stage, job.variant, job.seed, result["error"])
                outcome.outcomes.append(VariantOutcome(job.stage, job.variant, job.seed, "failed", error=result["error"], config=job.config))
                continue
            status = "evaluated" if job.evaluate_only else ("resumed" if data["resume"] else "trained")
            score = _logged_metric(job.config, result["run_id"], self.pipeline.metric)
            outcome.outcomes.append(VariantOutcome(job.stage, job.variant, job.seed, status, result["run_id"], result["run_id"], score, config=job.config))
        self._decide(stage, outcome)
        stage_tracker.set_tags({"winner": outcome.winner or "none", "winner_resolved": str(outcome.resolved).lower()})
        return outcome

    def _decide(self, stage, outcome: StageOutcome) -> None:
        from steel_seg.pipeline.stats import stage_verdict

        by_variant: dict[str, dict[int, VariantOutcome]] = {}
        for o in outcome.outcomes:
            if o.score is not None:
                by_variant.setdefault(o.variant, {})[o.seed] = o
        self.results[stage.name] = by_variant
        if not by_variant:
            return
        verdict = stage_verdict({v: [o.score for o in seeds.values()] for v, seeds in by_variant.items()})
        outcome.winner, outcome.resolved, outcome.method = verdict.winner, verdict.resolved, verdict.method
        self.winners[stage.name] = (verdict.winner, by_variant[verdict.winner])


def _gpu_count() -> int:
    """GPUs the workers can share (0 on a CPU-only Paddle)."""
    from steel_seg.deploy.backends import paddle_has_gpu

    if not paddle_has_gpu():
        return 0
    import paddle

    return paddle.device.cuda.device_count()


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("-inf")


def _logged_metric(config, run_id: str, metric: str) -> float | None:
    from steel_seg.tracking import run_metric

    return run_metric(config.tracking.uri, run_id, metric)


# ---------------------------------------------------------------------------------------------
# One invocation


def _tracking_of(pipeline) -> tuple[str, str]:
    """(tracking uri, experiment) of the pipeline: those of its first variant's config."""
    from steel_seg.tracking import resolve_tracking_uri

    stage = pipeline.stages[0]
    config = planning.resolve_variant(pipeline, stage.variants[0], pipeline.seeds[0])
    return resolve_tracking_uri(config.tracking.uri), config.tracking.experiment


def run_pipeline(pipeline, *, workers: int = 1, force: bool = False, progress: bool = True, check: bool = True,
                 executor=None) -> PipelineOutcome:
    """Run every stage in order under one parent MLflow run; returns what happened to each variant.

    A failing variant is recorded and the rest go on; a stage whose variants all failed leaves
    the stages that inherit from it skipped, with the reason. `executor` runs each stage's jobs
    (default: `LocalExecutor(workers)`); it checks first that it can run every variant.
    """
    from steel_seg.tracking import RunTracker, reap_dead_runs

    if check:  # the CLI has checked already, before its dry run
        planning.check_pipeline(pipeline)
    executor = executor or LocalExecutor(workers)
    uri, experiment = _tracking_of(pipeline)
    executor.check(pipeline, list(planning.stand_in_configs(pipeline).values()))  # before any run exists
    runner = PipelineRunner(pipeline, force=force, progress=progress, executor=executor)
    parent = RunTracker(uri, experiment, pipeline.name, {"steel_seg.role": "pipeline", "steel_seg.pipeline": pipeline.name})
    parent.start()
    dead = reap_dead_runs(uri, parent.experiment_id)
    if dead:
        log.warning("marked %d run(s) KILLED whose process had died: %s", len(dead), ", ".join(dead))
    stages: list[StageOutcome] = []
    with parent:
        parent.log_dict(planning.summary_dict(pipeline), "pipeline.json")
        if pipeline.path is not None and Path(pipeline.path).is_file():
            parent.log_text(Path(pipeline.path).read_text(), "pipeline.yaml")
        parent.log_params({"pipeline.executor": executor.name, "pipeline.workers": getattr(executor, "workers", 1), "pipeline.seeds": json.dumps(pipeline.seeds), "pipeline.metric": pipeline.metric,
                           "pipeline.overrides": json.dumps(list(pipeline.overrides))})
        for stage in pipeline.stages:
            stage_tracker = RunTracker(uri, experiment, f"{pipeline.name}/{stage.name}",
                                       {"steel_seg.role": "stage", "steel_seg.pipeline": pipeline.name,
                                        "stage": stage.name, "stage_index": str(stage.index)})
            stage_tracker.start(parent_run_id=parent.run_id)
            with stage_tracker:
                outcome = runner.run_stage(stage, stage_tracker)
            stages.append(outcome)
            log.info("stage %s: winner %s%s", stage.name, outcome.winner, "" if outcome.resolved else " (not resolved)")
        result = PipelineOutcome(parent.run_id, parent.experiment_id, stages, uri)
        failed = result.failed
        parent.set_tags({"failed_variants": str(len(failed))})
    return result


def outcome_text(outcome: PipelineOutcome) -> str:
    """What ran, what was reused, what failed, and each stage's winner."""
    lines = []
    for stage in outcome.stages:
        verdict = f"winner {stage.winner}" + ("" if stage.resolved else " (not resolved)") if stage.winner else "no winner"
        lines.append(f"stage {stage.name}: {verdict}")
        for o in sorted(stage.outcomes, key=lambda o: (o.variant, o.seed)):
            score = f"{o.score:.4f}" if o.score is not None else "-"
            extra = f"  {o.error}" if o.error else ""
            lines.append(f"  {o.variant:<28} seed {o.seed:<3} {o.status:<9} {score:>7}  {o.run_id or ''}{extra}")
    return "\n".join(lines)


def preview_reuse(pipeline, force: bool = False) -> dict[tuple[str, str, int], str]:
    """(stage, variant, seed) -> FINISHED run that a real invocation would reuse, for --dry-run.

    Stages are followed while every variant is reusable (their stored scores decide the
    winners); past the first stage that must run, later configs are unknown until run time.
    """
    runner = PipelineRunner(pipeline, force=force, progress=False)
    reused: dict[tuple[str, str, int], str] = {}
    if force:
        return reused
    for stage in pipeline.stages:
        jobs, blocked = runner.jobs_for(stage)
        if blocked:
            break
        outcome = StageOutcome(stage.name, None)
        for job in jobs:
            done = runner.previous_run(job)
            if done is None:
                continue
            reused[(job.stage, job.variant, job.seed)] = done.info.run_id
            outcome.outcomes.append(VariantOutcome(job.stage, job.variant, job.seed, "reused", done.info.run_id, done.info.run_id,
                                                   done.data.metrics.get(pipeline.metric), config=job.config))
        if len(outcome.outcomes) < len(jobs):
            break
        runner._decide(stage, outcome)
    return reused
