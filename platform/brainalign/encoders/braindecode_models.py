"""EEGNet, EEGConformer and ShallowFBCSPNet from braindecode 1.8.1, with our projection head.

The backbones are braindecode's own classes (not re-implementations); braindecode is imported
inside ``__init__`` because ``import braindecode.models`` takes seconds and pulls in torchaudio,
and ``import brainalign`` must stay light. Each classifier head is removed and replaced by ours:

* ``head="linear"`` (default): ``Flatten -> Linear(n_features, D)``, AlignVis's ``repr_layer``
  on the backbone features;
* ``head="nice"``: NICE's projector (``Linear -> Residual(GELU, Linear, Dropout) -> LayerNorm``)
  followed by ``Linear(D, D)``, as NICE and ATM-S use.

EEGConformer is built with ``return_features=True`` and its tokens ``(B, n_patches, 40)`` are
flattened into our head; its ``_FullyConnected`` 256 -> 32 bottleneck and classifier are removed
(AlignVis's braindecode-0.8 build squeezed every embedding through 32 units and a LogSoftmax).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import BrainalignError, check_option, check_range, check_type
from ._registry import register_encoder
from .nice import NICEProjector, check_eeg_shape

__all__ = ["EEGConformer", "EEGNet", "ShallowFBCSPNet"]

logger = logging.getLogger(__name__)

HEADS = ("linear", "nice")

# braindecode warnings that say nothing about our use: the deprecated default of EEGNet's
# classifier (we remove that classifier) and EEGConformer's note on > 64 channels (MEG).
_QUIET = (
    r".*final_layer_with_constraint.*",
    r".*only been tested on no more than 64 channels.*",
)


def _braindecode_models() -> Any:
    try:
        with warnings.catch_warnings():
            # braindecode's own modules trip MNE deprecation warnings at import (montage names).
            warnings.simplefilter("ignore", FutureWarning)
            import braindecode.models as models
    except ImportError as e:  # pragma: no cover - braindecode is a pinned dependency
        raise BrainalignError(
            "The braindecode encoders need braindecode==1.8.1 (pip install braindecode==1.8.1)."
        ) from e
    return models


def _make_head(kind: str, n_features: int, embed_dim: int, drop_prob: float) -> nn.Module:
    check_option("head", kind, HEADS)
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(n_features, embed_dim))
    return nn.Sequential(
        nn.Flatten(),
        NICEProjector(n_features, embed_dim, drop_prob),
        nn.Linear(embed_dim, embed_dim),
    )


class _BraindecodeEncoder(nn.Module):
    """Shared plumbing: build the backbone, strip its head, measure its features, add ours."""

    backbone: nn.Module
    n_features: int
    meta_init = False  # construction runs a forward pass: count_parameters builds on the CPU

    def _setup(
        self,
        name: str,
        build: Callable[[], nn.Module],
        *,
        n_chans: int,
        n_times: int,
        embed_dim: int,
        head: str,
        head_drop_prob: float,
        why: str,
    ) -> None:
        check_option(f"{name} head", head, HEADS)
        check_range(f"{name} head_drop_prob", head_drop_prob, low=0.0, high=1.0)
        try:
            with warnings.catch_warnings():
                for pattern in _QUIET:
                    warnings.filterwarnings("ignore", message=pattern)
                backbone = build()
                was_training = backbone.training
                backbone.eval()
                with torch.no_grad():
                    out = backbone(torch.zeros(1, n_chans, n_times))
                backbone.train(was_training)
        except (RuntimeError, ValueError, AssertionError, IndexError) as e:
            if isinstance(e, BrainalignError):
                raise
            raise BrainalignError(
                f"{name} cannot take input shape (n_chans={n_chans}, n_times={n_times}): {why} "
                f"(braindecode: {e})"
            ) from e
        self.n_features = int(out[0].numel())
        if self.n_features < 1:
            raise BrainalignError(
                f"{name} cannot take input shape (n_chans={n_chans}, n_times={n_times}): {why}"
            )
        self.backbone = backbone
        self.head = _make_head(head, self.n_features, embed_dim, head_drop_prob)
        logger.debug("%s (%d x %d) -> %d features -> %d", name, n_chans, n_times, self.n_features, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_chans, n_times) -> (B, embed_dim)``, not normalized."""
        out: torch.Tensor = self.head(self.backbone(x))
        return out


