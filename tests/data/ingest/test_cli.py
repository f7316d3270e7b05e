"""``brainalign data ingest ...`` end to end, in process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from brainalign.cli import main
from brainalign.data.contract import open_dataset

from .conftest import EEG2Release, NSDRelease


def test_ingest_help_lists_the_sources(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["data", "ingest", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for source in ("things-eeg2", "things-eeg2-gifford", "things-meg", "nsd"):
        assert source in out


def test_cli_things_eeg2_then_rerun(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = make_eeg2("gifford", subjects=("01", "02"))
    out = tmp_path / "ds"
    argv = [
        "data",
        "ingest",
        "things-eeg2-gifford",
        "--eeg-dir",
        str(rel.eeg_dir),
        "--metadata",
        str(rel.metadata),
        "--images",
        str(rel.images),
        "--out",
        str(out),
        "--subjects",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "sub-02 train 24" in capsys.readouterr().out
    assert open_dataset(out).meta.subjects == ("02",)
    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert main([*argv, "--repetitions", "average"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_reports_bad_input_without_traceback(
    make_eeg2: Callable[..., EEG2Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = make_eeg2("nice", subjects=("01",))
    code = main(
        [
            "data",
            "ingest",
            "things-eeg2-gifford",
            "--eeg-dir",
            str(rel.eeg_dir),
            "--metadata",
            str(rel.metadata),
            "--out",
            str(tmp_path / "x"),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("brainalign: error: ") and "field 'preprocessed_eeg_data'" in err


def test_cli_nsd_one_root_per_subject(
    make_nsd: Callable[..., NSDRelease], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = make_nsd((1, 2))
    argv = [
        "data",
        "ingest",
        "nsd",
        "--expdesign",
        str(rel.expdesign),
        "--out",
        str(tmp_path / "nsd-sub{subject}"),
        "--no-progress",
    ]
    for s, p in rel.betas.items():
        argv += ["--betas", f"{s}={p}"]
    assert main(argv) == 0
    assert open_dataset(tmp_path / "nsd-sub01").meta.name == "nsd-sub01"
    assert open_dataset(tmp_path / "nsd-sub02").meta.n_chans == 14278
    assert main([*argv, "--subjects", "2"]) == 0
    assert "nsd-sub02 (up to date" in capsys.readouterr().out
