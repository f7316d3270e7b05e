"""One report for every kind of study: human-aligned vs base on the tested runs.

Input: one :class:`~brainalign.studies._stats.FinalRow` per tested run (encoder, backbone,
arm, subject, seed, test top-1/top-5), read from MLflow (:func:`rows_from_runs`), so a
report can be re-rendered at any time from what the runs logged. Output:

* a Table-1-style comparison at the subject level (both arms' mean +- s.e.m. over subjects,
  the difference with its t and bootstrap 95 % CIs, d_z, p of the paired t-test and of the
  exact sign-flip permutation test, the family-adjusted primary p, n subjects x seeds; the
  numbers come from :func:`brainalign.studies._stats.summarize`, i.e. :mod:`brainalign.stats`);
  the run-level mixed model, when there are several seeds, in a separate labelled list;
* a per-subject table (seed means, differences, mean +- s.e.m. across subjects);
* a Figure-1-style bar chart (``figure.png``) and a forest plot of the differences with their
  CIs (``forest.png``), ``runs.csv`` (every run: every p-value can be recomputed),
  ``subjects.csv`` and ``stats.json``.

A study that stopped early gets a *partial* report: only (subject, seed) cells where both
arms finished are compared, and the title says so.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..stats import stars
from ..tracking import RunRecord
from ._stats import METRICS, ComparisonStats, FinalRow, gallery_values, metric_label, summarize

__all__ = ["CombinedReport", "Report", "build_report", "combine_reports", "complete_pairs", "read_runs_csv",
           "rows_from_runs", "runs_csv", "write_combined", "write_report"]

RUN_COLUMNS = ("encoder", "backbone", "alignment", "arm", "subject", "seed", "run_id", "test_top1", "test_top5",
               "test_n_way")
SUBJECT_COLUMNS = ("encoder", "backbone", "aligned_table", "base_table", "subject", "n_seeds", "aligned_top1",
                   "base_top1", "diff_top1", "aligned_top5", "base_top5", "diff_top5")
_LEGEND = (
    "Test retrieval accuracy (%) of the tested runs, mean ± s.e.m. over subjects (each subject averaged "
    "over its seeds: seeds are not independent samples). Δ = aligned − base in points, mean over subjects "
    "[95% CI, t-based]; boot.: subject bootstrap 95% CI; d_z = mean(Δ) / sd(Δ). p (t): paired t-test across "
    "subjects; p (perm.): exact paired sign-flip permutation test across subjects (the primary test); "
    "p (adj.): the primary p adjusted over all {m} comparisons of the study ({method}); stars only from it "
    "(* < .05, ** < .01, *** < .001). All tests two-sided. top-k: N-way retrieval among the test images; "
    "top-k (M-way): the same queries ranked among the test and every training image "
    "(`test.gallery = \"test+train\"`). Hyperparameters were selected on validation data only."
)
_METHOD = {"holm": "Holm", "bh": "Benjamini-Hochberg"}


# --------------------------------------------------------------------------- rows
def rows_from_runs(runs: Sequence[RunRecord], keys: Collection[str] | None = None) -> list[FinalRow]:
    """Report rows of the finished, tested runs of a study (``keys``: only these units).

    A unit with several finished runs (which reconciliation prevents) counts once: the newest.
    """
    newest: dict[str, RunRecord] = {}
    for r in runs:
        key = r.tags.get("final_key", "")
        if r.status != "FINISHED" or r.tags.get("role") != "final" or "test_top1" not in r.metrics:
            continue
        if keys is not None and key not in keys:
            continue
        if key not in newest or r.start_time >= newest[key].start_time:
            newest[key] = r
    rows = []
    for key in sorted(newest):
        r = newest[key]
        t, m = r.tags, r.metrics
        rows.append(FinalRow(
            encoder=t["brain_encoder"], backbone=t["backbone"], alignment=t["alignment"], arm=t["arm"],
            subject=t["subject"], seed=int(t["seed"]), run_id=r.run_id, test_top1=float(m["test_top1"]),
            test_top5=float(m["test_top5"]), test_n_way=float(m.get("test_n_way", float("nan"))),
            extra=gallery_values(m),
        ))
    return rows


def complete_pairs(rows: Sequence[FinalRow]) -> list[FinalRow]:
    """The rows whose (encoder, backbone, subject, seed) has both an aligned and a base run."""
    have: dict[tuple[str, str, str, int], set[str]] = {}
    for r in rows:
        have.setdefault((r.encoder, r.backbone, r.subject, r.seed), set()).add(r.arm)
    return [r for r in rows if have[(r.encoder, r.backbone, r.subject, r.seed)] >= {"aligned", "base"}]


def runs_csv(rows: Sequence[FinalRow]) -> str:
    """The per-run values (one row per tested run) as CSV; each gallery metric a run logged
    (``test_top1_<N>way`` ...) is one more column."""
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


# --------------------------------------------------------------------------- per subject
@dataclass(frozen=True)
class SubjectRow:
    """Seed means of one subject for one encoder x backbone (NaN: an arm has no run)."""

    encoder: str
    backbone: str
    aligned_table: str
    base_table: str
    subject: str
    n_seeds: int
    aligned_top1: float
    base_top1: float
    aligned_top5: float
    base_top5: float


def _subject_rows(rows: Sequence[FinalRow], subjects: Sequence[str]) -> list[SubjectRow]:
    groups: dict[tuple[str, str], list[FinalRow]] = {}
    for r in rows:
        groups.setdefault((r.encoder, r.backbone), []).append(r)
    out = []
    for (enc, bb), rs in sorted(groups.items()):
        tables = {r.arm: f"{bb}:{r.alignment}" for r in rs}
        for subject in subjects:
            cell = {arm: [r for r in rs if r.subject == subject and r.arm == arm] for arm in ("aligned", "base")}
            mean = {(arm, m): float(np.mean([getattr(r, m) for r in cell[arm]])) if cell[arm] else float("nan")
                    for arm in cell for m in METRICS}
            out.append(SubjectRow(enc, bb, tables.get("aligned", "?"), tables.get("base", "?"), subject,
                                  min(len(cell["aligned"]), len(cell["base"])),
                                  mean["aligned", "test_top1"], mean["base", "test_top1"],
                                  mean["aligned", "test_top5"], mean["base", "test_top5"]))
    return out


# --------------------------------------------------------------------------- rendering
def _pct(m: float, s: float = float("nan")) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if not math.isnan(s) else f"{100 * m:.1f}"


def _delta(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f}"


def _p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _rel(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}%"


def _ci(low: float, high: float) -> str:
    return "n/a" if math.isnan(low) or math.isnan(high) else f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.2f}"


def _chance(x: float) -> str:
    """Chance in %: ``0.5`` for 200-way top-1, ``0.006`` for 16,740-way top-1."""
    if math.isnan(x):
        return "n/a"
    return f"{100 * x:.1f}" if 100 * x >= 0.1 else f"{100 * x:.2g}"


def _table1(stats: Sequence[ComparisonStats]) -> tuple[list[str], list[list[str]]]:
    header = ["Brain encoder", "Backbone", "Metric", "Base", "Human-aligned", "Δ [95% CI]", "boot. CI", "d_z",
              "p (t)", "p (perm.)", "p (adj.)", "sig.", "n subj. × seeds", "Δ rel.", "chance"]
    body = []
    for s in stats:
        c = s.comparison
        body.append([
            s.encoder, f"{s.backbone} ({s.aligned_alignment} vs {s.base_alignment})",
            metric_label(s.metric),
            _pct(s.base_subject_mean, s.base_subject_sem), _pct(s.aligned_subject_mean, s.aligned_subject_sem),
            f"{_delta(c.mean_difference)} {_ci(c.ci_t.low, c.ci_t.high)}",
            _ci(c.ci_bootstrap.low, c.ci_bootstrap.high), _num(c.d_z), _p(c.t_test.p), _p(c.permutation.p),
            _p(c.permutation.p_adjusted), c.stars or "n.s.", c.design.replace(" x ", " × "),
            _rel(s.relative_improvement), _chance(s.chance),
        ])
    return header, body


def _legend(stats: Sequence[ComparisonStats]) -> str:
    c = stats[0].comparison if stats else None
    method = _METHOD.get(c.correction, c.correction) if c is not None else "Holm"
    return _LEGEND.format(m=c.family_size if c is not None else 0, method=method)


def _reach(stats: Sequence[ComparisonStats]) -> list[str]:
    """Say when the design cannot reach significance (the smallest attainable permutation p)."""
    if not stats:
        return []
    min_p = min(s.comparison.permutation.min_p for s in stats)
    alpha = stats[0].comparison.alpha
    m = max(s.comparison.family_size for s in stats)
    n = min(s.n_subjects for s in stats)
    line = (f"Smallest attainable p of the permutation test with {n} subjects: {_p(min_p)}"
            + (f" (after {_METHOD.get(stats[0].comparison.correction, '')} over {m}: {_p(min(1.0, m * min_p))})"
               if m > 1 and stats[0].comparison.correction == "holm" else "") + ".")
    if min_p >= alpha:
        return [f"**This design cannot reach p < {alpha:g}**: {line} More subjects are needed (6 at least; "
                "seeds do not help)."]
    if stats[0].comparison.correction == "holm" and m * min_p >= alpha:
        return [f"**After correction this design cannot reach p < {alpha:g}**: {line}"]
    return [line]


def _mixed_lines(stats: Sequence[ComparisonStats]) -> list[str]:
    out = []
    for s in stats:
        mx = s.comparison.mixed
        if mx is None or math.isnan(mx.estimate):
            continue
        se = "" if math.isnan(mx.se) else f" ± {100 * mx.se:.1f} (s.e.)"
        p = "" if math.isnan(mx.p) else f", Wald p = {_p(mx.p)}"
        out.append(f"- {s.label}: estimate {_delta(mx.estimate)}{se}{p}; {mx.n_runs} runs, {mx.n_subjects} subjects"
                   + ("" if mx.converged else " (did not converge)"))
    if out:
        label = next(s.comparison.mixed.label for s in stats if s.comparison.mixed is not None)
        out.insert(0, f"Run-level check, not the headline ({label}; its normal reference is optimistic with few "
                      "subjects), Δ in points:")
    return out


def _subject_tables(subjects: Sequence[SubjectRow], stats: Sequence[ComparisonStats]
                    ) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, header, rows) per encoder x backbone: seed means and the across-subject summary."""
    header = ["Subject", "Seeds", "Aligned top-1", "Base top-1", "Δ top-1", "Aligned top-5", "Base top-5",
              "Δ top-5"]
    out = []
    for enc, bb in dict.fromkeys((s.encoder, s.backbone) for s in subjects):
        sel = [s for s in subjects if (s.encoder, s.backbone) == (enc, bb)]
        body = []
        for s in sel:
            if s.n_seeds == 0:
                body.append([f"sub-{s.subject}", "–", *["–"] * 6])
                continue
            body.append([f"sub-{s.subject}", str(s.n_seeds), _pct(s.aligned_top1), _pct(s.base_top1),
                         _delta(s.aligned_top1 - s.base_top1), _pct(s.aligned_top5), _pct(s.base_top5),
                         _delta(s.aligned_top5 - s.base_top5)])
        cmp_ = {c.metric: c for c in stats if (c.encoder, c.backbone) == (enc, bb)}
        if set(cmp_) >= set(METRICS):
            c1, c5 = cmp_["test_top1"], cmp_["test_top5"]
            body.append([f"**mean ± s.e.m.** (n={c1.n_subjects})", "",
                         _pct(c1.aligned_subject_mean, c1.aligned_subject_sem),
                         _pct(c1.base_subject_mean, c1.base_subject_sem),
                         _pct(c1.diff_subject_mean, c1.diff_subject_sem).replace("n/a", "–"),
                         _pct(c5.aligned_subject_mean, c5.aligned_subject_sem),
                         _pct(c5.base_subject_mean, c5.base_subject_sem),
                         _pct(c5.diff_subject_mean, c5.diff_subject_sem).replace("n/a", "–")])
        out.append((f"Per subject: {enc} × {bb} (`{sel[0].aligned_table}` vs `{sel[0].base_table}`), "
                    "mean over seeds, %", header, body))
    return out


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in body]]


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    esc = html.escape
    rows = "\n".join("<tr>" + "".join(f"<td>{esc(c.replace('**', ''))}</td>" for c in r) + "</tr>" for r in body)
    return (f"<table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in header)}</tr></thead>"
            f"<tbody>\n{rows}\n</tbody></table>")


