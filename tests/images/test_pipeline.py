"""The Ray Data pipeline end to end on a real local Ray (the session's ``ray_session``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from brainalign._checks import BrainalignError
from brainalign._io import sha256_file
from brainalign.data.contract import list_tables, read_catalog, read_embedding_table
from brainalign.images import embed_catalog, embed_images_local

from .conftest import make_catalog

pytestmark = pytest.mark.integration

TINY = "tiny-dreamsim_clip_vitb32,tiny-test_vit,tiny-clip"
DIMS = {"tiny-dreamsim_clip_vitb32": 16, "tiny-test_vit": 64, "tiny-clip": 32}


@pytest.fixture(scope="module")
def first_run(ray_session: object, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("embed")
    cat = make_catalog(work)
    out = work / "tables"
    report = embed_catalog(cat, TINY, out, weights=tiny_weights, batch_size=3)
    return {"catalog": cat, "out": out, "report": report, "weights": tiny_weights}


def test_tables_are_written_in_catalog_order(first_run: dict) -> None:
    report, out = first_run["report"], first_run["out"]
    ids = read_catalog(first_run["catalog"]).column("image_id").to_pylist()
    expected = {
        "tiny-dreamsim_clip_vitb32:dreamsim",
        "tiny-dreamsim_clip_vitb32:none",
        "tiny-test_vit:none",
        "tiny-test_vit:glocal",
        "tiny-clip:none",
    }
    assert set(report.written) == expected and set(list_tables(out)) == expected
    for tid, path in report.written.items():
        t = read_embedding_table(path)
        assert t.table_id == tid
        assert t.image_ids.tolist() == ids
        assert t.vectors.shape == (len(ids), DIMS[t.backbone]) and np.isfinite(t.vectors).all()


def test_provenance_records_weights_preprocessing_and_versions(first_run: dict) -> None:
    t = read_embedding_table(first_run["out"] / "tiny-dreamsim_clip_vitb32__dreamsim.parquet")
    p = t.provenance
    assert p["encoder"] == "tiny-dreamsim_clip_vitb32:dreamsim" and p["alignment"] == "dreamsim"
    assert p["dim"] == 16 and p["normalized"] is False and p["skipped_images"] == []
    ckpt = first_run["weights"] / "tiny-dreamsim" / "clip_vitb32_pretrain.pth.tar"
    assert p["weights"]["clip_vitb32"] == {"file": str(ckpt), "sha256": sha256_file(ckpt)}
    assert p["weights_sha256"]["lora_weights"] == sha256_file(
        first_run["weights"] / "tiny-dreamsim" / "clip_vitb32_single_lora" / "adapter_model.safetensors"
    )
    assert "Resize((224, 224), bicubic) [squash" in p["preprocessing"]
    assert {"torch", "dreamsim", "peft"} <= set(p["libraries"]) and len(p["fingerprint"]) == 64
    g = read_embedding_table(first_run["out"] / "tiny-test_vit__glocal.parquet").provenance
    assert "glocal_transform" in g["weights"] and "CenterCrop(160)" in g["preprocessing"]
    n = read_embedding_table(first_run["out"] / "tiny-test_vit__none.parquet").provenance
    assert "glocal_transform" not in n["weights"]


def test_aligned_differs_from_base(first_run: dict) -> None:
    a = read_embedding_table(first_run["out"] / "tiny-dreamsim_clip_vitb32__dreamsim.parquet").vectors
    b = read_embedding_table(first_run["out"] / "tiny-dreamsim_clip_vitb32__none.parquet").vectors
    assert not np.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("backbone", sorted(DIMS))
def test_ray_tables_equal_the_in_process_path(first_run: dict, backbone: str) -> None:
    cat = read_catalog(first_run["catalog"])
    files = [first_run["catalog"].parent / p for p in cat.column("path").to_pylist()]
    local = embed_images_local(backbone, files, weights=first_run["weights"])
    for alignment, v in local.items():
        t = read_embedding_table(first_run["out"] / f"{backbone}__{alignment}.parquet")
        assert np.allclose(t.vectors, v, atol=1e-5), (backbone, alignment)


def test_resume_skips_complete_tables_and_recomputes_changed_ones(first_run: dict, tmp_path: Path) -> None:
    again = embed_catalog(first_run["catalog"], TINY, first_run["out"], weights=first_run["weights"])
    assert again.written == {} and len(again.up_to_date) == 5
    # a new gLocal transform changes only the glocal table's provenance
    weights = tmp_path / "w"
    shutil.copytree(first_run["weights"], weights)
    out = tmp_path / "tables"
    shutil.copytree(first_run["out"], out)
    before = read_embedding_table(out / "tiny-test_vit__glocal.parquet")
    t = np.load(weights / "glocal" / "tiny-test_vit" / "transform.npz")
    np.savez(weights / "glocal" / "tiny-test_vit" / "transform.npz", weights=t["weights"] * 2, bias=t["bias"])
    third = embed_catalog(first_run["catalog"], "tiny-test_vit", out, weights=weights)
    assert set(third.written) == {"tiny-test_vit:glocal"} and set(third.up_to_date) == {"tiny-test_vit:none"}
    after = read_embedding_table(out / "tiny-test_vit__glocal.parquet")
    assert after.provenance["fingerprint"] != before.provenance["fingerprint"]
    assert not np.allclose(after.vectors, before.vectors)
    # a changed image changes every table of the run (never mixed with the old vectors)
    cat = first_run["catalog"]
    moved = tmp_path / "cat"
    shutil.copytree(cat.parent / "imgs", moved / "imgs")
    shutil.copy(cat, moved / "images.parquet")
    from PIL import Image, ImageOps

    src = moved / "imgs" / "noise0.png"
    ImageOps.mirror(Image.open(src)).save(src)
    fourth = embed_catalog(moved / "images.parquet", "tiny-clip:none", out, weights=weights)
    assert set(fourth.written) == {"tiny-clip:none"}
    assert read_embedding_table(out / "tiny-clip__none.parquet").provenance["catalog"] == str(
        moved / "images.parquet"
    )


def test_corrupt_image_fails_with_its_path_or_is_skipped_and_reported(
    ray_session: object, tiny_weights: Path, tmp_path: Path
) -> None:
    cat = make_catalog(
        tmp_path, n_synthetic=1, extra={"broken.jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg"}
    )
    with pytest.raises(
        BrainalignError, match=r"broken\.jpg \(image_id img04\): (OSError|UnidentifiedImageError)"
    ):
        embed_catalog(cat, "tiny-clip:none", tmp_path / "t", weights=tiny_weights)
    assert not (tmp_path / "t" / "tiny-clip__none.parquet").exists()
    report = embed_catalog(cat, "tiny-clip:none", tmp_path / "t", weights=tiny_weights, skip_bad_images=True)
    assert [b["path"] for b in report.bad_images] == [str(tmp_path / "imgs" / "broken.jpg")]
    t = read_embedding_table(tmp_path / "t" / "tiny-clip__none.parquet")
    assert "img04" not in t.image_ids.tolist() and len(t.image_ids) == 4
    assert t.provenance["skipped_images"][0]["image_id"] == "img04"
    assert t.provenance["skip_bad_images"] is True
    # resuming without the flag does not silently accept the table that skipped an image
    with pytest.raises(BrainalignError, match="broken.jpg"):
        embed_catalog(cat, "tiny-clip:none", tmp_path / "t", weights=tiny_weights)


def test_missing_image_fails_before_compute(tiny_weights: Path, tmp_path: Path) -> None:
    import brainalign.images.pipeline as pipeline

    cat = make_catalog(tmp_path, n_synthetic=0)
    (tmp_path / "imgs" / "logo2.png").unlink()
    connected: list[bool] = []  # the pipeline's own hook for "compute starts now"
    with pytest.raises(
        BrainalignError, match=r"1 image\(s\) are missing:\n  .*imgs/logo2.png \(image_id img02\)"
    ):
        pipeline.embed_catalog(cat, "tiny-clip:none", tmp_path / "t", weights=tiny_weights,
                               connect=lambda: connected.append(True))
    assert not connected and not list(tmp_path.glob("t/*.parquet"))


def test_catalog_without_paths_says_how_to_get_images(
    tiny_weights: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(BrainalignError, match="render-simulated"):
        embed_catalog(tiny_dataset, "tiny-clip:none", tmp_path / "t", weights=tiny_weights)
