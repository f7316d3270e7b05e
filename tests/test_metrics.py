"""Exact retrieval ranks at speed (issue 15): ``retrieval_ranks`` against two references.

* ``naive``: what the issue calls the naive computation: normalize everything, the full
  float32 score matrix (``similarity``), count the items scoring at least the target.
* ``exact``: the same, but every score is the exact dot product of the normalized float32
  rows (float64 products, row by row, no BLAS): what the library's ranks are defined as.

The two agree wherever float32 can tell the scores apart; within float32's rounding (~1e-7)
the naive GEMM's answer depends on the BLAS's blocking, so data meant for the naive
comparison keep every near-tie at least 1e-6 from the target (checked, not assumed).
"""

from __future__ import annotations

import logging

import pytest
import torch

from brainalign import metrics
from brainalign._checks import BrainalignError
from brainalign.losses import center_normalize
from brainalign.metrics import retrieval_ranks, similarity

D = 512


def _rules(
    scores: torch.Tensor, g_bad: torch.Tensor, q_bad: torch.Tensor, t_bad: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Count >= the target with the non-finite rules (bad rows -inf, bad queries/targets worst)."""
    scores = scores.clone()
    own = scores.gather(1, t.view(-1, 1))
    scores[:, g_bad] = float("-inf")
    scores.scatter_(1, t.view(-1, 1), float("-inf"))
    ranks = 1 + (scores >= own).sum(1)
    ranks[q_bad | t_bad] = scores.shape[1]
    return ranks


def naive(q: torch.Tensor, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    qn, gn = center_normalize(q.float()), center_normalize(g.float())
    g_bad = ~torch.isfinite(gn).all(1)
    q_bad = ~torch.isfinite(qn).all(1)
    return _rules(similarity(q, g), g_bad, q_bad, g_bad[t] & ~q_bad, t)


def exact_scores(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    qn, gn = center_normalize(q.float()).double(), center_normalize(g.float()).double()
    return torch.stack([(gn * row).sum(1) for row in qn])  # row by row: no BLAS blocking


def exact(q: torch.Tensor, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    qn, gn = center_normalize(q.float()), center_normalize(g.float())
    g_bad = ~torch.isfinite(gn).all(1)
    q_bad = ~torch.isfinite(qn).all(1)
    return _rules(exact_scores(q, g), g_bad, q_bad, g_bad[t] & ~q_bad, t)


def _gap_to_target(q: torch.Tensor, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Smallest |exact score - target's score| over non-identical normalized rows."""
    s = exact_scores(q, g)
    gn = center_normalize(g.float())
    own = s.gather(1, t.view(-1, 1))
    same = (gn.unsqueeze(0) == gn[t].unsqueeze(1)).all(-1)  # bit-identical rows tie exactly
    return (s - own).abs().masked_fill(same, float("inf")).min()


def _near_tie(g_hat_t: torch.Tensor, q_hat: torch.Tensor, delta: float) -> torch.Tensor:
    """A row whose exact score for ``q_hat`` is the target's + ``delta`` (to first order)."""
    basis = torch.stack([torch.ones_like(g_hat_t) / D**0.5, g_hat_t.double()])
    basis = torch.linalg.qr(basis.T).Q.T
    w = q_hat.double() - basis.T @ (basis @ q_hat.double())
    p = w.norm()
    return (g_hat_t.double() + (delta / p) * (w / p)).float()


@pytest.fixture(scope="module")
def gallery() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3000, D, generator=gen)
    t = torch.randperm(3000, generator=gen)[:48]
    return g, t, gen  # type: ignore[return-value]


@pytest.mark.parametrize("noise", [0.3, 3.0, 30.0])
def test_ranks_equal_naive_and_exact_on_random_data(gallery: tuple, noise: float) -> None:
    """From near-perfect queries (rank 1) to chance-level ones (the target's score in the bulk,
    where the screening band holds the most items)."""
    g, t, _ = gallery
    q = g[t] + noise * torch.randn(len(t), D, generator=torch.Generator().manual_seed(int(noise * 10)))
    assert _gap_to_target(q, g, t) > 1e-6  # the naive float32 matrix is trustworthy here
    got = retrieval_ranks(q, g, t)
    assert torch.equal(got, naive(q, g, t))
    assert torch.equal(got, exact(q, g, t))
    assert torch.equal(retrieval_ranks(q, g, t, chunk=701, query_chunk=13), got)  # chunk borders


