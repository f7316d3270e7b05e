"""The simulated Things-EEG2 (brainalign.data.simulate): contract, determinism, ground truth."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from brainalign._checks import BrainalignError
from brainalign.data.contract import open_dataset, read_embedding_table
from brainalign.data.simulate import (
    DATASET_NAME,
    GIFFORD_17,
    LATENT_COLUMNS,
    PRESETS,
    SIMULATOR,
    THINGS_EEG2_63,
    THINGS_MEG_271,
    SimulatorParams,
    build_world,
    channel_layout,
    ctf_layout,
    make_params,
    read_latents,
    simulate_dataset,
    things_meg_channels,
    voxel_sheet,
    world_from_dataset,
)

TINY = PRESETS["tiny"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _r2(y: np.ndarray, x: np.ndarray) -> float:
    """Mean over embedding dimensions of the variance explained by a linear fit on ``x``."""
    x1 = np.column_stack([x, np.ones(len(x))])
    coef, *_ = np.linalg.lstsq(x1, y, rcond=None)
    resid = y - x1 @ coef
    return float(1 - resid.var(0).sum() / y.var(0).sum())


# --------------------------------------------------------------------------- presets and params
def test_presets_have_the_documented_sizes() -> None:
    assert set(PRESETS) == {"tiny", "mini", "full", "meg", "meg-mini", "fmri", "fmri-mini"}
    full, mini = PRESETS["full"], PRESETS["mini"]
    assert (full.n_subjects, full.n_train_images_total, full.n_train_reps) == (10, 16540, 4)
    assert (full.n_test_concepts, full.n_test_reps, full.ch_names, full.n_times, full.sfreq) == (
        200,
        80,
        tuple(THINGS_EEG2_63),
        250,
        250.0,
    )
    assert len(THINGS_EEG2_63) == 63
    assert (mini.n_subjects, mini.n_train_concepts, mini.n_train_images, mini.n_train_reps) == (4, 200, 10, 4)
    assert (mini.n_test_concepts, mini.n_test_reps, mini.ch_names, mini.n_times, mini.sfreq) == (
        200,
        20,
        GIFFORD_17,
        100,
        100.0,
    )
    assert (TINY.n_subjects, TINY.n_train_concepts, TINY.n_train_images, TINY.n_train_reps) == (2, 30, 4, 2)
    assert (TINY.n_test_concepts, TINY.n_test_reps, len(TINY.ch_names), TINY.n_times) == (20, 4, 17, 100)


def test_params_json_round_trip() -> None:
    for params in PRESETS.values():
        d = params.to_json()
        assert json.loads(json.dumps(d)) == d
        assert SimulatorParams.from_json(d) == params


def test_overrides_are_checked() -> None:
    assert make_params("tiny", {"noise_pink": 1, "latency_late": [0.3, 0.4]}).noise_pink == 1.0
    with pytest.raises(BrainalignError, match="Did you mean 'noise_pink'"):
        make_params("tiny", {"noise_pnk": 1.0})
    with pytest.raises(BrainalignError, match="n_subjects must be in"):
        make_params("tiny", {"n_subjects": 0})
    with pytest.raises(BrainalignError, match="Did you mean 'mini'"):
        make_params("minii")
    with pytest.raises(BrainalignError, match="not a 10-10 name"):
        make_params("tiny", {"ch_names": ["O1", "EXG1"]})


def test_channel_layout_is_mirror_symmetric() -> None:
    pos = dict(zip(THINGS_EEG2_63, channel_layout(THINGS_EEG2_63), strict=True))
    for left, right in (("O1", "O2"), ("PO7", "PO8"), ("P3", "P4"), ("FT9", "FT10"), ("T7", "T8")):
        np.testing.assert_allclose(pos[left] * [-1, 1], pos[right])
    np.testing.assert_allclose(pos["Cz"], [0, 0])
    assert pos["Oz"][1] < pos["POz"][1] < pos["Pz"][1] < 0 < pos["FCz"][1] < pos["AFz"][1]


# --------------------------------------------------------------------------- files
def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a = simulate_dataset(tmp_path / "a", "tiny", seed=3, progress=False)
    b = simulate_dataset(tmp_path / "b", "tiny", seed=3, progress=False)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys() and len(fa) >= 10
    assert [k for k in fa if fa[k] != fb[k]] == []
    c = simulate_dataset(tmp_path / "c", "tiny", seed=4, progress=False)
    assert _files(c)["images.parquet"] == fa["images.parquet"]  # ids do not depend on the seed
    assert open_dataset(c).fingerprint != open_dataset(a).fingerprint


def test_rerun_is_a_no_op(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = simulate_dataset(tmp_path / "d", "tiny", seed=1, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with caplog.at_level(logging.INFO, logger="brainalign.data.simulate"):
        assert simulate_dataset(out, "tiny", seed=1, progress=False) == out
    assert "up to date" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_other_settings_raise_unless_replace(tmp_path: Path) -> None:
    out = simulate_dataset(tmp_path / "d", "tiny", seed=1, progress=False)
    with pytest.raises(BrainalignError, match=re.escape(f"params.noise_pink: {TINY.noise_pink!r} -> 0.5")):
        simulate_dataset(out, "tiny", seed=1, overrides={"noise_pink": 0.5}, progress=False)
    with pytest.raises(BrainalignError, match=r"seed: 1 -> 2"):
        simulate_dataset(out, "tiny", seed=2, progress=False)
    with pytest.raises(BrainalignError, match=r"null: False -> True"):
        simulate_dataset(out, "tiny", seed=1, null=True, progress=False)
    simulate_dataset(out, "tiny", seed=2, replace=True, progress=False)
    assert open_dataset(out).meta.source["seed"] == 2


def test_refuses_to_overwrite_a_non_dataset(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(BrainalignError, match="not a brainalign dataset"):
        simulate_dataset(tmp_path / "x", "tiny", progress=False, replace=True)
    (tmp_path / "empty").mkdir()
    simulate_dataset(tmp_path / "empty", "tiny", progress=False)  # an empty directory is fine
    assert (tmp_path / "empty" / "dataset.json").is_file()


# --------------------------------------------------------------------------- contents
def test_metadata(tiny_dataset: Path) -> None:
    ds = open_dataset(tiny_dataset)
    m = ds.meta
    assert (m.name, m.modality, m.ch_names, m.sfreq, m.tmin, m.n_times) == (
        DATASET_NAME,
        "eeg",
        GIFFORD_17,
        100.0,
        0.0,
        100,
    )
    assert m.subjects == ("01", "02")
    assert m.simulated
    assert {k: m.source[k] for k in ("kind", "simulator", "preset", "seed", "null")} == {
        "kind": "simulated",
        "simulator": SIMULATOR,
        "preset": "tiny",
        "seed": 0,
        "null": False,
    }
    assert SimulatorParams.from_json(m.source["params"]) == TINY
    assert "simulator/latents.parquet" in ds.manifest["files"]  # fingerprinted


def test_catalog_ids_and_disjoint_concepts(tiny_dataset: Path) -> None:
    cat = open_dataset(tiny_dataset).catalog.to_pydict()
    n_train = TINY.n_train_images_total
    assert cat["split"] == ["train"] * n_train + ["test"] * TINY.n_test_concepts
    assert cat["image_id"][:5] == ["tr00001_01", "tr00001_02", "tr00001_03", "tr00001_04", "tr00002_01"]
    assert cat["image_id"][n_train:][:2] == ["te00001", "te00002"]
    train_c = set(cat["concept"][:n_train])
    test_c = cat["concept"][n_train:]
    assert len(train_c) == TINY.n_train_concepts and len(set(test_c)) == TINY.n_test_concepts
    assert train_c.isdisjoint(test_c)
    assert test_c[0] == f"c{TINY.n_train_concepts + 1:05d}"


@pytest.mark.parametrize("split", ["train", "test"])
def test_epochs_shapes_and_order(tiny_dataset: Path, split: str) -> None:
    ds = open_dataset(tiny_dataset)
    reps = TINY.n_train_reps if split == "train" else TINY.n_test_reps
    images = ds.image_ids(split)
    for sid in ds.meta.subjects:
        ids, r, x = ds.load_epochs(sid, split)
        assert x.shape == (len(images) * reps, 17, 100) and x.dtype == np.float32
        assert ids == [i for i in images for _ in range(reps)]
        assert r.tolist() == list(range(reps)) * len(images)
        assert np.isfinite(x).all() and 0.5 < x.std() < 20


def test_embedding_tables(tiny_dataset: Path) -> None:
    ds = open_dataset(tiny_dataset)
    tables = ds.tables()
    assert set(tables) == {"sim-clip:simulated", "sim-clip:none", "sim-dino:simulated", "sim-dino:none"}
    ids = ds.image_ids()
    for key, dim in (("sim-clip", 512), ("sim-dino", 768)):
        aligned = read_embedding_table(tables[f"{key}:simulated"])
        base = read_embedding_table(tables[f"{key}:none"])
        for t in (aligned, base):
            assert t.vectors.shape == (len(ids), dim) and t.vectors.dtype == np.float32
            assert t.image_ids.tolist() == ids
            assert t.provenance["simulated"] is True and "not a real model" in t.provenance["note"]
            assert t.provenance["seed"] == 0
        assert not np.allclose(aligned.vectors, base.vectors)
        assert aligned.provenance["weights"]["perceptual"] > base.provenance["weights"]["perceptual"]


def test_latents_file(tiny_dataset: Path) -> None:
    lat = read_latents(tiny_dataset)
    assert tuple(lat.column_names) == LATENT_COLUMNS
    assert lat.column("image_id").to_pylist() == open_dataset(tiny_dataset).image_ids()
    d = lat.to_pydict()
    assert all(0 <= h < 1 for h in d["hue"]) and set(d["shape"]) <= set(range(8))
    assert all(0 <= o < np.pi for o in d["orientation"]) and all(2 <= f <= 16 for f in d["spatial_freq"])
    assert pq.read_schema(tiny_dataset / "simulator" / "latents.parquet").field("shape").type == "int16"


# --------------------------------------------------------------------------- ground truth
def test_files_match_the_ground_truth_and_averaging_raises_snr(tiny_dataset: Path) -> None:
    world = world_from_dataset(tiny_dataset)
    ds = open_dataset(tiny_dataset)
    ids, _, x = ds.load_epochs("01", "test")
    rows = world.rows("test")
    reps = TINY.n_test_reps
    np.testing.assert_array_equal(x, world.trials(0, rows, reps))
    # chunking does not change the trials
    np.testing.assert_array_equal(world.trials(0, rows[3:5], reps), x[3 * reps : 5 * reps])
    truth = world.evoked(0, rows)
    trials = x.reshape(len(rows), reps, *x.shape[1:])

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    single = np.mean([corr(trials[i, 0], truth[i]) for i in range(len(rows))])
    two = np.mean([corr(trials[i, :2].mean(0), truth[i]) for i in range(len(rows))])
    avg = np.mean([corr(trials[i].mean(0), truth[i]) for i in range(len(rows))])
    assert single < two < avg
    assert 0.05 < single < 0.8  # single trials are noisy, but not pure noise


def test_subjects_differ_but_share_structure() -> None:
    world = build_world(TINY, seed=0)
    rows = world.rows("test")
    a, b = world.evoked(0, rows), world.evoked(1, rows)
    assert not np.allclose(a, b)
    # image-dependent parts of the two subjects' responses are related, but not identical
    da, db = a - a.mean(0), b - b.mean(0)
    r = np.corrcoef(da.ravel(), db.ravel())[0, 1]
    assert 0.1 < r < 0.99


def test_null_mode_makes_aligned_and_base_alike() -> None:
    params = make_params("tiny", {"n_train_concepts": 300})  # more images: stable statistics
    gaps = {}
    for null in (False, True):
        world = build_world(params, seed=0, null=null)
        for backbone in params.encoder_names:
            aligned, wa = world.embeddings(backbone, "simulated")
            base, wb = world.embeddings(backbone, "none")
            assert not np.allclose(aligned, base)
            assert (wa == wb) is null
            gaps[null, backbone] = _r2(aligned, world.perceptual) - _r2(base, world.perceptual)
    for backbone in params.encoder_names:
        assert gaps[False, backbone] > 0.1, gaps
        assert abs(gaps[True, backbone]) < 0.03, gaps


def test_null_dataset_flags_tables(tmp_path: Path) -> None:
    out = simulate_dataset(tmp_path / "n", "tiny", null=True, progress=False)
    tables = open_dataset(out).tables()
    a = read_embedding_table(tables["sim-clip:simulated"])
    b = read_embedding_table(tables["sim-clip:none"])
    assert a.provenance["null"] is True and a.provenance["weights"] == b.provenance["weights"]
    assert not np.allclose(a.vectors, b.vectors)


def test_full_geometry_on_a_few_images(tmp_path: Path) -> None:
    small = {"n_subjects": 1, "n_train_concepts": 3, "n_test_concepts": 2, "n_test_reps": 2}
    out = simulate_dataset(tmp_path / "f", "full", overrides=small, progress=False)
    ds = open_dataset(out)
    assert ds.meta.ch_names == tuple(THINGS_EEG2_63) and ds.meta.sfreq == 250.0
    ids, reps, x = ds.load_epochs("01", "train")
    assert x.shape == (3 * 10 * 4, 63, 250) and reps.max() == 3
    assert ds.meta.source["preset"] == "full" and ds.meta.source["params"]["n_train_concepts"] == 3


# --------------------------------------------------------------------------- MEG and fMRI
def test_meg_and_fmri_presets_have_the_real_designs() -> None:
    meg, fmri = PRESETS["meg"], PRESETS["fmri"]
    # THINGS-MEG: 4 participants, 271 CTF sensors at 200 Hz over 0..1 s, 1,654 training concepts
    # x 12 images shown once, 200 test images x 12 repetitions
    assert (meg.modality, meg.n_subjects, meg.n_chans, meg.sfreq, meg.tmin, meg.n_times) == (
        "meg", 4, 271, 200.0, 0.0, 201)
    assert (meg.n_train_concepts, meg.n_train_images, meg.n_train_reps) == (1654, 12, 1)
    assert (meg.n_test_concepts, meg.n_test_reps) == (200, 12)
    assert meg.ch_names == tuple(THINGS_MEG_271) == things_meg_channels()
    # NSD: one value per voxel of an nsdgeneral-sized ROI, 9,000 x 3 training trials, 1000-way test
    assert (fmri.modality, fmri.n_chans, fmri.n_times, fmri.ch_names) == ("fmri", 15724, 1, ())
    assert (fmri.n_train_images_total, fmri.n_train_reps, fmri.n_test_concepts, fmri.n_test_reps) == (
        9000, 3, 1000, 3)
    assert fmri.channel_names[:2] == ("v00000", "v00001")
    for mini, full in (("meg-mini", meg), ("fmri-mini", fmri)):
        p = PRESETS[mini]
        assert (p.modality, p.n_subjects, p.n_train_images, p.n_train_reps, p.n_test_reps) == (
            full.modality, full.n_subjects, full.n_train_images, full.n_train_reps, full.n_test_reps)
    assert PRESETS["meg-mini"].ch_names == meg.ch_names and PRESETS["fmri-mini"].n_test_concepts == 1000


def test_sampling_rules_are_per_modality() -> None:
    """Issue 11's time-series rules (n_times >= 8, sfreq > 0, the window holds the peaks) apply to
    EEG and MEG; an fMRI epoch has no time axis: n_times == 1 and sfreq 0 are its rule (issue 16)."""
    for name in ("fmri", "fmri-mini"):
        p = make_params(name)
        assert (p.n_times, p.sfreq) == (1, 0.0)
    assert make_params("fmri-mini", {"n_voxels": 300}).n_chans == 300
    with pytest.raises(BrainalignError, match="n_times == 1"):
        make_params("fmri-mini", {"n_times": 8})
    for name in ("mini", "meg-mini"):
        with pytest.raises(BrainalignError, match=r"n_times 1 is too short.*Only modality = 'fmri'"):
            make_params(name, {"n_times": 1})
        with pytest.raises(BrainalignError, match="sfreq"):
            make_params(name, {"sfreq": 0.0})


def test_eeg_manifests_do_not_change() -> None:
    # fields added for MEG/fMRI stay out of an EEG dataset's source, so re-simulating a dataset
    # written before they existed is still a no-op
    for name in ("tiny", "mini", "full"):
        assert not {"modality", "n_voxels"} & set(PRESETS[name].to_json())
    assert PRESETS["meg"].to_json()["modality"] == "meg" and PRESETS["fmri"].to_json()["n_voxels"] == 15724


def test_ctf_layout_is_the_meg_helmet() -> None:
    pos = dict(zip(THINGS_MEG_271, ctf_layout(THINGS_MEG_271), strict=True))
    assert pos["MZO03"][1] == pytest.approx(-1.0, abs=0.05)  # the most posterior sensor
    assert pos["MZO01"][1] < pos["MZP01"][1] < pos["MZC01"][1] < pos["MZF02"][1]
    assert pos["MLO11"][0] < 0 < pos["MRO11"][0] and pos["MLT11"][0] < pos["MLC11"][0]
    np.testing.assert_allclose(ctf_layout(["MLO11-4408"]), ctf_layout(["MLO11"]))  # .fif names
    with pytest.raises(BrainalignError, match="not a sensor of MNE's CTF-275"):
        make_params("meg-mini", {"ch_names": ["MLO11", "Oz"]})
    with pytest.raises(BrainalignError, match="n_voxels >= 1"):
        make_params("fmri-mini", {"n_voxels": 0})
    with pytest.raises(BrainalignError, match="n_voxels is for modality 'fmri'"):
        make_params("mini", {"n_voxels": 10})


def test_voxel_sheet_covers_the_posterior_cortex() -> None:
    v = voxel_sheet(3000)
    assert v.shape == (3000, 2) and len(np.unique(v, axis=0)) == 3000
    assert (np.hypot(v[:, 0], v[:, 1]) <= 1).all() and v[:, 1].max() <= 0.1 and v[:, 1].min() < -0.95
    np.testing.assert_array_equal(voxel_sheet(500), v[:500])  # the anatomy does not move with n


_SMALL = dict(n_subjects=1, n_train_concepts=6, n_test_concepts=5)


@pytest.mark.parametrize("preset", ["meg-mini", "fmri-mini"])
def test_meg_and_fmri_datasets_are_valid(tmp_path: Path, preset: str) -> None:
    from brainalign.data.validate import validate_dataset

    overrides = _SMALL | ({"n_voxels": 300} if preset == "fmri-mini" else {})
    root = simulate_dataset(tmp_path / preset, preset, seed=0, overrides=overrides, progress=False)
    assert validate_dataset(root) == []
    ds = open_dataset(root)
    p = make_params(preset, overrides)
    assert (ds.meta.modality, ds.meta.name, ds.meta.n_chans, ds.meta.n_times) == (
        p.modality, {"meg": "things-meg-sim", "fmri": "nsd-sim"}[p.modality], p.n_chans, p.n_times)
    ids, reps, x = ds.load_epochs("01", "train")
    assert x.shape == (len(ids), p.n_chans, p.n_times) and np.isfinite(x).all()
    assert len(ids) == p.n_train_images_total * p.n_train_reps
    world = world_from_dataset(root)
    # the files are the ground truth plus noise, and averaging the repetitions brings them closer
    test_ids, _, xt = ds.load_epochs("01", "test")
    ev = world.evoked(0, world.rows("test"))
    avg = xt.reshape(p.n_test_concepts, p.n_test_reps, p.n_chans, p.n_times).mean(1)
    assert np.mean((avg - ev) ** 2) < np.mean((xt[:: p.n_test_reps] - ev) ** 2)
    null = simulate_dataset(tmp_path / f"{preset}-null", preset, seed=0, null=True, overrides=overrides,
                            progress=False)
    assert open_dataset(null).meta.source["null"] is True and validate_dataset(null) == []


def test_fmri_early_voxels_carry_the_perceptual_latent() -> None:
    # ground truth of the voxel model: posterior voxels (the early sources' blobs) respond to the
    # perceptual features, anterior ones (the late sources') to the semantic latent
    p = make_params("fmri-mini", {"n_subjects": 1, "n_train_concepts": 400, "n_voxels": 600})
    world = build_world(p, seed=0)
    rows = world.rows("train")
    ev = world.evoked(0, rows)[..., 0]  # (n, voxels)
    y = voxel_sheet(p.n_voxels)[:, 1]
    post, ant = ev[:, y < -0.75], ev[:, y > -0.35]
    assert _r2(post, world.perceptual[rows]) > _r2(ant, world.perceptual[rows]) + 0.1
    assert _r2(ant, world.semantic[rows]) > _r2(post, world.semantic[rows]) + 0.1
