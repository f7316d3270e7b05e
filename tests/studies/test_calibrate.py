"""The calibrate kind: rates with binomial CIs, and a smoke calibration through Ray and the real training path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from brainalign import BrainalignError
from brainalign.studies import load_study, make_plan
from brainalign.studies.calibrate import TESTS, binomial_ci, summarize_draws

STUDY = """
[study]
kind = "calibrate"
name = "calib-smoke"
dataset = "calibration"
simulate = {{ preset = "tiny", overrides = {{ n_test_concepts = 20, n_test_reps = 2 }} }}
subjects = ["01", "02"]
encoders = ["nice"]
pairs = [{{ backbone = "sim-clip", aligned = "simulated", base = "none" }}]
max_epochs = 1
final_seeds = [0]
draws = {draws}
{extra}
[config]
batch_size = 32
lr = 1e-3
torch_threads = 1
"""


def _write(tmp_path: Path, draws: int | str = 2, extra: str = "") -> Path:
    p = tmp_path / "calib.toml"
    p.write_text(STUDY.format(draws=draws, extra=extra))
    return p


def test_binomial_ci_is_clopper_pearson() -> None:
    for k, n in ((0, 20), (1, 20), (10, 200), (200, 200)):
        ref = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        assert binomial_ci(k, n) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert all(math.isnan(x) for x in binomial_ci(0, 0))


def test_summarize_counts_rejections_and_skips_undefined_tests() -> None:
    rng = np.random.default_rng(0)

    def draw(effect: str, i: int, p: float) -> dict:
        ps = {t: p for t in TESTS} | {"mixed": math.nan}
        return {"effect": effect, "index": i, "seconds": 1.0,
                **{m: {"mean_difference": 0.0, "d_z": 0.0, "p": dict(ps), "min_p": 0.03125}
                   for m in ("test_top1", "test_top5")}}

    null_p = rng.uniform(size=40)
    draws = [draw("null", i, float(p)) for i, p in enumerate(null_p)] + [draw("planted", i, 0.01) for i in range(5)]
    rows = summarize_draws(draws, bins=10)
    perm = next(r for r in rows if (r.effect, r.metric, r.test) == ("null", "test_top1", "permutation"))
    k = int(np.sum(null_p < 0.05))
    assert (perm.rejections, perm.n) == (k, 40) and perm.rate == pytest.approx(k / 40)
    assert (perm.ci_low, perm.ci_high) == binomial_ci(k, 40)
    assert perm.histogram == np.histogram(null_p, bins=np.linspace(0, 1, 11))[0].tolist()
    power = next(r for r in rows if (r.effect, r.metric, r.test) == ("planted", "test_top5", "permutation"))
    assert power.rate == 1.0 and power.n == 5
    mixed = next(r for r in rows if r.test == "mixed")
    assert mixed.n == 0 and math.isnan(mixed.rate) and "undefined" in mixed.note


def test_calibrate_study_file_is_checked(tmp_path: Path) -> None:
    s = load_study(_write(tmp_path, extra='effects = ["null"]\ntables = "shared"'))
    assert s.kind == "calibrate" and s.options.effects == ("null",) and s.options.tables == "shared"
    specs = make_plan(s, "unused").draw_specs()
    assert [(d.effect, d.index) for d in specs] == [("null", 0), ("null", 1)]
    assert len({d.data_seed for d in specs}) == 2  # a fresh simulator draw each
    with pytest.raises(BrainalignError, match="effects entry"):
        load_study(_write(tmp_path, extra='effects = ["nul"]'))
    with pytest.raises(BrainalignError, match="tables"):
        load_study(_write(tmp_path, extra='tables = "per_subjct"'))
    per = load_study(_write(tmp_path, draws="{ null = 3, planted = 1 }"))
    assert dict(per.options.draws) == {"null": 3, "planted": 1}
    assert [(d.effect, d.index) for d in make_plan(per, "unused").draw_specs()] == [
        ("null", 0), ("planted", 0), ("null", 1), ("null", 2)]
    with pytest.raises(BrainalignError, match="not in effects"):
        load_study(_write(tmp_path, draws="{ nul = 3 }"))
    no_sim = STUDY.format(draws=1, extra="").replace("simulate = {", "# simulate = {")
    (tmp_path / "n.toml").write_text(no_sim)
    with pytest.raises(BrainalignError, match="simulator"):
        load_study(tmp_path / "n.toml")


@pytest.mark.integration
def test_smoke_calibration_runs_draws_over_ray_and_resumes(ray_session: object, tmp_path: Path) -> None:
    """2 null + 2 planted draws of 2 subjects x 2 arms, 1 epoch: real simulator, prepare, training
    loop and test retrieval in Ray tasks; rates, histograms, MLflow run; a re-run adds nothing."""
    from brainalign import tracking
    from brainalign.studies import render_report, run_study
    from brainalign.studies.calibrate import draws_file

    study = load_study(_write(tmp_path))
    out = run_study(study, live=False)
    rep = out.report
    assert len(rep.draws) == 4 and {d["effect"] for d in rep.draws} == {"null", "planted"}
    for d in rep.draws:
        for m in ("test_top1", "test_top5"):
            assert 0.0 <= d[m]["p"]["permutation"] <= 1.0 or math.isnan(d[m]["p"]["permutation"])
            assert d[m]["min_p"] >= 0.5  # 2 subjects: the design cannot reach 0.05 (1.0 if both differences are 0)
    assert "cannot reach p < 0.05" in rep.markdown and "Rejections / draws" in rep.markdown
    assert {"calibration.md", "calibration.json", "figure.png"} <= set(rep.files)
    assert rep.files["figure.png"].read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(rep.files["calibration.json"].read_text())
    assert len(doc["draws"]) == 4 and {r["test"] for r in doc["rates"]} == set(TESTS)
    assert not any((Path(study.dataset_path)).glob("null-*"))  # each draw removed its data
    run = tracking.get_run(out.study_run_id)
    assert run.status == "FINISHED" and run.tags["study_kind"] == "calibrate"
    assert "null.test_top1.permutation.rate" in run.metrics
    lines = draws_file(study).read_text().splitlines()
    assert len(lines) == 4
    again = run_study(study, live=False)  # resumes: every draw is recorded, none runs again
    assert len(again.report.draws) == 4 and len(draws_file(study).read_text().splitlines()) == 4
    assert render_report(study).markdown == again.report.markdown
    more = load_study(_write(tmp_path, draws="{ null = 3, planted = 2 }"))  # extend: only the new draw runs
    ext = run_study(more, live=False)
    assert len(ext.report.draws) == 5 and len(draws_file(more).read_text().splitlines()) == 5
    assert sorted((d["effect"], d["index"]) for d in ext.report.draws) == [
        ("null", 0), ("null", 1), ("null", 2), ("planted", 0), ("planted", 1)]


def test_more_draws_keep_the_recorded_ones_and_a_new_recipe_does_not(tmp_path: Path) -> None:
    from brainalign.studies.calibrate import draw_fingerprint

    base = draw_fingerprint(load_study(_write(tmp_path, draws=2)))
    assert draw_fingerprint(load_study(_write(tmp_path, draws="{ null = 200, planted = 50 }"))) == base
    assert draw_fingerprint(load_study(_write(tmp_path, extra='effects = ["null"]'))) == base
    assert draw_fingerprint(load_study(_write(tmp_path, extra='tables = "shared"'))) != base
    assert draw_fingerprint(load_study(_write(tmp_path), ["lr=1e-2"])) != base
    assert draw_fingerprint(load_study(_write(tmp_path), ["study.max_epochs=2"])) != base


def test_cli_calibrate_check_and_combine_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from brainalign.cli import main

    path = _write(tmp_path)
    assert main(["study", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(calibrate): draws 2 null, 2 planted" in out and "2 subjects x 2 arms" in out
    with pytest.raises(SystemExit):  # argparse exits after printing the help
        main(["calibrate", "--help"])
    capsys.readouterr()
    assert main(["study", "report", str(path)]) == 2  # nothing recorded yet: a clear error
    assert "no finished draw" in capsys.readouterr().err
    assert main(["study", "report", str(path), str(path)]) == 2  # the same study twice
    assert "named twice" in capsys.readouterr().err
