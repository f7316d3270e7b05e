"""A node-local MLflow store is refused on a multi-node Ray cluster, before any run starts."""

from __future__ import annotations

import pytest

from brainalign import BrainalignError, _ray


@pytest.mark.parametrize("uri", ["sqlite:////home/u/mlruns/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns"])
def test_local_store_refused_on_more_than_one_node(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ray, "multi_node", lambda: True)
    with pytest.raises(BrainalignError, match=r"more than one node.*make cluster-up"):
        _ray.check_tracking_for_cluster(uri)


def test_server_accepted_on_many_nodes_and_sqlite_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ray, "multi_node", lambda: True)
    _ray.check_tracking_for_cluster("http://10.0.0.1:5000")
    monkeypatch.setattr(_ray, "multi_node", lambda: False)
    _ray.check_tracking_for_cluster("sqlite:////home/u/mlruns/mlflow.db")


def test_no_ray_is_one_node() -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is running in this session")
    assert _ray.multi_node() is False
