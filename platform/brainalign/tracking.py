"""MLflow tracking: the only module of brainalign that imports mlflow.

Three parts, all through ``MlflowClient`` on explicit run ids (no process-global "active
run", so a Tune trial, a Train worker and the study driver can share one store):

* **Experiments and run lifecycle.** :func:`ensure_experiment` (an absolute artifact root
  for local stores, and the ``mlflow.experimentKind`` tag that makes the MLflow 3 UI open
  the experiment as model development), :func:`start_run`, and the context managers
  :func:`run` (create + end) and :func:`ended` (end an existing run): FINISHED when the block
  succeeds, KILLED on ``KeyboardInterrupt``/``SystemExit`` (Ctrl-C, ``ray job stop``, a
  terminated process), FAILED on any other exception. A run once marked KILLED is never
  turned FAILED by the unwinding that follows the stop.
* **Logging.** metrics, tags, params, artifacts, the dataset as a run input
  (:func:`log_dataset`), the run description (:func:`set_description`) and system metrics
  (:func:`system_metrics`: CPU, memory, disk, network and GPU when present).
* **Queries.** :func:`find_runs`, :func:`children`, :func:`get_run`, :func:`download_json`,
  :func:`reconcile_runs`, :func:`end_running`, :func:`delete_run`, :func:`set_status`. They
  return :class:`RunRecord` values, so no mlflow object leaves this module.

With no ``MLFLOW_TRACKING_URI`` the store is SQLite under ``$BRAINALIGN_HOME/mlruns`` and
experiments get an absolute artifact location, so no artifact ever lands in a process's
random working directory (Tune trial dirs, Ray job dirs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths

__all__ = [
    "EXPERIMENT_KIND",
    "RunRecord",
    "children",
    "code_version",
    "delete_run",
    "download_artifacts",
    "download_json",
    "end_run",
    "end_running",
    "ended",
    "ensure_experiment",
    "find_runs",
    "get_run",
    "list_artifacts",
    "log_artifact",
    "log_dataset",
    "log_dict",
    "log_metrics",
    "log_text",
    "logged_steps",
    "reconcile_runs",
    "retry_budget",
    "run",
    "set_description",
    "set_status",
    "set_tags",
    "start_run",
    "system_metrics",
    "tracking_uri",
]

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")

#: Without this experiment tag MLflow 3 opens an experiment in its GenAI view (a study run
#: shows up under "Evaluations"); with it, the classic runs table with metrics and datasets.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
_DESCRIPTION_TAG = "mlflow.note.content"
_STOPPED = ("KILLED", "FAILED")


def tracking_uri() -> str:
    """The tracking URI of this process (``MLFLOW_TRACKING_URI`` or the local SQLite store)."""
    return paths.mlflow_tracking_uri()


def _client(uri: str | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


# --------------------------------------------------------------------------- experiments, runs
def ensure_experiment(name: str, uri: str | None = None) -> str:
    """Id of experiment ``name``, created if needed, tagged :data:`EXPERIMENT_KIND`.

    A local store gets an absolute artifact root (``$BRAINALIGN_HOME/mlruns/artifacts/<name>``).
    """
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for k, v in EXPERIMENT_KIND.items():
            if exp.tags.get(k) != v:
                client.set_experiment_tag(exp.experiment_id, k, v)
        return str(exp.experiment_id)
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        root = paths.mlflow_artifact_root() / name
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND))
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def code_version() -> str:
    """Git commit of the code (``+dirty`` if modified); env ``BRAINALIGN_GIT_COMMIT`` wins."""
    env = os.environ.get("BRAINALIGN_GIT_COMMIT")
    if env:
        return env
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(
    experiment: str,
    *,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    uri: str | None = None,
) -> str:
    """Create a RUNNING run (nested under ``parent_run_id`` if given); returns its id.

    Prefer :func:`run` (or :func:`ended` around the work), which also ends it.
    """
    from mlflow.entities import Param, RunTag

    client = _client(uri)
    exp_id = ensure_experiment(experiment, uri)
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    created = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = str(created.info.run_id)
    if params:
        items = [Param(k, _param_str(v)) for k, v in sorted(params.items())]
        for s in range(0, len(items), 100):
            client.log_batch(run_id, params=items[s : s + 100], tags=[RunTag("brainalign", "1")])
    return run_id


def _param_str(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v))
    return str(v)


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    """Mark a run FINISHED, FAILED or KILLED.

    FAILED never replaces KILLED: a stopped study marks its runs KILLED first, and the
    errors its processes raise while they are torn down are a consequence of the stop.
    """
    client = _client(uri)
    if status == "FAILED" and _retrying("get_run", lambda: client.get_run(run_id)).info.status == "KILLED":
        return
    _retrying("set_terminated", lambda: client.set_terminated(run_id, status=status))


def set_status(run_id: str, status: str, uri: str | None = None) -> None:
    """Set a run's status; ``RUNNING`` re-opens a run that a resumed study logs to again."""
    if status == "RUNNING":
        _client(uri).update_run(run_id, status="RUNNING")
    else:
        end_run(run_id, status, uri)


