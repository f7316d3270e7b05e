"""Human-aligned vs base: statistics, a Table-1-style table and a Figure-1-style chart.

Input: one row per final run (encoder, backbone, arm, subject, seed, test top-1/top-5).
For every brain encoder x backbone and metric the report gives

* mean +- s.e.m. of each arm over subjects (each subject's value averaged over seeds) and
  over all (subject, seed) runs;
* the relative improvement ``(aligned - base) / base`` of the subject means;
* a paired t-test (``scipy.stats.ttest_rel``, two-sided) across subjects (seed-averaged)
  and across (subject, seed) pairs (the aligned and base runs of one subject with the same
  seed: same validation split and initialization seed), plus the Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, two-sided) as a check that does not assume normality.

Where a test is undefined (fewer than 2 pairs, all differences zero, constant differences)
its p-value is NaN and a note says why; every other number equals what scipy gives on the
per-run values logged next to the report (``report/runs.csv``).
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ComparisonStats",
    "FinalRow",
    "PairedTest",
    "compare",
    "mean_sem",
    "paired_tests",
    "render_html",
    "render_markdown",
    "write_report",
]

log = logging.getLogger(__name__)
METRICS = ("test_top1", "test_top5")
RUN_COLUMNS = ("encoder", "backbone", "alignment", "arm", "subject", "seed", "run_id", "test_top1", "test_top5",
               "test_n_way")
#: Large-gallery metrics (``test.gallery = "test+train"``): ``test_top1_16740way`` ...
GALLERY_METRIC = re.compile(r"^test_top([15])_(\d+)way$")


def metric_label(metric: str) -> str:
    """``test_top1`` -> ``top-1``; ``test_top1_16740way`` -> ``top-1 (16740-way)``."""
    m = GALLERY_METRIC.match(metric)
    if m:
        return f"top-{m.group(1)} ({m.group(2)}-way)"
    return metric.replace("test_", "").replace("top", "top-")


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
    #: other metrics of the run, e.g. the large gallery's ``test_top1_16740way``
    extra: Mapping[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float:
        """The run's ``metric`` (a field or an ``extra`` metric)."""
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
        The metric compared: ``test_top1``, ``test_top5`` or a large-gallery metric such as
        ``test_top1_16740way`` (every row must have it).

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
        t_sub, w_sub = paired_tests(a_sub, b_sub)
        t_run, w_run = paired_tests(a_runs, b_runs)
        gm = GALLERY_METRIC.match(metric)
        if gm:
            n_way = float(gm.group(2))
        else:
            n_way = float(np.nanmean([al[k].test_n_way for k in keys])) if keys else float("nan")
        k_top = 5 if (gm.group(1) == "5" if gm else metric.endswith("top5")) else 1
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
            ttest_subjects=t_sub, ttest_runs=t_run, wilcoxon_subjects=w_sub, wilcoxon_runs=w_run,
            chance=chance, notes=notes,
        ))
    return out


# --------------------------------------------------------------------------- rendering
def _pct(m: float, s: float) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if not math.isnan(s) else f"{100 * m:.1f}"


def _p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _rel(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}%"


def _table_rows(stats: Sequence[ComparisonStats]) -> tuple[list[str], list[list[str]]]:
    header = ["Brain encoder", "Backbone", "Metric", "Base", "Human-aligned", "Δ rel.",
              "p (t, subj.)", "p (t, runs)", "p (W, subj.)", "p (W, runs)", "n subj. × seeds", "chance"]
    body = []
    for s in stats:
        body.append([
            s.encoder, f"{s.backbone} ({s.aligned_alignment} vs {s.base_alignment})",
            metric_label(s.metric),
            _pct(s.base_subject_mean, s.base_subject_sem), _pct(s.aligned_subject_mean, s.aligned_subject_sem),
            _rel(s.relative_improvement), _p(s.ttest_subjects.p), _p(s.ttest_runs.p),
            _p(s.wilcoxon_subjects.p), _p(s.wilcoxon_runs.p), f"{s.n_subjects} × {s.n_seeds}",
            "n/a" if math.isnan(s.chance) else f"{100 * s.chance:.1f}",
        ])
    return header, body


