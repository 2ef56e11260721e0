"""MLflow tracking: the only module that imports mlflow; the experiment reports runs through it.

Everything goes through `MlflowClient`, never the fluent `mlflow.start_run` stack: the client has
no process-wide "active run", so nested runs and several trackers in one process cannot leak or
end each other's runs, and `mlflow.active_run()` stays None.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import sys
import time
import warnings
from numbers import Number
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

MAX_FAILURE_REASON = 5000
UI_HOST = "http://127.0.0.1:5000"
# MLflow 3.17's UI opens experiments on its GenAI page unless the hash carries this.
TRAINING_VIEW = "?workflowType=machine_learning"


# ---------------------------------------------------------------------------------------------
# Where the runs go


def resolve_tracking_uri(configured: str | None = None) -> str:
    """configured (tracking.uri in the YAML) > $MLFLOW_TRACKING_URI > sqlite:///<cwd>/mlflow.db.

    The default is an absolute path so that the summary printed at the end of a run names the
    exact database, wherever the user later opens the UI from.
    """
    if configured:
        return configured
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///…` URI (absolute), or None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    # SQLAlchemy form: sqlite:///relative.db, sqlite:////absolute.db; drop any ?query.
    raw = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    if raw in ("", ":memory:"):
        return None
    return Path(raw).expanduser().resolve()


def local_store_problem(uri: str) -> str | None:
    """Why workers on other machines could not share this store (a sqlite file or a local
    folder), or None when it is a server or a database they can reach."""
    scheme = urlparse(uri).scheme
    if scheme in ("sqlite", "file", "") or len(scheme) == 1:  # a path (C:\... on Windows)
        return (f"the MLflow store {uri} is a file on this machine, which workers elsewhere cannot share; "
                "use an MLflow tracking server: mlflow server --backend-store-uri <database> --artifacts-destination <dir> "
                "--serve-artifacts, then MLFLOW_TRACKING_URI=http://<host>:5000 (or tracking.uri)")
    return None


def artifact_root_for(uri: str) -> Path | None:
    """Where artifacts go for a local sqlite store: `mlartifacts/` beside the database file."""
    db = sqlite_path(uri)
    return None if db is None else db.parent / "mlartifacts"


def flatten_params(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.epochs": "10", "data.size": "[400, 64]"}, as MLflow wants params.

    Dicts become dotted keys so each setting is its own column in the runs table; lists are
    rendered as JSON so a run's value can be pasted back into a YAML file.
    """
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple, dict)):
            flat[name] = json.dumps(_plain(value), default=str)
        else:
            flat[name] = str(_plain(value))
    return flat


