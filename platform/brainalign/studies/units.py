"""What a plan hands the engine: typed, frozen units of work.

A *plan* (one per study kind) turns a :class:`~brainalign.studies.spec.Study` into

* :class:`SearchUnit` s: one Optuna + ASHA search each, whose trials are Train runs that
  never see test data; a search's result is its best config (selected on validation);
* :class:`RunUnit` s: one tested Train run each (a sweep's finals, a cross-subject fold),
  complete with its resolved :class:`~brainalign.TrainConfig` and
  :class:`~brainalign.train.spec.RunSpec`. They are what the report compares.

The engine runs the searches first, then asks the plan for its run units given the search
results, dispatches them and reports. Units are what crosses the Ray boundary: a Tune trial
receives one unit and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import TrainConfig
from ..paths import Locations
from ..train.spec import RunSpec
from .searchspace import SearchSpace
from .spec import Arm, Study

__all__ = ["Plan", "RunUnit", "SearchUnit", "StudyContext", "arm_subject_seed_keys", "unit_key"]


@dataclass(frozen=True)
class StudyContext:
    """Facts of one execution of a study that units need.

    Parameters
    ----------
    study_run_id : str
        The study's MLflow run (``role=report``); every search and tested run nests under it.
    locations : Locations
        The stores, resolved by the driver.
    """

    study_run_id: str
    locations: Locations


@dataclass(frozen=True)
class RunUnit:
    """One tested Train run of a study.

    Parameters
    ----------
    key : str
        Stable id (``<arm>/sub-<subject>/seed-<seed>``): state key and MLflow tag ``final_key``.
    arm : Arm
        Encoder and image table.
    subject : str
        The subject the run is tested on (a report row's subject).
    seed : int
        The run's seed.
    config : TrainConfig
        The resolved config.
    spec : RunSpec
        Role, parent run, tags and stores.
    """

    key: str
    arm: Arm
    subject: str
    seed: int
    config: TrainConfig
    spec: RunSpec


@dataclass(frozen=True)
class SearchUnit:
    """One search: Optuna TPE proposes, ASHA prunes, trials train on validation only.

    Parameters
    ----------
    key : str
        Stable id (the arm's name): state key, MLflow tag ``search``, Tune experiment folder.
    arm : Arm
        Encoder and image table searched.
    space : SearchSpace
        What varies, the selection metric and its mode.
    trial : TrainConfig
        Every trial's config before the searched parameters.
    trial_spec : RunSpec
        Every trial's run spec (role ``trial``, no test, no checkpoint); its parent is set to
        the search's MLflow run when the engine creates it.
    trials, max_epochs, grace_period, reduction_factor, seed : int
        Budget, ASHA's ``max_t`` / ``grace_period`` / ``reduction_factor`` and the sampler seed.
    tags : mapping
        Tags of the search's MLflow run (``role=search`` is added by the engine).
    params : mapping
        Params of the search's MLflow run.
    """

    key: str
    arm: Arm
    space: SearchSpace
    trial: TrainConfig
    trial_spec: RunSpec
    trials: int
    max_epochs: int
    grace_period: int
    reduction_factor: int
    seed: int
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)


def unit_key(arm: Arm, subject: str, seed: int) -> str:
    """``<encoder>__<backbone>__<alignment>/sub-<subject>/seed-<seed>``."""
    return f"{arm.name}/sub-{subject}/seed-{seed}"


def arm_subject_seed_keys(study: Study) -> list[str]:
    """One key per arm x study subject x final seed (arm-major): the tested runs of the
    sweep and cross-subject kinds."""
    return [unit_key(a, s, k) for a in study.arms() for s in study.subjects for k in study.final_seeds]


class Plan(Protocol):
    """How a kind of study turns into units (see the module docstring)."""

    study: Study

    def search_spaces(self) -> Mapping[str, SearchSpace]:
        """Encoder -> search space (empty for kinds that do not search)."""
        ...

    def searches(self, ctx: StudyContext) -> list[SearchUnit]:
        """The searches, in order (may be empty)."""
        ...

    def run_keys(self) -> list[str]:
        """Keys of the tested runs (known before any search runs)."""
        ...

    def runs(self, ctx: StudyContext, selected: Mapping[str, Mapping[str, Any]]) -> list[RunUnit]:
        """The tested runs, given each search's best config (``search key -> flat config``)."""
        ...

    def training_sets(self) -> list[tuple[tuple[str, ...], int]]:
        """Every distinct ``(training subjects, seed)`` a run of the plan trains on (the size
        checks before compute use them: the largest batch against the smallest set)."""
        ...

    def describe(self) -> list[str]:
        """Lines that say what the study runs (printed by ``check`` and ``run``)."""
        ...

    def protocol(self) -> str:
        """One paragraph for the report: how the compared runs were made."""
        ...

    def params(self) -> dict[str, Any]:
        """MLflow params of the study run."""
        ...
