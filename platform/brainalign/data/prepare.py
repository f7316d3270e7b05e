"""Turn a contract dataset into training-ready Parquet (cached) and in-memory test arrays.

The stored data keep every repetition. A run needs, per its config: the training subjects'
train epochs (repetition-averaged or single trials, optionally normalized per repetition),
split into train and validation, and the evaluation subjects' test epochs averaged over
repetitions. The validation split (``data.val_split``) is a seeded fraction of the training
IMAGES (``"image"``, the default) or of the training CONCEPTS with all their images
(``"concept"``: validation concepts are novel, as test concepts are); either way it is the
same for every subject, so no validation image is ever seen in training through another
subject.

Prepared train/val data are written once per (dataset fingerprint, subjects, trial mode,
normalization, split fraction, split mode, split seed) under ``$BRAINALIGN_CACHE/prepared/<key>/`` as Parquet with
columns ``image_index`` (row in the image catalog), ``subject_index`` (position in the
training subjects) and ``epoch`` (fixed-shape tensor), which Ray Data reads directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .._checks import BrainalignError
from .._io import atomic_dir
from ..config import TrainConfig
from ..paths import cache_dir
from .contract import BrainDataset, EmbeddingTable, open_dataset, read_embedding_table

__all__ = [
    "MIN_VAL_IMAGES",
    "PreparedData",
    "check_sizes",
    "load_test",
    "normalize_epochs",
    "planned_sizes",
    "prepare",
    "split_concepts",
    "split_images",
]

log = logging.getLogger(__name__)
PREPARE_VERSION = 1
#: The largest top-k that evaluation reports (top-1 and top-5): a validation set needs at
#: least this many images, or its top-5 is 1.0 whatever the model (and top-1 of 1 image too).
MIN_VAL_IMAGES = 5


def check_normalization(mode: str, n_times: int) -> None:
    """Refuse a per-series normalization of one-sample epochs (fMRI: voxels x 1).

    Centring a series of one sample leaves zeros: every epoch would become 0 and a model
    would train on nothing. fMRI data take ``data.normalize = "none"``.

    Raises
    ------
    BrainalignError
        ``mode`` is not ``"none"`` and ``n_times == 1``.
    """
    if mode != "none" and n_times == 1:
        raise BrainalignError(
            f"data.normalize = {mode!r} centres each channel over time, but these epochs have one "
            "sample per channel (fMRI: voxels x 1): every value would become 0. Set "
            'data.normalize = "none" for fMRI.'
        )


def normalize_epochs(x: np.ndarray, mode: str) -> np.ndarray:
    """Per-repetition, per-channel normalization over time, applied before averaging.

    * ``center_l2`` (default): ``(x - mean_t x) / ||x - mean_t x||_2``: every series ends
      zero-mean with unit norm.
    * ``alignvis``: ``(x - mean_t x) / ||x||_2``, AlignVis's (and NICE's) exact formula. It
      divides by the norm of the uncentred series, so a channel with a large DC offset is
      shrunk towards zero; on baseline-corrected epochs (mean over time ~ 0) both agree.
    * ``none``: unchanged.
    """
    if mode == "none":
        return x
    check_normalization(mode, x.shape[-1])
    centred = x - x.mean(axis=-1, keepdims=True)
    scale = np.linalg.norm(centred if mode == "center_l2" else x, axis=-1, keepdims=True)
    return centred / (scale + 1e-8)


def split_images(image_ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of unique image ids into (train, val); val has ``round(fraction * n)``."""
    ids = sorted(set(image_ids))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A11]))
    perm = rng.permutation(len(ids))
    n_val = max(1, int(round(fraction * len(ids))))
    val = sorted(ids[i] for i in perm[:n_val])
    val_set = set(val)
    return [i for i in ids if i not in val_set], val


