"""The statistics of a study report, in one place (and behind one function, :func:`summarize`).

For every brain encoder x backbone and metric: mean +- s.e.m. of each arm over subjects
(each subject's value averaged over its seeds) and over all (subject, seed) runs, the mean
+- s.e.m. of the per-subject differences, the relative improvement ``(aligned - base) /
base`` of the subject means, a two-sided paired t-test (``scipy.stats.ttest_rel``) and the
Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) across subjects (seed-averaged) and
across (subject, seed) pairs. Where a test is undefined (fewer than 2 pairs, all differences
zero, constant differences) its p-value is NaN and a note says why.

The report reads these numbers only through :func:`summarize`; replacing the statistics
(subject-level inference, confidence intervals, permutation tests) is a change here.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GALLERY_METRIC", "METRICS", "ComparisonStats", "FinalRow", "PairedTest", "compare", "extra_metrics",
           "gallery_values", "mean_sem", "metric_label", "paired_tests", "summarize"]

#: The test metrics a report always compares (the test gallery: N-way retrieval).
METRICS = ("test_top1", "test_top5")
#: Metrics of a run's other galleries (``test.gallery = "test+train"``): ``test_top1_16740way`` ...
GALLERY_METRIC = re.compile(r"^test_top([15])_(\d+)way$")


def metric_label(metric: str) -> str:
    """``test_top1`` -> ``top-1``; ``test_top1_16740way`` -> ``top-1 (16740-way)``."""
    m = GALLERY_METRIC.match(metric)
    if m:
        return f"top-{m.group(1)} ({m.group(2)}-way)"
    return metric.replace("test_", "").replace("top", "top-")


def gallery_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The gallery metrics (``test_top1_<N>way`` ...) among a run's ``metrics``."""
    return {k: float(v) for k, v in metrics.items() if GALLERY_METRIC.match(k)}


def extra_metrics(rows: Sequence[FinalRow]) -> list[str]:
    """The large-gallery metrics every row has, by n-way (``test_top1_16740way``, ...).

    A run logs ``test_top{1,5}_<N>way`` for each of its galleries, the test gallery included
    (the same numbers as ``test_top1`` / ``test_top5``); those of the test gallery are left out.
    """
    if not rows:
        return []
    common = set.intersection(*(set(r.extra) for r in rows))
    n_test = {round(r.test_n_way) for r in rows if not math.isnan(r.test_n_way)}
    out = [m for m in common if (g := GALLERY_METRIC.match(m)) and int(g.group(2)) not in n_test]
    return sorted(out, key=lambda m: (int(GALLERY_METRIC.match(m).group(2)), m))  # type: ignore[union-attr]


