"""Fixtures in exactly the formats of the public releases, written by the tests.

Real keys, dtypes, nesting, pickling protocol, channel counts and time axes; only the
numbers of images (3 training concepts x 2 images, 2 test images), repetitions and trials
are small. Each writer returns the arrays it wrote, so tests can compare values after the
round trip through the contract and Ray Data.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from brainalign.data.ingest.things_eeg2 import CHANNELS_63, CHANNELS_OCCIPITAL_PARIETAL

TRAIN_CONCEPTS = ["00001_aardvark", "00002_abacus", "00003_accordion"]
TRAIN_FILES = {c: [f"{c[6:]}_01b.jpg", f"{c[6:]}_02s.jpg"] for c in TRAIN_CONCEPTS}
TEST_CONCEPTS = ["00001_aircraft_carrier", "00002_antelope"]
TEST_FILES = {"00001_aircraft_carrier": "aircraft_carrier_06s.jpg", "00002_antelope": "antelope_01b.jpg"}
#: Gifford's 17 channels in a (made-up) recording order that differs from the 63-channel order.
GIFFORD_ORDER = [
    "O1",
    "Oz",
    "O2",
    "PO7",
    "PO3",
    "POz",
    "PO4",
    "PO8",
    "P7",
    "P5",
    "P3",
    "P1",
    "Pz",
    "P2",
    "P4",
    "P6",
    "P8",
]
assert sorted(GIFFORD_ORDER) == sorted(CHANNELS_OCCIPITAL_PARIETAL)


def image_metadata() -> dict[str, Any]:
    """The dict stored in image_metadata.npy (lists and str arrays, as in the release)."""
    train_c = [c for c in TRAIN_CONCEPTS for _ in range(2)]
    train_f = [f for c in TRAIN_CONCEPTS for f in TRAIN_FILES[c]]
    test_c = list(TEST_CONCEPTS)
    test_f = [TEST_FILES[c] for c in TEST_CONCEPTS]
    return {
        "train_img_concepts": np.array(train_c),
        "train_img_files": train_f,
        "test_img_concepts": np.array(test_c),
        "test_img_files": test_f,
        "train_img_concepts_THINGS": [f"{i + 3:05d}_{c[6:]}" for i, c in enumerate(train_c)],
        "test_img_concepts_THINGS": [f"{i + 100:05d}_{c[6:]}" for i, c in enumerate(test_c)],
    }


@dataclass
class EEG2Release:
    """Paths and contents of a written Things-EEG2 fixture."""

    eeg_dir: Path
    metadata: Path
    images: Path
    release: str
    data: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (subject, split) -> float64

    def file(self, subject: str, split: str) -> Path:
        name = "preprocessed_eeg_training.npy" if split == "train" else "preprocessed_eeg_test.npy"
        return self.eeg_dir / f"sub-{subject}" / name


def subject_dict(
    release: str, split: str, rng: np.random.Generator, *, train_reps: int = 4, test_reps: int = 8
) -> dict[str, Any]:
    """One subject file's dict in the release format."""
    if release == "nice":
        n_ch, n_t, ch = 63, 250, list(CHANNELS_63)
        times = np.round(-0.2 + np.arange(300) / 250.0, 6)  # 300 values: NOT sliced like the data
    else:
        n_ch, n_t, ch = 17, 100, list(GIFFORD_ORDER)
        times = np.round(-0.2 + np.arange(100) / 100.0, 6)
    n_img, reps = (6, train_reps) if split == "train" else (2, test_reps)
    data = rng.standard_normal((n_img, reps, n_ch, n_t))  # float64, as released
    return {"preprocessed_eeg_data": data, "ch_names": ch, "times": times}


