"""The ``cross_subject`` kind: leave one subject out, for every arm and seed.

For every held-out subject ``k``, every arm (brain encoder x image table) and every seed in
``final_seeds``, train on the *other* subjects (the validation split is by image, across
all training subjects) and test on subject ``k``'s test set (AlignVis
``scripts/clip_eeg_cross.sh``). There is no search: the hyperparameters are ``[config]``,
optionally replaced by another run's:

* ``config_from_run = "<run id>"``: the resolved config of a finished run, for every arm.
  Only a config fixed before any test result existed is taken: a run that was never tested
  (a search trial, an untested train run), or a sweep's final, whose config its search
  selected on validation data (tag ``selected_by``). A tested run without that provenance, or
  one selected by a test metric, is refused: its config may have been chosen by looking at
  test scores. Never pick the run itself by its test score (e.g. "the best final"): both
  arms get ITS arm's tuned config, and choosing it by test biases the comparison; prefer
  ``config_from_sweep``;
* ``config_from_sweep = "<study run id>"``: each arm takes the best config of its own search
  in a finished sweep (so the aligned and the base arm keep their separate tuning).

Keys a study sets itself and machine keys are never taken over
(:data:`~brainalign.studies.spec.INHERIT_NEVER`); ``--set`` overrides still win.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import tracking
from .._checks import BrainalignError
from ..config import TrainConfig
from ..train.spec import RunSpec
from .searchspace import SearchSpace
from .spec import Study, StudyKind, as_str, inheritable, register_kind
from .units import RunUnit, SearchUnit, StudyContext, arm_subject_seed_keys, unit_key

__all__ = ["CrossSubjectOptions", "CrossSubjectPlan", "check_selection", "config_from_run", "configs_from_sweep"]

log = logging.getLogger(__name__)

_KEYS = ("config_from_run", "config_from_sweep")


@dataclass(frozen=True)
class CrossSubjectOptions:
    """Where the hyperparameters come from (``""``: the study's ``[config]``)."""

    config_from_run: str = ""
    config_from_sweep: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"config_from_run": self.config_from_run, "config_from_sweep": self.config_from_sweep}


def _parse(w: str, st: Mapping[str, Any], study: Study) -> CrossSubjectOptions:
    if len(study.subjects) < 2:
        raise BrainalignError(f"{w} subjects: a cross-subject study needs at least 2 subjects, got "
                              f"{list(study.subjects)}.")
    opts = CrossSubjectOptions(*(as_str(f"{w} {k}", st[k]) if st.get(k) else "" for k in _KEYS))
    if opts.config_from_run and opts.config_from_sweep:
        raise BrainalignError(f"{w}: use config_from_run or config_from_sweep, not both.")
    return opts


def check_selection(run_id: str, tags: Mapping[str, str], metrics: Mapping[str, float]) -> str:
    """Refuse a run whose config may have been chosen with test results; returns how it was selected.

    Accepted: a run never tested (no ``test_*`` metric), or one whose ``selected_by`` tag
    names a validation metric (a sweep's final). Refused: ``selected_by`` naming a test
    metric, or a tested run without selection provenance.

    Raises
    ------
    BrainalignError
        The run's config is not known to be fixed before any test result.
    """
    selected_by = tags.get("selected_by", "")
    if "test" in selected_by:
        raise BrainalignError(
            f"config_from_run: run {run_id} was selected by {selected_by!r}, a test metric: a config chosen on test "
            "data cannot be compared on test data. Use config_from_sweep (selected on validation) or a config fixed "
            "in [config]."
        )
    tested = sorted(k for k in metrics if k.startswith("test_"))
    if selected_by:
        return selected_by
    if tested:
        raise BrainalignError(
            f"config_from_run: run {run_id} (role {tags.get('role', '?')!r}) was tested ({', '.join(tested[:3])}...) "
            "and carries no `selected_by` tag, so nothing shows its config was fixed before its test result existed. "
            "Use config_from_sweep = \"<sweep's study run id>\" (each arm's own search, selected on validation), the "
            "run id of an untested run (e.g. a search trial), or copy the hyperparameters into [config]."
        )
    return f"untested run ({tags.get('role', 'train')})"


def config_from_run(run_id: str, uri: str) -> dict[str, Any]:
    """Hyperparameters of a finished run (its ``config/resolved_config.json`` artifact).

    Keys a study sets itself and machine keys are dropped; the run's config must have been
    fixed before any test result (:func:`check_selection`).

    Raises
    ------
    BrainalignError
        The run does not exist, has no resolved config, or its config may have been chosen
        with test results.
    """
    try:
        rec = tracking.get_run(run_id, uri)
    except Exception as e:
        raise BrainalignError(f"config_from_run: no MLflow run {run_id!r} at {uri}: {e}") from e
    how = check_selection(run_id, rec.tags, rec.metrics)
    log.info("config_from_run %s: config selected by %s; both arms use it", run_id, how)
    try:
        flat = tracking.download_json(run_id, "config/resolved_config.json", uri)
    except Exception as e:
        raise BrainalignError(
            f"config_from_run: cannot read config/resolved_config.json of MLflow run {run_id!r} at {uri}: {e}"
        ) from e
    return inheritable(flat)