@dataclass(frozen=True)
class FinalRow:
    """One final run: what the report is computed from (one CSV row)."""

    encoder: str
    backbone: str
    alignment: str
    arm: str  # "aligned" or "base"
    subject: str
    seed: int
    run_id: str
    test_top1: float
    test_top5: float
    test_n_way: float = float("nan")
    #: the run's other-gallery metrics, e.g. ``{"test_top1_16740way": 0.05, ...}``
    extra: Mapping[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float:
        """The run's ``metric``: ``test_top1``, ``test_top5`` or an ``extra`` gallery metric."""
        if metric in self.extra:
            return float(self.extra[metric])
        return float(getattr(self, metric))


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of aligned vs base. ``p`` is NaN where the test is undefined."""

    n: int
    statistic: float
    p: float
    note: str = ""


@dataclass
class ComparisonStats:
    """Aligned vs base for one encoder x backbone x metric."""

    encoder: str
    backbone: str
    aligned_alignment: str
    base_alignment: str
    metric: str
    n_subjects: int
    n_seeds: int
    aligned_subject_mean: float
    aligned_subject_sem: float
    base_subject_mean: float
    base_subject_sem: float
    aligned_run_mean: float
    aligned_run_sem: float
    base_run_mean: float
    base_run_sem: float
    relative_improvement: float
    diff_subject_mean: float
    diff_subject_sem: float
    ttest_subjects: PairedTest
    ttest_runs: PairedTest
    wilcoxon_subjects: PairedTest
    wilcoxon_runs: PairedTest
    chance: float = float("nan")
    notes: list[str] = field(default_factory=list)


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (``std(ddof=1) / sqrt(n)``; NaN for n < 2)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def paired_tests(aligned: Sequence[float], base: Sequence[float]) -> tuple[PairedTest, PairedTest]:
    """Two-sided paired t-test and Wilcoxon signed-rank test of ``aligned`` vs ``base``.

    Parameters
    ----------
    aligned, base : sequence of float
        Paired values (same length, same order).

    Returns
    -------
    ttest, wilcoxon : PairedTest
        ``scipy.stats.ttest_rel`` and ``scipy.stats.wilcoxon`` results; NaN with a note when
        fewer than 2 pairs, all differences are zero, or (t-test) the differences are constant.
    """
    from scipy import stats

    a = np.asarray(aligned, dtype=float)
    b = np.asarray(base, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    n = int(a.size)
    d = a - b
    nan = float("nan")
    if n < 2:
        note = f"n = {n} pair(s): a paired test needs at least 2"
        return PairedTest(n, nan, nan, note), PairedTest(n, nan, nan, note)
    if np.all(d == 0):
        note = "all differences are zero"
        return PairedTest(n, nan, nan, note), PairedTest(n, nan, nan, note)
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):  # equal up to rounding
        t = PairedTest(n, nan, nan, "constant differences: t is undefined (zero variance)")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.ttest_rel(a, b)
        t = PairedTest(n, float(res.statistic), float(res.pvalue))
    nonzero = int(np.count_nonzero(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wres = stats.wilcoxon(a, b)
            w = PairedTest(n, float(wres.statistic), float(wres.pvalue))
        except ValueError as e:
            w = PairedTest(n, nan, nan, f"wilcoxon undefined: {e}")
    if w.note == "" and nonzero < 6:
        w = PairedTest(n, w.statistic, w.p, f"only {nonzero} non-zero differences: the signed-rank test "
                       "cannot reach p < 0.05 (two-sided) below 6")
    return t, w


def compare(rows: Iterable[FinalRow], metric: str) -> list[ComparisonStats]:
    """Aligned vs base statistics of ``metric`` for every encoder x backbone in ``rows``.

    Parameters
    ----------
    rows : iterable of FinalRow
        Final runs; for each encoder x backbone both arms must cover the same subjects and seeds.
    metric : str
        ``test_top1``, ``test_top5`` or a large-gallery metric such as ``test_top1_16740way``
        (every row must have it; its chance level is ``k / 16740``).

    Returns
    -------
    list of ComparisonStats
        Sorted by encoder, then backbone.

    Raises
    ------
    ValueError
        The arms do not cover the same (subject, seed) runs.
    """
    groups: dict[tuple[str, str], dict[str, dict[tuple[str, int], FinalRow]]] = {}
    for r in rows:
        groups.setdefault((r.encoder, r.backbone), {}).setdefault(r.arm, {})[(r.subject, r.seed)] = r
    out = []
    for (enc, bb), arms in sorted(groups.items()):
        al, ba = arms.get("aligned", {}), arms.get("base", {})
        if set(al) != set(ba) or not al:
            raise ValueError(
                f"{enc} x {bb}: aligned and base finals cover different runs "
                f"(aligned {sorted(al)}, base {sorted(ba)})"
            )
        keys = sorted(al)
        subjects = sorted({s for s, _ in keys})
        seeds = sorted({k for _, k in keys})
        a_runs = [al[k].value(metric) for k in keys]
        b_runs = [ba[k].value(metric) for k in keys]
        a_sub = [float(np.mean([al[k].value(metric) for k in keys if k[0] == s])) for s in subjects]
        b_sub = [float(np.mean([ba[k].value(metric) for k in keys if k[0] == s])) for s in subjects]
        am, ase = mean_sem(a_sub)
        bm, bse = mean_sem(b_sub)
        arm_, ars = mean_sem(a_runs)
        brm, brs = mean_sem(b_runs)
        dm, dse = mean_sem([x - y for x, y in zip(a_sub, b_sub, strict=True)])
        t_sub, w_sub = paired_tests(a_sub, b_sub)
        t_run, w_run = paired_tests(a_runs, b_runs)
        gm = GALLERY_METRIC.match(metric)
        if gm:
            n_way, k_top = float(gm.group(2)), int(gm.group(1))
        else:
            n_way = float(np.nanmean([al[k].test_n_way for k in keys])) if keys else float("nan")
            k_top = 5 if metric.endswith("top5") else 1
        chance = min(k_top, n_way) / n_way if n_way and not math.isnan(n_way) else float("nan")
        notes = []
        for label, test in (("t-test across subjects", t_sub), ("t-test across (subject, seed)", t_run),
                            ("Wilcoxon across subjects", w_sub), ("Wilcoxon across (subject, seed)", w_run)):
            if test.note:
                notes.append(f"{label}: {test.note}")
        out.append(ComparisonStats(
            encoder=enc, backbone=bb,
            aligned_alignment=next(iter(al.values())).alignment, base_alignment=next(iter(ba.values())).alignment,
            metric=metric, n_subjects=len(subjects), n_seeds=len(seeds),
            aligned_subject_mean=am, aligned_subject_sem=ase, base_subject_mean=bm, base_subject_sem=bse,
            aligned_run_mean=arm_, aligned_run_sem=ars, base_run_mean=brm, base_run_sem=brs,
            relative_improvement=(am - bm) / bm if bm else float("nan"),
            diff_subject_mean=dm, diff_subject_sem=dse,
            ttest_subjects=t_sub, ttest_runs=t_run, wilcoxon_subjects=w_sub, wilcoxon_runs=w_run,
            chance=chance, notes=notes,
        ))
    return out


def summarize(rows: Sequence[FinalRow]) -> list[ComparisonStats]:
    """Every comparison of a report: :func:`compare` for each of :data:`METRICS` and then each
    large-gallery metric all rows have (:func:`extra_metrics`), sorted by encoder, backbone and
    metric (in that order). The one entry point the report uses."""
    metrics = [*METRICS, *extra_metrics(rows)]
    order = {m: i for i, m in enumerate(metrics)}
    stats = [s for m in metrics for s in compare(rows, m)]
    stats.sort(key=lambda s: (s.encoder, s.backbone, order[s.metric]))
    return stats
