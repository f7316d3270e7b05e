"""What every source shares: the image catalog, chunked streams, staging and assembly.

A source module (``things_eeg2``, ``things_meg``, ``nsd``) does two things:

1. It opens every input file of every subject and checks everything that can be checked
   without reading the bulk data: keys, shapes, dtypes, channel names and order, sampling
   rate and times, counts per split, duplicated images, disjoint train/test concepts. It
   builds the :class:`Catalog` and, per subject, a :class:`SubjectPlan` whose streams yield
   float32 chunks lazily.
2. It calls :func:`run_ingest`, which streams every chunk into the contract.

:func:`run_ingest` makes the ingest atomic, resumable and idempotent:

* each subject is first written as a complete one-subject dataset under a staging directory
  beside the output (``.<name>.ingest-<fingerprint>/sub-<id>``), atomically
  (:class:`~brainalign.data.contract.DatasetWriter`); a re-run after an interruption reuses
  the subjects already staged;
* the final dataset is then assembled by hard-linking the staged part files into one
  :class:`~brainalign.data.contract.DatasetWriter`, which renames it into place only when it
  is complete; so the output root either does not exist or holds a whole dataset;
* the dataset records a fingerprint of its inputs (path, size and modification time of every
  input file, plus the options); running again with the same inputs finds it and does nothing.

Values that are not finite are found while streaming (the bulk data are read once); they
abort the ingest before anything reaches the output root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..._checks import BrainalignError, check_option, check_range
from ..._io import claim_dir, mark_staging, sweep_stale
from ..contract import MANIFEST, SPLITS, DatasetMeta, DatasetWriter, open_dataset

__all__ = [
    "INGEST_VERSION",
    "REPETITION_MODES",
    "Catalog",
    "Chunk",
    "IngestResult",
    "SplitStream",
    "SubjectPlan",
    "as_str_list",
    "check_chunk_mb",
    "check_existing",
    "check_finite",
    "field_error",
    "items_per_chunk",
    "run_ingest",
    "subject_id",
]

log = logging.getLogger(__name__)

#: Bump when the way a source is converted changes: old datasets then no longer match.
INGEST_VERSION = 1
#: ``keep``: one row per repetition; ``average``: one row per image (``repetition == AVERAGED``).
REPETITION_MODES = ("keep", "average")


def field_error(file: Path | str, field: str, expected: str, got: object) -> BrainalignError:
    """The error for a bad input: names the file, the field, what was expected and what came."""
    return BrainalignError(f"{file}: field {field!r}: expected {expected}, got {got}.")


def as_str_list(value: Any, file: Path | str, field: str) -> list[str]:
    """A 1-D sequence of strings (list, tuple or numpy str/object array) as a list of str."""
    from .safe_pickle import FileBackedArray

    if isinstance(value, FileBackedArray):
        value = value.read()
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise field_error(file, field, "a 1-D sequence of strings", f"an array of shape {value.shape}")
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise field_error(file, field, "a sequence of strings", type(value).__name__)
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise field_error(file, field, "strings only", f"{len(bad)} non-string item(s), e.g. {bad[0]!r}")
    return [str(v) for v in value]


def subject_id(value: int | str) -> str:
    """Normalize a subject given as ``1``, ``"1"``, ``"01"``, ``"sub-01"``, ``"P1"`` or ``"subj01"`` to ``"01"``."""
    s = str(value).strip()
    for prefix in ("sub-", "subj", "sub", "P"):
        if s.startswith(prefix) and s[len(prefix) :].isdigit():
            s = s[len(prefix) :]
            break
    if not s.isdigit() or int(s) < 1:
        raise BrainalignError(
            f"Invalid subject {value!r}; expected a positive number such as 1, '01' or 'sub-01'."
        )
    return f"{int(s):02d}"


def check_chunk_mb(chunk_mb: float) -> float:
    """``--chunk-mb``: a positive, finite number of megabytes (it bounds the ingest's memory)."""
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, int | float):
        raise BrainalignError(f"chunk_mb (--chunk-mb) must be a number of megabytes, got {chunk_mb!r}.")
    return check_range("chunk_mb (--chunk-mb, megabytes per chunk; e.g. 128)", chunk_mb, low=0.0,
                       low_inclusive=False, high=1 << 20)


