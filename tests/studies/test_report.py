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
    assert set(rep.files) == {"table.md", "table.html", "figure.png", "runs.csv", "subjects.csv", "stats.json"}
    assert all(p.stat().st_size > 0 for p in rep.files.values())
    assert rep.files["figure.png"].read_bytes()[:4] == b"\x89PNG"
    assert read_runs_csv(rep.files["runs.csv"].read_text()) == rows
    md = rep.markdown
    assert md.startswith("### unit\n\nHow the runs were made.")
    assert "| nice | sim-clip (simulated vs none) | top-1 |" in md and "Human-aligned" in md
    assert "Wilcoxon across subjects" in md  # n = 2 subjects: noted
    assert "<table>" in rep.files["table.html"].read_text()
    doc = json.loads(rep.files["stats.json"].read_text())
    assert doc["context"] == {"study": "unit"} and len(doc["comparisons"]) == 2 and len(doc["runs"]) == 8
    assert not doc["partial"] and len(rep.files["subjects.csv"].read_text().splitlines()) == 1 + 2
    assert {k for k in rep.metrics()} >= {"nice.sim-clip.test_top1.aligned_mean", "nice.sim-clip.test_top1.diff_mean",
                                         "nice.sim-clip.test_top5.p_ttest_runs", "report.n_runs"}


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
    assert not (tmp_path / "n" / "figure.png").exists()


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
    assert big.ttest_subjects.p == pytest.approx(stats.ttest_rel(a, b).pvalue)
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
