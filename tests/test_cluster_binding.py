"""`make cluster-up` binds every port to 127.0.0.1; multi-node is an explicit opt-in with token auth."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOOPBACK = ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return env | {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "HOME": str(tmp_path / "home"),
        "BRAINALIGN_HOME": str(tmp_path), "CLUSTER_STATE_DIR": str(tmp_path / "state"),
        "RAY_DASHBOARD_PORT": str(_free_port()), "RAY_GCS_PORT": str(_free_port()),
        "MLFLOW_PORT": str(_free_port()), "CLUSTER_STOP_TIMEOUT": "20",
    } | extra


def test_multi_node_without_token_auth_is_refused(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "cluster_up.sh")
    res = subprocess.run(["bash", script], env=_env(tmp_path, CLUSTER_MULTI_NODE="1", RAY_AUTH_MODE="disabled"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "CLUSTER_MULTI_NODE=1 requires token auth" in res.stderr, res.stderr
    res = subprocess.run(["bash", script], env=_env(tmp_path, CLUSTER_MULTI_NODE="1"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "RAY_AUTH_MODE=token but no token" in res.stderr, res.stderr
    assert not (tmp_path / "state" / "state.env").exists()


def _processes_of(marker: str) -> set[int]:
    """Every live process whose command line names ``marker`` (this cluster's temp dir), and
    their descendants (Ray's workers do not name it)."""
    import psutil

    roots = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                roots.add(p)
        except psutil.Error:
            continue
    pids = set()
    for p in roots:
        try:
            pids |= {p.pid} | {c.pid for c in p.children(recursive=True)}
        except psutil.Error:
            continue
    return pids


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2)")
def test_cluster_up_listens_on_loopback_only(tmp_path: Path) -> None:
    temp = f"/tmp/ray-ba-bind-{_free_port()}"
    env = _env(tmp_path, RAY_TEMP_DIR=temp, RAY_AUTH_MODE="disabled", CLUSTER_NO_MLFLOW="1")
    try:
        up = subprocess.run(["timeout", "600", "bash", str(ROOT / "scripts" / "cluster_up.sh")], env=env,
                            capture_output=True, text=True)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "every port listens on 127.0.0.1 only" in up.stdout
        pids = _processes_of(temp)
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        sockets = []
        for line in out.splitlines():
            if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids:
                sockets.append((line.split()[3], (re.findall(r'\(\("([^"]+)"', line) or ["?"])[0]))
        names = {n for _, n in sockets}
        assert {"gcs_server", "raylet"} <= names, sockets
        exposed = [s for s in sockets if s[0].rsplit(":", 1)[0] not in LOOPBACK]
        assert not exposed, f"cluster-up listens beyond 127.0.0.1: {exposed}"
    finally:
        down = subprocess.run(["timeout", "300", "bash", str(ROOT / "scripts" / "cluster_down.sh")], env=env,
                              capture_output=True, text=True)
        assert down.returncode == 0, down.stdout + down.stderr
