"""brainalign._ray: the one Ray start-up (127.0.0.1 only), resource checks and clear start-up errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from brainalign import BrainalignError

LOOPBACK = ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]", "localhost")


def _listening(pids: set[int]) -> list[tuple[str, str]]:
    """``(local address:port, process name)`` of every TCP socket in LISTEN owned by ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            names = re.findall(r'\(\("([^"]+)"', line)
            found.append((line.split()[3], names[0] if names else "?"))
    return found


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2)")
def test_every_port_of_a_brainalign_ray_listens_on_loopback_only(ray_session: object) -> None:
    """GCS, raylet, object manager, dashboard and its agents, runtime-env agent, metrics and
    every worker: all bound to 127.0.0.1 (Ray would otherwise bind the network address)."""
    import os

    import psutil
    import ray

    @ray.remote
    def pid() -> int:
        return os.getpid()

    worker_pids = set(ray.get([pid.remote() for _ in range(4)]))
    me = psutil.Process()
    pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
    assert worker_pids <= pids, "Ray's workers should be descendants of this driver"
    sockets = _listening(pids)
    names = {n for _, n in sockets}
    assert "gcs_server" in names and "raylet" in names, sockets  # the check really sees Ray's daemons
    exposed = [(addr, name) for addr, name in sockets if addr.rsplit(":", 1)[0] not in LOOPBACK]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
    assert ray.util.get_node_ip_address() == "127.0.0.1"


def test_check_resources_names_what_is_missing() -> None:
    from brainalign._ray import check_resources

    cluster = {"CPU": 4.0}
    nodes = [{"CPU": 4.0}]
    check_resources(num_workers=2, cpus_per_worker=2.0, use_gpu=False, cluster=cluster, nodes=nodes)
    with pytest.raises(BrainalignError, match=r"3 worker\(s\) x 2 CPU = 6 CPUs, but the cluster has 4 CPUs"):
        check_resources(num_workers=3, cpus_per_worker=2.0, use_gpu=False, cluster=cluster, nodes=nodes)
    with pytest.raises(BrainalignError, match=r"1 worker\(s\) x 1 GPU = 1, but the cluster has 0 GPU.*CPU-only"):
        check_resources(num_workers=1, cpus_per_worker=1.0, use_gpu=True, cluster=cluster, nodes=nodes)
    with pytest.raises(BrainalignError, match=r"one worker needs 3 CPUs on one node, the largest node has 2"):
        check_resources(num_workers=2, cpus_per_worker=3.0, use_gpu=False, cluster={"CPU": 8.0},
                        nodes=[{"CPU": 2.0}] * 4)
    check_resources(num_workers=2, cpus_per_worker=1.0, use_gpu=True, cluster={"CPU": 8.0, "GPU": 2.0},
                    nodes=[{"CPU": 4.0, "GPU": 1.0}] * 2)
    # fractional GPUs: four quarter-GPU workers fit on one GPU, five do not
    check_resources(num_workers=4, cpus_per_worker=1.0, use_gpu=True, gpus_per_worker=0.25,
                    cluster={"CPU": 8.0, "GPU": 1.0}, nodes=[{"CPU": 8.0, "GPU": 1.0}])
    with pytest.raises(BrainalignError, match=r"5 worker\(s\) x 0.25 GPU = 1.25, but the cluster has 1 GPU"):
        check_resources(num_workers=5, cpus_per_worker=1.0, use_gpu=True, gpus_per_worker=0.25,
                        cluster={"CPU": 8.0, "GPU": 1.0}, nodes=[{"CPU": 8.0, "GPU": 1.0}])


