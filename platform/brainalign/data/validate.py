"""Check a dataset against the contract and report EVERY problem, with where and how to fix.

Used by ``brainalign data validate PATH`` and before training. Reads epochs streaming, so a
full-size dataset is checked in bounded memory.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .._checks import BrainalignError
from .._io import sha256_file
from .contract import (
    MANIFEST,
    READ_ERRORS,
    SPLITS,
    BrainDataset,
    _fingerprint,
    list_tables,
    open_dataset,
    read_table_meta,
)

__all__ = ["Problem", "require_valid", "validate_dataset"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One contract violation: where it is, what is wrong, and the fix."""

    where: str
    what: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.what}" + (f" (fix: {self.fix})" if self.fix else "")


def validate_dataset(root: Path | str, *, check_hashes: bool = True, check_tables: bool = True) -> list[Problem]:
    """All problems found in the dataset at ``root`` (empty list = valid).

    ``check_tables=False`` leaves out the dataset's own embedding tables (a run may take its
    table from another directory and checks that one itself).
    """
    try:
        ds = open_dataset(root)
    except BrainalignError as e:
        return [Problem(str(root), str(e))]
    problems: list[Problem] = []
    problems += _check_manifest(ds, check_hashes)
    cat_problems, catalog = _check_catalog(ds)
    problems += cat_problems
    if catalog is None:
        return problems
    used: dict[str, set[str]] = {"train": set(), "test": set()}
    for subject in ds.meta.subjects:
        for split in SPLITS:
            problems += _check_epochs(ds, subject, split, catalog, used[split])
    if check_tables:
        problems += _check_tables(ds, used)
    return problems


def require_valid(ds: BrainDataset, cache: Path | None = None) -> None:
    """Raise a :class:`BrainalignError` listing every problem of ``ds``, before any training.

    The full check streams every epoch once, so it runs once per dataset fingerprint: a
    marker under ``$BRAINALIGN_CACHE/validated/`` records a dataset that passed (a sweep's
    trials and finals then pay nothing). File hashes are not re-read here; ``brainalign data
    validate`` does that.
    """
    import hashlib

    from .._io import atomic_file
    from ..paths import cache_dir

    key = hashlib.sha256(f"{ds.fingerprint}|{ds.root.resolve()}".encode()).hexdigest()[:32]
    marker = Path(cache or cache_dir()) / "validated" / f"{key}.json"
    if marker.is_file():
        return
    problems = validate_dataset(ds.root, check_hashes=False, check_tables=False)
    if problems:
        shown = "\n  - ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise BrainalignError(
            f"dataset {ds.root} breaks the data contract ({len(problems)} problem(s)); nothing was trained:\n"
            f"  - {shown}{more}\nRun `brainalign data validate {ds.root}` for the full list, then fix or "
            "re-create the dataset (docs/data-contract.md)."
        )
    with atomic_file(marker) as tmp:
        tmp.write_text(json.dumps({"root": str(ds.root), "fingerprint": ds.fingerprint}))


def _check_manifest(ds: BrainDataset, check_hashes: bool) -> list[Problem]:
    out = []
    files = ds.manifest.get("files", {})
    for rel, info in files.items():
        p = ds.root / rel
        if not p.is_file():
            out.append(Problem(rel, "listed in the manifest but missing", "re-create or re-ingest the dataset"))
        elif check_hashes and sha256_file(p) != info.get("sha256"):
            out.append(Problem(rel, "content differs from the manifest's sha256 (file changed after writing)",
                               "re-create the dataset; never edit files in place"))
    on_disk = {p.relative_to(ds.root).as_posix() for p in ds.root.rglob("*.parquet")
               if not p.relative_to(ds.root).as_posix().startswith("embeddings/")}
    for rel in sorted(on_disk - set(files)):
        out.append(Problem(rel, "Parquet file not in the manifest", "remove it or re-create the dataset"))
    if _fingerprint(ds.manifest["meta"], files) != ds.fingerprint:
        out.append(Problem(MANIFEST, "fingerprint does not match the manifest contents", "re-create the dataset"))
    return out


def _check_catalog(ds: BrainDataset) -> tuple[list[Problem], dict[str, tuple[str, str]] | None]:
    out: list[Problem] = []
    try:
        cat = ds.catalog
    except BrainalignError as e:
        return [Problem("images.parquet", str(e))], None
    ids = cat.column("image_id").to_pylist()
    concepts = cat.column("concept").to_pylist()
    splits = cat.column("split").to_pylist()
    dups = [k for k, c in Counter(ids).items() if c > 1]
    if dups:
        out.append(Problem("images.parquet", f"{len(dups)} duplicate image_id values, e.g. {dups[:5]}",
                           "image ids must be unique"))
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        out.append(Problem("images.parquet", f"split values {bad} not in {SPLITS}"))
    train_c = {c for c, s in zip(concepts, splits, strict=True) if s == "train"}
    test_c = {c for c, s in zip(concepts, splits, strict=True) if s == "test"}
    both = sorted(train_c & test_c)
    if both:
        out.append(Problem("images.parquet", f"{len(both)} test concept(s) also in training, e.g. {both[:5]}",
                           "test concepts must be disjoint from training concepts"))
    return out, {i: (c, s) for i, c, s in zip(ids, concepts, splits, strict=True)}


