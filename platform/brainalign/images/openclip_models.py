"""Plain CLIP / OpenCLIP image towers from ``open_clip`` (no human alignment).

The table vector is ``model.encode_image(x, normalize=False)`` = ``visual(x)``: the CLS token
after ``ln_post``, projected (512-d for ViT-B). Preprocessing is open_clip's own eval
transform: RGB, ``Resize(224, bicubic)`` on the shorter side, ``CenterCrop(224)``,
``Normalize`` with the OpenAI-CLIP mean/std. That differs from DreamSim's squash resize, so
``clip_vitb32.openai:none`` and ``dreamsim_clip_vitb32:none`` are different tables.

QuickGELU: OpenAI's weights and the B/32 LAION-400M weights were trained with QuickGELU.
A checkpoint given as a file carries no tag config, so the architecture names below carry
``-quickgelu`` where the weights need it (dependencies.md 2).

Weights: ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``) from the
Hugging Face repository named in each spec, at
``<weights>/open_clip/<arch>.<tag>/`` or inside a copied HF cache at
``<weights>/huggingface/hub/``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ._base import FeatureRunner, checkpoint_file, make_feature_runner
from ._registry import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ModelSpec,
    OutputSpec,
    Preprocess,
    WeightFile,
    register_family,
    register_model,
)
from .glocal import glocal_output
from .weights import offline_loading

__all__ = ["OPEN_CLIP_PREPROCESS", "build_open_clip", "open_clip_spec"]

log = logging.getLogger(__name__)

OPEN_CLIP_PREPROCESS = Preprocess(
    size=224,
    resize="shorter_crop",
    crop_pct=1.0,
    interpolation="bicubic",
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
)
_FEATURE = "open_clip encode_image(normalize=False): ln_post(CLS) @ proj"


def open_clip_spec(
    backbone: str,
    *,
    arch: str,
    tag: str,
    hf_repo: str,
    dim: int,
    description: str,
    preprocess: Preprocess = OPEN_CLIP_PREPROCESS,
    config: WeightFile | None = None,
    glocal: bool = True,
) -> ModelSpec:
    """A plain open_clip image tower with its ``none`` (and ``glocal``) outputs.

    Parameters
    ----------
    arch : str
        open_clip model name (``"ViT-B-32-quickgelu"``), or the stem of ``config``.
    tag : str
        Pretraining tag, used in the plain-file directory name ``open_clip/<arch>.<tag>/``.
    hf_repo : str
        Hugging Face repository holding the checkpoint.
    config : WeightFile, optional
        A JSON model config registered with ``open_clip.add_model_config`` before building
        (custom architectures; the tests' tiny CLIP).
    """
    files = [
        checkpoint_file(
            "checkpoint",
            f"open_clip/{arch}.{tag}",
            hf_repo,
            ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
            f"open_clip {arch} weights '{tag}'",
        )
    ]
    if config is not None:
        files.append(config)
    outputs = [OutputSpec("none", dim, _FEATURE)]
    if glocal:
        outputs.append(glocal_output(backbone, dim, _FEATURE))
    return ModelSpec(
        backbone=backbone,
        family="open_clip",
        description=description,
        preprocess=preprocess,
        weights=tuple(files),
        outputs=tuple(outputs),
        options={"arch": arch, "tag": tag},
    )


def build_open_clip(
    spec: ModelSpec, alignments: tuple[str, ...], files: Mapping[str, Path], device: str
) -> FeatureRunner:
    """Build the open_clip model from its local checkpoint and keep only the image tower."""
    with offline_loading():
        import open_clip

        if "config" in files:
            open_clip.add_model_config(str(files["config"]))
        model = open_clip.create_model(
            spec.options["arch"], pretrained=str(files["checkpoint"]), device=device, require_pretrained=True
        )
    visual = model.visual.eval().requires_grad_(False)
    del model  # the text tower is not needed
    log.info("Loaded open_clip %s (%s) on %s", spec.options["arch"], files["checkpoint"], device)
    return make_feature_runner(visual, alignments, files)


register_family("open_clip", "brainalign.images.openclip_models:build_open_clip")
for _spec in (
    open_clip_spec(
        "clip_vitb32.openai",
        arch="ViT-B-32-quickgelu",
        tag="openai",
        hf_repo="timm/vit_base_patch32_clip_224.openai",
        dim=512,
        description="OpenAI CLIP ViT-B/32 (WIT-400M), open_clip, QuickGELU",
    ),
    open_clip_spec(
        "clip_vitb16.openai",
        arch="ViT-B-16-quickgelu",
        tag="openai",
        hf_repo="timm/vit_base_patch16_clip_224.openai",
        dim=512,
        description="OpenAI CLIP ViT-B/16 (WIT-400M), open_clip, QuickGELU",
    ),
    open_clip_spec(
        "open_clip_vitb32.laion400m_e31",
        arch="ViT-B-32-quickgelu",
        tag="laion400m_e31",
        hf_repo="timm/vit_base_patch32_clip_224.laion400m_e31",
        dim=512,
        description="OpenCLIP ViT-B/32 LAION-400M epoch 31 (DreamSim's OpenCLIP B/32), QuickGELU",
    ),
    open_clip_spec(
        "open_clip_vitb16.laion400m_e31",
        arch="ViT-B-16",
        tag="laion400m_e31",
        hf_repo="timm/vit_base_patch16_clip_224.laion400m_e31",
        dim=512,
        description="OpenCLIP ViT-B/16 LAION-400M epoch 31 (DreamSim ensemble's OpenCLIP), GELU",
    ),
):
    register_model(_spec)
