"""`brainalign study run` killed with SIGKILL (no handler runs), mid-search and then mid-finals:
re-running the same command finishes the study with exactly one FINISHED MLflow run per
trial and final, no RUNNING leftovers, and the search's Tune/Optuna/ASHA state kept (a trial
that finished before the kill is neither run nor logged again).

Only processes of the Ray cluster each killed driver started are touched: they are found by
that cluster's session name, taken from the driver's own child processes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

SPACE = """
encoder = "nice"
metric = "val_top1_best"
mode = "max"
[params]
lr = { float = [2e-4, 2e-3], log = true }
temperature = { float = [0.03, 0.1], log = true }
"""

STUDY = """
[study]
name = "sweep-kill"
dataset = "{dataset}"
subjects = ["01"]
encoders = [{{ name = "nice", searchspace = "space.toml" }}]
pairs = [{{ backbone = "sim-clip", aligned = "simulated" }}]
trials = 2
max_epochs = 3
grace_period = 1
final_seeds = 1
seed = 0

[config]
batch_size = 16
"arch.n_filters" = 8
"""


def _runs(home: Path) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweep-kill")
    return [] if exp is None else list(client.search_runs([exp.experiment_id], max_results=1000))


def _session_of(proc: subprocess.Popen[str]) -> str:
    """The Ray session (``session_<date>_<pid>``) the driver started, from its children."""
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            for arg in child.cmdline():
                if arg.startswith("--session-name="):
                    return arg.split("=", 1)[1]
        except psutil.Error:
            continue
    return ""


def _kill_driver(proc: subprocess.Popen[str]) -> int:
    """SIGKILL the driver, then wait for its Ray cluster's processes to go (SIGKILL those that
    linger after 60 s); returns how many had to be killed."""
    import psutil

    session = _session_of(proc)
    assert session, "the driver's Ray cluster was not found"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(session in a for a in (p.info["cmdline"] or [])):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    deadline = time.monotonic() + 60
    while ours() and time.monotonic() < deadline:
        time.sleep(2)
    left = ours()
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    log.info("driver %d killed; %d process(es) of Ray %s outlived it by 60 s", proc.pid, len(left), session)
    return len(left)


def _run_until(cmd: list[str], env: dict[str, str], ready: Callable[[], bool], what: str) -> None:
    """Start the driver, wait until ``ready()``, SIGKILL it (and its cluster)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            try:
                if ready():
                    break
            except Exception:  # the MLflow DB is being created by the driver
                continue
        assert proc.poll() is None, f"the study ended before {what}"
        _kill_driver(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(2400)  # three driver starts; minutes on a quiet machine, far more on a busy one
def test_sigkill_mid_search_and_mid_finals_then_rerun(tiny_dataset: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "space.toml").write_text(SPACE)
    (home / "study.toml").write_text(STUDY.format(dataset=tiny_dataset))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env |= {"BRAINALIGN_HOME": str(home), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    cmd = [str(Path(sys.executable).parent / "brainalign"), "study", "run", str(home / "study.toml"), "--quiet"]
    folder = home / "ray_results" / "sweep-kill"
    done_before: dict[str, str] = {}  # trial run id -> tune trial id, FINISHED before the kill

    def trial_finished_and_saved() -> bool:
        """A trial finished, and Tune saved its experiment state after that."""
        if not (folder / "study_state.json").exists():
            return False
        finished = [r for r in _runs(home) if r.data.tags.get("role") == "trial" and r.info.status == "FINISHED"
                    and r.data.tags.get("pruned") != "true"]
        if not finished:
            return False
        end = max(r.info.end_time for r in finished) / 1000
        states = list(folder.glob("*/experiment_state-*.json"))
        if not any(s.stat().st_mtime > end + 1 for s in states):
            return False
        done_before.update({r.info.run_id: r.data.tags["tune_trial_id"] for r in finished})
        return True

    _run_until(cmd, env, trial_finished_and_saved, "a trial finished")
    left = _runs(home)
    assert any(r.info.status == "RUNNING" for r in left)  # SIGKILL: nobody ended them
    log.info("after kill 1: %s", Counter((r.data.tags.get("role"), r.info.status) for r in left))

    def final_started() -> bool:
        return any(r.data.tags.get("role") == "final" and "train_loss" in r.data.metrics for r in _runs(home))

    _run_until(cmd, env, final_started, "a final run logged an epoch")
    log.info("after kill 2: %s", Counter((r.data.tags.get("role"), r.info.status) for r in _runs(home)))

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    errors = "\n".join(f"{e}:\n{e.read_text()[-2000:]}" for e in folder.glob("*/*/error.txt"))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:] + "\nTune trial errors:\n" + errors
    runs = _runs(home)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    roles = Counter(r.data.tags.get("role") for r in runs)
    assert roles == {"report": 1, "search": 2, "trial": 4, "final": 2}, roles
    per_trial = Counter(r.data.tags.get("tune_trial_id") for r in runs if r.data.tags.get("role") == "trial")
    assert set(per_trial.values()) == {1}, per_trial
    # the search was restored, not started over: what finished before the kill is kept as it was
    kept = {r.info.run_id: r for r in runs}
    assert done_before and set(done_before) <= set(kept), (done_before, list(kept))
    searches = [r for r in runs if r.data.tags.get("role") == "search"]
    assert all(r.data.metrics["n_trials"] == 2 for r in searches)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
    for r in runs:  # every epoch of every run logged once
        if r.data.tags.get("role") in ("trial", "final"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")]
            assert steps == sorted(set(steps)) and steps == list(range(len(steps))), (r.info.run_name, steps)