def configs_from_sweep(study_run_id: str, uri: str, encoder: str) -> dict[str, dict[str, Any]]:
    """Image table -> best config of that table's search in a finished sweep.

    Reads the ``role=search`` children of the sweep's study run for brain encoder
    ``encoder`` and their ``best_config.json`` (selected on validation data by the sweep).

    Raises
    ------
    BrainalignError
        The run does not exist, or has no finished search of ``encoder``.
    """
    try:
        searches = tracking.children(study_run_id, uri, tags={"role": "search", "brain_encoder": encoder})
    except Exception as e:
        raise BrainalignError(f"config_from_sweep: no MLflow run {study_run_id!r} at {uri}: {e}") from e
    out: dict[str, dict[str, Any]] = {}
    for run in searches:
        if "image_table" not in run.tags:
            continue
        try:
            flat = tracking.download_json(run.run_id, "best_config.json", uri)
        except Exception:  # an unfinished search logs no best config
            continue
        out[run.tags["image_table"]] = inheritable(flat)
    if not out:
        raise BrainalignError(
            f"config_from_sweep: run {study_run_id!r} has no finished search of brain encoder {encoder!r} "
            "(expected the study run of a sweep, role=report)."
        )
    return out


class CrossSubjectPlan:
    """One tested run per (arm, held-out subject, seed); see the module docstring.

    The inherited configs are read from MLflow here, so a wrong run id fails before any
    compute.
    """

    def __init__(self, study: Study, uri: str) -> None:
        self.study = study
        self.options: CrossSubjectOptions = study.options
        o = self.options
        self.inherited: dict[str, dict[str, Any]] = {a.name: {} for a in study.arms()}
        if o.config_from_run:
            flat = config_from_run(o.config_from_run, uri)
            self.inherited = {a.name: flat for a in study.arms()}
        if o.config_from_sweep:
            for enc in study.encoders:
                found = configs_from_sweep(o.config_from_sweep, uri, enc)
                arms = [a for a in study.arms() if a.encoder == enc]
                missing = sorted({a.table for a in arms} - set(found))
                if missing:
                    raise BrainalignError(
                        f"config_from_sweep: sweep {o.config_from_sweep!r} tuned no {enc!r} search for table(s) "
                        f"{missing} (it tuned {sorted(found)}); choose pairs the sweep covered."
                    )
                self.inherited |= {a.name: found[a.table] for a in arms}
        for arm in study.arms():  # validated now, before any run
            try:
                TrainConfig.from_flat(self._flat(arm, study.subjects[0], study.final_seeds[0]))
            except BrainalignError as e:
                raise BrainalignError(f"the inherited config of {arm.name} is invalid: {e}") from None

    def _flat(self, arm: Any, held_out: str, seed: int) -> dict[str, Any]:
        st = self.study
        train = tuple(s for s in st.subjects if s != held_out)
        return st.run_flat(arm, subjects=train, test_subjects=(held_out,), seed=seed,
                           inherited=self.inherited[arm.name], run_name=f"{arm.name}-sub{held_out}-seed{seed}")

    def search_spaces(self) -> Mapping[str, SearchSpace]:
        return {}

    def searches(self, ctx: StudyContext) -> list[SearchUnit]:
        return []

    def run_keys(self) -> list[str]:
        return arm_subject_seed_keys(self.study)

    def training_sets(self) -> list[tuple[tuple[str, ...], int]]:
        st = self.study
        return [(tuple(t for t in st.subjects if t != held_out), k) for held_out in st.subjects
                for k in st.final_seeds]

    def runs(self, ctx: StudyContext, selected: Mapping[str, Mapping[str, Any]]) -> list[RunUnit]:
        st = self.study
        out = []
        for arm in st.arms():
            for held_out in st.subjects:
                for seed in st.final_seeds:
                    key = unit_key(arm, held_out, seed)
                    tags = {"study": st.name, "study_kind": st.kind, "arm": arm.arm, "subject": held_out,
                            "held_out_subject": held_out, "final_key": key}
                    out.append(RunUnit(
                        key=key, arm=arm, subject=held_out, seed=seed,
                        config=TrainConfig.from_flat(self._flat(arm, held_out, seed)).resolved(),
                        spec=RunSpec(role="final", parent_run_id=ctx.study_run_id, tags=tags, storage_name="fold",
                                     locations=ctx.locations,
                                     custom_resources=st.resources.custom_per_worker),
                    ))
        return out

    def describe(self) -> list[str]:
        st, o = self.study, self.options
        n = len(st.arms()) * len(st.subjects) * len(st.final_seeds)
        source = (f"config of run {o.config_from_run}" if o.config_from_run else
                  f"per-arm best configs of sweep {o.config_from_sweep}" if o.config_from_sweep else "[config]")
        return [f"study {st.name} (cross_subject): {len(st.subjects)} held-out subjects x {len(st.arms())} arms x "
                f"{len(st.final_seeds)} seeds = {n} runs (train on the other {len(st.subjects) - 1}); "
                f"hyperparameters from {source}"]

    def protocol(self) -> str:
        st = self.study
        return (f"Leave-one-subject-out: each run trains on the other {len(st.subjects) - 1} subject(s) "
                f"(validation split by image) and is tested on the held-out subject; {st.max_epochs} epochs, "
                f"seeds {list(st.final_seeds)}.")

    def params(self) -> dict[str, Any]:
        o = self.options
        return {"study.config_from_run": o.config_from_run, "study.config_from_sweep": o.config_from_sweep}


register_kind(StudyKind(
    name="cross_subject", keys=_KEYS, parse=_parse, plan=CrossSubjectPlan,
    summary="leave one subject out: train on the others, test on the held-out subject, every arm and seed",
))
