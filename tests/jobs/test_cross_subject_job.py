"""The cross-subject study as a real Ray job on a real local cluster.

The integration tests start a Ray head and an MLflow server with ``scripts/cluster_up.sh`` on
free ports (their own Ray temp dir, so they coexist with the session's in-process Ray), submit
``jobs/cross_subject.py`` with the real ``ray job submit`` CLI, read the result back from the
MLflow server and always stop the cluster with ``scripts/cluster_down.sh``. The study file,
the plan, the report and the stop guard are tested in-process in ``tests/studies``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "cross_subject.py"
BIN = Path(sys.executable).parent


def _tiny(dataset: Path, name: str, *extra: str) -> list[str]:
    """Tiny on purpose: 2 subjects x 1 pair x 2 arms x 1 seed = 4 runs of 1 epoch."""
    sets = [f"study.name={name}", f"study.experiment={name}", f"study.dataset={dataset}",
            'study.subjects=["01", "02"]', "study.final_seeds=[1]", "study.max_epochs=1", "batch_size=16",
            "study.simulate.preset=tiny", *extra]
    return [a for s in sets for a in ("--set", s)]


def test_job_script_is_a_thin_entry_point(tiny_dataset: Path) -> None:
    """It runs `brainalign study` for cross-subject studies only; --dry-run checks and plans."""
    assert len(JOB.read_text().splitlines()) < 60
    res = subprocess.run([sys.executable, str(JOB), "--study", "jobs/cross_subject_mini.toml", "--dry-run",
                          *_tiny(tiny_dataset, "xs-dry")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 held-out subjects x 2 arms x 1 seeds = 4 runs" in res.stdout and "check out" in res.stdout
    res = subprocess.run([sys.executable, str(JOB), "--study", "jobs/mini_study.toml", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Invalid study kind" in res.stderr, res.stderr[-3000:]


def test_cluster_up_refuses_token_mode_without_a_token_and_a_used_temp_dir(tmp_path: Path) -> None:
    """Both fail before anything starts: no state, no env.sh, no process."""
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
        "CLUSTER_STATE_DIR": str(tmp_path / "state"), "BRAINALIGN_HOME": str(tmp_path),
    }
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    script = str(ROOT / "scripts" / "cluster_up.sh")
    res = subprocess.run(["bash", script], env=env | {"RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1 and "RAY_AUTH_MODE=token but no token" in res.stderr
    used = tmp_path / "raytmp"
    (used / "session_latest").mkdir(parents=True)
    res = subprocess.run(["bash", script], env=env | {"RAY_AUTH_MODE": "disabled", "RAY_TEMP_DIR": str(used),
                                                      "RAY_DASHBOARD_PORT": str(_free_port()),
                                                      "RAY_GCS_PORT": str(_free_port()),
                                                      "MLFLOW_PORT": str(_free_port())},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "already holds a Ray session" in res.stderr, res.stderr
    assert not (tmp_path / "state" / "env.sh").exists() and not (tmp_path / "state" / "state.env").exists()


# --------------------------------------------------------------------------- real cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _our_processes(marker: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmd and state != "Z":
                out.append(int(d.name))
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real Ray head + MLflow server from scripts/cluster_up.sh; always torn down."""
    home = tmp_path_factory.mktemp("xs-home")
    state = tmp_path_factory.mktemp("xs-state")
    dash, gcs, ml = _free_port(), _free_port(), _free_port()
    temp = f"/tmp/ray-ba-test-{dash}"  # short: Ray's unix sockets live below it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "BRAINALIGN_HOME": str(home), "CLUSTER_STATE_DIR": str(state), "RAY_TEMP_DIR": temp,
        "RAY_DASHBOARD_PORT": str(dash), "RAY_GCS_PORT": str(gcs), "MLFLOW_PORT": str(ml),
        "RAY_AUTH_MODE": "disabled", "CLUSTER_STOP_TIMEOUT": "20",
    }
    try:
        up = subprocess.run(["timeout", "900", "bash", str(ROOT / "scripts" / "cluster_up.sh")], env=env,
                            capture_output=True, text=True)
        assert up.returncode == 0, up.stdout + up.stderr
        recorded = dict(line.split("=", 1) for line in (state / "state.env").read_text().splitlines()
                        if "=" in line and not line.startswith("#"))
        assert recorded["RAY_TEMP_DIR"] == temp and recorded["RAY_PID"] and recorded["MLFLOW_PID"]
        yield env | {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}",
                     "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ml}", "XS_TEMP": temp}
    finally:
        down = subprocess.run(["timeout", "300", "bash", str(ROOT / "scripts" / "cluster_down.sh")], env=env,
                              capture_output=True, text=True)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not (state / "state.env").exists()
        assert not _our_processes(temp), "cluster-down left processes of this cluster running"
        assert not Path(temp).exists()


def _ray(env: dict[str, str], *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["timeout", str(timeout), str(BIN / "ray"), "job", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True)


def _job_status(env: dict[str, str], sid: str) -> str:
    """A job's status through the real CLI (``ray job status``)."""
    out = _ray(env, "status", "--address", env["RAY_API_SERVER_ADDRESS"], sid).stdout
    for text, status in (("succeeded", "SUCCEEDED"), ("was stopped", "STOPPED"), ("failed", "FAILED")):
        if f"'{sid}' {text}" in out:
            return status
    m = re.search(r"Status for job '[^']+': (\w+)", out)
    return m.group(1) if m else f"UNKNOWN: {out[-500:]}"


def _job_logs(env: dict[str, str], sid: str) -> str:
    return _ray(env, "logs", "--address", env["RAY_API_SERVER_ADDRESS"], sid).stdout


def _submit(env: dict[str, str], sid: str, extra: list[str], *, wait: bool, timeout: int = 1500
            ) -> subprocess.CompletedProcess[str]:
    return _ray(env, "submit", "--address", env["RAY_API_SERVER_ADDRESS"], "--working-dir", str(ROOT),
                "--submission-id", sid, *([] if wait else ["--no-wait"]), "--",
                "python", "jobs/cross_subject.py", "--study", "jobs/cross_subject_mini.toml", *extra,
                timeout=timeout)


def _runs(uri: str, experiment: str) -> tuple[Any, list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("role") == "report"]
    assert len(parents) == 1, [r.data.tags.get("role") for r in runs]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], kids