def _plain(value):
    """numpy scalars/arrays and tuples -> plain Python, so they print like YAML values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# One run


class RunTracker:
    """One MLflow run: create or resume it, log to it, and always end it (context manager).

    With enabled=False every method does nothing, so the experiment code needs no `if`s.
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        enabled: bool = True,
    ):
        self.uri = resolve_tracking_uri(uri) if enabled else uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.enabled = enabled
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._active = False

    # -- identity ---------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    def ui_url(self, host: str = UI_HOST) -> str:
        if not self._run_id:
            return ""
        return f"{host.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self._run_id}{TRAINING_VIEW}"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, resume_run_id: str | None = None, parent_run_id: str | None = None) -> "RunTracker":
        """Create the run (or reopen `resume_run_id`); `parent_run_id` nests it under another."""
        if not self.enabled or self._active:
            return self
        db = sqlite_path(self.uri)
        if db is not None:
            # SQLite cannot create the folder of its database file; do it so a fresh path works.
            db.parent.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.uri)
        if resume_run_id:
            self._resume(resume_run_id)
            if parent_run_id:  # a pipeline rerun finishing a crashed variant: it moves to this invocation
                self._client.set_tag(resume_run_id, MLFLOW_PARENT_RUN_ID, parent_run_id)
        else:
            self._experiment_id = self._experiment_id_for(self.experiment)
            tags = {
                **_process_tags(),
                MLFLOW_USER: _user(),
                MLFLOW_SOURCE_NAME: sys.argv[0] or "python",
                MLFLOW_SOURCE_TYPE: "LOCAL",
                **{k: str(v) for k, v in self.tags.items()},
            }
            if parent_run_id:
                tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            run = self._client.create_run(self._experiment_id, tags=tags, run_name=self.run_name)
            self._run_id = run.info.run_id
        self._active = True
        return self

    def _resume(self, run_id: str) -> None:
        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            raise ValueError(
                f"cannot resume MLflow run {run_id!r}: it is not in {self.uri} ({exc.message}). "
                "Check the run id (shown in the UI and in the previous run's summary) and "
                "tracking.uri / $MLFLOW_TRACKING_URI."
            ) from None
        if run.info.lifecycle_stage == "deleted":
            raise ValueError(
                f"cannot resume MLflow run {run_id!r}: it was deleted. Restore it in the MLflow UI "
                "(or MlflowClient().restore_run) or start a new run."
            )
        if run.info.status == "RUNNING":
            if process_alive(run.data.tags):
                raise ValueError(
                    f"MLflow run {run_id} is RUNNING in a live process ({_owner(run.data.tags)}); "
                    "it is not touched. Stop that process first, or start a new run."
                )
            mark_dead(self._client, run)
            run = self._client.get_run(run_id)
        self._run_id = run_id
        self._experiment_id = run.info.experiment_id
        self._client.update_run(run_id, status="RUNNING")
        self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _process_tags().items()])
        if "failure_reason" in run.data.tags:  # the interruption being resumed is over
            self._client.delete_tag(run_id, "failure_reason")
        if self.tags:
            self.set_tags(self.tags)

    def _experiment_id_for(self, name: str) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise ValueError(
                    f"MLflow experiment {name!r} (id {found.experiment_id}) was deleted but still "
                    f"exists in {self.uri}. Restore it with `mlflow experiments restore "
                    f"--experiment-id {found.experiment_id}`, or set tracking.experiment to a new name."
                )
            return found.experiment_id
        root = artifact_root_for(self.uri)
        # MLflow's default for sqlite stores is ./mlruns under whatever the current directory is;
        # keep artifacts beside the database so the two move (and get backed up) together.
        location = (root / _folder_name(name)).as_uri() if root is not None else None
        try:
            return self._client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Another process created it between our lookup and create.
            found = self._client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def finish(self) -> None:
        """End the run as FINISHED."""
        self._end("FINISHED")

    def fail(self, reason: str, status: str = "FAILED") -> None:
        """Record why the run stopped (tag `failure_reason`) and end it as FAILED or KILLED."""
        if status not in ("FAILED", "KILLED", "FINISHED"):
            raise ValueError(f"status must be FAILED, KILLED or FINISHED, got {status!r}")
        if not self._active:
            return
        if len(reason) > MAX_FAILURE_REASON:
            reason = reason[: MAX_FAILURE_REASON - 20] + " ... (truncated)"
        try:
            self._client.set_tag(self._run_id, "failure_reason", reason)
        finally:
            # Even if the tag cannot be written, do not leave the run RUNNING.
            self._end(status)

    def _end(self, status: str) -> None:
        if not self._active:
            return
        self._active = False
        self._client.set_terminated(self._run_id, status=status)

    def __enter__(self) -> "RunTracker":
        if not self._active:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish()
        else:
            reason = f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            self.fail(reason, status=status)
        return False

    # -- logging ----------------------------------------------------------------------------

    @property
    def _live(self) -> bool:
        if not self.enabled:
            return False
        if self._run_id is None:
            raise RuntimeError("RunTracker: call start() (or use `with tracker:`) before logging")
        return True

    def log_params(self, params: dict[str, object]) -> None:
        """Log (nested) params in batches; on resume, unchanged values are skipped.

        MLflow refuses to change a logged param, so a changed value is reported with its key
        before anything is written.
        """
        if not self._live:
            return
        flat = flatten_params(params)
        logged = self._client.get_run(self._run_id).data.params
        changed = [k for k, v in flat.items() if k in logged and logged[k] != v]
        if changed:
            lines = "; ".join(f"{k}: logged {logged[k]!r}, now {flat[k]!r}" for k in changed)
            raise ValueError(
                f"MLflow run {self._run_id} already has different values for {len(changed)} "
                f"param(s) ({lines}). MLflow cannot change a logged param: resume with the "
                "original config, or start a new run instead of resuming."
            )
        new = [Param(k, v) for k, v in flat.items() if k not in logged]
        self._client.log_batch(self._run_id, params=new)

    def set_tags(self, tags: dict[str, object]) -> None:
        if not self._live:
            return
        self._client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log scalar metrics at `step`; NaN values are skipped.

        NaN is a real outcome here (e.g. the IoU of a class absent from the validation set, see
        steel_seg.metrics), but MLflow's charts and comparisons handle stored NaN badly, so a
        missing point is the honest record. Infinities are logged as they are.
        """
        if not self._live:
            return
        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            number = _as_float(key, value)
            if math.isnan(number):
                continue
            batch.append(Metric(key, number, now, int(step) if step is not None else 0))
        self._client.log_batch(self._run_id, metrics=batch)

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """Copy a file, or a directory (kept under its own name), into the run's artifacts."""
        if not self._live:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cannot log artifact {path}: no such file or directory")
        self._client.log_artifact(self._run_id, str(path), artifact_path)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """Save `data` as JSON or YAML (chosen by the file extension) in the run's artifacts."""
        if not self._live:
            return
        self._client.log_dict(self._run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self._live:
            return
        self._client.log_text(self._run_id, text, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        """Save a matplotlib figure as an artifact, then close it to free its memory."""
        if self._live:
            self._client.log_figure(self._run_id, figure, artifact_file)
        _close_figure(figure)

    def log_dataset(self, records: list[dict], *, source: str, name: str, digest: str, context: str) -> None:
        """Record which samples the run used (one dict per sample) as a dataset input.

        The UI then shows name, digest and context ("train", "val") beside the run, so two runs
        can be checked to have used the same split.
        """
        if not self._live:
            return
        import pandas as pd  # only needed here; keeps `import steel_seg.tracking` light

        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and then warns that a plain path
            # "can be interpreted in multiple ways" (both the same class): noise, not a problem.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(pd.DataFrame(records), source=source, name=name, digest=digest)
        # Same entity mlflow.log_input builds, without needing a fluent active run.
        d = dataset.to_dict()
        entity = DatasetEntity(
            name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
            schema=d.get("schema"), profile=d.get("profile"),
        )
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        inputs = [DatasetInput(dataset=entity, tags=tags)]
        try:
            self._client.log_inputs(self._run_id, datasets=inputs)
        except MlflowException as exc:
            # Two runs recording the same new dataset at once (parallel workers, a shared server):
            # the store checks, then inserts, and the slower one hits the unique key. The dataset
            # exists now, so linking it again succeeds.
            if "unique" not in str(exc).lower():
                raise
            self._client.log_inputs(self._run_id, datasets=inputs)


def _as_float(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Number) and not hasattr(value, "item"):
        raise TypeError(
            f"metric {key!r} must be a single number, got {type(value).__name__} {value!r}; "
            f"log per-class values as separate metrics (e.g. '{key}/scratches')"
        )
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a single number, got {value!r}") from None


def _folder_name(experiment: str) -> str:
    """A safe folder name for an experiment: names may hold '/', '..' or spaces."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("._")
    return safe or "experiment"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def _close_figure(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Runs whose process died without a word (kill -9, power loss)

HOST_TAG, PID_TAG, PROCESS_START_TAG = "steel_seg.host", "steel_seg.pid", "steel_seg.process_start"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so a reused pid is not taken for the same process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_tags() -> dict[str, str]:
    import socket

    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PROCESS_START_TAG: _process_start(os.getpid()) or ""}


def _owner(tags: dict) -> str:
    return f"pid {tags.get(PID_TAG, '?')} on {tags.get(HOST_TAG, '?')}"


def process_alive(tags: dict) -> bool:
    """Whether the process that owns a RUNNING run still runs. A run from another host, or
    without the tags (older runs), counts as alive: we cannot tell, so we never touch it."""
    import socket

    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return True
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    recorded = tags.get(PROCESS_START_TAG)
    return not recorded or _process_start(pid) in (None, recorded)


def mark_dead(client: MlflowClient, run) -> None:
    reason = f"the process ({_owner(run.data.tags)}) died without ending the run; marked KILLED by a later process"
    client.set_tag(run.info.run_id, "failure_reason", reason)
    client.set_terminated(run.info.run_id, status="KILLED")


def fail_unfinished_run(uri: str | None, run_id: str, reason: str) -> bool:
    """End a run still RUNNING as FAILED with `reason` (its process died before it could);
    returns whether it had to. A finished, failed or killed run is left as it is."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(uri))
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return False
    client.set_tag(run_id, "failure_reason", reason[:MAX_FAILURE_REASON])
    client.set_terminated(run_id, status="FAILED")
    return True


def reap_dead_runs(uri: str | None, experiment_id: str) -> list[str]:
    """Mark RUNNING runs of this host whose process is gone as KILLED; returns their ids."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(uri))
    dead = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        if not process_alive(run.data.tags):
            mark_dead(client, run)
            dead.append(run.info.run_id)
    return dead


# ---------------------------------------------------------------------------------------------
# Reuse across pipeline invocations

REUSED_FROM_TAG = "steel_seg.reused_from"


def runs_with_config(uri: str | None, experiment: str, config_hash: str, statuses: tuple[str, ...] = ("FINISHED",)) -> list:
    """Runs of `experiment` with this resolved-config hash and a status in `statuses`, newest
    first; copies made for reuse are left out (the original is what counts)."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.config_hash = '{config_hash}'",
        order_by=["attributes.start_time DESC"], max_results=200,
    )
    return [r for r in runs if r.info.status in statuses and REUSED_FROM_TAG not in r.data.tags]


def run_status(uri: str | None, run_id: str) -> str | None:
    """FINISHED, FAILED, KILLED or RUNNING; None when the store has no such run."""
    try:
        return MlflowClient(tracking_uri=resolve_tracking_uri(uri)).get_run(run_id).info.status
    except MlflowException:
        return None


def run_metric(uri: str | None, run_id: str, metric: str) -> float | None:
    """The latest value of `metric` in a run, or None."""
    return MlflowClient(tracking_uri=resolve_tracking_uri(uri)).get_run(run_id).data.metrics.get(metric)


def copy_run(uri: str | None, source_run_id: str, parent_run_id: str, run_name: str, tags: dict[str, str]) -> str:
    """A FINISHED run under `parent_run_id` with the source run's params, tags and final metrics,
    tagged as reused from it: an invocation's layout stays complete without retraining."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(uri))
    source = client.get_run(source_run_id)
    keep = {k: v for k, v in source.data.tags.items() if not k.startswith("mlflow.")}
    run = client.create_run(
        source.info.experiment_id, run_name=run_name,
        tags={**keep, **_process_tags(), **tags, MLFLOW_PARENT_RUN_ID: parent_run_id, REUSED_FROM_TAG: source_run_id},
    )
    now = int(time.time() * 1000)
    params = [Param(k, v) for k, v in source.data.params.items()]
    metrics = [Metric(k, v, now, 0) for k, v in source.data.metrics.items()]
    for start in range(0, max(len(params), len(metrics)), 100):
        client.log_batch(run.info.run_id, params=params[start:start + 100], metrics=metrics[start:start + 100])
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


# ---------------------------------------------------------------------------------------------
# Reading back


def download_artifact(uri: str | None, run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
    """Local path of a run's artifact (e.g. the checkpoint of a run to evaluate).

    The artifact is copied into `dst` (created if needed), or into a new temporary directory.
    A missing artifact raises FileNotFoundError listing what the run does have.
    """
    uri = resolve_tracking_uri(uri)
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path,
            dst_path=str(dst) if dst is not None else None, tracking_uri=uri,
        )
    except (MlflowException, OSError) as exc:
        raise FileNotFoundError(_missing_artifact_message(uri, run_id, artifact_path, exc)) from None
    return Path(local)


def _missing_artifact_message(uri: str, run_id: str, artifact_path: str, exc: Exception) -> str:
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        return f"MLflow run {run_id!r} is not in {uri}; check the run id and tracking URI"
    try:
        names = [a.path + ("/" if a.is_dir else "") for a in client.list_artifacts(run_id)]
    except Exception:
        names = []
    listing = ", ".join(names) if names else "(none)"
    return (
        f"MLflow run {run_id} has no artifact {artifact_path!r} ({exc}). "
        f"Its top-level artifacts are: {listing}"
    )


def describe_store(uri: str | None, experiment_id: str | None = None) -> str:
    """Where the runs are and how to look at them, for the end-of-run summary."""
    uri = resolve_tracking_uri(uri)
    eid = experiment_id if experiment_id is not None else "<id>"
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        return (
            f"MLflow runs are on the tracking server {uri}\n"
            f"  open {uri.rstrip('/')}/#/experiments/{eid}/runs{TRAINING_VIEW}"
        )
    db = sqlite_path(uri)
    where = (
        f"MLflow runs are in {db} (artifacts in {artifact_root_for(uri)})"
        if db is not None else f"MLflow runs are in {uri}"
    )
    return (
        f"{where}\n"
        f"  view them: mlflow ui --backend-store-uri {uri}\n"
        f"  then open {UI_HOST}/#/experiments/{eid}/runs{TRAINING_VIEW}"
    )


# ---------------------------------------------------------------------------------------------
# Choosing a run to export


def finished_run(uri: str | None, experiment: str | None = None, metric: str = "final_val_miou", run_id: str | None = None):
    """The run to export: `run_id` (which must be FINISHED), or the FINISHED run of
    `experiment` with the highest `metric`. Errors say what exists instead."""
    uri = resolve_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ValueError(f"MLflow run {run_id!r} is not in {uri}; check the run id and --tracking-uri") from None
        if run.info.status != "FINISHED":
            raise ValueError(f"MLflow run {run_id} is {run.info.status}, not FINISHED: export a run that completed")
        return run
    if not experiment:
        raise ValueError("give --experiment NAME (to pick its best run) or --run-id ID")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment {experiment!r} in {uri}; experiments there: {', '.join(names) or '(none)'}")
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"attributes.status = 'FINISHED' and metrics.`{metric}` > -1e300",
        order_by=[f"metrics.`{metric}` DESC", "attributes.start_time DESC"], max_results=1,
    )
    if runs:
        return runs[0]
    finished = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50)
    if not finished:
        raise ValueError(f"experiment {experiment!r} has no FINISHED run to export")
    metrics = sorted({k for r in finished for k in r.data.metrics if k.startswith("final_")})
    raise ValueError(f"no FINISHED run of {experiment!r} has the metric {metric!r}; final metrics there: {', '.join(metrics)}")


def experiment_name(uri: str | None, experiment_id: str) -> str:
    """The name of an experiment (nested runs go into their parent's experiment by name)."""
    return MlflowClient(tracking_uri=resolve_tracking_uri(uri)).get_experiment(experiment_id).name


# ---------------------------------------------------------------------------------------------
# Export and the Model Registry

PYFUNC_MODEL_CODE = Path(__file__).parent / "deploy" / "pyfunc_model.py"
REGISTERED_MODEL = "steel-seg"
CHAMPION = "champion"

# What the pyfunc model imports at inference, pinned to this environment. Given explicitly, so
# MLflow does not infer requirements by importing the model in a subprocess.
_INFERENCE_DISTRIBUTIONS = (
    ("paddlepaddle", "paddlepaddle-gpu"),
    ("numpy",),
    ("opencv-python", "opencv-python-headless", "opencv-contrib-python"),
    ("pyyaml",),
    ("pandas",),
)


def log_export(uri: str | None, run_id: str, folder: Path, metrics: dict[str, float]) -> None:
    """Copy an export folder into the run's artifacts as `export/<folder name>`, and log `metrics`
    (e.g. the export's backend timings) at step 0; NaN values are skipped as in RunTracker."""
    uri = resolve_tracking_uri(uri)
    folder = _export_folder(folder)
    values = {key: _as_float(key, value) for key, value in metrics.items()}  # bad values fail first
    client = MlflowClient(tracking_uri=uri)
    _existing_run(client, uri, run_id)
    client.log_artifacts(run_id, str(folder), f"export/{folder.name}")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items() if not math.isnan(v)])