# --------------------------------------------------------------------------- the report
@dataclass
class Report:
    """A rendered report (and, once written, where its files are)."""

    title: str
    protocol: str
    rows: list[FinalRow]
    stats: list[ComparisonStats]
    subjects: list[SubjectRow]
    partial: bool = False
    files: dict[str, Path] = field(default_factory=dict)
    #: extra markdown sections (the analyses: image grids, gradient analysis), in order
    sections: list[str] = field(default_factory=list)

    @property
    def markdown(self) -> str:
        """Title, protocol, Table 1 with its legend, per-subject tables and notes."""
        lines = [f"### {self.title}", "", self.protocol, ""]
        if self.stats:
            lines += [*_md_table(*_table1(self.stats)), "", _legend(self.stats), "", *_reach(self.stats)]
        else:
            lines.append("No subject and seed has finished runs of both arms yet: nothing to compare.")
        for caption, header, body in _subject_tables(self.subjects, self.stats):
            lines += ["", f"{caption}:", "", *_md_table(header, body)]
        mixed = _mixed_lines(self.stats)
        if mixed:
            lines += ["", *mixed]
        if self.stats:
            lines += ["", "Figures: `figure.png` (accuracies), `forest.png` (differences with 95% CIs)."]
        notes = sorted({f"- {s.encoder} × {s.backbone} {s.metric}: {n}" for s in self.stats for n in s.notes})
        if notes:
            lines += ["", "Notes:", *notes]
        for section in self.sections:
            lines += ["", section.rstrip()]
        return "\n".join(lines) + "\n"

    @property
    def html(self) -> str:
        """The same tables as standalone HTML."""
        esc = html.escape
        parts = [f"<h3>{esc(self.title)}</h3><p>{esc(self.protocol)}</p>"]
        if self.stats:
            parts.append(_html_table(*_table1(self.stats)) + f"<p>{esc(_legend(self.stats))}</p>"
                         + "".join(f"<p>{esc(x.replace('**', ''))}</p>" for x in _reach(self.stats))
                         + "<div style='display:flex;gap:12px;align-items:flex-start'><img src='figure.png' "
                           "alt='accuracies'><img src='forest.png' alt='differences with 95% CIs'></div>")
        mixed = _mixed_lines(self.stats)
        if mixed:
            parts.append(f"<p>{esc(mixed[0])}</p><ul>" + "".join(f"<li>{esc(x[2:])}</li>" for x in mixed[1:])
                         + "</ul>")
        for caption, header, body in _subject_tables(self.subjects, self.stats):
            parts.append(f"<h4>{esc(caption)}</h4>" + _html_table(header, body))
        notes = "".join(f"<li>{esc(f'{s.encoder} × {s.backbone} {s.metric}: {n}')}</li>"
                        for s in self.stats for n in s.notes)
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{esc(self.title)}</title><style>body{{font-family:sans-serif}}"
            "table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px 8px;text-align:right}"
            "td:first-child,td:nth-child(2){text-align:left}</style></head><body>"
            + "\n".join(parts) + (f"<ul>{notes}</ul>" if notes else "") + "</body></html>\n"
        )

    def metrics(self) -> dict[str, float]:
        """Summary metrics for the study run (undefined values left out)."""
        out: dict[str, float] = {"report.n_runs": float(len(self.rows))}
        for s in self.stats:
            pre = f"{s.encoder}.{s.backbone}.{s.metric}"
            c = s.comparison
            for name, v in (("aligned_mean", s.aligned_subject_mean), ("base_mean", s.base_subject_mean),
                            ("diff_mean", s.diff_subject_mean), ("diff_sem", s.diff_subject_sem),
                            ("diff_ci_low", c.ci_t.low), ("diff_ci_high", c.ci_t.high), ("d_z", c.d_z),
                            ("rel_improvement", s.relative_improvement), ("n_subjects", float(s.n_subjects)),
                            ("p_ttest", c.t_test.p), ("p_permutation", c.permutation.p),
                            ("p_permutation_adjusted", c.permutation.p_adjusted),
                            ("p_wilcoxon", c.wilcoxon.p)):
                if not math.isnan(v):
                    out[f"{pre}.{name}"] = v
        return out


