"""The brainalign data contract: how brain epochs, the image catalog and image-embedding
tables are laid out on disk. Everything else in the platform reads and writes through here.

Layout of a dataset root (see ``docs/data-contract.md`` for the full table)::

    <root>/dataset.json                       manifest: metadata, file hashes, fingerprint
    <root>/images.parquet                     image catalog (row order defines image_index)
    <root>/epochs/dataset=<name>/subject=<sid>/split=<train|test>/part-00000.parquet
    <root>/embeddings/<backbone>__<alignment>.parquet

Epoch files hold one row per (image, repetition), or per repetition-averaged image
(``repetition == AVERAGED``), with the epoch as an Arrow ``fixed_shape_tensor`` column of
shape ``(n_chans, n_times)`` float32, which Ray Data returns as ``(B, n_chans, n_times)``.
``dataset``, ``subject`` and ``split`` are hive partition columns (in the path, not the file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .._checks import BrainalignError, check_option
from .._io import atomic_dir, atomic_file, sha256_file, write_json_atomic

__all__ = [
    "AVERAGED",
    "CONTRACT_VERSION",
    "MODALITIES",
    "SPLITS",
    "BrainDataset",
    "DatasetMeta",
    "DatasetWriter",
    "EmbeddingTable",
    "MANIFEST",
    "epoch_schema",
    "list_tables",
    "open_dataset",
    "read_catalog",
    "read_embedding_table",
    "table_filename",
    "write_catalog",
    "write_embedding_table",
]

log = logging.getLogger(__name__)

CONTRACT_VERSION = 1
#: ``repetition`` value of a row that is an average over all repetitions of its image.
AVERAGED = -1
MODALITIES = ("eeg", "meg", "fmri")
SPLITS = ("train", "test")
ALIGNMENTS = ("none", "dreamsim", "glocal", "harmonization", "simulated")
MANIFEST = "dataset.json"
CATALOG = "images.parquet"
_META_KEY = b"brainalign"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def unreadable(path: Path | str, e: BaseException) -> BrainalignError:
    """The error for a file Arrow cannot read (truncated, corrupt, not Parquet)."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return BrainalignError(
        f"{path} is not a readable Parquet file ({type(e).__name__}: {first}); it is truncated or corrupt. "
        "Re-create it (re-run the command that wrote it, or re-download the source)."
    )


#: What reading a damaged Parquet file raises (Arrow errors and plain I/O errors).
READ_ERRORS: tuple[type[BaseException], ...] = (pa.ArrowException, OSError, ValueError)


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or "__" in value:
        raise BrainalignError(
            f"{what} {value!r} is not a valid name: use letters, digits, '_', '.', '-' "
            "(no '__', which separates backbone and alignment in file names)."
        )
    return value


# --------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class DatasetMeta:
    """Dataset-level metadata stored in ``dataset.json``.

    Parameters
    ----------
    name : str
        Dataset name, also the ``dataset=`` partition value (e.g. ``"things-eeg2"``).
    modality : {"eeg", "meg", "fmri"}
        For fMRI, channels are voxels and ``n_times == 1``.
    ch_names : tuple of str
        Channel (or voxel) names, in the order of the epoch tensor's first axis.
    sfreq : float
        Sampling frequency in Hz (``0.0`` allowed for fMRI).
    tmin : float
        Time of the first sample relative to image onset, in seconds.
    n_times : int
        Samples per epoch.
    subjects : tuple of str
        Subject ids, e.g. ``("01", "02")``; the order defines ``subject_index``.
    source : dict
        ``{"kind": "real", "release": ...}`` or ``{"kind": "simulated", "params": ..., "seed": ...}``.
    """

    name: str
    modality: str
    ch_names: tuple[str, ...]
    sfreq: float
    tmin: float
    n_times: int
    subjects: tuple[str, ...]
    source: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name("dataset name", self.name)
        check_option("modality", self.modality, MODALITIES)
        if len(self.ch_names) == 0 or self.n_times < 1:
            raise BrainalignError(
                f"Dataset {self.name!r} needs at least one channel and one sample, got "
                f"{len(self.ch_names)} channels x {self.n_times} samples."
            )
        if self.modality == "fmri" and self.n_times != 1:
            raise BrainalignError(f"fMRI epochs have n_times == 1 (voxels as channels), got {self.n_times}.")
        if len(set(self.subjects)) != len(self.subjects) or not self.subjects:
            raise BrainalignError(f"subjects must be a non-empty list of unique ids, got {self.subjects!r}.")
        for s in self.subjects:
            _check_name("subject id", s)
        if self.source.get("kind") not in ("real", "simulated"):
            raise BrainalignError(
                "source must say {'kind': 'real', 'release': ...} or {'kind': 'simulated', ...}, "
                f"got {dict(self.source)!r}."
            )

    @property
    def n_chans(self) -> int:
        return len(self.ch_names)

    @property
    def simulated(self) -> bool:
        return self.source.get("kind") == "simulated"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ch_names"] = list(self.ch_names)
        d["subjects"] = list(self.subjects)
        d["source"] = dict(self.source)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DatasetMeta:
        return cls(
            name=d["name"],
            modality=d["modality"],
            ch_names=tuple(d["ch_names"]),
            sfreq=float(d["sfreq"]),
            tmin=float(d["tmin"]),
            n_times=int(d["n_times"]),
            subjects=tuple(d["subjects"]),
            source=dict(d.get("source", {})),
        )


