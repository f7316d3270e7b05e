"""NICE (Song et al., ICLR 2024), the paper's main EEG encoder, with an exact fast path.

Reference: Song, Y., Liu, B., Li, X., Shi, N., Wang, Y., Gao, X. "Decoding Natural Images from
EEG for Object Recognition", ICLR 2024; as used by AlignVis (Rajabi et al., ICML 2025).

Architecture at (63, 250): temporal ``Conv2d(1, 40, (1, 25))`` -> ``AvgPool2d((1, 51), (1, 5))``
-> BN -> ELU -> spatial ``Conv2d(40, 40, (n_chans, 1))`` -> BN -> ELU -> Dropout -> 1x1 conv,
flattened to ``40 * n_patches`` (1440 at 63x250, 240 at 17x100, 1040 at 271x201), then the
projector ``Linear(F, D) -> Residual(GELU -> Linear(D, D) -> Dropout) -> LayerNorm(D)`` and
AlignVis's ``repr_layer Linear(D, D)``. Feature sizes are derived from ``n_chans`` / ``n_times``
(AlignVis hard-coded the spatial kernel to 63 rows at one point, which broke MEG).

The fast path
-------------
The temporal convolution and the average pooling that follows it are both linear, so together
they are ONE strided convolution whose kernel is the conv kernel convolved with the box filter
(length ``kernel_time + pool_time - 1`` = 75, stride ``pool_stride`` = 5); the conv bias passes
through the mean unchanged. The learnable parameters stay the ``Conv2d(1, 40, (1, 25))`` weight
and bias (the fused kernel is rebuilt from them in every forward), so state_dicts are identical
between ``fast=True`` and ``fast=False`` and gradients flow to the same tensors.

A strided convolution with one input channel is a poor fit for CPU convolution kernels, so the
fused kernel is applied in its polyphase form: the signal is cut into blocks of ``pool_stride``
samples, which become ``pool_stride`` input channels of a stride-1 ``conv1d`` with a kernel of
``ceil(75 / 5) = 15`` blocks. That computes exactly the same sums without materialising the
226-sample conv output that the pooling would average away.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import BrainalignError, check_range, check_type
from ._registry import register_encoder

__all__ = ["NICE", "NICEProjector", "check_eeg_shape"]

logger = logging.getLogger(__name__)


def check_eeg_shape(encoder: str, n_chans: int, n_times: int) -> None:
    """Refuse fMRI-shaped input (``n_times == 1``) for an encoder that convolves over time.

    Parameters
    ----------
    encoder : str
        Registry name, used in the message.
    n_chans, n_times : int
        The input shape the encoder is being built for.

    Raises
    ------
    BrainalignError
        If ``n_times == 1``: that is the fMRI layout (``n_chans`` voxels x 1).
    """
    if n_times == 1:
        raise BrainalignError(
            f"Encoder {encoder!r} is an EEG/MEG encoder that convolves over time, but the input shape "
            f"(n_chans={n_chans}, n_times=1) is the fMRI layout (voxels x 1). Use the 'mlp' encoder "
            f"for fMRI."
        )


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.fn(x)
        return out


class NICEProjector(nn.Sequential):
    """NICE's projection head: ``Linear(F, D) -> Residual(GELU -> Linear(D, D) -> Dropout) -> LayerNorm(D)``.

    Maps ``(B, n_features)`` to ``(B, embed_dim)``. ``(F + 1) D + (D + 1) D + 2 D`` parameters.

    Parameters
    ----------
    n_features : int
        Input feature size F.
    embed_dim : int
        Output size D.
    drop_prob : float
        Dropout inside the residual branch (0.5 in NICE / ATM).
    """

    def __init__(self, n_features: int, embed_dim: int, drop_prob: float = 0.5) -> None:
        super().__init__(
            nn.Linear(n_features, embed_dim),
            _Residual(nn.Sequential(nn.GELU(), nn.Linear(embed_dim, embed_dim), nn.Dropout(drop_prob))),
            nn.LayerNorm(embed_dim),
        )


@register_encoder(
    "nice",
    reference="Song et al. 2024 (NICE), ICLR; as in AlignVis nice.py",
    modalities=("eeg", "meg"),
)
class NICE(nn.Module):
    """NICE EEG/MEG encoder: ``(B, n_chans, n_times) -> (B, embed_dim)``, not normalized.

    Reference: Song et al., "Decoding Natural Images from EEG for Object Recognition", ICLR 2024
    (github.com/eeyhsong/NICE-EEG), with AlignVis's extra ``repr_layer``. Parameter count at the
    paper's shapes (63 x 250): 103,680 in the conv encoder (temporal conv 1,040, BN 80, spatial
    conv 100,840, BN 80, 1x1 projection 1,640); totals including the projector and ``repr_layer``
    2,393,088 (D=768) and 1,367,808 (D=512). At 17 x 100 the features are 240, at 271 x 201
    (THINGS-MEG) 1,040.

    Parameters
    ----------
    n_chans, n_times : int
        Input shape. ``n_times`` must be at least ``kernel_time + pool_time - 1`` (75).
    embed_dim : int
        Output dimension (the image-embedding dimension).
    n_filters : int
        Temporal / spatial filters (40 in the paper).
    kernel_time, pool_time, pool_stride : int
        Temporal conv kernel (25), average-pool window (51) and stride (5), in samples.
    drop_prob, proj_drop_prob : float
        Dropout after the spatial conv and in the projector (0.5 both in the paper).
    fast : bool
        Compute the temporal conv + average pool as one fused strided convolution (see the module
        docstring). Exactly the same function, parameters and state_dict as ``fast=False``.

    Raises
    ------
    BrainalignError
        If ``n_times`` is shorter than one pooled patch, or is 1 (fMRI layout).

    Notes
    -----
    ``forward`` takes ``x`` of shape ``(B, n_chans, n_times)`` and returns ``(B, embed_dim)``.
    """

    def __init__(
        self,
        *,
        n_chans: int,
        n_times: int,
        embed_dim: int,
        n_filters: int = 40,
        kernel_time: int = 25,
        pool_time: int = 51,
        pool_stride: int = 5,
        drop_prob: float = 0.5,
        proj_drop_prob: float = 0.5,
        fast: bool = True,
    ) -> None:
        super().__init__()
        check_eeg_shape("nice", n_chans, n_times)
        for name, value in (
            ("n_filters", n_filters),
            ("kernel_time", kernel_time),
            ("pool_time", pool_time),
            ("pool_stride", pool_stride),
        ):
            check_type(f"nice {name}", value, int)
            check_range(f"nice {name}", value, low=1)
        check_range("nice drop_prob", drop_prob, low=0.0, high=1.0)
        check_range("nice proj_drop_prob", proj_drop_prob, low=0.0, high=1.0)
        self.fast = bool(check_type("nice fast", fast, bool))
        needed = kernel_time + pool_time - 1
        if n_times < needed:
            raise BrainalignError(
                f"NICE cannot take input shape (n_chans={n_chans}, n_times={n_times}): it needs "
                f"n_times >= kernel_time + pool_time - 1 = {needed} samples for one pooled patch; "
                f"lower kernel_time/pool_time for such short epochs."
            )
        self.n_chans = n_chans
        self.n_times = n_times
        self.n_patches = (n_times - needed) // pool_stride + 1
        self.n_features = n_filters * self.n_patches
        self.tsconv = nn.Sequential(
            nn.Conv2d(1, n_filters, (1, kernel_time)),
            nn.AvgPool2d((1, pool_time), (1, pool_stride)),
            nn.BatchNorm2d(n_filters),
            nn.ELU(),
            nn.Conv2d(n_filters, n_filters, (n_chans, 1)),
            nn.BatchNorm2d(n_filters),
            nn.ELU(),
            nn.Dropout(drop_prob),
        )
        self.projection = nn.Conv2d(n_filters, n_filters, 1)
        self.projector = NICEProjector(self.n_features, embed_dim, proj_drop_prob)
        self.repr_layer = nn.Linear(embed_dim, embed_dim)
        logger.debug(
            "NICE (%d x %d) -> %d features -> %d (fast=%s)",
            n_chans,
            n_times,
            self.n_features,
            embed_dim,
            fast,
        )

    # ------------------------------------------------------------------ temporal stage
    def fused_kernel(self) -> torch.Tensor:
        """The temporal conv kernel convolved with the pooling box filter.

        Returns
        -------
        torch.Tensor
            ``(n_filters, kernel_time + pool_time - 1)``: ``k[f, m] = sum_j w[f, j] / pool_time``
            over the ``j`` with ``0 <= m - j < pool_time``.
        """
        conv, pool = self.tsconv[0], self.tsconv[1]
        assert isinstance(conv, nn.Conv2d) and isinstance(pool, nn.AvgPool2d)
        pool_time = int(pool.kernel_size[1])  # type: ignore[index]
        n_filters, kernel_time = conv.weight.shape[0], conv.weight.shape[-1]
        box = conv.weight.new_full((1, 1, pool_time), 1.0 / pool_time)
        # Full convolution of each filter with the (symmetric) box: zero-pad by pool_time - 1.
        k = F.conv1d(conv.weight.reshape(n_filters, 1, kernel_time), box, padding=pool_time - 1)
        return k[:, 0]

    def _fused_temporal(self, x: torch.Tensor) -> torch.Tensor:
        """Temporal conv + average pool as one strided conv: one matmul over unfolded windows.

        ``(B, C, T) -> (B, F, C, P)`` (channels-last memory). The windows of the fused kernel's
        length ``L`` at the pooling stride are a view of ``x``; ``(B, C, P, L) @ (L, F)`` is
        one GEMM. Measured against the polyphase conv1d form of the same fused kernel
        (``benchmarks/bench_nice.py --experiments``): equal at 63 x 250, 1.1x faster at
        17 x 100, for ``B * C * P * L`` floats of window copy (111 MB at batch 128, 63 x 250).
        """
        conv, pool = self.tsconv[0], self.tsconv[1]
        assert isinstance(conv, nn.Conv2d) and isinstance(pool, nn.AvgPool2d)
        stride = int(pool.stride[1])  # type: ignore[index]
        k = self.fused_kernel()  # (F, L)
        windows = x.unfold(-1, k.shape[1], stride)  # (B, C, P, L), a view
        y = torch.matmul(windows, k.t()) + conv.bias  # (B, C, P, F)
        return y.permute(0, 3, 1, 2)

    def _fused_temporal_polyphase(self, x: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`_fused_temporal`, as a stride-1 conv1d over blocks of ``stride``
        samples (the phases as input channels): no window copy. Kept for the benchmark."""
        conv, pool = self.tsconv[0], self.tsconv[1]
        assert isinstance(conv, nn.Conv2d) and isinstance(pool, nn.AvgPool2d)
        stride = int(pool.stride[1])  # type: ignore[index]
        k = self.fused_kernel()  # (F, L)
        n_filters, length = k.shape
        n_taps = -(-length // stride)  # kernel length in blocks of `stride` samples
        n_blocks = self.n_patches + n_taps - 1
        batch, n_chans, n_times = x.shape
        needed = n_blocks * stride
        # Samples past the last window only ever meet the zero-padded kernel taps.
        x = x[..., :needed] if needed <= n_times else F.pad(x, (0, needed - n_times))
        # out[p] = sum_m k[m] x[s p + m] = sum_j sum_r k[s j + r] x[s (p + j) + r]:
        # a stride-1 conv1d over blocks, with the s phases r as input channels.
        blocks = x.reshape(batch * n_chans, n_blocks, stride).transpose(1, 2)  # (BC, s, n_blocks)
        taps = F.pad(k, (0, n_taps * stride - length)).reshape(n_filters, n_taps, stride).transpose(1, 2)
        y = F.conv1d(blocks, taps, conv.bias)  # (BC, F, P)
        return y.reshape(batch, n_chans, n_filters, self.n_patches).transpose(1, 2)

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened conv features.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, n_chans, n_times)``.

        Returns
        -------
        torch.Tensor
            ``(B, n_filters * n_patches)``, filter-major (the reference's flatten order).
        """
        if self.fast:
            x = self._fused_temporal(x)  # (B, F, C, P); BN keeps it channels-last from here
            x = self.tsconv[2:7](x)
            # Dropout draws its mask in memory order: make the small (B, F, 1, P) tensor
            # contiguous so that fast and straightforward paths drop the same units.
            x = self.tsconv[7](x.contiguous())
        else:
            x = self.tsconv(x.unsqueeze(1))
        x = self.projection(x)  # (B, F, 1, P)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_chans, n_times) -> (B, embed_dim)``, not normalized."""
        out: torch.Tensor = self.repr_layer(self.projector(self.features(x)))
        return out