def split_concepts(
    image_ids: list[str], concepts: list[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded split by CONCEPT: ``round(fraction * n_concepts)`` concepts (at least one, at
    most all but one) go to validation with every one of their images.

    Parameters
    ----------
    image_ids, concepts : list of str
        Training images and the concept of each (same length; repetitions may repeat ids).
    fraction : float
        Share of the concepts held out.
    seed : int
        Split seed.

    Returns
    -------
    train, val : list of str
        Sorted unique image ids.
    """
    if len(image_ids) != len(concepts):
        raise BrainalignError(f"split_concepts got {len(image_ids)} image ids but {len(concepts)} concepts.")
    concept_of = dict(zip(image_ids, concepts, strict=True))
    names = sorted(set(concept_of.values()))
    if len(names) < 2:
        raise BrainalignError(
            f"data.val_split='concept' needs at least 2 training concepts, found {len(names)}; "
            "use data.val_split='image'."
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0C0]))
    perm = rng.permutation(len(names))
    n_val = min(len(names) - 1, max(1, int(round(fraction * len(names)))))
    val_concepts = {names[i] for i in perm[:n_val]}
    ids = sorted(concept_of)
    return [i for i in ids if concept_of[i] not in val_concepts], [i for i in ids if concept_of[i] in val_concepts]


def _train_concepts(ds: BrainDataset) -> list[str]:
    """Concept of every training image (catalog order); refuse if the dataset has none."""
    cat = ds.catalog
    splits = cat.column("split").to_pylist()
    ids = [i for i, s in zip(cat.column("image_id").to_pylist(), splits, strict=True) if s == "train"]
    concepts = [c for c, s in zip(cat.column("concept").to_pylist(), splits, strict=True) if s == "train"]
    missing = [i for i, c in zip(ids, concepts, strict=True) if not c]
    if missing:
        raise BrainalignError(
            f"data.val_split='concept': dataset {ds.root} has no concept for {len(missing)} training image(s), "
            f"e.g. {missing[:3]}. Record each image's concept in images.parquet (docs/data-contract.md) or use "
            "data.val_split='image'."
        )
    if len(set(concepts)) == len(ids):
        raise BrainalignError(
            f"data.val_split='concept': dataset {ds.root} has no concept information (every training image is its "
            "own concept, as in NSD), so a concept split would only be an image split. Use data.val_split='image'."
        )
    return concepts


@dataclass(frozen=True)
class PreparedData:
    """Where a run's prepared train/val Parquet and image embeddings are."""

    root: Path
    n_chans: int
    n_times: int
    n_train_rows: int
    n_val_rows: int
    train_images: tuple[str, ...]
    val_images: tuple[str, ...]
    val_split: str = "image"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def val_dir(self) -> Path:
        return self.root / "val"


def _key(ds: BrainDataset, cfg: TrainConfig) -> str:
    d = cfg.data
    blob = json.dumps(
        [PREPARE_VERSION, ds.fingerprint, list(d.subjects), d.train_trials, d.normalize, d.val_fraction, cfg.seed,
         d.val_split]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _average_by_image(
    ds: BrainDataset, subject: str, split: str, normalize: str, keep: set[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Repetition-averaged epochs per image (streamed: memory ~ one average per image)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for ids, _reps, x in ds.iter_epochs(subject, split):
        x = normalize_epochs(x, normalize)
        for i, image_id in enumerate(ids):
            if keep is not None and image_id not in keep:
                continue
            if image_id in sums:
                sums[image_id] += x[i]
                counts[image_id] += 1
            else:
                sums[image_id] = x[i].astype(np.float64)
                counts[image_id] = 1
    order = sorted(sums)
    out = np.stack([sums[k] / counts[k] for k in order]).astype(np.float32) if order else np.zeros(
        (0, ds.meta.n_chans, ds.meta.n_times), np.float32
    )
    return order, out


def _write_rows(path: Path, image_index: np.ndarray, subject_index: np.ndarray, x: np.ndarray) -> None:
    tbl = pa.table(
        {
            "image_index": pa.array(image_index.astype(np.int32)),
            "subject_index": pa.array(subject_index.astype(np.int16)),
            "epoch": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(x, np.float32)),
        }
    )
    pq.write_table(tbl, path, row_group_size=1024)


def planned_sizes(ds: BrainDataset, subjects: tuple[str, ...], *, train_trials: str, val_fraction: float,
                  val_split: str = "image", seed: int = 0) -> tuple[int, int]:
    """``(training rows at most, validation images)`` of a run, from the catalog and manifest alone.

    The validation images are exactly those :func:`split_images` / :func:`split_concepts`
    will draw. The training rows are an upper bound (every training subject saw every
    training image, every trial file counted): a batch larger than it can never be filled,
    whatever the data hold.
    """
    train_ids = ds.image_ids("train")
    n_img = len(train_ids)
    if not n_img:
        n_val = 0
    elif val_split == "concept":
        n_val = len(split_concepts(train_ids, _train_concepts(ds), val_fraction, seed)[1])
    else:
        n_val = max(1, int(round(val_fraction * n_img)))
    if train_trials == "average":
        return max(0, n_img - n_val) * len(subjects), n_val
    rows = 0
    for rel, info in ds.manifest.get("files", {}).items():
        if "/split=train/" in rel and any(f"/subject={s}/" in rel for s in subjects):
            rows += int(info.get("rows", 0))
    return rows, n_val


def check_sizes(*, n_train_rows: int, n_val_images: int, batch_size: int, num_workers: int,
                val_fraction: float, where: str, planned: bool = False) -> None:
    """Refuse sizes that would train on nothing or score a trivially perfect validation.

    Parameters
    ----------
    n_train_rows : int
        Training rows (an upper bound when ``planned``).
    n_val_images : int
        Validation images (the retrieval gallery of validation).
    batch_size, num_workers : int
        ``batch_size`` is the global batch: every Train worker gets ``n_train_rows //
        num_workers`` rows, draws ``batch_size // num_workers`` of them per step and drops
        incomplete batches (their composition is the InfoNCE negatives).
    val_fraction : float
        For the message.
    where : str
        What is checked (``"data.subjects ('01',) of data/sim-mini"``), for the message.
    planned : bool
        The row count is an upper bound from the manifest (before preparation).

    Raises
    ------
    BrainalignError
        ``batch_size`` exceeds the rows a worker gets, or fewer than
        :data:`MIN_VAL_IMAGES` validation images.
    """
    workers = max(1, num_workers)
    per_worker = n_train_rows // workers
    if batch_size // workers > per_worker:  # each worker's share of the global batch
        at_most = "at most " if planned else ""
        raise BrainalignError(
            f"{where}: batch_size {batch_size} (the global batch: {batch_size // workers} rows per worker and "
            f"step) is larger than the training rows ({at_most}{n_train_rows}, {per_worker} per worker of "
            f"{workers}): every batch would be dropped and nothing trained. Use batch_size <= "
            f"{per_worker * workers}, or more training data."
        )
    if n_val_images < MIN_VAL_IMAGES:
        raise BrainalignError(
            f"{where}: the validation split has {n_val_images} image(s) (data.val_fraction {val_fraction:g}); "
            f"validation ranks top-1 and top-5 among its images, so it needs at least {MIN_VAL_IMAGES} "
            "(with fewer, top-5 is 1.0 and a 1-image set scores top-1 = 1.0 whatever the model). Raise "
            "data.val_fraction or use more training images."
        )


def check_subjects(ds: BrainDataset, subjects: tuple[str, ...], what: str) -> None:
    missing = [s for s in subjects if s not in ds.meta.subjects]
    if missing:
        raise BrainalignError(
            f"{what} {missing} not in dataset {ds.root} (subjects: {list(ds.meta.subjects)})."
        )


def prepare(cfg: TrainConfig, cache: Path | None = None) -> PreparedData:
    """Prepare (or reuse) the train/val Parquet of ``cfg`` under ``cache`` (default
    :func:`~brainalign.paths.cache_dir`); see the module docstring."""
    ds = open_dataset(cfg.data.path)
    check_subjects(ds, cfg.data.subjects, "data.subjects")
    root = Path(cache or cache_dir()) / "prepared" / _key(ds, cfg)
    done = root / "prepared.json"
    if done.is_file():
        info = json.loads(done.read_text())
        log.info("reusing prepared data %s", root)
        return PreparedData(root=root, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in info.items()})

    train_ids_all = ds.image_ids("train")
    if cfg.data.val_split == "concept":
        train_imgs, val_imgs = split_concepts(train_ids_all, _train_concepts(ds), cfg.data.val_fraction, cfg.seed)
    else:
        train_imgs, val_imgs = split_images(train_ids_all, cfg.data.val_fraction, cfg.seed)
    val_set = set(val_imgs)
    index = ds.image_index()
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5EED]))
    n_train = n_val = 0
    with atomic_dir(root, kind="prepared", replace=True) as tmp:
        (tmp / "train").mkdir()
        (tmp / "val").mkdir()
        for si, subject in enumerate(cfg.data.subjects):
            # validation: always repetition-averaged (retrieval of averaged trials)
            vids, vx = _average_by_image(ds, subject, "train", cfg.data.normalize, keep=val_set)
            _write_rows(tmp / "val" / f"part-{si:03d}.parquet", np.array([index[i] for i in vids]),
                        np.full(len(vids), si), vx)
            n_val += len(vids)
            if cfg.data.train_trials == "average":
                ids, x = _average_by_image(ds, subject, "train", cfg.data.normalize)
                keep = np.array([i not in val_set for i in ids], dtype=bool)
                ids = [i for i, k in zip(ids, keep, strict=True) if k]
                x = x[keep]
            else:
                ids, parts = [], []
                for chunk_ids, _r, cx in ds.iter_epochs(subject, "train"):
                    keep = np.array([i not in val_set for i in chunk_ids], dtype=bool)
                    ids += [i for i, k in zip(chunk_ids, keep, strict=True) if k]
                    parts.append(normalize_epochs(cx[keep], cfg.data.normalize).astype(np.float32))
                x = np.concatenate(parts)
            # shuffle rows once so that Ray Data's local shuffle mixes concepts well
            perm = rng.permutation(len(ids))
            img_index = np.array([index[i] for i in ids])[perm]
            _write_rows(tmp / "train" / f"part-{si:03d}.parquet", img_index, np.full(len(ids), si), x[perm])
            n_train += len(ids)
        info = {
            "n_chans": ds.meta.n_chans,
            "n_times": ds.meta.n_times,
            "n_train_rows": n_train,
            "n_val_rows": n_val,
            "train_images": train_imgs,
            "val_images": val_imgs,
            "val_split": cfg.data.val_split,
        }
        (tmp / "prepared.json").write_text(json.dumps(info))
    log.info("prepared %d train / %d val rows in %s", n_train, n_val, root)
    return PreparedData(root=root, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in info.items()})


