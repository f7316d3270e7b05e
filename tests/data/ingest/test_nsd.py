"""NSD nsdgeneral: HDF5 betas + nsd_expdesign.mat -> repetition-averaged vectors per image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from brainalign._checks import BrainalignError
from brainalign.data.contract import AVERAGED, open_dataset
from brainalign.data.ingest import ingest_nsd, ingest_nsd_per_subject
from brainalign.data.ingest.nsd import image_id
from brainalign.data.validate import validate_dataset

from .conftest import NSD_VOXELS, NSDRelease, nsd_design, write_stimuli


def _expected(rel: NSDRelease, subject: int) -> dict[str, tuple[str, np.ndarray]]:
    """image_id -> (split, mean of its trials), by the masterordering/subjectim rule."""
    n = len(rel.data[subject])
    mo = rel.masterordering[:n].astype(int)
    nsd = rel.subjectim[subject - 1, mo - 1].astype(int) - 1
    out = {}
    for img in np.unique(nsd):
        rows = np.flatnonzero(nsd == img)
        split = "test" if mo[rows[0]] <= 1000 else "train"
        out[image_id(img)] = (split, rel.data[subject][rows].astype(np.float64).mean(axis=0))
    return out


@pytest.mark.integration
def test_nsd_round_trip_through_ray_data(
    make_nsd: Callable[..., NSDRelease], tmp_path: Path, ray_session: Any
) -> None:
    rel = make_nsd((1,))
    out = tmp_path / "nsd-sub01"
    res = ingest_nsd({1: rel.betas[1]}, rel.expdesign, out, show_progress=False)
    assert res.rows == {("01", "train"): 5, ("01", "test"): 3}
    ds = open_dataset(out)
    assert (ds.meta.modality, ds.meta.n_chans, ds.meta.n_times) == ("fmri", NSD_VOXELS[1], 1)
    assert ds.meta.ch_names[:2] == ("v00000", "v00001")
    assert [p for p in validate_dataset(out) if not p.where.startswith("embeddings")] == []
    shared = {image_id(i - 1) for i in rel.subjectim[0, :1000].astype(int)}
    assert set(ds.image_ids("test")) <= shared and not set(ds.image_ids("train")) & shared

    batch = ray_session.data.read_parquet(str(out / "epochs")).take_batch(batch_size=100)
    assert batch["epoch"].shape == (8, NSD_VOXELS[1], 1) and batch["epoch"].dtype == np.float32
    assert set(batch["repetition"].tolist()) == {AVERAGED}
    want = _expected(rel, 1)
    for img, split, x in zip(batch["image_id"], batch["split"], batch["epoch"], strict=True):
        assert str(split) == want[img][0]
        np.testing.assert_allclose(x[:, 0], want[img][1], rtol=1e-6)


def test_nsd_keep_trials_and_voxels_key(make_nsd: Callable[..., NSDRelease], tmp_path: Path) -> None:
    rel = make_nsd((1,), key="voxels")
    out = tmp_path / "nsd"
    res = ingest_nsd({"subj01": rel.betas[1]}, rel.expdesign, out, repetitions="keep", show_progress=False)
    assert res.rows == {("01", "train"): 15, ("01", "test"): 9}
    ids, reps, x = open_dataset(out).load_epochs("01", "test")
    assert sorted(set(reps.tolist())) == [0, 1, 2] and x.shape == (9, NSD_VOXELS[1], 1)


def test_nsd_n_trials_limits_the_trials(make_nsd: Callable[..., NSDRelease], tmp_path: Path) -> None:
    rel = make_nsd((1,))
    res = ingest_nsd(
        {1: rel.betas[1]}, rel.expdesign, tmp_path / "n", n_trials=12, repetitions="keep", show_progress=False
    )
    assert sum(res.rows.values()) == 12


def test_nsd_subjects_with_different_voxel_counts(
    make_nsd: Callable[..., NSDRelease], tmp_path: Path
) -> None:
    rel = make_nsd((1, 2))
    with pytest.raises(
        BrainalignError, match=r"different voxel counts \{'01': 15724, '02': 14278\}.*own root"
    ):
        ingest_nsd(rel.betas, rel.expdesign, tmp_path / "nsd", show_progress=False)
    results = ingest_nsd_per_subject(
        rel.betas, rel.expdesign, str(tmp_path / "nsd-sub{subject}"), show_progress=False
    )
    assert [r.root.name for r in results] == ["nsd-sub01", "nsd-sub02"]
    assert open_dataset(tmp_path / "nsd-sub02").meta.n_chans == 14278
    assert open_dataset(tmp_path / "nsd-sub02").meta.name == "nsd-sub02"


def _design_with(**change: Any) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    def make(rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = nsd_design(rng)
        for k, v in change.items():
            if v is None:
                d.pop(k)
            else:
                d[k] = v(d)
        return d

    return make


def _swap_shared(d: dict[str, np.ndarray]) -> np.ndarray:
    s = d["sharedix"].copy()
    s[0, 0] = d["subjectim"][0, 1001]  # a subject-specific image claimed as shared
    return s


BAD_DESIGNS: list[tuple[str, Callable[[np.random.Generator], dict[str, np.ndarray]], str]] = [
    (
        "missing masterordering",
        _design_with(masterordering=None),
        r"nsd_expdesign.mat: missing key 'masterordering'",
    ),
    (
        "index out of range",
        _design_with(masterordering=lambda d: d["masterordering"] * 0 + 5000),
        r"field 'masterordering': expected 1-based indices into subjectim's 1008 columns, got values 5000..5000",
    ),
    (
        "sharedix disagrees",
        _design_with(sharedix=_swap_shared),
        r"field 'sharedix': expected the shared images to be exactly those with masterordering <= 1000",
    ),
]


@pytest.mark.parametrize(
    "design,match", [(d, m) for _, d, m in BAD_DESIGNS], ids=[n for n, _, _ in BAD_DESIGNS]
)
def test_bad_expdesign_is_rejected(
    make_nsd: Callable[..., NSDRelease],
    tmp_path: Path,
    design: Callable[[np.random.Generator], dict[str, np.ndarray]],
    match: str,
) -> None:
    rel = make_nsd((1,), design=design(np.random.default_rng(3)))
    with pytest.raises(BrainalignError, match=match):
        ingest_nsd(rel.betas, rel.expdesign, tmp_path / "x", show_progress=False)
    assert not (tmp_path / "x").exists()


def test_bad_betas_are_rejected(make_nsd: Callable[..., NSDRelease], tmp_path: Path) -> None:
    rel = make_nsd((1,))
    with h5py.File(rel.betas[1], "r+") as f:
        f["betas"][4, 123] = np.nan
    with pytest.raises(
        BrainalignError, match=r"subj01_nsdgeneral.hdf5: field 'betas': expected finite values.*voxel 123"
    ):
        ingest_nsd(rel.betas, rel.expdesign, tmp_path / "x", show_progress=False)

    with h5py.File(rel.betas[1], "r+") as f:
        f["other"] = f["betas"][()]
        del f["betas"]
    with pytest.raises(BrainalignError, match=r"missing dataset 'betas or voxels'; found \['other'\]"):
        ingest_nsd(rel.betas, rel.expdesign, tmp_path / "x", show_progress=False)

    with pytest.raises(BrainalignError, match=r"field 'other': expected at least n_trials=99 rows, got 24"):
        ingest_nsd(rel.betas, rel.expdesign, tmp_path / "x", key="other", n_trials=99, show_progress=False)
    assert not (tmp_path / "x").exists()


def test_nsd_stimuli_are_exported_for_embedding(make_nsd: Callable[..., NSDRelease], tmp_path: Path) -> None:
    from PIL import Image

    rel = make_nsd((1,), design=nsd_design(np.random.default_rng(4), n_nsd=2000))
    used = rel.subjectim[0, rel.masterordering[:24].astype(int) - 1].astype(int) - 1
    pixels = write_stimuli(tmp_path / "nsd_stimuli.hdf5", used, n_nsd=2000)
    out = tmp_path / "nsd"
    ingest_nsd(rel.betas, rel.expdesign, out, stimuli=tmp_path / "nsd_stimuli.hdf5", show_progress=False)
    cat = open_dataset(out).catalog.to_pydict()
    assert len(cat["path"]) == 8
    for img, path in zip(cat["image_id"], cat["path"], strict=True):
        assert path == f"nsd_images/{img}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(out / path)), pixels[int(img[4:])])

    with pytest.raises(
        BrainalignError, match=r"field 'imgBrick': expected \(n_images > \d+, height, width, 3\) uint8"
    ):
        write_stimuli(tmp_path / "small.hdf5", [0], n_nsd=10)
        ingest_nsd(
            rel.betas, rel.expdesign, tmp_path / "y", stimuli=tmp_path / "small.hdf5", show_progress=False
        )
