"""Symmetric InfoNCE (the paper's eq. 2) over in-batch negatives.

Both brain and image embeddings are mean-centred across the feature dimension and then
L2-normalized (as AlignVis does) before the cosine logits are scaled by ``1 / temperature``.
The temperature is either fixed (a buffer) or learned (a parameter that
:func:`brainalign.train.loop.build_run` puts in the optimizer): never ambiguous.

With N data-parallel workers the batch is global: each worker encodes ``B / N`` rows, the
embeddings (and image ids) of all workers are gathered, and each worker's loss covers its own
rows against the whole global batch (open_clip's ``local_loss`` with ``gather_with_grad``), so
every row sees the negatives of all ``B`` rows whatever N is. The gather's backward sums the
gradients of every worker's loss into the rows' owner; DDP's average over workers then gives
exactly the one-worker gradient of the global loss (tests/train/test_global_batch.py).

A learned temperature is kept at ``T >= 1 / MAX_LOGIT_SCALE`` (0.01, as CLIP) by clamping the
PARAMETER ``logit_scale = log(1/T)`` in place after every optimizer step
(:meth:`SymmetricInfoNCE.clamp_`, registered by ``build_run`` as an optimizer step hook; the
open_clip recipe). The forward pass never clamps, so the gradient with respect to the
temperature is the same at the cap as anywhere else and the optimizer can always move it back
down; clamping ``exp(logit_scale)`` in the forward instead would zero that gradient as soon as
the parameter crossed the cap, leaving the temperature stuck there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_range
from .config import MAX_LOGIT_SCALE

__all__ = ["MAX_LOGIT_SCALE", "SymmetricInfoNCE", "center_normalize", "gather_rows"]


def center_normalize(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Subtract each row's mean over features, then L2-normalize each row."""
    z = z - z.mean(dim=-1, keepdim=True)
    return F.normalize(z, dim=-1, eps=eps)


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """All-gather equal-sized row blocks (rank order); backward sums every rank's gradient
    for a block into its owner (each rank's loss depends on every rank's rows)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]  # type: ignore[attr-defined]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)  # SUM over ranks
        start = ctx.rank * ctx.rows  # type: ignore[attr-defined]
        return grad[start : start + ctx.rows]  # type: ignore[attr-defined]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``(b, ...)`` on each of N ranks -> ``(N * b, ...)``, rank-major, on every rank.

    Differentiable when ``x`` requires grad (the backward all-reduces, then keeps this rank's
    block); a plain all-gather otherwise. Without a process group (or with one rank) it
    returns ``x``. Every rank must pass the same shape.
    """
    _, world = _world()
    if world == 1:
        return x
    if x.requires_grad:
        out: torch.Tensor = _GatherRows.apply(x)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class SymmetricInfoNCE(nn.Module):
    """``(CE(logits, arange) + CE(logits.T, arange)) / 2`` with ``logits = b @ i.T / T``.

    Parameters
    ----------
    temperature : float
        Initial (or fixed) temperature ``T > 0``.
    learn_temperature : bool
        If True, ``log(1/T)`` is an ``nn.Parameter`` that must be optimized and is kept at
        ``T >= 1 / MAX_LOGIT_SCALE`` by :meth:`clamp_` after each step (the initial ``T``
        must then respect the cap); if False it is a buffer, used exactly as given, and
        never changes.
    """

    def __init__(self, temperature: float = 0.04, learn_temperature: bool = False) -> None:
        super().__init__()
        check_range("temperature", temperature, low=0.0, low_inclusive=False)
        if learn_temperature:
            check_range("temperature (learned, initial)", temperature, low=1.0 / MAX_LOGIT_SCALE)
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
        """``1/T`` as a tensor. Not clamped here: the cap is on the parameter (:meth:`clamp_`)."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project a learned ``logit_scale`` back to ``<= log(MAX_LOGIT_SCALE)`` (in place).

        Called after every optimizer step (``build_run`` registers it as a step hook), so
        the forward pass always sees ``T >= 0.01`` while the gradient is never cut.
        """
        if self.learn_temperature:
            self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))

    def logits(self, brain: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits ``(B_brain, B_image)`` after centring and normalizing."""
        b = center_normalize(brain.float())
        i = center_normalize(image.float())
        return self.scale() * b @ i.T

    def forward(
        self,
        brain: torch.Tensor,
        image: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        *,
        gather: bool = False,
    ) -> torch.Tensor:
        """Loss for paired rows ``brain[k] <-> image[k]``; shapes ``(B, D)`` both.

        ``image_ids`` (``(B,)``, optional) names each row's image. A batch can hold one image
        several times (several training subjects, or single trials); those pairs are the same
        image, not negatives, so their off-diagonal logits are masked out of both softmaxes.
        Without duplicates the loss is exactly the plain one.

        ``gather=True`` (data-parallel training, every rank passing its ``b = B / N`` rows):
        the rows of all ranks form the global batch; this rank's loss is the mean over its own
        rows of both cross-entropies against all ``B`` rows, so the mean over ranks is the
        one-process loss of the global batch. Duplicate images are masked across ranks. With
        one rank (or no process group) it is the plain loss.
        """
        if brain.shape != image.shape:
            raise ValueError(f"brain {tuple(brain.shape)} and image {tuple(image.shape)} embeddings differ in shape.")
        rank, world = _world()
        if gather and world > 1:
            return self._global(brain, image, image_ids, rank)
        logits = self.logits(brain, image)
        target = torch.arange(logits.shape[0], device=logits.device)
        if image_ids is not None:
            same = image_ids.view(-1, 1) == image_ids.view(1, -1)
            same.fill_diagonal_(False)
            if bool(same.any()):
                logits = logits.masked_fill(same, float("-inf"))
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    def _global(
        self, brain: torch.Tensor, image: torch.Tensor, image_ids: torch.Tensor | None, rank: int
    ) -> torch.Tensor:
        """This rank's rows against the gathered global batch (see :meth:`forward`)."""
        b = center_normalize(brain.float())
        i = center_normalize(image.float())
        all_b, all_i = gather_rows(b), gather_rows(i)
        scale = self.scale()
        to_image = scale * b @ all_i.T  # (b, B): this rank's brains vs every image
        to_brain = scale * i @ all_b.T  # (b, B): this rank's images vs every brain
        n = b.shape[0]
        target = torch.arange(n, device=b.device) + rank * n
        if image_ids is not None:
            ids = image_ids.view(-1)
            same = ids.view(-1, 1) == gather_rows(ids).view(1, -1)
            same[torch.arange(n, device=b.device), target] = False
            if bool(same.any()):  # same mask both ways: own ids vs every rank's ids
                to_image = to_image.masked_fill(same, float("-inf"))
                to_brain = to_brain.masked_fill(same, float("-inf"))
        return 0.5 * (F.cross_entropy(to_image, target) + F.cross_entropy(to_brain, target))

    def gallery_loss(
        self, brain: torch.Tensor, image: torch.Tensor, image_ids: torch.Tensor, chunk_size: int = 1024
    ) -> torch.Tensor:
        """The loss of :meth:`forward` over ALL rows at once, in row chunks of ``chunk_size``.

        Every row is a negative of every other (repeated images masked out as in
        :meth:`forward`), so the value is that of one batch holding the whole set; only the
        memory is bounded, ``O(chunk_size x N)`` instead of ``O(N^2)``: each chunk of rows
        gives those rows' log-sum-exp and adds to a running log-sum-exp of every column.

        Parameters
        ----------
        brain, image : torch.Tensor
            ``(N, D)`` paired embeddings (not normalized).
        image_ids : torch.Tensor
            ``(N,)`` image of each row.
        chunk_size : int
            Rows per chunk (memory only; the value does not depend on it beyond rounding).

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """
        if brain.shape != image.shape:
            raise ValueError(f"brain {tuple(brain.shape)} and image {tuple(image.shape)} embeddings differ in shape.")
        b = center_normalize(brain.float())
        i = center_normalize(image.float())
        ids = image_ids.view(-1).to(b.device)
        scale = self.scale()
        n = b.shape[0]
        row_lse, positives = [], []
        col_lse = torch.full((n,), float("-inf"), device=b.device)
        for s in range(0, n, chunk_size):
            lg = scale * b[s : s + chunk_size] @ i.T  # (c, N): rows s.., every column
            own = torch.arange(lg.shape[0], device=b.device)
            positives.append(lg[own, s + own])
            same = ids[s : s + chunk_size, None] == ids[None, :]
            same[own, s + own] = False
            lg = lg.masked_fill(same, float("-inf"))
            row_lse.append(torch.logsumexp(lg, dim=1))
            col_lse = torch.logsumexp(torch.stack([col_lse, torch.logsumexp(lg, dim=0)]), dim=0)
        pos = torch.cat(positives)
        return 0.5 * ((torch.cat(row_lse) - pos).mean() + (col_lse - pos).mean())
