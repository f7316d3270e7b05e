"""Cluster storage: a node-local MLflow store is refused on a multi-node Ray cluster, and a store or
dataset given as an object-storage URI is refused instead of becoming a local folder."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize("var", ["BRAINALIGN_RAY_STORAGE", "BRAINALIGN_CACHE", "BRAINALIGN_WEIGHTS"])
def test_object_storage_uri_is_refused_not_made_a_local_folder(var: str, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """``Path("s3://b/x")`` is the local folder ``s3:/b/x``: a store given as a URI is refused
    by name instead of silently landing under $BRAINALIGN_HOME."""
    from brainalign import paths

    monkeypatch.setenv(var, "s3://bucket/ray_results")
    with pytest.raises(BrainalignError, match=rf"{var} is the URI 's3://bucket/ray_results'.*not supported yet.*"
                                              "shared filesystem"):
        paths.Locations.current() if var != "BRAINALIGN_WEIGHTS" else paths.weights_dir()
    assert not (tmp_path / "s3:").exists()


def test_dataset_uri_is_refused_in_a_config_and_a_study(tmp_path: Path) -> None:
    from brainalign import TrainConfig
    from brainalign.studies import load_study

    with pytest.raises(BrainalignError, match=r"data.path is the URI 'gs://b/things'"):
        TrainConfig.from_flat({"data.path": "gs://b/things"}).resolved()
    root = tmp_path
    (root / "space.toml").write_text('encoder = "nice"\nmetric = "val_loss"\nmode = "min"\n[params]\n'
                                     'lr = { float = [1e-4, 1e-3], log = true }\n')
    (root / "s.toml").write_text(
        '[study]\nname = "s"\ndataset = "s3://bucket/data/sim-tiny"\nsubjects = ["01"]\n'
        'encoders = [{ name = "nice", searchspace = "space.toml" }]\n'
        'pairs = [{ backbone = "sim-clip", aligned = "simulated" }]\ntrials = 1\nmax_epochs = 2\n')
    with pytest.raises(BrainalignError, match=r"\[study\] dataset is the URI 's3://bucket/data/sim-tiny'"):
        load_study(root / "s.toml")
