"""The one report: rows from MLflow records, tables, partial reports, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from brainalign.studies._stats import FinalRow
from brainalign.studies.report import (
    build_report,
    complete_pairs,
    read_runs_csv,
    rows_from_runs,
    write_report,
)
from brainalign.tracking import RunRecord


def _rows(n_sub: int = 2, n_seed: int = 2, seed: int = 3) -> list[FinalRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sub):
        for k in range(n_seed):
            for arm, alignment, shift in (("aligned", "simulated", 0.05), ("base", "none", 0.0)):
                v = 0.2 + shift + rng.normal(0, 0.02)
                rows.append(FinalRow("nice", "sim-clip", alignment, arm, f"{s + 1:02d}", k, f"r{s}{k}{arm}", v,
                                     min(1.0, 2.5 * v), 200.0))
    return rows


def _report(rows: list[FinalRow], expected: int | None = None) -> object:
    return build_report(rows, title="unit", protocol="How the runs were made.", subjects=["01", "02"],
                        expected=len(rows) if expected is None else expected)


def test_write_report_files_and_csv_round_trip(tmp_path: Path) -> None:
    rows = _rows()
    rep = write_report(_report(rows), tmp_path / "r", context={"study": "unit"})
    assert set(rep.files) == {"table.md", "table.html", "figure.png", "forest.png", "runs.csv", "subjects.csv",
                              "stats.json"}
    assert all(p.stat().st_size > 0 for p in rep.files.values())
    assert rep.files["figure.png"].read_bytes()[:4] == b"\x89PNG" == rep.files["forest.png"].read_bytes()[:4]
    assert read_runs_csv(rep.files["runs.csv"].read_text()) == rows
    md = rep.markdown
    assert md.startswith("### unit\n\nHow the runs were made.")
    assert "| nice | sim-clip (simulated vs none) | top-1 |" in md and "Human-aligned" in md
    header = md.split("\n")[4]
    for col in ("Base", "Human-aligned", "Δ [95% CI]", "boot. CI", "d_z", "p (t)", "p (perm.)", "p (adj.)",
                "n subj. × seeds"):
        assert f"| {col} |" in header, col
    assert "runs)" not in header and "(W," not in header  # no across-runs test in the headline
    assert "This design cannot reach p < 0.05" in md  # 2 subjects: min p = 0.5
    assert "<table>" in rep.files["table.html"].read_text() and "forest.png" in rep.files["table.html"].read_text()
    doc = json.loads(rep.files["stats.json"].read_text())
    assert doc["context"] == {"study": "unit"} and len(doc["comparisons"]) == 2 and len(doc["runs"]) == 8
    comp = doc["comparisons"][0]["comparison"]
    assert comp["correction"] == "holm" and comp["family_size"] == 2 and comp["permutation"]["p_adjusted"] == 1.0
    assert not doc["partial"] and len(rep.files["subjects.csv"].read_text().splitlines()) == 1 + 2
    assert {k for k in rep.metrics()} >= {"nice.sim-clip.test_top1.aligned_mean", "nice.sim-clip.test_top1.diff_mean",
                                         "nice.sim-clip.test_top5.p_permutation", "nice.sim-clip.test_top1.p_ttest",
                                         "nice.sim-clip.test_top1.diff_ci_low", "nice.sim-clip.test_top1.d_z",
                                         "report.n_runs"}
    assert not [k for k in rep.metrics() if "runs" in k and k != "report.n_runs"]


def test_report_row_shows_ci_dz_and_adjusted_p_of_brainalign_stats() -> None:
    rows = _rows(n_sub=8, n_seed=2)
    subjects = [f"{s + 1:02d}" for s in range(8)]
    rep = build_report(rows, title="t", protocol="p", subjects=subjects, expected=len(rows), correction="bh")
    top1 = next(s for s in rep.stats if s.metric == "test_top1").comparison
    line = next(x for x in rep.markdown.splitlines() if x.startswith("| nice | sim-clip") and "top-1" in x)
    assert f"[{100 * top1.ci_t.low:+.1f}, {100 * top1.ci_t.high:+.1f}]" in line
    assert f"{top1.d_z:+.2f}" in line and "8 × 2" in line
    assert top1.correction == "bh" and "Benjamini-Hochberg" in rep.markdown
    assert "Run-level check, not the headline" in rep.markdown  # the mixed model, labelled


def test_per_subject_table_is_the_cross_subject_table() -> None:
    rows = [FinalRow("nice", "sim-clip", al, arm, s, 1, f"r{s}{arm}", top1, top1 + 0.2, 20.0)
            for s, arm, al, top1 in [("01", "aligned", "simulated", 0.30), ("01", "base", "none", 0.20),
                                     ("02", "aligned", "simulated", 0.25), ("02", "base", "none", 0.22)]]
    rep = _report(rows)
    md = rep.markdown
    assert "| sub-01 | 1 | 30.0 | 20.0 | +10.0 | 50.0 | 40.0 | +10.0 |" in md
    assert "| **mean ± s.e.m.** (n=2) |  | 27.5 ± 2.5 | 21.0 ± 1.0 | 6.5 ± 3.5 |" in md
    assert rep.metrics()["nice.sim-clip.test_top1.aligned_mean"] == pytest.approx(0.275)
    assert rep.metrics()["nice.sim-clip.test_top1.diff_mean"] == pytest.approx(0.065)


def test_partial_report_compares_complete_pairs_only(tmp_path: Path) -> None:
    rows = _rows()
    lone = [r for r in rows if not (r.subject == "02" and r.arm == "base")]
    rep = write_report(_report(lone, expected=len(rows)), tmp_path / "p")
    assert rep.partial and "PARTIAL: 6 of 8 runs finished" in rep.title
    assert rep.stats and all(s.n_subjects == 1 for s in rep.stats)
    assert "| sub-02 | – |" in rep.markdown
    assert len(complete_pairs(lone)) == 4
    none = write_report(_report(rows[:1], expected=len(rows)), tmp_path / "n")
    assert not none.stats and "nothing to compare" in none.markdown and "figure.png" not in none.files
    assert not (tmp_path / "n" / "figure.png").exists() and not (tmp_path / "n" / "forest.png").exists()


def _record(key: str, arm: str, subject: str, seed: int, top1: float, *, status: str = "FINISHED", start: int = 1,
            role: str = "final") -> RunRecord:
    tags = {"final_key": key, "role": role, "brain_encoder": "nice", "backbone": "sim-clip",
            "alignment": "simulated" if arm == "aligned" else "none", "arm": arm, "subject": subject, "seed": str(seed)}
    return RunRecord(run_id=f"{key}-{start}", name=key, experiment_id="1", status=status, start_time=start, tags=tags,
                     metrics={"test_top1": top1, "test_top5": top1 + 0.1, "test_n_way": 200.0})


def test_rows_from_runs_takes_finished_tested_runs_of_the_plan() -> None:
    runs = [
        _record("a/sub-01/seed-0", "aligned", "01", 0, 0.3),
        _record("a/sub-01/seed-0", "aligned", "01", 0, 0.4, start=2),  # newer run of the same unit wins
        _record("b/sub-01/seed-0", "base", "01", 0, 0.2),
        _record("b/sub-02/seed-0", "base", "02", 0, 0.2, status="KILLED"),
        _record("trial", "base", "01", 0, 0.9, role="trial"),
        _record("old/sub-01/seed-0", "base", "01", 0, 0.1),  # not a unit of this plan
    ]
    rows = rows_from_runs(runs, {"a/sub-01/seed-0", "b/sub-01/seed-0", "b/sub-02/seed-0"})
    assert [(r.arm, r.test_top1, r.run_id) for r in rows] == [("aligned", 0.4, "a/sub-01/seed-0-2"),
                                                               ("base", 0.2, "b/sub-01/seed-0-1")]
    assert rows[0].test_n_way == 200.0 and rows[0].seed == 0


def test_combine_reports_is_weighted_stouffer_of_one_sided_mid_p() -> None:
    from scipy import stats as st

    from brainalign._checks import BrainalignError
    from brainalign.studies.report import combine_reports

    def rep(n_sub: int, seed: int, encoder: str) -> object:
        rows = [FinalRow(encoder, r.backbone, r.alignment, r.arm, r.subject, r.seed, r.run_id, r.test_top1,
                         r.test_top5, r.test_n_way) for r in _rows(n_sub=n_sub, n_seed=1, seed=seed)]
        return build_report(rows, title="x", protocol="p", subjects=sorted({r.subject for r in rows}),
                            expected=len(rows))

    reports = {"eeg": rep(6, 1, "nice"), "meg": rep(4, 2, "nice"), "fmri": rep(9, 3, "mlp")}
    comb = combine_reports(reports)
    assert [r.metric for r in comb.rows] == ["test_top1", "test_top5"] and not comb.skipped
    top1 = comb.rows[0]
    mids = [next(s for s in reports[n].stats if s.metric == "test_top1").comparison.permutation.p_greater_mid
            for n in ("eeg", "meg", "fmri")]
    w = np.sqrt([6, 4, 9])
    z = float(np.sum(w * st.norm.isf(mids)) / np.sqrt(np.sum(w**2)))
    assert top1.combined.z == pytest.approx(z) and top1.combined.p_greater == pytest.approx(st.norm.sf(z))
    assert top1.studies == ["eeg", "meg", "fmri"] and top1.encoders == ["nice", "nice", "mlp"]
    assert top1.n_subjects == [6, 4, 9]
    assert "Stouffer" in comb.markdown and "eeg (nice)" in comb.markdown
    with pytest.raises(BrainalignError, match="at least two studies"):
        combine_reports({"eeg": reports["eeg"]})
    two_encoders = build_report(
        _rows() + [FinalRow("atms", *x) for x in [(r.backbone, r.alignment, r.arm, r.subject, r.seed, r.run_id + "b",
                                                   r.test_top1, r.test_top5, r.test_n_way) for r in _rows()]],
        title="x", protocol="p", subjects=["01", "02"], expected=16)
    with pytest.raises(BrainalignError, match="not independent"):
        combine_reports({"a": two_encoders, "b": reports["eeg"]})


def test_large_gallery_metrics_are_compared_with_their_chance(tmp_path: Path) -> None:
    """A study with ``test.gallery = "test+train"``: both n-ways are compared, each with its own
    chance, in the table, the figure, runs.csv and the study-run metrics (issue 16)."""
    from scipy import stats

    rows = [FinalRow(r.encoder, r.backbone, r.alignment, r.arm, r.subject, r.seed, r.run_id, r.test_top1,
                     r.test_top5, r.test_n_way,
                     extra={"test_top1_200way": r.test_top1, "test_top5_200way": r.test_top5,  # the test gallery
                            "test_top1_16740way": r.test_top1 / 4, "test_top5_16740way": r.test_top5 / 3})
            for r in _rows()]
    rep = write_report(_report(rows), tmp_path / "r")
    by = {s.metric: s for s in rep.stats}
    assert list(by) == ["test_top1", "test_top5", "test_top1_16740way", "test_top5_16740way"]
    big = by["test_top1_16740way"]
    assert big.chance == pytest.approx(1 / 16740) and by["test_top5_16740way"].chance == pytest.approx(5 / 16740)
    subj = sorted({r.subject for r in rows})
    a = [np.mean([r.extra["test_top1_16740way"] for r in rows if r.arm == "aligned" and r.subject == s]) for s in subj]
    b = [np.mean([r.extra["test_top1_16740way"] for r in rows if r.arm == "base" and r.subject == s]) for s in subj]
    assert big.comparison.t_test.p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    md = rep.markdown
    assert "| top-1 (16740-way) |" in md and "| top-1 |" in md and "200-way" not in md  # both n-ways, once each
    assert "| 0.006 |" in md  # chance of 1 in 16,740, in %
    assert read_runs_csv(rep.files["runs.csv"].read_text()) == rows
    assert "nice.sim-clip.test_top1_16740way.aligned_mean" in rep.metrics()


def test_rows_from_runs_carry_the_gallery_metrics() -> None:
    tags = {"role": "final", "brain_encoder": "nice", "backbone": "sim-clip", "alignment": "simulated",
            "arm": "aligned", "subject": "01", "seed": "0", "final_key": "k"}
    rec = RunRecord(run_id="r1", name="n", experiment_id="1", status="FINISHED", start_time=1, end_time=2, tags=tags,
                    params={}, metrics={"test_top1": 0.2, "test_top5": 0.5, "test_n_way": 200.0,
                                        "test_top1_16740way": 0.01, "test_top1_sub-01": 0.2})
    (row,) = rows_from_runs([rec])
    assert row.extra == {"test_top1_16740way": 0.01} and row.value("test_top1_16740way") == 0.01