def save_subject_file(path: Path, d: dict[str, Any], release: str) -> None:
    """NICE: pickle.dump(dict, protocol=4) under a .npy name; Gifford: np.save(dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if release == "nice":
        with open(path, "wb") as f:
            pickle.dump(d, f, protocol=4)
    else:
        np.save(path, d)  # a 0-d object array wrapping the dict


@pytest.fixture
def make_eeg2(tmp_path: Path) -> Callable[..., EEG2Release]:
    """Factory: write a Things-EEG2 fixture release (``release`` = "nice" or "gifford")."""

    def make(
        release: str = "nice",
        subjects: tuple[str, ...] = ("01", "02"),
        seed: int = 0,
        metadata: dict[str, Any] | None = None,
        root: Path | None = None,
    ) -> EEG2Release:
        root = root or tmp_path / f"things_eeg_2_{release}"
        eeg_dir = root / ("Preprocessed_data_250Hz" if release == "nice" else "preprocessed_eeg")
        rel = EEG2Release(eeg_dir, root / "image_metadata.npy", root / "images", release)
        root.mkdir(parents=True, exist_ok=True)
        np.save(rel.metadata, metadata if metadata is not None else image_metadata())
        rng = np.random.default_rng(seed)
        for s in subjects:
            for split in ("train", "test"):
                d = subject_dict(release, split, rng)
                save_subject_file(rel.file(s, split), d, release)
                rel.data[(s, split)] = d["preprocessed_eeg_data"]
        for c in TRAIN_CONCEPTS:
            for f in TRAIN_FILES[c]:
                (rel.images / "training_images" / c).mkdir(parents=True, exist_ok=True)
                (rel.images / "training_images" / c / f).write_bytes(b"\xff\xd8\xff")
        for c, f in TEST_FILES.items():
            (rel.images / "test_images" / c).mkdir(parents=True, exist_ok=True)
            (rel.images / "test_images" / c / f).write_bytes(b"\xff\xd8\xff")
        return rel

    return make


# --------------------------------------------------------------------------- THINGS-MEG
MEG_TRAIN = {
    "aardvark": ["aardvark_01b", "aardvark_02s"],
    "abacus": ["abacus_01b", "abacus_03s"],
    "accordion": ["accordion_01b", "accordion_05n"],
}
MEG_TEST = ["aircraft_carrier_06s", "antelope_01b"]  # concepts aircraft_carrier, antelope
MEG_TEST_REPS = 12


@dataclass
class MEGRelease:
    meg_dir: Path
    files: dict[str, list[Path]]
    data: dict[str, np.ndarray]  # subject -> (n_epochs, 271, 281) as saved (float32 precision)
    metadata: dict[str, Any]  # subject -> DataFrame


def meg_metadata(rng: np.random.Generator) -> Any:
    """Per-epoch metadata like ds004212's: exp trials (incl. test concepts), test trials, a catch trial."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    cat_nr = {"aardvark": 1, "abacus": 2, "accordion": 3, "aircraft_carrier": 10, "antelope": 20}
    for concept, imgs in MEG_TRAIN.items():
        for i, stem in enumerate(imgs):
            rows.append(
                {
                    "trial_type": "exp",
                    "image_path": f"images_meg/{concept}/{stem}.jpg",
                    "category_nr": cat_nr[concept],
                    "exemplar_nr": i + 1,
                }
            )
    for stem in MEG_TEST:  # exp presentations of test concepts' other images: must be excluded
        concept = stem.rsplit("_", 1)[0]
        rows.append(
            {
                "trial_type": "exp",
                "image_path": f"images_meg/{concept}/{concept}_09b.jpg",
                "category_nr": cat_nr[concept],
                "exemplar_nr": 9,
            }
        )
    for _ in range(MEG_TEST_REPS):
        for stem in MEG_TEST:
            concept = stem.rsplit("_", 1)[0]
            rows.append(
                {
                    "trial_type": "test",
                    "image_path": f"images_test_meg/{stem}.jpg",
                    "category_nr": cat_nr[concept],
                    "exemplar_nr": 6,
                }
            )
    rows.append(
        {
            "trial_type": "catch",
            "image_path": "images_catch_meg/catch_01.jpg",
            "category_nr": float("nan"),
            "exemplar_nr": 0,
        }
    )
    order = rng.permutation(len(rows))  # trials are interleaved in the real runs
    df = pd.DataFrame([rows[i] for i in order])
    df["session_nr"] = 1
    return df


def write_meg_subject(
    path: Path,
    rng: np.random.Generator,
    *,
    n_chans: int = 271,
    sfreq: float = 200.0,
    tmin: float = -0.1,
    tmax: float = 1.3,
    metadata: Any = None,
    split_size: str = "2GB",
    nan_epoch: int | None = None,
) -> tuple[np.ndarray, Any]:
    """An MNE epochs file like ``preprocessed_P{n}-epo.fif`` (271 mag channels, 200 Hz, -0.1..1.3 s)."""
    import mne

    md = metadata if metadata is not None else meg_metadata(rng)
    n_t = int(round((tmax - tmin) * sfreq)) + 1
    info = mne.create_info([f"MLC{i:03d}-4408" for i in range(n_chans)], sfreq, "mag")
    data = rng.standard_normal((len(md), n_chans, n_t)) * 1e-12
    if nan_epoch is not None:
        data[nan_epoch, 5, 100] = np.nan
    events = np.column_stack([np.arange(len(md)) * 400 + 1000, np.zeros(len(md), int), np.ones(len(md), int)])
    ep = mne.EpochsArray(data, info, events=events, tmin=tmin, metadata=md, verbose="error")
    path.parent.mkdir(parents=True, exist_ok=True)
    ep.save(path, split_size=split_size, overwrite=True, verbose="error")
    return data.astype(np.float32).astype(np.float64), md


