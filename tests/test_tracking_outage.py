"""A real `mlflow server` on 127.0.0.1, stopped while metrics are logged: nothing is lost.

The outage here is a few seconds (CI time); the retry budget (``BRAINALIGN_MLFLOW_RETRY_S``,
default 600 s, back-off capped at 15 s) is what lets a 60 s outage pass the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)


class MlflowServer:
    """``mlflow server`` on a free loopback port, in its own process group (stopped with it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 600.0) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not start in {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its workers
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> object:
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def test_metrics_logged_while_the_server_is_down_are_not_lost(server: MlflowServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from brainalign import tracking

    uri = server.uri
    run_id = tracking.start_run("outage", run_name="r", uri=uri)
    tracking.log_metrics(run_id, {"loss": 1.0, "acc": 0.0}, step=0, uri=uri)
    # MLflow's own HTTP retries off: only brainalign's retry stands between an outage and a lost metric
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server.stop()
    with pytest.raises(MlflowException):  # the outage is real: a plain client call fails
        MlflowClient(uri).get_run(run_id)
    outage = 6.0
    t0 = time.monotonic()
    restart = threading.Timer(outage, server.start)
    restart.start()
    try:
        for step in range(1, 4):  # logged while the server is down: each call waits for it
            tracking.log_metrics(run_id, {"loss": 1.0 / (step + 1), "acc": step / 10}, step=step, uri=uri)
        waited = time.monotonic() - t0
        tracking.end_run(run_id, "FINISHED", uri=uri)
    finally:
        restart.join()
    log.info("logging waited %.1f s for a %.0f s outage", waited, outage)
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("loss", "acc"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [0, 1, 2, 3], (key, steps)  # every step once: none lost, none doubled
    hist = {m.step: m.value for m in client.get_metric_history(run_id, "acc")}
    assert hist == pytest.approx({0: 0.0, 1: 0.1, 2: 0.2, 3: 0.3})


def test_a_bad_request_is_not_retried(server: MlflowServer) -> None:
    from brainalign import tracking

    t0 = time.monotonic()
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="(?i)not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        tracking.end_run("0" * 32, "FINISHED", uri=server.uri)
    assert time.monotonic() - t0 < tracking.retry_budget()  # raised, not retried to the budget