def load_table_for(cfg: TrainConfig) -> tuple[EmbeddingTable, Path]:
    """The run's embedding table; an unknown table id names the tables that exist."""
    from .contract import list_tables

    tables = list_tables(cfg.embeddings_dir)
    if cfg.data.image_table not in tables:
        from .._checks import check_option

        if not tables:
            raise BrainalignError(
                f"No embedding tables in {cfg.embeddings_dir}. Compute them with `brainalign embed` "
                "or point data.embeddings_dir at the directory that holds them."
            )
        check_option("data.image_table", cfg.data.image_table, sorted(tables))
    path = tables[cfg.data.image_table]
    table = read_embedding_table(path)
    bad = ~np.isfinite(table.vectors).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise BrainalignError(
            f"embedding table {path} has {int(bad.sum())} vector(s) with NaN or Inf, e.g. for image(s) "
            f"{[str(table.image_ids[i]) for i in rows[:5]]}; a run against it would score nonsense. "
            "Recompute the table (`brainalign embed --force`) or fix its source."
        )
    return table, path


def catalog_embeddings(ds: BrainDataset, table: EmbeddingTable, needed: list[str]) -> np.ndarray:
    """``(n_catalog, dim)`` float32 matrix in catalog order; every ``needed`` id must be covered."""
    table.lookup(needed, where=f"used by dataset {ds.meta.name}")  # raises naming missing ids
    out = np.zeros((ds.catalog.num_rows, table.dim), np.float32)
    have = {k: i for i, k in enumerate(table.image_ids.tolist())}
    for j, image_id in enumerate(ds.image_ids()):
        if image_id in have:
            out[j] = table.vectors[have[image_id]]
    return out


def load_test(cfg: TrainConfig, subject: str) -> tuple[list[str], np.ndarray]:
    """Repetition-averaged test epochs of ``subject`` (normalized as in training), in
    catalog order of the test images that subject saw."""
    ds = open_dataset(cfg.data.path)
    check_subjects(ds, (subject,), "test subject")
    ids, x = _average_by_image(ds, subject, "test", cfg.data.normalize)
    pos = ds.image_index()
    order = np.argsort([pos[i] for i in ids], kind="stable")
    return [ids[i] for i in order], x[order]
