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
from dataclasses import dataclass

import torch

from ._checks import BrainalignError
from .losses import center_normalize

__all__ = ["retrieval_ranks", "retrieval_topk", "topk_accuracy", "similarity"]

log = logging.getLogger(__name__)

_U32 = 2.0**-24  # unit roundoff of float32
_EPS = 1e-8  # center_normalize's eps (F.normalize clamps the norm at it)
_PAIRS = 4096  # candidate pairs scored in float64 per batch (2 x 25 MB at D = 768)
# Gallery rows per chunk (at most; fewer for large query blocks so that a block's scores stay
# ~32 MB). The GEMM runs at the same rate from 8k to 32k rows; fewer, larger chunks mean fewer
# parallel regions, which on shared cores each cost a scheduler slice (bench_retrieval.py).
_CHUNK = 32768


def similarity(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Cosine similarity after mean-centring, ``(Q, D) x (G, D) -> (Q, G)``."""
    return center_normalize(queries.float()) @ center_normalize(gallery.float()).T


@dataclass
class _Bad:
    """Non-finite rows met in one call (for the warning and the zero-query rule)."""

    queries: int = 0
    targets: int = 0
    gallery: int = 0


def _input_rounding(device: torch.device) -> float:
    """Relative rounding a float32 matmul may apply to its inputs under torch's current settings.

    0 when float32 matmuls are IEEE (torch's default); 2**-7 (bfloat16 on both inputs) when
    the user allowed TF32/bfloat16 (``torch.set_float32_matmul_precision("medium")`` and the
    like): the screening band then widens so that the ranks stay exact.
    """
    try:
        precs = [torch.backends.fp32_precision]
        if device.type == "cuda":
            precs.append(torch.backends.cuda.matmul.fp32_precision)
        else:
            precs += [torch.backends.mkldnn.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision]
    except (AttributeError, RuntimeError):  # older torch or mixed legacy/new settings: assume the worst
        return 2.0**-7
    return 0.0 if all(p in ("none", "ieee") for p in precs) else 2.0**-7


_ONEDNN = {"ok": True}


def _gemm(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``q @ g.T`` in float32, ``(b, D) x (C, D) -> (b, C)``.

    On CPU through oneDNN's matmul when this torch has it: on AVX-512 CPUs where MKL takes its
    AVX2 path (AMD) it runs 2-4x faster than ``torch.mm`` (benchmarks/bench_retrieval.py). Any
    float32 summation order obeys the same error bound, which is all the screening relies on.
    """
    if q.device.type == "cpu" and _ONEDNN["ok"]:
        try:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(q, g, None, "none", [], "")
            return out
        except (AttributeError, RuntimeError):  # a build without oneDNN: plain GEMM from now on
            _ONEDNN["ok"] = False
    return q @ g.T


def _dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products in float64 of float32 rows ``(P, D) x (P, D) -> (P,)``.

    A product of two float32 numbers is exact in float64, so each value is the exact dot product
    of the float32 vectors up to float64 summation (relative 1e-13): the "exact formula".
    Identical rows give identical values (the same reduction runs on every row, whatever P).
    """
    return _pair_dots(a.double(), torch.arange(a.shape[0], device=a.device), b)


def _pair_dots(a64: torch.Tensor, ai: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a64[ai[k]] . b[k])`` in float64 for every k, in batches of ``_PAIRS`` rows through
    reused buffers (fresh batch-sized allocations page-fault on every call)."""
    p, dim = b.shape
    out = torch.empty(p, dtype=torch.float64, device=b.device)
    if p == 0:
        return out
    n = min(p, _PAIRS)
    left = torch.empty(n, dim, dtype=torch.float64, device=b.device)
    right = torch.empty(n, dim, dtype=torch.float64, device=b.device)
    for s in range(0, p, n):
        m = min(n, p - s)
        torch.index_select(a64, 0, ai[s : s + m], out=left[:m])
        right[:m].copy_(b[s : s + m])
        torch.sum(left[:m].mul_(right[:m]), dim=1, out=out[s : s + m])
    return out


def retrieval_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None = None,
    query_chunk: int = 2048,
) -> torch.Tensor:
    """1-based rank of each query's target in the gallery (ties counted against the query).

    Exactly the ranks of the naive computation (normalize queries and gallery with
    :func:`~brainalign.losses.center_normalize`, score every pair, count the other items scoring
    at least the target), where "scoring" is the exact dot product of the normalized float32
    vectors. Ties are exact: an item whose normalized row equals the target's (a duplicate, or a
    power-of-two rescaling) ties with it and counts against the query.

    How: one pass over the gallery in chunks of ``chunk`` rows per block of ``query_chunk``
    queries. Each chunk is normalized into a reused buffer and scored with one float32 GEMM.
    A float32 dot product of ``D`` terms is within ``gamma_D * |q| * |g|`` of the exact one
    (``gamma_D = D u / (1 - D u)``, ``u = 2**-24``, any summation order), so an item whose GEMM
    score is farther than that bound from the target's exact score is decided by the GEMM; the
    few within the band are rescored exactly (float64 products of the float32 rows, the target's
    own score in the same call) and counted by that. Nothing is sorted, and neither the
    normalized gallery nor the ``(Q, G)`` score matrix exist whole: extra memory is
    ``O(chunk x D + query_chunk x chunk)`` (tens of MB), whatever the gallery size
    (benchmarks/bench_retrieval.py). If torch was told it may compute float32 matmuls in
    TF32/bfloat16, the band widens to bfloat16 rounding and the ranks stay exact (slower).

    Non-finite rows: a query whose embedding or target row is not finite gets rank ``G`` (the
    gallery size), and non-finite gallery rows never count as above a target; a warning gives
    the counts.

    Parameters
    ----------
    queries : torch.Tensor
        ``(Q, D)`` query embeddings (any float dtype; scored in float32).
    gallery : torch.Tensor
        ``(G, D)`` gallery embeddings, on the same device.
    targets : torch.Tensor
        ``(Q,)`` integer gallery row of each query's target.
    chunk : int, optional
        Gallery rows per chunk (default: 32,768 for up to 256 queries per block, fewer for
        larger blocks, so that a block's scores stay about 32 MB).
    query_chunk : int
        Queries per block.

    Returns
    -------
    torch.Tensor
        ``(Q,)`` int64 ranks in ``[1, G]``.

    Raises
    ------
    BrainalignError
        If the shapes disagree or a target is not a gallery row.
    """
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise BrainalignError(
            f"retrieval needs queries (Q, D) and gallery (G, D) with the same D, got queries "
            f"{tuple(queries.shape)} and gallery {tuple(gallery.shape)}."
        )
    n_query, n_gallery = queries.shape[0], gallery.shape[0]
    targets = targets.reshape(-1).long()
    if targets.shape[0] != n_query:
        raise BrainalignError(
            f"retrieval got {targets.shape[0]} targets for {n_query} queries: give one per query."
        )
    if n_query and (n_gallery == 0 or int(targets.min()) < 0 or int(targets.max()) >= n_gallery):
        raise BrainalignError(
            f"retrieval targets must be gallery rows in [0, {n_gallery - 1}], got values in "
            f"[{int(targets.min())}, {int(targets.max())}]."
        )
    ranks = torch.empty(n_query, dtype=torch.long, device=queries.device)
    bad = _Bad()
    for qs in range(0, n_query, query_chunk):
        ranks[qs : qs + query_chunk] = _block_ranks(
            queries[qs : qs + query_chunk], gallery, targets[qs : qs + query_chunk], chunk, bad, first=qs == 0
        )
    if bad.queries or bad.targets or bad.gallery:
        log.warning(
            "retrieval: %d of %d queries and %d of %d gallery rows are not finite (NaN/Inf); %d queries "
            "(%d with a non-finite target) get the worst rank %d and non-finite gallery rows never rank "
            "above a target. A model or table that produces NaN/Inf is broken: its scores are not results.",
            bad.queries,
            n_query,
            bad.gallery,
            n_gallery,
            bad.queries + bad.targets,
            bad.targets,
            n_gallery,
        )
    return ranks


def _outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float64 -> float32 rounded away from ``x`` in the given direction (never inward)."""
    pad = x.abs() * (4 * _U32) + 1e-30
    return (x + pad if up else x - pad).float()


@dataclass
class _Block:
    """One block of queries, prepared once for every gallery chunk (see :func:`_block_ranks`)."""

    q: torch.Tensor  # (b, D) normalized queries, zero rows for inactive ones
    q64: torch.Tensor  # the same in float64 (for the exact rescoring)
    q_ext: torch.Tensor  # (b + 1, D): q and an all-ones row (its GEMM row gives the row sums)
    g_t: torch.Tensor  # (b, D) normalized target rows
    t: torch.Tensor  # (b,) target gallery rows
    active: torch.Tensor  # (b,) bool: finite query and target, not a zero query
    own32: torch.Tensor  # (b,) exact target score, as float32 for the screen
    lo_s: torch.Tensor  # screen band (score units x n^2 / |g|^2), +inf for inactive queries
    hi_s: torch.Tensor
    lo_t: torch.Tensor  # tight band (score units), +inf for inactive queries
    hi_t: torch.Tensor
    rho_coef: float  # relative error of n^2 per (|g| / n)^2
    screen_ok: bool  # False with reduced-precision matmuls: every row takes the tight path


def _block_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    t: torch.Tensor,
    chunk: int | None,
    bad: _Bad,
    *,
    first: bool,
) -> torch.Tensor:
    """Ranks of one block of queries against the whole gallery (see :func:`retrieval_ranks`).

    Screening (per gallery chunk, on the raw rows, nothing normalized): with ``q`` the
    normalized query (sum ~ 0), ``q . g_j = n_j * cos_j + m_j * sum(q)`` where ``m_j`` and
    ``n_j`` are the row's mean and centred norm, so ``q . g_j - own * n_j`` has the sign of
    ``cos_j - own`` up to a bound. One GEMM gives ``q . g_j`` for every query and, from an extra
    all-ones query, the row sums; one pass gives the row norms ``|g_j|``, and
    ``n_j^2 = |g_j|^2 - (sum g_j)^2 / D``. Every float32 error (GEMM, the row statistics, the
    normalization the naive method applies, the comparison) is bounded and summed into a band
    ``|g_j|^2 / n_j * beta_i``; items outside it are decided, items inside are rescored exactly.
    Rows where this is ill-conditioned (mean >> spread, overflow, NaN, tiny norm) take the tight
    path instead: normalized exactly as the naive method does, GEMM, band ``gamma_D * |q|``.
    """
    n_gallery, dim = gallery.shape
    dev = gallery.device
    q = center_normalize(queries.float())
    g_t = center_normalize(gallery[t].float())
    q_bad = ~torch.isfinite(q).all(1)
    t_bad = ~torch.isfinite(g_t).all(1) & ~q_bad
    zero = (q == 0).all(1) & ~q_bad & ~t_bad  # every score is 0: handled without the gallery pass
    active = ~(q_bad | t_bad | zero)
    q = torch.where(active.unsqueeze(1), q, torch.zeros_like(q))
    g_t = torch.where(active.unsqueeze(1), g_t, torch.zeros_like(g_t))
    own = _dot64(q, g_t)
    q64 = q.double()
    qnorm = torch.linalg.vector_norm(q64, dim=1)
    sigma = q64.sum(1).abs()
    u, gamma = _U32, dim * _U32 / (1 - dim * _U32)
    eps_in = _input_rounding(dev)
    c_in = (1 + eps_in) ** 2 * (1 + gamma) - 1  # relative error bound of one (maybe reduced) dot
    inf = torch.tensor(float("inf"), device=dev)
    # tight path: |GEMM(q, g_hat) - exact| <= c_in * |q| * |g_hat|, |g_hat| <= 1 + 2 gamma
    beta_t = 1.05 * c_in * (1 + 2 * gamma) * qnorm
    # screen (see the docstring): |(q.g - own n) - n (cos - own)| <= |g|^2 / n * beta
    rho_coef = 2.1 * gamma + 2 * c_in + c_in**2
    beta_s = 1.05 * (
        qnorm * (c_in + gamma + 10 * u) + 1.01 * sigma / dim**0.5 + own.abs() * (rho_coef + gamma + 5 * u)
    )
    blk = _Block(
        q=q,
        q64=q64,
        q_ext=torch.cat([q, torch.ones(1, dim, device=dev)]),
        g_t=g_t,
        t=t,
        active=active,
        own32=own.float(),
        lo_s=torch.where(active, -_outward(beta_s, up=True), inf),
        hi_s=torch.where(active, _outward(beta_s, up=True), inf),
        lo_t=torch.where(active, _outward(own - beta_t, up=False), inf),
        hi_t=torch.where(active, _outward(own + beta_t, up=True), inf),
        rho_coef=rho_coef,
        screen_ok=eps_in == 0.0,
    )
    count = torch.zeros(q.shape[0], dtype=torch.long, device=dev)
    step = chunk or max(1024, min(_CHUNK, 8_388_608 // max(1, q.shape[0])))
    scan = bool(active.any()) or first  # the first block also counts the non-finite gallery rows
    for start in range(0, n_gallery if scan else 0, step):
        c = gallery[start : start + step].float()
        f = _gemm(blk.q_ext, c) if blk.screen_ok else None
        gn = torch.linalg.vector_norm(c, dim=1).double() if blk.screen_ok else None
        count += _scan_chunk(blk, start, c, f, gn, bad, first)
    count[zero] = n_gallery - bad.gallery - 1  # ties with every finite row (the first block counted them)
    ranks = 1 + count
    ranks[q_bad | t_bad] = n_gallery  # a query that cannot be scored gets the worst rank
    bad.queries += int(q_bad.sum())
    bad.targets += int(t_bad.sum())
    return ranks


def _scan_chunk(
    blk: _Block,
    start: int,
    c: torch.Tensor,
    f: torch.Tensor | None,
    gn: torch.Tensor | None,
    bad: _Bad,
    first: bool,
) -> torch.Tensor:
    """Per-query counts of the items of gallery rows ``start ..`` (``c``, raw float32) scoring at
    least the target: screened from the GEMM ``f`` (``q_ext @ c.T``) and row norms ``gn``,
    ill-conditioned rows on the tight path, undecided items rescored exactly."""
    dev, dim = c.device, c.shape[1]
    count = torch.zeros(blk.q.shape[0], dtype=torch.long, device=dev)
    rows = torch.arange(blk.q.shape[0], device=dev)
    t, active = blk.t, blk.active
    tgt = active & (t >= start) & (t < start + c.shape[0])  # queries whose target is in this chunk
    any_active = bool(active.any())
    if f is not None and gn is not None:
        s1 = f[-1].double()
        n2 = gn * gn - s1 * s1 / dim
        rho = blk.rho_coef * gn * gn / n2
        # screenable: n well determined (rho), and |g| in [1e-10, 1e18] so that the squares, the
        # scale n / |g|^2 and the screened values are normal float32 numbers (no underflow)
        special = ~((n2 > 0) & (rho <= 0.01) & (gn >= 1e-10) & (gn <= 1e18) & torch.isfinite(s1))
        n = n2.clamp_min(1e-300).sqrt()
        s: torch.Tensor | None = f[:-1]
        s.addr_(blk.own32, n.float(), alpha=-1).mul_((n / (gn * gn)).float())  # (q.g - own n) / (|g|^2 / n)
    else:
        special = torch.ones(c.shape[0], dtype=torch.bool, device=dev)
        s = None
    sp = special.nonzero()[:, 0]
    if sp.numel():
        # ill-conditioned rows: normalized as the naive method does, scored with a GEMM
        g_sp = center_normalize(c[sp])
        row_bad = ~torch.isfinite(g_sp).all(1)
        if first:
            bad.gallery += int(row_bad.sum())
        if s is not None:
            s[:, sp] = float("-inf")  # decided here instead
        if any_active:
            f_sp = _gemm(blk.q, g_sp)
            f_sp[:, row_bad] = float("-inf")  # a non-finite gallery row never beats a finite target
            hit = tgt & special[(t - start).clamp(0, c.shape[0] - 1)]
            if bool(hit.any()):
                where = torch.full((c.shape[0],), -1, dtype=torch.long, device=dev)
                where[sp] = torch.arange(sp.numel(), device=dev)
                f_sp[rows[hit], where[t[hit] - start]] = float("-inf")  # the target is not counted
            decided, qi, col = _screen(f_sp, blk.lo_t, blk.hi_t)
            count += decided
            if qi.numel():
                count.index_add_(0, qi, _exact(blk, g_sp[col], qi))
    if s is None or not any_active:
        return count
    s[rows[tgt], t[tgt] - start] = float("-inf")  # the target itself is not counted
    decided, qi, col = _screen(s, blk.lo_s, blk.hi_s)
    count += decided
    if qi.numel():
        count.index_add_(0, qi, _exact(blk, _normalized_rows(c, col), qi))
    return count


def _screen(
    s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row count of the columns of ``s`` above ``hi`` (decided: they score at least the
    target), and the (row, column) pairs in ``[lo, hi]`` that only the exact scores can decide."""
    count = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
    none = torch.zeros(0, dtype=torch.long, device=s.device)
    hot = (s.amax(1) >= lo).nonzero()[:, 0]  # rows with an item in or above the band
    if hot.numel() == 0:
        return count, none, none
    every = hot.numel() == s.shape[0]
    sh = s if every else s[hot]
    lo_h, hi_h = lo[hot].unsqueeze(1), hi[hot].unsqueeze(1)
    above = (sh > hi_h).sum(1)
    count[hot] = above
    at_least = sh >= lo_h
    maybe = at_least.sum(1) > above
    if not bool(maybe.any()):
        return count, none, none
    if bool(maybe.all()):
        band = at_least & (sh <= hi_h)
    else:
        band = at_least[maybe] & (sh[maybe] <= hi_h[maybe])
    r, col = band.nonzero(as_tuple=True)
    return count, hot[maybe][r], col


def _exact(blk: _Block, rows: torch.Tensor, qi: torch.Tensor) -> torch.Tensor:
    """1 where the exact score of query ``qi[k]`` against the normalized row ``rows[k]`` is at
    least its target's (computed by the same float64 routine: a row equal to the target's
    ties with it bit for bit)."""
    uq, inv = torch.unique(qi, return_inverse=True)
    own = _pair_dots(blk.q64, uq, blk.g_t[uq])
    return (_pair_dots(blk.q64, qi, rows) >= own[inv]).long()


def _normalized_rows(c: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``center_normalize(c[col])``, normalizing each distinct row once."""
    uc, inv = torch.unique(col, return_inverse=True)
    return center_normalize(c[uc])[inv]


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

    Non-finite scores (NaN/Inf embeddings) count as ``-inf``: such items list last, as
    :func:`retrieval_ranks` never counts them above a target. The ranks themselves come from
    :func:`retrieval_ranks` (exact); this function only lists the best items.

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
        s.masked_fill_(~torch.isfinite(s), float("-inf"))  # a NaN row never lists first (as retrieval_ranks)
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
