"""Rendering simulated images from the simulator's perceptual factors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from brainalign._checks import BrainalignError
from brainalign.data.contract import read_catalog, write_catalog
from brainalign.images import render_images
from brainalign.images.render import render_image


def fake_sim_root(root: Path, n: int = 8, drop: int = 0) -> Path:
    """A dataset-like root with images.parquet and simulator/latents.parquet written here."""
    rng = np.random.default_rng(0)
    ids = [f"tr{k:05d}_01" for k in range(n)]
    write_catalog(root / "images.parquet", ids, [f"c{k}" for k in range(n)], ["train"] * n)
    (root / "simulator").mkdir(parents=True)
    keep = ids[: n - drop]
    pq.write_table(
        pa.table(
            {
                "image_id": keep,
                "hue": rng.random(len(keep)),
                "saturation": rng.uniform(0.1, 1, len(keep)),
                "brightness": rng.uniform(0.2, 1, len(keep)),
                "shape": np.arange(len(keep)) % 8,
                "orientation": rng.uniform(0, np.pi, len(keep)),
                "size": rng.uniform(0.25, 0.9, len(keep)),
                "spatial_freq": np.exp2(rng.uniform(1, 4, len(keep))),
            }
        ),
        root / "simulator" / "latents.parquet",
    )
    return root


def test_render_writes_pngs_and_catalog(tmp_path: Path) -> None:
    root = fake_sim_root(tmp_path / "ds")
    cat = render_images(root, tmp_path / "r", size=32)
    tbl = read_catalog(cat)
    assert tbl.column("image_id").to_pylist() == [f"tr{k:05d}_01" for k in range(8)]
    assert tbl.column("concept").to_pylist()[0] == "c0" and set(tbl.column("split").to_pylist()) == {"train"}
    arrays = []
    for rel in tbl.column("path").to_pylist():
        with Image.open(cat.parent / rel) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
            arrays.append(np.asarray(im))
    # eight shape classes give eight different pictures
    assert len({a.tobytes() for a in arrays}) == 8
    # deterministic: rendering again gives the same bytes
    first = (cat.parent / "images" / "tr00000_01.png").read_bytes()
    render_images(root, tmp_path / "r", size=32)
    assert (cat.parent / "images" / "tr00000_01.png").read_bytes() == first


def test_factors_are_visible() -> None:
    base = dict(hue=0.0, saturation=1.0, brightness=1.0, shape=1, orientation=0.3, size=0.8, spatial_freq=2.0)
    red = render_image(**base, side=48).astype(float)
    centre = red[16:32, 16:32].reshape(-1, 3).mean(0)
    assert centre[0] > 2 * centre[1] and centre[0] > 2 * centre[2]
    small = render_image(**{**base, "size": 0.3}, side=48)
    grey = np.all(small == 128, axis=-1).mean()
    assert grey > np.all(red == 128, axis=-1).mean()  # a smaller shape leaves more background
    turned = render_image(**{**base, "orientation": 1.2}, side=48)
    assert not np.array_equal(turned, red.astype(np.uint8))
    fine = render_image(**{**base, "spatial_freq": 12.0}, side=48).astype(float)
    # more cycles -> more pixel-to-pixel change inside the shape
    assert (
        np.abs(np.diff(fine[20:28, 20:28], axis=1)).mean() > np.abs(np.diff(red[20:28, 20:28], axis=1)).mean()
    )
    with pytest.raises(BrainalignError, match="shape must be an index"):
        render_image(**{**base, "shape": 9})


def test_render_needs_latents_for_every_catalog_image(tmp_path: Path) -> None:
    root = fake_sim_root(tmp_path / "ds", drop=2)
    with pytest.raises(BrainalignError, match="no factors for 2 catalog image"):
        render_images(root, tmp_path / "r")
    with pytest.raises(BrainalignError, match="not a simulated dataset"):
        render_images(tmp_path / "elsewhere", tmp_path / "r2")


def test_render_real_simulated_dataset(tiny_dataset: Path, tmp_path: Path) -> None:
    from brainalign.data.contract import open_dataset

    cat = render_images(tiny_dataset, tmp_path / "r", size=24)
    ds = open_dataset(tiny_dataset)
    assert read_catalog(cat).column("image_id").to_pylist() == ds.image_ids()
    assert len(list((tmp_path / "r" / "images").glob("*.png"))) == len(ds.image_ids())


def test_default_render_dir_is_outside_the_dataset(tiny_dataset: Path) -> None:
    from brainalign.images.render import default_render_dir

    d = default_render_dir(tiny_dataset)
    assert tiny_dataset.resolve() not in d.resolve().parents
    assert d.name.startswith("things-eeg2-sim-")
