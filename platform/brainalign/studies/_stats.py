"""The statistics of a study report: :mod:`brainalign.stats` applied to a study's tested runs.

For every brain encoder x backbone and metric, one subject-level
:class:`~brainalign.stats.PairedComparison` of aligned vs base (each subject's value is the
mean over its seeds; seeds are repeated measurements of one subject, never independent
samples): both arms' mean +- s.e.m., the mean difference with a t-based and a subject
bootstrap 95 % CI, Cohen's d_z, the paired t-test, the exact sign-flip permutation test (the
primary test) and the Wilcoxon signed-rank test; with several seeds per subject, a run-level
linear mixed model with a random subject effect, labelled as such and never the headline.
All comparisons of a study form one family: Holm (default) or Benjamini-Hochberg adjusted
p-values sit beside the raw ones and stars come only from the adjusted primary p.

The report reads these numbers only through :func:`summarize`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import stats
from ..stats import mean_sem

__all__ = ["GALLERY_METRIC", "METRICS", "ComparisonStats", "FinalRow", "compare", "extra_metrics", "gallery_values",
           "mean_sem", "metric_label", "summarize"]

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


@dataclass
class ComparisonStats:
    """Aligned vs base for one encoder x backbone x metric (``comparison``: the statistics)."""

    encoder: str
    backbone: str
    aligned_alignment: str
    base_alignment: str
    metric: str
    n_subjects: int
    n_seeds: int
    comparison: stats.PairedComparison
    relative_improvement: float
    chance: float = float("nan")
    notes: list[str] = field(default_factory=list)

    # the numbers every table shows, by name
    @property
    def aligned_subject_mean(self) -> float:
        return self.comparison.a.mean

    @property
    def aligned_subject_sem(self) -> float:
        return self.comparison.a.sem

    @property
    def base_subject_mean(self) -> float:
        return self.comparison.b.mean

    @property
    def base_subject_sem(self) -> float:
        return self.comparison.b.sem

    @property
    def diff_subject_mean(self) -> float:
        return self.comparison.mean_difference

    @property
    def diff_subject_sem(self) -> float:
        return mean_sem(self.comparison.differences)[1]

    @property
    def label(self) -> str:
        return f"{self.encoder} × {self.backbone} {self.metric.replace('test_', '').replace('top', 'top-')}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""
        return {
            "encoder": self.encoder, "backbone": self.backbone, "aligned_alignment": self.aligned_alignment,
            "base_alignment": self.base_alignment, "metric": self.metric, "n_subjects": self.n_subjects,
            "n_seeds": self.n_seeds, "relative_improvement": _finite(self.relative_improvement),
            "chance": _finite(self.chance), "notes": list(self.notes), "comparison": self.comparison.to_dict(),
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def compare(rows: Iterable[FinalRow], metric: str, *, seed: int = 0) -> list[ComparisonStats]:
    """Aligned vs base of ``metric`` for every encoder x backbone in ``rows`` (uncorrected).

    Parameters
    ----------
    rows : iterable of FinalRow
        Final runs; for each encoder x backbone both arms must cover the same subjects and seeds.
    metric : str
        ``test_top1``, ``test_top5`` or a large-gallery metric such as ``test_top1_16740way``
        (every row must have it; its chance level is ``k / 16740``).
    seed : int
        Seed of the subject bootstrap.

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
        a = {s: [float(al[k].value(metric)) for k in keys if k[0] == s] for s in subjects}
        b = {s: [float(ba[k].value(metric)) for k in keys if k[0] == s] for s in subjects}
        c = stats.paired_comparison(a, b, name=f"{enc} / {bb} / {metric}", seed=seed)
        gm = GALLERY_METRIC.match(metric)
        if gm:
            n_way, k_top = float(gm.group(2)), int(gm.group(1))
        else:
            n_way = float(np.nanmean([al[k].test_n_way for k in keys])) if keys else float("nan")
            k_top = 5 if metric.endswith("top5") else 1
        chance = min(k_top, n_way) / n_way if n_way and not math.isnan(n_way) else float("nan")
        out.append(ComparisonStats(
            encoder=enc, backbone=bb, aligned_alignment=next(iter(al.values())).alignment,
            base_alignment=next(iter(ba.values())).alignment, metric=metric, n_subjects=len(subjects),
            n_seeds=len(seeds), comparison=c,
            relative_improvement=(c.a.mean - c.b.mean) / c.b.mean if c.b.mean else float("nan"),
            chance=chance,
        ))
    return out


def summarize(rows: Sequence[FinalRow], *, correction: str = "holm", seed: int = 0) -> list[ComparisonStats]:
    """Every comparison of a report, corrected as one family: :func:`compare` for each of
    :data:`METRICS` and then each large-gallery metric all rows have (:func:`extra_metrics`),
    sorted by encoder, backbone and metric (in that order).

    Parameters
    ----------
    rows : sequence of FinalRow
        The tested runs (complete aligned/base pairs).
    correction : {"holm", "bh"}
        Family-wise method over all comparisons (every encoder x backbone x metric).
    seed : int
        Seed of the bootstrap.
    """
    metrics = [*METRICS, *extra_metrics(rows)]
    order = {m: i for i, m in enumerate(metrics)}
    found = [s for m in metrics for s in compare(rows, m, seed=seed)]
    found.sort(key=lambda s: (s.encoder, s.backbone, order[s.metric]))
    corrected = stats.correct_family([s.comparison for s in found], correction)
    for s, c in zip(found, corrected, strict=True):
        s.comparison = c
        s.notes = list(c.notes) + [f"{t}: {x.note}" for t, x in (("Wilcoxon", c.wilcoxon),)
                                   if x.note and x.note not in c.notes]
        if c.mixed is not None and c.mixed.note:
            s.notes.append(f"run-level mixed model: {c.mixed.note}")
    return found
