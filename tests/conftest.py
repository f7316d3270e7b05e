"""Shared fixtures. One Ray start is shared by every integration test of the session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores (MLflow, Ray results, cache) go to the test's tmp dir, never the repo."""
    monkeypatch.setenv("BRAINALIGN_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BRAINALIGN_CACHE", raising=False)
    monkeypatch.delenv("BRAINALIGN_RAY_STORAGE", raising=False)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """A real local Ray (with dashboard, 4 logical CPUs), started once per test session.

    4 logical CPUs on a 2-core machine leave a whole CPU free for Ray Data next to a Tune
    trial and a Train worker (see docs/operations.md).
    """
    import ray

    from brainalign._ray import ensure_ray

    # The platform's own start-up (brainalign._ray: 127.0.0.1 only, dashboard, retried) with
    # address="local": always a fresh in-process cluster, never one that `ray start` (the job
    # tests, a user's `make cluster-up`) left registered in /tmp/ray.
    ensure_ray(num_cpus=4, address="local")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny simulated dataset in the contract, written once per session."""
    from brainalign.data.simulate import simulate_dataset

    out = tmp_path_factory.mktemp("data") / "sim-tiny"
    simulate_dataset(out, preset="tiny", seed=0)
    return out
