"""A 2-node Ray cluster on one machine runs a study to its report (issue 14).

How the cluster is modelled (docs/cluster.md, "Testing on one machine"):

* **head**: ``ray start --head`` with ``--resources='{"head": 1}'`` and 1 CPU, the dashboard on
  127.0.0.1; the study's driver attaches to it (``RAY_ADDRESS``) and the MLflow server runs next
  to it. Both see every folder.
* **node b**: ``ray start --address`` with ``--resources='{"node_b": 2}'`` and 2 CPUs, started
  inside its own mount namespace (``unshare --mount``) with a tmpfs over ``private/``: every Ray
  process of that node (raylet, Tune trials, Train controller and workers) sees an empty
  ``private/``, as a second machine would not see the driver's disk. ``shared/`` is seen by
  both, as a shared filesystem mounted at the same path on every node.
* The study pins its Tune trials (``[resources] trial_custom``) and its Train workers
  (``custom_per_worker``) to node b. Its dataset, prepared cache and Ray storage are in
  ``shared/``; its study file, search space, ``BRAINALIGN_HOME`` (reports) and the MLflow
  store are in ``private/``. MLflow is a real ``mlflow server`` on 127.0.0.1 (a SQLite URI is
  refused on a multi-node cluster).

Every port listens on 127.0.0.1. Node b's ``ray start`` keeps its node address 127.0.0.1
(:data:`_NODE_B_LAUNCHER`): Ray otherwise swaps a loopback address for the machine's network
address, where the head's GCS does not listen. Needs root (or CAP_SYS_ADMIN) for ``unshare``
and ``mount``; skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
#: ``ray start`` for node b. Ray replaces a node address of 127.0.0.1 with the machine's
#: network address (``services.resolve_ip_for_localhost``) whenever multi-node support is on,
#: and ``ray start --address`` refuses to start with it off; keeping the address as given is
#: what a second machine does with its own address.
_NODE_B_LAUNCHER = (
    "import sys\n"
    "from ray._private import services\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray', *sys.argv[1:]]\n"
    "main()\n"
)
#: Run by a driver on the head: where a task pinned to each node runs and which files it sees.
_PROBE = """
import json, os, sys
import ray
from brainalign._ray import ensure_ray, multi_node

ensure_ray()  # RAY_ADDRESS=127.0.0.1:<port>: joins as 127.0.0.1 (brainalign._ray._joining)

@ray.remote(num_cpus=0)
def look(paths):
    return {"node": ray.get_runtime_context().get_node_id(), "mnt": os.readlink("/proc/self/ns/mnt"),
            "seen": {p: os.path.exists(p) for p in paths}}

paths = sys.argv[1:]
out = {"driver_node": ray.get_runtime_context().get_node_id(), "multi_node": multi_node(),
       "driver_mnt": os.readlink("/proc/self/ns/mnt"),
       "node_b": ray.get(look.options(resources={"node_b": 0.01}).remote(paths)),
       "head": ray.get(look.options(resources={"head": 0.01}).remote(paths)),
       "nodes": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}
print("PROBE " + json.dumps(out))
"""

SPACE = """
encoder = "nice"
metric = "val_top1_best"
mode = "max"
[params]
lr = { float = [5e-4, 2e-3], log = true }
"""

STUDY = """
[study]
name = "{name}"
dataset = "{dataset}"
subjects = ["01"]
encoders = [{{ name = "nice", searchspace = "space.toml" }}]
pairs = [{{ backbone = "sim-clip", aligned = "simulated" }}]
trials = 1
max_epochs = 2
grace_period = 1
final_seeds = 1
seed = 0

[resources]
custom_per_worker = {{ node_b = 1 }}
trial_custom = {{ node_b = 0.01 }}

[config]
batch_size = 16
"arch.n_filters" = 8
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unshare_problem(where: Path) -> str:
    """Why a mount namespace with a tmpfs cannot be made here ("" when it can)."""
    if sys.platform != "linux" or shutil.which("unshare") is None or shutil.which("mount") is None:
        return "needs Linux with `unshare` and `mount` (util-linux)"
    target = where / "unshare-check"
    target.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f"mount -t tmpfs tmpfs {target}"], capture_output=True, text=True, timeout=60)
    target.rmdir()
    if res.returncode != 0:
        return ("needs root or CAP_SYS_ADMIN: `unshare --mount` + `mount -t tmpfs` failed "
                f"({res.stderr.strip()[:200]})")
    return ""


def _get_json(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _wait(what: str, ok: Any, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, ValueError):
            if ok():
                return
        time.sleep(1.0)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f} s: {log.read_text()[-3000:]}")


