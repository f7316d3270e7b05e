"""Studies: per-encoder Ray Tune + Optuna searches, multi-seed finals, aligned-vs-base report.

``load_study(path)`` validates a study file and its search spaces without touching data or
Ray; ``run_study(study)`` runs (or resumes) it. Tune and Optuna are imported only by
:mod:`brainalign.sweep.search`, lazily, so importing this package is light.
"""

from .report import ComparisonStats, FinalRow, PairedTest, compare, mean_sem, paired_tests
from .runner import StudyOutcome, run_study
from .study import (
    Arm,
    EncoderSpec,
    PairSpec,
    ParamSpec,
    Resources,
    SearchSpace,
    SimulateSpec,
    Study,
    ensure_dataset,
    load_searchspace,
    load_study,
    validate_data,
)

__all__ = [
    "Arm",
    "ComparisonStats",
    "EncoderSpec",
    "FinalRow",
    "PairSpec",
    "PairedTest",
    "ParamSpec",
    "Resources",
    "SearchSpace",
    "SimulateSpec",
    "Study",
    "StudyOutcome",
    "compare",
    "ensure_dataset",
    "load_searchspace",
    "load_study",
    "mean_sem",
    "paired_tests",
    "run_study",
    "validate_data",
]
