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

__all__ = ["retrieval_ranks", "retrieval_topk", "topk_accuracy", "similarity"]


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
    """
    ranks = []
    for qs in range(0, queries.shape[0], query_chunk):
        q = center_normalize(queries[qs : qs + query_chunk].float())
        t = targets[qs : qs + query_chunk]
        own = (q @ center_normalize(gallery[t].float()).T).diagonal().unsqueeze(1)
        count = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for start in range(0, gallery.shape[0], chunk):
            s = q @ center_normalize(gallery[start : start + chunk].float()).T
            inside = ((t >= start) & (t < start + s.shape[1])).nonzero().squeeze(1)
            s[inside, t[inside] - start] = float("-inf")  # the target itself is not counted
            count += (s >= own).sum(1)
        ranks.append(1 + count)
    return torch.cat(ranks)


def retrieval_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    targets: torch.Tensor | None = None,
    k: int = 5,
    chunk: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best gallery items of each query and their cosine similarities.

    Parameters
    ----------
    queries : torch.Tensor
        ``(Q, D)`` brain embeddings.
    gallery : torch.Tensor
        ``(G, D)`` image embeddings (any device; scored in chunks of ``chunk`` rows).
    targets : torch.Tensor, optional
        ``(Q,)`` gallery row of each query's own image. Its score is lowered to the next float
        below, so the list is in the order :func:`retrieval_ranks` counts: the target after
        every item tying with it.
    k : int
        List length (at most ``G``).
    chunk : int
        Gallery rows scored per matmul: no ``(Q, G)`` matrix exists whole.

    Returns
    -------
    indices, scores : torch.Tensor
        ``(Q, k)`` gallery rows (best first) and their cosine similarities after mean-centring
        (the target's true score, not the lowered one).
    """
    k = min(k, gallery.shape[0])
    q = center_normalize(queries.float())
    best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, gallery.shape[0], chunk):
        s = q @ center_normalize(gallery[start : start + chunk].float()).T
        if targets is not None:
            inside = ((targets >= start) & (targets < start + s.shape[1])).nonzero().squeeze(1)
            cols = targets[inside] - start
            own = s[inside, cols]
            s[inside, cols] = torch.nextafter(own, torch.full_like(own, float("-inf")))
        idx = torch.arange(start, start + s.shape[1], device=q.device).expand(q.shape[0], -1)
        cand_s, pick = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.cat([best_i, idx], 1).gather(1, pick)
        best_s = cand_s
    if targets is not None:  # report the target's true similarity
        hit = best_i == targets.view(-1, 1)
        best_s = torch.where(hit, torch.nextafter(best_s, torch.full_like(best_s, float("inf"))), best_s)
    return best_i, best_s


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
