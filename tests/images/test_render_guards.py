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


def test_embed_never_writes_tables_into_a_folder_that_is_not_for_tables(
    tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from brainalign.images import embed_catalog

    from .conftest import make_catalog

    catalog = make_catalog(tmp_path / "cat", n_synthetic=0)
    out = tmp_path / "Documents"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(Exception, match="refusing to write into .*no brainalign marker") as e:
        embed_catalog(catalog, ["tiny-clip:none"], out, weights=tiny_weights)
    assert type(e.value).__name__ == "BrainalignError"
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    (out / "thesis.tex").unlink()
    (out / "foreign__table.parquet").write_bytes(b"PAR1 not ours")
    from brainalign._io import owned_kind

    assert owned_kind(out) == "tables"  # a folder of tables (e.g. a dataset's embeddings/) is fine