@pytest.mark.integration
@pytest.mark.timeout(2400)
def test_cross_subject_job_on_real_cluster(cluster: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    t0 = time.monotonic()
    res = _submit(cluster, "xs-ok", ["--quiet", *_tiny(tiny_dataset, "xs-it")], wait=True)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    out = res.stdout
    assert "mean ± s.e.m." in out and "paired t-test across subjects" in out and "sign-flip" in out, out[-4000:]
    uri = cluster["MLFLOW_TRACKING_URI"]
    parent, kids = _runs(uri, "xs-it")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["study_kind"] == "cross_subject" and parent.data.tags["ray_job"] == "xs-ok"
    assert len(kids) == 4 and {k.info.status for k in kids} == {"FINISHED"}
    seen = set()
    for k in kids:
        t = k.data.tags
        assert t["role"] == "final" and t["brain_encoder"] == "nice" and t["seed"] == "1"
        assert t["backbone"] == "sim-clip" and t["alignment"] in ("simulated", "none")
        assert t["test_subjects"] == t["subject"] and t["subjects"] == ({"01", "02"} - {t["subject"]}).pop()
        assert f"test_top1_sub-{t['subject']}" in k.data.metrics
        assert "system/cpu_utilization_percentage" in k.data.metrics
        seen.add((t["subject"], t["alignment"]))
    assert seen == {(s, a) for s in ("01", "02") for a in ("simulated", "none")}
    # (tests may be undefined on 2 subjects x 1 epoch, e.g. identical differences: not asserted)
    for key in ("aligned_mean", "base_mean", "diff_mean", "n_subjects"):
        assert f"nice.sim-clip.test_top1.{key}" in parent.data.metrics, key
    client = MlflowClient(uri)
    md = Path(client.download_artifacts(parent.info.run_id, "report/table.md", str(tmp_path))).read_text()
    assert "| sub-01 |" in md and "| sub-02 |" in md and "PARTIAL" not in md
    assert parent.data.tags["mlflow.note.content"].endswith(md)
    rows = Path(client.download_artifacts(parent.info.run_id, "report/subjects.csv", str(tmp_path)))
    assert len(rows.read_text().splitlines()) == 1 + 2
    # artifacts went through the server to BRAINALIGN_HOME, never into the job's temp working copy
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((Path(cluster["BRAINALIGN_HOME"]) / "mlruns" / "artifacts").rglob("table.md"))
    sys.stderr.write(f"\n[cross-subject job: 4 runs in {took:.0f} s]\n")


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_stopped_job_leaves_runs_killed(cluster: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = cluster["MLFLOW_TRACKING_URI"]
    args = _tiny(tiny_dataset, "xs-stop", "study.max_epochs=500", "patience=500")
    res = _submit(cluster, "xs-stop", args, wait=False, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    client = MlflowClient(uri)
    deadline = time.monotonic() + 1200
    child = None
    while time.monotonic() < deadline and child is None:  # wait until a child is training
        exp = client.get_experiment_by_name("xs-stop")
        if exp is not None:
            for r in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
                if r.data.tags.get("role") == "final" and client.get_metric_history(r.info.run_id, "train_loss"):
                    child = r
        status = _job_status(cluster, "xs-stop")
        assert status in ("PENDING", "RUNNING"), (status, _job_logs(cluster, "xs-stop")[-4000:])
        time.sleep(3)
    assert child is not None, _job_logs(cluster, "xs-stop")[-4000:]
    stop = _ray(cluster, "stop", "--address", cluster["RAY_API_SERVER_ADDRESS"], "xs-stop", timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert _job_status(cluster, "xs-stop") == "STOPPED"
    parent, kids = _runs(uri, "xs-stop")
    logs = _job_logs(cluster, "xs-stop")
    assert parent.info.status == "KILLED", logs[-4000:]
    assert kids and all(k.info.status in ("KILLED", "FAILED") for k in kids), [k.info.status for k in kids]
    assert client.get_run(child.info.run_id).info.status == "KILLED"
    assert "received SIGTERM" in logs
    # what finished before the stop is kept: a partial report on the parent
    md = MlflowClient(uri).download_artifacts(parent.info.run_id, "report/table.md", str(tmp_path))
    assert "PARTIAL" in Path(md).read_text()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_cluster_coexists_with_in_process_ray(cluster: dict[str, str], ray_session: Any) -> None:
    """The session's in-process Ray is not joined, not confused and not stopped by our head."""
    import ray

    @ray.remote
    def ping() -> int:
        return 1

    assert ray.get(ping.remote(), timeout=600) == 1
    gcs = ray.get_runtime_context().gcs_address
    assert not gcs.endswith(":" + cluster["RAY_GCS_PORT"])
    # our head advertises itself only in its own temp dir, never in the machine-wide default
    assert Path(cluster["XS_TEMP"], "ray_current_cluster").read_text().endswith(":" + cluster["RAY_GCS_PORT"])
    default = Path("/tmp/ray/ray_current_cluster")
    assert not default.exists() or not default.read_text().endswith(":" + cluster["RAY_GCS_PORT"])
