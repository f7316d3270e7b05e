"""Studies: one file format, one engine and one report for every kind of study.

A study file (``jobs/*.toml``; ``[study] kind = "sweep"`` by default, or ``"cross_subject"``)
is read by :func:`load_study` without touching data, MLflow or Ray. The kind's *plan* turns
it into typed units (searches, tested runs); :func:`run_study` runs any plan with resume,
a stop guard and one report. ``brainalign study run|check|report|status`` is the CLI.

Layout of the package (folder -> responsibility):

* ``spec.py``: the study-file format, the study-owned config keys and the kind registry;
* ``searchspace.py``: search-space files;
* ``data.py``: the study's dataset (simulated when asked) checked against the study;
* ``units.py``: the typed units a plan produces and the ``Plan`` protocol;
* ``sweep.py``, ``cross_subject.py``: one module per kind (options, parser, plan);
* ``engine.py``: runs any plan (state, resume, stop guard, dispatch, report logging);
* ``report.py`` and ``_stats.py``: the one report and its statistics;
* ``progress.py``: ``status`` and the live console view, both read from MLflow;
* ``_tune.py``: the only Tune/Optuna importer; ``_state.py``: the resume state file.

Importing this package is light: Tune, Optuna, Ray and MLflow load when a study runs.
"""

from . import cross_subject, sweep  # noqa: F401  (register the kinds)
from ._stats import ComparisonStats, FinalRow, PairedTest, compare, mean_sem, paired_tests, summarize
from .cross_subject import CrossSubjectPlan, config_from_run, configs_from_sweep
from .data import ensure_dataset, validate_data
from .engine import (
    JobStopped,
    StopGuard,
    StudyOutcome,
    check_study,
    make_plan,
    render_report,
    run_study,
    study_folder,
    study_status,
)
from .report import Report, build_report
from .searchspace import ParamSpec, SearchSpace, load_searchspace
from .spec import (
    STUDY_OWNED,
    Arm,
    PairSpec,
    Resources,
    SimulateSpec,
    Study,
    StudyKind,
    kind_info,
    list_kinds,
    load_study,
    register_kind,
)
from .sweep import SweepPlan
from .units import Plan, RunUnit, SearchUnit, StudyContext

__all__ = [
    "STUDY_OWNED",
    "Arm",
    "ComparisonStats",
    "CrossSubjectPlan",
    "FinalRow",
    "JobStopped",
    "PairSpec",
    "PairedTest",
    "ParamSpec",
    "Plan",
    "Report",
    "Resources",
    "RunUnit",
    "SearchSpace",
    "SearchUnit",
    "SimulateSpec",
    "StopGuard",
    "Study",
    "StudyContext",
    "StudyKind",
    "StudyOutcome",
    "SweepPlan",
    "build_report",
    "check_study",
    "compare",
    "config_from_run",
    "configs_from_sweep",
    "ensure_dataset",
    "kind_info",
    "list_kinds",
    "load_searchspace",
    "load_study",
    "make_plan",
    "mean_sem",
    "paired_tests",
    "register_kind",
    "render_report",
    "run_study",
    "study_folder",
    "study_status",
    "summarize",
    "validate_data",
]