@dataclass
class TwoNodes:
    """What the module's cluster fixture started, and how to reach it."""

    root: Path
    private: Path
    shared: Path
    temp_dir: Path
    gcs_port: int = field(default_factory=_free_port)
    dash_port: int = field(default_factory=_free_port)
    mlflow_port: int = field(default_factory=_free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def node_env(self) -> dict[str, str]:
        """A Ray node's environment: none of the driver's stores (runs get theirs from the driver)."""
        drop = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "BRAINALIGN_HOME", "BRAINALIGN_CACHE", "BRAINALIGN_RAY_STORAGE",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        return env | {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
            # in-cluster State API clients (Train V2's placement-group cleaner) find this cluster
            # by this address, not by scanning the machine (other Rays run here)
            "RAY_API_SERVER_ADDRESS": self.api, "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true", "TQDM_DISABLE": "1",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        }

    def driver_env(self, **extra: str) -> dict[str, str]:
        """The study driver's environment on the head: the cluster, MLflow, and its stores."""
        return self.node_env() | {
            "RAY_ADDRESS": self.address, "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "BRAINALIGN_HOME": str(self.private / "home"),
        } | extra

    def _agent_ports(self) -> list[str]:
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]

    def _start_node(self, name: str, argv: list[str], env: dict[str, str], attempts: int = 3) -> None:
        """Start one ``ray start --block`` in its own session; retried when its raylet misses
        Ray's fixed 30 s registration window (a busy machine), as scripts/cluster_up.sh does."""
        log = self.root / "logs" / f"{name}.log"
        for attempt in range(1, attempts + 1):
            with open(log, "ab") as f:
                proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            self.procs[name] = proc
            try:
                _wait(name, lambda: "Ray runtime started" in log.read_text(), proc, log, 300)
                return
            except RuntimeError:
                if attempt == attempts or "timed out during startup" not in log.read_text():
                    raise
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                time.sleep(5.0 * attempt)

    def start(self) -> None:
        (self.root / "logs").mkdir()
        common = ["--block", f"--temp-dir={self.temp_dir}", "--object-store-memory=200000000",
                  "--disable-usage-stats"]
        # the head keeps 127.0.0.1 (and listens there only) with multi-node support off (docs/cluster.md)
        self._start_node("head", [
            str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            "--num-cpus=1", '--resources={"head": 1}', "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dash_port}", f"--ray-client-server-port={_free_port()}", *common,
            *self._agent_ports()], self.node_env() | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        _wait("the Ray dashboard", lambda: _get_json(f"{self.api}/api/version", 5), self.procs["head"],
              self.root / "logs" / "head.log", 300)
        node_b = [str(BIN / "python"), "-c", _NODE_B_LAUNCHER, "start", f"--address={self.address}",
                  "--node-ip-address=127.0.0.1", "--num-cpus=2", '--resources={"node_b": 2}', *common,
                  *self._agent_ports()]
        # node b's whole process tree lives in a mount namespace where private/ is an empty tmpfs
        script = f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(self.private))} && exec {shlex.join(node_b)}"
        self._start_node("node_b", ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                         self.node_env())
        log = self.root / "logs" / "mlflow.log"
        with open(log, "wb") as f:
            self.procs["mlflow"] = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--backend-store-uri",
                 f"sqlite:///{self.private / 'mlflow' / 'mlflow.db'}", "--artifacts-destination",
                 str(self.private / "mlflow" / "artifacts"), "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                 "--workers", "1"],
                env=self.node_env(), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        _wait("the MLflow server", lambda: urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=5).status == 200,
              self.procs["mlflow"], log, 600)

    def run_probe(self) -> dict[str, Any]:
        paths = [str(self.private / "only-on-the-driver.txt"), str(self.shared / "on-every-node.txt")]
        res = subprocess.run([str(BIN / "python"), "-c", _PROBE, *paths], env=self.driver_env(), capture_output=True,
                             text=True, timeout=300)
        line = next((x for x in res.stdout.splitlines() if x.startswith("PROBE ")), "")
        assert res.returncode == 0 and line, (res.stdout + res.stderr)[-3000:]
        out: dict[str, Any] = json.loads(line.removeprefix("PROBE "))
        return out

    def actors(self) -> list[dict[str, Any]]:
        """Every actor the cluster has had (alive and dead), from the dashboard's State API."""
        data = _get_json(f"{self.api}/api/v0/actors?limit=10000&detail=1")
        return list(data["data"]["result"]["result"])

    def stop(self) -> None:
        """Stop exactly what :meth:`start` started: node b, then the head (SIGTERM to each
        ``ray start --block``, which stops its own daemons), the MLflow server; then any
        process left that names this cluster's temp dir. Never ``ray stop`` (it kills every Ray
        on the machine); the tmpfs goes with node b's mount namespace."""
        for name in ("node_b", "head", "mlflow"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the daemons it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        import psutil

        marker = str(self.temp_dir)
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if marker in " ".join(p.info["cmdline"] or []):
                    for q in [*p.children(recursive=True), p]:
                        with contextlib.suppress(psutil.Error):
                            q.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    root = tmp_path_factory.mktemp("two-node")
    problem = _unshare_problem(root)
    if problem:
        pytest.skip(f"the 2-node test hides a folder from the second node with a mount namespace: {problem}")
    private, shared = root / "private", root / "shared"
    for d in (private / "home", private / "mlflow", shared):
        d.mkdir(parents=True)
    (private / "only-on-the-driver.txt").write_text("the driver's disk\n")
    (shared / "on-every-node.txt").write_text("shared storage\n")
    # Ray's session dir (sockets, logs) is shared by both nodes, as `ray.cluster_utils.Cluster`
    # does; short, because Unix socket paths are limited to 107 characters
    cluster = TwoNodes(root=root, private=private, shared=shared, temp_dir=Path(f"/tmp/ray-2n-{_free_port()}"))
    try:
        cluster.start()
        cluster.probe = cluster.run_probe()
        yield cluster
    finally:
        cluster.stop()


def test_node_b_cannot_see_the_drivers_private_folder(two_nodes: TwoNodes) -> None:
    """The negative control: a task on node b does not see a file of ``private/``, a task on the
    head does, and both see ``shared/``; they run on different nodes in different mount
    namespaces, and the driver attached to the head."""
    p = two_nodes.probe
    private_file, shared_file = str(two_nodes.private / "only-on-the-driver.txt"), str(two_nodes.shared /
                                                                                      "on-every-node.txt")
    assert p["node_b"]["seen"] == {private_file: False, shared_file: True}
    assert p["head"]["seen"] == {private_file: True, shared_file: True}
    assert p["node_b"]["node"] != p["head"]["node"] and p["driver_node"] == p["head"]["node"]
    assert p["node_b"]["mnt"] != p["head"]["mnt"] == p["driver_mnt"]
    assert p["multi_node"] is True
    assert p["nodes"][p["node_b"]["node"]].get("node_b") == 2.0 and "node_b" not in p["nodes"][p["head"]["node"]]


def _write_study(two_nodes: TwoNodes, name: str, dataset: str) -> Path:
    (two_nodes.private / "space.toml").write_text(SPACE)
    path = two_nodes.private / f"{name}.toml"
    path.write_text(STUDY.format(name=name, dataset=dataset))
    return path


def _run_study(two_nodes: TwoNodes, path: Path, **env: str) -> str:
    res = subprocess.run([str(BIN / "brainalign"), "study", "run", str(path), "--quiet"],
                         env=two_nodes.driver_env(**env), cwd=two_nodes.private / "home", capture_output=True,
                         text=True, timeout=1500)
    out = res.stdout + res.stderr
    (two_nodes.root / "logs" / f"{path.stem}.driver.log").write_text(out)
    assert res.returncode == 0, out[-4000:]
    return out


def _check_study(two_nodes: TwoNodes, name: str, out: str) -> None:
    """Report, MLflow and placement of a finished 2-node study."""
    from mlflow.tracking import MlflowClient

    assert "report files:" in out and "human-aligned vs base" in out, out[-3000:]
    report = two_nodes.private / "home" / "reports" / name
    assert (report / "table.md").is_file() and (report / "runs.csv").read_text().count("\n") == 3  # header + 2

    client = MlflowClient(two_nodes.mlflow_uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert Counter(r.data.tags.get("role") for r in runs) == {"report": 1, "search": 2, "trial": 2, "final": 2}
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    for final in (r for r in runs if r.data.tags.get("role") == "final"):
        assert 0.0 <= final.data.metrics["test_top1"] <= 1.0
        # written by the trial on node b, uploaded through the server (not a path on a disk)
        assert {Path(a.path).name for a in client.list_artifacts(final.info.run_id, "checkpoint")} >= {"model.pt"}

    node_b = two_nodes.probe["node_b"]["node"]
    actors = two_nodes.actors()
    workers = [a for a in actors if a.get("class_name") == "RayTrainWorker"]
    controllers = [a for a in actors if a.get("class_name") == "TrainController"]
    assert len(workers) >= 4 and len(controllers) >= 4, Counter(a.get("class_name") for a in actors)
    # every Train worker and controller (attached to its Tune trial's node) ran on node b
    assert {a["node_id"] for a in workers + controllers} == {node_b}, [(a["class_name"], a["node_id"])
                                                                      for a in workers + controllers]


def test_study_runs_on_node_b_from_shared_storage(two_nodes: TwoNodes, tiny_dataset: Path) -> None:
    """Search, finals and report of a sweep whose trials and Train workers are pinned to node
    b; everything they read is in ``shared/``, everything only the driver reads in ``private/``."""
    dataset = two_nodes.shared / "data" / "sim-tiny"
    shutil.copytree(tiny_dataset, dataset)
    path = _write_study(two_nodes, "two-node", str(dataset))
    out = _run_study(two_nodes, path, BRAINALIGN_CACHE=str(two_nodes.shared / "cache"),
                     BRAINALIGN_RAY_STORAGE=str(two_nodes.shared / "ray_results"))
    _check_study(two_nodes, "two-node", out)
    # the study's Tune experiments and Train checkpoints are in the shared Ray storage
    assert (two_nodes.shared / "ray_results" / "two-node" / "study_state.json").is_file()
    assert any((two_nodes.shared / "ray_results").glob("final-*"))