def register_export(
    uri: str | None,
    run_id: str,
    folder: Path,
    model_name: str = REGISTERED_MODEL,
    alias: str = CHAMPION,
    example_image: bytes | None = None,
    tags: dict | None = None,
) -> str:
    """Log the export folder as a pyfunc model of `run_id`, register it as a new version of
    `model_name`, point `alias` at it, and return the version number.

    The model is logged from code (steel_seg/deploy/pyfunc_model.py) with the folder as its
    artifact `export`. The version is tagged with `run_id` and `tags`. Moving the alias leaves the
    previous version as it was (number, tags, files): roll back by pointing the alias at it.
    `example_image` (encoded JPEG/PNG) becomes the input example; by default a grey image of the
    model's input size. The run's status is never touched: no fluent run is started.
    """
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    from steel_seg.deploy.spec import read_spec

    uri = resolve_tracking_uri(uri)
    folder = _export_folder(folder)
    spec = read_spec(folder)
    client = MlflowClient(tracking_uri=uri)
    run = _existing_run(client, uri, run_id)
    example = _example_image_b64(example_image, spec.preprocess.size)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema(
            [ColSpec("long", "height"), ColSpec("long", "width"), ColSpec("string", "mask_png")]
            + [ColSpec("long", f"pixels_{name}") for name in spec.classes[1:]]
        ),
    )
    # The LoggedModel is created here, in the run's experiment: Model.log(run_id=...) without a
    # fluent active run would put it in the *default* experiment (it asks the fluent API which
    # experiment is active), and its files under ./mlruns of the working directory.
    logged = client.create_logged_model(
        run.info.experiment_id, name=folder.name, source_run_id=run_id,
        tags={"steel_seg.export": folder.name}, model_type="steel_seg.segmentation",
    )
    # Model.log (which mlflow.pyfunc.log_model wraps) takes run_id and model_id but reads the store
    # from the global tracking URI, and so does the sqlite registry when it resolves a
    # `models:/<model_id>` source (an MLflow TODO): both run with the global URI set to `uri`.
    with _GlobalTrackingUri(uri):
        # Links the model to the run as an output; marks it READY, or FAILED if saving raises.
        info = Model.log(
            artifact_path=None,  # deprecated, but still a required positional parameter
            name=folder.name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=str(PYFUNC_MODEL_CODE),
            artifacts={"export": str(folder)},
            signature=signature,
            input_example=pd.DataFrame({"image": [example]}),
            pip_requirements=_inference_requirements(),
        )
        try:
            client.create_registered_model(
                model_name, description="steel_seg defect segmentation exports (see each version's run)"
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            model_name, source=info.model_uri, run_id=run_id, model_id=logged.model_id,
            tags={"run_id": run_id, **{k: str(v) for k, v in (tags or {}).items()}},
            description=f"export {folder.name} of run {run_id}",
        )
    client.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)


