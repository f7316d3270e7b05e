"""The cross-subject study as a real Ray job on a real local cluster.

The integration tests start a Ray head and an MLflow server with ``scripts/cluster_up.sh`` on
free ports (their own Ray temp dir, so they coexist with the session's in-process Ray), submit
``jobs/cross_subject.py`` with the real ``ray job submit`` CLI, read the result back from the
MLflow server and always stop the cluster with ``scripts/cluster_down.sh``. The other tests
exercise the study file, the statistics, the report and the stop handler in-process.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "cross_subject.py"
STUDY = ROOT / "jobs" / "cross_subject_mini.toml"
BIN = Path(sys.executable).parent
# Tiny on purpose: 2 subjects x 1 pair x 2 arms x 1 seed = 4 runs of 1 epoch.
TINY_ARGS = ["--seeds", "1", "--set", "epochs=1", "--set", "batch_size=16", "--set", "num_workers=1"]


def _load_job() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cross_subject_job", JOB)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


job = _load_job()


# --------------------------------------------------------------------------- in-process
def test_paired_stats_match_scipy() -> None:
    from scipy import stats

    a, b = [0.30, 0.25, 0.40, 0.35], [0.20, 0.22, 0.31, 0.30]
    s = job.paired_stats(a, b)
    ref = stats.ttest_rel(a, b)
    assert s.n == 4 and s.t == pytest.approx(ref.statistic) and s.p_t == pytest.approx(ref.pvalue)
    assert s.mean_a == pytest.approx(0.325) and s.mean_diff == pytest.approx(0.0675)
    d = [x - y for x, y in zip(a, b, strict=True)]
    sem = stats.sem(d)
    assert s.sem_diff == pytest.approx(sem)
    same = job.paired_stats([0.30, 0.25], [0.25, 0.20])  # equal differences up to float noise
    assert math.isnan(same.t) and math.isnan(same.p_t) and same.mean_diff == pytest.approx(0.05)
    assert any("constant differences" in n for n in same.notes)
    one = job.paired_stats([0.3], [0.2])
    assert one.n == 1 and math.isnan(one.p_t) and math.isnan(one.sem_a)


def _study(tiny: Path, **kw: Any) -> Any:
    return job.load_study(STUDY, data=str(tiny), sets=["epochs=1"], seeds="1", **kw)


def test_load_study_resolves_and_plans(tiny_dataset: Path) -> None:
    st = _study(tiny_dataset)
    assert st.subjects == ("01", "02") and st.seeds == (1,) and st.n_runs == 4
    assert st.pairs == (("sim-clip:simulated", "sim-clip:none"),)
    cfg = st.run_config("02", "sim-clip:none", 1)
    assert cfg.data.subjects == ("01",) and cfg.data.test_subjects == ("02",)
    assert cfg.data.cross_subject and cfg.data.image_table == "sim-clip:none" and cfg.seed == 1
    assert Path(cfg.data.path).is_absolute() and cfg.epochs == 1


def test_load_study_rejects_bad_input_before_running(tiny_dataset: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\nseed = [1]\n')
    with pytest.raises(job.BrainalignError, match="Did you mean 'seeds'"):
        job.load_study(bad, data=str(tiny_dataset))
    with pytest.raises(job.BrainalignError, match="at least 2 subjects"):
        _study(tiny_dataset, subjects="01")
    with pytest.raises(job.BrainalignError, match="Did you mean 'sim-clip:simulated'"):
        _study(tiny_dataset, pairs=["sim-clip:simulatd,sim-clip:none"])
    with pytest.raises(job.BrainalignError, match=r"must be \[aligned, base\]"):
        _study(tiny_dataset, pairs=["sim-clip:simulated"])
    # inside a Ray job, a missing BRAINALIGN_HOME would put the stores in the job's temp copy
    monkeypatch.setenv(job.RAY_JOB_ENV, "{}")
    monkeypatch.delenv("BRAINALIGN_HOME")
    with pytest.raises(job.BrainalignError, match="BRAINALIGN_HOME must be an absolute path"):
        _study(tiny_dataset)


def test_study_simulates_a_missing_dataset(tmp_path: Path) -> None:
    """A fresh clone has no data: a study with `simulate` creates data.path first (validated
    before, so a typo costs nothing); an existing dataset is used as it is."""
    doc = STUDY.read_text().replace('simulate = { preset = "mini", seed = 0 }',
                                    'simulate = { preset = "tiny", seed = 0 }')
    assert 'preset = "tiny"' in doc
    study = tmp_path / "xs.toml"
    study.write_text(doc)
    target = tmp_path / "sim"
    st = job.load_study(study, data=str(target), seeds="1")
    assert (target / "dataset.json").is_file() and st.subjects == ("01", "02")
    before = (target / "dataset.json").stat().st_mtime_ns
    job.load_study(study, data=str(target), seeds="1")
    assert (target / "dataset.json").stat().st_mtime_ns == before
    study.write_text(doc.replace('preset = "tiny"', 'preset = "tinny"'))
    with pytest.raises(job.BrainalignError, match="Did you mean 'tiny'"):
        job.load_study(study, data=str(tmp_path / "never"), seeds="1")
    assert not (tmp_path / "never").exists()


def test_report_table_and_tests(tiny_dataset: Path) -> None:
    st = _study(tiny_dataset, subjects="01,02")
    rows = [job.RunRow(s, 0, arm, "t", 1, top1, top1 + 0.2, 20, 0, f"r{s}{arm}")
            for s, arm, top1 in [("01", "aligned", 0.30), ("01", "base", 0.20),
                                 ("02", "aligned", 0.25), ("02", "base", 0.22)]]
    rep = job.build_report(st, rows)
    assert "| sub-01 | 1 | 30.0 | 20.0 | +10.0 |" in rep.markdown
    assert "mean ± s.e.m.** (n=2)" in rep.markdown and "Paired t-test across subjects" in rep.markdown
    assert rep.metrics["xs_top1_aligned_mean"] == pytest.approx(0.275)
    assert rep.metrics["xs_top1_diff_mean"] == pytest.approx(0.065)
    assert "xs_top1_ttest_p" in rep.metrics
    assert rep.subjects_csv.splitlines()[0].startswith("pair,aligned_table,base_table,subject")
    assert len(rep.runs_csv.splitlines()) == 1 + 4
    partial = job.build_report(st, rows[:1], partial=True)
    assert "PARTIAL" in partial.markdown and "| sub-02 | – |" in partial.markdown


@pytest.mark.integration  # a real (SQLite) MLflow store: tens of seconds on a busy machine
def test_stop_guard_marks_runs_killed(tmp_path: Path) -> None:
    """SIGTERM in-process: the child and the parent end KILLED, and JobStopped unwinds."""
    from mlflow.tracking import MlflowClient

    from brainalign import tracking

    uri = tracking.tracking_uri()  # sqlite under the test's BRAINALIGN_HOME
    parent = tracking.start_run("xs-guard", run_name="p", uri=uri)
    child = tracking.start_run("xs-guard", run_name="c", parent_run_id=parent, uri=uri)
    other = tracking.start_run("xs-guard", run_name="unrelated", uri=uri)
    guard = job.StopGuard(uri)
    guard.parent = parent
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        guard.install()
        with pytest.raises(job.JobStopped, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    client = MlflowClient(uri)
    assert client.get_run(child).info.status == "KILLED"
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"  # not ours: untouched
    with pytest.raises(job.JobStopped):
        guard.check()


@pytest.mark.integration
def test_config_from_run_takes_hyperparameters_only(tiny_dataset: Path) -> None:
    from brainalign import tracking
    from brainalign.config import TrainConfig

    uri = tracking.tracking_uri()
    src = TrainConfig().with_overrides({"lr": 3e-4, "temperature": 0.07, "seed": 99, "num_workers": 3,
                                        "data.path": "/elsewhere", "data.image_table": "x:y"})
    run = tracking.start_run("xs-src", run_name="best", uri=uri)
    tracking.log_dict(run, src.to_flat(), "config/resolved_config.json", uri=uri)
    tracking.end_run(run, uri=uri)
    st = _study(tiny_dataset, from_run=run, uri=uri)
    assert (st.base.lr, st.base.temperature) == (3e-4, 0.07)
    assert st.base.data.path == str(tiny_dataset) and st.base.num_workers == 1 and st.config_from_run == run
    assert st.base.epochs == 1  # --set wins over the run
    with pytest.raises(job.BrainalignError, match="config_from_run"):
        _study(tiny_dataset, from_run="0" * 32, uri=uri)


def test_config_from_sweep_gives_each_arm_its_own_best_config(tiny_dataset: Path) -> None:
    """A sweep's tree (parent -> one search per table, each with best_config.json): each
    table's runs take their own search's config; --set still wins; bad ids fail early."""
    from brainalign import tracking

    uri = tracking.tracking_uri()
    parent = tracking.start_run("xs-sweep", run_name="study-x", tags={"role": "report"}, uri=uri)
    for table, lr, temp in (("sim-clip:simulated", 3e-4, 0.05), ("sim-clip:none", 7e-4, 0.09)):
        child = tracking.start_run("xs-sweep", run_name=table, parent_run_id=parent, uri=uri,
                                   tags={"role": "search", "brain_encoder": "nice", "image_table": table})
        tracking.log_dict(child, {"lr": lr, "temperature": temp, "seed": 5, "epochs": 9},
                          "best_config.json", uri=uri)
        tracking.end_run(child, uri=uri)
    tracking.end_run(parent, uri=uri)
    st = _study(tiny_dataset, from_sweep=parent, uri=uri)  # _study sets epochs=1, seeds=1
    aligned, base = st.run_config("02", "sim-clip:simulated", 1), st.run_config("02", "sim-clip:none", 1)
    assert (aligned.lr, aligned.temperature, base.lr, base.temperature) == (3e-4, 0.05, 7e-4, 0.09)
    assert aligned.seed == base.seed == 1 and aligned.epochs == base.epochs == 1  # seed never, --set wins
    assert st.config_from_sweep == parent
    with pytest.raises(job.BrainalignError, match="no finished search"):
        _study(tiny_dataset, from_sweep=tracking.start_run("xs-sweep", run_name="lonely", uri=uri), uri=uri)
    with pytest.raises(job.BrainalignError, match="not both"):
        _study(tiny_dataset, from_sweep=parent, from_run=parent, uri=uri)


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
    res = _submit(cluster, "xs-ok", ["--data", str(tiny_dataset), "--experiment", "xs-it", *TINY_ARGS], wait=True)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    out = res.stdout
    assert "mean ± s.e.m." in out and "Paired t-test across subjects" in out, out[-4000:]
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
        seen.add((t["subject"], t["alignment"]))
    assert seen == {(s, a) for s in ("01", "02") for a in ("simulated", "none")}
    # (tests may be undefined on 2 subjects x 1 epoch, e.g. identical differences: not asserted)
    for key in ("xs_top1_aligned_mean", "xs_top1_base_mean", "xs_top5_diff_mean", "xs_n_subjects"):
        assert key in parent.data.metrics, key
    client = MlflowClient(uri)
    md = Path(client.download_artifacts(parent.info.run_id, "report/cross_subject.md", str(tmp_path))).read_text()
    assert "| sub-01 |" in md and "| sub-02 |" in md and "PARTIAL" not in md
    rows = Path(client.download_artifacts(parent.info.run_id, "report/cross_subject.csv", str(tmp_path)))
    assert len(rows.read_text().splitlines()) == 1 + 2
    # artifacts went through the server to BRAINALIGN_HOME, never into the job's temp working copy
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((Path(cluster["BRAINALIGN_HOME"]) / "mlruns" / "artifacts").rglob("cross_subject.md"))
    sys.stderr.write(f"\n[cross-subject job: 4 runs in {took:.0f} s]\n")


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_stopped_job_leaves_runs_killed(cluster: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = cluster["MLFLOW_TRACKING_URI"]
    args = ["--data", str(tiny_dataset), "--experiment", "xs-stop", "--seeds", "1", "--set", "epochs=500",
            "--set", "patience=500", "--set", "batch_size=16"]
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
    md = MlflowClient(uri).download_artifacts(parent.info.run_id, "report/cross_subject.md", str(tmp_path))
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
