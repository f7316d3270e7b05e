"""brainalign.stats: every statistic against scipy/statsmodels or a hand computation.

Hand inputs cover ties, zero differences, n = 2 and n = 1; the permutation p-value is checked
against a brute-force enumeration of all sign patterns and against scipy's two-sample paired
permutation test; a simulation shows that seeds do not inflate significance.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import stats as st

from brainalign import BrainalignError
from brainalign import stats as S


def _arms(a: list[list[float]], b: list[list[float]]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    return ({f"{i + 1:02d}": v for i, v in enumerate(a)}, {f"{i + 1:02d}": v for i, v in enumerate(b)})


def _brute_force(d: np.ndarray) -> tuple[float, float, float]:
    """Two-sided p, one-sided p (greater) and one-sided mid-p over all 2^n sign patterns."""
    obs = d.mean()
    means = np.array([np.dot(s, d) / d.size for s in itertools.product((1.0, -1.0), repeat=d.size)])
    tol = 1e-12
    two = np.mean(np.abs(means) >= abs(obs) - tol)
    greater = np.mean(means >= obs - tol)
    mid = np.mean(means > obs + tol) + 0.5 * np.mean(np.abs(means - obs) <= tol)
    return float(two), float(greater), float(mid)


# ----------------------------------------------------------------------------- collapse, mean, sem
def test_seeds_are_collapsed_to_one_value_per_subject_first() -> None:
    a, b = _arms([[0.5, 0.7], [0.2, 0.2, 0.5]], [[0.1], [0.3, 0.1]])
    assert S.collapse_seeds(a) == {"01": pytest.approx(0.6), "02": pytest.approx(0.3)}
    c = S.paired_comparison(a, b, run_level=False)
    assert c.a_values == pytest.approx((0.6, 0.3)) and c.b_values == pytest.approx((0.1, 0.2))
    assert c.differences == pytest.approx((0.5, 0.1)) and c.mean_difference == pytest.approx(0.3)
    assert c.runs == ((2, 1), (3, 2)) and c.design == "2 x 1-3"
    assert c.a.n_runs == 5 and c.b.n_runs == 3 and c.a.n_subjects == 2
    # s.e.m. over SUBJECTS (n = 2), not over the 5 runs
    assert c.a.mean == pytest.approx(0.45) and c.a.sem == pytest.approx(st.sem([0.6, 0.3]))
    assert S.mean_sem([]) == (pytest.approx(float("nan"), nan_ok=True),) * 2
    m, s = S.mean_sem([3.0])
    assert m == 3.0 and math.isnan(s)


def test_bad_input_is_refused_with_a_message() -> None:
    with pytest.raises(BrainalignError, match=r"only in A: \['03'\]"):
        S.paired_comparison({"01": [1], "02": [1], "03": [1]}, {"01": [0], "02": [0]})
    with pytest.raises(BrainalignError, match="non-finite"):
        S.paired_comparison({"01": [1, float("nan")], "02": [1]}, {"01": [0], "02": [0]})
    with pytest.raises(BrainalignError, match="has no runs"):
        S.collapse_seeds({"01": []})
    with pytest.raises(BrainalignError, match="no subjects"):
        S.paired_comparison({}, {})
    with pytest.raises(BrainalignError, match="correction method"):
        S.adjust_pvalues([0.1], method="bonf")


# ----------------------------------------------------------------------------- t, CI, d_z, wilcoxon
@pytest.mark.parametrize(
    "a,b",
    [
        ([0.61, 0.55, 0.70, 0.52, 0.66], [0.50, 0.57, 0.58, 0.49, 0.60]),  # generic
        ([0.3, 0.3, 0.5, 0.4], [0.2, 0.2, 0.3, 0.3]),  # tied differences (0.1, 0.1, 0.2, 0.1)
        ([0.3, 0.5, 0.4, 0.45], [0.3, 0.4, 0.1, 0.45]),  # two zero differences
        ([0.9, 0.2], [0.5, 0.4]),  # n = 2
    ],
)
def test_subject_level_statistics_equal_scipy(a: list[float], b: list[float]) -> None:
    arms = _arms([[x] for x in a], [[x] for x in b])
    c = S.paired_comparison(*arms, run_level=False)
    av, bv = np.array(a), np.array(b)
    d = av - bv
    n = d.size
    ref = st.ttest_rel(av, bv)
    assert c.t_test.statistic == pytest.approx(ref.statistic, rel=1e-10)
    assert c.t_test.p == pytest.approx(ref.pvalue, rel=1e-10)
    # CI: mean +- t_{0.975, n-1} sd / sqrt(n), by hand
    half = st.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    assert (c.ci_t.low, c.ci_t.high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-10)
    # d_z by hand, and its identity with t: t = d_z sqrt(n)
    assert c.d_z == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-12)
    assert c.d_z * math.sqrt(n) == pytest.approx(ref.statistic, rel=1e-10)
    w = st.wilcoxon(av, bv)
    assert c.wilcoxon.statistic == pytest.approx(w.statistic) and c.wilcoxon.p == pytest.approx(w.pvalue)
    # arms: mean +- sem over subjects
    assert (c.a.mean, c.a.sem) == pytest.approx((av.mean(), st.sem(av)))
    assert (c.b.mean, c.b.sem) == pytest.approx((bv.mean(), st.sem(bv)))


def test_bootstrap_resamples_subjects_and_is_seeded() -> None:
    d = np.array([0.12, -0.03, 0.08, 0.2, 0.05, -0.01])
    arms = _arms([[x] for x in d], [[0.0]] * d.size)
    c = S.paired_comparison(*arms, seed=3, run_level=False)
    ref = st.bootstrap((d,), np.mean, n_resamples=9999, method="percentile", rng=np.random.default_rng(3))
    assert (c.ci_bootstrap.low, c.ci_bootstrap.high) == pytest.approx(
        (ref.confidence_interval.low, ref.confidence_interval.high), rel=1e-12)
    assert c.ci_bootstrap.low < d.mean() < c.ci_bootstrap.high
    again = S.paired_comparison(*arms, seed=3, run_level=False).ci_bootstrap
    assert again == c.ci_bootstrap and S.paired_comparison(*arms, seed=4, run_level=False).ci_bootstrap != again
    # n = 2: a resample's mean is d1, d2 or their mean, so the CI lies within [min, max]
    ci = S.bootstrap_ci([0.1, 0.3])
    assert 0.1 <= ci.low <= ci.high <= 0.3


# ----------------------------------------------------------------------------- permutation test
@pytest.mark.parametrize(
    "d",
    [
        [0.3, 0.25, 0.35, -0.1],
        [0.1, 0.1, -0.1, 0.2, 0.1],  # ties in |d|
        [0.2, 0.0, 0.0, 0.1, -0.05, 0.3],  # zero differences
        [0.4, -0.3],  # n = 2
        [0.05, 0.11, 0.02, 0.09, 0.03, 0.12, 0.07, 0.01, 0.04, 0.06],  # all positive, n = 10
    ],
)
def test_permutation_p_is_exact(d: list[float]) -> None:
    x = np.array(d)
    r = S.sign_flip_test(x)
    two, greater, mid = _brute_force(x)
    assert r.exact and r.n_patterns == 2 ** x.size
    assert r.p == pytest.approx(two, abs=1e-12)
    assert r.p_greater == pytest.approx(greater, abs=1e-12)
    assert r.p_greater_mid == pytest.approx(mid, abs=1e-12) and 0 < r.p_greater_mid < 1
    # scipy's two-sample paired permutation test (swapping the arms within a subject)
    a, b = x + 1.0, np.ones_like(x)
    ref = st.permutation_test((a, b), lambda u, v, axis: np.mean(u - v, axis=axis), permutation_type="samples",
                              n_resamples=np.inf, vectorized=True)
    assert r.p == pytest.approx(ref.pvalue, abs=1e-12)


def test_smallest_reachable_p_is_two_over_two_to_the_n() -> None:
    for n in range(2, 9):
        r = S.sign_flip_test(np.linspace(0.01, 0.02, n))  # all positive: the most extreme pattern
        assert r.p == pytest.approx(2 / 2**n) == r.min_p
        assert ("cannot reach significance" in r.note) == (2 / 2**n >= 0.05)
    # with 10 subjects (the example) the smallest two-sided p is 2/1024
    assert S.min_permutation_p(10) == pytest.approx(2 / 1024)
    # a zero difference does not change under a flip: it does not count
    r = S.sign_flip_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.0])
    assert r.min_p == pytest.approx(2 / 2**5) and r.p == pytest.approx(r.min_p) and "5 non-zero" in r.note


def test_monte_carlo_above_the_exact_limit_is_seeded_and_close_to_exact() -> None:
    d = np.random.default_rng(0).normal(0.3, 1.0, size=12)
    exact = S.sign_flip_test(d)
    mc = S.sign_flip_test(d, exact_max=8, n_resamples=20_000, seed=1)
    assert exact.exact and not mc.exact and mc.n_patterns == 20_000
    assert mc.p == pytest.approx(exact.p, abs=0.015)
    assert S.sign_flip_test(d, exact_max=8, n_resamples=20_000, seed=1) == mc
    assert mc.p > 0  # the observed pattern counts: never p = 0


# ----------------------------------------------------------------------------- undefined cases
def test_undefined_cases_are_nan_with_a_reason_never_a_fake_p() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning leaks out either
        one = S.paired_comparison({"01": [0.5, 0.6]}, {"01": [0.4, 0.3]})
        zero = S.paired_comparison(*_arms([[0.3], [0.5], [0.4]], [[0.3], [0.5], [0.4]]))
        const = S.paired_comparison(*_arms([[0.3], [0.5], [0.4], [0.6]], [[0.2], [0.4], [0.3], [0.5]]))
    # n = 1
    assert one.mean_difference == pytest.approx(0.2)
    for p in (one.t_test.p, one.permutation.p, one.wilcoxon.p, one.d_z, one.ci_t.low, one.ci_bootstrap.low,
              one.mixed.p, one.a.sem):
        assert math.isnan(p)
    assert any("n = 1" in n for n in one.notes) and "at least 3" in one.mixed.note
    # all differences zero
    for p in (zero.t_test.p, zero.permutation.p, zero.permutation.p_greater_mid, zero.wilcoxon.p, zero.d_z):
        assert math.isnan(p)
    assert any("all paired differences are zero" in n for n in zero.notes)
    # constant non-zero differences: scipy's t says inf / p = 0; here t, its CI and d_z are NaN ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert st.ttest_1samp(np.full(4, 0.1), 0.0).pvalue < 1e-10  # what a naive call would report
    assert math.isnan(const.t_test.p) and math.isnan(const.d_z) and math.isnan(const.ci_t.low)
    assert math.isnan(const.ci_bootstrap.low) and "constant" in const.t_test.note
    # ... while the permutation test is well defined: all 4 positive -> 2/16, and says it cannot reach 0.05
    assert const.permutation.p == pytest.approx(2 / 16) and "cannot reach" in const.permutation.note
    fam = S.correct_family([zero, const])
    assert math.isnan(fam[0].permutation.p_adjusted) and fam[0].stars == ""
    assert fam[1].family_size == 1 and fam[1].permutation.p_adjusted == pytest.approx(2 / 16)


def test_stats_json_has_no_nan() -> None:
    import json

    c = S.correct_family([S.paired_comparison({"01": [0.5]}, {"01": [0.4]})])[0]
    text = json.dumps(c.to_dict(), allow_nan=False)  # raises on NaN
    assert '"design": "1 x 1"' in text and '"correction": "holm"' in text


# ----------------------------------------------------------------------------- seeds vs subjects
def test_seeds_do_not_inflate_significance() -> None:
    """4 subjects x 5 seeds; the subject effects disagree (null-like), seed noise is tiny.

    A naive paired t-test over all 20 (subject, seed) runs (df = 19) rejects; the subject-level
    tests (df = 3) do not; a mixed model with only a random subject intercept is just as
    fooled as the naive test, the one with a random arm effect per subject is not.
    """
    import pandas as pd
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(0)
    effect = [0.3, 0.25, 0.35, -0.1]
    level = [0.5, 0.4, 0.6, 0.45]
    a = {f"{s:02d}": list(level[s] + effect[s] + rng.normal(0, 0.002, 5)) for s in range(4)}
    b = {f"{s:02d}": list(level[s] + rng.normal(0, 0.002, 5)) for s in range(4)}
    c = S.paired_comparison(a, b)
    naive = st.ttest_rel(np.concatenate(list(a.values())), np.concatenate(list(b.values())))
    assert naive.pvalue < 0.001  # pseudo-replication: 20 "independent" pairs
    assert c.t_test.p > 0.1 and c.permutation.p > 0.1 and c.ci_t.low < 0 < c.ci_t.high
    df = pd.DataFrame([(s, arm, v) for arm, arms in ((1, a), (0, b)) for s, vs in arms.items() for v in vs],
                      columns=["subject", "arm", "y"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        intercept_only = smf.mixedlm("y ~ arm", df, groups=df["subject"]).fit(reml=True)
    assert intercept_only.pvalues["arm"] < 0.001
    assert c.mixed is not None and c.mixed.p > 0.05
    assert c.mixed.estimate == pytest.approx(c.mean_difference, abs=1e-6)


def test_subject_level_false_positive_rate_holds_where_the_run_level_one_explodes() -> None:
    """400 null draws of 8 subjects x 5 seeds: subject-level tests reject ~5 %, the naive
    run-level t-test far more (seeds share their subject's data)."""
    rng = np.random.default_rng(7)
    n_draws, n_sub, n_seed = 400, 8, 5
    rej = {"perm": 0, "t": 0, "naive": 0}
    for _ in range(n_draws):
        subject_effect = rng.normal(0, 1.0, n_sub)  # per-subject arm difference, mean 0 (null)
        runs_a = subject_effect[:, None] / 2 + rng.normal(0, 0.1, (n_sub, n_seed))
        runs_b = -subject_effect[:, None] / 2 + rng.normal(0, 0.1, (n_sub, n_seed))
        d = runs_a.mean(1) - runs_b.mean(1)
        rej["perm"] += S.sign_flip_test(d).p < 0.05
        rej["t"] += st.ttest_1samp(d, 0).pvalue < 0.05
        rej["naive"] += st.ttest_rel(runs_a.ravel(), runs_b.ravel()).pvalue < 0.05
    for test in ("perm", "t"):
        ci = st.binomtest(rej[test], n_draws).proportion_ci()
        assert ci.low <= 0.05 <= ci.high, (test, rej)
    assert rej["naive"] / n_draws > 0.3, rej


def test_mixed_model_equals_statsmodels() -> None:
    import pandas as pd
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(2)
    a = {f"{s:02d}": list(0.5 + 0.1 * s + rng.normal(0.05, 0.03, 3)) for s in range(5)}
    b = {f"{s:02d}": list(0.5 + 0.1 * s + rng.normal(0.0, 0.03, 3)) for s in range(5)}
    m = S.mixed_model(a, b)
    df = pd.DataFrame([(s, arm, v) for arm, arms in ((1, a), (0, b)) for s, vs in arms.items() for v in vs],
                      columns=["subject", "arm", "y"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = smf.mixedlm("y ~ arm", df, groups=df["subject"], re_formula="~arm").fit(reml=True)
    assert m.estimate == pytest.approx(ref.params["arm"]) and m.se == pytest.approx(ref.bse["arm"])
    assert m.p == pytest.approx(ref.pvalues["arm"]) and m.n_runs == 30 and m.n_subjects == 5
    assert "run-level" in m.label and "subject" in m.label
    # balanced data: the fixed effect is the subject-level mean difference
    c = S.paired_comparison(a, b, run_level=False)
    assert m.estimate == pytest.approx(c.mean_difference, abs=1e-6)
    single = S.mixed_model({k: v[:1] for k, v in a.items()}, {k: v[:1] for k, v in b.items()})
    assert math.isnan(single.p) and "one run per subject" in single.note
    # no subject structure at all: the fit hits the boundary and does not converge; its
    # standard error is not trusted, so only the estimate is kept
    flat_a = {str(i): list(np.random.default_rng(i).normal(0.5, 0.1, 3)) for i in range(10)}
    flat_b = {str(i): list(np.random.default_rng(100 + i).normal(0.5, 0.1, 3)) for i in range(10)}
    flat = S.mixed_model(flat_a, flat_b)
    assert not flat.converged and math.isnan(flat.p) and math.isnan(flat.se) and math.isfinite(flat.estimate)
    assert flat.note.startswith("did not converge")


# ----------------------------------------------------------------------------- families, stars
@pytest.mark.parametrize("method,sm_name", [("holm", "holm"), ("bh", "fdr_bh")])
def test_family_correction_equals_statsmodels(method: str, sm_name: str) -> None:
    from statsmodels.stats.multitest import multipletests

    p = [0.01, 0.04, 0.03, 0.2, 0.005, float("nan")]
    got = S.adjust_pvalues(p, method)
    ref = multipletests(p[:5], method=sm_name)[1]
    assert got[:5] == pytest.approx(tuple(ref)) and math.isnan(got[5])  # NaN: not a test, not counted
    holm = S.adjust_pvalues([0.01, 0.04, 0.03], "holm")
    assert holm == pytest.approx((0.03, 0.06, 0.06))  # by hand: 3p, max(2p, prev), max(p, prev)
    with pytest.raises(BrainalignError, match=r"\[0, 1\]"):
        S.adjust_pvalues([1.2])


def test_stars_come_only_from_adjusted_p() -> None:
    rng = np.random.default_rng(3)
    strong = [S.paired_comparison(*_arms([[x] for x in rng.normal(1.0, 0.1, 10)], [[0.0]] * 10), run_level=False)
              for _ in range(3)]
    assert all(c.permutation.p < 0.01 for c in strong)
    assert all(c.stars == "" for c in strong)  # raw p alone never earns a star
    fam = S.correct_family(strong)
    assert all(c.correction == "holm" and c.family_size == 3 for c in fam)
    assert [c.permutation.p_adjusted for c in fam] == pytest.approx(
        list(S.adjust_pvalues([c.permutation.p for c in strong])))
    assert fam[0].stars == S.stars(fam[0].permutation.p_adjusted) == "**"  # 3 x 2/1024 = 0.0059
    assert [S.stars(p) for p in (0.0009, 0.009, 0.049, 0.05, float("nan"))] == ["***", "**", "*", "", ""]
    # a family that cannot reach 0.05 says so: 6 subjects (min p 1/32) and 2 comparisons under Holm
    six = [S.paired_comparison(*_arms([[x] for x in (0.1, 0.2, 0.3, 0.1, 0.2, 0.3)], [[0.0]] * 6),
                               run_level=False)] * 2
    assert any("smallest reachable adjusted p" in n for n in S.correct_family(six)[0].notes)
    bh = S.correct_family(strong, "bh")
    assert all(c.correction == "bh" for c in bh)


# ----------------------------------------------------------------------------- across studies
def test_stouffer_equals_hand_computation() -> None:
    p, n = [0.04, 0.30, 0.60], [10, 4, 8]
    r = S.stouffer(p, n)
    z = [st.norm.isf(x) for x in p]
    w = [math.sqrt(k) for k in n]
    z_hand = sum(wi * zi for wi, zi in zip(w, z, strict=True)) / math.sqrt(sum(wi**2 for wi in w))
    assert r.z == pytest.approx(z_hand, rel=1e-12)
    assert r.p_greater == pytest.approx(1 - st.norm.cdf(z_hand), rel=1e-10)
    assert r.p_less == pytest.approx(st.norm.cdf(z_hand)) and r.p_two_sided == pytest.approx(2 * r.p_greater)
    assert r.weights == pytest.approx(tuple(w)) and r.z_studies == pytest.approx(tuple(z))
    # opposite effects of equal weight cancel (two-sided p-values would have added up)
    assert S.stouffer([0.01, 0.99], [9, 9]).z == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(BrainalignError, match="strictly inside"):
        S.stouffer([1.0, 0.2], [4, 4])
    with pytest.raises(BrainalignError, match="one p and one n"):
        S.stouffer([0.2], [4, 4])


def test_combine_studies_uses_one_sided_mid_p_and_subject_counts() -> None:
    up = S.paired_comparison(*_arms([[x] for x in (0.3, 0.2, 0.4, 0.1, 0.2)], [[0.0]] * 5), run_level=False)
    down = S.paired_comparison(*_arms([[0.0]] * 4, [[x] for x in (0.3, 0.2, 0.4, 0.1)]), run_level=False)
    assert down.permutation.p_greater == 1.0  # z = -inf: why the mid-p is combined instead
    r = S.combine_studies([up, down])
    hand = S.stouffer([up.permutation.p_greater_mid, down.permutation.p_greater_mid], [5, 4])
    assert r == hand and r.n_subjects == (5, 4)
    assert up.permutation.p_greater_mid == pytest.approx(1 / 64)  # (0 above + 1 tie / 2) / 32
