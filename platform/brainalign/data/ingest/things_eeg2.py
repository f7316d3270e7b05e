"""Things-EEG2 (Gifford et al. 2022) into the data contract, from either preprocessed release.

Inputs (one directory per subject, ``sub-01`` ... ``sub-10``)::

    <eeg_dir>/sub-XX/preprocessed_eeg_training.npy   train: (n_train_images, 4, n_chans, n_times)
    <eeg_dir>/sub-XX/preprocessed_eeg_test.npy       test:  (n_test_images, 80, n_chans, n_times)
    <metadata>  image_metadata.npy                   np.save of a dict (see read_image_metadata)
    <images>/training_images/<concept>/<file>        optional: THINGS images, checked to exist
    <images>/test_images/<concept>/<file>

Each subject file is a dict with keys ``preprocessed_eeg_data`` (float64), ``ch_names`` and
``times``. The two releases differ (see :data:`FORMATS`):

* ``"nice"``: the NICE/AlignVis re-preprocessing (``Preprocessed_data_250Hz``): 63 channels
  in a fixed order, 250 Hz, 250 samples covering 0..0.996 s. Written with
  ``pickle.dump(protocol=4)`` despite the ``.npy`` name. ``times`` is NOT sliced (300 values
  from -0.2 s) while the data keep samples ``[50:]``: the data's times are ``times[-250:]``.
* ``"gifford"``: Gifford's official release (``preprocessed_eeg``): 17 occipital/parietal
  channels, 100 Hz, 100 samples covering -0.2..0.79 s. Written with ``np.save(dict)``.

Both are read through :mod:`.safe_pickle` (no code execution; big arrays stay on disk) and
converted in chunks straight into the contract, float64 -> float32.

Catalog: ``image_id`` = the image file's stem (``aardvark_01b``), unique across the release
and stable; ``concept`` = the release's concept string (``00001_aardvark``; train and test
numbering both start at 00001 but the names differ); ``path`` =
``training_images/<concept>/<file>`` or ``test_images/<concept>/<file>``. EEG row ``i`` of a
split is image ``i`` of that split in ``image_metadata.npy`` (the releases' condition order).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
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
    as_str_list,
    check_chunk_mb,
    check_existing,
    check_finite,
    field_error,
    items_per_chunk,
    run_ingest,
    subject_id,
)
from .safe_pickle import FileBackedArray, load_release_file, read_rows

__all__ = [
    "CHANNELS_63",
    "CHANNELS_OCCIPITAL_PARIETAL",
    "FILES",
    "FORMATS",
    "EEG2Format",
    "ingest_things_eeg2",
    "read_image_metadata",
]

log = logging.getLogger(__name__)

#: The 63 channels NICE/AlignVis keep, in their order (``raw.pick_channels(chan_order, ordered=True)``).
CHANNELS_63 = (
    "Fp1 Fp2 AF7 AF3 AFz AF4 AF8 F7 F5 F3 F1 F2 F4 F6 F8 FT9 FT7 FC5 FC3 FC1 FCz FC2 FC4 FC6 FT8 FT10 "
    "T7 C5 C3 C1 Cz C2 C4 C6 T8 TP9 TP7 CP5 CP3 CP1 CPz CP2 CP4 CP6 TP8 TP10 P7 P5 P3 P1 Pz P2 P4 P6 P8 "
    "PO7 PO3 POz PO4 PO8 O1 Oz O2"
).split()
#: The 17 channels of Gifford's release (``pick_channels_regexp('^O *|^P *')``); their order is
#: the raw recording's, so it is taken from the files and only required to be the same in all.
CHANNELS_OCCIPITAL_PARIETAL = tuple(c for c in CHANNELS_63 if re.match(r"^O|^P", c))
#: Subject file per split.
FILES = {"train": "preprocessed_eeg_training.npy", "test": "preprocessed_eeg_test.npy"}
_DATA, _CH, _TIMES = "preprocessed_eeg_data", "ch_names", "times"
_META_KEYS = {
    "train": ("train_img_concepts", "train_img_files"),
    "test": ("test_img_concepts", "test_img_files"),
}
_FOLDERS = {"train": "training_images", "test": "test_images"}


@dataclass(frozen=True)
class EEG2Format:
    """What one preprocessed Things-EEG2 release must look like.

    Attributes
    ----------
    key : str
        ``"nice"`` or ``"gifford"``.
    name : str
        Default dataset name (the ``dataset=`` partition value).
    release : str
        Stored in ``dataset.json`` as ``source.release``.
    ch_names : tuple of str
        The channels; with ``ordered`` their exact order, else the set (order from the files).
    ordered : bool
        Whether ``ch_names`` fixes the order.
    sfreq, tmin : float
        Sampling rate (Hz) and time of the first kept sample (s).
    n_times : int
        Samples per epoch in the data.
    """

    key: str
    name: str
    release: str
    ch_names: tuple[str, ...]
    ordered: bool
    sfreq: float
    tmin: float
    n_times: int

    @property
    def n_chans(self) -> int:
        return len(self.ch_names)


FORMATS = {
    "nice": EEG2Format(
        "nice", "things-eeg2", "things-eeg2/nice-alignvis-250hz", tuple(CHANNELS_63), True, 250.0, 0.0, 250
    ),
    "gifford": EEG2Format(
        "gifford",
        "things-eeg2-gifford",
        "things-eeg2/gifford-official-100hz",
        CHANNELS_OCCIPITAL_PARIETAL,
        False,
        100.0,
        -0.2,
        100,
    ),
}


# --------------------------------------------------------------------------- image metadata
def _concept_name(concept: str) -> str:
    """``'00001_aardvark'`` -> ``'aardvark'`` (the numbering restarts per split)."""
    head, _, tail = concept.partition("_")
    return tail if head.isdigit() and tail else concept


def read_image_metadata(path: Path | str) -> Catalog:
    """Build the image catalog from a Things-EEG2 ``image_metadata.npy``.

    Parameters
    ----------
    path : Path or str
        ``np.save`` of a dict with ``train_img_concepts``, ``train_img_files``,
        ``test_img_concepts``, ``test_img_files`` (lists of str) and optionally
        ``{train,test}_img_concepts_THINGS``.

    Returns
    -------
    Catalog
        Training images (release order) then test images.

    Raises
    ------
    BrainalignError
        On a missing key, mismatched lengths, a duplicated image, or a test concept that also
        appears in training (by concept name, and by THINGS id where given).
    """
    path = Path(path)
    meta = load_release_file(path)
    if not isinstance(meta, dict):
        raise field_error(path, "<top level>", "a dict (np.save of a dict)", type(meta).__name__)
    cols: dict[str, list[str]] = {}
    for keys in _META_KEYS.values():
        for k in keys:
            if k not in meta:
                raise BrainalignError(
                    f"{path}: missing key {k!r}; expected keys {sorted(sum(_META_KEYS.values(), ()))} "
                    f"(found {sorted(meta)})."
                )
            cols[k] = as_str_list(meta[k], path, k)
        concepts, files = (cols[k] for k in keys)
        if len(concepts) != len(files):
            raise field_error(
                path, keys[0], f"one concept per entry of {keys[1]!r} ({len(files)})", len(concepts)
            )
        if not files:
            raise field_error(path, keys[1], "at least one image", "an empty list")
    names = {s: {_concept_name(c) for c in cols[_META_KEYS[s][0]]} for s in _META_KEYS}
    both = sorted(names["train"] & names["test"])
    if both:
        raise BrainalignError(
            f"{path}: field 'test_img_concepts': test concept(s) {both[:5]} also appear in 'train_img_concepts' "
            f"({len(both)} in all); expected train and test concepts to be disjoint."
        )
    if "train_img_concepts_THINGS" in meta and "test_img_concepts_THINGS" in meta:
        tr = set(as_str_list(meta["train_img_concepts_THINGS"], path, "train_img_concepts_THINGS"))
        te = set(as_str_list(meta["test_img_concepts_THINGS"], path, "test_img_concepts_THINGS"))
        both = sorted(tr & te)
        if both:
            raise BrainalignError(
                f"{path}: field 'test_img_concepts_THINGS': THINGS concept(s) {both[:5]} are in both splits; "
                "expected train and test concepts to be disjoint."
            )
    ids: list[str] = []
    concepts_out: list[str] = []
    splits: list[str] = []
    paths: list[str | None] = []
    for split, (ck, fk) in _META_KEYS.items():
        for concept, file in zip(cols[ck], cols[fk], strict=True):
            ids.append(Path(file).stem)
            concepts_out.append(concept)
            splits.append(split)
            paths.append(f"{_FOLDERS[split]}/{concept}/{file}")
    return Catalog(tuple(ids), tuple(concepts_out), tuple(splits), tuple(paths), source=str(path))


# --------------------------------------------------------------------------- subject files
@dataclass(frozen=True)
class _EEGFile:
    path: Path
    split: str
    data: np.ndarray | FileBackedArray  # (n_images, n_reps, n_chans, n_times)
    ch_names: tuple[str, ...]
    times: np.ndarray  # the data's times

    @property
    def n_reps(self) -> int:
        return int(self.data.shape[1])


_COMMANDS = {"nice": "things-eeg2", "gifford": "things-eeg2-gifford"}


def _other_release(fmt: EEG2Format, shape: tuple[int, ...]) -> str:
    """`` (this looks like ...: use `brainalign data ingest ...`)`` when a file fits the other release."""
    for other in FORMATS.values():
        if other.key != fmt.key and len(shape) == 4 and shape[2:] == (other.n_chans, other.n_times):
            return (
                f" This file looks like the {other.key!r} release ({other.n_chans} channels x {other.n_times} "
                f"samples): use `brainalign data ingest {_COMMANDS[other.key]}` (release={other.key!r}) instead."
            )
    return ""


def _open_eeg_file(path: Path, split: str, fmt: EEG2Format, n_images: int, metadata: Path | None = None) -> _EEGFile:
    """Open one subject file and check everything but the values (those are checked while streaming)."""
    if not path.is_file():
        raise BrainalignError(
            f"{path} does not exist; expected the {split} file {FILES[split]!r} of this subject."
        )
    obj = load_release_file(path)
    if not isinstance(obj, dict):
        raise field_error(path, "<top level>", f"a dict with keys {[_DATA, _CH, _TIMES]}", type(obj).__name__)
    missing = [k for k in (_DATA, _CH, _TIMES) if k not in obj]
    if missing:
        raise BrainalignError(
            f"{path}: missing key(s) {missing}; expected keys {[_DATA, _CH, _TIMES]} (found {sorted(obj)})."
        )
    data: Any = obj[_DATA]
    if not isinstance(data, np.ndarray | FileBackedArray):
        raise field_error(path, _DATA, "a numpy array", type(data).__name__)
    want = f"(n_images={n_images}, n_reps, n_chans={fmt.n_chans}, n_times={fmt.n_times}) ({fmt.key} release)"
    shape = tuple(data.shape)
    if len(shape) == 4 and shape[2:] != (fmt.n_chans, fmt.n_times) and _other_release(fmt, shape):
        raise BrainalignError(f"{path}: field {_DATA!r}: expected shape {want}, got {shape}.{_other_release(fmt, shape)}")
    if len(shape) == 4 and shape[0] != n_images and shape[2:] == (fmt.n_chans, fmt.n_times):
        meta_name = str(metadata) if metadata is not None else "image_metadata.npy"
        raise BrainalignError(
            f"{path}: field {_DATA!r}: expected shape {want}, got {shape}: the file holds {shape[0]} {split} images "
            f"but image_metadata.npy ({meta_name}) lists {n_images}. The EEG files and image_metadata.npy must "
            "come from the same Things-EEG2 release (download both again from the same place)."
        )
    if len(shape) != 4 or shape[0] != n_images or shape[1] < 1 or shape[2:] != (fmt.n_chans, fmt.n_times):
        raise field_error(path, _DATA, f"shape {want}", shape)
    if data.dtype.kind != "f" or data.dtype.itemsize not in (4, 8):
        raise field_error(path, _DATA, "float64 (or float32) values", f"dtype {data.dtype}")
    ch = tuple(as_str_list(obj[_CH], path, _CH))
    if fmt.ordered and ch != fmt.ch_names:
        diff = next(
            (i for i, (a, b) in enumerate(zip(ch, fmt.ch_names, strict=False)) if a != b),
            min(len(ch), fmt.n_chans),
        )
        raise field_error(
            path,
            _CH,
            f"the {fmt.n_chans} {fmt.key} channels in their fixed order (position {diff}: "
            f"{fmt.ch_names[diff] if diff < fmt.n_chans else 'end'!r})",
            f"{len(ch)} names with {ch[diff] if diff < len(ch) else 'end'!r} at position {diff}",
        )
    if not fmt.ordered and (len(ch) != fmt.n_chans or set(ch) != set(fmt.ch_names)):
        raise field_error(
            path,
            _CH,
            f"the {fmt.n_chans} channels {sorted(fmt.ch_names)}",
            f"{len(ch)} names, unexpected {sorted(set(ch) - set(fmt.ch_names))}, "
            f"missing {sorted(set(fmt.ch_names) - set(ch))}",
        )
    raw_times = obj[_TIMES]
    times = (
        np.asarray(raw_times, dtype=np.float64).reshape(-1)
        if not isinstance(raw_times, str)
        else np.array([])
    )
    if times.size < fmt.n_times or not np.isfinite(times).all():
        raise field_error(path, _TIMES, f"at least {fmt.n_times} finite time points", f"{times.size} values")
    kept = times[-fmt.n_times :]  # NICE keeps samples [50:] of a 300-sample epoch but stores all 300 times
    step = np.diff(kept)
    sfreq = 1.0 / float(step.mean())
    if np.abs(step - step.mean()).max() > 1e-3 / fmt.sfreq or abs(sfreq - fmt.sfreq) > 1e-3 * fmt.sfreq:
        raise field_error(
            path,
            _TIMES,
            f"uniform steps of 1/{fmt.sfreq:g} s ({fmt.sfreq:g} Hz)",
            f"{sfreq:.4g} Hz (steps {step.min():.6g}..{step.max():.6g} s)",
        )
    if abs(kept[0] - fmt.tmin) > 0.25 / fmt.sfreq:
        raise field_error(
            path,
            _TIMES,
            f"the data's first sample (times[-{fmt.n_times}]) at {fmt.tmin:g} s",
            f"{kept[0]:.6g} s",
        )
    return _EEGFile(path, split, data, ch, kept)


def _stream(
    f: _EEGFile, image_ids: Sequence[str], concepts: Sequence[str], repetitions: str, chunk_mb: float
) -> SplitStream:
    n_img, n_rep, n_ch, n_t = (int(s) for s in f.data.shape)
    image_bytes = n_rep * n_ch * n_t * f.data.dtype.itemsize
    per = items_per_chunk(image_bytes, chunk_mb)  # images per part file
    sub = items_per_chunk(image_bytes, min(chunk_mb, 16.0))  # images read from disk at a time
    keep = repetitions == "keep"

    def chunks() -> Iterator[Chunk]:
        for i in range(0, n_img, per):
            j = min(n_img, i + per)
            k = j - i
            # Fill a float32 chunk from small float64 reads: the chunk never exists in float64.
            x32 = np.empty((k * n_rep if keep else k, n_ch, n_t), np.float32)
            for a in range(i, j, sub):
                b = min(j, a + sub)
                src = read_rows(f.data, a, b)  # (b - a, reps, ch, t) in the source dtype
                with np.errstate(over="ignore"):  # out-of-range values become Inf: reported below
                    if keep:
                        x32[(a - i) * n_rep : (b - i) * n_rep] = src.reshape(-1, n_ch, n_t)
                    else:
                        x32[a - i : b - i] = src.mean(axis=1, dtype=np.float64)
                del src
            if keep:
                ids = [image_ids[m] for m in range(i, j) for _ in range(n_rep)]
                cons = [concepts[m] for m in range(i, j) for _ in range(n_rep)]
                reps = np.tile(np.arange(n_rep, dtype=np.int16), k)

                def locate(w: tuple[int, ...], i: int = i) -> str:
                    img = i + w[0] // n_rep
                    return (
                        f"image {img} ({image_ids[img]!r}), repetition {w[0] % n_rep}, "
                        f"channel {f.ch_names[w[1]]!r}, sample {w[2]}"
                    )
            else:
                ids, cons = list(image_ids[i:j]), list(concepts[i:j])
                reps = np.full(k, AVERAGED, dtype=np.int16)

                def locate(w: tuple[int, ...], i: int = i) -> str:
                    return (
                        f"image {i + w[0]} ({image_ids[i + w[0]]!r}) (repetition average), "
                        f"channel {f.ch_names[w[1]]!r}, sample {w[2]}"
                    )

            check_finite(x32, f.path, _DATA, locate)
            yield Chunk(ids, cons, reps, x32)
            del x32  # before the next chunk is read: at most one chunk is alive

    return SplitStream(f.split, n_img * (n_rep if keep else 1), chunks, str(f.path))


def _find_subjects(eeg_dir: Path) -> list[str]:
    found = sorted(
        {subject_id(p.name) for p in eeg_dir.glob("sub*") if p.is_dir() and p.name[3:].lstrip("-").isdigit()}
    )
    if not found:
        raise BrainalignError(
            f"{eeg_dir}: no sub-XX directories; expected the release's subject folders here."
        )
    return found


def _subject_dir(eeg_dir: Path, subject: str) -> Path:
    """``sub-01`` (the releases' name), or ``sub01`` / ``sub-1`` as some unzip tools leave it."""
    for name in (f"sub-{subject}", f"sub{subject}", f"sub-{int(subject)}", f"sub{int(subject)}"):
        if (eeg_dir / name).is_dir():
            return eeg_dir / name
    return eeg_dir / f"sub-{subject}"


def ingest_things_eeg2(
    eeg_dir: Path | str,
    metadata: Path | str,
    out: Path | str,
    *,
    release: str = "nice",
    subjects: Sequence[int | str] | None = None,
    images: Path | str | None = None,
    repetitions: str = "keep",
    name: str | None = None,
    overwrite: bool = False,
    chunk_mb: float = 128.0,
    show_progress: bool = True,
) -> IngestResult:
    """Ingest a preprocessed Things-EEG2 release (all given subjects) into one dataset root.

    Parameters
    ----------
    eeg_dir : Path or str
        Folder holding ``sub-XX/preprocessed_eeg_{training,test}.npy``
        (``Preprocessed_data_250Hz`` for NICE, ``preprocessed_eeg`` for Gifford's release).
    metadata : Path or str
        ``image_metadata.npy``.
    out : Path or str
        Dataset root to create.
    release : {"nice", "gifford"}
        Which preprocessing (see :data:`FORMATS`).
    subjects : sequence of int or str, optional
        Subjects to ingest (``1``, ``"01"``, ``"sub-01"``); default: every ``sub-XX`` folder.
    images : Path or str, optional
        THINGS image folder (with ``training_images/`` and ``test_images/``); if given, every
        catalog image must exist there.
    repetitions : {"keep", "average"}
        ``keep``: one row per repetition (``repetition`` 0..n-1). ``average``: one row per image,
        the mean over its repetitions (``repetition == AVERAGED``). Per-repetition
        normalization is a training option and is never baked in here.
    name : str, optional
        Dataset name; default ``things-eeg2`` (NICE) or ``things-eeg2-gifford``.
    overwrite : bool
        Replace an existing dataset at ``out`` built from other inputs.
    chunk_mb : float
        Source megabytes converted per chunk (bounds memory; one Parquet part per chunk).
    show_progress : bool
        tqdm bar per subject.

    Returns
    -------
    IngestResult

    Raises
    ------
    BrainalignError
        Naming the file, the field and what was expected, for any input that does not match
        the release format; :class:`~.safe_pickle.UnsafePickleError` for a refused pickle.
    """
    fmt = FORMATS[check_option("release", release, FORMATS)]
    check_option("repetitions", repetitions, ("keep", "average"))
    check_chunk_mb(chunk_mb)
    eeg_dir, metadata = Path(eeg_dir), Path(metadata)
    if not eeg_dir.is_dir():
        raise BrainalignError(f"{eeg_dir} is not a directory; expected the folder holding sub-XX/.")
    if metadata.is_dir():
        hint = f" ({metadata / 'image_metadata.npy'} exists: pass that)" if (metadata / "image_metadata.npy").is_file() else ""
        raise BrainalignError(
            f"--metadata {metadata} is a directory; expected the file image_metadata.npy of the release{hint}."
        )
    subs = [subject_id(s) for s in subjects] if subjects else _find_subjects(eeg_dir)
    if len(set(subs)) != len(subs):
        raise BrainalignError(f"subjects {subs} contain duplicates.")
    name = name or fmt.name
    files = {s: {sp: _subject_dir(eeg_dir, s) / fn for sp, fn in FILES.items()} for s in subs}
    inputs = [metadata] + [p for d in files.values() for p in d.values()]
    for p in inputs:
        if not p.is_file():
            raise BrainalignError(
                f"{p} does not exist; expected a file of the {fmt.key} Things-EEG2 release."
            )
    options = {
        "source": "things-eeg2",
        "release": fmt.key,
        "name": name,
        "subjects": subs,
        "repetitions": repetitions,
        "images": str(Path(images).resolve()) if images else None,
    }
    done = check_existing(out, inputs, options, overwrite=overwrite)
    if done is not None:
        return done

    catalog = read_image_metadata(metadata)
    ids = {sp: [i for i, s in zip(catalog.image_ids, catalog.splits, strict=True) if s == sp] for sp in FILES}
    cons = {sp: [c for c, s in zip(catalog.concepts, catalog.splits, strict=True) if s == sp] for sp in FILES}
    opened = {s: {sp: _open_eeg_file(files[s][sp], sp, fmt, len(ids[sp]), metadata) for sp in FILES} for s in subs}
    first = opened[subs[0]]["train"]
    for s in subs:  # the same channels, times and repetition counts everywhere
        for sp in FILES:
            f = opened[s][sp]
            if f.ch_names != first.ch_names:
                raise field_error(f.path, _CH, f"the channel order of {first.path}", "a different order")
            if not np.allclose(f.times, first.times, atol=1e-6):
                raise field_error(f.path, _TIMES, f"the same times as {first.path}", "different times")
            ref = opened[subs[0]][sp]
            if f.n_reps != ref.n_reps:
                raise field_error(
                    f.path, _DATA, f"{ref.n_reps} repetitions per image (as {ref.path})", f.n_reps
                )
    for sp in FILES:
        log.info(
            "%s: %d %s images x %d repetitions per subject",
            fmt.release,
            len(ids[sp]),
            sp,
            opened[subs[0]][sp].n_reps,
        )

    meta = DatasetMeta(
        name=name,
        modality="eeg",
        ch_names=first.ch_names,
        sfreq=fmt.sfreq,
        tmin=fmt.tmin,
        n_times=fmt.n_times,
        subjects=tuple(subs),
        source={"kind": "real", "release": fmt.release, "catalog": metadata.name},
    )
    plans = [
        SubjectPlan(
            s, tuple(_stream(opened[s][sp], ids[sp], cons[sp], repetitions, chunk_mb) for sp in FILES)
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
