"""Symmetric InfoNCE (the paper's eq. 2) over in-batch negatives.

Both brain and image embeddings are mean-centred across the feature dimension and then
L2-normalized (as AlignVis does) before the cosine logits are scaled by ``1 / temperature``.
The temperature is either fixed (a buffer) or learned (a parameter that
:func:`brainalign.train.loop.build_run` puts in the optimizer): never ambiguous.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_range

__all__ = ["SymmetricInfoNCE", "center_normalize"]


def center_normalize(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Subtract each row's mean over features, then L2-normalize each row."""
    z = z - z.mean(dim=-1, keepdim=True)
    return F.normalize(z, dim=-1, eps=eps)


class SymmetricInfoNCE(nn.Module):
    """``(CE(logits, arange) + CE(logits.T, arange)) / 2`` with ``logits = b @ i.T / T``.

    Parameters
    ----------
    temperature : float
        Initial (or fixed) temperature ``T > 0``.
    learn_temperature : bool
        If True, ``log(1/T)`` is an ``nn.Parameter`` (clamped to ``T >= 0.01``) that must be
        optimized; if False it is a buffer and never changes.
    """

    def __init__(self, temperature: float = 0.04, learn_temperature: bool = False) -> None:
        super().__init__()
        check_range("temperature", temperature, low=0.0, low_inclusive=False)
        init = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        self.learn_temperature = learn_temperature
        if learn_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().item())

    def scale(self) -> torch.Tensor:
        # Cap the scale at 100 (T >= 0.01), as CLIP does, so a learned T cannot collapse.
        return self.logit_scale.exp().clamp(max=100.0)

    def logits(self, brain: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits ``(B_brain, B_image)`` after centring and normalizing."""
        b = center_normalize(brain.float())
        i = center_normalize(image.float())
        return self.scale() * b @ i.T

    def forward(
        self, brain: torch.Tensor, image: torch.Tensor, image_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss for paired rows ``brain[k] <-> image[k]``; shapes ``(B, D)`` both.

        ``image_ids`` (``(B,)``, optional) names each row's image. A batch can hold one image
        several times (several training subjects, or single trials); those pairs are the same
        image, not negatives, so their off-diagonal logits are masked out of both softmaxes.
        Without duplicates the loss is exactly the plain one.
        """
        if brain.shape != image.shape:
            raise ValueError(f"brain {tuple(brain.shape)} and image {tuple(image.shape)} embeddings differ in shape.")
        logits = self.logits(brain, image)
        target = torch.arange(logits.shape[0], device=logits.device)
        if image_ids is not None:
            same = image_ids.view(-1, 1) == image_ids.view(1, -1)
            same.fill_diagonal_(False)
            if bool(same.any()):
                logits = logits.masked_fill(same, float("-inf"))
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
