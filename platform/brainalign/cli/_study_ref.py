"""Resolve a ``--study`` argument: a study file or a study name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StudyRef:
    """A study as the analysis commands address it."""

    name: str
    experiment: str
    study_run_id: str | None = None


def study_ref(ref: str) -> StudyRef:
    """``jobs/mini_study.toml`` -> its name, experiment and study run (from its state file or
    MLflow's newest); anything else is a study name whose experiment is the name."""
    if ref.endswith(".toml") or Path(ref).is_file():
        from .. import tracking
        from ..studies import load_study
        from ..studies.engine import study_run_of

        study = load_study(ref)
        return StudyRef(study.name, study.experiment, study_run_of(study, tracking.tracking_uri()) or None)
    return StudyRef(ref, ref)