_LEGEND = (
    "Test retrieval accuracy (%) of the final runs, mean ± s.e.m. over subjects (each subject averaged "
    "over its seeds). Δ rel. = (aligned − base) / base. p: two-sided paired t-test (t) and Wilcoxon "
    "signed-rank test (W) across subjects (seed-averaged) and across (subject, seed) runs. Hyperparameters "
    "of each arm were selected on validation data only."
)


def render_markdown(stats: Sequence[ComparisonStats], title: str = "") -> str:
    """A Table-1-style markdown table, its legend and the notes on undefined tests."""
    header, body = _table_rows(stats)
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", _LEGEND]
    run_lines = [f"- {s.encoder} × {s.backbone} {s.metric}: over (subject, seed) runs base "
                 f"{_pct(s.base_run_mean, s.base_run_sem)}, aligned {_pct(s.aligned_run_mean, s.aligned_run_sem)}"
                 for s in stats]
    lines += ["", "Means over all (subject, seed) runs (± s.e.m.):", *run_lines]
    notes = sorted({f"- {s.encoder} × {s.backbone} {s.metric}: {n}" for s in stats for n in s.notes})
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def render_html(stats: Sequence[ComparisonStats], title: str = "") -> str:
    """The same table as standalone HTML."""
    header, body = _table_rows(stats)
    esc = html.escape
    rows = "\n".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body)
    notes = "".join(f"<li>{esc(f'{s.encoder} × {s.backbone} {s.metric}: {n}')}</li>" for s in stats for n in s.notes)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>body{{font-family:sans-serif}}table{{border-collapse:collapse}}"
        "td,th{border:1px solid #999;padding:4px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
        "</style></head><body>"
        f"<h3>{esc(title)}</h3><table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in header)}</tr></thead>"
        f"<tbody>\n{rows}\n</tbody></table><p>{esc(_LEGEND)}</p>"
        + (f"<ul>{notes}</ul>" if notes else "")
        + "</body></html>\n"
    )


