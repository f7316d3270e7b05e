"""Real-data guards and clean-up of the ingest (issue 11, classes 7 and 9)."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from brainalign._checks import BrainalignError
from brainalign.cli import main
from brainalign.data.contract import open_dataset
from brainalign.data.ingest import ingest_nsd, ingest_things_eeg2

from .conftest import EEG2Release, NSDRelease, image_metadata, save_subject_file, subject_dict


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- class 7: nothing left behind
def test_a_failed_ingest_leaves_no_staging_folder(make_eeg2: Callable[..., EEG2Release], tmp_path: Path) -> None:
    rel = make_eeg2("nice", subjects=("01", "02", "03"))
    d = subject_dict("nice", "train", np.random.default_rng(3))
    d["preprocessed_eeg_data"][2, 1, 5, 9] = np.nan  # found while streaming subject 03, after 01 and 02
    save_subject_file(rel.file("03", "train"), d, "nice")
    out = tmp_path / "data" / "ds"
    with pytest.raises(BrainalignError, match="NaN/Inf"):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, out, show_progress=False)
    assert not out.exists()
    assert _hidden(out.parent) == [], "a failed ingest must not leave full-size staging folders"


def test_stale_staging_of_an_earlier_ingest_is_swept(make_eeg2: Callable[..., EEG2Release], tmp_path: Path) -> None:
    from brainalign._io import STAGING_FILE, mark_owned

    rel = make_eeg2("gifford", subjects=("01",))
    out = tmp_path / "ds"
    ours = tmp_path / ".ds.ingest-0123456789abcdef"  # an earlier ingest with other inputs, process gone
    (ours / "sub-01").mkdir(parents=True)
    mark_owned(ours, "ingest-staging")
    (ours / STAGING_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 17, "start": "",
                                                 "time": time.time()}))
    theirs = tmp_path / ".ds.ingest-notours"  # matches the pattern but carries no marker
    theirs.mkdir()
    res = ingest_things_eeg2(rel.eeg_dir, rel.metadata, out, release="gifford", show_progress=False)
    assert not res.up_to_date
    assert _hidden(tmp_path) == [".ds.ingest-notours"]


def test_the_printed_fingerprint_is_the_dataset_fingerprint(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = make_eeg2("gifford", subjects=("01",))
    out = tmp_path / "ds"
    argv = ["data", "ingest", "things-eeg2-gifford", "--eeg-dir", str(rel.eeg_dir), "--metadata",
            str(rel.metadata), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    stored = json.loads((out / "dataset.json").read_text())
    assert f"dataset fingerprint {stored['fingerprint']}" in printed  # what MLflow's data_fingerprint holds
    assert f"inputs fingerprint {stored['meta']['source']['ingest']['fingerprint']}" in printed
    assert main(argv) == 0
    assert f"dataset fingerprint {stored['fingerprint']}" in capsys.readouterr().out


def test_ingested_files_follow_the_umask(make_eeg2: Callable[..., EEG2Release], tmp_path: Path) -> None:
    rel = make_eeg2("gifford", subjects=("01",))
    old = os.umask(0o022)
    try:
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, tmp_path / "ds", release="gifford", show_progress=False)
    finally:
        os.umask(old)
    root = tmp_path / "ds"
    assert root.stat().st_mode & 0o777 == 0o755
    assert (root / "dataset.json").stat().st_mode & 0o777 == 0o644
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in root.rglob("*.parquet"))


# --------------------------------------------------------------------------- class 9: guards and messages
def test_nsd_betas_stored_transposed_are_refused(make_nsd: Callable[..., NSDRelease], tmp_path: Path) -> None:
    import h5py

    rel = make_nsd(subjects=(1,))
    n_design = rel.masterordering.size  # the fixture design has 26 trials
    x = np.random.default_rng(0).standard_normal((12, n_design)).astype(np.float32)  # (voxels, trials)
    with h5py.File(rel.betas[1], "w") as f:
        f.create_dataset("betas", data=x)
    with pytest.raises(BrainalignError, match=r"stored transposed \(n_voxels, n_trials\)"):
        ingest_nsd({1: rel.betas[1]}, rel.expdesign, tmp_path / "nsd", show_progress=False)
    y = np.random.default_rng(0).standard_normal((12, 20)).astype(np.float32)  # fewer trials than the design
    with h5py.File(rel.betas[1], "w") as f:
        f.create_dataset("betas", data=y)
    with pytest.raises(BrainalignError, match=r"looks stored transposed.*--n-trials"):
        ingest_nsd({1: rel.betas[1]}, rel.expdesign, tmp_path / "nsd", show_progress=False)
    assert not (tmp_path / "nsd").exists()


def test_eeg_count_mismatch_names_image_metadata(make_eeg2: Callable[..., EEG2Release], tmp_path: Path) -> None:
    md = image_metadata()
    md["train_img_concepts"] = md["train_img_concepts"][:4]
    md["train_img_files"] = md["train_img_files"][:4]
    rel = make_eeg2("nice", subjects=("01",), metadata=md)
    with pytest.raises(BrainalignError, match=r"holds 6 train images but image_metadata\.npy \(.*\) lists 4"):
        ingest_things_eeg2(rel.eeg_dir, rel.metadata, tmp_path / "ds", show_progress=False)


def test_the_wrong_things_eeg2_subcommand_points_to_the_other(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gifford = make_eeg2("gifford", subjects=("01",))
    code = main(["data", "ingest", "things-eeg2", "--eeg-dir", str(gifford.eeg_dir), "--metadata",
                 str(gifford.metadata), "--out", str(tmp_path / "a"), "--no-progress"])
    assert code == 2 and "use `brainalign data ingest things-eeg2-gifford`" in capsys.readouterr().err
    nice = make_eeg2("nice", subjects=("01",))
    code = main(["data", "ingest", "things-eeg2-gifford", "--eeg-dir", str(nice.eeg_dir), "--metadata",
                 str(nice.metadata), "--out", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"use `brainalign data ingest things-eeg2` \(release='nice'\)", err), err


def test_a_truncated_pickle_says_re_download(make_eeg2: Callable[..., EEG2Release], tmp_path: Path) -> None:
    rel = make_eeg2("nice", subjects=("01",))
    f = rel.file("01", "train")
    whole = f.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 7, 120, 12):  # in the array payload, at its end, in the header
        f.write_bytes(whole[:cut])
        with pytest.raises(BrainalignError, match=r"(?i)truncated.*re-download it"):
            ingest_things_eeg2(rel.eeg_dir, rel.metadata, tmp_path / "ds", show_progress=False)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--chunk-mb", "-5"], r"chunk_mb \(--chunk-mb.*must be in \(0, "),
        (["--chunk-mb", "nan"], r"chunk_mb \(--chunk-mb.*finite"),
        (["--metadata-dir"], r"--metadata .* is a directory; expected the file image_metadata\.npy"),
    ],
)
def test_cli_refuses_bad_ingest_options(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], match: str,
) -> None:
    rel = make_eeg2("gifford", subjects=("01",))
    metadata = str(rel.metadata.parent) if extra == ["--metadata-dir"] else str(rel.metadata)
    extra = [] if extra == ["--metadata-dir"] else extra
    code = main(["data", "ingest", "things-eeg2-gifford", "--eeg-dir", str(rel.eeg_dir), "--metadata", metadata,
                 "--out", str(tmp_path / "ds"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err), err
    assert "Traceback" not in err and not (tmp_path / "ds").exists()


def test_ingested_dataset_is_marked_as_ours(make_eeg2: Callable[..., EEG2Release], tmp_path: Path) -> None:
    from brainalign._io import owned_kind

    rel = make_eeg2("gifford", subjects=("01",))
    out = tmp_path / "ds"
    ingest_things_eeg2(rel.eeg_dir, rel.metadata, out, release="gifford", show_progress=False)
    assert owned_kind(out) == "dataset" and open_dataset(out).meta.subjects == ("01",)
