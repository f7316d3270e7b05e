"""Plain self-supervised ViTs from ``timm`` (no human alignment): DINO and DINOv2.

The table vector is timm's pooled pre-logits with ``num_classes=0``: the CLS token after the
final LayerNorm (768-d for ViT-B). This is **not** DreamSim's DINO feature (CLS of block 11
before the final norm), so ``dino_vitb16:none`` and ``dreamsim_dino_vitb16:none`` differ.
Preprocessing is timm's eval transform from the weights' pretrained config: RGB, shorter side
to ``floor(224 / crop_pct)`` (bicubic), ``CenterCrop(224)``, ImageNet mean/std. DINOv2 runs
at 224 px (timm's default is 518; the position embedding is resampled at load).

Weights: ``model.safetensors`` (or ``pytorch_model.bin``) of the Hugging Face repository
``timm/<arch>.<tag>``, at ``<weights>/timm/<arch>.<tag>/`` or in a copied HF cache at
``<weights>/huggingface/hub/``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._base import FeatureRunner, checkpoint_file, make_feature_runner
from ._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    OutputSpec,
    Preprocess,
    register_family,
    register_model,
)
from .glocal import glocal_output
from .weights import offline_loading

__all__ = ["build_timm", "timm_spec"]

log = logging.getLogger(__name__)

_FEATURE = "timm pooled pre-logits (num_classes=0): CLS token after the final LayerNorm"


def timm_spec(
    backbone: str,
    *,
    name: str,
    dim: int,
    description: str,
    preprocess: Preprocess,
    model_kwargs: Mapping[str, Any] | None = None,
    glocal: bool = True,
    feature: str = _FEATURE,
) -> ModelSpec:
    """A timm model with its ``none`` (and ``glocal``) outputs.

    Parameters
    ----------
    name : str
        timm ``arch.tag`` (``"vit_base_patch16_224.dino"``); the checkpoint comes from the
        Hugging Face repository ``timm/<name>``.
    model_kwargs : mapping, optional
        Extra ``timm.create_model`` kwargs (e.g. ``{"img_size": 224}``).
    """
    outputs = [OutputSpec("none", dim, feature)]
    if glocal:
        outputs.append(glocal_output(backbone, dim, feature))
    return ModelSpec(
        backbone=backbone,
        family="timm",
        description=description,
        preprocess=preprocess,
        weights=(
            checkpoint_file(
                "checkpoint",
                f"timm/{name}",
                f"timm/{name}",
                ("model.safetensors", "pytorch_model.bin"),
                f"timm {name} weights",
            ),
        ),
        outputs=tuple(outputs),
        options={"name": name, "model_kwargs": dict(model_kwargs or {})},
    )


def build_timm(
    spec: ModelSpec, alignments: tuple[str, ...], files: Mapping[str, Path], device: str
) -> FeatureRunner:
    """``timm.create_model(name, pretrained=True, num_classes=0)`` from the local checkpoint."""
    with offline_loading():
        import timm

        model = timm.create_model(
            spec.options["name"],
            pretrained=True,
            num_classes=0,
            pretrained_cfg_overlay={"file": str(files["checkpoint"])},
            **spec.options.get("model_kwargs", {}),
        )
    model = model.to(device).eval().requires_grad_(False)
    log.info("Loaded timm %s (%s) on %s", spec.options["name"], files["checkpoint"], device)
    return make_feature_runner(model, alignments, files)


register_family("timm", "brainalign.images.timm_models:build_timm")
register_model(
    timm_spec(
        "dino_vitb16",
        name="vit_base_patch16_224.dino",
        dim=768,
        description="DINO ViT-B/16 (ImageNet-1k, self-supervised), timm",
        preprocess=Preprocess(224, "shorter_crop", 0.9, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    )
)
register_model(
    timm_spec(
        "dinov2_vitb14",
        name="vit_base_patch14_dinov2.lvd142m",
        dim=768,
        description="DINOv2 ViT-B/14 (LVD-142M, self-supervised), timm, run at 224 px",
        preprocess=Preprocess(224, "shorter_crop", 1.0, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
        model_kwargs={"img_size": 224},
    )
)
