"""The real DreamSim code path (dreamsim() -> LoRA -> embed -> disable_adapter) on a tiny ViT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from brainalign.images import image_encoder_info
from brainalign.images._registry import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from brainalign.images.dreamsim_models import _patched_loading, build_dreamsim
from brainalign.images.testing import TINY_DREAMSIM_PROJ, tiny_clip_as_dino
from brainalign.images.weights import resolve_weight_files


@pytest.fixture(scope="module")
def runner_and_x(tiny_weights: Path) -> tuple[object, torch.Tensor]:
    spec, _ = image_encoder_info("tiny-dreamsim_clip_vitb32:dreamsim")
    files = resolve_weight_files({spec: ("dreamsim", "none")}, tiny_weights)[spec]
    runner = build_dreamsim(spec, ("dreamsim", "none"), files, "cpu")
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return runner, x


def test_aligned_and_base_differ_with_right_dims(runner_and_x: tuple) -> None:
    runner, x = runner_and_x
    out = runner.embed(x)
    assert out["dreamsim"].shape == out["none"].shape == (3, TINY_DREAMSIM_PROJ)
    assert torch.isfinite(out["dreamsim"]).all() and torch.isfinite(out["none"]).all()
    assert not torch.allclose(out["dreamsim"], out["none"], atol=1e-3)
    one = runner.embed(x[:1])  # dreamsim squeezes features: batch size 1 must keep its axis
    assert one["none"].shape == (1, TINY_DREAMSIM_PROJ)
    assert torch.allclose(one["none"], out["none"][:1], atol=1e-5)


def test_base_is_the_backbone_without_adapter(runner_and_x: tuple, tiny_weights: Path) -> None:
    runner, x = runner_and_x
    vit, proj = tiny_clip_as_dino(32, str(tiny_weights / "tiny-dreamsim"))
    xn = (x - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        ref = vit.eval()(xn) @ proj
    assert torch.allclose(runner.embed(x)["none"], ref, atol=1e-5)


def test_base_equals_alignvis_baseline_route(runner_and_x: tuple, tiny_weights: Path) -> None:
    """AlignVis's *_noalign: PerceptualModel(baseline=True, normalize_embeds=False)."""
    from dreamsim.config import dreamsim_args
    from dreamsim.model import PerceptualModel

    runner, x = runner_and_x
    spec, _ = image_encoder_info("tiny-dreamsim_clip_vitb32:none")
    with _patched_loading(spec.options["loaders"]):
        pm = PerceptualModel(
            **dreamsim_args["model_config"]["clip_vitb32"],
            device="cpu",
            load_dir=str(tiny_weights / "tiny-dreamsim"),
            normalize_embeds=False,
            baseline=True,
        )
    with torch.no_grad():
        ref = pm.eval().embed(x)
    assert torch.allclose(runner.embed(x)["none"], ref, atol=1e-5)


def test_adapter_is_the_saved_lora_on_qkv(runner_and_x: tuple) -> None:
    runner, _ = runner_and_x
    names = [n for n, _ in runner.model.named_parameters() if "lora_B" in n]
    assert names and all("qkv" in n for n in names)
    assert any(p.abs().sum() > 0 for n, p in runner.model.named_parameters() if "lora_B" in n)
