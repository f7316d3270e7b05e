"""Report statistics against scipy, degenerate cases, and the rendered outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from brainalign.sweep.report import FinalRow, compare, mean_sem, paired_tests, read_runs_csv, write_report


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


def test_write_report_files_and_csv_round_trip(tmp_path: Path) -> None:
    rows = _rows(np.random.default_rng(3), n_sub=2, n_seed=2)
    rep = write_report(rows, tmp_path / "r", title="unit", context={"study": "unit"})
    assert {p.name for p in rep.files.values()} == {"table.md", "table.html", "figure.png", "runs.csv", "stats.json"}
    assert all(p.stat().st_size > 0 for p in rep.files.values())
    assert rep.files["figure.png"].read_bytes()[:4] == b"\x89PNG"
    assert read_runs_csv(rep.files["runs.csv"].read_text()) == rows
    md = rep.markdown
    assert "| nice | sim-clip (simulated vs none) | top-1 |" in md and "Human-aligned" in md
    assert "Wilcoxon across subjects" in md  # n = 2 subjects: noted
    assert "<table>" in rep.files["table.html"].read_text()
    doc = json.loads(rep.files["stats.json"].read_text())
    assert doc["context"] == {"study": "unit"} and len(doc["comparisons"]) == 2 and len(doc["runs"]) == 8


def test_large_gallery_metrics_are_compared_with_their_chance(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rows = [FinalRow(r.encoder, r.backbone, r.alignment, r.arm, r.subject, r.seed, r.run_id, r.test_top1, r.test_top5,
                     r.test_n_way, extra={"test_top1_16740way": r.test_top1 / 4, "test_top5_16740way": r.test_top5 / 3})
            for r in _rows(rng)]
    rep = write_report(rows, tmp_path / "r", title="gallery")
    by = {s.metric: s for s in rep.stats}
    assert list(by) == ["test_top1", "test_top5", "test_top1_16740way", "test_top5_16740way"]
    big = by["test_top1_16740way"]
    assert big.chance == pytest.approx(1 / 16740) and by["test_top5_16740way"].chance == pytest.approx(5 / 16740)
    subj = sorted({r.subject for r in rows})
    a = [np.mean([r.extra["test_top1_16740way"] for r in rows if r.arm == "aligned" and r.subject == s]) for s in subj]
    b = [np.mean([r.extra["test_top1_16740way"] for r in rows if r.arm == "base" and r.subject == s]) for s in subj]
    assert big.ttest_subjects.p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert "top-1 (16740-way)" in rep.markdown and "| top-1 |" in rep.markdown  # both n-ways reported
    assert read_runs_csv(rep.files["runs.csv"].read_text()) == rows