def model_version_for_alias(uri: str | None, model_name: str = REGISTERED_MODEL, alias: str = CHAMPION):
    """The ModelVersion `alias` points at; a missing model or alias says what exists instead."""
    uri = resolve_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        pass
    try:
        aliases = client.get_registered_model(model_name).aliases
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise ValueError(
            f"no registered model {model_name!r} in {uri}; registered models there: {', '.join(names) or '(none)'}"
        ) from None
    listing = ", ".join(f"@{a} -> version {v}" for a, v in sorted(aliases.items())) or "(none)"
    raise ValueError(f"registered model {model_name!r} has no alias {alias!r}; its aliases: {listing}")


def _export_folder(folder) -> Path:
    folder = Path(folder)
    if not (folder / "deploy.yaml").is_file():
        raise FileNotFoundError(f"{folder} is not an export folder (no deploy.yaml); make one with `python -m steel_seg.export`")
    return folder


def _existing_run(client: MlflowClient, uri: str, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"MLflow run {run_id!r} is not in {uri}; check the run id and tracking URI") from None


def _example_image_b64(example_image: bytes | None, size: tuple[int, int]) -> str:
    """Base64 text of the input example; by default a mid-grey PNG of the model's (width, height)."""
    import base64

    if example_image is None:
        import cv2
        import numpy as np

        ok, png = cv2.imencode(".png", np.full((int(size[1]), int(size[0]), 3), 128, np.uint8))
        example_image = png.tobytes()
    return base64.b64encode(bytes(example_image)).decode("ascii")


