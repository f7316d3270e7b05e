"""ATM-S (Li et al., NeurIPS 2024): channel-token transformer + subject token + NICE head.

Reference: Li, D., Wei, C., Li, S., Zou, J., Liu, Q. "Visual Decoding and Reconstruction via EEG
Embeddings with Guided Diffusion", NeurIPS 2024 (github.com/dongyangli-del/EEG_Image_decode,
``ATMS``), built on iTransformer (Liu et al., ICLR 2024); as used by AlignVis ``atms.py``.

Architecture: each channel's whole time series is one token, ``Linear(n_times, d_model)``; a
learned subject token is prepended; one post-norm transformer encoder layer (4 heads, FFN 256,
dropout 0.25) and a final LayerNorm; the ``n_chans`` channel tokens ``(B, n_chans, d_model)``
then go through NICE (its conv encoder runs along the ``d_model`` axis), NICE's projector and
AlignVis's ``repr_layer``.

Quirks of the reference, fixed here on purpose
----------------------------------------------
1. Subject ids: the reference takes raw ids 1..10 into ``Embedding(10, 250)`` and switches the
   WHOLE batch to the shared token as soon as any id is >= 10, so subject 10 never had its own
   token and row 0 was never used. Here ``subject_index`` is 0-based: every training subject
   ``0 <= s < n_subjects`` gets its own token, ``-1`` (a subject not seen in training) gets the
   shared token, per sample rather than per batch.
2. The shared token: the reference never trains it (no training subject maps to it), so an
   unseen subject meets a random vector. Here, in training, each sample's subject token is
   replaced by the shared one with probability ``subject_drop_prob`` (a dropout of the subject
   identity), so the shared token learns a subject-agnostic context. ``subject_drop_prob=0``
   restores the reference behaviour.
3. Dropped channel: the reference keeps ``enc_out[:, :63]``, i.e. the subject token and the first
   62 channels, silently dropping the last channel (O2) so the hard-coded 63-row NICE conv fits.
   Here the subject token is dropped after the transformer (it has already informed every
   channel token through attention) and all ``n_chans`` channel tokens are kept.
4. Fixed length: the reference's token embedding is ``Linear(250, 250)`` and only works for 250
   samples. Here it is ``Linear(n_times, d_model)``, so any ``n_times`` works; ``d_model``
   (default 250) is the length NICE sees.
5. Unused parameters: the reference also holds ``subject_wise_linear`` (2 x ``Linear(250, 250)``),
   a mask token and a time-feature embedding that forward never uses; they are left out.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from .._checks import BrainalignError, check_range, check_type
from ._registry import register_encoder
from .nice import NICE, check_eeg_shape

__all__ = ["ATMS"]

logger = logging.getLogger(__name__)


class SubjectTokenDropout(_DropoutNd):
    """In training, replace each sample's subject index by the shared one with probability ``p``.

    A dropout of the subject identity (a ``_DropoutNd``, so ``eval()`` switches it off like any
    dropout). ``forward(index, shared)`` maps a LongTensor ``(B,)`` to ``(B,)``.
    """

    def forward(self, index: torch.Tensor, shared: int) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return index
        drop = torch.rand(index.shape, device=index.device) < self.p
        return torch.where(drop, torch.full_like(index, shared), index)


class _EncoderLayer(nn.Module):
    """iTransformer's post-norm encoder layer over tokens ``(B, N, d_model)``.

    Attention projections are ``d_model -> n_heads * (d_model // n_heads)`` as in the reference
    (248 for 250 / 4); the FFN is the reference's pair of 1x1 ``Conv1d`` written as ``Linear``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, drop_prob: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_keys = d_model // n_heads
        inner = self.d_keys * n_heads
        self.query = nn.Linear(d_model, inner)
        self.key = nn.Linear(d_model, inner)
        self.value = nn.Linear(d_model, inner)
        self.out = nn.Linear(inner, d_model)
        self.attn_drop = nn.Dropout(drop_prob)  # applied to the attention weights, via SDPA
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        shape = (batch, n_tokens, self.n_heads, self.d_keys)
        q, k, v = (lin(x).view(shape).transpose(1, 2) for lin in (self.query, self.key, self.value))
        p = self.attn_drop.p if self.attn_drop.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # scale 1/sqrt(d_keys)
        a = self.out(a.transpose(1, 2).reshape(batch, n_tokens, -1))
        x = self.norm1(x + self.dropout(a))
        y = self.dropout(F.gelu(self.ff1(x)))
        y = self.dropout(self.ff2(y))
        out: torch.Tensor = self.norm2(x + y)
        return out


@register_encoder(
    "atms",
    reference="Li et al. 2024 (ATM-S), NeurIPS; iTransformer channel tokens + NICE head",
    modalities=("eeg", "meg"),
)
class ATMS(nn.Module):
    """ATM-S, subject-aware: ``model(x, subject_index)``, ``(B, n_chans, n_times) -> (B, embed_dim)``.

    Reference: Li et al., NeurIPS 2024 (ATM-S), as used by AlignVis; see the module docstring for
    the reference's quirks and how they are fixed. Parameter count at the paper's shapes
    (63 x 250, 10 training subjects, D=768): 2,837,588 = 444,500 transformer part (token
    embedding 62,750, 11 subject tokens 2,750, attention 248,994, FFN 128,506, LayerNorms 1,500)
    + 2,393,088 NICE head incl. ``repr_layer`` (AlignVis: about 2.84M). D=1024: 4,125,012
    (AlignVis: about 4.13M).

    Parameters
    ----------
    n_chans, n_times : int
        Input shape; any ``n_times >= 2`` (the token embedding is ``Linear(n_times, d_model)``).
    embed_dim : int
        Output dimension.
    n_subjects : int
        Training subjects; each gets a token. Index ``-1`` means "not seen in training".
    d_model : int
        Token width (250); also the length NICE convolves over, so it must be at least
        ``kernel_time + pool_time - 1`` (75).
    n_heads, d_ff, n_layers : int
        Attention heads (4), FFN width (256), encoder layers (1).
    drop_prob : float
        Transformer dropout: embedding, attention weights, residual branches (0.25).
    subject_drop_prob : float
        Training-time probability of using the shared token instead of the subject's (0.1; 0
        reproduces the reference, which never trains the shared token).
    n_filters, kernel_time, pool_time, pool_stride : int
        NICE head conv settings (40, 25, 51, 5).
    conv_drop_prob, proj_drop_prob : float
        NICE head dropouts (0.5, 0.5).
    fast : bool
        NICE head's exact fused temporal conv + pooling.

    Raises
    ------
    BrainalignError
        For ``n_times == 1`` (fMRI layout), ``d_model`` too short for the NICE head, bad
        ``n_subjects``; in ``forward`` for a missing or out-of-range ``subject_index``.
    """

    subject_aware = True

    def __init__(
        self,
        *,
        n_chans: int,
        n_times: int,
        embed_dim: int,
        n_subjects: int = 1,
        d_model: int = 250,
        n_heads: int = 4,
        d_ff: int = 256,
        n_layers: int = 1,
        drop_prob: float = 0.25,
        subject_drop_prob: float = 0.1,
        n_filters: int = 40,
        kernel_time: int = 25,
        pool_time: int = 51,
        pool_stride: int = 5,
        conv_drop_prob: float = 0.5,
        proj_drop_prob: float = 0.5,
        fast: bool = True,
    ) -> None:
        super().__init__()
        check_eeg_shape("atms", n_chans, n_times)
        for name, value in (
            ("n_subjects", n_subjects),
            ("d_model", d_model),
            ("n_heads", n_heads),
            ("d_ff", d_ff),
            ("n_layers", n_layers),
        ):
            check_type(f"atms {name}", value, int)
            check_range(f"atms {name}", value, low=1)
        check_range("atms n_heads", n_heads, high=d_model)
        check_range("atms drop_prob", drop_prob, low=0.0, high=1.0)
        check_range("atms subject_drop_prob", subject_drop_prob, low=0.0, high=1.0)
        needed = kernel_time + pool_time - 1
        if d_model < needed:
            raise BrainalignError(
                f"ATM-S d_model={d_model} is too short for its NICE head, which convolves along the "
                f"d_model axis and needs at least kernel_time + pool_time - 1 = {needed}."
            )
        self.n_subjects = n_subjects
        self.embedding = nn.Linear(n_times, d_model)
        # Rows 0..n_subjects-1: training subjects; row n_subjects: the shared token.
        self.subject_embedding = nn.Embedding(n_subjects + 1, d_model)
        self.subject_dropout = SubjectTokenDropout(subject_drop_prob)
        self.embed_dropout = nn.Dropout(drop_prob)
        self.layers = nn.ModuleList(_EncoderLayer(d_model, n_heads, d_ff, drop_prob) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = NICE(
            n_chans=n_chans,
            n_times=d_model,
            embed_dim=embed_dim,
            n_filters=n_filters,
            kernel_time=kernel_time,
            pool_time=pool_time,
            pool_stride=pool_stride,
            drop_prob=conv_drop_prob,
            proj_drop_prob=proj_drop_prob,
            fast=fast,
        )

    def _check_subjects(self, subject_index: torch.Tensor | None, batch: int) -> torch.Tensor:
        if subject_index is None:
            raise BrainalignError(
                "ATM-S is subject-aware: call model(x, subject_index) with a LongTensor (B,) of "
                f"training-subject indices in [0, {self.n_subjects}) or -1 for an unseen subject."
            )
        if subject_index.dtype != torch.long or subject_index.shape != (batch,):
            raise BrainalignError(
                f"subject_index must be a LongTensor of shape ({batch},), got "
                f"{subject_index.dtype} {tuple(subject_index.shape)}."
            )
        bad = (subject_index < -1) | (subject_index >= self.n_subjects)
        if bool(bad.any()):
            raise BrainalignError(
                f"subject_index values must be in [-1, {self.n_subjects}) (n_subjects={self.n_subjects}; "
                f"-1 = unseen subject), got {sorted(set(subject_index[bad].tolist()))}."
            )
        return subject_index

    def forward(self, x: torch.Tensor, subject_index: torch.Tensor | None = None) -> torch.Tensor:
        """Embed a batch.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, n_chans, n_times)``.
        subject_index : torch.Tensor
            LongTensor ``(B,)``: training-subject index in ``[0, n_subjects)``, or ``-1`` for a
            subject not seen in training (uses the shared token).

        Returns
        -------
        torch.Tensor
            ``(B, embed_dim)``, not normalized.
        """
        index = self._check_subjects(subject_index, x.shape[0])
        index = torch.where(index < 0, torch.full_like(index, self.n_subjects), index)
        index = self.subject_dropout(index, self.n_subjects)
        tokens = self.embedding(x)  # (B, C, d_model): one token per channel
        subject = self.subject_embedding(index).unsqueeze(1)  # (B, 1, d_model)
        h = self.embed_dropout(torch.cat([subject, tokens], dim=1))
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)[:, 1:]  # drop the subject token, keep every channel token
        out: torch.Tensor = self.head(h)
        return out