def epoch_schema(n_chans: int, n_times: int) -> pa.Schema:
    """Arrow schema of an epochs part file (partition columns are not stored in files)."""
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("concept", pa.string()),
            ("repetition", pa.int16()),
            ("epoch", pa.fixed_shape_tensor(pa.float32(), (n_chans, n_times))),
        ]
    )


def _tensor_array(x: np.ndarray) -> pa.Array:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(x)


# --------------------------------------------------------------------------- catalog
def write_catalog(
    path: Path,
    image_ids: Sequence[str],
    concepts: Sequence[str],
    splits: Sequence[str],
    paths: Sequence[str | None] | None = None,
) -> None:
    """Write the image catalog atomically. Row order defines ``image_index``."""
    n = len(image_ids)
    if not (len(concepts) == len(splits) == n and (paths is None or len(paths) == n)):
        raise BrainalignError("image catalog columns must all have the same length.")
    if len(set(image_ids)) != n:
        dup = sorted({i for i in image_ids if list(image_ids).count(i) > 1})[:5]
        raise BrainalignError(f"image catalog has duplicate image_id values, e.g. {dup}.")
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        raise BrainalignError(f"image catalog split values must be in {SPLITS}, got {bad}.")
    tbl = pa.table(
        {
            "image_id": pa.array(list(image_ids), pa.string()),
            "concept": pa.array(list(concepts), pa.string()),
            "split": pa.array(list(splits), pa.string()),
            "path": pa.array(list(paths) if paths is not None else [None] * n, pa.string()),
        }
    )
    with atomic_file(Path(path)) as tmp:
        pq.write_table(tbl, tmp)


def read_catalog(path: Path) -> pa.Table:
    """Read an image catalog (``image_id, concept, split, path``)."""
    path = Path(path)
    if not path.is_file():
        raise BrainalignError(f"Image catalog {path} does not exist.")
    try:
        tbl = pq.read_table(path)
    except READ_ERRORS as e:
        raise unreadable(path, e) from e
    missing = {"image_id", "concept", "split"} - set(tbl.column_names)
    if missing:
        raise BrainalignError(f"Image catalog {path} lacks columns {sorted(missing)}.")
    return tbl


# --------------------------------------------------------------------------- embedding tables
def table_filename(backbone: str, alignment: str) -> str:
    """File name of the embedding table of ``backbone`` under ``alignment``."""
    return f"{_check_name('backbone', backbone)}__{_check_name('alignment', alignment)}.parquet"


@dataclass(frozen=True)
class EmbeddingTable:
    """A frozen image-embedding table: one ``dim``-vector per image id."""

    image_ids: np.ndarray  # (N,) object array of str
    vectors: np.ndarray  # (N, dim) float32
    backbone: str
    alignment: str
    provenance: Mapping[str, Any]
    sha256: str = ""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def table_id(self) -> str:
        return f"{self.backbone}:{self.alignment}"

    def lookup(self, image_ids: Sequence[str], *, where: str = "") -> np.ndarray:
        """Vectors for ``image_ids`` in that order; a missing id raises naming it."""
        index = {k: i for i, k in enumerate(self.image_ids.tolist())}
        missing = [i for i in image_ids if i not in index]
        if missing:
            raise BrainalignError(
                f"Embedding table {self.table_id} has no vector for {len(missing)} image(s) "
                f"{where}, e.g. {missing[:5]}. Recompute the table for this image catalog."
            )
        return self.vectors[[index[i] for i in image_ids]]