@pytest.fixture
def make_meg(tmp_path: Path) -> Callable[..., MEGRelease]:
    """Factory: write THINGS-MEG fixture epochs for participants ``subjects`` (P1 in split parts)."""

    def make(subjects: tuple[int, ...] = (1, 2), seed: int = 0, **kwargs: Any) -> MEGRelease:
        meg_dir = tmp_path / "ds004212" / "derivatives" / "preprocessed"
        rng = np.random.default_rng(seed)
        rel = MEGRelease(meg_dir, {}, {}, {})
        for n in subjects:
            path = meg_dir / f"preprocessed_P{n}-epo.fif"
            split = "4MB" if n == 1 else "2GB"  # P1 is written in split parts, like the release
            data, md = write_meg_subject(path, rng, split_size=split, **kwargs)
            rel.data[f"{n:02d}"] = data
            rel.metadata[f"{n:02d}"] = md
            rel.files[f"{n:02d}"] = sorted(meg_dir.glob(f"preprocessed_P{n}-epo*.fif"))
        return rel

    return make


# --------------------------------------------------------------------------- NSD
NSD_VOXELS = {1: 15724, 2: 14278, 5: 13039, 7: 12682}


def write_stimuli(path: Path, nsd_ids: Any, n_nsd: int) -> dict[int, np.ndarray]:
    """nsd_stimuli.hdf5 ('imgBrick', (n_nsd, 425, 425, 3) uint8); only ``nsd_ids`` (0-based) are written."""
    import h5py

    rng = np.random.default_rng(0)
    written = {}
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("imgBrick", shape=(n_nsd, 425, 425, 3), dtype=np.uint8, chunks=(1, 425, 425, 3))
        for i in sorted(set(int(i) for i in nsd_ids)):
            written[i] = rng.integers(0, 256, (425, 425, 3), dtype=np.uint8)
            ds[i] = written[i]
    return written


@dataclass
class NSDRelease:
    expdesign: Path
    betas: dict[int, Path]
    data: dict[int, np.ndarray]  # subject -> (n_trials, n_voxels) float32
    masterordering: np.ndarray
    subjectim: np.ndarray


def nsd_design(rng: np.random.Generator, n_img: int = 1008, n_nsd: int = 73000) -> dict[str, np.ndarray]:
    """A small nsd_expdesign.mat: 3 shared (test) and 5 subject-specific images, 3 trials each.

    NSD ids are drawn from ``1..n_nsd`` (73000 in the release; fewer keeps a stimuli fixture small).
    """
    shared = rng.choice(np.arange(1, n_nsd + 1), 1000, replace=False)
    subjectim = np.zeros((8, n_img), dtype=np.float64)  # MATLAB doubles, as in the release
    pool = np.setdiff1d(np.arange(1, n_nsd + 1), shared)
    for s in range(8):
        subjectim[s, :1000] = shared
        subjectim[s, 1000:] = rng.choice(pool, n_img - 1000, replace=False)
    cols = np.array([1, 2, 3, 1001, 1002, 1003, 1004, 1005])
    masterordering = rng.permutation(np.repeat(cols, 3)).astype(np.float64)
    # trials beyond those the betas cover (NSD has 30000 entries; later sessions are not in every release)
    masterordering = np.concatenate([masterordering, np.array([1006.0, 4.0])])
    return {
        "masterordering": masterordering[None, :],
        "subjectim": subjectim,
        "sharedix": shared[None, :].astype(float),
    }


@pytest.fixture
def make_nsd(tmp_path: Path) -> Callable[..., NSDRelease]:
    """Factory: write nsd_expdesign.mat and per-subject nsdgeneral HDF5 files."""

    def make(
        subjects: tuple[int, ...] = (1,),
        key: str = "betas",
        seed: int = 0,
        voxels: dict[int, int] | None = None,
        design: dict[str, np.ndarray] | None = None,
        dtype: Any = np.float32,
    ) -> NSDRelease:
        import h5py
        import scipy.io

        rng = np.random.default_rng(seed)
        root = tmp_path / "NSD_fmri"
        root.mkdir(parents=True, exist_ok=True)
        d = design if design is not None else nsd_design(rng)
        scipy.io.savemat(root / "nsd_expdesign.mat", d)
        n_trials = 24
        rel = NSDRelease(
            root / "nsd_expdesign.mat", {}, {}, np.ravel(d.get("masterordering", [])), d["subjectim"]
        )
        for s in subjects:
            n_vox = (voxels or NSD_VOXELS)[s]
            x = rng.standard_normal((n_trials, n_vox)).astype(dtype)
            p = root / "nsdgeneral" / f"subj{s:02d}_nsdgeneral.hdf5"
            p.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(p, "w") as f:
                f.create_dataset(key, data=x)
            rel.betas[s] = p
            rel.data[s] = x
        return rel

    return make
