import math

import numpy as np
import pytest
import torch

from brainalign.losses import SymmetricInfoNCE, center_normalize
from brainalign.metrics import retrieval_ranks, topk_accuracy


def _np_info_nce(b: np.ndarray, i: np.ndarray, t: float) -> float:
    def cn(z: np.ndarray) -> np.ndarray:
        z = z - z.mean(1, keepdims=True)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    logits = cn(b) @ cn(i).T / t
    n = len(b)

    def ce(lg: np.ndarray) -> float:
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        return float(np.mean(lse - lg[np.arange(n), np.arange(n)]))

    return 0.5 * (ce(logits) + ce(logits.T))


def test_info_nce_equals_hand_computation() -> None:
    rng = np.random.default_rng(0)
    b, i = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    got = SymmetricInfoNCE(0.07)(torch.tensor(b), torch.tensor(i)).item()
    assert got == pytest.approx(_np_info_nce(b, i, 0.07), rel=1e-5)


def test_info_nce_is_low_for_matching_and_symmetric() -> None:
    z = torch.randn(8, 16)
    loss = SymmetricInfoNCE(0.04)
    assert loss(z, z).item() < loss(z, torch.randn(8, 16)).item()
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    assert loss(a, b).item() == pytest.approx(loss(b, a).item(), rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        loss(torch.randn(4, 3), torch.randn(4, 2))


def test_repeated_images_in_a_batch_are_not_negatives() -> None:
    """Rows 0 and 3 show the same image (two subjects): with ids, each pair's logits leave the
    other out of both softmaxes, i.e. the loss equals a hand computation on the masked matrix;
    with all-distinct ids it is the plain loss."""
    rng = np.random.default_rng(1)
    b, i = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    i[3] = i[0]
    ids = torch.tensor([7, 1, 2, 7, 4])
    loss = SymmetricInfoNCE(0.1)
    got = loss(torch.tensor(b), torch.tensor(i), ids).item()

    def cn(z: np.ndarray) -> np.ndarray:
        z = z - z.mean(1, keepdims=True)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    lg = cn(b) @ cn(i).T / 0.1
    lg[0, 3] = lg[3, 0] = -np.inf

    def ce(m: np.ndarray) -> float:
        return float(np.mean([np.log(np.exp(r[np.isfinite(r)]).sum()) - r[k] for k, r in enumerate(m)]))

    assert got == pytest.approx(0.5 * (ce(lg) + ce(lg.T)), rel=1e-5)
    assert got < loss(torch.tensor(b), torch.tensor(i)).item()  # the duplicate no longer counts against
    plain = loss(torch.tensor(b), torch.tensor(i), torch.arange(5)).item()
    assert plain == pytest.approx(loss(torch.tensor(b), torch.tensor(i)).item(), rel=1e-7)


def test_fixed_temperature_is_not_a_parameter_learned_one_is() -> None:
    fixed = SymmetricInfoNCE(0.04)
    assert list(fixed.parameters()) == [] and fixed.temperature == pytest.approx(0.04)
    learned = SymmetricInfoNCE(0.1, learn_temperature=True)
    (p,) = list(learned.parameters())
    assert p.item() == pytest.approx(math.log(10))


def test_center_normalize() -> None:
    z = center_normalize(torch.randn(4, 7) + 5)
    assert torch.allclose(z.mean(1), torch.zeros(4), atol=1e-6)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-6)


def _np_topk(q: np.ndarray, g: np.ndarray, t: np.ndarray, k: int) -> float:
    def cn(z: np.ndarray) -> np.ndarray:
        z = z - z.mean(1, keepdims=True)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    s = cn(q) @ cn(g).T
    hits = 0
    for row, target in zip(s, t, strict=True):
        # pessimistic: every other item scoring >= the target is ranked before it
        rank = 1 + sum(1 for j, v in enumerate(row) if j != target and v >= row[target])
        hits += rank <= k
    return hits / len(t)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_equals_independent_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(30, 8))
    q = g[rng.integers(0, 30, 25)] + rng.normal(size=(25, 8))
    t = rng.integers(0, 30, 25)
    got = topk_accuracy(torch.tensor(q), torch.tensor(g), torch.tensor(t), ks=(1, 5))
    assert got["top1"] == pytest.approx(_np_topk(q, g, t, 1))
    assert got["top5"] == pytest.approx(_np_topk(q, g, t, 5))


def test_ties_are_counted_against_the_query() -> None:
    g = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rows 0 and 1 tie
    q = torch.tensor([[1.0, 0.0, 0.0]])
    assert retrieval_ranks(q, g, torch.tensor([0])).item() == 2
    assert topk_accuracy(q, g, torch.tensor([0]), ks=(1, 2)) == {"top1": 0.0, "top2": 1.0}
    # a constant model is never above chance
    const = torch.ones(10, 4)
    assert topk_accuracy(const, torch.randn(10, 4), ks=(1,))["top1"] == 0.0


