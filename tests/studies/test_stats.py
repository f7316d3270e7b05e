"""The report's statistics against scipy, and their degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from brainalign.studies._stats import FinalRow, compare, mean_sem, paired_tests, summarize


def _rows(rng: np.random.Generator, n_sub: int = 4, n_seed: int = 3, effect: float = 0.05) -> list[FinalRow]:
    rows = []
    for s in range(n_sub):
        level = rng.uniform(0.1, 0.3)
        for k in range(n_seed):
            for arm, alignment, shift in (("aligned", "simulated", effect), ("base", "none", 0.0)):
                v1 = level + shift + rng.normal(0, 0.02)
                rows.append(FinalRow("nice", "sim-clip", alignment, arm, f"{s + 1:02d}", k, f"r{s}{k}{arm}",
                                     v1, min(1.0, 2.5 * v1), 200.0))
    return rows


def test_mean_sem() -> None:
    x = [0.1, 0.2, 0.4]
    m, s = mean_sem(x)
    assert m == pytest.approx(np.mean(x)) and s == pytest.approx(stats.sem(x))
    assert math.isnan(mean_sem([0.3])[1]) and mean_sem([0.3])[0] == 0.3
    assert all(math.isnan(v) for v in mean_sem([]))


def test_paired_tests_equal_scipy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 8), rng.normal(0.5, 1, 8)
    t, w = paired_tests(a, b)
    ref_t, ref_w = stats.ttest_rel(a, b), stats.wilcoxon(a, b)
    assert (t.statistic, t.p, t.n) == (pytest.approx(ref_t.statistic), pytest.approx(ref_t.pvalue), 8)
    assert (w.statistic, w.p) == (pytest.approx(ref_w.statistic), pytest.approx(ref_w.pvalue))
    assert t.note == "" and w.note == ""


@pytest.mark.parametrize(
    ("a", "b", "t_note", "w_note"),
    [
        ([0.3], [0.2], "at least 2", "at least 2"),
        ([0.3, 0.4, 0.5], [0.3, 0.4, 0.5], "all differences are zero", "all differences are zero"),
        ([0.3, 0.4, 0.5], [0.2, 0.3, 0.4], "constant differences", "cannot reach p < 0.05"),
    ],
)
def test_paired_tests_degenerate_cases_give_nan_with_a_note(a: list[float], b: list[float], t_note: str,
                                                             w_note: str) -> None:
    t, w = paired_tests(a, b)
    assert math.isnan(t.p) and t_note in t.note
    assert w_note in w.note
    if len(a) < 2 or a == b:
        assert math.isnan(w.p)


def test_compare_matches_scipy_on_subject_means_and_runs() -> None:
    rows = _rows(np.random.default_rng(1))
    (c,) = compare(rows, "test_top1")
    al = {(r.subject, r.seed): r.test_top1 for r in rows if r.arm == "aligned"}
    ba = {(r.subject, r.seed): r.test_top1 for r in rows if r.arm == "base"}
    keys = sorted(al)
    subs = sorted({s for s, _ in keys})
    a_sub = [np.mean([al[k] for k in keys if k[0] == s]) for s in subs]
    b_sub = [np.mean([ba[k] for k in keys if k[0] == s]) for s in subs]
    assert c.n_subjects == 4 and c.n_seeds == 3
    assert c.aligned_subject_mean == pytest.approx(np.mean(a_sub))
    assert c.aligned_subject_sem == pytest.approx(stats.sem(a_sub))
    assert c.base_run_sem == pytest.approx(stats.sem([ba[k] for k in keys]))
    assert c.relative_improvement == pytest.approx((np.mean(a_sub) - np.mean(b_sub)) / np.mean(b_sub))
    assert c.ttest_subjects.p == pytest.approx(stats.ttest_rel(a_sub, b_sub).pvalue)
    assert c.ttest_runs.p == pytest.approx(stats.ttest_rel([al[k] for k in keys], [ba[k] for k in keys]).pvalue)
    assert c.wilcoxon_runs.p == pytest.approx(stats.wilcoxon([al[k] for k in keys], [ba[k] for k in keys]).pvalue)
    assert c.chance == pytest.approx(1 / 200)


def test_compare_refuses_unmatched_arms() -> None:
    rows = _rows(np.random.default_rng(2))
    with pytest.raises(ValueError, match="cover different runs"):
        compare(rows[:-1], "test_top1")


def test_subject_differences_are_the_cross_subject_numbers() -> None:
    """Mean +- s.e.m. of the per-subject differences (the cross-subject table's summary row)
    and the across-subject tests equal scipy on the seed-averaged values."""
    rows = _rows(np.random.default_rng(4), n_sub=4, n_seed=2)
    (c,) = [x for x in summarize(rows) if x.metric == "test_top5"]
    subs = sorted({r.subject for r in rows})
    a = [np.mean([r.test_top5 for r in rows if r.subject == s and r.arm == "aligned"]) for s in subs]
    b = [np.mean([r.test_top5 for r in rows if r.subject == s and r.arm == "base"]) for s in subs]
    d = np.subtract(a, b)
    assert c.diff_subject_mean == pytest.approx(d.mean()) and c.diff_subject_sem == pytest.approx(stats.sem(d))
    assert c.ttest_subjects.statistic == pytest.approx(stats.ttest_rel(a, b).statistic)
    assert c.wilcoxon_subjects.p == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert [x.metric for x in summarize(rows)] == ["test_top1", "test_top5"]
