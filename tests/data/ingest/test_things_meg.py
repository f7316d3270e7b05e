"""THINGS-MEG: MNE epochs (split parts, metadata) -> the contract, and malformed variants."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from brainalign._checks import BrainalignError
from brainalign.data.contract import AVERAGED, open_dataset
from brainalign.data.ingest import ingest_things_meg
from brainalign.data.ingest.things_meg import parse_image_path
from brainalign.data.validate import validate_dataset

from .conftest import MEG_TEST, MEG_TEST_REPS, MEG_TRAIN, MEGRelease, meg_metadata, write_meg_subject


def test_parse_image_path() -> None:
    assert parse_image_path("images_meg/aardvark/aardvark_01b.jpg") == ("aardvark_01b", "aardvark")
    assert parse_image_path("images_test_meg/aircraft_carrier_06s.jpg") == (
        "aircraft_carrier_06s",
        "aircraft_carrier",
    )


@pytest.mark.integration
def test_things_meg_round_trip_through_ray_data(
    make_meg: Callable[..., MEGRelease], tmp_path: Path, ray_session: Any
) -> None:
    rel = make_meg((1, 2))
    assert len(rel.files["01"]) > 1, "P1 must be written in split parts"
    out = tmp_path / "things-meg"
    res = ingest_things_meg(rel.meg_dir, out, show_progress=False)
    assert res.rows == {("01", "train"): 6, ("01", "test"): 24, ("02", "train"): 6, ("02", "test"): 24}
    ds = open_dataset(out)
    assert (ds.meta.modality, ds.meta.n_chans, ds.meta.n_times, ds.meta.sfreq, ds.meta.tmin) == (
        "meg",
        271,
        201,
        200.0,
        0.0,
    )
    assert [p for p in validate_dataset(out) if not p.where.startswith("embeddings")] == []
    cat = ds.catalog.to_pydict()
    assert sorted(i for i, s in zip(cat["image_id"], cat["split"], strict=True) if s == "test") == sorted(
        MEG_TEST
    )
    assert "aircraft_carrier_09b" not in cat["image_id"], "exp trials of test concepts are excluded"
    assert "catch_01" not in cat["image_id"]

    batch = ray_session.data.read_parquet(str(out / "epochs")).take_batch(batch_size=10_000)
    assert batch["epoch"].shape == (60, 271, 201) and batch["epoch"].dtype == np.float32
    # values: P1 (read from its split parts), the test image antelope_01b, repetition 5, cropped to 0..1 s
    md = rel.metadata["01"].reset_index(drop=True)
    trials = md.index[(md.trial_type == "test") & md.image_path.str.endswith("antelope_01b.jpg")].tolist()
    want = rel.data["01"][trials[5], :, 20:221].astype(np.float32)
    sel = (
        (np.asarray(batch["subject"]).astype(str) == "01")
        & (batch["image_id"] == "antelope_01b")
        & (batch["repetition"] == 5)
    )
    np.testing.assert_array_equal(batch["epoch"][sel][0], want)
    assert set(batch["repetition"][batch["image_id"] == "antelope_01b"]) == set(range(MEG_TEST_REPS))


def test_things_meg_averaged_test_images(make_meg: Callable[..., MEGRelease], tmp_path: Path) -> None:
    rel = make_meg((2,))
    out = tmp_path / "meg-avg"
    ingest_things_meg(rel.meg_dir, out, subjects=["P2"], repetitions="average", show_progress=False)
    ids, reps, x = open_dataset(out).load_epochs("02", "test")
    assert sorted(ids) == sorted(MEG_TEST) and set(reps.tolist()) == {AVERAGED} and x.shape == (2, 271, 201)
    md = rel.metadata["02"].reset_index(drop=True)
    trials = md.index[md.image_path == f"images_test_meg/{ids[0]}.jpg"].tolist()
    np.testing.assert_allclose(x[0], rel.data["02"][trials, :, 20:221].mean(axis=0), rtol=1e-5, atol=1e-20)
    ids, _, _ = open_dataset(out).load_epochs("02", "train")
    assert sorted(ids) == sorted(i for v in MEG_TRAIN.values() for i in v)


def test_things_meg_rerun_is_noop(make_meg: Callable[..., MEGRelease], tmp_path: Path) -> None:
    rel = make_meg((2,))
    out = tmp_path / "m"
    ingest_things_meg(rel.meg_dir, out, show_progress=False)
    assert ingest_things_meg(rel.meg_dir, out, show_progress=False).up_to_date


def _drop_column(col: str) -> Callable[[np.random.Generator], Any]:
    return lambda rng: meg_metadata(rng).drop(columns=[col])


BAD_MEG: list[tuple[str, dict[str, Any], str]] = [
    (
        "no trial_type",
        {"metadata_fn": _drop_column("trial_type")},
        r"field 'metadata': expected columns trial_type and image_path \(missing \['trial_type'\]\)",
    ),
    ("250 Hz", {"sfreq": 250.0}, r"field 'info\[\"sfreq\"\]': expected 200 Hz, got 250 Hz"),
    ("270 channels", {"n_chans": 270}, r"field 'info\[\"chs\"\]': expected 271 MEG channels .*got 270"),
    (
        "epoch too short",
        {"tmax": 0.8},
        r"field 'times': expected an epoch covering 0..1 s \(201 samples at 200 Hz\)",
    ),
    (
        "NaN",
        {"nan_epoch": "first test trial"},
        r"field 'data': expected finite values.*epoch \d+ \(image '(aircraft_carrier_06s|antelope_01b)'\), "
        r"channel 'MLC005-4408', sample 80",
    ),
]


@pytest.mark.parametrize("kwargs,match", [(k, m) for _, k, m in BAD_MEG], ids=[n for n, _, _ in BAD_MEG])
def test_bad_meg_file_is_rejected(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "meg" / "preprocessed_P3-epo.fif"
    kwargs = dict(kwargs)
    if "metadata_fn" in kwargs:
        kwargs["metadata"] = kwargs.pop("metadata_fn")(rng)
    if kwargs.get("nan_epoch") == "first test trial":
        md = meg_metadata(rng)
        kwargs["metadata"] = md
        kwargs["nan_epoch"] = int(np.flatnonzero(md.trial_type.to_numpy() == "test")[0])
    write_meg_subject(path, rng, **kwargs)
    out = tmp_path / "out"
    with pytest.raises(BrainalignError, match=match) as err:
        ingest_things_meg(path.parent, out, show_progress=False)
    assert str(path) in str(err.value)
    assert not out.exists()


def test_image_in_two_splits_is_rejected(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    md = meg_metadata(rng)
    first_exp = int(np.flatnonzero(md.image_path.str.startswith("images_meg/aardvark/").to_numpy())[0])
    md.loc[md.index[first_exp], "image_path"] = "images_meg/aardvark/antelope_01b.jpg"  # a test image's stem
    path = tmp_path / "meg" / "preprocessed_P1-epo.fif"
    write_meg_subject(path, rng, metadata=md)
    with pytest.raises(
        BrainalignError, match=r"image 'antelope_01b' always under one path, concept and split"
    ):
        ingest_things_meg(path.parent, tmp_path / "out", show_progress=False)
