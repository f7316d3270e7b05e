"""The one place brainalign starts or joins Ray, checks what it has and watches what it waits for.

* :func:`ensure_ray`: join ``RAY_ADDRESS`` when it is set, else start a fresh, private
  local instance bound to 127.0.0.1 (dashboard included: Ray Train's clean-up of stopped
  runs needs it; at least 4 logical CPUs so a Tune trial, a Train worker and Ray Data fit
  together on a 2-core machine). A slow start is retried; a start that keeps failing ends
  in a :class:`~brainalign.BrainalignError` that says what to do, not a Ray traceback.
* :func:`check_resources`: a run's request (``num_workers x cpus_per_worker``, GPUs)
  against what the cluster really has (``ray.cluster_resources()`` / ``ray.nodes()``, which
  also work for a remote ``RAY_ADDRESS``), before any compute: Ray would otherwise wait
  forever, silently.
* :func:`watch_resource_wait`: while a block runs (e.g. ``TorchTrainer.fit()``), log what
  Ray is waiting for (pending placement groups and their bundles, free vs total resources)
  whenever a wait lasts longer than a minute.

Binding to 127.0.0.1: Ray resolves a node IP of ``127.0.0.1`` to the machine's
network address unless "clusters" are disabled for the process
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by ``ray._private.services``). For the
start of a *local* instance both that variable and ``ray_constants.ENABLE_RAY_CLUSTER``
are set, so the GCS, the raylet, every worker, the dashboard and its agents listen on
127.0.0.1 only (tests/test_ray_binding.py checks every listening socket with ``ss``).
Multi-node use goes through ``RAY_ADDRESS`` and a cluster started for it (docs/cluster.md).
Joining a ``RAY_ADDRESS`` on 127.0.0.1 (``make cluster-up``, tests/test_two_node.py) keeps
that address instead of the network address, where such a head does not listen.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ._checks import BrainalignError

__all__ = [
    "LOCAL_HOST",
    "MIN_LOCAL_CPUS",
    "check_resources",
    "check_tracking_for_cluster",
    "ensure_ray",
    "loopback_only",
    "multi_node",
    "watch_resource_wait",
]

log = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
#: Logical CPUs of a local instance at least (2-core machines deadlock Ray Data with fewer).
MIN_LOCAL_CPUS = 4
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOCAL_HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Make Ray keep ``_node_ip_address="127.0.0.1"`` instead of resolving it to the network
    address (for the start of a local instance only; the daemons inherit the variable).

    Also fix the new instance's GCS port and give its daemons (hence every Ray worker process)
    ``RAY_ADDRESS`` pointing at it. Ray's State API, called without an address inside workers
    (Train V2's ``PlacementGroupCleaner`` asks it whether a controller is alive), otherwise
    scans the machine for GCS processes and fails with "Found multiple active Ray instances"
    when another local Ray runs (other users, tests, benchmarks): the cleaner's thread dies, the
    placement groups of trials ASHA stopped are never freed and a study waits forever for CPUs.
    The driver's own environment is restored afterwards.
    """
    from ray._private import ray_constants

    port = _free_port()
    saved = {k: os.environ.get(k) for k in (_CLUSTER_ENV, "RAY_ADDRESS", ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE)}
    before = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_ENV] = "0"
    os.environ[ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE] = str(port)
    os.environ["RAY_ADDRESS"] = f"{LOCAL_HOST}:{port}"  # for the daemons; ray.init gets address="local"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _loopback_address(address: str) -> bool:
    """Whether ``address`` (``host:port``) names this machine's loopback interface."""
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    return host in (LOCAL_HOST, "localhost", "::1")


