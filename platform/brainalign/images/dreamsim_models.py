"""DreamSim (Fu et al., NeurIPS 2023) human-aligned encoders and their unaligned base.

One model gives both tables of a backbone, as AlignVis does with its ``*_noalign`` files:

* ``dreamsim_<type>:dreamsim`` is ``model.embed(x)`` with the NIGHTS-trained LoRA adapter;
* ``dreamsim_<type>:none`` is ``model.embed(x)`` inside ``model.disable_adapter()``: the same
  backbone, the same feature (CLS of block 11 before the final norm for DINO/DINOv2/SynCLR;
  the projected image embedding for CLIP/OpenCLIP) and the same preprocessing. This equals
  AlignVis's ``PerceptualModel(..., baseline=True)`` route (dependencies.md 1.5).

Both are raw (``normalize_embeds=False``); the loss normalizes. Preprocessing is DreamSim's:
RGB, ``Resize((224, 224), bicubic)`` (a squash), ``ToTensor``; the per-backbone ``Normalize``
runs inside the model.

Weights: the DreamSim cache directory (``cache_dir`` of ``dreamsim.dreamsim``) at
``<weights>/dreamsim/``, in the layout DreamSim's release zips unpack to, plus the
``torch.hub`` checkouts and checkpoints the DINO / DINOv2 backbones need (see
``docs/image-encoders.md``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._checks import BrainalignError, check_option
from ._registry import (
    ModelSpec,
    OutputSpec,
    Preprocess,
    WeightFile,
    _import_object,
    register_family,
    register_model,
)
from .weights import MissingWeightsError, offline_loading

if TYPE_CHECKING:
    import torch

__all__ = [
    "DREAMSIM_PREPROCESS",
    "DREAMSIM_TYPES",
    "build_dreamsim",
    "dreamsim_spec",
    "dreamsim_weight_files",
]

log = logging.getLogger(__name__)

DREAMSIM_PREPROCESS = Preprocess(
    size=224,
    resize="squash",
    interpolation="bicubic",
    note="Normalize inside DreamSim (ImageNet mean/std for DINO/DINOv2/SynCLR, OpenAI-CLIP for CLIP/OpenCLIP)",
)

_CLS = "CLS token of block 11 (hook before the final LayerNorm), as DreamSim's 'cls' feature"
_EMB = "CLIP image embedding: ln_post(CLS) @ proj, as DreamSim's 'embedding' feature"

#: dreamsim_type -> (dim, backbone description, feature description)
DREAMSIM_TYPES: dict[str, tuple[int, str, str]] = {
    "ensemble": (
        1792,
        "DINO ViT-B/16 + OpenAI CLIP ViT-B/16 + OpenCLIP ViT-B/16 (LAION-400M), concatenated",
        "concat[DINO CLS block 11 (768), CLIP embedding (512), OpenCLIP embedding (512)]",
    ),
    "clip_vitb32": (512, "OpenAI CLIP ViT-B/32", _EMB),
    "open_clip_vitb32": (512, "OpenCLIP ViT-B/32 (LAION-400M e31)", _EMB),
    "dino_vitb16": (768, "DINO ViT-B/16", _CLS),
    "dinov2_vitb14": (768, "DINOv2 ViT-B/14", _CLS),
    "synclr_vitb16": (768, "SynCLR ViT-B/16", _CLS),
}


def _dino_hub(sub: str) -> list[WeightFile]:
    return [
        WeightFile(
            "dino_hub",
            (f"{sub}/facebookresearch_dino_main/hubconf.py",),
            "torch.hub checkout of github.com/facebookresearch/dino (branch main), the whole repo",
        ),
        WeightFile(
            "dino_backbone",
            (f"{sub}/checkpoints/dino_vitbase16_pretrain.pth",),
            "DINO ViT-B/16 backbone, from dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/",
        ),
        WeightFile(
            "dino_head",
            (f"{sub}/dino_vitb16_pretrain.pth",),
            "DINO checkpoint with the student head, from DreamSim's release zip",
        ),
    ]


def dreamsim_weight_files(dreamsim_type: str, sub: str = "dreamsim") -> tuple[WeightFile, ...]:
    """The files ``dreamsim(dreamsim_type=...)`` reads, relative to the weights directory."""
    check_option("dreamsim_type", dreamsim_type, DREAMSIM_TYPES)
    tag = "ensemble_lora" if dreamsim_type == "ensemble" else f"{dreamsim_type}_single_lora"
    files = [
        WeightFile(
            "lora_config", (f"{sub}/{tag}/adapter_config.json",), "LoRA config from DreamSim's release zip"
        ),
        WeightFile(
            "lora_weights",
            (f"{sub}/{tag}/adapter_model.safetensors", f"{sub}/{tag}/adapter_model.bin"),
            "LoRA adapter weights (NIGHTS fine-tuning) from DreamSim's release zip",
        ),
    ]

    def clip(p: int) -> WeightFile:
        return WeightFile(
            f"clip_vitb{p}",
            (f"{sub}/clip_vitb{p}_pretrain.pth.tar",),
            f"OpenAI CLIP ViT-B/{p} converted by DreamSim",
        )

    def oclip(p: int) -> WeightFile:
        return WeightFile(
            f"open_clip_vitb{p}",
            (f"{sub}/open_clip_vitb{p}_pretrain.pth.tar",),
            f"OpenCLIP ViT-B/{p} LAION-400M converted by DreamSim",
        )

    if dreamsim_type == "ensemble":
        files += _dino_hub(sub) + [clip(16), oclip(16)]
    elif dreamsim_type == "clip_vitb32":
        files += [clip(32)]
    elif dreamsim_type == "open_clip_vitb32":
        files += [oclip(32)]
    elif dreamsim_type == "dino_vitb16":
        files += _dino_hub(sub)
    elif dreamsim_type == "dinov2_vitb14":
        files += [
            WeightFile(
                "dinov2_hub",
                (
                    f"{sub}/facebookresearch_dinov2_main/hubconf.py",
                    f"{sub}/facebookresearch_dinov2_master/hubconf.py",
                ),
                "torch.hub checkout of github.com/facebookresearch/dinov2, the whole repo",
            ),
            WeightFile(
                "dinov2_backbone",
                (f"{sub}/checkpoints/dinov2_vitb14_pretrain.pth",),
                "DINOv2 ViT-B/14, from dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/",
            ),
            WeightFile(
                "dinov2_marker",
                (f"{sub}/dinov2_vitb14_pretrain.pth",),
                "only checked for existence by dreamsim 0.2.1 (a copy or symlink of the checkpoint)",
                hash=False,
            ),
        ]
    elif dreamsim_type == "synclr_vitb16":
        files += [
            WeightFile(
                "synclr", (f"{sub}/synclr_vit_b_16.pth",), "SynCLR ViT-B/16 from DreamSim's release zip"
            )
        ]
    return tuple(files)


def dreamsim_spec(
    dreamsim_type: str,
    *,
    backbone: str | None = None,
    sub: str = "dreamsim",
    dim: int | None = None,
    preprocess: Preprocess = DREAMSIM_PREPROCESS,
    loaders: Mapping[str, str] | None = None,
) -> ModelSpec:
    """A DreamSim model spec with its ``dreamsim`` and ``none`` outputs.

    Parameters
    ----------
    dreamsim_type : str
        One of :data:`DREAMSIM_TYPES`.
    backbone : str, optional
        Contract backbone name (default ``dreamsim_<type>``, AlignVis's names).
    sub : str
        Sub-directory of the weights directory used as DreamSim's ``cache_dir``.
    dim : int, optional
        Embedding size (default: DreamSim's for the type).
    preprocess : Preprocess
    loaders : mapping, optional
        Replacements for ``dreamsim.feature_extraction.extractor`` backbone loaders
        (``{"load_clip_as_dino": "module:function"}``), e.g. tiny backbones in tests.
    """
    d, desc, feat = DREAMSIM_TYPES[check_option("dreamsim_type", dreamsim_type, DREAMSIM_TYPES)]
    dim = dim or d
    return ModelSpec(
        backbone=backbone or f"dreamsim_{dreamsim_type}",
        family="dreamsim",
        description=f"DreamSim {dreamsim_type}: {desc}",
        preprocess=preprocess,
        weights=dreamsim_weight_files(dreamsim_type, sub),
        outputs=(
            OutputSpec("dreamsim", dim, f"{feat}; with the NIGHTS LoRA adapter (human-aligned)"),
            OutputSpec("none", dim, f"{feat}; same model with the adapter disabled (AlignVis *_noalign)"),
        ),
        options={"dreamsim_type": dreamsim_type, "normalize_embeds": False, "loaders": dict(loaders or {})},
    )


# --------------------------------------------------------------------------- builder
class _LogStream(io.TextIOBase):
    """Sends dreamsim's ``print`` output to the log instead of stdout."""

    def write(self, s: str) -> int:
        if s.strip():
            log.info("dreamsim: %s", s.strip())
        return len(s)


@contextlib.contextmanager
def _patched_loading(loaders: Mapping[str, str]) -> Iterator[None]:
    """Loader overrides, and ``torch.load`` defaulting to CPU tensors.

    dreamsim 0.2.1's B/32 CLIP loaders call ``torch.load`` without ``map_location``; a
    checkpoint saved from CUDA would fail on a CPU-only actor.
    """
    import torch
    from dreamsim.feature_extraction import extractor

    saved = {name: getattr(extractor, name) for name in loaders}
    orig_load = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("map_location", "cpu")
        return orig_load(*args, **kwargs)

    for name, target in loaders.items():
        setattr(extractor, name, _import_object(target))
    torch.load = load  # type: ignore[assignment,unused-ignore]
    try:
        yield
    finally:
        torch.load = orig_load  # type: ignore[assignment,unused-ignore]
        for name, fn in saved.items():
            setattr(extractor, name, fn)


class DreamSimRunner:
    """Embeds a batch with and without the LoRA adapter of one DreamSim model."""

    def __init__(self, model: Any, alignments: tuple[str, ...]) -> None:
        self.model = model
        self.alignments = alignments

    def embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: ``(B, 3, 224, 224)`` in ``[0, 1]`` -> ``{alignment: (B, dim)}``."""
        import torch

        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            if "dreamsim" in self.alignments:
                out["dreamsim"] = self.model.embed(x).reshape(x.shape[0], -1)
            if "none" in self.alignments:
                with self.model.disable_adapter():
                    out["none"] = self.model.embed(x).reshape(x.shape[0], -1)
        return out


def build_dreamsim(
    spec: ModelSpec, alignments: tuple[str, ...], files: Mapping[str, Path], device: str
) -> DreamSimRunner:
    """Load ``dreamsim(pretrained=True, normalize_embeds=False)`` from the local cache, offline."""
    cache_dir = files["lora_config"].parent.parent
    opts = spec.options
    with offline_loading(hub_dir=cache_dir), contextlib.redirect_stdout(_LogStream()):
        from dreamsim import dreamsim

        with _patched_loading(opts.get("loaders", {})), warnings.catch_warnings():
            # dreamsim wraps the model in peft twice (get_peft_model, then PeftModel.from_pretrained)
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            try:
                model, _ = dreamsim(
                    pretrained=True,
                    device=device,
                    cache_dir=str(cache_dir),
                    normalize_embeds=bool(opts.get("normalize_embeds", False)),
                    dreamsim_type=opts["dreamsim_type"],
                )
            except MissingWeightsError:
                raise
            except Exception as e:  # a corrupt or mismatched checkpoint: say which model and where
                raise BrainalignError(
                    f"Loading DreamSim {opts['dreamsim_type']!r} from {cache_dir} failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
    model.eval().requires_grad_(False)
    log.info("Loaded DreamSim %s on %s from %s", opts["dreamsim_type"], device, cache_dir)
    return DreamSimRunner(model, alignments)


register_family("dreamsim", "brainalign.images.dreamsim_models:build_dreamsim")
for _t in DREAMSIM_TYPES:
    register_model(dreamsim_spec(_t))
