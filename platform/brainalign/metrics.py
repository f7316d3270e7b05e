"""Retrieval metrics: pure tensor functions.

Top-k accuracy of N-way retrieval: query ``q`` is correct at k if its target's similarity
is among the k largest of its row. Ties are counted pessimistically: the rank of the
target is ``1 + #(gallery items scoring strictly higher) + #(other items scoring equal)``,
so a constant model scores chance or below, never above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .losses import center_normalize

__all__ = ["retrieval_ranks", "topk_accuracy", "similarity"]


def similarity(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Cosine similarity after mean-centring, ``(Q, D) x (G, D) -> (Q, G)``."""
    return center_normalize(queries.float()) @ center_normalize(gallery.float()).T


def retrieval_ranks(
    queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """1-based rank of each query's target in the gallery (ties counted against the query).

    Memory is ``O(chunk x G)``: queries are processed in chunks, and no sort is done, so a
    1M-item gallery needs about the gallery itself plus one chunk of scores.
    """
    g = center_normalize(gallery.float())
    ranks = []
    for start in range(0, queries.shape[0], chunk):
        q = center_normalize(queries[start : start + chunk].float())
        t = targets[start : start + chunk]
        s = q @ g.T  # (q, G)
        own = s.gather(1, t.view(-1, 1))
        higher = (s > own).sum(1)
        ties = (s == own).sum(1) - 1  # other items with the same score
        ranks.append(1 + higher + ties)
    return torch.cat(ranks)


def topk_accuracy(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    targets: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` fractions for N-way retrieval.

    ``targets[i]`` is the gallery row of query ``i`` (default: ``i``, queries aligned with
    the gallery).
    """
    if targets is None:
        targets = torch.arange(queries.shape[0], device=queries.device)
    ranks = retrieval_ranks(queries, gallery, targets)
    return {f"top{k}": float((ranks <= k).float().mean().item()) for k in ks}
