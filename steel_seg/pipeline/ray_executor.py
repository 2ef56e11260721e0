"""A stage's variants as Ray tasks (`python -m steel_seg.run pipeline.yaml --executor ray`).

Each task asks for the pipeline's `resources:` (CPUs, GPUs, memory); Ray places it on a node
that has them and sets CUDA_VISIBLE_DEVICES for it. Workers share nothing but the MLflow
tracking server (runs, checkpoints and plots go through it) and the data, which must be at the
same `data.root` on every node; both are checked before the first task trains. A task that
fails is retried once, then reported as the variant's failure.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from steel_seg.pipeline.executor import ExecutorError, Job, run_job

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[cluster]"  (or: pip install "ray>=2.40,<3")'
ATTEMPTS = 2  # a failed task is retried once
GIB = 1024**3


def import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


def _roots_on_this_node(roots: list[str]) -> tuple[str, list[str]]:
    """(host name, the roots missing on it): runs as a task on every node."""
    return socket.gethostname(), [root for root in roots if not Path(root).exists()]


class RayExecutor:
    """Runs each stage's jobs as Ray tasks on the cluster at `address` (None: a local Ray here,
    or the one this process already joined with ray.init)."""

    name = "ray"
    local = False
    parallel = True

    def __init__(self, address: str | None = None):
        self.ray = import_ray()
        self.address = address
        self.pipeline = None

    def _connect(self) -> None:
        if not self.ray.is_initialized():
            self.ray.init(address=self.address, logging_level=logging.WARNING)

    # -- before anything runs --------------------------------------------------------------

    def check(self, pipeline, configs) -> None:
        """Refuse a store the workers cannot share; check the data exists on every node."""
        from steel_seg.tracking import local_store_problem, resolve_tracking_uri

        for config in configs:
            problem = local_store_problem(resolve_tracking_uri(config.tracking.uri))
            if problem:
                raise ExecutorError(f"--executor ray: {problem}")
        self.pipeline = pipeline
        self._connect()
        self._check_resources(pipeline)
        # A root missing here falls back to the demo data everywhere; one that exists here but
        # not on a worker would silently train that worker on the demo data instead.
        roots = sorted({str(Path(c.data.root).resolve()) for c in configs if c.data.root is not None and Path(c.data.root).exists()})
        if roots:
            self._check_roots(roots)

    def _check_resources(self, pipeline) -> None:
        total = self.ray.cluster_resources()
        for stage in pipeline.stages:
            wants = pipeline.stage_resources(stage)
            for key, have in (("cpus", total.get("CPU", 0)), ("gpus", total.get("GPU", 0)), ("memory_gb", total.get("memory", 0) / GIB)):
                if wants.get(key, 0) > have:
                    raise ExecutorError(
                        f"stage `{stage.name}` asks each task for resources.{key}={wants[key]:g}, but the Ray cluster has "
                        f"{have:g} in all; lower `resources:` in the pipeline file or add nodes"
                    )

    def _check_roots(self, roots: list[str]) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = self.ray.remote(num_cpus=0)(_roots_on_this_node)
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        answers = self.ray.get([
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(roots)
            for n in nodes
        ])
        missing = [f"{', '.join(gone)} on {host}" for host, gone in answers if gone]
        if missing:
            raise ExecutorError(
                f"data.root is missing on Ray worker node(s): {'; '.join(missing)}. Every node needs the data at the same "
                "path (a shared disk, or a copy on each)"
            )

    # -- running -------------------------------------------------------------------------------

    def job_settings(self, stage) -> dict:
        resources = self.pipeline.stage_resources(stage) if self.pipeline else {"cpus": 1.0, "gpus": 0.0}
        return {"resources": resources, "omp_threads": max(1, int(resources.get("cpus", 1)))}

    def _options(self, resources: dict[str, float]) -> dict:
        options = {"num_cpus": resources.get("cpus", 1.0), "num_gpus": resources.get("gpus", 0.0)}
        if resources.get("memory_gb"):
            options["memory"] = int(resources["memory_gb"] * GIB)
        return options

    def run(self, pending: list[tuple[Job, dict]]) -> list[tuple[Job, dict, dict]]:
        """Submit every job, collect them as they finish, resubmit a failed one once."""
        if not pending:
            return []
        self._connect()
        # A fresh worker process per task: Paddle keeps the GPU it first saw, and its memory.
        task = self.ray.remote(max_calls=1, max_retries=0)(run_job)
        running = {}

        def submit(job: Job, data: dict, attempt: int) -> None:
            data = {**data, "tags": {**data["tags"], "steel_seg.attempt": str(attempt)}}
            running[task.options(**self._options(data["resources"])).remote(data)] = (job, data, attempt)

        for job, data in pending:
            submit(job, data, 1)
        results = []
        while running:
            done, _ = self.ray.wait(list(running), num_returns=1)
            job, data, attempt = running.pop(done[0])
            try:
                result = self.ray.get(done[0])
            except self.ray.exceptions.RayError as exc:  # the worker or its node died
                result = {"error": f"Ray task failed: {type(exc).__name__}: {exc}"}
            if "error" in result and attempt < ATTEMPTS:
                log.warning("%s.%s seed %d failed (attempt %d), retrying once: %s", job.stage, job.variant, job.seed,
                            attempt, result["error"])
                submit(job, data, attempt + 1)
                continue
            if "error" in result and attempt > 1:
                result = {**result, "error": f"failed twice (retried once): {result['error']}"}
            results.append((job, data, result))
        return results
