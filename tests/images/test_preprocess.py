"""Our decode + preprocessing gives exactly the tensors of each model's own library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainalign.images import image_encoder_info
from brainalign.images.pipeline import decode_batch, to_model_input


@pytest.fixture
def odd_image(tmp_path: Path) -> Path:
    """A non-square image with structure, so crop vs squash and interpolation matter."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:180, 0:301]
    arr = np.stack([(x * 255 / 300), (y * 255 / 179), rng.integers(0, 255, x.shape)], -1).astype(np.uint8)
    p = tmp_path / "odd.png"
    Image.fromarray(arr).save(p)
    return p


def ours(table_id: str, path: Path) -> torch.Tensor:
    spec, _ = image_encoder_info(table_id)
    batch = decode_batch({"image_id": np.array(["a"]), "path": np.array([str(path)])}, spec.preprocess)
    assert batch["error"][0] == ""
    return to_model_input(batch["pixels"], spec.preprocess, "cpu")


@pytest.mark.parametrize("table_id", ["clip_vitb32.openai:none", "open_clip_vitb16.laion400m_e31:none"])
def test_open_clip_eval_transform(table_id: str, odd_image: Path) -> None:
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(
        "ViT-B-32" if "vitb32" in table_id else "ViT-B-16", table_id.split(".")[1].split(":")[0]
    )
    ref = open_clip.image_transform(
        224,
        is_train=False,
        mean=pcfg["mean"],
        std=pcfg["std"],
        interpolation=pcfg["interpolation"],
        resize_mode=pcfg["resize_mode"],
    )
    expected = ref(Image.open(odd_image)).unsqueeze(0)
    assert torch.allclose(ours(table_id, odd_image), expected, atol=1e-6)


@pytest.mark.parametrize(
    "table_id,name",
    [
        ("dino_vitb16:none", "vit_base_patch16_224.dino"),
        ("dinov2_vitb14:none", "vit_base_patch14_dinov2.lvd142m"),
    ],
)
def test_timm_eval_transform(table_id: str, name: str, odd_image: Path) -> None:
    import timm
    from timm.data import create_transform

    cfg = timm.models.get_pretrained_cfg(name)
    spec, _ = image_encoder_info(table_id)
    assert (spec.preprocess.mean, spec.preprocess.std) == (tuple(cfg.mean), tuple(cfg.std))
    assert spec.preprocess.interpolation == cfg.interpolation
    crop = cfg.crop_pct if cfg.input_size[-1] == 224 else 1.0  # DINOv2 runs at 224 instead of 518
    assert spec.preprocess.crop_pct == crop
    ref = create_transform(
        input_size=(3, 224, 224), interpolation=cfg.interpolation, crop_pct=crop, mean=cfg.mean, std=cfg.std
    )
    expected = ref(Image.open(odd_image).convert("RGB")).unsqueeze(0)
    assert torch.allclose(ours(table_id, odd_image), expected, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_dreamsim_preprocess(tiny_weights: Path, odd_image: Path) -> None:
    """The real dreamsim() preprocess (squash to 224, [0,1], no Normalize) == ours."""
    from dreamsim import dreamsim

    from brainalign.images.dreamsim_models import _patched_loading
    from brainalign.images.weights import offline_loading

    spec, _ = image_encoder_info("tiny-dreamsim_clip_vitb32:none")
    with offline_loading(), _patched_loading(spec.options["loaders"]):
        _, preprocess = dreamsim(
            pretrained=True,
            device="cpu",
            cache_dir=str(tiny_weights / "tiny-dreamsim"),
            normalize_embeds=False,
            dreamsim_type="clip_vitb32",
        )
    expected = preprocess(Image.open(odd_image))
    assert torch.allclose(ours("dreamsim_clip_vitb32:none", odd_image), expected, atol=1e-6)


def test_efficientnet_preprocess_is_tf_lite_eval(odd_image: Path) -> None:
    from torchvision import transforms as T

    ref = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize([127 / 255] * 3, [128 / 255] * 3),
        ]
    )
    expected = ref(Image.open(odd_image).convert("RGB")).unsqueeze(0)
    assert torch.allclose(ours("efficientnet_lite0:none", odd_image), expected, atol=1e-6)


def test_decode_reports_bad_files(tmp_path: Path, odd_image: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(odd_image.read_bytes()[:200])
    spec, _ = image_encoder_info("efficientnet_lite0:none")
    out = decode_batch(
        {"image_id": np.array(["a", "b", "c"]), "path": np.array([str(odd_image), str(bad), str(trunc)])},
        spec.preprocess,
    )
    assert out["error"][0] == ""
    assert "UnidentifiedImageError" in out["error"][1]
    assert out["error"][2] != ""
    assert out["pixels"].shape == (3, 224, 224, 3) and out["pixels"].dtype == np.uint8
