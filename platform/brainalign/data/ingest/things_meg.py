"""THINGS-MEG (Hebart et al. 2023, OpenNeuro ds004212) into the data contract.

Inputs: the preprocessed MNE epochs of the release's derivatives, one per participant::

    <meg_dir>/preprocessed_P1-epo.fif   (+ split parts preprocessed_P1-epo-1.fif, -2, ...)
    ...
    <meg_dir>/preprocessed_P4-epo.fif

271 MEG channels at 200 Hz, epochs -0.1..1.3 s, with per-epoch metadata (``trial_type``,
``image_path``, ``category_nr``, ...). :func:`mne.read_epochs` follows the split parts.

Conversion (the rules NICE/ATM/AlignVis use):

* the window is cropped to ``tmin..tmax`` = 0..1 s, inclusive: 201 samples;
* test = ``trial_type == 'test'`` (200 images x 12 repetitions);
* train = ``trial_type == 'exp'`` minus every trial whose concept appears in the test set
  (1654 concepts x 12 images, 1 presentation each); other trial types (catch trials) are
  dropped. The concept of a trial is the folder of its ``image_path``
  (``images_meg/<concept>/<file>``) or, for test images (``images_test_meg/<file>``), the file
  stem without its ``_NNx`` suffix; where ``category_nr`` is present it is excluded as well.

Catalog: ``image_id`` = the image file's stem, ``concept`` = the concept name, ``path`` =
``image_path`` as given (relative to the release's image root). Images are listed train then
test, each sorted by path. Epochs are read lazily (``preload=False``), a chunk of trials at a
time, so memory does not grow with the file (a participant's file is ~16 GB).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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

__all__ = ["EXPECTED", "epochs_file", "ingest_things_meg", "parse_image_path"]

log = logging.getLogger(__name__)

#: What the public release gives per participant, for the log (not enforced: a file with
#: dropped epochs is still ingested, with a warning).
EXPECTED = {"train": 19848, "test": 2400, "test_reps": 12}
_SUFFIX = re.compile(r"_\d+[a-z]*$")


def epochs_file(meg_dir: Path, subject: str) -> Path:
    """``<meg_dir>/preprocessed_P{n}-epo.fif`` of subject ``"01"`` etc."""
    return meg_dir / f"preprocessed_P{int(subject)}-epo.fif"


def parse_image_path(image_path: str) -> tuple[str, str]:
    """``(image_id, concept)`` of a metadata ``image_path``.

    ``images_meg/aardvark/aardvark_01b.jpg`` -> ``("aardvark_01b", "aardvark")``;
    ``images_test_meg/aircraft_carrier_06s.jpg`` -> ``("aircraft_carrier_06s", "aircraft_carrier")``.
    """
    p = PurePosixPath(str(image_path).replace("\\", "/"))
    concept = p.parts[-2] if len(p.parts) >= 3 else _SUFFIX.sub("", p.stem)
    return p.stem, concept


@dataclass(frozen=True)
class _MEGFile:
    path: Path
    subject: str
    epochs: Any  # mne.Epochs, preload=False
    picks: np.ndarray
    ch_names: tuple[str, ...]
    times: np.ndarray
    window: slice  # samples kept (the mask computed with a half-sample tolerance)
    groups: dict[str, dict[str, list[int]]]  # split -> image_id -> trial positions (file order)
    image_info: dict[str, tuple[str, str, str]]  # image_id -> (concept, split, image_path)


def _open_meg_file(
    path: Path, subject: str, *, n_chans: int, sfreq: float, tmin: float, tmax: float
) -> _MEGFile:
    import mne

    if not path.is_file():
        raise BrainalignError(
            f"{path} does not exist; expected the preprocessed epochs of subject {subject}."
        )
    try:
        ep = mne.read_epochs(path, preload=False, verbose="error")
    except (OSError, ValueError, RuntimeError) as e:
        raise BrainalignError(f"{path}: not readable as MNE epochs ({e}).") from e
    ep.drop_bad(verbose="error")  # a no-op for saved epochs; lets get_data(item=...) select lazily
    md = ep.metadata
    if md is None:
        raise field_error(
            path, "metadata", "per-epoch metadata with columns trial_type, image_path", "no metadata"
        )
    missing = [c for c in ("trial_type", "image_path") if c not in md.columns]
    if missing:
        raise field_error(
            path,
            "metadata",
            f"columns trial_type and image_path (missing {missing})",
            f"columns {list(md.columns)}",
        )
    if abs(ep.info["sfreq"] - sfreq) > 1e-6 * sfreq:
        raise field_error(path, 'info["sfreq"]', f"{sfreq:g} Hz", f"{ep.info['sfreq']:g} Hz")
    picks = mne.pick_types(ep.info, meg=True, ref_meg=False)
    if len(picks) != n_chans:
        raise field_error(
            path, 'info["chs"]', f"{n_chans} MEG channels (reference sensors excluded)", len(picks)
        )
    half = 0.5 / sfreq
    mask = (ep.times >= tmin - half) & (ep.times <= tmax + half)
    want_t = int(round((tmax - tmin) * sfreq)) + 1
    if ep.times[0] > tmin + half or ep.times[-1] < tmax - half or int(mask.sum()) != want_t:
        raise field_error(
            path,
            "times",
            f"an epoch covering {tmin:g}..{tmax:g} s ({want_t} samples at {sfreq:g} Hz)",
            f"{ep.times[0]:g}..{ep.times[-1]:g} s ({len(ep.times)} samples)",
        )
    trial_type = md["trial_type"].astype(str).to_numpy()
    image_path = md["image_path"].astype(str).to_numpy()
    parsed = [parse_image_path(p) for p in image_path]
    test_pos = np.flatnonzero(trial_type == "test")
    exp_pos = np.flatnonzero(trial_type == "exp")
    if test_pos.size == 0 or exp_pos.size == 0:
        raise field_error(
            path, 'metadata["trial_type"]', "both 'exp' and 'test' trials", dict(Counter(trial_type.tolist()))
        )
    test_concepts = {parsed[i][1] for i in test_pos}
    test_cats: set[float] = set()
    cat = md["category_nr"].to_numpy(dtype=float) if "category_nr" in md.columns else None
    if cat is not None:
        test_cats = {c for c in cat[test_pos] if math.isfinite(c)}
    keep_train = [
        i for i in exp_pos if parsed[i][1] not in test_concepts and (cat is None or cat[i] not in test_cats)
    ]
    n_excl = exp_pos.size - len(keep_train)
    groups: dict[str, dict[str, list[int]]] = {"train": {}, "test": {}}
    info: dict[str, tuple[str, str, str]] = {}
    for split, positions in (("train", keep_train), ("test", test_pos.tolist())):
        for i in positions:
            image_id, concept = parsed[i]
            prev = info.setdefault(image_id, (concept, split, image_path[i]))
            if prev != (concept, split, image_path[i]):
                raise field_error(
                    path,
                    'metadata["image_path"]',
                    f"image {image_id!r} always under one path, concept and split ({prev})",
                    f"{image_path[i]!r} in {split} (epoch {i})",
                )
            groups[split].setdefault(image_id, []).append(int(i))
    n_train = sum(len(v) for v in groups["train"].values())
    reps = Counter(len(v) for v in groups["test"].values())
    log.info(
        "%s: %d train trials (%d exp trials of %d test concepts excluded), %d test trials of %d images "
        "(repetitions per image: %s)",
        path.name,
        n_train,
        n_excl,
        len(test_concepts),
        test_pos.size,
        len(groups["test"]),
        dict(reps),
    )
    if (
        n_train != EXPECTED["train"]
        or test_pos.size != EXPECTED["test"]
        or set(reps) != {EXPECTED["test_reps"]}
    ):
        log.warning(
            "%s: counts differ from the public release (train %d, test %d = 200 x %d); ingesting anyway",
            path,
            EXPECTED["train"],
            EXPECTED["test"],
            EXPECTED["test_reps"],
        )
    ch = tuple(ep.ch_names[i] for i in picks)
    idx = np.flatnonzero(mask)
    return _MEGFile(
        path,
        subject,
        ep,
        picks,
        ch,
        ep.times[mask].copy(),
        slice(int(idx[0]), int(idx[-1]) + 1),
        groups,
        info,
    )


def _stream(
    f: _MEGFile,
    split: str,
    order: Sequence[str],
    concept_of: dict[str, str],
    repetitions: str,
    chunk_mb: float,
) -> SplitStream:
    groups = f.groups[split]
    images = [i for i in order if i in groups]
    n_ch, n_t = len(f.picks), len(f.times)
    per = items_per_chunk(
        len(f.epochs.ch_names) * len(f.epochs.times) * 8, chunk_mb
    )  # trials per chunk (float64, uncropped)
    keep = repetitions == "keep"

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        n = 0
        for image_id in images:
            if batch and n + len(groups[image_id]) > per:
                yield batch
                batch, n = [], 0
            batch.append(image_id)
            n += len(groups[image_id])
        if batch:
            yield batch

    def chunks() -> Iterator[Chunk]:
        for batch in batches():
            pos = sorted(p for image_id in batch for p in groups[image_id])
            # crop by sample index: get_data(tmin=, tmax=) can drop the last sample to float rounding
            x = f.epochs.get_data(picks=f.picks, item=np.asarray(pos), verbose="error")[..., f.window]
            if x.shape != (len(pos), n_ch, n_t):
                raise field_error(
                    f.path, "data", f"({len(pos)}, {n_ch}, {n_t}) for the selected epochs", x.shape
                )
            row = {p: r for r, p in enumerate(pos)}
            ids: list[str] = []
            epochs_pos: list[int] = []
            if keep:
                idx = [row[p] for image_id in batch for p in groups[image_id]]
                x32 = x[idx].astype(np.float32)
                reps = np.concatenate([np.arange(len(groups[i]), dtype=np.int16) for i in batch])
                for image_id in batch:
                    ids += [image_id] * len(groups[image_id])
                    epochs_pos += groups[image_id]
            else:
                x32 = np.stack([x[[row[p] for p in groups[i]]].mean(axis=0) for i in batch]).astype(
                    np.float32
                )
                reps = np.full(len(batch), AVERAGED, dtype=np.int16)
                ids = list(batch)
                epochs_pos = [groups[i][0] for i in batch]
            del x

            def locate(w: tuple[int, ...], ids: list[str] = ids, pos: list[int] = epochs_pos) -> str:
                return (
                    f"epoch {pos[w[0]]} (image {ids[w[0]]!r}{'' if keep else ', repetition average'}), "
                    f"channel {f.ch_names[w[1]]!r}, sample {w[2]}"
                )

            check_finite(x32, f.path, "data", locate)
            yield Chunk(ids, [concept_of[i] for i in ids], reps, x32)
            del x32  # before the next chunk is read: at most one chunk is alive

    n_rows = sum(len(groups[i]) for i in images) if keep else len(images)
    return SplitStream(split, n_rows, chunks, str(f.path))


def _split_parts(path: Path) -> list[Path]:
    return [path, *sorted(path.parent.glob(f"{path.stem}-*.fif"))]


def ingest_things_meg(
    meg_dir: Path | str,
    out: Path | str,
    *,
    subjects: Sequence[int | str] | None = None,
    images: Path | str | None = None,
    repetitions: str = "keep",
    tmin: float = 0.0,
    tmax: float = 1.0,
    n_chans: int = 271,
    sfreq: float = 200.0,
    name: str = "things-meg",
    overwrite: bool = False,
    chunk_mb: float = 128.0,
    show_progress: bool = True,
) -> IngestResult:
    """Ingest THINGS-MEG preprocessed epochs (all given participants) into one dataset root.

    Parameters
    ----------
    meg_dir : Path or str
        Folder with ``preprocessed_P{n}-epo.fif`` (``derivatives/preprocessed`` of ds004212).
    out : Path or str
        Dataset root to create.
    subjects : sequence of int or str, optional
        Participants (``1`` or ``"P1"`` or ``"01"``); default: every ``preprocessed_P*-epo.fif``.
    images : Path or str, optional
        Image root the metadata's ``image_path`` values are relative to; if given, every
        catalog image must exist there.
    repetitions : {"keep", "average"}
        One row per trial, or one repetition-averaged row per image (``AVERAGED``).
    tmin, tmax : float
        Window kept, in s (inclusive): 0..1 s gives 201 samples at 200 Hz.
    n_chans : int
        Expected number of MEG channels (reference sensors excluded).
    sfreq : float
        Expected sampling rate (Hz).
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
        Naming the file, the field and what was expected.
    """
    check_chunk_mb(chunk_mb)
    check_option("repetitions", repetitions, ("keep", "average"))
    meg_dir = Path(meg_dir)
    if not meg_dir.is_dir():
        raise BrainalignError(
            f"{meg_dir} is not a directory; expected the folder with preprocessed_P*-epo.fif."
        )
    if subjects:
        subs = [subject_id(s) for s in subjects]
    else:
        subs = sorted(
            subject_id(p.name.split("-")[0].removeprefix("preprocessed_"))
            for p in meg_dir.glob("preprocessed_P*-epo.fif")
        )
        if not subs:
            raise BrainalignError(f"{meg_dir}: no preprocessed_P*-epo.fif files.")
    if len(set(subs)) != len(subs):
        raise BrainalignError(f"subjects {subs} contain duplicates.")
    paths = {s: epochs_file(meg_dir, s) for s in subs}
    for s, p in paths.items():
        if not p.is_file():
            raise BrainalignError(f"{p} does not exist; expected the preprocessed epochs of subject {s}.")
    inputs = [q for p in paths.values() for q in _split_parts(p)]
    options = {
        "source": "things-meg",
        "name": name,
        "subjects": subs,
        "repetitions": repetitions,
        "tmin": tmin,
        "tmax": tmax,
        "n_chans": n_chans,
        "sfreq": sfreq,
        "images": str(Path(images).resolve()) if images else None,
    }
    done = check_existing(out, inputs, options, overwrite=overwrite)
    if done is not None:
        return done

    opened = {
        s: _open_meg_file(paths[s], s, n_chans=n_chans, sfreq=sfreq, tmin=tmin, tmax=tmax) for s in subs
    }
    first = opened[subs[0]]
    info: dict[str, tuple[str, str, str]] = {}
    for s in subs:
        f = opened[s]
        if f.ch_names != first.ch_names:
            raise field_error(
                f.path,
                'info["ch_names"]',
                f"the MEG channels of {first.path} in the same order",
                "different channels",
            )
        if not np.allclose(f.times, first.times, atol=1e-9):
            raise field_error(f.path, "times", f"the same times as {first.path}", "different times")
        for image_id, v in f.image_info.items():
            prev = info.setdefault(image_id, v)
            if prev != v:
                raise field_error(
                    f.path,
                    'metadata["image_path"]',
                    f"image {image_id!r} as in the other participants {prev}",
                    v,
                )
    # a concept that is a test concept for one participant must not be trained on for another
    test_concepts = {c for c, sp, _ in info.values() if sp == "test"}
    leak = sorted({c for c, sp, _ in info.values() if sp == "train"} & test_concepts)
    if leak:
        raise BrainalignError(
            f"{meg_dir}: test concept(s) {leak[:5]} are training concepts for another "
            "participant; expected the same test set for every participant."
        )
    order = {
        sp: sorted((i for i, v in info.items() if v[1] == sp), key=lambda i: info[i][2])
        for sp in ("train", "test")
    }
    all_ids = order["train"] + order["test"]
    catalog = Catalog(
        tuple(all_ids),
        tuple(info[i][0] for i in all_ids),
        tuple(info[i][1] for i in all_ids),
        tuple(info[i][2] for i in all_ids),
        source=f"{meg_dir} (metadata image_path)",
    )
    concept_of = {i: info[i][0] for i in all_ids}
    meta = DatasetMeta(
        name=name,
        modality="meg",
        ch_names=first.ch_names,
        sfreq=float(sfreq),
        tmin=float(round(first.times[0], 9)),
        n_times=len(first.times),
        subjects=tuple(subs),
        source={"kind": "real", "release": "things-meg/openneuro-ds004212-preprocessed"},
    )
    plans = [
        SubjectPlan(
            s,
            tuple(
                _stream(opened[s], sp, order[sp], concept_of, repetitions, chunk_mb)
                for sp in ("train", "test")
            ),
        )
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
        images_root=Path(images) if images else None,
        show_progress=show_progress,
    )