def _stars(p: float) -> str:
    if math.isnan(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "n.s."


def render_figure(stats: Sequence[ComparisonStats], path: Path, title: str = "") -> None:
    """A Figure-1-style grouped bar chart (base vs aligned, s.e.m. over subjects) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(s.metric for s in stats))
    n_groups = max(1, len(stats) // max(1, len(metrics)))
    width = 2.2 + 1.3 * n_groups
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics) + 0.5, 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        sel = [s for s in stats if s.metric == metric]
        x = np.arange(len(sel))
        w = 0.38
        base = [100 * s.base_subject_mean for s in sel]
        al = [100 * s.aligned_subject_mean for s in sel]
        be = [0 if math.isnan(s.base_subject_sem) else 100 * s.base_subject_sem for s in sel]
        ae = [0 if math.isnan(s.aligned_subject_sem) else 100 * s.aligned_subject_sem for s in sel]
        ax.bar(x - w / 2, base, w, yerr=be, capsize=3, label="base", color="#9e9e9e")
        ax.bar(x + w / 2, al, w, yerr=ae, capsize=3, label="human-aligned", color="#1f77b4")
        for i, s in enumerate(sel):
            top = max(base[i] + be[i], al[i] + ae[i])
            ax.text(x[i], top * 1.03 + 0.5, _stars(s.ttest_subjects.p), ha="center", va="bottom", fontsize=9)
            if not math.isnan(s.chance):
                ax.hlines(100 * s.chance, x[i] - w, x[i] + w, colors="k", linestyles=":", linewidth=1)
        ax.set_xticks(x, [f"{s.encoder}\n{s.backbone}" for s in sel])
        ax.set_xlim(-0.9, len(sel) - 0.1)
        ax.set_ylabel(f"test {metric_label(metric)} accuracy (%)")
        ax.set_ylim(0, max([*(b + e for b, e in zip(base, be, strict=True)),
                            *(a + e for a, e in zip(al, ae, strict=True)), 1.0]) * 1.25)
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(title or "Human-aligned vs base image embeddings", fontsize=10)
    fig.text(0.01, 0.01, "mean ± s.e.m. over subjects; * p<.05, ** p<.01, *** p<.001 (paired t-test across "
             "subjects); dotted: chance", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def extra_metrics(rows: Sequence[FinalRow]) -> list[str]:
    """The large-gallery metrics every row has, sorted (``test_top1_16740way`` ...); the test
    gallery's own ``test_top1_<N>way`` (the same number as ``test_top1``) is left out."""
    if not rows:
        return []
    common = set.intersection(*(set(r.extra) for r in rows))
    n_test = {round(r.test_n_way) for r in rows if not math.isnan(r.test_n_way)}
    out = []
    for m in sorted(common):
        g = GALLERY_METRIC.match(m)
        if g and int(g.group(2)) not in n_test:
            out.append(m)
    return sorted(out, key=lambda m: (int(GALLERY_METRIC.match(m).group(2)), m))  # type: ignore[union-attr]


def runs_csv(rows: Sequence[FinalRow]) -> str:
    """The per-run values (one row per final run) as CSV (large-gallery metrics as extra columns)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    extra = sorted({m for r in rows for m in r.extra})
    w.writerow([*RUN_COLUMNS, *extra])
    for r in rows:
        w.writerow([getattr(r, c) if not isinstance(getattr(r, c), float) else repr(getattr(r, c))
                    for c in RUN_COLUMNS] + [repr(float(r.extra[m])) if m in r.extra else "" for m in extra])
    return buf.getvalue()


def read_runs_csv(text: str) -> list[FinalRow]:
    """Inverse of :func:`runs_csv`."""
    out = []
    for d in csv.DictReader(io.StringIO(text)):
        out.append(FinalRow(encoder=d["encoder"], backbone=d["backbone"], alignment=d["alignment"], arm=d["arm"],
                            subject=d["subject"], seed=int(d["seed"]), run_id=d["run_id"],
                            test_top1=float(d["test_top1"]), test_top5=float(d["test_top5"]),
                            test_n_way=float(d["test_n_way"]),
                            extra={k: float(v) for k, v in d.items() if k not in RUN_COLUMNS and v not in ("", None)}))
    return out


@dataclass
class Report:
    """The rendered report and where its files are."""

    markdown: str
    stats: list[ComparisonStats]
    files: dict[str, Path]


def write_report(rows: Sequence[FinalRow], out_dir: Path, *, title: str,
                 context: Mapping[str, Any] | None = None) -> Report:
    """Compute the statistics and write ``table.md``, ``table.html``, ``figure.png``,
    ``runs.csv`` (per-run values) and ``stats.json`` into ``out_dir``.

    Parameters
    ----------
    rows : sequence of FinalRow
        The final runs.
    out_dir : Path
        Output folder (created).
    title : str
        Title of the table and figure.
    context : mapping, optional
        Extra JSON-able facts stored in ``stats.json`` (study name, MLflow ids...).

    Returns
    -------
    Report
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = [*METRICS, *extra_metrics(rows)]
    stats = [s for m in metrics for s in compare(rows, m)]
    order = {m: i for i, m in enumerate(metrics)}
    stats.sort(key=lambda s: (s.encoder, s.backbone, order[s.metric]))
    md = render_markdown(stats, title)
    files = {
        "table.md": out_dir / "table.md",
        "table.html": out_dir / "table.html",
        "figure.png": out_dir / "figure.png",
        "runs.csv": out_dir / "runs.csv",
        "stats.json": out_dir / "stats.json",
    }
    files["table.md"].write_text(md)
    files["table.html"].write_text(render_html(stats, title))
    files["runs.csv"].write_text(runs_csv(rows))
    files["stats.json"].write_text(json.dumps(
        _jsonable({"context": dict(context or {}), "comparisons": [asdict(s) for s in stats],
                   "runs": [asdict(r) for r in rows]}), indent=2, sort_keys=True))
    render_figure(stats, files["figure.png"], title)
    return Report(markdown=md, stats=stats, files=files)
