"""MindEye-style residual MLP for fMRI (voxels x 1), as AlignVis's ``brain_mlp.py``.

Reference: Scotti et al., "Reconstructing the Mind's Eye: fMRI-to-Image with Contrastive
Learning and Diffusion Priors", NeurIPS 2023 (MindEye), as used by AlignVis ``BrainMLP`` with
``use_projector=False`` and AlignVis's extra ``repr_layer``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .._checks import BrainalignError, check_range, check_type
from ._registry import register_encoder

__all__ = ["BrainMLP"]

logger = logging.getLogger(__name__)


class _Block(nn.Module):
    """``x + Dropout(GELU(LayerNorm(Linear(x))))``."""

    def __init__(self, width: int, drop_prob: float) -> None:
        super().__init__()
        self.fn = nn.Sequential(
            nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(drop_prob)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.fn(x)
        return out


@register_encoder(
    "mlp",
    reference="Scotti et al. 2023 (MindEye), NeurIPS; as in AlignVis brain_mlp.py",
    modalities=("fmri",),
)
class BrainMLP(nn.Module):
    """Residual MLP over voxels: ``(B, n_chans, 1) -> (B, embed_dim)``, not normalized.

    ``Linear(n_voxels, width) -> LayerNorm -> GELU -> Dropout(0.5)``, then ``n_blocks`` residual
    blocks ``[Linear(width, width) -> LayerNorm -> GELU -> Dropout(0.15)]``, then
    ``Linear(width, D)`` and AlignVis's ``repr_layer Linear(D, D)``.

    Reference: Scotti et al., NeurIPS 2023 (MindEye); AlignVis ``BrainMLP``. Parameter count at
    the paper's shape (NSD subject 1, 15,724 voxels, width 4096, 4 blocks, D=768):
    135,312,896 (134,722,304 without ``repr_layer``; AlignVis: about 134M).

    Parameters
    ----------
    n_chans : int
        Number of voxels (the fMRI layout puts voxels on the channel axis).
    n_times : int
        Must be 1: this encoder takes one response per voxel.
    embed_dim : int
        Output dimension.
    width : int
        Hidden width (4096).
    n_blocks : int
        Residual blocks (4).
    drop_prob : float
        Dropout after the input layer (0.5).
    block_drop_prob : float
        Dropout in each residual block (0.15).

    Raises
    ------
    BrainalignError
        If ``n_times != 1`` (EEG/MEG-shaped input), at construction; in ``forward`` for an input
        that is not ``(B, n_chans, 1)``.
    """

    def __init__(
        self,
        *,
        n_chans: int,
        n_times: int,
        embed_dim: int,
        width: int = 4096,
        n_blocks: int = 4,
        drop_prob: float = 0.5,
        block_drop_prob: float = 0.15,
    ) -> None:
        super().__init__()
        if n_times != 1:
            raise BrainalignError(
                f"Encoder 'mlp' is an fMRI encoder over voxels: it takes input shape (n_chans=n_voxels, "
                f"n_times=1), got (n_chans={n_chans}, n_times={n_times}), which looks like EEG/MEG. "
                f"Use an EEG/MEG encoder ('nice', 'atms', 'eegnet', 'eegconformer', 'shallowfbcspnet')."
            )
        check_type("mlp width", width, int)
        check_range("mlp width", width, low=1)
        check_type("mlp n_blocks", n_blocks, int)
        check_range("mlp n_blocks", n_blocks, low=0)
        check_range("mlp drop_prob", drop_prob, low=0.0, high=1.0)
        check_range("mlp block_drop_prob", block_drop_prob, low=0.0, high=1.0)
        self.n_chans = n_chans
        self.stem = nn.Sequential(
            nn.Linear(n_chans, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(drop_prob)
        )
        self.blocks = nn.Sequential(*(_Block(width, block_drop_prob) for _ in range(n_blocks)))
        self.out = nn.Linear(width, embed_dim)
        self.repr_layer = nn.Linear(embed_dim, embed_dim)
        logger.debug("BrainMLP %d voxels -> %d x %d blocks -> %d", n_chans, width, n_blocks, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_chans, 1) -> (B, embed_dim)``, not normalized."""
        if x.dim() != 3 or x.shape[1:] != (self.n_chans, 1):
            raise BrainalignError(
                f"mlp expects fMRI input of shape (batch, {self.n_chans}, 1), got {tuple(x.shape)}."
            )
        out: torch.Tensor = self.repr_layer(self.out(self.blocks(self.stem(x[..., 0]))))
        return out
