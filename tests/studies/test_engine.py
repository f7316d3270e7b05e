"""The engine's guards, in-process: where it runs, the stop guard, --fresh, the state file."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from brainalign import BrainalignError, tracking
from brainalign._io import claim_dir
from brainalign.studies import JobStopped, StopGuard, load_study
from brainalign.studies._state import StudyState
from brainalign.studies.engine import RAY_JOB_ENV, _remove_folder, check_locations, ray_job_id

ROOT = Path(__file__).resolve().parents[2]


def test_inside_a_ray_job_the_home_must_be_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    check_locations()
    assert ray_job_id() == ""
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"metadata": {"job_submission_id": "xs-1"}}))
    assert ray_job_id() == "xs-1"
    check_locations()  # the test's BRAINALIGN_HOME is absolute
    monkeypatch.delenv("BRAINALIGN_HOME")
    with pytest.raises(BrainalignError, match="BRAINALIGN_HOME must be an absolute path inside a Ray job"):
        check_locations()


def test_fresh_removes_only_a_folder_the_study_created(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    (foreign / "x").mkdir(parents=True)
    with pytest.raises(BrainalignError, match="has no brainalign marker, so brainalign did not create it"):
        _remove_folder(foreign)
    assert (foreign / "x").is_dir()
    ours = tmp_path / "ours"
    claim_dir(ours, "study-storage")
    StudyState.new(ours, load_study(ROOT / "jobs" / "mini_study.toml")).save()
    _remove_folder(ours)
    assert not ours.exists()
    _remove_folder(ours)  # nothing to do


def test_state_refuses_an_edited_study_and_an_old_layout(tmp_path: Path) -> None:
    path = ROOT / "jobs" / "mini_study.toml"
    study = load_study(path)
    StudyState.new(tmp_path, study).save()
    assert StudyState.load(tmp_path, study) is not None
    with pytest.raises(BrainalignError, match="was edited since it started.*--fresh"):
        StudyState.load(tmp_path, load_study(path, ["study.trials=5"]))
    old = tmp_path / "old"
    old.mkdir()
    (old / "sweep_state.json").write_text("{}")
    with pytest.raises(BrainalignError, match="older brainalign"):
        StudyState.load(old, study)


@pytest.mark.integration  # a real (SQLite) MLflow store
def test_stop_guard_marks_the_study_runs_killed_then_unwinds() -> None:
    """SIGTERM (what `ray job stop` sends) in-process: the study's runs end KILLED, the
    handler raises JobStopped, another study's run is untouched, the handlers come back."""
    parent = tracking.start_run("guard", run_name="p", tags={"study": "g"})
    child = tracking.start_run("guard", run_name="c", parent_run_id=parent, tags={"study": "g"})
    other = tracking.start_run("guard", run_name="unrelated", tags={"study": "h"})
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(JobStopped, match="SIGTERM"), StopGuard("guard", {"study": "g"}, tracking.tracking_uri()) as g:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises here
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert [tracking.get_run(r).status for r in (parent, child, other)] == ["KILLED", "KILLED", "RUNNING"]
    with pytest.raises(JobStopped):
        g.check()
