"""Fixtures for the image side: tiny weights in the real layouts, and small image catalogs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights directory with the tiny DreamSim / timm / open_clip models; registers them."""
    from brainalign.images.testing import register_tiny_encoders, write_tiny_weights

    root = write_tiny_weights(tmp_path_factory.mktemp("weights"))
    register_tiny_encoders()
    return root


def sample_dir() -> Path:
    """matplotlib's bundled sample images (a photo, a product photo, a logo)."""
    import matplotlib.cbook as cb

    return Path(os.path.dirname(cb.get_sample_data("grace_hopper.jpg", asfileobj=False)))


def make_catalog(root: Path, n_synthetic: int = 2, extra: dict[str, bytes] | None = None) -> Path:
    """``root/images.parquet`` over 3 sample photos + ``n_synthetic`` random images (+ raw files)."""
    from PIL import Image

    from brainalign.data.contract import write_catalog

    img = root / "imgs"
    img.mkdir(parents=True, exist_ok=True)
    names = ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"]
    for n in names:
        shutil.copy(sample_dir() / n, img / n)
    rng = np.random.default_rng(0)
    for k in range(n_synthetic):
        arr = rng.integers(0, 255, (90 + 10 * k, 120, 3), dtype=np.uint8)
        Image.fromarray(arr).save(img / f"noise{k}.png")
        names.append(f"noise{k}.png")
    for n, data in (extra or {}).items():
        (img / n).write_bytes(data)
        names.append(n)
    ids = [f"img{k:02d}" for k in range(len(names))]
    write_catalog(
        root / "images.parquet",
        ids,
        [f"c{k}" for k in range(len(names))],
        ["train"] * (len(names) - 1) + ["test"],
        [f"imgs/{n}" for n in names],
    )
    return root / "images.parquet"
