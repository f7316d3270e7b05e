"""Pieces shared by the plain (non-DreamSim) model families: weight patterns and a runner."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .._checks import BrainalignError
from ._registry import WeightFile

if TYPE_CHECKING:
    import torch

    from .glocal import GlocalTransform

__all__ = ["FeatureRunner", "checkpoint_file", "make_feature_runner"]


def checkpoint_file(role: str, plain_dir: str, hf_repo: str, names: tuple[str, ...], what: str) -> WeightFile:
    """A checkpoint found either as a plain file or in a copied Hugging Face hub cache.

    Parameters
    ----------
    plain_dir : str
        Directory under the weights root, e.g. ``"timm/vit_base_patch16_224.dino"``.
    hf_repo : str
        ``"org/name"`` of the Hugging Face repository the file comes from; a copy of
        ``~/.cache/huggingface/hub`` placed at ``<weights>/huggingface/hub`` is searched as
        ``models--org--name/snapshots/*/<file>``.
    names : tuple of str
        Accepted file names, in order of preference.
    """
    org, _, name = hf_repo.partition("/")
    plain = tuple(f"{plain_dir}/{n}" for n in names)
    hf = tuple(f"huggingface/hub/models--{org}--{name}/snapshots/*/{n}" for n in names)
    return WeightFile(role, plain + hf, f"{what} (Hugging Face repo {hf_repo}, file {' or '.join(names)})")


class FeatureRunner:
    """Base features from one forward, plus their gLocal transform when requested."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        alignments: tuple[str, ...],
        glocal: GlocalTransform | None = None,
    ) -> None:
        self.forward = forward
        self.alignments = alignments
        self.glocal = glocal

    def embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: normalized ``(B, 3, H, W)`` -> ``{"none": (B, D), "glocal": (B, D')}``."""
        import torch

        with torch.inference_mode():
            base = self.forward(x).reshape(x.shape[0], -1).float()
            out: dict[str, torch.Tensor] = {}
            if "none" in self.alignments:
                out["none"] = base
            if "glocal" in self.alignments:
                if self.glocal is None:
                    raise BrainalignError("A 'glocal' output needs a gLocal transform.")
                out["glocal"] = self.glocal.apply(base)
        return out


def make_feature_runner(
    forward: Callable[[torch.Tensor], torch.Tensor], alignments: tuple[str, ...], files: Mapping[str, Path]
) -> FeatureRunner:
    """A :class:`FeatureRunner`, loading the gLocal transform if ``"glocal"`` is requested."""
    glocal = None
    unknown = set(alignments) - {"none", "glocal"}
    if unknown:
        raise BrainalignError(f"Plain image models give 'none' and 'glocal' tables, not {sorted(unknown)}.")
    if "glocal" in alignments:
        from .glocal import load_glocal_transform

        glocal = load_glocal_transform(files["glocal_transform"])
    return FeatureRunner(forward, alignments, glocal)
