"""The brain-encoder registry: one contract, one creation function.

Contract: ``cls(*, n_chans, n_times, embed_dim, **arch_kwargs)`` builds a ``torch.nn.Module``
mapping ``(batch, n_chans, n_times)`` float32 to ``(batch, embed_dim)``, not normalized (the
loss normalizes). Subject-aware encoders also take ``n_subjects`` and accept
``forward(x, subject_index)``; they set the class attribute ``subject_aware = True``.
Impossible shapes must fail in ``__init__`` with a message naming the shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .._checks import BrainalignError, check_option

__all__ = ["EncoderInfo", "create_encoder", "encoder_info", "list_encoders", "register_encoder"]


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
