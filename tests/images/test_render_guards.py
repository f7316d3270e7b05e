"""``embed --render-simulated --out`` never empties a folder or replaces a dataset (issue 11, class 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from brainalign.cli import main
from brainalign.data.contract import open_dataset


def test_render_refuses_a_folder_that_is_not_a_render(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "my-figures"
    out.mkdir()
    (out / "figure1.pdf").write_text("precious")
    assert main(["embed", "--render-simulated", str(tiny_dataset), "--out", str(out)]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["figure1.pdf"]


def test_render_refuses_the_dataset_itself_and_folders_inside_it(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    before = sorted(p.relative_to(ds).as_posix() for p in ds.rglob("*"))
    assert main(["embed", "--render-simulated", str(ds), "--out", str(ds)]) == 2
    assert "it is the dataset" in capsys.readouterr().err
    assert main(["embed", "--render-simulated", str(ds), "--out", str(ds / "epochs")]) == 2
    assert "inside the dataset" in capsys.readouterr().err
    assert sorted(p.relative_to(ds).as_posix() for p in ds.rglob("*")) == before
    assert open_dataset(ds).meta.simulated


def test_render_replaces_its_own_earlier_render(tiny_dataset: Path, tmp_path: Path) -> None:
    from brainalign._io import owned_kind

    out = tmp_path / "render"
    assert main(["embed", "--render-simulated", str(tiny_dataset), "--out", str(out), "--render-size", "8"]) == 0
    assert owned_kind(out) == "images"
    assert main(["embed", "--render-simulated", str(tiny_dataset), "--out", str(out), "--render-size", "16"]) == 0
    assert owned_kind(out) == "images" and (out / "images.parquet").is_file()
