"""The brain-encoder registry: one contract, one creation function.

Contract: ``cls(*, n_chans, n_times, embed_dim, **arch_kwargs)`` builds a ``torch.nn.Module``
mapping ``(batch, n_chans, n_times)`` float32 to ``(batch, embed_dim)``, not normalized (the
loss normalizes). Subject-aware encoders also take ``n_subjects`` and accept
``forward(x, subject_index)``; they set the class attribute ``subject_aware = True``.
Impossible shapes must fail in ``__init__`` with a message naming the shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import BrainalignError, check_option

__all__ = [
    "REFERENCE_SHAPES",
    "EncoderInfo",
    "count_parameters",
    "create_encoder",
    "describe_encoders",
    "encoder_info",
    "list_encoders",
    "register_encoder",
]

#: The paper's input shapes per modality, ``(n_chans, n_times)``: THINGS-EEG2 (63 ch, 250 Hz,
#: 0-1 s), THINGS-MEG (271 ch, 200 Hz, 0-1 s) and NSD subject 1 (15,724 nsdgeneral voxels).
REFERENCE_SHAPES: dict[str, tuple[int, int]] = {"eeg": (63, 250), "meg": (271, 201), "fmri": (15724, 1)}


@dataclass(frozen=True)
class EncoderInfo:
    """What the registry knows about an encoder."""

    name: str
    cls: type[nn.Module]
    reference: str
    modalities: tuple[str, ...]

    @property
    def subject_aware(self) -> bool:
        return bool(getattr(self.cls, "subject_aware", False))

    def arch_params(self) -> dict[str, Any]:
        """Architecture kwargs the constructor accepts, with their defaults."""
        sig = inspect.signature(self.cls.__init__)
        skip = {"self", "n_chans", "n_times", "embed_dim", "n_subjects"}
        return {
            k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items()
            if k not in skip and p.kind is not inspect.Parameter.VAR_KEYWORD
        }


_ENCODERS: dict[str, EncoderInfo] = {}


def register_encoder(
    name: str, *, reference: str, modalities: tuple[str, ...] = ("eeg", "meg")
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding an encoder to the registry under ``name``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _ENCODERS:
            raise ValueError(f"Encoder name {name!r} is taken by {_ENCODERS[name].cls.__qualname__}.")
        _ENCODERS[name] = EncoderInfo(name, cls, reference, modalities)
        return cls

    return add


def list_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    return sorted(_ENCODERS)


def encoder_info(name: str) -> EncoderInfo:
    """Registry entry for ``name``; an unknown name raises with the closest match."""
    return _ENCODERS[check_option("brain encoder", name, list_encoders())]


def check_arch_kwargs(name: str, arch: dict[str, Any]) -> None:
    """Raise if ``arch`` has a key the encoder's constructor does not accept."""
    info = encoder_info(name)
    known = info.arch_params()
    for key in arch:
        if key not in known:
            check_option(f"architecture option for encoder {name!r}", key, sorted(known))


def create_encoder(
    name: str,
    *,
    n_chans: int,
    n_times: int,
    embed_dim: int,
    n_subjects: int | None = None,
    **arch: Any,
) -> nn.Module:
    """Build the encoder ``name`` for ``(n_chans, n_times)`` inputs and ``embed_dim`` outputs.

    ``None``-valued architecture kwargs are dropped, so one sweep can send the same keys to
    every architecture (timm's ``create_model`` convention).
    """
    info = encoder_info(name)
    arch = {k: v for k, v in arch.items() if v is not None}
    check_arch_kwargs(name, arch)
    for what, v in (("n_chans", n_chans), ("n_times", n_times), ("embed_dim", embed_dim)):
        if not isinstance(v, int) or v < 1:
            raise BrainalignError(f"{what} must be a positive int, got {v!r}.")
    kwargs: dict[str, Any] = dict(n_chans=n_chans, n_times=n_times, embed_dim=embed_dim, **arch)
    if info.subject_aware:
        kwargs["n_subjects"] = n_subjects or 1
    return info.cls(**kwargs)


def count_parameters(
    name: str,
    *,
    n_chans: int,
    n_times: int,
    embed_dim: int,
    n_subjects: int | None = None,
    **arch: Any,
) -> int:
    """Number of learnable parameters of encoder ``name`` built for this shape.

    Builds on PyTorch's ``meta`` device (no memory, no init cost: a 135M-parameter fMRI MLP
    counts instantly), except for encoder classes with ``meta_init = False``, whose construction
    computes on real tensors (the braindecode backbones measure their feature size with a
    forward pass); those are built on the CPU.

    Parameters
    ----------
    name : str
        Registry name.
    n_chans, n_times, embed_dim, n_subjects, **arch
        As for :func:`create_encoder`.

    Returns
    -------
    int
        ``sum(p.numel() for p in model.parameters())``.

    Raises
    ------
    BrainalignError
        For an unknown name or a shape the encoder refuses.
    """
    kwargs: dict[str, Any] = dict(
        n_chans=n_chans, n_times=n_times, embed_dim=embed_dim, n_subjects=n_subjects
    )
    if getattr(encoder_info(name).cls, "meta_init", True):
        with torch.device("meta"):
            model = create_encoder(name, **kwargs, **arch)
    else:
        with torch.no_grad():
            model = create_encoder(name, **kwargs, **arch)
    return sum(p.numel() for p in model.parameters())


def _shape_for(info: EncoderInfo, n_chans: int, n_times: int) -> tuple[int, int]:
    """``(n_chans, n_times)`` if the encoder takes time series, else its own reference shape."""
    if "eeg" in info.modalities or "meg" in info.modalities:
        return n_chans, n_times
    return REFERENCE_SHAPES[info.modalities[0]]


def describe_encoders(
    *, n_chans: int = 63, n_times: int = 250, embed_dim: int = 768, n_subjects: int = 10
) -> Iterator[dict[str, Any]]:
    """One row per registered encoder, for listings (``brainalign encoders``) and docs.

    Time-series encoders are counted at ``(n_chans, n_times)``; an encoder that takes no time
    series (the fMRI MLP) at its modality's :data:`REFERENCE_SHAPES` entry, reported in ``shape``.

    Parameters
    ----------
    n_chans, n_times, embed_dim : int
        Shape to count parameters at (default: THINGS-EEG2 63 x 250 and D = 768).
    n_subjects : int
        Training subjects for subject-aware encoders (10, as in THINGS-EEG2).

    Yields
    ------
    dict
        ``name``, ``reference``, ``modalities`` (tuple), ``subject_aware`` (bool), ``shape``
        (``"63x250"``), ``params`` (int, or ``None`` where the encoder refuses the shape) and
        ``error`` (the refusal message, or ``""``).
    """
    for name in list_encoders():
        info = _ENCODERS[name]
        chans, times = _shape_for(info, n_chans, n_times)
        params: int | None
        try:
            params = count_parameters(
                name, n_chans=chans, n_times=times, embed_dim=embed_dim, n_subjects=n_subjects
            )
            error = ""
        except BrainalignError as e:
            params, error = None, str(e)
        yield {
            "name": name,
            "reference": info.reference,
            "modalities": info.modalities,
            "subject_aware": info.subject_aware,
            "shape": f"{chans}x{times}",
            "params": params,
            "error": error,
        }