def _check_epochs(ds: BrainDataset, subject: str, split: str, catalog: dict[str, tuple[str, str]],
                  used: set[str]) -> list[Problem]:
    out: list[Problem] = []
    where_dir = ds.epoch_dir(subject, split).relative_to(ds.root).as_posix()
    files = sorted(ds.epoch_dir(subject, split).glob("part-*.parquet"))
    if not files:
        return [Problem(where_dir, "no epoch files", f"every subject needs {split} epochs")]
    expected = (ds.meta.n_chans, ds.meta.n_times)
    seen: dict[tuple[str, int], int] = {}
    for f in files:
        rel = f.relative_to(ds.root).as_posix()
        try:
            out += _check_epoch_file(f, rel, split, expected, catalog, used, seen)
        except READ_ERRORS as e:
            if isinstance(e, BrainalignError):
                raise
            out.append(_unreadable_problem(rel, e))
    dup_rows = sum(seen.values()) - len(seen)
    if dup_rows:
        out.append(Problem(where_dir, f"{dup_rows} duplicate (image_id, repetition) rows"))
    return out


def _unreadable_problem(rel: str, e: BaseException) -> Problem:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return Problem(rel, f"unreadable Parquet file ({type(e).__name__}: {first}): truncated or corrupt",
                   "re-create the file (re-run the command that wrote it, or re-ingest the dataset)")


def _check_epoch_file(f: Path, rel: str, split: str, expected: tuple[int, int],
                      catalog: dict[str, tuple[str, str]], used: set[str],
                      seen: dict[tuple[str, int], int]) -> list[Problem]:
    """Problems of one epochs part file (``seen`` counts (image_id, repetition) keys across files)."""
    out: list[Problem] = []
    schema = pq.read_schema(f)
    missing = {"image_id", "concept", "repetition", "epoch"} - set(schema.names)
    if missing:
        return [Problem(rel, f"missing columns {sorted(missing)}")]
    typ = schema.field("epoch").type
    if not isinstance(typ, pa.FixedShapeTensorType):
        return [Problem(rel, f"column 'epoch' is {typ}, expected fixed_shape_tensor<float>{expected}",
                        "write epochs with pa.FixedShapeTensorArray.from_numpy_ndarray")]
    if tuple(typ.shape) != expected or typ.value_type != pa.float32():
        return [Problem(rel, f"epoch tensor is {typ.value_type}{tuple(typ.shape)}, expected float32{expected} "
                        "(n_chans x n_times from dataset.json)")]
    n_bad = 0
    unknown: list[str] = []
    wrong_split: list[str] = []
    wrong_concept: list[str] = []
    for batch in pq.ParquetFile(f).iter_batches(batch_size=2048):
        x = batch.column("epoch").to_numpy_ndarray()
        n_bad += int((~np.isfinite(x).reshape(len(x), -1).all(axis=1)).sum())
        for image_id, rep, concept in zip(batch.column("image_id").to_pylist(),
                                          batch.column("repetition").to_pylist(),
                                          batch.column("concept").to_pylist(), strict=True):
            key = (image_id, rep)
            seen[key] = seen.get(key, 0) + 1
            info = catalog.get(image_id)
            if info is None:
                unknown.append(image_id)
            elif info[1] != split:
                wrong_split.append(image_id)
            elif info[0] != concept:
                wrong_concept.append(image_id)
            used.add(image_id)
    if n_bad:
        out.append(Problem(rel, f"{n_bad} epoch(s) contain NaN or Inf", "drop or repair those trials"))
    if unknown:
        out.append(Problem(rel, f"{len(unknown)} row(s) have an image_id not in images.parquet, e.g. {unknown[:3]}"))
    if wrong_split:
        out.append(Problem(rel, f"{len(wrong_split)} row(s) are {split} epochs of images the catalog puts in "
                           f"another split, e.g. {wrong_split[:3]}", "train/test images must not overlap"))
    if wrong_concept:
        out.append(Problem(rel, f"{len(wrong_concept)} row(s) name a concept other than the catalog's for their "
                           f"image, e.g. {wrong_concept[:3]}", "write each epoch with its image's catalog concept"))
    return out


def _check_tables(ds: BrainDataset, used: dict[str, set[str]]) -> list[Problem]:
    out: list[Problem] = []
    tables = list_tables(ds.embeddings_dir)
    if not tables:
        out.append(Problem("embeddings/", "no embedding tables", "compute them with `brainalign embed`"))
    needed = used["train"] | used["test"]
    for table_id, path in tables.items():
        rel = path.relative_to(ds.root).as_posix()
        try:
            meta = read_table_meta(path)
        except (BrainalignError, json.JSONDecodeError) as e:
            out.append(Problem(rel, str(e)))
            continue
        try:
            tbl = pq.read_table(path)
        except READ_ERRORS as e:
            out.append(_unreadable_problem(rel, e))
            continue
        if "embedding" not in tbl.column_names or "image_id" not in tbl.column_names:
            out.append(Problem(rel, f"expected columns 'image_id' and 'embedding', got {tbl.column_names}"))
            continue
        col = tbl.column("embedding").combine_chunks()
        if not isinstance(col.type, pa.FixedShapeTensorType) or len(col.type.shape) != 1:
            out.append(Problem(rel, f"column 'embedding' is {col.type}, expected a fixed-shape float32 vector"))
            continue
        vec = col.to_numpy_ndarray()
        if vec.shape[1] != meta.get("dim"):
            out.append(Problem(rel, f"vectors have dim {vec.shape[1]} but metadata says {meta.get('dim')}"))
        if not np.isfinite(vec).all():
            out.append(Problem(rel, "embedding vectors contain NaN or Inf"))
        ids = tbl.column("image_id").to_pylist()
        dups = [k for k, c in Counter(ids).items() if c > 1]
        if dups:
            out.append(Problem(rel, f"duplicate image ids, e.g. {dups[:3]}"))
        missing = sorted(needed - set(ids))
        if missing:
            out.append(Problem(rel, f"{len(missing)} image(s) with epochs have no embedding in {table_id}, "
                               f"e.g. {missing[:3]}", "recompute the table over the whole catalog"))
    return out
