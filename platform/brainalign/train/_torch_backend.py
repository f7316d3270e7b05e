"""Ray Train's torch backend with its rendezvous store bound to 127.0.0.1 (local Ray only).

Ray Train sets up a ``torch.distributed`` process group in every run, even with one worker.
Its rendezvous goes through a c10d ``TCPStore`` that rank 0 hosts, and torch binds that
store to *every* interface (``*:<port>``): the one socket of a brainalign run that would
listen beyond 127.0.0.1. Torch accepts an already-listening socket (``master_listen_fd``)
and, with ``TORCHELASTIC_USE_AGENT_STORE``, lets every rank connect to a store it did not
start. :class:`LoopbackTorchConfig` uses both: rank 0 opens the store on a socket bound to
127.0.0.1 and every rank (all on this one machine) joins it; the process group itself
(gloo) then also talks over 127.0.0.1.

Used only when the Ray this process joined is a local, loopback-bound one
(:func:`brainalign._ray.ensure_ray` without ``RAY_ADDRESS``); on a real cluster the workers
live on other machines and Ray's own backend is used.

This reuses private helpers of ``ray.train.torch.config`` (Ray is pinned; tests/test_ray.py
fails if they change).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ray.train.torch.config import (
    TorchConfig,
    _set_torch_distributed_env_vars,
    _setup_torch_process_group,
    _TorchBackend,
)

__all__ = ["LoopbackTorchConfig"]

_STORE: Any = None  # rank 0's store, alive as long as its worker process


def _start_loopback_store(world_size: int, timeout_s: int) -> int:
    """On rank 0: a c10d TCPStore daemon listening on 127.0.0.1 only; returns its port."""
    global _STORE
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(max(128, world_size))
    port = int(sock.getsockname()[1])
    _STORE = dist.TCPStore("127.0.0.1", port, world_size=world_size, is_master=True,
                           timeout=timedelta(seconds=timeout_s), wait_for_workers=False, multi_tenant=True,
                           master_listen_fd=sock.detach())
    return port


def _join_loopback_store(port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # env:// rendezvous then connects to MASTER_ADDR:MASTER_PORT instead of starting its own store
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"


def _stop_loopback_store() -> None:
    global _STORE
    _STORE = None


class _LoopbackTorchBackend(_TorchBackend):  # type: ignore[misc]
    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        import ray

        n = len(worker_group)
        backend = backend_config.backend or "gloo"
        port = worker_group.execute_single(0, _start_loopback_store, world_size=n, timeout_s=backend_config.timeout_s)
        worker_group.execute(_join_loopback_store, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend, world_rank=i,
                                              world_size=n, init_method="env://", timeout_s=backend_config.timeout_s)
            for i in range(n)
        ])

    def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
        super().on_shutdown(worker_group, backend_config)
        try:
            worker_group.execute_single(0, _stop_loopback_store)
        except Exception:  # the worker may already be gone; its store goes with it
            pass


@dataclass
class LoopbackTorchConfig(TorchConfig):  # type: ignore[misc]
    """``TorchConfig`` whose rendezvous store listens on 127.0.0.1 (single-machine Ray only)."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackTorchBackend
