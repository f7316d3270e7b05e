"""The image-encoder registry: names, dims, weights listing, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from brainalign._checks import BrainalignError
from brainalign.data.contract import table_filename
from brainalign.images import (
    describe_layout,
    image_encoder_info,
    list_image_encoders,
    list_model_specs,
    resolve_encoders,
)

PAPER_DREAMSIM = {
    "ensemble": 1792,
    "clip_vitb32": 512,
    "open_clip_vitb32": 512,
    "dino_vitb16": 768,
    "dinov2_vitb14": 768,
    "synclr_vitb16": 768,
}
PLAIN = {
    "clip_vitb32.openai": 512,
    "clip_vitb16.openai": 512,
    "open_clip_vitb32.laion400m_e31": 512,
    "open_clip_vitb16.laion400m_e31": 512,
    "dino_vitb16": 768,
    "dinov2_vitb14": 768,
}


@pytest.mark.parametrize("dtype", sorted(PAPER_DREAMSIM))
def test_paper_dreamsim_pairs_share_one_model(dtype: str) -> None:
    aligned, a = image_encoder_info(f"dreamsim_{dtype}:dreamsim")
    base, b = image_encoder_info(f"dreamsim_{dtype}:none")
    assert aligned is base and (a, b) == ("dreamsim", "none")
    assert aligned.output("dreamsim").dim == aligned.output("none").dim == PAPER_DREAMSIM[dtype]
    assert aligned.preprocess.resize == "squash" and aligned.preprocess.size == 224
    assert aligned.options["normalize_embeds"] is False


@pytest.mark.parametrize("backbone", sorted(PLAIN))
def test_plain_backbones_have_base_and_glocal(backbone: str) -> None:
    spec, _ = image_encoder_info(f"{backbone}:none")
    assert {o.alignment for o in spec.outputs} == {"none", "glocal"}
    assert spec.output("none").dim == PLAIN[backbone]
    assert spec.preprocess.resize == "shorter_crop" and spec.preprocess.mean is not None
    roles = {w.role for w in spec.weight_files(["glocal"])}
    assert "glocal_transform" in roles and "glocal_transform" not in {
        w.role for w in spec.weight_files(["none"])
    }


def test_efficientnet_is_registered_with_wheel_fallback() -> None:
    spec, a = image_encoder_info("efficientnet_lite0:none")
    assert a == "none" and spec.output("none").dim == 1280
    assert spec.weights[0].package


@pytest.mark.parametrize("table_id", list_image_encoders())
def test_every_table_id_is_a_contract_name(table_id: str) -> None:
    backbone, alignment = table_id.split(":")
    assert table_filename(backbone, alignment).endswith(".parquet")
    spec, _ = image_encoder_info(table_id)
    assert spec.weight_files([alignment]), "every model needs weight files"
    assert "Resize" in spec.preprocess.describe()


def test_no_harmonization_encoder() -> None:
    # Harmonization models exist only as TF/Keras checkpoints: not loadable offline in PyTorch.
    assert not [s for s in list_model_specs() for o in s.outputs if o.alignment == "harmonization"]


def test_unknown_encoder_suggests_closest() -> None:
    with pytest.raises(BrainalignError, match="Did you mean 'dreamsim_clip_vitb32:none'"):
        resolve_encoders("dreamsim_clip_vitb32:nne")
    with pytest.raises(BrainalignError, match="Did you mean 'dreamsim_clip_vitb32"):
        resolve_encoders(["dreamsim_clip_vitb23"])
    with pytest.raises(BrainalignError, match="No image encoder"):
        resolve_encoders(" , ")


def test_backbone_name_selects_all_its_tables_once() -> None:
    req = resolve_encoders("dreamsim_ensemble,dreamsim_ensemble:none, efficientnet_lite0:none")
    assert [(s.backbone, a) for s, a in req.items()] == [
        ("dreamsim_ensemble", ("dreamsim", "none")),
        ("efficientnet_lite0", ("none",)),
    ]


def test_layout_text_names_every_file() -> None:
    text = describe_layout(resolve_encoders("dreamsim_dinov2_vitb14,dino_vitb16:none"))
    for f in (
        "dreamsim/dinov2_vitb14_single_lora/adapter_config.json",
        "dreamsim/checkpoints/dinov2_vitb14_pretrain.pth",
        "dreamsim/facebookresearch_dinov2_main/hubconf.py",
        "timm/vit_base_patch16_224.dino/model.safetensors",
        "huggingface/hub/models--timm--vit_base_patch16_224.dino/snapshots/*/model.safetensors",
    ):
        assert f in text


def test_importing_the_registry_loads_no_model_library() -> None:
    code = (
        "import sys, brainalign.images as b; b.list_image_encoders(); "
        "print(sorted(m for m in ('dreamsim', 'ray', 'open_clip', 'timm', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_list_shows_every_encoder(capsys: pytest.CaptureFixture[str]) -> None:
    from brainalign.cli import main

    assert main(["embed", "--list"]) == 0
    out = capsys.readouterr().out
    for tid in list_image_encoders():
        assert tid in out
    assert "dreamsim/clip_vitb32_single_lora/adapter_config.json" in out
    assert "1792" in out and "squash" in out
