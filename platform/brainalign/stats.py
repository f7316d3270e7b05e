"""Statistics for "arm A beats arm B across subjects": the one place they are computed.

Pure functions and frozen dataclasses over plain numbers; nothing here knows about reports,
MLflow or Ray. ``docs/statistics.md`` explains each statistic and its limits.

The unit of inference is the **subject**. A run's seed changes the initialization and the
batch order, but every seed of a subject shares that subject's data, validation split and
test set, so seeds are repeated measurements, not independent samples. Every comparison
therefore starts by collapsing each subject's seeds to one value per arm
(:func:`collapse_seeds`); the paired differences ``d_s = mean_a(s) - mean_b(s)`` are then
what every subject-level statistic is computed from:

* each arm's mean +- s.e.m. over subjects;
* the mean difference with a t-based 95 % CI and a subject-level percentile bootstrap CI;
* Cohen's ``d_z = mean(d) / sd(d)``;
* the paired t-test (``scipy.stats.ttest_1samp`` on ``d``, two-sided);
* the **primary test**: a paired sign-flip permutation test on ``mean(d)``
  (``scipy.stats.permutation_test``), exact (all ``2^n`` sign patterns) for up to
  :data:`EXACT_MAX_SUBJECTS` subjects, Monte-Carlo with a seed above that;
* the Wilcoxon signed-rank test as a secondary, rank-based check.

Beside them, labelled as run-level and never the headline, a linear mixed model over all
(subject, seed) runs (:func:`mixed_model`). Across the comparisons of a study,
:func:`correct_family` adds Holm (default) or Benjamini-Hochberg adjusted p-values; stars
come only from the adjusted primary p (:attr:`PairedComparison.stars`). Across studies,
:func:`stouffer` combines one-sided p-values with weights ``sqrt(n_subjects)``.

A statistic that is undefined for the data (fewer than 2 subjects, all differences zero,
constant differences) is NaN and a note says why; it is never a crash and never a p-value
that looks better than the data allow.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats as _st

from ._checks import BrainalignError, check_option, check_range

__all__ = [
    "ALPHA",
    "CORRECTIONS",
    "EXACT_MAX_SUBJECTS",
    "ArmSummary",
    "ConfidenceInterval",
    "MixedModelResult",
    "PairedComparison",
    "PermutationResult",
    "StoufferResult",
    "TestResult",
    "adjust_pvalues",
    "bootstrap_ci",
    "collapse_seeds",
    "combine_studies",
    "correct_family",
    "mean_sem",
    "min_permutation_p",
    "mixed_model",
    "paired_comparison",
    "sign_flip_test",
    "stars",
    "stouffer",
]

#: Significance level of every statement the platform makes (two-sided).
ALPHA = 0.05
#: Up to this many subjects the sign-flip test enumerates all ``2^n`` patterns (65,536 at 16).
EXACT_MAX_SUBJECTS = 16
#: ``correct_family(method=...)`` -> the ``statsmodels.stats.multitest.multipletests`` name.
CORRECTIONS = {"holm": "holm", "bh": "fdr_bh"}

NAN = float("nan")


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ArmSummary:
    """One arm over subjects: mean +- s.e.m. of the seed-averaged subject values.

    Attributes
    ----------
    mean, sem : float
        Mean and standard error (``sd(ddof=1) / sqrt(n)``; NaN for one subject).
    n_subjects, n_runs : int
        Subjects, and runs (subject x seed) behind them.
    """

    mean: float
    sem: float
    n_subjects: int
    n_runs: int


@dataclass(frozen=True)
class ConfidenceInterval:
    """A confidence interval; ``low``/``high`` are NaN (and ``note`` says why) if undefined."""

    low: float
    high: float
    level: float
    method: str
    note: str = ""


@dataclass(frozen=True)
class TestResult:
    """One hypothesis test. ``p`` is NaN (with a ``note``) where the test is undefined.

    ``p_adjusted`` is filled by :func:`correct_family` (NaN until then).
    """

    name: str
    statistic: float
    p: float
    p_adjusted: float = NAN
    note: str = ""


@dataclass(frozen=True)
class PermutationResult:
    """The paired sign-flip permutation test on ``mean(d)``.

    Attributes
    ----------
    statistic : float
        Observed mean difference.
    p : float
        Two-sided p: the fraction of sign patterns with ``|mean| >= |observed|``.
    p_greater : float
        One-sided p for "A > B".
    p_greater_mid : float
        One-sided mid-p for "A > B" (``P(T > t) + P(T = t) / 2``): strictly inside (0, 1),
        what :func:`stouffer` combines across studies.
    exact : bool
        True if all ``2^n`` sign patterns were enumerated; else ``n_patterns`` random ones
        (p then counts the observed pattern too, so it is never 0).
    n_patterns : int
        Patterns in the null distribution.
    min_p : float
        Smallest two-sided p the design can produce, ``2 / 2^k`` for ``k`` non-zero
        differences: with ``min_p >= alpha`` the test cannot reject at any effect size.
    p_adjusted : float
        Family-wise adjusted ``p`` (:func:`correct_family`); NaN until then.
    note : str
        Why ``p`` is NaN, or why the design cannot reach ``p < alpha``.
    """

    statistic: float
    p: float
    p_greater: float
    p_greater_mid: float
    exact: bool
    n_patterns: int
    min_p: float
    p_adjusted: float = NAN
    note: str = ""


@dataclass(frozen=True)
class MixedModelResult:
    """Run-level linear mixed model (secondary; never the headline).

    ``y ~ arm`` over every (subject, seed, arm) run, with a random intercept **and** a random
    arm effect per subject (``statsmodels`` ``MixedLM``, REML). ``estimate`` is the fixed arm
    effect (A - B), ``p`` its Wald z-test, which uses a normal reference distribution and is
    therefore optimistic with few subjects.
    """

    label: str
    estimate: float
    se: float
    z: float
    p: float
    n_runs: int
    n_subjects: int
    converged: bool
    note: str = ""


@dataclass(frozen=True)
class PairedComparison:
    """Arm A vs arm B at the subject level (see the module docstring).

    Attributes
    ----------
    name : str
        What is compared (e.g. ``"nice / sim-clip / test_top1"``).
    subjects : tuple of str
        Subjects, sorted; ``a_values``/``b_values``/``differences`` follow this order.
    runs : tuple of (int, int)
        Per subject, the runs (seeds) behind arm A's and arm B's value.
    a, b : ArmSummary
        Each arm over subjects.
    a_values, b_values, differences : tuple of float
        Seed-averaged subject values and ``a - b`` per subject.
    mean_difference : float
        ``mean(differences)`` (equals ``a.mean - b.mean``).
    ci_t, ci_bootstrap : ConfidenceInterval
        95 % CIs of the mean difference: t-based (headline) and subject-level bootstrap.
    d_z : float
        Cohen's ``d_z = mean(d) / sd(d, ddof=1)``; NaN for n < 2 or zero variance.
    t_test : TestResult
        Paired t-test across subjects (``df = n - 1``).
    permutation : PermutationResult
        The primary test.
    wilcoxon : TestResult
        Wilcoxon signed-rank test across subjects (secondary check).
    mixed : MixedModelResult or None
        Run-level mixed model, or None if not requested.
    correction : str
        Family-wise method of the adjusted p-values (``""`` until :func:`correct_family`).
    family_size : int
        Comparisons in the corrected family (0 until then).
    alpha : float
        Significance level.
    notes : tuple of str
        Everything a reader must know (undefined statistics, unreachable significance).
    """

    name: str
    subjects: tuple[str, ...]
    runs: tuple[tuple[int, int], ...]
    a: ArmSummary
    b: ArmSummary
    a_values: tuple[float, ...]
    b_values: tuple[float, ...]
    differences: tuple[float, ...]
    mean_difference: float
    ci_t: ConfidenceInterval
    ci_bootstrap: ConfidenceInterval
    d_z: float
    t_test: TestResult
    permutation: PermutationResult
    wilcoxon: TestResult
    mixed: MixedModelResult | None
    correction: str = ""
    family_size: int = 0
    alpha: float = ALPHA
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    @property
    def design(self) -> str:
        """``"<subjects> x <seeds>"`` (seeds per subject and arm; a range if they differ)."""
        counts = sorted({k for pair in self.runs for k in pair})
        seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return f"{self.n_subjects} x {seeds}"

    @property
    def primary_p(self) -> float:
        """Raw p of the primary test (the exact sign-flip permutation test)."""
        return self.permutation.p

    @property
    def primary_p_adjusted(self) -> float:
        """Family-wise adjusted p of the primary test (NaN before :func:`correct_family`)."""
        return self.permutation.p_adjusted

    @property
    def stars(self) -> str:
        """Significance stars from the ADJUSTED primary p only; ``""`` before correction."""
        return stars(self.primary_p_adjusted)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (NaN and infinities become None)."""
        return _jsonable(asdict(self) | {"n_subjects": self.n_subjects, "design": self.design, "stars": self.stars})


