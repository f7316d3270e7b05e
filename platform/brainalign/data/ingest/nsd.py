"""Natural Scenes Dataset (Allen et al. 2022), nsdgeneral voxels, into the data contract.

Inputs:

* per subject, an HDF5 file of single-trial responses in the nsdgeneral ROI, dataset
  ``betas`` (MindEye2's ``betas_all_subjXX_fp32_renorm.hdf5``) or ``voxels`` (the
  ``subjXX_nsdgeneral.hdf5`` files AlignVis reads), shape ``(n_trials, n_voxels)``, rows in
  the order the trials were run;
* ``nsd_expdesign.mat`` (read with :func:`scipy.io.loadmat`): ``masterordering`` (30000
  trials -> 1-based index into a subject's 10000 images), ``subjectim`` (8 x 10000, 1-based
  NSD ids 1..73000) and, if present, ``sharedix`` (the shared 1000 NSD ids, 1-based).

Rule (AlignVis ``prepare_nsd.py``): trial ``t`` showed NSD image
``subjectim[s-1, masterordering[t]-1] - 1`` (0-based); it is a test trial iff
``masterordering[t] <= 1000``, i.e. one of the shared-1000 images every subject saw (checked
against ``sharedix`` when present). AlignVis uses the first 27750 trials (37 sessions); pass
``n_trials=27750`` to match it (default: every row of the HDF5 file).

Output: modality ``fmri``, one "channel" per voxel (``v00000``...), ``n_times == 1``; by
default one repetition-averaged vector per image (``repetition == AVERAGED``), or one row per
trial with ``repetitions="keep"``. Catalog: ``image_id`` = ``nsd-<0-based id, 5 digits>``;
``concept`` = the image id (NSD has no concept labels, so train and test "concepts" are
disjoint exactly when the images are); ``path`` = ``nsd_images/<image_id>.png`` when
``stimuli`` (``nsd_stimuli.hdf5``, dataset ``imgBrick``, ``(73000, 425, 425, 3)`` uint8) is
given, and the images the subjects saw are then exported there as PNG (so
``brainalign embed`` can read them); else None.

Subjects' ROIs have different voxel counts (subject 1: 15724, 2: 14278, ...); a dataset has
one channel list, so subjects can share a root only if their counts agree. Otherwise ingest
one root per subject (``--out data/nsd-sub01``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..._checks import BrainalignError, check_option
from ..contract import AVERAGED, DatasetMeta
from ._common import (
    Catalog,
    Chunk,
    IngestResult,
    SplitStream,
    SubjectPlan,
    check_chunk_mb,
    check_existing,
    check_finite,
    field_error,
    items_per_chunk,
    run_ingest,
    subject_id,
)

__all__ = ["BETAS_KEYS", "IMAGES_DIR", "image_id", "ingest_nsd", "ingest_nsd_per_subject", "read_expdesign"]

log = logging.getLogger(__name__)

#: HDF5 dataset names tried, in order, when ``key`` is not given.
BETAS_KEYS = ("betas", "voxels")
N_SHARED = 1000


def image_id(nsd_id: int) -> str:
    """Catalog id of a 0-based NSD image index: ``2950 -> 'nsd-02950'``."""
    return f"nsd-{int(nsd_id):05d}"


@dataclass(frozen=True)
class ExpDesign:
    """The parts of ``nsd_expdesign.mat`` the ingest uses (1-based, as stored)."""

    path: Path
    masterordering: np.ndarray  # (n_trials_total,) int
    subjectim: np.ndarray  # (n_subjects, n_images_per_subject) int
    sharedix: np.ndarray | None  # (1000,) int or None


def read_expdesign(path: Path | str) -> ExpDesign:
    """Read and check ``nsd_expdesign.mat``.

    Raises
    ------
    BrainalignError
        If a key is missing or a value is out of range.
    """
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise BrainalignError(f"{path} does not exist; expected nsd_expdesign.mat.")
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, OSError, NotImplementedError) as e:
        raise BrainalignError(f"{path}: not a readable MATLAB file ({e}).") from e
    for k in ("masterordering", "subjectim"):
        if k not in mat:
            raise BrainalignError(
                f"{path}: missing key {k!r}; expected masterordering, subjectim (and sharedix)."
            )

    def ints(k: str, ndim: int) -> np.ndarray:
        a = np.asarray(mat[k])
        a = a.reshape(-1) if ndim == 1 else a
        if (
            a.ndim != ndim
            or a.size == 0
            or not np.isfinite(a.astype(float)).all()
            or (a != np.round(a)).any()
        ):
            raise field_error(
                path, k, f"a non-empty {ndim}-D array of whole numbers", f"shape {a.shape} {a.dtype}"
            )
        return a.astype(np.int64)

    mo, sim = ints("masterordering", 1), ints("subjectim", 2)
    if mo.min() < 1 or mo.max() > sim.shape[1]:
        raise field_error(
            path,
            "masterordering",
            f"1-based indices into subjectim's {sim.shape[1]} columns",
            f"values {mo.min()}..{mo.max()}",
        )
    if sim.min() < 1:
        raise field_error(path, "subjectim", "1-based NSD ids (>= 1)", f"minimum {sim.min()}")
    if sim.shape[1] <= N_SHARED:
        raise field_error(
            path,
            "subjectim",
            f"more than {N_SHARED} images per subject (the first {N_SHARED} shared)",
            f"shape {sim.shape}",
        )
    shared = ints("sharedix", 1) if "sharedix" in mat else None
    return ExpDesign(path, mo, sim, shared)


@dataclass(frozen=True)
class _Betas:
    path: Path
    key: str
    subject: str
    n_trials: int
    n_voxels: int
    groups: dict[str, dict[int, list[int]]]  # split -> nsd id (0-based) -> trial rows


def _open_betas(path: Path, subject: str, design: ExpDesign, key: str | None, n_trials: int | None) -> _Betas:
    import h5py

    if not path.is_file():
        raise BrainalignError(
            f"{path} does not exist; expected the nsdgeneral HDF5 file of subject {subject}."
        )
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise BrainalignError(f"{path}: not a readable HDF5 file ({e}).") from e
    with h5:
        keys = [key] if key else [k for k in BETAS_KEYS if k in h5]
        if not keys or keys[0] not in h5:
            raise BrainalignError(
                f"{path}: missing dataset {key or ' or '.join(BETAS_KEYS)!r}; found {sorted(h5)}."
            )
        ds = h5[keys[0]]
        if ds.ndim != 2:
            raise field_error(path, keys[0], "a 2-D (n_trials, n_voxels) array", f"shape {ds.shape}")
        if ds.dtype.kind not in "fiu":
            raise field_error(path, keys[0], "numeric voxel values", f"dtype {ds.dtype}")
        rows, n_vox = int(ds.shape[0]), int(ds.shape[1])
    n_design = design.masterordering.size
    if n_vox == n_design and rows != n_design:
        raise field_error(
            path,
            keys[0],
            f"(n_trials, n_voxels) with one row per trial of {design.path.name} ({n_design} trials)",
            f"shape {ds.shape}: the columns, not the rows, match the design's trial count, so the array is "
            "stored transposed (n_voxels, n_trials), as MATLAB writes it. Transpose it (e.g. h5py: "
            "f.create_dataset(key, data=old[...].T)) and ingest the result",
        )
    if n_vox > rows and n_vox <= n_design and n_trials is None:
        raise field_error(
            path,
            keys[0],
            f"(n_trials, n_voxels): trials as rows (real NSD files: ~30000 x ~15000), at most {n_design} "
            f"trials ({design.path.name})",
            f"shape {ds.shape}: more columns than rows, and the columns could be this design's trials, so the "
            "array looks stored transposed (n_voxels, n_trials), as MATLAB writes it. Transpose it; or, if the "
            "rows really are trials, say how many to use with --n-trials",
        )
    if n_vox > rows:
        log.warning(
            "%s: %r has more columns (%d) than rows (%d). Rows must be trials and columns voxels; real NSD "
            "files have ~30000 trials x ~15000 voxels. If this file is stored transposed, transpose it first.",
            path, keys[0], n_vox, rows,
        )
    n = rows if n_trials is None else int(n_trials)
    if not 1 <= n <= rows:
        raise field_error(path, keys[0], f"at least n_trials={n} rows", rows)
    if n > design.masterordering.size:
        raise field_error(
            path,
            keys[0],
            f"at most {design.masterordering.size} trials (masterordering in {design.path.name})",
            n,
        )
    s = int(subject)
    if s > design.subjectim.shape[0]:
        raise field_error(
            design.path, "subjectim", f"a row for subject {s}", f"{design.subjectim.shape[0]} rows"
        )
    mo = design.masterordering[:n]
    nsd = design.subjectim[s - 1, mo - 1] - 1
    test = mo <= N_SHARED
    if design.sharedix is not None:
        in_shared = np.isin(nsd + 1, design.sharedix)
        bad = np.flatnonzero(in_shared != test)
        if bad.size:
            t = int(bad[0])
            raise field_error(
                design.path,
                "sharedix",
                f"the shared images to be exactly those with masterordering <= {N_SHARED}",
                f"trial {t} (NSD id {nsd[t] + 1}) disagrees",
            )
    groups: dict[str, dict[int, list[int]]] = {"train": {}, "test": {}}
    for t, (img, is_test) in enumerate(zip(nsd.tolist(), test.tolist(), strict=True)):
        groups["test" if is_test else "train"].setdefault(int(img), []).append(t)
    log.info(
        "%s: %d trials -> %d train images, %d test images, %d voxels",
        path.name,
        n,
        len(groups["train"]),
        len(groups["test"]),
        n_vox,
    )
    return _Betas(path, keys[0], subject, n, n_vox, groups)


def _stream(b: _Betas, split: str, repetitions: str, chunk_mb: float) -> SplitStream:
    import h5py

    images = sorted(b.groups[split])
    groups = b.groups[split]
    per = items_per_chunk(b.n_voxels * 8, chunk_mb)  # trials per chunk
    keep = repetitions == "keep"

    def batches() -> Iterator[list[int]]:
        batch: list[int] = []
        n = 0
        for img in images:
            if batch and n + len(groups[img]) > per:
                yield batch
                batch, n = [], 0
            batch.append(img)
            n += len(groups[img])
        if batch:
            yield batch

    def chunks() -> Iterator[Chunk]:
        with h5py.File(b.path, "r") as h5:
            ds = h5[b.key]
            for batch in batches():
                rows = sorted(t for img in batch for t in groups[img])
                x = np.asarray(ds[rows], dtype=np.float64)  # h5py needs increasing indices
                at = {t: r for r, t in enumerate(rows)}
                if keep:
                    order = [t for img in batch for t in groups[img]]
                    x32 = x[[at[t] for t in order]].astype(np.float32)
                    ids = [image_id(img) for img in batch for _ in groups[img]]
                    reps = np.concatenate([np.arange(len(groups[img]), dtype=np.int16) for img in batch])
                else:
                    order = [groups[img][0] for img in batch]
                    x32 = np.stack([x[[at[t] for t in groups[img]]].mean(axis=0) for img in batch]).astype(
                        np.float32
                    )
                    ids = [image_id(img) for img in batch]
                    reps = np.full(len(batch), AVERAGED, dtype=np.int16)
                del x

                def locate(w: tuple[int, ...], ids: list[str] = ids, order: list[int] = order) -> str:
                    what = f"trial {order[w[0]]}" if keep else f"average of the trials of {ids[w[0]]!r}"
                    return f"{what}, voxel {w[1]}"

                check_finite(x32, b.path, b.key, locate)
                yield Chunk(ids, ids, reps, x32[:, :, None])
                del x32  # before the next chunk is read: at most one chunk is alive

    n_rows = sum(len(groups[i]) for i in images) if keep else len(images)
    return SplitStream(split, n_rows, chunks, str(b.path))


#: Folder (inside the dataset root) of the exported stimulus images.
IMAGES_DIR = "nsd_images"
STIMULI_KEY = "imgBrick"


def _check_stimuli(path: Path, max_id: int) -> None:
    import h5py

    if not path.is_file():
        raise BrainalignError(f"{path} does not exist; expected nsd_stimuli.hdf5.")
    with h5py.File(path, "r") as h5:
        if STIMULI_KEY not in h5:
            raise BrainalignError(f"{path}: missing dataset {STIMULI_KEY!r}; found {sorted(h5)}.")
        ds = h5[STIMULI_KEY]
        if ds.ndim != 4 or ds.shape[3] != 3 or ds.dtype != np.uint8 or ds.shape[0] <= max_id:
            raise field_error(
                path,
                STIMULI_KEY,
                f"(n_images > {max_id}, height, width, 3) uint8",
                f"shape {ds.shape} {ds.dtype}",
            )


def _export_stimuli(path: Path, nsd_ids: Sequence[int], show_progress: bool) -> Any:
    def write(root: Path) -> None:
        import h5py
        from PIL import Image
        from tqdm.auto import tqdm

        folder = root / IMAGES_DIR
        folder.mkdir()
        with h5py.File(path, "r") as h5:
            ds = h5[STIMULI_KEY]
            for i in tqdm(sorted(nsd_ids), desc="NSD images", unit="img", disable=not show_progress):
                Image.fromarray(np.asarray(ds[i])).save(folder / f"{image_id(i)}.png")
        log.info("exported %d stimulus images to %s", len(nsd_ids), folder)

    return write


def ingest_nsd(
    betas: Mapping[int | str, Path | str],
    expdesign: Path | str,
    out: Path | str,
    *,
    stimuli: Path | str | None = None,
    key: str | None = None,
    n_trials: int | None = None,
    repetitions: str = "average",
    name: str = "nsd",
    overwrite: bool = False,
    chunk_mb: float = 128.0,
    show_progress: bool = True,
) -> IngestResult:
    """Ingest NSD nsdgeneral responses of the given subjects into one dataset root.

    Parameters
    ----------
    betas : mapping
        Subject (``1``, ``"01"``, ``"subj01"``) -> HDF5 file of ``(n_trials, n_voxels)`` responses.
    expdesign : Path or str
        ``nsd_expdesign.mat``.
    out : Path or str
        Dataset root to create.
    stimuli : Path or str, optional
        ``nsd_stimuli.hdf5``; if given, the images of the catalog are exported as PNG under
        ``<out>/nsd_images/`` and the catalog's ``path`` column points to them.
    key : str, optional
        HDF5 dataset name; default: the first of :data:`BETAS_KEYS` present.
    n_trials : int, optional
        Use only the first ``n_trials`` trials (AlignVis: 27750); default all rows.
    repetitions : {"average", "keep"}
        One averaged vector per image (default), or one row per trial.
    name : str
        Dataset name.
    overwrite : bool
        Replace an existing dataset at ``out`` built from other inputs.
    chunk_mb : float
        Megabytes of float64 trials read per chunk.
    show_progress : bool
        tqdm bar per subject.

    Returns
    -------
    IngestResult

    Raises
    ------
    BrainalignError
        Naming the file, the field and what was expected; also if the subjects' voxel counts
        differ (ingest one root per subject then).
    """
    check_option("repetitions", repetitions, ("keep", "average"))
    check_chunk_mb(chunk_mb)
    if not betas:
        raise BrainalignError("betas: give at least one subject -> HDF5 file.")
    files = {subject_id(s): Path(p) for s, p in betas.items()}
    if len(files) != len(betas):
        raise BrainalignError(f"betas: subjects {list(betas)} name the same subject twice.")
    subs = sorted(files)
    expdesign = Path(expdesign)
    inputs = [expdesign, *(files[s] for s in subs)] + ([Path(stimuli)] if stimuli else [])
    for p in inputs:
        if not p.is_file():
            raise BrainalignError(f"{p} does not exist.")
    options = {
        "source": "nsd",
        "name": name,
        "subjects": subs,
        "repetitions": repetitions,
        "key": key,
        "n_trials": n_trials,
        "stimuli": bool(stimuli),
    }
    done = check_existing(out, inputs, options, overwrite=overwrite)
    if done is not None:
        return done

    design = read_expdesign(expdesign)
    opened = {s: _open_betas(files[s], s, design, key, n_trials) for s in subs}
    n_vox = {s: b.n_voxels for s, b in opened.items()}
    if len(set(n_vox.values())) > 1:
        raise BrainalignError(
            f"NSD subjects have different voxel counts {n_vox}; a dataset has one channel list, so ingest each "
            "subject into its own root (e.g. --out data/nsd-sub01 with only that subject's --betas)."
        )
    ids: dict[str, set[int]] = {"train": set(), "test": set()}
    for b in opened.values():
        for sp in ids:
            ids[sp] |= set(b.groups[sp])
    order = [(sp, i) for sp in ("train", "test") for i in sorted(ids[sp])]
    cat_ids = tuple(image_id(i) for _, i in order)
    paths: tuple[str | None, ...] = (None,) * len(order)
    extras = None
    if stimuli:
        _check_stimuli(Path(stimuli), max(i for _, i in order))
        paths = tuple(f"{IMAGES_DIR}/{c}.png" for c in cat_ids)
        extras = _export_stimuli(Path(stimuli), [i for _, i in order], show_progress)
    catalog = Catalog(
        cat_ids,
        cat_ids,
        tuple(sp for sp, _ in order),
        paths,
        source=f"{expdesign} (masterordering/subjectim)",
    )
    nv = n_vox[subs[0]]
    meta = DatasetMeta(
        name=name,
        modality="fmri",
        ch_names=tuple(f"v{i:05d}" for i in range(nv)),
        sfreq=0.0,
        tmin=0.0,
        n_times=1,
        subjects=tuple(subs),
        source={
            "kind": "real",
            "release": "nsd/nsdgeneral",
            "images": "nsd_stimuli.hdf5 imgBrick[int(image_id[4:])]",
        },
    )
    plans = [
        SubjectPlan(s, tuple(_stream(opened[s], sp, repetitions, chunk_mb) for sp in ("train", "test")))
        for s in subs
    ]
    return run_ingest(
        out,
        meta,
        catalog,
        plans,
        inputs=inputs,
        options=options,
        overwrite=overwrite,
        extras=extras,
        show_progress=show_progress,
    )


def ingest_nsd_per_subject(
    betas: Mapping[int | str, Path | str],
    expdesign: Path | str,
    out_pattern: str,
    **kwargs: Any,
) -> list[IngestResult]:
    """Ingest each subject into its own root (their voxel counts differ).

    Parameters
    ----------
    betas, expdesign
        As :func:`ingest_nsd`.
    out_pattern : str
        Output root with a ``{subject}`` placeholder, e.g. ``"data/nsd-sub{subject}"``
        (``subject`` is the two-digit id).
    **kwargs
        Passed on to :func:`ingest_nsd`; ``name`` may also contain ``{subject}``.

    Returns
    -------
    list of IngestResult
        One per subject, in subject order.
    """
    if "{subject}" not in out_pattern:
        raise BrainalignError(f"out_pattern {out_pattern!r} must contain '{{subject}}'.")
    name = str(kwargs.pop("name", "nsd-sub{subject}"))
    files = {subject_id(s): p for s, p in betas.items()}
    return [
        ingest_nsd(
            {s: files[s]}, expdesign, out_pattern.format(subject=s), name=name.format(subject=s), **kwargs
        )
        for s in sorted(files)
    ]