@contextlib.contextmanager
def _joining(address: str) -> Iterator[None]:
    """Join a cluster whose GCS listens on 127.0.0.1 (``make cluster-up``, the 2-node test) as
    that address, not as the machine's network address.

    ``ray.init(address="127.0.0.1:PORT")`` swaps a loopback host for the machine's network
    address (``services.resolve_ip_for_localhost``) while multi-node support is on, then
    waits minutes for a GCS that only listens on 127.0.0.1. Turning it off for the call keeps
    the address and gives this driver the node IP 127.0.0.1 (it then attaches to a raylet on
    127.0.0.1, the head first). Other addresses are joined unchanged.
    """
    if not _loopback_address(address):
        yield
        return
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by ray._private.services at call time
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def ensure_ray(num_cpus: int | None = None, *, address: str | None = None, attempts: int = 3) -> None:
    """Start or join Ray once per process; a no-op when Ray is already initialized.

    Parameters
    ----------
    num_cpus : int, optional
        Logical CPUs of a local instance (default ``max(4, os.cpu_count())``); ignored when
        joining a cluster.
    address : str, optional
        ``"local"`` forces a fresh local instance; another value is a cluster to join.
        Default: ``$RAY_ADDRESS`` when set, else a local instance.
    attempts : int
        Tries before giving up (a busy machine can miss Ray's start-up timeouts).

    Raises
    ------
    BrainalignError
        Ray did not start (or the cluster could not be reached) after ``attempts`` tries;
        the message says what was tried and what to do.
    """
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    local = target == "local"
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            if local:
                with _loopback_only():
                    ray.init(
                        address="local",  # a new instance, never a stray cluster registered in /tmp/ray
                        num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1),
                        include_dashboard=True,  # required: Train V2 cleans up stopped runs through it
                        dashboard_host=LOCAL_HOST,
                        _node_ip_address=LOCAL_HOST,
                        configure_logging=False,
                        log_to_driver=False,
                    )
            else:
                _probe(target)  # seconds, not Ray's minutes-long GCS timeout, for a wrong address
                with _joining(target):
                    ray.init(address=target, configure_logging=False)
            if attempt > 1:
                log.info("Ray started on attempt %d", attempt)
            return
        except Exception as e:  # Ray raises plain Exception/ConnectionError/TimeoutError/OSError here
            last = e
            with contextlib.suppress(Exception):
                ray.shutdown()
            if attempt < attempts:
                log.warning("Ray %s failed (%s: %s); retrying (%d/%d)", "start" if local else "connection",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "", attempt + 1, attempts)
                time.sleep(5.0 * attempt)
    first = str(last).splitlines()[0] if last is not None and str(last) else type(last).__name__
    if local:
        raise BrainalignError(
            f"a local Ray did not start after {attempts} attempts (last error: {first}). The machine may be "
            "overloaded, out of memory or out of /tmp space: retry when it is quieter, or start a cluster once "
            "(`make cluster-up`, docs/cluster.md) and point RAY_ADDRESS at it."
        ) from last
    raise BrainalignError(
        f"cannot reach the Ray cluster at {target!r} (RAY_ADDRESS) after {attempts} attempts (last error: "
        f"{first}). Check that the cluster is up (`ray status --address {target}`) and the address, or unset "
        "RAY_ADDRESS to use a private local Ray."
    ) from last


def multi_node() -> bool:
    """Whether the Ray cluster this process joined has more than one live node."""
    import ray

    return bool(ray.is_initialized()) and sum(bool(n.get("Alive")) for n in ray.nodes()) > 1


def check_tracking_for_cluster(uri: str) -> None:
    """Refuse a node-local MLflow store (``sqlite:``, ``file:``, a path) on a multi-node cluster.

    Train workers and Tune trials log to MLflow from whichever node they run on; a SQLite
    file exists on one disk only (and SQLite over NFS locks unreliably).

    Raises
    ------
    BrainalignError
        Ray has more than one node and ``uri`` names a local file store.
    """
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    if local and multi_node():
        raise BrainalignError(
            f"MLFLOW_TRACKING_URI is {uri!r}, a store on this machine's disk, but this Ray cluster has more than "
            "one node: runs on the other nodes cannot log to it. Use a tracking server every node reaches: "
            "`make cluster-up` starts one (scripts/cluster_up.sh, MLFLOW_PORT, default 5000; bind it to an "
            "address the nodes reach) and writes MLFLOW_TRACKING_URI=http://<host>:<port> to .cluster/env.sh. "
            "See docs/cluster.md, \"Storage on more than one node\"."
        )