def _adversarial(
    g: torch.Tensor, t: torch.Tensor, deltas: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of each target (exact duplicates, x4 and x0.5 rescalings: bit-identical after
    normalization) and near-ties at ``deltas`` from the target's score, spread over the gallery."""
    g = g.clone()
    gen = torch.Generator().manual_seed(1)
    q = g[t] + 1.5 * torch.randn(len(t), D, generator=gen)
    q_hat, g_hat = center_normalize(q), center_normalize(g[t])
    free = [i for i in torch.randperm(g.shape[0], generator=gen).tolist() if i not in set(t.tolist())]
    slots = iter(free)
    for k in range(len(t)):
        g[next(slots)] = g[t[k]]
        g[next(slots)] = 4.0 * g[t[k]]
        g[next(slots)] = 0.5 * g[t[k]]
        for d in deltas:
            g[next(slots)] = _near_tie(g_hat[k], q_hat[k], d)
    return q, g


def test_ranks_equal_naive_on_ties_and_near_ties(gallery: tuple) -> None:
    """Duplicates and rescaled copies of the target tie with it and count against the query;
    near-ties 2e-6 .. 3e-5 from the target's score lie inside the float32 screening band, so
    they are decided by the exact fallback, and they are far enough apart for float32 too."""
    g0, t, _ = gallery
    deltas = (3e-5, 1e-5, 4e-6, 2e-6, -2e-6, -4e-6, -1e-5, -3e-5)
    q, g = _adversarial(g0, t, deltas)
    assert _gap_to_target(q, g, t) > 1e-6
    ref = naive(q, g, t)
    assert torch.equal(ref, exact(q, g, t))
    got = retrieval_ranks(q, g, t, chunk=1000)
    assert torch.equal(got, ref)
    # every query has 3 exact ties (the copies) and 4 near-ties above its target
    base = exact(g0[t] + 1.5 * torch.randn(len(t), D, generator=torch.Generator().manual_seed(1)), g0, t)
    assert int((got - base).min()) >= 3 + 4


def test_near_ties_below_float32_resolution_follow_the_exact_scores(gallery: tuple, monkeypatch) -> None:
    """Near-ties of 1e-8 .. 1e-7 (below what a float32 GEMM resolves), offset copies of the
    target (mean >> spread: the ill-conditioned rows that take the tight path), constant and
    zero rows: the ranks are the exact ones. Without the exact fallback they are not."""
    g0, t, _ = gallery
    q, g = _adversarial(g0, t, (1e-7, 3e-8, 1e-8, -1e-8, -3e-8, -1e-7))
    gen = torch.Generator().manual_seed(2)
    extra = torch.cat(
        [
            g[t[:10]] * 1e-3 + 5.0,  # offset-dominated copies
            torch.full((3, D), 2.5),  # constant rows: normalize to zero
            torch.zeros(2, D),
            torch.randn(5, D, generator=gen) * 1e-12,  # tiny rows
            g[t[10:15]] * 1e16,  # large rows, still screened
            g[t[15:20]] * 1e20,  # too large to screen in float32: the tight path
        ]
    )
    g = torch.cat([g, extra])
    want = exact(q, g, t)
    calls = {"pairs": 0}
    pair_dots = metrics._pair_dots

    def counting(a64: torch.Tensor, ai: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls["pairs"] += b.shape[0]
        return pair_dots(a64, ai, b)

    monkeypatch.setattr(metrics, "_pair_dots", counting)
    assert torch.equal(retrieval_ranks(q, g, t, chunk=1000), want)
    assert calls["pairs"] > 10 * len(t)  # the fallback really decided the near-ties
    monkeypatch.setattr(metrics, "_exact", lambda blk, rows, qi: torch.zeros_like(qi))
    assert not torch.equal(retrieval_ranks(q, g, t, chunk=1000), want)  # the test can fail


def test_reduced_precision_matmul_keeps_ranks_exact(gallery: tuple, monkeypatch) -> None:
    """If torch may run float32 matmuls in bfloat16, the band widens and the ranks stay exact
    (simulated with a GEMM that really rounds its inputs to bfloat16)."""
    g0, t, _ = gallery
    q, g = _adversarial(g0, t, (3e-5, 1e-5, -1e-5, -3e-5))
    monkeypatch.setattr(metrics, "_input_rounding", lambda device: 2.0**-7)
    monkeypatch.setattr(metrics, "_gemm", lambda a, b: a.bfloat16().float() @ b.bfloat16().float().T)
    assert torch.equal(retrieval_ranks(q, g, t, chunk=1000), exact(q, g, t))


def test_non_finite_rows_get_the_worst_rank_and_never_beat_a_target(caplog) -> None:
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(200, D, generator=gen)
    t = torch.arange(0, 40)
    q = g[t] + 0.5 * torch.randn(40, D, generator=gen)
    g[100:104] = float("nan")
    g[104, 3] = float("inf")
    g[105] = 1e30  # finite but its norm overflows: normalizes to zeros (score 0), as naively
    g[106, :] = torch.linspace(-1e30, 1e30, D)
    q[0, 5] = float("nan")  # a broken query
    t = t.clone()
    t[1] = 101  # a query whose target row is NaN
    q[2] = 3.0  # a constant query: every finite item ties with its target
    with caplog.at_level(logging.WARNING, logger="brainalign.metrics"):
        got = retrieval_ranks(q, g, t, chunk=64)
    assert torch.equal(got, exact(q, g, t))
    assert got[0] == got[1] == 200
    assert got[2] == 200 - 5  # 5 non-finite rows (100-104) cannot tie
    assert got[3:].max() < 20  # finite queries are untouched by the NaN rows
    msg = caplog.text
    assert "1 of 40 queries and 5 of 200 gallery rows are not finite" in msg
    assert "2 queries (1 with a non-finite target) get the worst rank 200" in msg


def test_bad_input_is_refused() -> None:
    g = torch.randn(10, 4)
    with pytest.raises(BrainalignError, match="same D"):
        retrieval_ranks(torch.randn(3, 5), g, torch.arange(3))
    with pytest.raises(BrainalignError, match=r"gallery rows in \[0, 9\]"):
        retrieval_ranks(torch.randn(3, 4), g, torch.tensor([0, 1, 10]))
    with pytest.raises(BrainalignError, match="2 targets for 3 queries"):
        retrieval_ranks(torch.randn(3, 4), g, torch.arange(2))
    assert retrieval_ranks(torch.randn(0, 4), g, torch.arange(0)).shape == (0,)