def _inference_requirements() -> list[str]:
    """pip pins of what the pyfunc model imports, as installed here (first found of each group)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for names in _INFERENCE_DISTRIBUTIONS:
        for name in names:
            try:
                pins.append(f"{name}=={version(name)}")
                break
            except PackageNotFoundError:
                continue
        else:
            pins.append(names[0])
    return pins


class _GlobalTrackingUri:
    """Point MLflow's process-wide tracking URI at `uri` for a block, then restore it.

    `mlflow.set_tracking_uri` also writes $MLFLOW_TRACKING_URI (for subprocesses), so the
    variable is put back as it was too.
    """

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self):
        self._env = os.environ.get("MLFLOW_TRACKING_URI")
        self._previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(self.uri)

    def __exit__(self, *exc) -> bool:
        mlflow.set_tracking_uri(self._previous)
        if self._env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self._env
        return False


# ---------------------------------------------------------------------------------------------
# Reading pipeline runs back
#
# A pipeline invocation is a parent run (tag steel_seg.role=pipeline, artifact pipeline.json), a
# child run per stage (role=stage) and a nested run per variant and seed (role=variant). These
# functions hand that tree to steel_seg.pipeline.compare as plain records, so nothing else needs
# MLflow's entities, and log the comparison back to the parent run.

from dataclasses import dataclass  # noqa: E402  - this section was added after the imports above

PIPELINE_ROLE_TAG = "steel_seg.role"
PIPELINE_PLAN_FILE = "pipeline.json"


@dataclass(frozen=True)
class RunRecord:
    """What compare needs of one run: identity, status, start time (ms), tags, params, metrics."""

    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time: int
    tags: dict
    params: dict
    metrics: dict


@dataclass(frozen=True)
class PipelineRecord:
    """One pipeline invocation as stored: the parent run, its pipeline.json, stage and variant runs."""

    uri: str
    experiment_id: str
    experiment_name: str
    parent: RunRecord
    plan: dict
    stages: list
    variants: list


def read_pipeline(uri: str | None, parent_run_id: str | None = None, experiment: str | None = None) -> PipelineRecord:
    """The pipeline invocation `parent_run_id`, else the latest one of `experiment`, else the latest
    in the store. Errors name the pipeline runs and experiments that do exist."""
    uri = resolve_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    parent = _pipeline_parent(client, uri, parent_run_id, experiment)
    try:
        plan = json.loads(_artifact_text(client, parent.info.run_id, PIPELINE_PLAN_FILE))
    except FileNotFoundError:
        listing = ", ".join(a.path for a in client.list_artifacts(parent.info.run_id)) or "(none)"
        raise ValueError(
            f"pipeline run {parent.info.run_id} has no {PIPELINE_PLAN_FILE} artifact (its artifacts: {listing}); "
            "was it started by an older steel_seg, or did it crash before writing the plan?"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{PIPELINE_PLAN_FILE} of pipeline run {parent.info.run_id} is not valid JSON: {exc}") from None
    experiment_id = parent.info.experiment_id
    stages = _search_all(client, [experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'")
    stages = [r for r in stages if r.data.tags.get(PIPELINE_ROLE_TAG) == "stage"]
    variants = []
    for stage in stages:
        children = _search_all(client, [experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{stage.info.run_id}'")
        variants.extend(r for r in children if r.data.tags.get(PIPELINE_ROLE_TAG) == "variant")
    return PipelineRecord(
        uri=uri,
        experiment_id=experiment_id,
        experiment_name=client.get_experiment(experiment_id).name,
        parent=_record(parent),
        plan=plan,
        stages=[_record(r) for r in stages],
        variants=[_record(r) for r in variants],
    )


def run_artifact_text(uri: str | None, run_id: str, artifact_file: str) -> str | None:
    """A run's small text artifact (e.g. labels.txt), or None when the run does not have it."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(uri))
    try:
        return _artifact_text(client, run_id, artifact_file)
    except FileNotFoundError:
        return None


