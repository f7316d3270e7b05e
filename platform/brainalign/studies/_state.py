"""Resume bookkeeping: a study's state file.

``<ray storage>/<study>/study_state.json`` (written atomically after every step) records the
study's MLflow run, each search (its run, whether it is done, its best config) and each
finished tested run (its run id and test metrics). A re-run reads it, skips what is done and
reuses the run ids; what an interruption left in MLflow is reconciled by the engine
(:func:`brainalign.tracking.reconcile_runs`), so a killed driver can always be resumed.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import BrainalignError
from .._io import write_json_atomic
from .spec import Study

__all__ = ["STATE_FILE", "StudyState", "recorded_final"]

STATE_FILE = "study_state.json"
_LEGACY = "sweep_state.json"
STATE_VERSION = 2


@dataclass
class StudyState:
    """What a study has finished; persisted as JSON after every change.

    Thread-safe for the engine's side-by-side searches: :meth:`save` and :meth:`record`
    hold one lock, so a save never sees a table another thread is changing and the file
    always holds every record made so far.
    """

    path: Path
    study: str
    fingerprint: str
    study_run_id: str = ""
    searches: dict[str, dict[str, Any]] = field(default_factory=dict)
    finals: dict[str, dict[str, Any]] = field(default_factory=dict)
    report_logged: bool = False
    #: analyses done on the finished tested runs (``"explain"``, ``"grids"``)
    analyses: list[str] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False, compare=False)

    @classmethod
    def new(cls, folder: Path, study: Study) -> StudyState:
        return cls(path=folder / STATE_FILE, study=study.name, fingerprint=study.fingerprint())

    @classmethod
    def load(cls, folder: Path, study: Study) -> StudyState | None:
        """The saved state of ``study`` in ``folder``, or None; a state of an edited study raises."""
        path = folder / STATE_FILE
        if not path.is_file():
            if (folder / _LEGACY).is_file():
                raise BrainalignError(
                    f"{folder} holds a sweep started by an older brainalign ({_LEGACY}); finish it with that "
                    "version or start over with --fresh."
                )
            return None
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BrainalignError(f"study state {path} is unreadable ({e}); re-run with --fresh.") from e
        if doc.get("version") != STATE_VERSION or doc.get("study") != study.name:
            raise BrainalignError(f"study state {path} belongs to another study or version; re-run with --fresh.")
        if doc.get("fingerprint") != study.fingerprint():
            raise BrainalignError(
                f"study {study.name} was edited since it started (state {path}); finish it with the old file "
                "(and the same --set options) or start over with --fresh."
            )
        return cls(path=path, study=study.name, fingerprint=study.fingerprint(),
                   study_run_id=str(doc.get("study_run_id", "")), searches=dict(doc.get("searches", {})),
                   finals=dict(doc.get("finals", {})), report_logged=bool(doc.get("report_logged", False)),
                   analyses=list(doc.get("analyses", [])))

    def selected(self) -> dict[str, dict[str, Any]]:
        """Search key -> best config, for every finished search."""
        return {k: dict(r["best_config"]) for k, r in self.searches.items() if r.get("done")}

    def record(self, table: str, key: str, record: dict[str, Any]) -> None:
        """Set ``searches[key]`` or ``finals[key]`` (``table``) and save, as one step."""
        with self._lock:
            {"searches": self.searches, "finals": self.finals}[table][key] = record
            self.save()

    def save(self) -> None:
        """Write the state file (atomically)."""
        with self._lock:
            write_json_atomic(self.path, {
                "version": STATE_VERSION,
                "study": self.study,
                "fingerprint": self.fingerprint,
                "study_run_id": self.study_run_id,
                "searches": self.searches,
                "finals": self.finals,
                "report_logged": self.report_logged,
                "analyses": self.analyses,
            })


def recorded_final(state_path: Path, key: str) -> dict[str, Any] | None:
    """A tested run the state file already records (read by a Tune trial before training)."""
    try:
        rec = json.loads(state_path.read_text()).get("finals", {}).get(key)
    except (OSError, json.JSONDecodeError):
        return None
    return dict(rec) if rec else None
