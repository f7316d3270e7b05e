"""Things-EEG2, both preprocessed releases: ingest, read back, and every malformed variant."""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from brainalign._checks import BrainalignError
from brainalign.data.contract import AVERAGED, open_dataset
from brainalign.data.ingest import UnsafePickleError, _common, ingest_things_eeg2, read_image_metadata
from brainalign.data.ingest.things_eeg2 import CHANNELS_63
from brainalign.data.validate import validate_dataset

from .conftest import GIFFORD_ORDER, EEG2Release, image_metadata, save_subject_file, subject_dict


def _problems(root: Path) -> list[str]:
    """Contract problems other than the (expected) missing embedding tables."""
    return [str(p) for p in validate_dataset(root) if not p.where.startswith("embeddings")]


def read_back(ray: Any, root: Path) -> dict[str, np.ndarray]:
    """Every epoch row of ``root`` read through Ray Data, as one numpy batch."""
    return ray.data.read_parquet(str(root / "epochs")).take_batch(batch_size=100_000)


def select(batch: dict[str, np.ndarray], **where: str) -> dict[str, np.ndarray]:
    """Rows of ``batch`` whose partition columns equal ``where`` (e.g. ``split="test"``)."""
    keep = np.ones(len(batch["image_id"]), bool)
    for k, v in where.items():
        keep &= np.asarray(batch[k]).astype(str) == v
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


def _expected_rows(rel: EEG2Release, subject: str, split: str) -> tuple[list[str], np.ndarray]:
    md = image_metadata()
    files = md["train_img_files"] if split == "train" else md["test_img_files"]
    x = rel.data[(subject, split)]
    ids = [Path(f).stem for f in files for _ in range(x.shape[1])]
    return ids, x.reshape(-1, *x.shape[2:]).astype(np.float32)


def test_catalog_from_image_metadata(make_eeg2: Callable[..., EEG2Release]) -> None:
    rel = make_eeg2("nice", subjects=("01",))
    cat = read_image_metadata(rel.metadata)
    assert cat.image_ids[:2] == ("aardvark_01b", "aardvark_02s")
    assert cat.concepts[0] == "00001_aardvark" and cat.splits.count("test") == 2
    assert cat.paths[0] == "training_images/00001_aardvark/aardvark_01b.jpg"
    assert cat.paths[-1] == "test_images/00002_antelope/antelope_01b.jpg"


@pytest.mark.integration
def test_nice_release_round_trip_through_ray_data(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path, ray_session: Any
) -> None:
    rel = make_eeg2("nice")
    out = tmp_path / "data" / "things-eeg2"
    res = ingest_things_eeg2(rel.eeg_dir, rel.metadata, out, images=rel.images, show_progress=False)
    assert not res.up_to_date and res.rows[("01", "train")] == 6 * 4 and res.rows[("02", "test")] == 2 * 8

    ds = open_dataset(out)
    assert ds.meta.name == "things-eeg2" and ds.meta.modality == "eeg"
    assert ds.meta.ch_names == tuple(CHANNELS_63) and ds.meta.n_times == 250
    assert ds.meta.sfreq == 250.0 and ds.meta.tmin == 0.0 and ds.meta.subjects == ("01", "02")
    assert ds.meta.source["kind"] == "real" and ds.meta.source["ingest"]["fingerprint"] == res.fingerprint
    assert _problems(out) == []
    assert not list(out.parent.glob(".things-eeg2.*")), "staging and temp dirs are cleaned up"
    for path in ds.catalog.column("path").to_pylist():  # catalog paths resolve relative to the catalog
        assert (out / path).is_file(), path

    everything = read_back(ray_session, out)
    assert len(everything["image_id"]) == 2 * (6 * 4 + 2 * 8)
    assert everything["epoch"].shape[1:] == (63, 250) and everything["epoch"].dtype == np.float32
    batch = select(everything, subject="02", split="train")
    assert batch["epoch"].shape == (24, 63, 250)
    ids, want = _expected_rows(rel, "02", "train")
    got = {
        (i, int(r)): x for i, r, x in zip(batch["image_id"], batch["repetition"], batch["epoch"], strict=True)
    }
    for row, image_id in enumerate(ids):
        np.testing.assert_array_equal(got[(image_id, row % 4)], want[row])
    assert set(batch["concept"]) == {"00001_aardvark", "00002_abacus", "00003_accordion"}