def loopback_only() -> bool:
    """Whether this process's Ray node is bound to 127.0.0.1 (a single-machine Ray started by
    :func:`ensure_ray` or ``make cluster-up``): then every Train worker is on this machine."""
    import ray

    return bool(ray.is_initialized()) and ray.util.get_node_ip_address() == LOCAL_HOST


def _probe(address: str, timeout: float = 5.0) -> None:
    """Open a TCP connection to a ``host:port`` (GCS) address; other forms are left to Ray."""
    import socket

    if "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
        pass


def _nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def check_resources(
    *,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    gpus_per_worker: float = 1.0,
    custom_per_worker: Mapping[str, float] | None = None,
    what: str = "this run",
    cluster: Mapping[str, float] | None = None,
    nodes: list[Mapping[str, float]] | None = None,
) -> None:
    """Refuse a request the Ray cluster can never satisfy (Ray would wait forever, silently).

    Parameters
    ----------
    num_workers, cpus_per_worker, use_gpu
        The Train worker group: ``num_workers`` workers of ``cpus_per_worker`` CPUs (and
        ``gpus_per_worker`` GPUs each with ``use_gpu``).
    gpus_per_worker : float
        Each worker's GPU share with ``use_gpu`` (a fraction packs several workers on one GPU).
    custom_per_worker : mapping, optional
        Ray custom resources each worker requests too (``ray start --resources``); one node
        must hold a worker's CPUs and all of them.
    what : str
        For the message (``"train"``, ``"each trial"``).
    cluster, nodes : optional
        ``ray.cluster_resources()`` and the alive nodes' resources (default: asked from Ray,
        which must be initialized; both work for a remote ``RAY_ADDRESS``).

    Raises
    ------
    BrainalignError
        The cluster has fewer CPUs, GPUs or custom resources in all than requested, or no
        node can hold one worker. With ``BRAINALIGN_AUTOSCALING=1`` (a cluster that adds nodes on demand) this
        is only a warning.
    """
    import ray

    total = dict(cluster if cluster is not None else ray.cluster_resources())
    per_node = list(nodes if nodes is not None else _nodes())
    cpus, gpus = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    need_cpu = num_workers * cpus_per_worker
    problems = []
    if need_cpu > cpus + 1e-9:
        problems.append(
            f"{num_workers} worker(s) x {cpus_per_worker:g} CPU = {need_cpu:g} CPUs, but the cluster has "
            f"{cpus:g} CPUs in all"
        )
    elif per_node and not any(float(n.get("CPU", 0.0)) + 1e-9 >= cpus_per_worker for n in per_node):
        biggest = max(float(n.get("CPU", 0.0)) for n in per_node)
        problems.append(f"one worker needs {cpus_per_worker:g} CPUs on one node, the largest node has {biggest:g}")
    custom = dict(custom_per_worker or {})
    for name, amount in custom.items():
        have = float(total.get(name, 0.0))
        if num_workers * amount > have + 1e-9:
            problems.append(
                f"custom resource {name!r}: {num_workers} worker(s) x {amount:g} = {num_workers * amount:g}, but the "
                f"cluster has {have:g} (a node advertises it with `ray start --resources='{{\"{name}\": N}}'`)"
            )
    if custom and not problems and per_node and not any(
        float(n.get("CPU", 0.0)) + 1e-9 >= cpus_per_worker
        and all(float(n.get(k, 0.0)) + 1e-9 >= v for k, v in custom.items()) for n in per_node
    ):
        problems.append(f"no node has {cpus_per_worker:g} CPUs and {custom} together for one worker")
    if use_gpu and gpus + 1e-9 < num_workers * gpus_per_worker:
        problems.append(
            f"use_gpu=true needs {num_workers} worker(s) x {gpus_per_worker:g} GPU = {num_workers * gpus_per_worker:g}, "
            f"but the cluster has {gpus:g} GPU(s)"
            + (" (a CPU-only machine: set use_gpu=false)" if gpus == 0 else "")
        )
    if not problems:
        return
    msg = (
        f"{what} cannot be scheduled: {'; '.join(problems)}. Ray would wait for these resources forever. "
        "Lower num_workers / cpus_per_worker (or use_gpu=false, or the custom resources), or run on a cluster "
        "that has them (RAY_ADDRESS; a local Ray gets max(4, CPU count) logical CPUs)."
    )
    if os.environ.get("BRAINALIGN_AUTOSCALING", "0") == "1":
        log.warning("%s (BRAINALIGN_AUTOSCALING=1: waiting for the autoscaler)", msg)
        return
    raise BrainalignError(msg)