def log_to_run(
    uri: str | None, run_id: str, texts: dict[str, str] | None = None, figures: dict | None = None, tags: dict[str, str] | None = None
) -> None:
    """Log text artifacts ({path: text}), matplotlib figures ({path.png: figure}) and tags to a
    finished run, without reopening it (its status stays as it is); figures are closed after saving."""
    uri = resolve_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    _existing_run(client, uri, run_id)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    for artifact_file, text in (texts or {}).items():
        client.log_text(run_id, text, artifact_file)
    for artifact_file, figure in (figures or {}).items():
        try:
            client.log_figure(run_id, figure, artifact_file)
        finally:
            _close_figure(figure)


def experiment_runs_url(experiment_id: str, host: str = UI_HOST) -> str:
    """The experiment's runs table in MLflow 3's training view (not the GenAI overview page)."""
    return f"{host.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def child_runs_url(experiment_id: str, parent_run_id: str, sort_metric: str | None = None, host: str = UI_HOST) -> str:
    """The runs table filtered to the children of one run (a pipeline stage's variant runs, failed
    ones included), best `sort_metric` first. `searchFilter`, `orderByKey` and `orderByAsc` are
    read from the URL by MLflow 3.17's runs page (checked in headless Chromium); which columns
    show is a per-browser setting that no URL parameter chooses."""
    from urllib.parse import quote

    search = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
    query = "searchFilter=" + quote(search, safe="")
    if sort_metric:
        query += "&orderByKey=" + quote(f"metrics.`{sort_metric}`", safe="") + "&orderByAsc=false"
    return f"{experiment_runs_url(experiment_id, host)}&{query}"