def build_report(rows: Sequence[FinalRow], *, title: str, protocol: str, subjects: Sequence[str],
                 expected: int, correction: str = "holm") -> Report:
    """Compute a report from the tested runs.

    Parameters
    ----------
    rows : sequence of FinalRow
        The finished tested runs (any subset of the plan's).
    title, protocol : str
        Heading and the paragraph that says how the runs were made.
    subjects : sequence of str
        The study's subjects (rows of the per-subject tables, in this order).
    expected : int
        How many tested runs the plan has; fewer rows make the report *partial*.
    correction : {"holm", "bh"}
        Family-wise method over all comparisons of the report.

    Returns
    -------
    Report
    """
    partial = len(rows) < expected
    paired = complete_pairs(rows)
    if partial:
        title = f"{title} (PARTIAL: {len(rows)} of {expected} runs finished)"
    return Report(title=title, protocol=protocol, rows=list(rows), stats=summarize(paired, correction=correction) if paired else [],
                  subjects=_subject_rows(paired, subjects), partial=partial)


def render_figure(stats: Sequence[ComparisonStats], path: Path, title: str = "") -> None:
    """A Figure-1-style grouped bar chart (base vs aligned, s.e.m. over subjects) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(s.metric for s in stats))  # top-1, top-5, then each larger gallery
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
            mark = s.comparison.stars or ("n.s." if math.isfinite(s.comparison.permutation.p_adjusted) else "")
            ax.text(x[i], top * 1.03 + 0.5, mark, ha="center", va="bottom", fontsize=9)
            if not math.isnan(s.chance):
                ax.hlines(100 * s.chance, x[i] - w, x[i] + w, colors="k", linestyles=":", linewidth=1)
        ax.set_xticks(x, [f"{s.encoder}\n{s.backbone}" for s in sel])
        ax.set_xlim(-0.9, len(sel) - 0.1)
        ax.set_ylabel(f"test {metric_label(metric)} accuracy (%)")
        ax.set_ylim(0, max([*(b + e for b, e in zip(base, be, strict=True)),
                            *(a + e for a, e in zip(al, ae, strict=True)), 1.0]) * 1.25)
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(title or "Human-aligned vs base image embeddings", fontsize=10)
    method = _METHOD.get(stats[0].comparison.correction, "") if stats else ""
    fig.text(0.01, 0.01, f"mean ± s.e.m. over subjects; * p<.05, ** p<.01, *** p<.001: exact sign-flip permutation "
             f"test across subjects, {method}-adjusted over the study; dotted: chance", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def render_forest(stats: Sequence[ComparisonStats], path: Path, title: str = "") -> None:
    """A forest plot: every comparison's mean difference (aligned − base, points) with its
    t-based 95 % CI (thick) and subject-bootstrap CI (thin), adjusted p on the right, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(stats)
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.45 * n))
    y = np.arange(n)[::-1]
    for yi, s in zip(y, stats, strict=True):
        c = s.comparison
        m = 100 * c.mean_difference
        if math.isfinite(c.ci_bootstrap.low):
            ax.hlines(yi - 0.18, 100 * c.ci_bootstrap.low, 100 * c.ci_bootstrap.high, color="#757575", linewidth=1.2)
        if math.isfinite(c.ci_t.low):
            ax.hlines(yi, 100 * c.ci_t.low, 100 * c.ci_t.high, color="#1f77b4", linewidth=3)
        ax.plot([m], [yi], "o", color="k", markersize=5)
        p = c.permutation.p_adjusted
        ax.annotate(f"p_adj={_p(p)} {c.stars}".rstrip(), xy=(1.01, yi), xycoords=("axes fraction", "data"),
                    va="center", fontsize=7)
    ax.axvline(0, color="k", linestyle=":", linewidth=1)
    ax.set_yticks(y, [f"{s.label}\n({s.comparison.design.replace(' x ', '×')})" for s in stats], fontsize=7)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("aligned − base (points): mean over subjects, 95% CI (t: thick; bootstrap: thin, below)", fontsize=8)
    ax.set_title(title or "Differences with 95% CIs", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def _subjects_csv(subjects: Sequence[SubjectRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUBJECT_COLUMNS)
    for s in subjects:
        if s.n_seeds:
            w.writerow([s.encoder, s.backbone, s.aligned_table, s.base_table, s.subject, s.n_seeds,
                        *(f"{v:.6f}" for v in (s.aligned_top1, s.base_top1, s.aligned_top1 - s.base_top1,
                                               s.aligned_top5, s.base_top5, s.aligned_top5 - s.base_top5))])
    return buf.getvalue()


def write_report(report: Report, out_dir: Path, context: Mapping[str, Any] | None = None) -> Report:
    """Write ``table.md``, ``table.html``, ``runs.csv``, ``subjects.csv``, ``stats.json`` and
    (when there is something to compare) ``figure.png`` and ``forest.png`` into ``out_dir``;
    sets ``report.files``.

    Parameters
    ----------
    report : Report
        From :func:`build_report`.
    out_dir : Path
        Output folder (created).
    context : mapping, optional
        Extra JSON-able facts stored in ``stats.json`` (study name, MLflow ids...).

    Returns
    -------
    Report
        ``report``, with ``files`` filled in.
    """
    from .._io import atomic_file, claim_dir

    claim_dir(out_dir, "report")  # created and marked; never writes into a folder that is not a report
    texts = {
        "table.md": report.markdown,
        "table.html": report.html,
        "runs.csv": runs_csv(report.rows),
        "subjects.csv": _subjects_csv(report.subjects),
        "stats.json": json.dumps(_jsonable({
            "context": dict(context or {}), "partial": report.partial,
            "comparisons": [s.to_dict() for s in report.stats], "runs": [asdict(r) for r in report.rows]},
        ), indent=2, sort_keys=True),
    }
    files = {}
    for name, text in texts.items():
        with atomic_file(out_dir / name) as tmp:
            tmp.write_text(text)
        files[name] = out_dir / name
    if report.stats:
        with atomic_file(out_dir / "figure.png") as tmp:
            render_figure(report.stats, tmp, report.title)
        files["figure.png"] = out_dir / "figure.png"
        with atomic_file(out_dir / "forest.png") as tmp:
            render_forest(report.stats, tmp, report.title)
        files["forest.png"] = out_dir / "forest.png"
    else:
        (out_dir / "figure.png").unlink(missing_ok=True)
        (out_dir / "forest.png").unlink(missing_ok=True)
    report.files = files
    return report


# --------------------------------------------------------------------------- across studies
@dataclass
class CombinedRow:
    """One comparison (backbone pair x metric) combined across studies."""

    backbone: str
    aligned_alignment: str
    base_alignment: str
    metric: str
    studies: list[str]
    encoders: list[str]
    n_subjects: list[int]
    mean_differences: list[float]
    ci_low: list[float]
    ci_high: list[float]
    p_greater_mid: list[float]
    combined: Any  # brainalign.stats.StoufferResult
    p_adjusted: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("backbone", "aligned_alignment", "base_alignment", "metric", "studies",
                                            "encoders", "n_subjects", "mean_differences", "ci_low", "ci_high",
                                            "p_greater_mid", "p_adjusted")}
        return _jsonable(d | {"stouffer": self.combined.to_dict()})


@dataclass
class CombinedReport:
    """Several studies' reports combined per comparison (``markdown``, ``rows``, ``files``)."""

    title: str
    rows: list[CombinedRow]
    skipped: list[str]
    correction: str = "holm"
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.rows:
            header = ["Backbone", "Metric", "Per study: Δ [95% CI] (n subj., one-sided mid-p)", "Stouffer z",
                      "p (aligned > base)", "p (two-sided)", "p (adj.)", "sig."]
            body = []
            for r in self.rows:
                per = "; ".join(f"{st} ({enc}): {_delta(m)} {_ci(lo, hi)} (n={n}, p={_p(p)})" for st, enc, m, lo, hi, n, p
                                in zip(r.studies, r.encoders, r.mean_differences, r.ci_low, r.ci_high, r.n_subjects,
                                       r.p_greater_mid, strict=True))
                body.append([f"{r.backbone} ({r.aligned_alignment} vs {r.base_alignment})",
                             r.metric.replace("test_", "").replace("top", "top-"), per, f"{r.combined.z:+.2f}",
                             _p(r.combined.p_greater), _p(r.combined.p_two_sided), _p(r.p_adjusted),
                             stars(r.p_adjusted) or "n.s."])
            lines += [*_md_table(header, body), "",
                      "Stouffer's weighted z of each study's one-sided exact permutation mid-p for \"aligned > base\" "
                      "(weights sqrt(n subjects), as MOABB's meta-analysis; scipy.stats.combine_pvalues). p (adj.): "
                      f"the two-sided combined p, {_METHOD.get(self.correction, self.correction)}-adjusted over the "
                      f"{len(self.rows)} combined comparisons; stars only from it. Δ in points."]
        else:
            lines.append("No comparison is shared by two or more of these studies: nothing to combine.")
        if self.skipped:
            lines += ["", "Not combined:", *[f"- {x}" for x in self.skipped]]
        return "\n".join(lines) + "\n"


def combine_reports(reports: Mapping[str, Report], *, correction: str = "holm") -> CombinedReport:
    """Combine the same comparison (backbone pair x metric) across studies with Stouffer's z.

    Parameters
    ----------
    reports : mapping of str to Report
        Study name -> its (complete) report. The studies must be independent (different
        subjects, e.g. an EEG, a MEG and an fMRI study).
    correction : {"holm", "bh"}
        Family-wise method over the combined comparisons.

    Returns
    -------
    CombinedReport
        A comparison found in fewer than two studies is listed as skipped.

    Raises
    ------
    BrainalignError
        Fewer than two reports, a partial report, or a study with several brain encoders
        on one pair (their comparisons share subjects: not independent studies).
    """
    from .._checks import BrainalignError
    from ..stats import adjust_pvalues, combine_studies

    if len(reports) < 2:
        raise BrainalignError(f"combining needs at least two studies, got {list(reports)}.")
    groups: dict[tuple[str, str, str, str], list[tuple[str, ComparisonStats]]] = {}
    for name, rep in reports.items():
        if rep.partial:
            raise BrainalignError(f"study {name}: its report is partial ({rep.title}); finish it before combining.")
        seen: dict[tuple[str, str, str, str], str] = {}
        for s in rep.stats:
            key = (s.backbone, s.aligned_alignment, s.base_alignment, s.metric)
            if key in seen:
                raise BrainalignError(
                    f"study {name} compares {s.backbone} ({s.aligned_alignment} vs {s.base_alignment}) with brain "
                    f"encoders {seen[key]!r} and {s.encoder!r} on the same subjects: they are not independent "
                    "studies. Combine studies with one encoder per pair (e.g. --set study.encoders=[\"nice\"])."
                )
            seen[key] = s.encoder
            groups.setdefault(key, []).append((name, s))
    rows, skipped = [], []
    for key, items in sorted(groups.items()):
        if len(items) < 2:
            skipped.append(f"{key[0]} ({key[1]} vs {key[2]}) {key[3]}: only in study {items[0][0]}")
            continue
        undefined = [n for n, s in items if not math.isfinite(s.comparison.permutation.p_greater_mid)]
        if undefined:
            skipped.append(f"{key[0]} ({key[1]} vs {key[2]}) {key[3]}: primary test undefined in {undefined}")
            continue
        comb = combine_studies([s.comparison for _, s in items])
        rows.append(CombinedRow(
            backbone=key[0], aligned_alignment=key[1], base_alignment=key[2], metric=key[3],
            studies=[n for n, _ in items], encoders=[s.encoder for _, s in items],
            n_subjects=[s.n_subjects for _, s in items],
            mean_differences=[s.comparison.mean_difference for _, s in items],
            ci_low=[s.comparison.ci_t.low for _, s in items], ci_high=[s.comparison.ci_t.high for _, s in items],
            p_greater_mid=[s.comparison.permutation.p_greater_mid for _, s in items], combined=comb,
        ))
    for r, p in zip(rows, adjust_pvalues([r.combined.p_two_sided for r in rows], correction), strict=True):
        r.p_adjusted = p
    title = f"Across studies {', '.join(reports)}: human-aligned vs base (Stouffer, weights sqrt(n subjects))"
    return CombinedReport(title=title, rows=rows, skipped=skipped, correction=correction)


def write_combined(combined: CombinedReport, out_dir: Path) -> CombinedReport:
    """Write ``combined.md`` and ``combined.json`` into ``out_dir`` (a report folder)."""
    from .._io import atomic_file, claim_dir

    claim_dir(out_dir, "report")
    texts = {"combined.md": combined.markdown,
             "combined.json": json.dumps({"title": combined.title, "correction": combined.correction,
                                          "rows": [r.to_dict() for r in combined.rows], "skipped": combined.skipped},
                                         indent=2, sort_keys=True)}
    for name, text in texts.items():
        with atomic_file(out_dir / name) as tmp:
            tmp.write_text(text)
        combined.files[name] = out_dir / name
    return combined