@pytest.mark.integration
def test_gifford_release_averaged(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path, ray_session: Any
) -> None:
    rel = make_eeg2("gifford", subjects=("03",))
    out = tmp_path / "gifford"
    ingest_things_eeg2(
        rel.eeg_dir, rel.metadata, out, release="gifford", repetitions="average", show_progress=False
    )
    ds = open_dataset(out)
    assert ds.meta.name == "things-eeg2-gifford" and ds.meta.ch_names == tuple(GIFFORD_ORDER)
    assert (ds.meta.n_chans, ds.meta.n_times, ds.meta.sfreq, ds.meta.tmin) == (17, 100, 100.0, -0.2)
    assert _problems(out) == []
    test = select(read_back(ray_session, out), split="test")
    assert test["epoch"].shape == (2, 17, 100) and set(test["repetition"].tolist()) == {AVERAGED}
    want = rel.data[("03", "test")].mean(axis=1).astype(np.float32)
    order = [list(test["image_id"]).index(s) for s in ("aircraft_carrier_06s", "antelope_01b")]
    np.testing.assert_allclose(test["epoch"][order], want, rtol=1e-6)


def test_rerun_is_a_noop_and_other_inputs_need_overwrite(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path
) -> None:
    rel = make_eeg2("nice", subjects=("01",))
    out = tmp_path / "ds"
    out.mkdir()  # an empty directory is fine
    first = ingest_things_eeg2(rel.eeg_dir, rel.metadata, out, show_progress=False)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    again = ingest_things_eeg2(rel.eeg_dir, rel.metadata, out, show_progress=False)
    assert again.up_to_date and again.fingerprint == first.fingerprint
    assert (out / "dataset.json").stat().st_mtime_ns == stamp

    with pytest.raises(BrainalignError, match="other inputs or options.*--overwrite"):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, out, repetitions="average", show_progress=False)
    res = ingest_things_eeg2(
        rel.eeg_dir, rel.metadata, out, repetitions="average", overwrite=True, show_progress=False
    )
    assert (
        res.rows[("01", "train")] == 6
        and open_dataset(out).meta.source["ingest"]["options"]["repetitions"] == "average"
    )


def test_interrupted_ingest_leaves_nothing_and_resumes(
    make_eeg2: Callable[..., EEG2Release],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rel = make_eeg2("nice", subjects=("01", "02"))
    out = tmp_path / "ds"
    real = _common._write_subject

    def crash_on_second(root: Path, meta: Any, catalog: Any, plan: Any, show: bool) -> Any:
        if plan.subject == "02":
            raise KeyboardInterrupt("simulated Ctrl-C")
        return real(root, meta, catalog, plan, show)

    monkeypatch.setattr(_common, "_write_subject", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, out, show_progress=False)
    assert not out.exists(), "no half dataset at the output root"
    monkeypatch.setattr(_common, "_write_subject", real)
    with caplog.at_level(logging.INFO, logger="brainalign.data.ingest._common"):
        res = ingest_things_eeg2(rel.eeg_dir, rel.metadata, out, show_progress=False)
    assert "subject 01 already staged" in caplog.text
    assert res.rows == {("01", "train"): 24, ("01", "test"): 16, ("02", "train"): 24, ("02", "test"): 16}
    assert _problems(out) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]