def compare_runs_url(run_ids: list[str], experiment_ids: list[str], host: str = UI_HOST) -> str:
    """MLflow's side-by-side comparison of runs (parallel coordinates, params and metrics diff).

    The UI reads `runs` and `experiments` as JSON lists from the query of the hash route and
    URL-decodes them first (repeatedly), so the lists are sent percent-encoded: the link then has
    no quotes or brackets for a terminal or Markdown renderer to cut it at. Those are the only two
    parameters the page reads: its parallel-coordinates plot starts on the first metric the runs
    share, and no URL can choose another (child_runs_url sorts by a chosen metric instead).
    """
    from urllib.parse import quote

    runs = quote(json.dumps(list(run_ids), separators=(",", ":")), safe="")
    experiments = quote(json.dumps([str(e) for e in experiment_ids], separators=(",", ":")), safe="")
    return f"{host.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def _pipeline_parent(client: MlflowClient, uri: str, parent_run_id: str | None, experiment: str | None):
    role = f"tags.`{PIPELINE_ROLE_TAG}` = 'pipeline'"
    if parent_run_id:
        try:
            run = client.get_run(parent_run_id)
        except MlflowException:
            raise ValueError(
                f"MLflow run {parent_run_id!r} is not in {uri}. {_pipeline_listing(client)}"
            ) from None
        if run.data.tags.get(PIPELINE_ROLE_TAG) != "pipeline":
            what = run.data.tags.get(PIPELINE_ROLE_TAG)
            kind = f"a {what} run of a pipeline" if what else "not a pipeline run (no steel_seg.role tag)"
            raise ValueError(f"MLflow run {parent_run_id} ({run.info.run_name}) is {kind}. {_pipeline_listing(client)}")
        return run
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ValueError(f"no MLflow experiment {experiment!r} in {uri}; experiments there: {', '.join(names) or '(none)'}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids, role, order_by=["attributes.start_time DESC"], max_results=1) if experiment_ids else []
    if runs:
        return runs[0]
    where = f"experiment {experiment!r}" if experiment else uri
    raise ValueError(f"no pipeline runs (tag steel_seg.role=pipeline) in {where}. {_pipeline_listing(client)}")


def _pipeline_listing(client: MlflowClient, limit: int = 10) -> str:
    """'Pipeline runs there: …' (newest first), or the experiments when there are none."""
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    runs = client.search_runs(
        list(experiments), f"tags.`{PIPELINE_ROLE_TAG}` = 'pipeline'", order_by=["attributes.start_time DESC"],
        max_results=limit,
    ) if experiments else []
    if not runs:
        return f"There are no pipeline runs there; experiments: {', '.join(sorted(experiments.values())) or '(none)'}."
    rows = "; ".join(
        f"{r.info.run_id} ({r.data.tags.get('steel_seg.pipeline', r.info.run_name)}, experiment "
        f"{experiments.get(r.info.experiment_id, r.info.experiment_id)!r}, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r.info.start_time / 1000))})"
        for r in runs
    )
    return f"Pipeline runs there, newest first: {rows}."


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _artifact_text(client: MlflowClient, run_id: str, artifact_file: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, artifact_file, tmp)
        except (MlflowException, OSError):
            raise FileNotFoundError(f"run {run_id} has no artifact {artifact_file!r}") from None
        return Path(local).read_text()


def _record(run) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        name=run.info.run_name or "",
        status=run.info.status,
        start_time=int(run.info.start_time or 0),
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
    )
