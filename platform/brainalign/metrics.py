"""Retrieval metrics: pure tensor functions.

Top-k accuracy of N-way retrieval: query ``q`` is correct at k if its target's similarity
is among the k largest of its row. Ties are counted pessimistically: the rank of the
target is ``1 + #(gallery items scoring strictly higher) + #(other items scoring equal)``,
so a constant model scores chance or below, never above.

Non-finite embeddings never score: a query whose embedding (or whose target's gallery row)
holds NaN or Inf gets the worst rank (the gallery size), and a non-finite gallery row never
outranks a finite target (its scores count as -inf). A warning says how many rows were
affected. (``NaN >= x`` is False, so without this an all-NaN model would rank every target
first.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .losses import center_normalize

__all__ = ["retrieval_ranks", "topk_accuracy", "similarity"]

log = logging.getLogger(__name__)


def similarity(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Cosine similarity after mean-centring, ``(Q, D) x (G, D) -> (Q, G)``."""
    return center_normalize(queries.float()) @ center_normalize(gallery.float()).T


def retrieval_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 16384,
    query_chunk: int = 4096,
) -> torch.Tensor:
    """1-based rank of each query's target in the gallery (ties counted against the query).

    One pass over the gallery in chunks of ``chunk`` rows per chunk of ``query_chunk``
    queries: each gallery chunk is normalized, scored with one matmul and the items scoring
    at least the target's score are counted. No sort, and neither the normalized gallery nor
    the ``(Q, G)`` score matrix ever exist whole, so extra memory is
    ``O(query_chunk x chunk + chunk x D)`` whatever the gallery size (benchmarks/bench_retrieval.py).
    The target's own score comes from a matmul of the same form (its column is masked in the
    counting pass), so an item equal to the target ties with it.

    A query whose embedding or target row is not finite gets rank ``G`` (the gallery size),
    and non-finite gallery rows never count as above a target; a warning gives the counts.
    """
    n_gallery = gallery.shape[0]
    ranks = []
    bad_queries = bad_targets = bad_gallery = 0
    for qs in range(0, queries.shape[0], query_chunk):
        q = center_normalize(queries[qs : qs + query_chunk].float())
        t = targets[qs : qs + query_chunk]
        g_t = center_normalize(gallery[t].float())
        own = (q @ g_t.T).diagonal().unsqueeze(1)
        q_bad = ~torch.isfinite(q).all(1)
        t_bad = ~torch.isfinite(g_t).all(1) & ~q_bad
        own = torch.where(q_bad | t_bad, torch.zeros_like(own[:, 0]), own[:, 0]).unsqueeze(1)
        count = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for start in range(0, n_gallery, chunk):
            g = center_normalize(gallery[start : start + chunk].float())
            g_bad = ~torch.isfinite(g).all(1)
            s = q @ g.T
            if bool(g_bad.any()):
                s[:, g_bad] = float("-inf")  # a non-finite gallery row never beats a finite target
                if qs == 0:
                    bad_gallery += int(g_bad.sum())
            inside = ((t >= start) & (t < start + s.shape[1])).nonzero().squeeze(1)
            s[inside, t[inside] - start] = float("-inf")  # the target itself is not counted
            count += (s >= own).sum(1)
        rank = 1 + count
        rank[q_bad | t_bad] = n_gallery  # a query that cannot be scored gets the worst rank
        bad_queries += int(q_bad.sum())
        bad_targets += int(t_bad.sum())
        ranks.append(rank)
    if bad_queries or bad_targets or bad_gallery:
        log.warning(
            "retrieval: %d of %d queries and %d of %d gallery rows are not finite (NaN/Inf); %d queries "
            "(%d with a non-finite target) get the worst rank %d and non-finite gallery rows never rank "
            "above a target. A model or table that produces NaN/Inf is broken: its scores are not results.",
            bad_queries, queries.shape[0], bad_gallery, n_gallery, bad_queries + bad_targets, bad_targets,
            n_gallery,
        )
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


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