def write_embedding_table(
    path: Path,
    *,
    image_ids: Sequence[str],
    vectors: np.ndarray,
    backbone: str,
    alignment: str,
    provenance: Mapping[str, Any],
) -> None:
    """Write an embedding table atomically with its metadata in the Parquet schema."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(image_ids):
        raise BrainalignError(
            f"embedding vectors must be (n_images={len(image_ids)}, dim), got {vectors.shape}."
        )
    if not np.isfinite(vectors).all():
        raise BrainalignError(f"embedding table {backbone}:{alignment} contains NaN or Inf.")
    if len(set(image_ids)) != len(image_ids):
        raise BrainalignError(f"embedding table {backbone}:{alignment} has duplicate image ids.")
    meta = {
        "contract_version": CONTRACT_VERSION,
        "backbone": _check_name("backbone", backbone),
        "alignment": _check_name("alignment", alignment),
        "dim": int(vectors.shape[1]),
        "provenance": dict(provenance),
    }
    tbl = pa.table(
        {"image_id": pa.array(list(image_ids), pa.string()), "embedding": _tensor_array(vectors)}
    ).replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with atomic_file(Path(path)) as tmp:
        pq.write_table(tbl, tmp)


def read_table_meta(path: Path) -> dict[str, Any]:
    """Metadata of an embedding table without reading its vectors."""
    try:
        schema = pq.read_schema(path)
    except READ_ERRORS as e:
        raise unreadable(path, e) from e
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise BrainalignError(
            f"{path} is not a brainalign embedding table (no 'brainalign' schema metadata)."
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BrainalignError(f"{path}: its brainalign metadata is not valid JSON ({e}); re-create the table.") from e
    missing = [k for k in ("backbone", "alignment", "dim") if k not in meta] if isinstance(meta, dict) else ["all"]
    if missing:
        raise BrainalignError(f"{path}: brainalign metadata lacks {missing}; re-create the table.")
    return dict(meta)


def read_embedding_table(path: Path) -> EmbeddingTable:
    """Read an embedding table written by :func:`write_embedding_table`."""
    path = Path(path)
    if not path.is_file():
        raise BrainalignError(f"Embedding table {path} does not exist.")
    meta = read_table_meta(path)
    try:
        tbl = pq.read_table(path)
    except READ_ERRORS as e:
        raise unreadable(path, e) from e
    if "embedding" not in tbl.column_names or "image_id" not in tbl.column_names:
        raise BrainalignError(f"{path}: expected columns 'image_id' and 'embedding', got {tbl.column_names}.")
    col = tbl.column("embedding").combine_chunks()
    if not isinstance(col.type, pa.FixedShapeTensorType):
        raise BrainalignError(f"{path}: column 'embedding' must be a fixed_shape_tensor, got {col.type}.")
    vectors = col.to_numpy_ndarray().astype(np.float32, copy=False)
    return EmbeddingTable(
        image_ids=np.asarray(tbl.column("image_id").to_pylist(), dtype=object),
        vectors=vectors,
        backbone=meta["backbone"],
        alignment=meta["alignment"],
        provenance=meta.get("provenance", {}),
        sha256=sha256_file(path),
    )


def list_tables(directory: Path) -> dict[str, Path]:
    """Map ``"backbone:alignment"`` to the table file for every table in ``directory``."""
    out: dict[str, Path] = {}
    for p in sorted(Path(directory).glob("*__*.parquet")):
        backbone, alignment = p.stem.split("__", 1)
        out[f"{backbone}:{alignment}"] = p
    return out


# --------------------------------------------------------------------------- dataset
def _fingerprint(meta: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    for rel in sorted(files):
        h.update(f"{rel}:{files[rel]['sha256']}\n".encode())
    return h.hexdigest()[:16]


class DatasetWriter:
    """Write a dataset in the contract, atomically.

    Use as a context manager: everything goes to a temporary directory beside ``root``,
    which replaces ``root`` only when the block exits without an error::

        with DatasetWriter(root, meta) as w:
            w.write_catalog(ids, concepts, splits)
            w.write_epochs("01", "train", ids, concepts, reps, x)   # may be called per chunk
            w.write_embedding_table(...)
    """

    def __init__(self, root: Path, meta: DatasetMeta, *, replace: bool = False) -> None:
        self.root = Path(root)
        self.meta = meta
        self._replace = replace
        self._ctx: Any = None
        self._tmp: Path | None = None
        self._parts: dict[tuple[str, str], int] = {}
        self._seen: dict[tuple[str, str], set[tuple[str, int]]] = {}
        self.row_group_size = 512

    def __enter__(self) -> DatasetWriter:
        self._ctx = atomic_dir(self.root, kind="dataset", replace=self._replace)
        self._tmp = self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            try:
                self._finish()
            except BaseException as e:
                self._ctx.__exit__(type(e), e, e.__traceback__)
                raise
        self._ctx.__exit__(*exc)

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("DatasetWriter must be used as a context manager.")
        return self._tmp

    def write_catalog(
        self,
        image_ids: Sequence[str],
        concepts: Sequence[str],
        splits: Sequence[str],
        paths: Sequence[str | None] | None = None,
    ) -> None:
        write_catalog(self.tmp / CATALOG, image_ids, concepts, splits, paths)

    def write_epochs(
        self,
        subject: str,
        split: str,
        image_ids: Sequence[str],
        concepts: Sequence[str],
        repetitions: Sequence[int] | np.ndarray,
        epochs: np.ndarray,
    ) -> Path:
        """Append one part file of epochs for (subject, split); returns its path."""
        check_option("subject", subject, self.meta.subjects)
        check_option("split", split, SPLITS)
        n = len(image_ids)
        shape = (n, self.meta.n_chans, self.meta.n_times)
        if epochs.shape != shape:
            raise BrainalignError(
                f"epochs for subject {subject} split {split} must have shape "
                f"(n_rows, n_chans, n_times) = {shape}, got {epochs.shape}."
            )
        if len(concepts) != n or len(repetitions) != n:
            raise BrainalignError("image_ids, concepts and repetitions must have one entry per epoch.")
        if not np.isfinite(epochs).all():
            raise BrainalignError(f"epochs for subject {subject} split {split} contain NaN or Inf.")
        seen = self._seen.setdefault((subject, split), set())
        for key in zip(image_ids, (int(r) for r in repetitions), strict=True):
            if key in seen:
                raise BrainalignError(
                    f"duplicate epoch (image_id, repetition) = {key} for subject {subject} split {split}."
                )
            seen.add(key)
        k = self._parts.get((subject, split), 0)
        self._parts[(subject, split)] = k + 1
        rel = Path("epochs") / f"dataset={self.meta.name}" / f"subject={subject}" / f"split={split}"
        (self.tmp / rel).mkdir(parents=True, exist_ok=True)
        tbl = pa.table(
            {
                "image_id": pa.array(list(image_ids), pa.string()),
                "concept": pa.array(list(concepts), pa.string()),
                "repetition": pa.array(np.asarray(repetitions, dtype=np.int16)),
                "epoch": _tensor_array(epochs),
            },
            schema=epoch_schema(self.meta.n_chans, self.meta.n_times),
        )
        out = self.tmp / rel / f"part-{k:05d}.parquet"
        pq.write_table(tbl, out, row_group_size=self.row_group_size)
        return out

    def write_embedding_table(self, **kwargs: Any) -> Path:
        out = self.tmp / "embeddings" / table_filename(kwargs["backbone"], kwargs["alignment"])
        write_embedding_table(out, **kwargs)
        return out

    def _finish(self) -> None:
        if not (self.tmp / CATALOG).is_file():
            raise BrainalignError("a dataset needs an image catalog: call write_catalog().")
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(self.tmp.rglob("*.parquet")):
            rel = p.relative_to(self.tmp).as_posix()
            if rel.startswith("embeddings/"):
                continue  # tables carry their own provenance and may be added later
            files[rel] = {"sha256": sha256_file(p), "rows": pq.ParquetFile(p).metadata.num_rows}
        meta = self.meta.to_json()
        manifest = {
            "contract_version": CONTRACT_VERSION,
            "meta": meta,
            "files": files,
            "fingerprint": _fingerprint(meta, files),
        }
        write_json_atomic(self.tmp / MANIFEST, manifest)


class BrainDataset:
    """A dataset root opened for reading. Cheap: reads only the manifest and catalog."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        man = self.root / MANIFEST
        if not self.root.exists():
            raise BrainalignError(
                f"Dataset path {self.root} does not exist. Create one with "
                "`brainalign data simulate --out PATH` or ingest a real release."
            )
        if not man.is_file():
            raise BrainalignError(
                f"{self.root} is not a brainalign dataset: {MANIFEST} is missing. "
                "Point to the directory that `brainalign data simulate` or an ingest wrote."
            )
        try:
            manifest = json.loads(man.read_text())
        except json.JSONDecodeError as e:
            raise BrainalignError(f"{man} is not valid JSON ({e}); the dataset is corrupt.") from e
        version = manifest.get("contract_version")
        if version != CONTRACT_VERSION:
            raise BrainalignError(
                f"{man} has contract_version {version!r}; this brainalign reads version "
                f"{CONTRACT_VERSION}. Re-create the dataset with this version."
            )
        missing = [k for k in ("meta", "files", "fingerprint") if k not in manifest]
        if missing:
            raise BrainalignError(
                f"{man} lacks {missing}; the manifest is damaged or was not written by brainalign. "
                "Re-create or re-ingest the dataset."
            )
        self.manifest: dict[str, Any] = manifest
        try:
            self.meta = DatasetMeta.from_json(manifest["meta"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, BrainalignError):
                raise
            raise BrainalignError(
                f"{man}: 'meta' is incomplete or malformed ({type(e).__name__}: {e}); re-create the dataset."
            ) from e
        self.fingerprint: str = manifest["fingerprint"]
        self._catalog: pa.Table | None = None

    # ---- catalog
    @property
    def catalog(self) -> pa.Table:
        if self._catalog is None:
            self._catalog = read_catalog(self.root / CATALOG)
        return self._catalog

    def image_ids(self, split: str | None = None) -> list[str]:
        ids = self.catalog.column("image_id").to_pylist()
        if split is None:
            return ids
        splits = self.catalog.column("split").to_pylist()
        return [i for i, s in zip(ids, splits, strict=True) if s == split]

    def image_index(self) -> dict[str, int]:
        """Map image_id -> row number in the catalog (the platform-wide image index)."""
        return {k: i for i, k in enumerate(self.catalog.column("image_id").to_pylist())}

    # ---- epochs
    def epoch_dir(self, subject: str, split: str) -> Path:
        return (
            self.root / "epochs" / f"dataset={self.meta.name}" / f"subject={subject}" / f"split={split}"
        )

    def epoch_files(self, subject: str, split: str) -> list[Path]:
        check_option("subject", subject, self.meta.subjects)
        check_option("split", split, SPLITS)
        files = sorted(self.epoch_dir(subject, split).glob("part-*.parquet"))
        if not files:
            raise BrainalignError(
                f"No {split} epochs for subject {subject} under {self.epoch_dir(subject, split)}."
            )
        return files

    def iter_epochs(
        self, subject: str, split: str, batch_rows: int = 2048
    ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        """Stream ``(image_ids, repetitions, epochs)`` chunks in file order (bounded memory)."""
        for f in self.epoch_files(subject, split):
            try:
                pf = pq.ParquetFile(f)
                batches = pf.iter_batches(batch_size=batch_rows, columns=["image_id", "repetition", "epoch"])
                for batch in batches:
                    ep = batch.column("epoch")
                    x = ep.to_numpy_ndarray() if hasattr(ep, "to_numpy_ndarray") else np.asarray(ep)
                    yield (
                        batch.column("image_id").to_pylist(),
                        batch.column("repetition").to_numpy(),
                        np.asarray(x, dtype=np.float32),
                    )
            except READ_ERRORS as e:
                if isinstance(e, BrainalignError):
                    raise
                raise unreadable(f, e) from e

    def load_epochs(self, subject: str, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """All ``(image_ids, repetitions, epochs)`` of one subject and split, in memory."""
        ids: list[str] = []
        reps: list[np.ndarray] = []
        xs: list[np.ndarray] = []
        for i, r, x in self.iter_epochs(subject, split):
            ids += i
            reps.append(r)
            xs.append(x)
        return ids, np.concatenate(reps), np.concatenate(xs)

    # ---- embedding tables
    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    def tables(self) -> dict[str, Path]:
        return list_tables(self.embeddings_dir)


def open_dataset(root: Path | str) -> BrainDataset:
    """Open a dataset root written in the contract; raises a clear error if it is not one."""
    return BrainDataset(Path(root))