def _check_ints(name: str, **values: int) -> None:
    for key, value in values.items():
        check_type(f"{name} {key}", value, int)
        check_range(f"{name} {key}", value, low=1)


@register_encoder(
    "eegnet",
    reference="Lawhern et al. 2018 (EEGNet), J. Neural Eng.; braindecode 1.8.1 EEGNet",
    modalities=("eeg", "meg"),
)
class EEGNet(_BraindecodeEncoder):
    """braindecode's EEGNet backbone + our head: ``(B, n_chans, n_times) -> (B, embed_dim)``.

    Reference: Lawhern et al., "EEGNet: a compact convolutional neural network for EEG-based
    brain-computer interfaces", J. Neural Eng. 2018; braindecode 1.8.1 ``EEGNet`` with its
    classifier replaced by Flatten + our head. Defaults follow AlignVis's "eegnetv4" (F1=8, D=2,
    F2=16, kernel 64, dropout 0.5; braindecode's own default dropout is 0.25). Parameter count at
    the paper's shapes (63 x 250, D=768, linear head): 88,896 = 2,112 backbone + 86,784 head on
    112 features (AlignVis: about 89k). 17 x 100 gives 48 features, 271 x 201 gives 96.

    Parameters
    ----------
    n_chans, n_times : int
        Input shape; ``n_times`` must survive both poolings (>= 27 with the defaults).
    embed_dim : int
        Output dimension.
    F1, D, F2 : int
        Temporal filters, depth multiplier, pointwise filters (``F2=None`` means ``F1 * D``).
    kernel_length, depthwise_kernel_length : int
        Temporal kernel (64) and separable-conv kernel (16), in samples.
    pool1_kernel_size, pool2_kernel_size : int
        Average-pool sizes (4, 8).
    drop_prob : float
        Backbone dropout (0.5).
    head : {"linear", "nice"}
        Projection head (see the module docstring).
    head_drop_prob : float
        Dropout in the ``"nice"`` head.
    """

    def __init__(
        self,
        *,
        n_chans: int,
        n_times: int,
        embed_dim: int,
        F1: int = 8,
        D: int = 2,
        F2: int | None = None,
        kernel_length: int = 64,
        depthwise_kernel_length: int = 16,
        pool1_kernel_size: int = 4,
        pool2_kernel_size: int = 8,
        drop_prob: float = 0.5,
        head: str = "linear",
        head_drop_prob: float = 0.5,
    ) -> None:
        super().__init__()
        check_eeg_shape("eegnet", n_chans, n_times)
        f2 = F1 * D if F2 is None else F2
        _check_ints(
            "eegnet",
            F1=F1,
            D=D,
            F2=f2,
            kernel_length=kernel_length,
            depthwise_kernel_length=depthwise_kernel_length,
            pool1_kernel_size=pool1_kernel_size,
            pool2_kernel_size=pool2_kernel_size,
        )
        check_range("eegnet drop_prob", drop_prob, low=0.0, high=1.0)
        # Time axis through the backbone ("same"-style padding k // 2, then two poolings).
        t = n_times + 2 * (kernel_length // 2) - kernel_length + 1
        t = t // pool1_kernel_size
        t = t + 2 * (depthwise_kernel_length // 2) - depthwise_kernel_length + 1
        t = t // pool2_kernel_size
        why = (
            f"after the temporal conv and the poolings ({pool1_kernel_size} then {pool2_kernel_size}) "
            f"{max(t, 0)} time steps are left; use longer epochs or smaller pool sizes"
        )
        if t < 1:
            raise BrainalignError(
                f"eegnet cannot take input shape (n_chans={n_chans}, n_times={n_times}): {why}."
            )

        def build() -> nn.Module:
            model: nn.Module = _braindecode_models().EEGNet(
                n_chans=n_chans,
                n_outputs=embed_dim,
                n_times=n_times,
                F1=F1,
                D=D,
                F2=f2,
                kernel_length=kernel_length,
                depthwise_kernel_length=depthwise_kernel_length,
                pool1_kernel_size=pool1_kernel_size,
                pool2_kernel_size=pool2_kernel_size,
                drop_prob=drop_prob,
            )
            model.final_layer = nn.Identity()  # features (B, F2, 1, T'), flattened by our head
            return model

        self._setup(
            "eegnet",
            build,
            n_chans=n_chans,
            n_times=n_times,
            embed_dim=embed_dim,
            head=head,
            head_drop_prob=head_drop_prob,
            why=why,
        )


@register_encoder(
    "eegconformer",
    reference="Song et al. 2023 (EEG Conformer), IEEE TNSRE; braindecode 1.8.1 EEGConformer",
    modalities=("eeg", "meg"),
)
class EEGConformer(_BraindecodeEncoder):
    """braindecode's EEGConformer tokens + our head: ``(B, n_chans, n_times) -> (B, embed_dim)``.

    Reference: Song et al., "EEG Conformer: Convolutional Transformer for EEG Decoding and
    Visualization", IEEE TNSRE 2023; braindecode 1.8.1 ``EEGConformer(return_features=True)``.
    Defaults are AlignVis's settings (filter 10, pool 25 / 5, dropout 0.25, 2 layers, 1 head);
    braindecode's defaults are 25, 75 / 15, 0.5, 6 layers, 10 heads. The tokens
    ``(B, n_patches, n_filters_time)`` are flattened into our head instead of braindecode's
    256 -> 32 bottleneck (+ LogSoftmax in the 0.8 version AlignVis used). Parameter count at
    63 x 250, D=768, linear head: 1,494,888 = 142,440 backbone + 1,352,448 head on 44 x 40 =
    1,760 features (AlignVis's bottlenecked build: about 1.42M). 17 x 100 gives 14 patches, 271 x 201 gives 34.

    Parameters
    ----------
    n_chans, n_times : int
        Input shape; ``n_times >= filter_time_length + pool_time_length - 1`` (34).
    embed_dim : int
        Output dimension.
    n_filters_time, filter_time_length : int
        Token width (40; must be divisible by ``num_heads``) and temporal kernel (10).
    pool_time_length, pool_time_stride : int
        Average pooling that cuts the patches (25, 5).
    drop_prob, att_drop_prob : float
        Patch-embedding dropout (0.25) and transformer dropout (0.5).
    num_layers, num_heads : int
        Transformer depth (2) and heads (1).
    head : {"linear", "nice"}
        Projection head.
    head_drop_prob : float
        Dropout in the ``"nice"`` head.
    """

    def __init__(
        self,
        *,
        n_chans: int,
        n_times: int,
        embed_dim: int,
        n_filters_time: int = 40,
        filter_time_length: int = 10,
        pool_time_length: int = 25,
        pool_time_stride: int = 5,
        drop_prob: float = 0.25,
        num_layers: int = 2,
        num_heads: int = 1,
        att_drop_prob: float = 0.5,
        head: str = "linear",
        head_drop_prob: float = 0.5,
    ) -> None:
        super().__init__()
        check_eeg_shape("eegconformer", n_chans, n_times)
        _check_ints(
            "eegconformer",
            n_filters_time=n_filters_time,
            filter_time_length=filter_time_length,
            pool_time_length=pool_time_length,
            pool_time_stride=pool_time_stride,
            num_layers=num_layers,
            num_heads=num_heads,
        )
        check_range("eegconformer drop_prob", drop_prob, low=0.0, high=1.0)
        check_range("eegconformer att_drop_prob", att_drop_prob, low=0.0, high=1.0)
        if n_filters_time % num_heads:
            raise BrainalignError(
                f"eegconformer n_filters_time={n_filters_time} (the token width) must be divisible by "
                f"num_heads={num_heads}."
            )
        needed = filter_time_length + pool_time_length - 1
        why = (
            f"it needs n_times >= filter_time_length + pool_time_length - 1 = {needed} samples for one patch"
        )
        if n_times < needed:
            raise BrainalignError(
                f"eegconformer cannot take input shape (n_chans={n_chans}, n_times={n_times}): {why}."
            )

        def build() -> nn.Module:
            model: nn.Module = _braindecode_models().EEGConformer(
                n_outputs=embed_dim,
                n_chans=n_chans,
                n_times=n_times,
                n_filters_time=n_filters_time,
                filter_time_length=filter_time_length,
                pool_time_length=pool_time_length,
                pool_time_stride=pool_time_stride,
                drop_prob=drop_prob,
                num_layers=num_layers,
                num_heads=num_heads,
                att_drop_prob=att_drop_prob,
                return_features=True,
            )
            # Unused with return_features=True: drop them so every parameter is trained.
            model.fc = nn.Identity()
            model.final_layer = nn.Identity()
            return model

        self._setup(
            "eegconformer",
            build,
            n_chans=n_chans,
            n_times=n_times,
            embed_dim=embed_dim,
            head=head,
            head_drop_prob=head_drop_prob,
            why=why,
        )


@register_encoder(
    "shallowfbcspnet",
    reference="Schirrmeister et al. 2017 (ShallowFBCSPNet), Hum. Brain Mapp.; braindecode 1.8.1",
    modalities=("eeg", "meg"),
)
class ShallowFBCSPNet(_BraindecodeEncoder):
    """braindecode's ShallowFBCSPNet backbone + our head: ``(B, n_chans, n_times) -> (B, embed_dim)``.

    Reference: Schirrmeister et al., "Deep learning with convolutional neural networks for EEG
    decoding and visualization", Human Brain Mapping 2017; braindecode 1.8.1 ``ShallowFBCSPNet``
    (temporal conv -> spatial conv -> BN -> square -> mean pool -> log -> dropout) with its
    classifier replaced by Flatten + our head. Not in AlignVis; braindecode's defaults.
    Parameter count at 63 x 250, D=768, linear head: 440,608 = 101,920 backbone + 338,688 head on 40 x 11 =
    440 features. 17 x 100 gives 40 features (1 pooled step), 271 x 201 gives 280.

    Parameters
    ----------
    n_chans, n_times : int
        Input shape; ``n_times >= filter_time_length + pool_time_length - 1`` (99).
    embed_dim : int
        Output dimension.
    n_filters_time, filter_time_length, n_filters_spat : int
        Temporal filters (40), kernel (25), spatial filters (40).
    pool_time_length, pool_time_stride : int
        Mean pooling (75, 15).
    drop_prob : float
        Dropout (0.5).
    head : {"linear", "nice"}
        Projection head.
    head_drop_prob : float
        Dropout in the ``"nice"`` head.
    """

    def __init__(
        self,
        *,
        n_chans: int,
        n_times: int,
        embed_dim: int,
        n_filters_time: int = 40,
        filter_time_length: int = 25,
        n_filters_spat: int = 40,
        pool_time_length: int = 75,
        pool_time_stride: int = 15,
        drop_prob: float = 0.5,
        head: str = "linear",
        head_drop_prob: float = 0.5,
    ) -> None:
        super().__init__()
        check_eeg_shape("shallowfbcspnet", n_chans, n_times)
        _check_ints(
            "shallowfbcspnet",
            n_filters_time=n_filters_time,
            filter_time_length=filter_time_length,
            n_filters_spat=n_filters_spat,
            pool_time_length=pool_time_length,
            pool_time_stride=pool_time_stride,
        )
        check_range("shallowfbcspnet drop_prob", drop_prob, low=0.0, high=1.0)
        needed = filter_time_length + pool_time_length - 1
        why = (
            f"it needs n_times >= filter_time_length + pool_time_length - 1 = {needed} samples for one "
            f"pooled step; lower filter_time_length/pool_time_length for short epochs"
        )
        if n_times < needed:
            raise BrainalignError(
                f"shallowfbcspnet cannot take input shape (n_chans={n_chans}, n_times={n_times}): {why}."
            )

        def build() -> nn.Module:
            model: nn.Module = _braindecode_models().ShallowFBCSPNet(
                n_chans=n_chans,
                n_outputs=embed_dim,
                n_times=n_times,
                n_filters_time=n_filters_time,
                filter_time_length=filter_time_length,
                n_filters_spat=n_filters_spat,
                pool_time_length=pool_time_length,
                pool_time_stride=pool_time_stride,
                drop_prob=drop_prob,
            )
            model.final_layer = nn.Identity()  # features (B, n_filters_spat, T', 1)
            return model

        self._setup(
            "shallowfbcspnet",
            build,
            n_chans=n_chans,
            n_times=n_times,
            embed_dim=embed_dim,
            head=head,
            head_drop_prob=head_drop_prob,
            why=why,
        )
