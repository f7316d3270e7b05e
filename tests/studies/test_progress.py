"""Progress counting and the live view off a terminal (no MLflow needed before a study run exists)."""

from __future__ import annotations

import io
import logging
import sys
import time
from pathlib import Path

import pytest

from brainalign.studies import load_study, make_plan
from brainalign.studies.progress import Counts, LiveView, collect, render_lines
from brainalign.tracking import RunRecord

MINI = Path(__file__).resolve().parents[2] / "jobs" / "mini_study.toml"


def _run(status: str, epoch: int, pruned: bool = False) -> RunRecord:
    return RunRecord(run_id="r", name="r", experiment_id="1", status=status, start_time=0,
                     tags={"pruned": "true"} if pruned else {}, metrics={"epoch": float(epoch)})


def test_counts_classify_runs_and_resolve_epochs() -> None:
    c = Counts(total=5, budget=12)
    for r in (_run("RUNNING", 3), _run("FINISHED", 11), _run("FINISHED", 2, pruned=True), _run("FAILED", 0),
              _run("KILLED", 5)):
        c.add(r)
    assert (c.done, c.running, c.pruned, c.failed, c.killed, c.started) == (1, 1, 1, 1, 1, 5)
    assert c.epochs == 4 + 12 * 4  # a running run counts what it trained, every other its budget


def test_status_before_a_study_run_exists() -> None:
    study = load_study(MINI)
    p = collect(study, make_plan(study), "", "sqlite:///unused")
    assert [s.trials.total for s in p.searches] == [4, 4] and p.runs.total == 24
    assert p.epochs_total == 2 * 4 * 12 + 24 * 12 and p.epochs_done == 0
    lines = render_lines(p)
    assert lines[0] == "study mini (sweep)" and "tested runs: 0/24 done" in lines[-1]


def test_live_view_off_a_terminal_logs_lines_and_fills_the_log_file(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    study = load_study(MINI)
    log_file = tmp_path / "study" / "study.log"
    with caplog.at_level(logging.INFO, logger="brainalign"), \
            LiveView(study, make_plan(study), "", "sqlite:///unused", log_file=log_file, interval=0.05, line_every=0):
        logging.getLogger("brainalign.studies.unit").info("a library record")
        deadline = time.monotonic() + 120
        while "[mini] nice__sim-clip__simulated: 0/4 trials" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    assert "[mini] nice__sim-clip__simulated: 0/4 trials" in caplog.text and "tested runs 0/24" in caplog.text
    assert "a library record" in log_file.read_text()
    n = len(log_file.read_text())
    logging.getLogger("brainalign.studies.unit").warning("after the view")
    assert len(log_file.read_text()) == n  # the file handler is gone with the view


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_view_on_a_terminal_draws_a_table_and_keeps_info_off_the_console(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    console = logging.StreamHandler(term)
    root = logging.getLogger()
    root.addHandler(console)
    lib = logging.getLogger("brainalign.studies.unit")
    lib.setLevel(logging.INFO)
    study = load_study(MINI)
    try:
        with LiveView(study, make_plan(study), "", "sqlite:///unused", log_file=tmp_path / "s.log", interval=0.05):
            lib.info("an info record")
            lib.warning("a warning record")
            deadline = time.monotonic() + 120
            while "tested runs" not in term.getvalue() and time.monotonic() < deadline:
                time.sleep(0.1)
        assert console.stream is term and console.level == logging.NOTSET  # restored
    finally:
        root.removeHandler(console)
        lib.setLevel(logging.NOTSET)
    shown = term.getvalue()
    assert "study mini (sweep)" in shown and "tested runs" in shown and "0/24" in shown
    assert "a warning record" in shown and "an info record" not in shown
    assert "an info record" in (tmp_path / "s.log").read_text()
