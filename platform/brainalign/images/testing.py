"""Tiny random image encoders that run the real loading code paths (tests, benchmarks).

Nothing here is downloaded. :func:`write_tiny_weights` writes, into a weights directory,
files in exactly the layouts the real models use, but with tiny random networks:

* ``tiny-dreamsim_clip_vitb32``: a DreamSim ``clip_vitb32`` cache (converted backbone
  ``{"state_dict", "kwargs"}`` + a saved LoRA adapter with non-zero ``lora_B``, so aligned !=
  base). The only substitution is DreamSim's backbone loader, replaced by
  :func:`tiny_clip_as_dino`, which reads the same file but builds a 48-d, 12-block ViT
  (dependencies.md 1.6, Pattern B). ``dreamsim()``, LoRA injection, ``PeftModel``
  loading, ``embed`` and ``disable_adapter`` are the real ones.
* ``tiny-test_vit``: timm ``test_vit`` (64-d) from a local ``model.safetensors``, with a
  random gLocal transform for its ``:glocal`` table.
* ``tiny-clip``: an open_clip CLIP from a custom JSON config (``add_model_config``), 32-d.

Call :func:`register_tiny_encoders` to add them to the registry (idempotent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._registry import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ModelSpec,
    Preprocess,
    WeightFile,
    image_encoder_info,
    register_model,
)

__all__ = [
    "TINY_CLIP_CONFIG",
    "TINY_DREAMSIM_VIT",
    "register_tiny_encoders",
    "tiny_clip_as_dino",
    "tiny_specs",
    "write_tiny_weights",
]

#: Architecture of the tiny DreamSim backbone; depth >= 12 because DreamSim hooks block 11.
TINY_DREAMSIM_VIT: dict[str, Any] = {
    "patch_size": 32,
    "embed_dim": 48,
    "depth": 12,
    "num_heads": 3,
    "qkv_bias": True,
}
TINY_DREAMSIM_PROJ = 16
TINY_DREAMSIM_SUB = "tiny-dreamsim"
TINY_CLIP_NAME = "brainalign-tiny-clip"
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}
_LOADER = "brainalign.images.testing:tiny_clip_as_dino"


def tiny_clip_as_dino(patch_size: int, load_dir: str = "./models", l14: bool = False) -> tuple[Any, Any]:
    """Drop-in for ``dreamsim``'s ``load_clip_as_dino`` that builds the file's tiny ViT.

    Reads ``clip_vitb{patch_size}_pretrain.pth.tar`` = ``{"state_dict": ... + "proj",
    "kwargs": VisionTransformer kwargs}`` and applies the same conversions as the real
    loader (LayerNorm as ``pos_drop``, QuickGELU, LayerNorm eps 1e-5).
    """
    import torch
    from dreamsim.feature_extraction.load_clip_as_dino import QuickGELU
    from dreamsim.feature_extraction.vision_transformer import VisionTransformer

    ckpt = torch.load(
        os.path.join(load_dir, f"clip_vitb{patch_size}_pretrain.pth.tar"),
        map_location="cpu",
        weights_only=True,
    )
    vit = VisionTransformer(**ckpt["kwargs"])
    vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)
    state = dict(ckpt["state_dict"])
    proj = state.pop("proj")
    vit.load_state_dict(state)
    for blk in vit.blocks:
        blk.mlp.act = QuickGELU()
    for m in vit.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-5
    return vit, proj


def tiny_specs() -> list[ModelSpec]:
    """The three tiny model specs (not registered)."""
    from .dreamsim_models import dreamsim_spec
    from .openclip_models import open_clip_spec
    from .timm_models import timm_spec

    return [
        dreamsim_spec(
            "clip_vitb32",
            backbone="tiny-dreamsim_clip_vitb32",
            sub=TINY_DREAMSIM_SUB,
            dim=TINY_DREAMSIM_PROJ,
            loaders={"load_clip_as_dino": _LOADER},
        ),
        timm_spec(
            "tiny-test_vit",
            name="test_vit.r160_in1k",
            dim=64,
            description="timm test_vit, random weights",
            preprocess=Preprocess(160, "shorter_crop", 0.95, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ),
        open_clip_spec(
            "tiny-clip",
            arch=TINY_CLIP_NAME,
            tag="random",
            hf_repo="brainalign/tiny-clip",
            dim=32,
            description="tiny open_clip CLIP from a custom config, random weights",
            preprocess=Preprocess(64, "shorter_crop", 1.0, "bicubic", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
            config=WeightFile(
                "config", (f"open_clip/{TINY_CLIP_NAME}.json",), "open_clip model config (JSON)"
            ),
            glocal=False,
        ),
    ]


def register_tiny_encoders() -> list[str]:
    """Register the tiny specs (replacing earlier registrations); returns their table ids."""
    ids = []
    for spec in tiny_specs():
        register_model(spec, replace=True)
        ids += [spec.table_id(o.alignment) for o in spec.outputs]
    image_encoder_info(ids[0])  # sanity: the registry sees them
    return ids


def write_tiny_weights(root: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the tiny models' weight files under ``root`` in the real layouts; returns ``root``."""
    import open_clip
    import peft
    import timm
    import torch
    from dreamsim.feature_extraction.vision_transformer import VisionTransformer
    from safetensors.torch import save_file

    from .dreamsim_models import _patched_loading

    root = Path(root)
    g = torch.Generator().manual_seed(seed)

    # --- DreamSim cache: converted backbone + LoRA adapter
    cache = root / TINY_DREAMSIM_SUB
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vit = VisionTransformer(**TINY_DREAMSIM_VIT)
    vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    state["proj"] = torch.randn(TINY_DREAMSIM_VIT["embed_dim"], TINY_DREAMSIM_PROJ, generator=g) * 0.15
    torch.save({"state_dict": state, "kwargs": TINY_DREAMSIM_VIT}, cache / "clip_vitb32_pretrain.pth.tar")
    with _patched_loading({"load_clip_as_dino": _LOADER}):
        from dreamsim.model import PerceptualModel

        pm = PerceptualModel(
            model_type="clip_vitb32",
            feat_type="embedding",
            stride="32",
            lora=True,
            load_dir=str(cache),
            device="cpu",
        )
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=["qkv"])
    pm = peft.get_peft_model(pm, lora)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(str(cache / "clip_vitb32_single_lora"))

    # --- timm test_vit + a random gLocal transform
    torch.manual_seed(seed)
    m = timm.create_model("test_vit", pretrained=False)
    tdir = root / "timm" / "test_vit.r160_in1k"
    tdir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tdir / "model.safetensors"))
    rng = np.random.default_rng(seed)
    gdir = root / "glocal" / "tiny-test_vit"
    gdir.mkdir(parents=True, exist_ok=True)
    np.savez(
        gdir / "transform.npz",
        weights=rng.standard_normal((64, 64)) / 8,
        bias=rng.standard_normal(64),
        mean=rng.standard_normal(64) * 0.1,
        std=np.full(64, 2.0),
    )

    # --- open_clip tiny CLIP from a custom config
    odir = root / "open_clip"
    odir.mkdir(parents=True, exist_ok=True)
    cfg = odir / f"{TINY_CLIP_NAME}.json"
    cfg.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(seed)
    clip = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    cdir = odir / f"{TINY_CLIP_NAME}.random"
    cdir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in clip.state_dict().items()}, str(cdir / "open_clip_model.safetensors")
    )
    return root
