"""The ``sweep`` kind: per-arm searches, then finals per subject and seed.

Every arm (brain encoder x image table) gets its own Optuna TPE + ASHA search with the same
budget, on ``search_subject``'s validation split only. Each arm's best config is then
retrained for every study subject (one model per subject) and every seed in ``final_seeds``
and tested: the finals are the runs the report compares.

``[study]`` keys of this kind: ``search_subject`` (default: the first subject), ``trials``,
``grace_period`` (default ``max_epochs // 4``), ``reduction_factor`` (default 2), ``seed``
(Optuna's sampler and every trial's seed); each entry of ``encoders`` may name its
``searchspace`` (default ``searchspaces/<encoder>.toml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._checks import BrainalignError
from ..config import TrainConfig
from ..train.spec import RunSpec
from .searchspace import SearchSpace, load_searchspace
from .spec import Study, StudyKind, as_int, need, register_kind
from .units import RunUnit, SearchUnit, StudyContext, arm_subject_seed_keys, unit_key

__all__ = ["SweepOptions", "SweepPlan"]

_KEYS = ("search_subject", "trials", "grace_period", "reduction_factor", "seed")


@dataclass(frozen=True)
class SweepOptions:
    """The sweep's own ``[study]`` settings.

    Parameters
    ----------
    search_subject : str
        Subject every search trains and validates on.
    trials, grace_period, reduction_factor : int
        Optuna trials per search and ASHA's grace period / reduction factor (epochs).
    seed : int
        Seed of Optuna's sampler and of every search trial.
    spaces : tuple of SearchSpace
        One per encoder, in the study's encoder order.
    select_metric : str
        The checkpoint metric of every run: the study's, or (unstated) the one its search
        spaces rank trials by, so that search and checkpoint select on the same quantity.
    """

    search_subject: str
    trials: int
    grace_period: int
    reduction_factor: int
    seed: int
    spaces: tuple[SearchSpace, ...]
    select_metric: str = "val_loss"

    def space(self, encoder: str) -> SearchSpace:
        return next(s for s in self.spaces if s.encoder == encoder)

    def to_json(self) -> dict[str, Any]:
        return {"search_subject": self.search_subject, "trials": self.trials, "grace_period": self.grace_period,
                "reduction_factor": self.reduction_factor, "seed": self.seed,
                "spaces": {s.encoder: s.to_json() for s in self.spaces}}


def _space_path(where: str, study_file: Path, encoder: str, given: str | None) -> Path:
    rel = Path(given) if given else Path("searchspaces") / f"{encoder}.toml"
    if rel.is_absolute():
        return rel
    tried = [study_file.parent / rel, study_file.parent.parent / rel, Path.cwd() / rel]
    for cand in tried:
        if cand.is_file():
            return cand.resolve()
    raise BrainalignError(
        f"{where}: no search space for encoder {encoder!r}: looked for {rel} next to the study file, one "
        f"level up and in the working directory ({', '.join(str(t) for t in tried)})."
    )


def _checkpoint_metric(w: str, spaces: list[SearchSpace]) -> str:
    """The checkpoint metric that matches the spaces' search metric (all must agree)."""
    from .searchspace import SEARCH_FOR_SELECT

    back = {v: k for k, v in SEARCH_FOR_SELECT.items()} | {"val_top1": "val_top1"}
    found = {s.metric for s in spaces}
    picked = {back.get(m, "") for m in found}
    if len(picked) != 1 or "" in picked:
        raise BrainalignError(
            f"{w}: the search spaces rank trials by {sorted(found)}, which do not give one checkpoint metric "
            f"(val_loss or val_top1). State it: [study] select_metric = \"val_loss\" or \"val_top1\"."
        )
    return picked.pop()