def test_check_resources_with_custom_resources() -> None:
    from brainalign._ray import check_resources

    nodes = [{"CPU": 1.0, "head": 1.0}, {"CPU": 2.0, "node_b": 2.0}]
    cluster = {"CPU": 3.0, "head": 1.0, "node_b": 2.0}
    check_resources(num_workers=2, cpus_per_worker=1.0, use_gpu=False, custom_per_worker={"node_b": 1.0},
                    cluster=cluster, nodes=nodes)
    with pytest.raises(BrainalignError, match=r"custom resource 'gpu_a100': 1 worker\(s\) x 1 = 1, but the cluster "
                                              r"has 0 .*ray start --resources"):
        check_resources(num_workers=1, cpus_per_worker=1.0, use_gpu=False, custom_per_worker={"gpu_a100": 1.0},
                        cluster=cluster, nodes=nodes)
    with pytest.raises(BrainalignError, match=r"no node has 1 CPUs and \{'head': 1.0, 'node_b': 1.0\} together"):
        check_resources(num_workers=1, cpus_per_worker=1.0, use_gpu=False,
                        custom_per_worker={"head": 1.0, "node_b": 1.0}, cluster=cluster, nodes=nodes)


def test_joining_a_loopback_address_keeps_it() -> None:
    """``ray.init(address="127.0.0.1:PORT")`` would swap 127.0.0.1 for the network address while
    multi-node support is on; brainalign turns it off for the call only, and only for loopback."""
    from ray._private import ray_constants, services

    from brainalign._ray import _joining, _loopback_address

    assert _loopback_address("127.0.0.1:6379") and _loopback_address("localhost:1") and _loopback_address("[::1]:1")
    assert not _loopback_address("10.0.0.5:6379") and not _loopback_address("head.svc:6379")
    before = ray_constants.ENABLE_RAY_CLUSTER
    with _joining("127.0.0.1:6379"):
        assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
    assert ray_constants.ENABLE_RAY_CLUSTER == before
    with _joining("10.0.0.5:6379"):
        assert ray_constants.ENABLE_RAY_CLUSTER == before


def test_check_resources_only_warns_on_an_autoscaling_cluster(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from brainalign._ray import check_resources

    monkeypatch.setenv("BRAINALIGN_AUTOSCALING", "1")
    check_resources(num_workers=8, cpus_per_worker=1.0, use_gpu=False, cluster={"CPU": 4.0}, nodes=[{"CPU": 4.0}])
    assert "waiting for the autoscaler" in caplog.text


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RAY_ADDRESS": "127.0.0.1:9"}, r"cannot reach the Ray cluster at '127.0.0.1:9' \(RAY_ADDRESS\) after 2"),
        ({"RAY_TMPDIR": "/dev/null/ray"}, r"a local Ray did not start after 2 attempts .*make cluster-up"),
    ],
)
def test_a_ray_that_does_not_start_is_a_message_not_a_traceback(env: dict[str, str], match: str) -> None:
    import os

    code = "from brainalign._ray import ensure_ray\nensure_ray(attempts=2)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"RAY_ADDRESS": ""} | env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("brainalign._checks.BrainalignError:") and re.search(match, last), proc.stderr[-2000:]


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2)")
def test_a_two_worker_training_run_listens_on_loopback_only(ray_session: object, tiny_dataset: object) -> None:
    """Train workers too, including torch.distributed's rendezvous store, which torch binds to
    every interface unless it is handed a loopback socket (train/_torch_backend.py)."""
    import threading

    import psutil

    from brainalign import TrainConfig
    from brainalign.train.runner import RunSpec, run_training

    seen: set[tuple[str, str]] = set()
    stop = threading.Event()
    me = psutil.Process()

    def poll() -> None:
        while not stop.wait(0.3):
            try:
                pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
                seen.update(_listening(pids))
            except (psutil.Error, subprocess.SubprocessError):
                pass

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        cfg = TrainConfig.from_flat({"data.path": str(tiny_dataset), "data.image_table": "sim-clip:simulated",
                                     "epochs": 1, "batch_size": 16, "num_workers": 2, "experiment": "bind"})
        run_training(cfg, RunSpec(evaluate_test=False, save_checkpoint=False))
    finally:
        stop.set()
        t.join(timeout=10)
    assert any(name.startswith("ray::RayTrainWo") for _, name in seen), seen  # the poll saw the workers
    exposed = sorted((addr, name) for addr, name in seen if addr.rsplit(":", 1)[0] not in LOOPBACK)
    assert not exposed, f"listening beyond 127.0.0.1 during training: {exposed}"
