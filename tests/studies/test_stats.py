"""The report's statistics: subject level, against scipy/statsmodels, corrected as one family."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from brainalign.studies._stats import FinalRow, compare, mean_sem, summarize


def _rows(rng: np.random.Generator, n_sub: int = 4, n_seed: int = 3, effect: float = 0.05,
          encoders: tuple[str, ...] = ("nice",)) -> list[FinalRow]:
    rows = []
    for enc in encoders:
        for s in range(n_sub):
            level = rng.uniform(0.1, 0.3)
            for k in range(n_seed):
                for arm, alignment, shift in (("aligned", "simulated", effect), ("base", "none", 0.0)):
                    v1 = level + shift + rng.normal(0, 0.02)
                    rows.append(FinalRow(enc, "sim-clip", alignment, arm, f"{s + 1:02d}", k, f"r{enc}{s}{k}{arm}",
                                         v1, min(1.0, 2.5 * v1), 200.0))
    return rows


def _subject_means(rows: list[FinalRow], metric: str, arm: str) -> list[float]:
    subs = sorted({r.subject for r in rows})
    return [float(np.mean([getattr(r, metric) for r in rows if r.subject == s and r.arm == arm])) for s in subs]


def test_mean_sem() -> None:
    x = [0.1, 0.2, 0.4]
    m, s = mean_sem(x)
    assert m == pytest.approx(np.mean(x)) and s == pytest.approx(stats.sem(x))
    assert math.isnan(mean_sem([0.3])[1]) and mean_sem([0.3])[0] == 0.3


def test_compare_is_subject_level_and_equals_scipy() -> None:
    rows = _rows(np.random.default_rng(1), n_sub=7)
    (c,) = compare(rows, "test_top1")
    a, b = _subject_means(rows, "test_top1", "aligned"), _subject_means(rows, "test_top1", "base")
    d = np.subtract(a, b)
    cmp = c.comparison
    assert c.n_subjects == 7 and c.n_seeds == 3 and cmp.design == "7 x 3"
    assert c.aligned_subject_mean == pytest.approx(np.mean(a)) and c.aligned_subject_sem == pytest.approx(stats.sem(a))
    assert c.base_subject_mean == pytest.approx(np.mean(b)) and c.base_subject_sem == pytest.approx(stats.sem(b))
    assert c.diff_subject_mean == pytest.approx(d.mean()) and c.diff_subject_sem == pytest.approx(stats.sem(d))
    ref = stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert cmp.t_test.p == pytest.approx(ref.pvalue) and cmp.t_test.statistic == pytest.approx(ref.statistic)
    assert (cmp.ci_t.low, cmp.ci_t.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert cmp.d_z == pytest.approx(d.mean() / d.std(ddof=1))
    # exact sign-flip p by enumeration of all 2^7 patterns
    flips = np.array(list(itertools.product((1, -1), repeat=7)))
    null = (flips * d).mean(axis=1)
    assert cmp.permutation.p == pytest.approx(np.mean(np.abs(null) >= abs(d.mean()) - 1e-15))
    assert cmp.permutation.exact and cmp.permutation.min_p == pytest.approx(2 / 2**7)
    assert cmp.wilcoxon.p == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert c.relative_improvement == pytest.approx((np.mean(a) - np.mean(b)) / np.mean(b))
    assert c.chance == pytest.approx(1 / 200)
    assert cmp.mixed is not None and "random subject" in cmp.mixed.label  # run level: labelled, secondary


def test_summarize_corrects_all_comparisons_as_one_family_and_stars_follow_adjusted_p() -> None:
    rows = _rows(np.random.default_rng(5), n_sub=8, n_seed=2, encoders=("atms", "nice"))
    found = summarize(rows)
    assert [(s.encoder, s.metric) for s in found] == [("atms", "test_top1"), ("atms", "test_top5"),
                                                      ("nice", "test_top1"), ("nice", "test_top5")]
    raw = [s.comparison.permutation.p for s in found]
    for method, sm in (("holm", "holm"), ("bh", "fdr_bh")):
        got = summarize(rows, correction=method)
        ref = multipletests(raw, method=sm)[1]
        assert [s.comparison.permutation.p_adjusted for s in got] == pytest.approx(list(ref))
        assert all(s.comparison.family_size == 4 and s.comparison.correction == method for s in got)
        for s in got:
            p = s.comparison.permutation.p_adjusted
            assert s.comparison.stars == ("***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "")


def test_seeds_do_not_inflate_significance() -> None:
    """The report's p is the same with 1 seed per subject and with 50 seeds with the same
    subject means: seeds are not samples (the old across-runs tests would go to ~0)."""
    rng = np.random.default_rng(8)
    levels = rng.uniform(0.1, 0.3, 6)
    diffs = np.array([0.02, -0.01, 0.03, 0.015, -0.005, 0.01])

    def rows(n_seed: int) -> list[FinalRow]:
        out = []
        for s in range(6):
            noise = rng.normal(0, 0.01, n_seed)
            noise -= noise.mean()  # the seeds average exactly to the subject's value
            for k in range(n_seed):
                for arm, v in (("aligned", levels[s] + diffs[s] + noise[k]), ("base", levels[s] + noise[k])):
                    out.append(FinalRow("nice", "sim-clip", "simulated" if arm == "aligned" else "none", arm,
                                        f"{s:02d}", k, f"r{s}{k}{arm}", v, v, 200.0))
        return out

    one, many = (next(x for x in summarize(rows(n)) if x.metric == "test_top1").comparison for n in (1, 50))
    assert many.t_test.p == pytest.approx(one.t_test.p) and many.permutation.p == pytest.approx(one.permutation.p)
    assert many.ci_t.low == pytest.approx(one.ci_t.low) and many.design == "6 x 50"
    assert one.permutation.p > 0.05  # and it stays there


@pytest.mark.parametrize(
    ("a", "b", "note"),
    [
        ([0.3, 0.4], [0.2, 0.35], "cannot reach significance"),  # n = 2: min p = 0.5
        ([0.3, 0.4, 0.5], [0.3, 0.4, 0.5], "all paired differences are zero"),
        ([0.3, 0.4, 0.5], [0.2, 0.3, 0.4], "constant paired differences"),
    ],
)
def test_degenerate_designs_are_nan_or_unreachable_with_a_note(a: list[float], b: list[float], note: str) -> None:
    rows = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        rows += [FinalRow("nice", "sim-clip", "simulated", "aligned", f"{i:02d}", 0, f"a{i}", x, x, 200.0),
                 FinalRow("nice", "sim-clip", "none", "base", f"{i:02d}", 0, f"b{i}", y, y, 200.0)]
    (c,) = compare(rows, "test_top1")
    assert any(note in n for n in c.comparison.notes)
    if a == b:
        assert math.isnan(c.comparison.permutation.p) and math.isnan(c.comparison.t_test.p)
    if len(a) == 2:  # n = 2 still gives the t-test against scipy
        assert c.comparison.t_test.p == pytest.approx(stats.ttest_rel(a, b).pvalue)
        assert c.comparison.permutation.p == pytest.approx(0.5)  # both positive: 2 of 4 patterns


def test_compare_refuses_unmatched_arms() -> None:
    rows = _rows(np.random.default_rng(2))
    with pytest.raises(ValueError, match="cover different runs"):
        compare(rows[:-1], "test_top1")