@contextlib.contextmanager
def ended(
    run_id: str,
    *,
    uri: str | None = None,
    finish: bool = True,
    cascade: tuple[str, Mapping[str, str]] | None = None,
) -> Iterator[str]:
    """End ``run_id`` with the outcome of the block.

    Parameters
    ----------
    run_id : str
        A RUNNING run.
    uri : str, optional
        Tracking URI.
    finish : bool
        Mark the run FINISHED when the block succeeds (False: leave it running).
    cascade : (experiment, tags), optional
        On KILLED/FAILED, also end every RUNNING run of ``experiment`` carrying ``tags``
        (e.g. a study's trial runs, whose processes were stopped with the study and cannot
        end their runs themselves).

    Yields
    ------
    str
        ``run_id``.
    """
    try:
        yield run_id
    except (KeyboardInterrupt, SystemExit):
        _end_quietly(run_id, "KILLED", uri, cascade)
        raise
    except BaseException:
        _end_quietly(run_id, "FAILED", uri, cascade)
        raise
    if finish:
        end_run(run_id, "FINISHED", uri)


def _end_quietly(run_id: str, status: str, uri: str | None,
                 cascade: tuple[str, Mapping[str, str]] | None) -> None:
    """End runs while an exception propagates: a tracking error must not replace it."""
    try:
        end_run(run_id, status, uri)
        if cascade is not None:
            end_running(cascade[0], cascade[1], status, uri)
    except Exception:
        log.exception("could not mark run %s %s", run_id, status)


@contextlib.contextmanager
def run(
    experiment: str,
    *,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    uri: str | None = None,
) -> Iterator[str]:
    """A new run for the duration of the block (see :func:`ended` for how it ends)."""
    run_id = start_run(experiment, run_name=run_name, params=params, tags=tags, parent_run_id=parent_run_id,
                       uri=uri)
    with ended(run_id, uri=uri):
        yield run_id


# --------------------------------------------------------------------------- logging
#: MLflow error codes that no retry can fix (a bad request, a missing run): raised at once.
_PERMANENT = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                        "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST"})
RETRY_ENV = "BRAINALIGN_MLFLOW_RETRY_S"


def retry_budget() -> float:
    """Seconds a write keeps retrying an unreachable or busy store (``BRAINALIGN_MLFLOW_RETRY_S``,
    default 600: a tracking server restarted or briefly down loses no metric)."""
    value = os.environ.get(RETRY_ENV, "600")
    try:
        return max(0.0, float(value))
    except ValueError:
        from ._checks import BrainalignError

        raise BrainalignError(f"{RETRY_ENV}={value!r} is not a number of seconds (e.g. 600)") from None


def _retrying(what: str, call: Any, *, budget: float | None = None) -> Any:
    """``call()``, retried with exponential back-off (0.5 s doubling to 15 s) while the store is
    unreachable (server stopped, connection refused, 5xx) or busy (SQLite "database is locked"),
    for at most ``budget`` seconds; errors that name a bad request are raised at once."""
    budget = retry_budget() if budget is None else budget
    start = time.monotonic()
    delay = 0.5
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as e:
            if getattr(e, "error_code", "") in _PERMANENT or time.monotonic() - start + delay > budget:
                raise
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            log.warning("MLflow %s failed (attempt %d: %s); retrying in %.1f s", what, attempt, first, delay)
            time.sleep(delay)
            delay = min(15.0, delay * 2)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None, uri: str | None = None) -> None:
    """Log numeric metrics in one batch call.

    Retried with back-off while the store is down or busy (:func:`retry_budget`): the batch
    keeps its timestamp and step, so a metric is logged once, late rather than never.
    """
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    _retrying("log_batch", lambda: _client(uri).log_batch(run_id, metrics=items))