def _parse(w: str, st: Mapping[str, Any], study: Study) -> SweepOptions:
    search_subject = str(st.get("search_subject", study.subjects[0]))
    if search_subject not in study.subjects:
        raise BrainalignError(
            f"{w} search_subject {search_subject!r} is not one of the study subjects {list(study.subjects)}."
        )
    trials = as_int(f"{w} trials", need(w, st, "trials"), 1)
    grace = as_int(f"{w} grace_period", st.get("grace_period", max(1, study.max_epochs // 4)), 1)
    if grace > study.max_epochs:
        raise BrainalignError(f"{w} grace_period ({grace}) must be <= max_epochs ({study.max_epochs}).")
    base = dict(study.config) | dict(study.overrides) | {"epochs": study.max_epochs}
    spaces = []
    for enc in study.encoders:
        path = _space_path(w, Path(study.path), enc, study.searchspaces.get(enc))
        space = load_searchspace(path, enc, base, select_metric=study.select_metric or None)
        clash = sorted(set(space.names) & set(study.overrides))
        if clash:
            raise BrainalignError(f"--set {clash} would override what the search space {path} searches.")
        spaces.append(space)
    return SweepOptions(
        select_metric=study.select_metric or _checkpoint_metric(w, spaces),
        search_subject=search_subject, trials=trials, grace_period=grace,
        reduction_factor=as_int(f"{w} reduction_factor", st.get("reduction_factor", 2), 2),
        seed=as_int(f"{w} seed", st.get("seed", 0), 0), spaces=tuple(spaces),
    )


class SweepPlan:
    """Searches (one per arm) then finals (arm x subject x seed); see the module docstring."""

    def __init__(self, study: Study, uri: str) -> None:
        self.study = study
        self.options: SweepOptions = study.options

    def search_spaces(self) -> Mapping[str, SearchSpace]:
        return {s.encoder: s for s in self.options.spaces}

    def searches(self, ctx: StudyContext) -> list[SearchUnit]:
        st, o = self.study, self.options
        out = []
        for arm in st.arms():
            space = o.space(arm.encoder)
            tags = {"study": st.name, "study_kind": st.kind, "search": arm.name, "arm": arm.arm,
                    "subject": o.search_subject}
            flat = st.run_flat(arm, subjects=(o.search_subject,), seed=o.seed, run_name=f"{arm.name}-trial")
            out.append(SearchUnit(
                key=arm.name, arm=arm, space=space, trial=TrainConfig.from_flat(flat).resolved(),
                trial_spec=RunSpec(role="trial", tags=tags, storage_name="trial", evaluate_test=False,
                                   save_checkpoint=False, locations=ctx.locations,
                                   custom_resources=st.resources.custom_per_worker),
                trials=o.trials, max_epochs=st.max_epochs, grace_period=o.grace_period,
                reduction_factor=o.reduction_factor, seed=o.seed,
                tags=tags | {"brain_encoder": arm.encoder, "backbone": arm.backbone, "alignment": arm.alignment,
                             "aligned": str(arm.aligned).lower(), "seed": str(o.seed), "image_table": arm.table},
                params={"searchspace": space.path, "metric": space.metric, "mode": space.mode, "trials": o.trials,
                        "max_epochs": st.max_epochs, "grace_period": o.grace_period,
                        "reduction_factor": o.reduction_factor, "optuna_seed": o.seed, "image_table": arm.table,
                        "search_subject": o.search_subject},
            ))
        return out

    def run_keys(self) -> list[str]:
        return arm_subject_seed_keys(self.study)

    def training_sets(self) -> list[tuple[tuple[str, ...], int]]:
        st, o = self.study, self.options
        return [((o.search_subject,), o.seed)] + [((s,), k) for s in st.subjects for k in st.final_seeds]

    def runs(self, ctx: StudyContext, selected: Mapping[str, Mapping[str, Any]]) -> list[RunUnit]:
        st, o = self.study, self.options
        out = []
        for arm in st.arms():
            best = selected[arm.name]
            selected_by = f"{o.space(arm.encoder).metric} on sub-{o.search_subject} validation"
            for subject in st.subjects:
                for seed in st.final_seeds:
                    key = unit_key(arm, subject, seed)
                    flat = st.run_flat(arm, subjects=(subject,), seed=seed, inherited=best,
                                       run_name=f"{arm.name}-sub{subject}-seed{seed}")
                    tags = {"study": st.name, "study_kind": st.kind, "search": arm.name, "arm": arm.arm,
                            "subject": subject, "final_key": key, "selected_by": selected_by}
                    out.append(RunUnit(
                        key=key, arm=arm, subject=subject, seed=seed,
                        config=TrainConfig.from_flat(flat, strict_types=False).resolved(),
                        spec=RunSpec(role="final", parent_run_id=ctx.study_run_id, tags=tags, storage_name="final",
                                     locations=ctx.locations,
                                     custom_resources=st.resources.custom_per_worker),
                    ))
        return out

    def describe(self) -> list[str]:
        st, o = self.study, self.options
        n = len(st.arms())
        return [
            f"study {st.name} (sweep): {len(st.encoders)} encoder(s) x {len(st.pairs)} pair(s) = {n} searches of "
            f"{o.trials} trials (<= {st.max_epochs} epochs, ASHA grace {o.grace_period}) on sub-{o.search_subject}; "
            f"{n * len(st.subjects) * len(st.final_seeds)} finals ({len(st.subjects)} subjects x "
            f"{len(st.final_seeds)} seeds per arm)"
        ]

    def protocol(self) -> str:
        st, o = self.study, self.options
        return (f"Within-subject. Each arm (brain encoder × image table) was tuned by its own Optuna TPE + ASHA "
                f"search of {o.trials} trials on sub-{o.search_subject}'s validation split (selection metric "
                f"{st.select_metric}: trials ranked by it, checkpoints kept at its best epoch); its best config was "
                f"retrained on every subject (one model per subject, {st.max_epochs} epochs, seeds "
                f"{list(st.final_seeds)}) and tested on that subject's test set.")

    def params(self) -> dict[str, Any]:
        o = self.options
        return {"study.search_subject": o.search_subject, "study.trials": o.trials,
                "study.grace_period": o.grace_period, "study.reduction_factor": o.reduction_factor,
                "study.seed": o.seed}


register_kind(StudyKind(
    name="sweep", keys=_KEYS, parse=_parse, plan=SweepPlan, searches=True,
    summary="per-arm Optuna+ASHA searches on one subject, then finals per subject and seed (within-subject)",
))
