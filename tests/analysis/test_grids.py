"""Top-5 image grids: query selection, image sources (catalog paths, rendered simulations), drawing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brainalign._checks import BrainalignError
from brainalign.analysis.grids import ImageSource, Retrieval, _read_rankings, draw_grid, select_queries


def _ret(ranks: dict[str, int]) -> dict[str, Retrieval]:
    return {q: Retrieval(r, (q, "te00009", "te00008"), (0.5, 0.4, 0.3)) for q, r in ranks.items()}


def test_query_selection() -> None:
    a = _ret({"te00001": 1, "te00002": 50, "te00003": 3, "te00004": 7})
    b = _ret({"te00001": 40, "te00002": 2, "te00003": 3, "te00004": 9})
    assert select_queries(a, b, mode="disagree", n=2) == ["te00001", "te00002"]  # |log 1 - log 40| > |log 50 - log 2|
    r1 = select_queries(a, b, mode="random", n=2, seed=3)
    assert r1 == select_queries(a, b, mode="random", n=2, seed=3) and len(set(r1)) == 2
    assert select_queries(a, b, given=["te00004"]) == ["te00004"]
    with pytest.raises(BrainalignError, match="not test images of both runs"):
        select_queries(a, b, given=["tr00001_01"])
    with pytest.raises(BrainalignError, match="share no test queries"):
        select_queries(a, _ret({"x": 1}))


def test_rankings_csv_is_read_per_subject() -> None:
    text = ("subject,image_id,rank,top5,top5_scores\n01,te00001,2,te00003;te00001,0.5;0.4\n"
            "02,te00001,1,te00001;te00003,0.6;0.1\n")
    got = _read_rankings(text, "02")
    assert got == {"te00001": Retrieval(1, ("te00001", "te00003"), (0.6, 0.1))}
    assert _read_rankings("subject,image_id,rank,top5\n01,te00001,2,a;b\n", "01") is None  # older CSV: recompute


def test_simulated_images_are_rendered(tiny_dataset: Path, tmp_path: Path) -> None:
    src = ImageSource(tiny_dataset)
    assert src.path("te00001") is None  # no file: rendered from the latents
    img = src.load("te00001", size=32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 0
    with pytest.raises(BrainalignError, match="not in the catalog"):
        src.path("nope")
    a = _ret({"te00001": 1, "te00002": 4})
    out = draw_grid(["te00001", "te00002"], a, a, src, tmp_path / "g.png", labels=("HA", "base"), title="t")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_missing_image_file_names_the_path(tmp_path: Path) -> None:
    from brainalign.data.contract import CATALOG, read_catalog, write_catalog
    from brainalign.testing import write_toy_dataset

    root = write_toy_dataset(tmp_path / "toy", n_train_concepts=2, images_per_concept=1, n_test=2)
    cat = read_catalog(root / CATALOG)
    ids = cat.column("image_id").to_pylist()
    write_catalog(root / CATALOG, ids, cat.column("concept").to_pylist(), cat.column("split").to_pylist(),
                  [f"imgs/{i}.png" for i in ids])
    with pytest.raises(BrainalignError, match=r"imgs/te000.png .*does not exist.*--images-root"):
        ImageSource(root).load("te000")