def _pending_groups() -> list[dict[str, Any]]:
    """Placement groups waiting for resources (from the GCS: no dashboard needed, any process)."""
    from ray.util.placement_group import placement_group_table

    return [pg for pg in placement_group_table().values() if pg.get("state") in ("PENDING", "RESCHEDULING")]


def _pending_demand(pending: list[dict[str, Any]]) -> str:
    """What Ray is waiting for, in words (pending placement groups, free vs total)."""
    import ray

    parts = []
    for pg in pending[:5]:
        bundles = [dict(b) for b in dict(pg.get("bundles", {})).values()]
        why = dict(pg.get("stats", {})).get("scheduling_state", "")
        parts.append(f"placement group {pg.get('name') or str(pg.get('placement_group_id', ''))[:8]} needs "
                     f"{bundles}" + (f" ({why})" if why else ""))
    if len(pending) > 5:
        parts.append(f"... and {len(pending) - 5} more pending placement groups")
    try:
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: round(v, 2) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        parts.append(f"free {free} of {total}")
    except Exception as e:
        parts.append(f"(resources unknown: {type(e).__name__})")
    return "; ".join(parts)


@contextlib.contextmanager
def watch_resource_wait(what: str, *, after_s: float = 60.0, poll_s: float = 10.0) -> Iterator[None]:
    """Log what Ray waits for while the block runs, once a wait has lasted ``after_s`` seconds.

    A watchdog thread polls the GCS's placement-group table every ``poll_s`` seconds (Train
    worker groups are placement groups; no dashboard needed, so it works in Tune trial
    processes and against a remote ``RAY_ADDRESS``). While some placement group stays pending
    for longer than ``after_s``, it logs a warning naming the pending bundles, Ray's
    scheduling state (e.g. infeasible) and the free vs total resources, repeated every
    ``after_s``; a block that runs without waiting logs nothing.

    Parameters
    ----------
    what : str
        What is running, for the message (e.g. ``"train run 3f2a..."``).
    after_s : float
        How long a wait may last before it is reported.
    poll_s : float
        Polling interval of the watchdog.
    """
    stop = threading.Event()

    def watch() -> None:
        waiting_since: float | None = None
        reported = 0.0
        while not stop.wait(poll_s):
            try:
                pending = _pending_groups()
            except Exception:
                pending = []
            now = time.monotonic()
            if not pending:
                waiting_since = None
                continue
            waiting_since = waiting_since or now
            waited = now - waiting_since
            if waited >= after_s and now - reported >= after_s:
                reported = now
                log.warning("%s has waited %d s for Ray resources: %s", what, math.floor(waited),
                            _pending_demand(pending))

    thread = threading.Thread(target=watch, name="brainalign-ray-wait-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=poll_s + 15)

