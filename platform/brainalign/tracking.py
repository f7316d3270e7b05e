"""MLflow tracking: the only module that imports mlflow.

A run is created by the driver with :func:`start_run` (params, tags), per-epoch metrics
are logged from Ray Train's rank 0 with :func:`log_metrics` (through ``MlflowClient`` on the
given run id, so no process-global "active run" is involved), and the driver logs artifacts
and ends the run. With no ``MLFLOW_TRACKING_URI`` the store is SQLite under
``$BRAINALIGN_HOME/mlruns`` and experiments get an absolute artifact location, so no
artifact ever lands in a process's random working directory (Tune trial dirs, Ray job dirs).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths

__all__ = [
    "RunRecord",
    "code_version",
    "download_artifacts",
    "end_run",
    "ensure_experiment",
    "get_run",
    "list_artifacts",
    "log_artifact",
    "log_dict",
    "find_runs",
    "log_metrics",
    "start_run",
    "tracking_uri",
]

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")


def tracking_uri() -> str:
    return paths.mlflow_tracking_uri()


def _client(uri: str | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """Id of experiment ``name``, created if needed (absolute artifact root for local stores)."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        root = paths.mlflow_artifact_root() / name
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
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
    """Create a run (nested under ``parent_run_id`` if given); returns its id."""
    from mlflow.entities import Param, RunTag

    client = _client(uri)
    exp_id = ensure_experiment(experiment, uri)
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    if params:
        items = [Param(k, _param_str(v)) for k, v in sorted(params.items())]
        for s in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[s : s + 100], tags=[RunTag("brainalign", "1")])
    return str(run.info.run_id)


def _param_str(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v))
    return str(v)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None, uri: str | None = None) -> None:
    """Log numeric metrics in one batch call (retrying briefly if the SQLite store is busy)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    for attempt in range(5):
        try:
            _client(uri).log_batch(run_id, metrics=items)
            return
        except Exception as e:  # sqlite "database is locked" under concurrent writers
            if "locked" not in str(e) or attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))


def set_tags(run_id: str, tags: Mapping[str, Any], uri: str | None = None) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None, uri: str | None = None) -> None:
    _client(uri).log_artifact(run_id, str(path), artifact_path)


def log_dict(run_id: str, obj: Any, name: str, uri: str | None = None) -> None:
    """Log ``obj`` as a JSON artifact ``name``."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(name).name
        p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        sub = str(Path(name).parent) if Path(name).parent != Path(".") else None
        log_artifact(run_id, p, sub, uri)


def log_text(run_id: str, text: str, name: str, uri: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(name).name
        p.write_text(text)
        sub = str(Path(name).parent) if Path(name).parent != Path(".") else None
        log_artifact(run_id, p, sub, uri)


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    """Mark a run FINISHED, FAILED or KILLED."""
    _client(uri).set_terminated(run_id, status=status)


# --------------------------------------------------------------------------- reading runs back
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


def find_runs(experiment: str, tags: Mapping[str, str], uri: str | None = None, *,
              status: str | None = None) -> list[RunRecord]:
    """Active (not deleted) runs of ``experiment`` whose tags equal ``tags``, oldest first."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    parts = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if status:
        parts.append(f"attributes.status = '{status}'")
    runs: list[RunRecord] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=" and ".join(parts), max_results=1000,
                                  page_token=token)
        runs += [_record(r) for r in page]
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: r.start_time)


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
