"""Resume bookkeeping: the study's state file and MLflow run reconciliation.

The state file (``<ray storage>/<study>/sweep_state.json``, written atomically after every
step) records the study's parent run, each search (its MLflow run, whether it is done and
its best config) and each finished final (its run id and test metrics). A re-run reads it,
skips what is done and reuses the run ids, so nothing is run or logged twice.

Runs that an interruption cut short are reconciled with MLflow (a run killed with its
process never gets an end status): see :func:`reconcile_runs`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import tracking
from .._checks import BrainalignError
from .._io import write_json_atomic

__all__ = ["StudyState", "find_runs", "reconcile_runs"]

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass
class StudyState:
    """What a study has finished; persisted as JSON after every change."""

    path: Path
    study: str
    fingerprint: str
    parent_run_id: str = ""
    searches: dict[str, dict[str, Any]] = field(default_factory=dict)
    finals: dict[str, dict[str, Any]] = field(default_factory=dict)
    report_logged: bool = False

    @classmethod
    def load(cls, path: Path, study: str, fingerprint: str) -> StudyState | None:
        """The saved state, or None; a state of an edited study raises."""
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BrainalignError(f"sweep state {path} is unreadable ({e}); re-run with --fresh.") from e
        if doc.get("version") != STATE_VERSION or doc.get("study") != study:
            raise BrainalignError(f"sweep state {path} belongs to another study or version; re-run with --fresh.")
        if doc.get("fingerprint") != fingerprint:
            raise BrainalignError(
                f"study {study} was edited since its sweep started (state {path}); finish it with the old "
                "file or start over with --fresh."
            )
        return cls(path=path, study=study, fingerprint=fingerprint, parent_run_id=doc.get("parent_run_id", ""),
                   searches=dict(doc.get("searches", {})), finals=dict(doc.get("finals", {})),
                   report_logged=bool(doc.get("report_logged", False)))

    def save(self) -> None:
        write_json_atomic(self.path, {
            "version": STATE_VERSION,
            "study": self.study,
            "fingerprint": self.fingerprint,
            "parent_run_id": self.parent_run_id,
            "searches": self.searches,
            "finals": self.finals,
            "report_logged": self.report_logged,
        })


# --------------------------------------------------------------------------- MLflow queries
# tracking.py is the only module that imports mlflow; it exposes no run search or delete
# yet, so these helpers use its client factory.
def _client(uri: str) -> Any:
    return tracking._client(uri)


def find_runs(experiment: str, tags: Mapping[str, str], uri: str) -> list[Any]:
    """Active (not deleted) runs of ``experiment`` whose tags equal ``tags``, oldest first."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=flt, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: r.info.start_time)


def end_running(experiment: str, study: str, status: str, uri: str) -> int:
    """End every run of ``study`` still ``RUNNING`` (trial and final runs whose processes Tune
    stopped on Ctrl-C or a failure cannot end their own) with ``status``; returns how many.
    A resumed study re-opens or replaces them (:func:`reconcile_runs`)."""
    running = [r for r in find_runs(experiment, {"study": study}, uri) if r.info.status == "RUNNING"]
    for r in running:
        set_status(r.info.run_id, status, uri)
    return len(running)


def delete_run(run_id: str, uri: str) -> None:
    """Soft-delete a run (hidden in the UI; ``mlflow gc`` purges it)."""
    _client(uri).delete_run(run_id)


def set_status(run_id: str, status: str, uri: str) -> None:
    """Set a run's status (``RUNNING`` re-opens a run a resumed study keeps logging to)."""
    client = _client(uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


def reconcile_runs(runs: list[Any], keep: str | None, uri: str, *,
                   finish_tags: Mapping[str, str] | None = None) -> str | None:
    """Leave one run for one unit of work (a Tune trial or a final).

    Parameters
    ----------
    runs : list of mlflow Run
        The runs of one unit, oldest first (an interrupted attempt leaves an extra one).
    keep : str or None
        The run id to keep; None keeps the newest run.
    uri : str
        Tracking URI.
    finish_tags : mapping, optional
        Given when the unit ended without error in Tune: a kept run that is not ``FINISHED``
        was stopped by the scheduler (ASHA kills the trial's process, which then cannot end
        its run): mark it ``FINISHED`` and set these tags (e.g. ``stopped_early=true``).

    Returns
    -------
    str or None
        The kept run id (None if there is no run).
    """
    if not runs:
        return None
    ids = [str(r.info.run_id) for r in runs]
    kept: str = keep if keep is not None and keep in ids else ids[-1]
    for r in runs:
        if r.info.run_id != kept:
            log.info("deleting run %s left by an interrupted attempt", r.info.run_id)
            delete_run(r.info.run_id, uri)
    run = next(r for r in runs if r.info.run_id == kept)
    if finish_tags is not None and run.info.status != "FINISHED":
        if finish_tags:
            tracking.set_tags(kept, finish_tags, uri=uri)
        set_status(kept, "FINISHED", uri)
    return kept
