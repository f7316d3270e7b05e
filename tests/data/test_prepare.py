from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from brainalign import BrainalignError, TrainConfig
from brainalign.config import DataConfig
from brainalign.data.contract import open_dataset
from brainalign.data.prepare import load_test, normalize_epochs, prepare, split_concepts, split_images
from brainalign.testing import write_toy_dataset


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return write_toy_dataset(tmp_path / "toy", n_train_concepts=10, images_per_concept=4, n_test=6,
                             train_reps=3, test_reps=5)


def _cfg(root: Path, **data: object) -> TrainConfig:
    return TrainConfig(data=DataConfig(path=str(root), image_table="toy:simulated", **data))  # type: ignore[arg-type]


def _rows(d: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = pq.read_table(d)
    return (t.column("image_index").to_numpy(), t.column("subject_index").to_numpy(),
            t.column("epoch").combine_chunks().to_numpy_ndarray())


def test_split_is_by_image_seeded_and_disjoint() -> None:
    ids = [f"i{k}" for k in range(100)] * 4  # repetitions must not matter
    tr, va = split_images(ids, 0.1, seed=1)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    assert split_images(ids, 0.1, seed=1) == (tr, va)
    assert split_images(ids, 0.1, seed=2)[1] != va


def test_average_mode_cross_subject_split(toy: Path) -> None:
    p = prepare(_cfg(toy, subjects=("01", "02"), normalize="none"))
    ds = open_dataset(toy)
    cat = ds.image_ids()
    ti, ts, tx = _rows(p.train_dir)
    vi, vs, vx = _rows(p.val_dir)
    val_ids = {cat[i] for i in vi}
    assert val_ids == set(p.val_images) and not val_ids & {cat[i] for i in ti}
    # the same validation images for both subjects; one averaged row per (subject, image)
    assert sorted(vs.tolist()) == [0] * 4 + [1] * 4 and len(ti) == 2 * 36
    assert tx.shape[1:] == (17, 100) and tx.dtype == np.float32
    # an averaged row equals the mean of that image's stored repetitions
    ids, _r, x = ds.load_epochs("01", "train")
    k = int(np.where(ts == 0)[0][0])
    image = cat[ti[k]]
    np.testing.assert_allclose(tx[k], x[[i for i, j in enumerate(ids) if j == image]].mean(0), atol=1e-5)
    # rows are shuffled, not in catalog order
    assert list(ti[ts == 0]) != sorted(ti[ts == 0])
    # cached: a second call reuses the directory
    assert prepare(_cfg(toy, subjects=("01", "02"), normalize="none")).root == p.root


def test_single_trial_mode_and_normalization(toy: Path) -> None:
    p = prepare(_cfg(toy, train_trials="single", normalize="center_l2"))
    ti, _s, tx = _rows(p.train_dir)
    assert len(ti) == 36 * 3
    np.testing.assert_allclose(tx.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(tx, axis=-1), 1, atol=1e-4)
    x = np.random.default_rng(0).normal(loc=2.0, size=(2, 3, 50))
    assert normalize_epochs(x, "none") is x
    # the reference's formula, written out: centre, then divide by the uncentred norm
    ref = np.stack([[(c - c.mean()) / (np.sqrt((c**2).sum()) + 1e-8) for c in rep] for rep in x])
    np.testing.assert_allclose(normalize_epochs(x, "alignvis"), ref, rtol=1e-10)
    assert np.linalg.norm(normalize_epochs(x, "alignvis"), axis=-1).max() < 0.9  # offset 2 shrinks it


def test_test_split_is_averaged_in_catalog_order(toy: Path) -> None:
    ids, x = load_test(_cfg(toy, normalize="none"), "02")
    ds = open_dataset(toy)
    assert ids == ds.image_ids("test") and x.shape == (6, 17, 100)
    raw_ids, _r, raw = ds.load_epochs("02", "test")
    np.testing.assert_allclose(x[0], raw[[i for i, j in enumerate(raw_ids) if j == ids[0]]].mean(0), atol=1e-5)
    with pytest.raises(BrainalignError, match=r"test subject \['07'\] not in dataset"):
        load_test(_cfg(toy), "07")


def test_concept_split_holds_out_whole_concepts(toy: Path) -> None:
    """val_split='concept': every image of a validation concept is in validation (for every
    subject), no validation concept keeps an image in training; the cache key includes the
    mode; the default stays the image split."""
    ds = open_dataset(toy)
    cat = ds.catalog
    concept_of = dict(zip(cat.column("image_id").to_pylist(), cat.column("concept").to_pylist(), strict=True))
    p = prepare(_cfg(toy, subjects=("01", "02"), val_split="concept", val_fraction=0.2))
    assert p.val_split == "concept"
    val_concepts = {concept_of[i] for i in p.val_images}
    assert len(val_concepts) == 2  # round(0.2 x 10 concepts)
    assert set(p.val_images) == {i for i, c in concept_of.items() if c in val_concepts}
    assert len(p.val_images) == 8  # 2 concepts x 4 images
    names = ds.image_ids()
    ti, _ts, _tx = _rows(p.train_dir)
    vi, vs, _vx = _rows(p.val_dir)
    assert not val_concepts & {concept_of[names[i]] for i in ti}
    assert {names[i] for i in vi[vs == 0]} == {names[i] for i in vi[vs == 1]} == set(p.val_images)
    # seeded, and a different cache entry than the image split of the same config
    again = prepare(_cfg(toy, subjects=("01", "02"), val_split="concept", val_fraction=0.2))
    assert again.root == p.root and again.val_images == p.val_images
    img = prepare(_cfg(toy, subjects=("01", "02"), val_fraction=0.2))
    assert img.root != p.root and img.val_split == "image"
    assert list(img.val_images) == split_images(ds.image_ids("train"), 0.2, 42)[1]  # today's split, unchanged
    # an image split leaves most validation concepts with images in training
    assert {concept_of[i] for i in img.val_images} & {concept_of[names[i]] for i in _rows(img.train_dir)[0]}


def test_concept_split_refuses_a_dataset_without_concepts(tmp_path: Path) -> None:
    # one image per concept (as NSD, whose concept is the image id): no concept information
    root = write_toy_dataset(tmp_path / "flat", n_train_concepts=12, images_per_concept=1, n_test=3)
    with pytest.raises(BrainalignError, match="no concept information.*data.val_split='image'"):
        prepare(_cfg(root, val_split="concept"))
    assert prepare(_cfg(root)).n_val_rows > 0  # the image split still works
    with pytest.raises(BrainalignError, match="at least 2 training concepts"):
        split_concepts(["a", "b"], ["c", "c"], 0.5, 0)
    with pytest.raises(BrainalignError, match=r"Invalid data.val_split 'concepts'.*Did you mean 'concept'"):
        DataConfig(val_split="concepts")


def test_split_concepts_is_seeded_and_disjoint() -> None:
    ids = [f"i{k}" for k in range(60)]
    concepts = [f"c{k // 3}" for k in range(60)]  # 20 concepts x 3 images
    tr, va = split_concepts(ids, concepts, 0.1, seed=1)
    assert len(va) == 6 and len(tr) == 54 and not set(tr) & set(va)
    assert len({concepts[int(i[1:])] for i in va}) == 2
    assert split_concepts(ids, concepts, 0.1, seed=1) == (tr, va)
    assert split_concepts(ids, concepts, 0.1, seed=2)[1] != va