# --------------------------------------------------------------------------- malformed inputs
def _rewrite(rel: EEG2Release, subject: str, split: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = rel.file(subject, split)
    d = subject_dict(rel.release, split, np.random.default_rng(5))
    change(d)
    save_subject_file(path, d, rel.release)


def _swap(ch: list[str]) -> list[str]:
    ch = list(ch)
    ch[3], ch[4] = ch[4], ch[3]
    return ch


BAD_SUBJECT_FILES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("missing key", lambda d: d.pop("times"), r"missing key\(s\) \['times'\]"),
    (
        "too few samples",
        lambda d: d.update(preprocessed_eeg_data=d["preprocessed_eeg_data"][..., :249]),
        r"field 'preprocessed_eeg_data': expected shape \(n_images=2, n_reps, n_chans=63, n_times=250\)",
    ),
    (
        "image count",
        lambda d: d.update(preprocessed_eeg_data=d["preprocessed_eeg_data"][:1]),
        r"field 'preprocessed_eeg_data': expected shape \(n_images=2,.*got \(1, 8, 63, 250\)",
    ),
    (
        "integer data",
        lambda d: d.update(preprocessed_eeg_data=d["preprocessed_eeg_data"].astype(np.int32)),
        r"field 'preprocessed_eeg_data': expected float64 \(or float32\) values, got dtype int32",
    ),
    (
        "channel order",
        lambda d: d.update(ch_names=_swap(d["ch_names"])),
        r"field 'ch_names': expected the 63 nice channels in their fixed order \(position 3: 'AF3'\)",
    ),
    ("62 channels", lambda d: d.update(ch_names=d["ch_names"][:62]), r"field 'ch_names'"),
    (
        "sampling rate",
        lambda d: d.update(times=np.arange(300) / 500.0 - 0.2),
        r"field 'times': expected uniform steps of 1/250 s \(250 Hz\), got 500 Hz",
    ),
    (
        "times sliced wrong",
        lambda d: d.update(times=d["times"][:250]),
        r"field 'times': expected the data's first sample \(times\[-250\]\) at 0 s, got -0.2 s",
    ),
    (
        "NaN",
        lambda d: d["preprocessed_eeg_data"].__setitem__((1, 3, 30, 7), np.nan),
        r"field 'preprocessed_eeg_data': expected finite values, .* image 1 \('antelope_01b'\), repetition 3, "
        r"channel 'Cz', sample 7",
    ),
    (
        "Inf after float32 cast",
        lambda d: d["preprocessed_eeg_data"].__setitem__((0, 0, 0, 0), 1e300),
        r"expected finite values.*image 0 \('aircraft_carrier_06s'\), repetition 0, channel 'Fp1', sample 0",
    ),
    ("not a dict", lambda d: d.clear() or d.update(x=1), r"missing key\(s\)"),
]


@pytest.mark.parametrize(
    "change,match", [(c, m) for _, c, m in BAD_SUBJECT_FILES], ids=[n for n, _, _ in BAD_SUBJECT_FILES]
)
def test_bad_subject_file_is_rejected_naming_file_and_field(
    make_eeg2: Callable[..., EEG2Release],
    tmp_path: Path,
    change: Callable[[dict[str, Any]], None],
    match: str,
) -> None:
    rel = make_eeg2("nice", subjects=("01", "02"))
    _rewrite(rel, "02", "test", change)
    out = tmp_path / "ds"
    with pytest.raises(BrainalignError, match=match) as err:
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, out, show_progress=False)
    assert str(rel.file("02", "test")) in str(err.value)
    assert not out.exists()


def test_gifford_channels_must_agree_across_subjects(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path
) -> None:
    rel = make_eeg2("gifford", subjects=("01", "02"))
    _rewrite(rel, "02", "train", lambda d: d.update(ch_names=_swap(d["ch_names"])))
    with pytest.raises(
        BrainalignError,
        match=r"sub-02/preprocessed_eeg_training.npy: field 'ch_names': expected "
        r"the channel order of .*sub-01",
    ):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, tmp_path / "ds", release="gifford", show_progress=False)


def test_release_mismatch_is_explained(make_eeg2: Callable[..., EEG2Release], tmp_path: Path) -> None:
    rel = make_eeg2("gifford", subjects=("01",))
    with pytest.raises(
        BrainalignError, match=r"n_chans=63, n_times=250\) \(nice release\).*got \(6, 4, 17, 100\)"
    ):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, tmp_path / "ds", release="nice", show_progress=False)


def _meta_with(**change: Any) -> dict[str, Any]:
    md = image_metadata()
    for k, v in change.items():
        if v is None:
            md.pop(k)
        else:
            md[k] = v
    return md