def test_chunked_ranks_equal_a_full_sort_across_chunk_borders() -> None:
    """Chunks of 7 gallery rows and 3 queries give the ranks of one full argsort, with exact
    duplicates of targets placed in other chunks (each must tie against its query)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(50, 6, generator=gen)
    g[40] = g[3]  # duplicate of target 3, in another gallery chunk
    g[9] = g[21]
    t = torch.tensor([3, 21, 0, 49, 13, 7, 3, 28])
    q = g[t] + 0.8 * torch.randn(len(t), 6, generator=gen)
    got = retrieval_ranks(q, g, t, chunk=7, query_chunk=3)
    assert torch.equal(got, retrieval_ranks(q, g, t))
    s = (q - q.mean(1, keepdim=True)) / (q - q.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
    z = (g - g.mean(1, keepdim=True)) / (g - g.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
    scores = (s.double() @ z.double().T).numpy()
    for i, target in enumerate(t.tolist()):
        own = scores[i, target]
        twin = {3: 40, 21: 9}.get(target)
        expected = 1 + int((np.delete(scores[i], [target] + ([twin] if twin else [])) > own).sum())
        expected += 1 if twin is not None else 0  # the duplicate ties and counts against the query
        assert got[i].item() == expected, (i, target)


# --------------------------------------------------------------------------- non-finite embeddings (issue 11)
def test_nan_queries_score_zero_not_one(caplog: pytest.LogCaptureFixture) -> None:
    from brainalign.metrics import retrieval_ranks, topk_accuracy

    g = torch.randn(50, 16)
    nan = torch.full((50, 16), float("nan"))
    assert topk_accuracy(nan, g) == {"top1": 0.0, "top5": 0.0}  # was 1.0: NaN >= x is False
    assert topk_accuracy(g.clone(), nan) == {"top1": 0.0, "top5": 0.0}
    assert topk_accuracy(nan, nan) == {"top1": 0.0, "top5": 0.0}
    q = torch.full((50, 16), float("inf"))
    assert retrieval_ranks(q, g, torch.arange(50)).tolist() == [50] * 50
    assert "not finite" in caplog.text


def test_a_nan_gallery_row_never_beats_a_finite_target() -> None:
    from brainalign.metrics import retrieval_ranks

    g = torch.randn(30, 8)
    q = g + 0.01 * torch.randn(30, 8)
    clean = retrieval_ranks(q, g, torch.arange(30), chunk=7, query_chunk=4)
    bad = g.clone()
    bad[[3, 11]] = float("nan")
    ranks = retrieval_ranks(q, bad, torch.arange(30), chunk=7, query_chunk=4)
    assert ranks[3] == ranks[11] == 30  # their own target cannot be scored
    keep = [i for i in range(30) if i not in (3, 11)]
    assert (ranks[keep] <= clean[keep]).all()  # NaN rows are never counted above a target


def test_chunked_topk_lists_in_rank_order_with_true_scores() -> None:
    """retrieval_topk over chunks of 7 equals one full sort where the target is demoted below
    its ties (the order retrieval_ranks counts), and reports the target's true similarity."""
    from brainalign.metrics import retrieval_topk, similarity

    gen = torch.Generator().manual_seed(1)
    g = torch.randn(40, 6, generator=gen)
    g[33] = g[5]  # an exact duplicate of target 5 in another chunk
    t = torch.tensor([5, 12, 0, 39])
    q = g[t] + 0.2 * torch.randn(len(t), 6, generator=gen)
    idx, sc = retrieval_topk(q, g, t, k=5, chunk=7)
    full = similarity(q, g)
    ranks = retrieval_ranks(q, g, t)
    for i, target in enumerate(t.tolist()):
        order = sorted(range(40), key=lambda j: (-full[i, j].item(), j == target))
        assert idx[i].tolist() == order[:5], i
        assert torch.allclose(sc[i], full[i, idx[i]])
        if ranks[i] <= 5 and target != 5:  # without exact twins: the target sits at its rank
            assert idx[i].tolist().index(target) + 1 == ranks[i]
    assert idx[0].tolist().index(33) < idx[0].tolist().index(5)  # its twin ties and comes first


def test_gallery_loss_is_the_full_batch_loss_in_chunks() -> None:
    """Chunked over rows, the loss equals forward() on all rows at once (duplicates masked)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 2, 8, 0, 10, 11, 3])  # repeated images: 0, 2, 3
    b, i = torch.randn(13, 6, generator=g), torch.randn(13, 6, generator=g)
    i[7], i[9], i[12] = i[2], i[0], i[3]
    loss = SymmetricInfoNCE(0.1)
    full = loss(b, i, ids).item()
    for chunk in (1, 4, 5, 13, 100):
        assert loss.gallery_loss(b, i, ids, chunk_size=chunk).item() == pytest.approx(full, rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        loss.gallery_loss(torch.randn(4, 3), torch.randn(4, 2), torch.arange(4))


def test_learned_temperature_gradient_survives_the_cap() -> None:
    """At the cap (T = 0.01) the temperature still has a gradient; a step past it is
    projected back by clamp_()."""
    from brainalign.losses import MAX_LOGIT_SCALE

    loss = SymmetricInfoNCE(1.0 / MAX_LOGIT_SCALE, learn_temperature=True)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(MAX_LOGIT_SCALE) + 0.5)  # as if a step had overshot
    loss.clamp_()
    assert loss.logit_scale.item() == pytest.approx(math.log(MAX_LOGIT_SCALE))
    assert loss.temperature == pytest.approx(0.01, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    loss(torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)).backward()
    grad = loss.logit_scale.grad
    assert grad is not None and torch.isfinite(grad) and grad.abs().item() > 1e-4
    # what the old forward clamp, exp(logit_scale).clamp(max=100), gave just past the cap
    p = torch.tensor(math.log(MAX_LOGIT_SCALE) + 1e-3, requires_grad=True)
    p.exp().clamp(max=MAX_LOGIT_SCALE).backward()
    assert p.grad.item() == 0.0
    # a learned temperature must start inside the cap; a fixed one is used exactly as given
    with pytest.raises(ValueError, match="must be in"):
        SymmetricInfoNCE(0.005, learn_temperature=True)
    assert SymmetricInfoNCE(0.005).temperature == pytest.approx(0.005)
    fixed = SymmetricInfoNCE(0.04)
    fixed.clamp_()
    assert fixed.temperature == pytest.approx(0.04)