def items_per_chunk(bytes_per_item: int, chunk_mb: float) -> int:
    """How many items (images or trials) of ``bytes_per_item`` source bytes fit in a chunk."""
    check_chunk_mb(chunk_mb)
    return max(1, int(chunk_mb * (1 << 20)) // max(1, bytes_per_item))


def check_finite(
    x: np.ndarray, file: Path | str, field: str, locate: Callable[[tuple[int, ...]], str]
) -> None:
    """Raise naming the first non-finite value of ``x`` (``locate`` turns its index into words)."""
    finite = np.isfinite(x)
    if finite.all():
        return
    where = tuple(int(i) for i in np.argwhere(~finite)[0])
    n_bad = int(finite.size - np.count_nonzero(finite))
    raise BrainalignError(
        f"{file}: field {field!r}: expected finite values, found {n_bad} NaN/Inf value(s) in this chunk, "
        f"the first at {locate(where)} (value {x[where]!r}; float64 values beyond float32 range also "
        "become Inf). Repair or drop those trials in the source before ingesting."
    )


# --------------------------------------------------------------------------- catalog
@dataclass(frozen=True)
class Catalog:
    """The image catalog of a dataset (row order = ``image_index``).

    Parameters
    ----------
    image_ids, concepts, splits : tuple of str
        One entry per image; ``splits`` values are ``"train"`` or ``"test"``.
    paths : tuple of (str or None)
        Image path relative to the release's image root, or None where the release has no
        image files (NSD images live in one HDF5 array).
    source : str
        Where the catalog comes from, for messages.
    """

    image_ids: tuple[str, ...]
    concepts: tuple[str, ...]
    splits: tuple[str, ...]
    paths: tuple[str | None, ...]
    source: str = ""
    _split_of: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if not (len(self.concepts) == len(self.splits) == len(self.paths) == n):
            raise BrainalignError(f"{self.source}: catalog columns differ in length.")
        counts = Counter(self.image_ids)
        dups = [k for k, c in counts.items() if c > 1]
        if dups:
            first = dups[0]
            rows = [i for i, k in enumerate(self.image_ids) if k == first]
            raise BrainalignError(
                f"{self.source}: duplicated image {first!r} (rows {rows} of the catalog, "
                f"{len(dups)} duplicated id(s) in all); expected every image once. Image ids are file stems, "
                "so two files with the same stem cannot both be ingested."
            )
        bad = sorted(set(self.splits) - set(SPLITS))
        if bad:
            raise BrainalignError(f"{self.source}: split values {bad}; expected {SPLITS}.")
        train = {c for c, s in zip(self.concepts, self.splits, strict=True) if s == "train"}
        test = {c for c, s in zip(self.concepts, self.splits, strict=True) if s == "test"}
        both = sorted(train & test)
        if both:
            raise BrainalignError(
                f"{self.source}: test concept(s) {both[:5]} also appear in training ({len(both)} in all); "
                "expected train and test concepts to be disjoint."
            )
        self._split_of.update(zip(self.image_ids, self.splits, strict=True))

    def __len__(self) -> int:
        return len(self.image_ids)

    def split_of(self, image_id: str) -> str | None:
        """The split of ``image_id``, or None if the catalog lacks it."""
        return self._split_of.get(image_id)

    def count(self, split: str) -> int:
        return sum(1 for s in self.splits if s == split)

    def check_files(self, images_root: Path) -> None:
        """Raise if an image file listed in the catalog is missing under ``images_root``."""
        missing = [p for p in self.paths if p is not None and not (images_root / p).is_file()]
        if missing:
            raise BrainalignError(
                f"{images_root}: {len(missing)} of {len(self.paths)} catalog image file(s) missing, e.g. "
                f"{missing[:3]}; expected the release's image folder (with the paths listed in {self.source})."
            )
        log.info("all %d image files present under %s", len(self.paths), images_root)


# --------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Chunk:
    """Rows to write: ``epochs`` is ``(n_rows, n_chans, n_times)`` float32."""

    image_ids: Sequence[str]
    concepts: Sequence[str]
    repetitions: np.ndarray
    epochs: np.ndarray


@dataclass(frozen=True)
class SplitStream:
    """One (subject, split): ``n_rows`` rows produced lazily by ``chunks()``."""

    split: str
    n_rows: int
    chunks: Callable[[], Iterator[Chunk]]
    source: str


@dataclass(frozen=True)
class SubjectPlan:
    """Everything to write for one subject (built only after its inputs were checked)."""

    subject: str
    streams: tuple[SplitStream, ...]


@dataclass(frozen=True)
class IngestResult:
    """What :func:`run_ingest` did.

    Attributes
    ----------
    root : Path
        The dataset root.
    fingerprint : str
        Fingerprint of the *inputs* and options (``source.ingest.fingerprint`` in
        ``dataset.json``): what makes a re-run a no-op.
    up_to_date : bool
        True if the root already held this very ingest and nothing was written.
    rows : dict
        ``{(subject, split): n_rows}`` written (empty when ``up_to_date``).
    dataset_fingerprint : str
        The *dataset* fingerprint (``fingerprint`` in ``dataset.json``, of the written files):
        the one every MLflow run records as ``data_fingerprint``, so the one to search for.
    """

    root: Path
    fingerprint: str
    up_to_date: bool
    rows: Mapping[tuple[str, str], int] = field(default_factory=dict)
    dataset_fingerprint: str = ""


def input_fingerprint(inputs: Sequence[Path], options: Mapping[str, Any]) -> str:
    """Hash of the options and of each input file's resolved path, size and mtime."""
    files = []
    for p in sorted({Path(p).resolve() for p in inputs}):
        st = p.stat()
        files.append([str(p), st.st_size, st.st_mtime_ns])
    blob = json.dumps([INGEST_VERSION, dict(options), files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_existing(
    out: Path | str, inputs: Sequence[Path], options: Mapping[str, Any], *, overwrite: bool = False
) -> IngestResult | None:
    """The :class:`IngestResult` of a no-op if ``out`` already holds this ingest, else None.

    Sources call this first, so a re-run with the same inputs does not even re-read headers.

    Raises
    ------
    BrainalignError
        If ``out`` holds a dataset from other inputs or options and ``overwrite`` is False,
        or ``out`` exists and is not a dataset.
    """
    out = Path(out)
    fp = input_fingerprint(inputs, options)
    if (out / MANIFEST).is_file():
        old = _existing_fingerprint(out)
        if old == fp:
            ds_fp = open_dataset(out).fingerprint
            log.info("%s is up to date (dataset fingerprint %s, inputs fingerprint %s); nothing to do", out, ds_fp, fp)
            return IngestResult(out, fp, True, dataset_fingerprint=ds_fp)
        if not overwrite:
            raise BrainalignError(
                f"{out} already holds a dataset from other inputs or options (fingerprint {old}, these inputs "
                f"give {fp}); pass overwrite=True (CLI: --overwrite) to replace it, or choose another --out."
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BrainalignError(f"{out} exists and is not a brainalign dataset; refusing to write there.")
    return None


def _existing_fingerprint(root: Path) -> str | None:
    ds = open_dataset(root)
    ingest = ds.meta.source.get("ingest", {})
    return ingest.get("fingerprint") if isinstance(ingest, Mapping) else None


def _write_subject(
    root: Path, meta: DatasetMeta, catalog: Catalog, plan: SubjectPlan, show_progress: bool
) -> dict[tuple[str, str], int]:
    from tqdm.auto import tqdm

    rows: dict[tuple[str, str], int] = {}
    total = sum(s.n_rows for s in plan.streams)
    with DatasetWriter(root, replace(meta, subjects=(plan.subject,)), replace=True) as w:
        w.write_catalog(catalog.image_ids, catalog.concepts, catalog.splits, catalog.paths)
        with tqdm(
            total=total, desc=f"{meta.name} sub-{plan.subject}", unit="epoch", disable=not show_progress
        ) as bar:
            for stream in plan.streams:
                n = 0
                for chunk in stream.chunks():
                    wrong = [i for i in chunk.image_ids if catalog.split_of(i) != stream.split]
                    if wrong:
                        raise BrainalignError(
                            f"{stream.source}: {len(wrong)} {stream.split} row(s) of image(s) "
                            f"{sorted(set(wrong))[:3]} that the catalog ({catalog.source}) does not list as "
                            f"{stream.split} images; expected every image id in the catalog, in the same split."
                        )
                    w.write_epochs(
                        plan.subject,
                        stream.split,
                        chunk.image_ids,
                        chunk.concepts,
                        chunk.repetitions,
                        chunk.epochs,
                    )
                    n += len(chunk.image_ids)
                    bar.update(len(chunk.image_ids))
                    del chunk  # let the chunk go before the stream reads the next one
                if n != stream.n_rows:
                    raise BrainalignError(
                        f"{stream.source}: wrote {n} {stream.split} rows for subject {plan.subject}, "
                        f"expected {stream.n_rows}."
                    )
                rows[(plan.subject, stream.split)] = n
    return rows


def _staged_ok(sub_root: Path, subject: str, fingerprint: str) -> bool:
    if not (sub_root / MANIFEST).is_file():
        return False
    try:
        ds = open_dataset(sub_root)
    except BrainalignError:
        return False
    ingest = ds.meta.source.get("ingest", {})
    return (
        ds.meta.subjects == (subject,)
        and isinstance(ingest, Mapping)
        and ingest.get("fingerprint") == fingerprint
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same file system (staging is beside the output): no copy
    except OSError:
        shutil.copy2(src, dst)


def run_ingest(
    out: Path | str,
    meta: DatasetMeta,
    catalog: Catalog,
    plans: Sequence[SubjectPlan],
    *,
    inputs: Sequence[Path],
    options: Mapping[str, Any],
    overwrite: bool = False,
    images_root: Path | None = None,
    extras: Callable[[Path], None] | None = None,
    show_progress: bool = True,
) -> IngestResult:
    """Write ``plans`` as one dataset at ``out``: atomic, resumable per subject, idempotent.

    Parameters
    ----------
    out : Path or str
        Dataset root to create.
    meta : DatasetMeta
        Dataset metadata; ``meta.source`` gains an ``"ingest"`` entry with the fingerprint.
    catalog : Catalog
        The image catalog (validated on construction).
    plans : sequence of SubjectPlan
        One per subject, in ``meta.subjects`` order.
    inputs : sequence of Path
        Every input file; their path, size and mtime enter the fingerprint.
    options : mapping
        The options that shape the output (JSON-serializable); they enter the fingerprint.
    overwrite : bool
        Replace a dataset at ``out`` that came from other inputs or options.
    images_root : Path, optional
        If given, every catalog image path must exist under it, and its top-level folders
        are symlinked into the dataset root, so catalog paths resolve relative to the catalog.
    extras : callable, optional
        Called with the dataset's temporary root before it is renamed into place, to add
        files that are not epochs (e.g. exported stimulus images).
    show_progress : bool
        Show a tqdm bar per subject (``TQDM_DISABLE=1`` also silences them).

    Returns
    -------
    IngestResult

    Raises
    ------
    BrainalignError
        If ``out`` holds something else (without ``overwrite``), or a chunk is invalid.
    """
    out = Path(out)
    check_option("repetitions", options.get("repetitions", "keep"), REPETITION_MODES)
    fp = input_fingerprint(inputs, options)
    done = check_existing(out, inputs, options, overwrite=overwrite)
    if done is not None:
        return done
    if images_root is not None:
        catalog.check_files(Path(images_root))
    if [p.subject for p in plans] != list(meta.subjects):
        raise BrainalignError(
            f"plans for {[p.subject for p in plans]} do not match meta.subjects {meta.subjects}."
        )

    source = dict(meta.source)
    source["ingest"] = {"version": INGEST_VERSION, "fingerprint": fp, "options": dict(options)}
    meta = replace(meta, source=source)
    staging = out.parent / f".{out.name}.ingest-{fp}"
    # staging folders of OUR earlier ingests into this --out with other inputs, whose process is gone
    for gone in sweep_stale(out.parent, f".{out.name}.ingest-*", exclude=(staging,)):
        log.warning("removed %s, the staging folder of an earlier, unfinished ingest with other inputs", gone)
    claim_dir(staging, "ingest-staging")
    mark_staging(staging)  # this process is writing it now (a concurrent ingest leaves it alone)
    try:
        rows = _stage_and_assemble(out, meta, catalog, plans, staging, fp, overwrite=overwrite,
                                   images_root=images_root, extras=extras, show_progress=show_progress)
    except KeyboardInterrupt:
        # Ctrl-C / SIGTERM: the subjects already staged stay for a resume (same command); the
        # subject being written was removed by its own atomic write.
        log.warning("ingest interrupted: subjects staged so far are kept in %s; run the same command to resume "
                    "(or delete that folder; the next ingest into %s with other inputs removes it)", staging, out)
        raise
    except BaseException:
        # a failure (bad data found while streaming, full disk ...): the staged data would never be
        # reused as they are (fixing the input changes its fingerprint), so nothing stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    ds_fp = open_dataset(out).fingerprint
    log.info("wrote %s (%d subjects, dataset fingerprint %s, inputs fingerprint %s)", out, len(plans), ds_fp, fp)
    return IngestResult(out, fp, False, rows, dataset_fingerprint=ds_fp)


def _stage_and_assemble(
    out: Path,
    meta: DatasetMeta,
    catalog: Catalog,
    plans: Sequence[SubjectPlan],
    staging: Path,
    fp: str,
    *,
    overwrite: bool,
    images_root: Path | None,
    extras: Callable[[Path], None] | None,
    show_progress: bool,
) -> dict[tuple[str, str], int]:
    rows: dict[tuple[str, str], int] = {}
    for plan in plans:
        sub_root = staging / f"sub-{plan.subject}"
        if _staged_ok(sub_root, plan.subject, fp):
            log.info("subject %s already staged in %s; reusing it", plan.subject, sub_root)
            ds = open_dataset(sub_root)
            for rel, info in ds.manifest["files"].items():
                for split in SPLITS:
                    if f"/split={split}/" in rel:
                        rows[(plan.subject, split)] = rows.get((plan.subject, split), 0) + int(info["rows"])
            continue
        log.info(
            "subject %s: writing %s", plan.subject, ", ".join(f"{s.n_rows} {s.split}" for s in plan.streams)
        )
        rows.update(_write_subject(sub_root, meta, catalog, plan, show_progress))

    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory made by the user: the finished dataset takes its place
    with DatasetWriter(out, meta, replace=overwrite) as w:
        w.write_catalog(catalog.image_ids, catalog.concepts, catalog.splits, catalog.paths)
        if images_root is not None:
            # The contract resolves catalog paths relative to the catalog: link the release's
            # image folders (e.g. training_images/, test_images/) into the root instead of copying.
            for top in sorted({p.split("/", 1)[0] for p in catalog.paths if p and "/" in p}):
                (w.tmp / top).symlink_to(Path(images_root).resolve() / top, target_is_directory=True)
        if extras is not None:
            extras(w.tmp)
        for plan in plans:
            staged = open_dataset(staging / f"sub-{plan.subject}")
            for stream in plan.streams:
                for f in staged.epoch_files(plan.subject, stream.split):
                    _link_or_copy(f, w.tmp / f.relative_to(staged.root))
    return rows