BAD_METADATA: list[tuple[str, dict[str, Any], str]] = [
    ("missing key", _meta_with(test_img_files=None), r"image_metadata.npy: missing key 'test_img_files'"),
    (
        "length mismatch",
        _meta_with(train_img_concepts=image_metadata()["train_img_concepts"][:5]),
        r"field 'train_img_concepts': expected one concept per entry of 'train_img_files' \(6\), got 5",
    ),
    (
        "duplicated image",
        _meta_with(train_img_files=["aardvark_01b.jpg"] * 2 + image_metadata()["train_img_files"][2:]),
        r"duplicated image 'aardvark_01b' \(rows \[0, 1\]",
    ),
    (
        "test concept in training",
        _meta_with(train_img_concepts=["00001_aardvark"] * 5 + ["00004_antelope"]),
        r"field 'test_img_concepts': test concept\(s\) \['antelope'\] also appear in 'train_img_concepts'",
    ),
    (
        "THINGS ids overlap",
        _meta_with(test_img_concepts_THINGS=["00003_aardvark", "00100_aircraft_carrier"]),
        r"field 'test_img_concepts_THINGS': THINGS concept\(s\) \['00003_aardvark'\] are in both splits",
    ),
    (
        "numbers, not names",
        _meta_with(test_img_files=[1, 2]),
        r"field 'test_img_files': expected strings only",
    ),
]


@pytest.mark.parametrize(
    "metadata,match", [(m, r) for _, m, r in BAD_METADATA], ids=[n for n, _, _ in BAD_METADATA]
)
def test_bad_image_metadata_is_rejected(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path, metadata: dict[str, Any], match: str
) -> None:
    rel = make_eeg2("nice", subjects=("01",), metadata=metadata)
    with pytest.raises(BrainalignError, match=match):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, tmp_path / "ds", show_progress=False)
    assert not (tmp_path / "ds").exists()


def test_missing_image_files_are_listed(make_eeg2: Callable[..., EEG2Release], tmp_path: Path) -> None:
    rel = make_eeg2("nice", subjects=("01",))
    (rel.images / "test_images" / "00002_antelope" / "antelope_01b.jpg").unlink()
    with pytest.raises(BrainalignError, match=r"1 of 8 catalog image file\(s\) missing.*antelope_01b.jpg"):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, tmp_path / "ds", images=rel.images, show_progress=False)


def test_output_that_is_not_a_dataset_is_left_alone(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path
) -> None:
    rel = make_eeg2("nice", subjects=("01",))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(BrainalignError, match=r"ds exists and is not a brainalign dataset"):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, tmp_path / "ds", show_progress=False)
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"


def test_missing_subject_file(make_eeg2: Callable[..., EEG2Release], tmp_path: Path) -> None:
    rel = make_eeg2("nice", subjects=("01",))
    rel.file("01", "test").unlink()
    with pytest.raises(BrainalignError, match=r"sub-01/preprocessed_eeg_test.npy does not exist"):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, tmp_path / "ds", show_progress=False)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["subject file", "image metadata"])
def test_malicious_pickle_is_refused_and_not_executed(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path, where: str
) -> None:
    rel = make_eeg2("nice", subjects=("01",))
    marker = tmp_path / "PWNED"
    if where == "subject file":
        d = subject_dict("nice", "train", np.random.default_rng(0))
        d["ch_names"] = _RunsShell(marker)
        with open(rel.file("01", "train"), "wb") as f:
            pickle.dump(d, f, protocol=4)
        target = rel.file("01", "train")
    else:
        md = image_metadata()
        md["train_img_files"] = _RunsShell(marker)
        np.save(rel.metadata, md)
        target = rel.metadata
    with pytest.raises(
        UnsafePickleError, match=re.escape(f"{target}: refusing to unpickle global 'posix.system'")
    ):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, tmp_path / "ds", show_progress=False)
    assert not marker.exists(), "the payload must never run"
    assert not (tmp_path / "ds").exists()


def test_subject_folders_named_sub01_are_found(make_eeg2: Callable[..., EEG2Release], tmp_path: Path) -> None:
    rel = make_eeg2("gifford", subjects=("01",))
    (rel.eeg_dir / "sub-01").rename(rel.eeg_dir / "sub01")  # as some unzip tools leave OSF's per-subject zips
    res = ingest_things_eeg2(
        rel.eeg_dir, rel.metadata, tmp_path / "ds", release="gifford", show_progress=False
    )
    assert res.rows[("01", "test")] == 16