def logged_steps(run_id: str, key: str, uri: str | None = None) -> set[int]:
    """The steps at which ``run_id`` holds metric ``key`` (a resumed run skips them)."""
    return {int(m.step) for m in _retrying("get_metric_history", lambda: _client(uri).get_metric_history(run_id, key))}


def set_tags(run_id: str, tags: Mapping[str, Any], uri: str | None = None) -> None:
    """Set (overwrite) tags of a run."""
    from mlflow.entities import RunTag

    _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def set_description(run_id: str, markdown: str, uri: str | None = None) -> None:
    """The run's description in the MLflow UI (rendered markdown)."""
    set_tags(run_id, {_DESCRIPTION_TAG: markdown}, uri)


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None, uri: str | None = None) -> None:
    """Upload a local file or folder to the run's artifacts (under ``artifact_path``)."""
    _client(uri).log_artifact(run_id, str(path), artifact_path)


def log_text(run_id: str, text: str, name: str, uri: str | None = None) -> None:
    """Log ``text`` as artifact ``name`` (e.g. ``report/table.md``)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(name).name
        p.write_text(text)
        sub = str(Path(name).parent) if Path(name).parent != Path(".") else None
        log_artifact(run_id, p, sub, uri)


def log_dict(run_id: str, obj: Any, name: str, uri: str | None = None) -> None:
    """Log ``obj`` as a JSON artifact ``name``."""
    log_text(run_id, json.dumps(obj, indent=2, sort_keys=True, default=str), name, uri)


def log_dataset(run_id: str, *, name: str, digest: str, source: str, context: str = "training",
                profile: Mapping[str, Any] | None = None, uri: str | None = None) -> None:
    """Record the dataset a run used as an MLflow run input (the UI's Datasets column).

    Parameters
    ----------
    run_id : str
        The run.
    name : str
        Dataset name (e.g. the dataset folder's name).
    digest : str
        Content fingerprint (brainalign's dataset fingerprint; at most 36 characters).
    source : str
        Where the dataset lives (an absolute path or URI).
    context : str
        How the run used it (``training``, ``evaluation``).
    profile : mapping, optional
        Small JSON-able summary (subjects, shape...).
    uri : str, optional
        Tracking URI.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source}),
                 profile=json.dumps(dict(profile or {}), default=str))
    _client(uri).log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])


@contextlib.contextmanager
def system_metrics(run_id: str, *, uri: str | None = None, interval: float = 5.0) -> Iterator[None]:
    """Sample system metrics (``system/cpu_utilization_percentage``, memory, disk, network,
    ``system/gpu_*`` when NVML finds a GPU) into ``run_id`` while the block runs.

    MLflow's own monitor samples every ``interval`` seconds
    (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` wins); one more sample is taken when the
    block ends, so even a run shorter than the interval gets a data point.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                   tracking_uri=uri or tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as e:  # never fail a training run over its system metrics
            log.warning("could not log the last system metrics of run %s: %s", run_id, e)


# --------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class RunRecord:
    """A run as stored in MLflow (plain values; no mlflow object leaves this module)."""

    run_id: str
    name: str
    experiment_id: str
    status: str
    start_time: int
    end_time: int | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    deleted: bool = False

    @property
    def parent_run_id(self) -> str:
        return self.tags.get("mlflow.parentRunId", "")


def _record(r: Any) -> RunRecord:
    return RunRecord(
        run_id=str(r.info.run_id), name=str(r.info.run_name or ""), experiment_id=str(r.info.experiment_id),
        status=str(r.info.status), start_time=int(r.info.start_time or 0),
        end_time=int(r.info.end_time) if r.info.end_time else None,
        tags=dict(r.data.tags), params=dict(r.data.params), metrics={k: float(v) for k, v in r.data.metrics.items()},
        deleted=r.info.lifecycle_stage == "deleted",
    )


def get_run(run_id: str, uri: str | None = None) -> RunRecord:
    """One run by id.

    Raises
    ------
    BrainalignError
        No such run in the tracking store (the message names the store).
    """
    from ._checks import BrainalignError

    try:
        return _record(_client(uri).get_run(run_id))
    except Exception as e:
        if type(e).__name__ == "MlflowException":
            raise BrainalignError(
                f"MLflow run {run_id!r} is not in the tracking store {uri or tracking_uri()} ({e})."
            ) from None
        raise


def _search(client: Any, experiment_ids: Sequence[str], flt: str) -> list[RunRecord]:
    runs: list[RunRecord] = []
    token = None
    while True:
        page = client.search_runs(list(experiment_ids), filter_string=flt, max_results=1000, page_token=token)
        runs += [_record(r) for r in page]
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: r.start_time)


def _filter(tags: Mapping[str, str], status: str | None) -> str:
    parts = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if status:
        parts.append(f"attributes.status = '{status}'")
    return " and ".join(parts)


def find_runs(experiment: str, tags: Mapping[str, str], uri: str | None = None, *,
              status: str | None = None) -> list[RunRecord]:
    """Active (not deleted) runs of ``experiment`` whose tags equal ``tags``, oldest first."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return _search(client, [exp.experiment_id], _filter(tags, status))


