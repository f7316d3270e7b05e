"""A study's dataset: simulate it when the study says so, then check the study against it.

Both run before Ray starts: a subject, a table or an encoder shape that does not fit the
dataset fails in seconds, not after a search.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._checks import BrainalignError, suggest
from .searchspace import SearchSpace
from .spec import SimulateSpec, Study

__all__ = ["ensure_dataset", "validate_data"]

log = logging.getLogger(__name__)


def _simulated_contents(spec: SimulateSpec) -> tuple[tuple[str, ...], set[str]]:
    from ..data.simulate import make_params

    params = make_params(spec.preset, spec.overrides)
    subjects = tuple(f"{i + 1:02d}" for i in range(params.n_subjects))
    tables = {f"{b}:{a}" for b in params.encoder_names for a in ("simulated", "none")}
    return subjects, tables


def _check_contents(study: Study, subjects: Sequence[str], tables: Iterable[str], where: str) -> None:
    missing = [s for s in study.subjects if s not in subjects]
    if missing:
        raise BrainalignError(
            f"study {study.name}: subjects {missing} are not in {where} (subjects: {list(subjects)})."
        )
    have = sorted(tables)
    for pair in study.pairs:
        for t in (pair.aligned_table, pair.base_table):
            if t not in have:
                raise BrainalignError(
                    f"study {study.name}: image table {t!r} is not in {where} (tables: {have}).{suggest(t, have)}"
                )


def ensure_dataset(study: Study) -> Path:
    """Create the study's dataset with the simulator if it is configured and missing.

    The subjects and tables a simulation would produce are checked first, so a typo fails
    before minutes of simulation. An existing dataset is left as it is (the simulator
    refuses one that was simulated with other settings).

    Returns
    -------
    Path
        The absolute dataset root.
    """
    root = study.dataset_path
    if study.simulate is None:
        return root
    subjects, tables = _simulated_contents(study.simulate)
    _check_contents(study, subjects, tables, f"the simulated {study.simulate.preset!r} preset")
    from ..data.simulate import simulate_dataset

    s = study.simulate
    log.info("dataset %s (simulated preset %s, seed %d, null=%s)", root, s.preset, s.seed, s.null)
    simulate_dataset(root, s.preset, seed=s.seed, null=s.null, overrides=dict(s.overrides) or None,
                     progress=False)
    return root


def validate_data(study: Study, spaces: Mapping[str, SearchSpace] | None = None,
                  training_sets: Sequence[tuple[tuple[str, ...], int]] = ()) -> None:
    """Check the study against its dataset: subjects, tables, sizes and encoder input shapes.

    Parameters
    ----------
    study : Study
        The study.
    spaces : mapping, optional
        Encoder -> search space: every searched ``arch.*`` bound is built too.
    training_sets : sequence of (subjects, seed)
        What the plan's runs train on (``Plan.training_sets``): the largest batch size of the
        study and its search spaces must fit the smallest of them, and every validation split
        must hold enough images (the same bounds a run checks, :func:`~brainalign.data.prepare.check_sizes`).

    Raises
    ------
    BrainalignError
        The dataset is missing, a study subject or image table is not in it, a size cannot
        work, or an encoder (with the ``[config]`` architecture options) cannot take the
        dataset's epochs.
    """
    from ..data.contract import open_dataset, read_table_meta
    from ..encoders import create_encoder

    ds = open_dataset(study.dataset_path)
    tables = ds.tables()
    _check_contents(study, ds.meta.subjects, tables, f"dataset {ds.root}")
    from ..data.prepare import check_normalization

    for mode in sorted({str(v) for v in _candidates(study, spaces or {}, "data.normalize")}):
        try:  # fMRI (one sample per voxel) cannot be centred over time
            check_normalization(mode, ds.meta.n_times)
        except BrainalignError as e:
            raise BrainalignError(f"study {study.name} ({ds.root}): {e}") from None
    _check_sizes(study, ds, spaces or {}, training_sets)
    dims = {t: int(read_table_meta(tables[t])["dim"]) for p in study.pairs for t in (p.aligned_table, p.base_table)}
    fixed = dict(study.config) | dict(study.overrides)
    arch_base = {k[5:]: v for k, v in fixed.items() if k.startswith("arch.")}
    for enc in study.encoders:
        space = (spaces or {}).get(enc)
        searched = [q for q in space.params if q.name.startswith("arch.")] if space else []
        for spec in [None, *searched]:
            for value in spec.candidates() if spec else [None]:
                arch = dict(arch_base)
                if spec is not None:
                    arch[spec.name[5:]] = value
                try:
                    create_encoder(enc, n_chans=ds.meta.n_chans, n_times=ds.meta.n_times,
                                   embed_dim=min(dims.values()), n_subjects=1, **arch)
                except BrainalignError as e:
                    what = f" with {spec.name} = {value!r}" if spec else ""
                    raise BrainalignError(
                        f"study {study.name}: encoder {enc!r}{what} cannot take the epochs of {ds.root} "
                        f"({ds.meta.n_chans} channels x {ds.meta.n_times} samples): {e}"
                    ) from None


def _candidates(study: Study, spaces: Mapping[str, SearchSpace], key: str) -> list[Any]:
    """Every value ``key`` can take in the study's runs: the fixed value and searched choices/bounds."""
    from ..config import TrainConfig

    fixed = dict(study.config) | dict(study.overrides) | {"epochs": study.max_epochs}
    # arch.* options belong to the study's encoders (checked per encoder elsewhere), not to the
    # default one a bare TrainConfig would check them against
    fixed = {k: v for k, v in fixed.items() if not k.startswith("arch.")}
    values = [TrainConfig.from_flat(fixed, strict_types=False).to_flat()[key]]
    for space in spaces.values():
        values += [c for p in space.params if p.name == key for c in p.candidates()]
    return values


def _check_sizes(study: Study, ds: Any, spaces: Mapping[str, SearchSpace],
                 training_sets: Sequence[tuple[tuple[str, ...], int]]) -> None:
    """The size bounds of a run (``data.prepare.check_sizes``) for every training set of the
    plan, with the worst case of the study: its largest batch_size, smallest and largest
    val_fraction, every train_trials and val_split it can use."""
    from ..data.prepare import check_sizes, planned_sizes

    batch = max(int(b) for b in _candidates(study, spaces, "batch_size"))
    fractions = [float(v) for v in _candidates(study, spaces, "data.val_fraction")]
    splits = sorted({str(v) for v in _candidates(study, spaces, "data.val_split")})
    modes = sorted({str(v) for v in _candidates(study, spaces, "data.train_trials")})
    for subjects, seed in dict.fromkeys(training_sets):
        for trials in modes:
            for vf in sorted({min(fractions), max(fractions)}):
                for split in splits:
                    rows, n_val = planned_sizes(ds, subjects, train_trials=trials, val_fraction=vf,
                                                val_split=split, seed=seed)
                    try:
                        check_sizes(n_train_rows=rows, n_val_images=n_val, batch_size=batch,
                                    num_workers=study.resources.workers_per_trial, val_fraction=vf,
                                    where=f"sub-{','.join(subjects)} of {ds.root}", planned=True)
                    except BrainalignError as e:
                        raise BrainalignError(
                            f"study {study.name}: {e} (the largest batch_size of the study and its search spaces "
                            f"is {batch}; data.val_fraction {vf:g}, data.train_trials {trials!r})"
                        ) from None
