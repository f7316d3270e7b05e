"""``brainalign study run|check|report|status`` and the deprecated ``brainalign sweep``."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign import tracking
from brainalign.cli import main

SPACE = """
encoder = "nice"
[params]
lr = { float = [1e-5, 1e-3], log = true }
"""
STUDY = """
[study]
name = "cli"
dataset = "{dataset}"
subjects = ["01", "02"]
encoders = [{{ name = "nice", searchspace = "space.toml" }}]
pairs = [{{ backbone = "sim-clip", aligned = "simulated" }}]
trials = 2
max_epochs = 4
final_seeds = 2
[config]
batch_size = 16
"""


def _write(tmp_path: Path, dataset: Path, text: str = STUDY, name: str = "study.toml") -> Path:
    (tmp_path / "space.toml").write_text(SPACE)
    p = tmp_path / name
    p.write_text(text.format(dataset=dataset))
    return p


def test_check_prints_the_plan_and_validates(tmp_path: Path, tiny_dataset: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, tiny_dataset)
    assert main(["study", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 searches of 2 trials" in out and "8 finals (2 subjects x 2 seeds per arm)" in out
    assert "check out" in out
    assert main(["study", "check", "--study", str(path), "--set", "study.trials=3"]) == 0
    assert "2 searches of 3 trials" in capsys.readouterr().out
    bad = _write(tmp_path, tiny_dataset, STUDY.replace("trials = 2", "trails = 2"), "bad.toml")
    assert main(["study", "check", str(bad)]) == 2
    assert "Did you mean 'trials'" in capsys.readouterr().err
    assert main(["study", "check", str(path), "--kind", "cross_subject"]) == 2
    assert "Invalid study kind of" in capsys.readouterr().err
    assert main(["study", "check"]) == 2
    assert "name one study file" in capsys.readouterr().err


def test_sweep_is_a_deprecated_alias(tmp_path: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str],
                                     caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, tiny_dataset)
    assert main(["sweep", "--study", str(path), "--check"]) == 0
    assert "8 finals" in capsys.readouterr().out
    assert "deprecated" in caplog.text


def _fake_study_runs(path: Path) -> str:
    """What a half-finished study leaves in MLflow: its study run, one search with a pruned
    and a running trial, and 3 of its 8 finals (one subject-seed cell complete)."""
    from brainalign.studies import load_study

    study = load_study(path)
    sid = tracking.start_run("cli", run_name="study-cli", tags={"role": "report", "study": "cli"})
    search = tracking.start_run("cli", run_name="s", parent_run_id=sid,
                                tags={"role": "search", "study": "cli", "search": "nice__sim-clip__simulated"})
    for i, (status, pruned, value) in enumerate((("FINISHED", "true", 0.1), ("RUNNING", "", 0.3))):
        t = tracking.start_run("cli", run_name=f"t{i}", parent_run_id=search,
                               tags={"role": "trial", "study": "cli", "pruned": pruned} if pruned else
                               {"role": "trial", "study": "cli"})
        tracking.log_metrics(t, {"val_top1_best": value, "epoch": 1})
        if status != "RUNNING":
            tracking.end_run(t, status)
    for arm, alignment, subject, top1 in (("aligned", "simulated", "01", 0.3), ("base", "none", "01", 0.2),
                                          ("base", "none", "02", 0.25)):
        key = f"nice__sim-clip__{alignment}/sub-{subject}/seed-0"
        with tracking.run("cli", run_name=key, parent_run_id=sid, tags={
                "role": "final", "study": "cli", "final_key": key, "brain_encoder": "nice", "backbone": "sim-clip",
                "alignment": alignment, "arm": arm, "subject": subject, "seed": "0"}) as r:
            tracking.log_metrics(r, {"test_top1": top1, "test_top5": top1 + 0.2, "test_n_way": 20})
    assert study.name == "cli"
    return sid


@pytest.mark.integration  # a real (SQLite) MLflow store
def test_status_and_report_read_mlflow(tmp_path: Path, tiny_dataset: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, tiny_dataset)
    assert main(["study", "report", str(path)]) == 2
    assert "has no study run" in capsys.readouterr().err
    assert main(["study", "status", str(path)]) == 0
    assert "tested runs: 0/8 done" in capsys.readouterr().out
    sid = _fake_study_runs(path)
    assert main(["study", "status", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"study run {sid} RUNNING" in out and "state: none" in out
    simulated = next(line for line in out.splitlines() if "nice__sim-clip__simulated" in line)
    assert simulated.split()[1:7] == ["2/2", "0", "1", "1", "0", "0"], simulated  # done running pruned failed killed
    assert "0.3 (val_top1_best)" in simulated
    assert "tested runs: 3/8 done, 0 running" in out
    assert main(["study", "report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PARTIAL: 3 of 8 runs finished" in out
    assert "| sub-01 | 1 | 30.0 | 20.0 | +10.0 |" in out and "| sub-02 | – |" in out
    assert (tmp_path / "reports" / "cli" / "table.md").read_text() in out