def children(parent_run_id: str, uri: str | None = None, *, tags: Mapping[str, str] | None = None,
             status: str | None = None) -> list[RunRecord]:
    """Active runs nested directly under ``parent_run_id`` (and carrying ``tags``), oldest first."""
    client = _client(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    return _search(client, [exp_id], _filter({"mlflow.parentRunId": parent_run_id} | dict(tags or {}), status))


def download_json(run_id: str, artifact: str, uri: str | None = None) -> Any:
    """A JSON artifact of a run, parsed (raises if the run or the artifact is missing)."""
    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(_client(uri).download_artifacts(run_id, artifact, d)).read_text())


def delete_run(run_id: str, uri: str | None = None) -> None:
    """Soft-delete a run (hidden in the UI; ``mlflow gc`` purges it)."""
    _client(uri).delete_run(run_id)


def end_running(experiment: str, tags: Mapping[str, str], status: str, uri: str | None = None) -> int:
    """End every RUNNING run of ``experiment`` carrying ``tags`` with ``status``; returns how many.

    Used when a study stops: its trial and final runs live in processes that were stopped
    with it and cannot end their own runs (a resumed study re-opens or replaces them).
    """
    running = find_runs(experiment, tags, uri, status="RUNNING")
    for r in running:
        end_run(r.run_id, status, uri)
    return len(running)


def reconcile_runs(runs: Sequence[RunRecord], keep: str | None, uri: str | None = None, *,
                   finish_tags: Mapping[str, str] | None = None) -> str | None:
    """Leave one run for one unit of work (a Tune trial or a final); idempotent.

    Parameters
    ----------
    runs : sequence of RunRecord
        The runs of one unit, oldest first (an interrupted attempt leaves an extra one).
    keep : str or None
        The run id to keep; None keeps the newest run.
    uri : str, optional
        Tracking URI.
    finish_tags : mapping, optional
        Given when the unit ended without error: a kept run that is not FINISHED was stopped
        by the scheduler (its process was killed before it could end the run): mark it
        FINISHED and set these tags (e.g. ``pruned=true``).

    Returns
    -------
    str or None
        The kept run id (None if there is no run).
    """
    if not runs:
        return None
    ids = [r.run_id for r in runs]
    kept: str = keep if keep is not None and keep in ids else ids[-1]
    for r in runs:
        if r.run_id != kept:
            log.info("deleting run %s left by an interrupted attempt", r.run_id)
            delete_run(r.run_id, uri)
    run_ = next(r for r in runs if r.run_id == kept)
    if finish_tags is not None and run_.status != "FINISHED":
        if finish_tags:
            set_tags(kept, finish_tags, uri)
        _client(uri).set_terminated(kept, status="FINISHED")
    return kept


def list_artifacts(run_id: str, path: str | None = None, uri: str | None = None) -> list[str]:
    """Artifact paths directly under ``path`` of a run (folders included)."""
    return [str(a.path) for a in _client(uri).list_artifacts(run_id, path)]


def download_artifacts(run_id: str, path: str, dst: Path, uri: str | None = None) -> Path:
    """Copy the artifact file or folder ``path`` of a run into ``dst``; returns its local path.

    Raises
    ------
    BrainalignError
        The run has no artifact ``path`` (the message lists what it has there).
    """
    from ._checks import BrainalignError

    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(_client(uri).download_artifacts(run_id, path, str(dst)))
    except Exception as e:
        if type(e).__name__ not in ("MlflowException", "OSError", "FileNotFoundError"):
            raise
        parent = str(Path(path).parent) if Path(path).parent != Path(".") else None
        try:
            have = list_artifacts(run_id, parent, uri)
        except Exception:
            have = []
        raise BrainalignError(
            f"MLflow run {run_id} has no artifact {path!r} (it has {have or 'nothing'} there): was it "
            "trained with checkpoints saved and tested (a final run, or brainalign train)?"
        ) from None