@dataclass(frozen=True)
class StoufferResult:
    """Weighted Stouffer combination of one-sided p-values across studies.

    Attributes
    ----------
    z : float
        ``sum(w_i z_i) / sqrt(sum(w_i^2))`` with ``z_i = Phi^-1(1 - p_i)``.
    p_greater, p_less, p_two_sided : float
        ``1 - Phi(z)``, ``Phi(z)`` and ``2 min(...)``.
    z_studies, weights : tuple of float
        Per-study z and weight (``sqrt(n_subjects)``).
    n_subjects : tuple of int
        Subjects per study.
    """

    z: float
    p_greater: float
    p_less: float
    p_two_sided: float
    z_studies: tuple[float, ...]
    weights: tuple[float, ...]
    n_subjects: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None)."""
        return _jsonable(asdict(self))


# ----------------------------------------------------------------------------- helpers
def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _as_finite(name: str, values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(x)):
        raise BrainalignError(
            f"{name} holds non-finite values {x[~np.isfinite(x)].tolist()}: a failed or diverged run "
            "cannot enter the statistics. Re-run it or drop the subject from both arms."
        )
    return x


def _constant(d: np.ndarray) -> bool:
    """All values equal up to rounding (zero variance)."""
    return bool(np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())))


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean, ``sd(ddof=1) / sqrt(n)``.

    Returns ``(nan, nan)`` for no values and ``(mean, nan)`` for one.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return NAN, NAN
    if x.size < 2:
        return float(x.mean()), NAN
    return float(x.mean()), float(_st.sem(x, ddof=1))


def stars(p_adjusted: float) -> str:
    """``***`` (< 0.001), ``**`` (< 0.01), ``*`` (< 0.05) or ``""`` (also for NaN).

    Pass an ADJUSTED p-value: a study's stars must survive its family-wise correction.
    """
    if not (isinstance(p_adjusted, (int, float)) and math.isfinite(p_adjusted)):
        return ""
    for cut, mark in ((0.001, "***"), (0.01, "**"), (0.05, "*")):
        if p_adjusted < cut:
            return mark
    return ""


def collapse_seeds(values: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """One value per subject: the mean over that subject's seeds.

    Parameters
    ----------
    values : mapping of str to sequence of float
        Subject id -> the metric of each of its runs (one per seed).

    Returns
    -------
    dict of str to float
        Subject id -> mean over its runs, subjects in sorted order.

    Raises
    ------
    BrainalignError
        If a subject has no runs or a run's value is not finite.
    """
    out: dict[str, float] = {}
    for subject in sorted(values):
        x = _as_finite(f"subject {subject!r}", values[subject])
        if x.size == 0:
            raise BrainalignError(f"subject {subject!r} has no runs; drop it or run it before comparing.")
        out[subject] = float(x.mean())
    return out


# ----------------------------------------------------------------------------- tests
def min_permutation_p(n_nonzero: int) -> float:
    """Smallest two-sided p of an exact sign-flip test with ``n_nonzero`` non-zero differences.

    Only the all-positive and all-negative patterns reach the largest ``|mean|``, so the
    smallest p is ``2 / 2^k`` (``k`` = non-zero differences; a zero difference keeps its
    value under a flip). 4 subjects: 0.125; 5: 0.0625; 6: 0.03125; 10: 0.00195.
    """
    return min(1.0, 2.0 / 2.0**n_nonzero) if n_nonzero > 0 else 1.0


def _mean_stat(x: np.ndarray, axis: int) -> np.ndarray:
    return np.mean(x, axis=axis)


def sign_flip_test(
    differences: Sequence[float],
    *,
    exact_max: int = EXACT_MAX_SUBJECTS,
    n_resamples: int = 100_000,
    seed: int = 0,
    alpha: float = ALPHA,
) -> PermutationResult:
    """Paired sign-flip permutation test of ``mean(d) = 0`` (``scipy.stats.permutation_test``).

    Under the null hypothesis that the two arms are exchangeable within a subject, each
    subject's difference is as likely to have either sign, so the null distribution of
    ``mean(d)`` is that of ``mean(±d)`` over the ``2^n`` sign patterns. Up to ``exact_max``
    subjects all patterns are enumerated (the p-value is exact); above, ``n_resamples``
    random patterns drawn with ``seed``. The statistic is the mean difference; the paired t
    statistic gives the same p-values (under a flip ``sum(d^2)`` is fixed, so ``t`` is a
    monotone function of the mean).

    Parameters
    ----------
    differences : sequence of float
        One paired difference per subject (A - B).
    exact_max : int
        Largest ``n`` tested exactly.
    n_resamples : int
        Random sign patterns above ``exact_max``.
    seed : int
        Seed of the random patterns (unused when exact).
    alpha : float
        Level at which ``note`` says the design cannot reject.

    Returns
    -------
    PermutationResult
        NaN p-values with a note for fewer than 2 subjects or all differences zero.
    """
    d = _as_finite("differences", differences)
    n = int(d.size)
    k = int(np.count_nonzero(d))
    min_p = min_permutation_p(k)
    exact = n <= exact_max
    n_patterns = 2**n if exact else int(n_resamples)
    stat = float(d.mean()) if n else NAN
    if n < 2:
        return PermutationResult(stat, NAN, NAN, NAN, exact, n_patterns, min_p,
                                 note=f"n = {n} subject(s): a paired test needs at least 2")
    if k == 0:
        return PermutationResult(stat, NAN, NAN, NAN, exact, n_patterns, min_p,
                                 note="all paired differences are zero: the arms are identical on every subject, "
                                 "so no test is informative (every sign pattern ties)")

    def run(alternative: str) -> Any:
        return _st.permutation_test(
            (d,), _mean_stat, permutation_type="samples", vectorized=True, alternative=alternative,
            n_resamples=np.inf if exact else int(n_resamples), rng=np.random.default_rng(seed),
        )

    two, greater = run("two-sided"), run("greater")
    null = np.asarray(greater.null_distribution, dtype=float)
    # scipy's tie tolerance, so that "equal" means the same here as in its p-values
    gamma = abs(np.finfo(float).eps * 100 * stat)
    above = float(np.sum(null > stat + gamma))
    ties = float(np.sum(np.abs(null - stat) <= gamma))
    mid = (above + 0.5 * ties) / null.size if exact else (above + 0.5 * (ties + 1)) / (null.size + 1)
    note = ""
    if min_p >= alpha:
        note = (f"with {k} non-zero subject difference(s) the smallest two-sided p this test can give is "
                f"2/2^{k} = {min_p:.3g} >= {alpha:g}: the design cannot reach significance at any effect size")
    return PermutationResult(stat, float(two.pvalue), float(greater.pvalue), float(mid), exact, n_patterns,
                             min_p, note=note)


def _t_test(d: np.ndarray) -> tuple[TestResult, ConfidenceInterval, float]:
    n = d.size
    if n < 2:
        note = f"n = {n} subject(s): t needs at least 2"
        return TestResult("paired t", NAN, NAN, note=note), ConfidenceInterval(NAN, NAN, 0.95, "t", note), NAN
    if not np.any(d):
        note = "all paired differences are zero: t is 0/0"
        return TestResult("paired t", NAN, NAN, note=note), ConfidenceInterval(NAN, NAN, 0.95, "t", note), NAN
    if _constant(d):
        # scipy returns t = inf, p = 0 here: a fake certainty from a zero variance estimate
        note = "constant paired differences: zero variance, so t, its CI and d_z are undefined"
        return TestResult("paired t", NAN, NAN, note=note), ConfidenceInterval(NAN, NAN, 0.95, "t", note), NAN
    res = _st.ttest_1samp(d, 0.0)
    ci = res.confidence_interval(confidence_level=0.95)
    d_z = float(d.mean() / d.std(ddof=1))
    return (TestResult("paired t", float(res.statistic), float(res.pvalue)),
            ConfidenceInterval(float(ci.low), float(ci.high), 0.95, "t"), d_z)


def bootstrap_ci(
    differences: Sequence[float], *, seed: int = 0, n_resamples: int = 9999, level: float = 0.95
) -> ConfidenceInterval:
    """Percentile bootstrap CI of the mean difference, resampling SUBJECTS (``scipy.stats.bootstrap``).

    Percentile rather than BCa: BCa needs a jackknife that degenerates with a handful of
    subjects. With few subjects the bootstrap distribution is coarse (``n^n`` resamples at
    most) and the interval is too narrow; the t-based CI is the headline.

    Returns
    -------
    ConfidenceInterval
        NaN bounds with a note for fewer than 2 subjects or constant differences.
    """
    d = _as_finite("differences", differences)
    if d.size < 2:
        return ConfidenceInterval(NAN, NAN, level, "bootstrap", f"n = {d.size} subject(s): nothing to resample")
    if _constant(d):
        return ConfidenceInterval(NAN, NAN, level, "bootstrap",
                                  "constant paired differences: every resample has the same mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning for tiny n: the note in the docs covers it
        res = _st.bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=level,
                            method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return ConfidenceInterval(float(ci.low), float(ci.high), level, "bootstrap")


def _wilcoxon(d: np.ndarray) -> TestResult:
    n = d.size
    k = int(np.count_nonzero(d))
    if n < 2:
        return TestResult("wilcoxon", NAN, NAN, note=f"n = {n} subject(s): the test needs at least 2")
    if k == 0:
        return TestResult("wilcoxon", NAN, NAN, note="all paired differences are zero")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = _st.wilcoxon(d)
    note = ""
    if k < 6:
        note = f"only {k} non-zero differences: the signed-rank test cannot reach p < 0.05 (two-sided) below 6"
    return TestResult("wilcoxon", float(res.statistic), float(res.pvalue), note=note)


def mixed_model(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]]) -> MixedModelResult:
    """Run-level linear mixed model ``y ~ arm`` with random subject intercepts and arm effects.

    Every run is a row ``(subject, arm, y)`` (arm 1 = A, 0 = B). A random intercept alone is
    NOT enough: the arm effect varies by subject, and a model without a per-subject arm effect
    treats the seeds of a subject as independent evidence about it, which is the
    pseudo-replication this module exists to avoid (docs/statistics.md measures it). With both
    random terms the fixed effect equals the subject-level mean difference (balanced data) and
    its standard error the paired t's; the Wald z p-value is still optimistic with few subjects
    (normal instead of t reference), so this is a secondary, labelled result.

    Returns
    -------
    MixedModelResult
        NaN with a note when it cannot be fitted (fewer than 3 subjects, one run per subject
        and arm, a singular or failed fit); an unconverged fit keeps its estimate only.
    """
    import pandas as pd
    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    label = "run-level LMM: y ~ arm, random subject intercept + arm effect (REML, Wald z)"
    rows = [(s, 1, float(v)) for s in sorted(a) for v in a[s]] + [(s, 0, float(v)) for s in sorted(b) for v in b[s]]
    df = pd.DataFrame(rows, columns=["subject", "arm", "y"])
    n_subjects = int(df["subject"].nunique())
    n_runs = len(df)

    def nan(note: str, converged: bool = False) -> MixedModelResult:
        return MixedModelResult(label, NAN, NAN, NAN, NAN, n_runs, n_subjects, converged, note)

    if n_subjects < 3:
        return nan(f"{n_subjects} subject(s): a random arm effect per subject needs at least 3")
    if max(df.groupby(["subject", "arm"]).size()) < 2:
        return nan("one run per subject and arm: the run-level model is the subject-level analysis")
    if df["y"].std() == 0:
        return nan("every run has the same value")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = smf.mixedlm("y ~ arm", df, groups=df["subject"], re_formula="~arm").fit(reml=True)
        except (ValueError, np.linalg.LinAlgError) as e:
            return nan(f"fit failed: {e}")
    converged = bool(getattr(fit, "converged", False))
    warned = list(dict.fromkeys(str(w.message).split("\n")[0] for w in caught
                                if issubclass(w.category, (ConvergenceWarning, RuntimeWarning))))
    est, se, p = float(fit.params["arm"]), float(fit.bse["arm"]), float(fit.pvalues["arm"])
    if not converged:
        # an unconverged fit's standard error is not to be trusted: keep only the estimate
        return MixedModelResult(label, est, NAN, NAN, NAN, n_runs, n_subjects, False,
                                "did not converge: " + "; ".join(warned[:2]))
    if not (math.isfinite(se) and se > 0 and math.isfinite(p)):
        return nan("singular fit: the arm effect's standard error is not finite", converged)
    return MixedModelResult(label, est, se, est / se, p, n_runs, n_subjects, converged, "; ".join(warned[:2]))


# ----------------------------------------------------------------------------- comparison
def paired_comparison(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    *,
    name: str = "",
    alpha: float = ALPHA,
    seed: int = 0,
    n_bootstrap: int = 9999,
    n_permutations: int = 100_000,
    exact_max: int = EXACT_MAX_SUBJECTS,
    run_level: bool = True,
) -> PairedComparison:
    """Compare arm A with arm B at the subject level.

    Parameters
    ----------
    a, b : mapping of str to sequence of float
        Subject id -> that subject's per-seed values of the metric, for each arm. Both arms
        must name the same subjects (a subject missing from one arm has no pair).
    name : str
        Label of the comparison.
    alpha : float
        Significance level of the notes and of :func:`correct_family`.
    seed : int
        Seed of the bootstrap and of a Monte-Carlo permutation test.
    n_bootstrap, n_permutations, exact_max : int
        Bootstrap resamples; random sign patterns above ``exact_max`` subjects.
    run_level : bool
        Also fit :func:`mixed_model` on the individual runs.

    Returns
    -------
    PairedComparison

    Raises
    ------
    BrainalignError
        If the arms name different subjects, no subject at all, or a value is not finite.
    """
    check_range("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise BrainalignError(
            f"comparison {name or '(unnamed)'}: arms must have the same subjects; only in A: {only_a}, only in B: "
            f"{only_b}. Run the missing subjects or drop them from both arms."
        )
    if not a:
        raise BrainalignError(f"comparison {name or '(unnamed)'} has no subjects.")
    ma, mb = collapse_seeds(a), collapse_seeds(b)
    subjects = tuple(ma)
    av = np.array([ma[s] for s in subjects])
    bv = np.array([mb[s] for s in subjects])
    d = av - bv
    n = len(subjects)
    n_runs_a = sum(len(a[s]) for s in subjects)
    n_runs_b = sum(len(b[s]) for s in subjects)

    t_test, ci_t, d_z = _t_test(d)
    perm = sign_flip_test(d, exact_max=exact_max, n_resamples=n_permutations, seed=seed, alpha=alpha)
    notes = [x for x in dict.fromkeys((t_test.note, perm.note)) if x]
    mixed = mixed_model({s: a[s] for s in subjects}, {s: b[s] for s in subjects}) if run_level else None
    return PairedComparison(
        name=name,
        subjects=subjects,
        runs=tuple((len(a[s]), len(b[s])) for s in subjects),
        a=ArmSummary(*mean_sem(av), n, n_runs_a),
        b=ArmSummary(*mean_sem(bv), n, n_runs_b),
        a_values=tuple(map(float, av)),
        b_values=tuple(map(float, bv)),
        differences=tuple(map(float, d)),
        mean_difference=float(d.mean()),
        ci_t=ci_t,
        ci_bootstrap=bootstrap_ci(d, seed=seed, n_resamples=n_bootstrap),
        d_z=d_z,
        t_test=t_test,
        permutation=perm,
        wilcoxon=_wilcoxon(d),
        mixed=mixed,
        alpha=alpha,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- families
def adjust_pvalues(p_values: Sequence[float], method: str = "holm") -> tuple[float, ...]:
    """Family-wise adjusted p-values (``statsmodels.stats.multitest.multipletests``).

    Parameters
    ----------
    p_values : sequence of float
        Raw p-values of one family. NaN entries (undefined tests) are not tests: they stay NaN
        and do not count towards the family size.
    method : {"holm", "bh"}
        Holm's step-down (controls the family-wise error rate; default) or
        Benjamini-Hochberg (controls the false discovery rate).

    Returns
    -------
    tuple of float
        Adjusted p-values in input order.
    """
    from statsmodels.stats.multitest import multipletests

    check_option("correction method", method, CORRECTIONS)
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, NAN)
    ok = np.isfinite(p)
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise BrainalignError(f"p-values must lie in [0, 1], got {p[ok][(p[ok] < 0) | (p[ok] > 1)].tolist()}.")
    if ok.any():
        out[ok] = multipletests(p[ok], method=CORRECTIONS[method])[1]
    return tuple(float(x) for x in out)


def correct_family(
    comparisons: Sequence[PairedComparison], method: str = "holm"
) -> tuple[PairedComparison, ...]:
    """Adjust every comparison of one study as one family; return updated copies.

    The permutation (primary), t and Wilcoxon p-values are each adjusted across all
    comparisons of the family (every encoder x backbone x metric of a study). Stars
    (:attr:`PairedComparison.stars`) come from the adjusted permutation p only. A note is
    added where the design cannot reach ``alpha`` after correction (Holm's smallest adjusted
    p is ``m * min_p`` for a family of ``m``).

    Parameters
    ----------
    comparisons : sequence of PairedComparison
        All comparisons of one study.
    method : {"holm", "bh"}
        See :func:`adjust_pvalues`.

    Returns
    -------
    tuple of PairedComparison
    """
    check_option("correction method", method, CORRECTIONS)
    cs = list(comparisons)
    perm = adjust_pvalues([c.permutation.p for c in cs], method)
    tt = adjust_pvalues([c.t_test.p for c in cs], method)
    wx = adjust_pvalues([c.wilcoxon.p for c in cs], method)
    m = sum(math.isfinite(c.permutation.p) for c in cs)
    out = []
    for c, pp, pt, pw in zip(cs, perm, tt, wx, strict=True):
        notes = list(c.notes)
        if method == "holm" and m > 1 and math.isfinite(c.permutation.p) and m * c.permutation.min_p >= c.alpha:
            notes.append(f"after Holm over {m} comparisons the smallest reachable adjusted p is "
                         f"{m} x {c.permutation.min_p:.3g} >= {c.alpha:g}")
        out.append(replace(
            c,
            permutation=replace(c.permutation, p_adjusted=pp),
            t_test=replace(c.t_test, p_adjusted=pt),
            wilcoxon=replace(c.wilcoxon, p_adjusted=pw),
            correction=method,
            family_size=m,
            notes=tuple(dict.fromkeys(notes)),
        ))
    return tuple(out)


# ----------------------------------------------------------------------------- across studies
def stouffer(p_greater: Sequence[float], n_subjects: Sequence[int]) -> StoufferResult:
    """Weighted Stouffer combination (``scipy.stats.combine_pvalues``), weights ``sqrt(n)``.

    Each study contributes its ONE-SIDED p for the pre-specified direction "A > B" (aligned
    beats base), as MOABB's meta-analysis does. Two-sided p-values would lose the sign, so
    two studies with opposite significant effects would add up to a "significant" combined
    effect; a one-sided p near 1 is evidence for "B > A" and pulls the combined z down.

    Parameters
    ----------
    p_greater : sequence of float
        One-sided p per study, strictly inside (0, 1). An exact permutation p can equal 1
        (z = -inf, which would veto every other study): pass the mid-p
        (:attr:`PermutationResult.p_greater_mid`), as :func:`combine_studies` does.
    n_subjects : sequence of int
        Subjects per study.

    Returns
    -------
    StoufferResult
    """
    p = np.asarray(p_greater, dtype=float)
    n = np.asarray(n_subjects, dtype=int)
    if p.ndim != 1 or p.shape != n.shape or p.size == 0:
        raise BrainalignError(f"stouffer needs one p and one n per study, got {p.size} p and {n.size} n.")
    if not np.all((p > 0) & (p < 1)):
        raise BrainalignError(
            f"stouffer needs one-sided p-values strictly inside (0, 1), got {p.tolist()}; use the permutation "
            "test's mid-p (p_greater_mid) for exact discrete tests."
        )
    if np.any(n < 1):
        raise BrainalignError(f"every study needs at least one subject, got n_subjects = {n.tolist()}.")
    w = np.sqrt(n.astype(float))
    res = _st.combine_pvalues(p, method="stouffer", weights=w)
    z = float(res.statistic)
    p_less = float(_st.norm.cdf(z))
    return StoufferResult(
        z=z,
        p_greater=float(res.pvalue),
        p_less=p_less,
        p_two_sided=float(min(1.0, 2 * min(float(res.pvalue), p_less))),
        z_studies=tuple(float(x) for x in _st.norm.isf(p)),
        weights=tuple(float(x) for x in w),
        n_subjects=tuple(int(x) for x in n),
    )


def combine_studies(comparisons: Sequence[PairedComparison]) -> StoufferResult:
    """Stouffer across studies of one comparison (e.g. the same pair on EEG, MEG and fMRI).

    Uses each study's one-sided permutation mid-p for "A > B" and its number of subjects.
    """
    undefined = [c.name for c in comparisons if not math.isfinite(c.permutation.p_greater_mid)]
    if undefined:
        raise BrainalignError(f"cannot combine studies whose primary test is undefined: {undefined}.")
    return stouffer([c.permutation.p_greater_mid for c in comparisons], [c.n_subjects for c in comparisons])
