"""End to end through the real things: Parquet -> Ray Data -> Ray Train -> test -> MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brainalign import BrainalignError, TrainConfig
from brainalign.config import DataConfig

pytestmark = pytest.mark.integration


def _cfg(root: Path, **kw: object) -> TrainConfig:
    data = DataConfig(path=str(root), subjects=("01",), image_table="sim-clip:simulated")
    base: dict[str, object] = dict(data=data, epochs=2, batch_size=32, lr=1e-3, seed=7, experiment="it")
    return TrainConfig(**(base | kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clear_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with a quarter of its noise: 120 training images are enough to learn
    from (at the tiny preset's own noise level NICE needs far more images than that)."""
    from brainalign.data.simulate import simulate_dataset

    out = tmp_path_factory.mktemp("clear") / "sim-tiny-clear"
    return simulate_dataset(out, preset="tiny", seed=0, overrides={"noise_pink": 0.5, "noise_white": 0.25},
                            progress=False)


def test_run_learns_and_lands_in_mlflow(ray_session: object, clear_dataset: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from brainalign import paths
    from brainalign.train.runner import run_training

    tiny_dataset = clear_dataset
    res = run_training(_cfg(tiny_dataset, epochs=30))
    n_way = int(res.test["test_n_way"])
    assert n_way == 20
    # well above chance (1/20 top-1) on held-out test images: in-process runs of this recipe
    # give 0.55-0.65 over seeds
    assert res.test["test_top1"] > 3 / n_way
    client = MlflowClient(paths.mlflow_tracking_uri())
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    for key in ("dataset", "data_source", "data_fingerprint", "subjects", "brain_encoder", "backbone",
                "alignment", "seed", "git_commit", "config_hash", "role"):
        assert tags.get(key), key
    assert (tags["brain_encoder"], tags["backbone"], tags["alignment"], tags["seed"]) == ("nice", "sim-clip",
                                                                                        "simulated", "7")
    assert tags["data_source"] == "simulated"
    assert run.data.params["lr"] == "0.001" and run.data.params["data.subjects"] == "01"
    for m in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "temperature"):
        hist = client.get_metric_history(res.run_id, m)
        assert [h.step for h in hist] == list(range(30)), m
    assert run.data.metrics["test_top1"] == pytest.approx(res.test["test_top1"])
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"checkpoint", "config", "retrieval"} <= arts
    ckpt = Path(client.download_artifacts(res.run_id, "checkpoint/model.pt", str(tmp_path)))
    import torch

    state = torch.load(ckpt, weights_only=True)
    assert any(k.startswith("repr_layer") for k in state)
    rankings = Path(client.download_artifacts(res.run_id, "retrieval/test_rankings.csv", str(tmp_path)))
    lines = rankings.read_text().splitlines()
    assert lines[0] == "subject,image_id,rank,top5,top5_scores" and len(lines) == 1 + n_way
    for row in lines[1:]:  # the listed top 5 agrees with the rank
        _sub, image_id, rank, top5, _scores = row.split(",")
        assert (int(rank) <= 5) == (image_id in top5.split(";")), row
    mean_rank = sum(int(r.split(",")[2]) for r in lines[1:]) / n_way
    assert mean_rank < 0.8 * (n_way + 1) / 2  # chance mean rank is (n+1)/2
    conf = json.loads(Path(client.download_artifacts(res.run_id, "config/resolved_config.json",
                                                     str(tmp_path))).read_text())
    assert conf["data.path"] == str(tiny_dataset)
    # artifacts live under the absolute store root, not in some process's working directory
    assert run.info.artifact_uri.startswith((paths.home() / "mlruns").as_uri())


def test_bad_inputs_fail_before_any_compute(tiny_dataset: Path, tmp_path: Path) -> None:
    from brainalign.train.runner import run_training

    with pytest.raises(BrainalignError, match="does not exist"):
        run_training(_cfg(tmp_path / "missing"))
    with pytest.raises(BrainalignError, match=r"data.subjects \['09'\] not in dataset"):
        run_training(_cfg(tiny_dataset, data=DataConfig(path=str(tiny_dataset), subjects=("09",),
                                                         image_table="sim-clip:simulated")))
    with pytest.raises(BrainalignError, match="Did you mean 'sim-clip:simulated'"):
        run_training(_cfg(tiny_dataset, data=DataConfig(path=str(tiny_dataset), image_table="sim-clip:simulatd")))
    # an encoder that cannot take the dataset's epochs (an fMRI MLP on EEG) fails at the check
    with pytest.raises(BrainalignError, match="cannot take the epochs"):
        run_training(_cfg(tiny_dataset, encoder="mlp"))
    # nothing was tracked or prepared for these
    assert not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "cache" / "prepared").exists()


def test_broken_dataset_stops_before_training(tiny_dataset: Path, tmp_path: Path) -> None:
    """NaN epochs and a test image inside a training file: every problem named, nothing trained."""
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from brainalign.data.contract import open_dataset
    from brainalign.train.runner import run_training

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    ds = open_dataset(broken)
    test_id = ds.image_ids("test")[0]
    part = sorted(ds.epoch_dir("01", "train").glob("part-*.parquet"))[0]
    tbl = pq.read_table(part)
    x = tbl.column("epoch").combine_chunks().to_numpy_ndarray().copy()
    x[0, 0, 0] = np.nan
    ids = tbl.column("image_id").to_pylist()
    ids[1] = test_id
    tbl = tbl.set_column(tbl.schema.get_field_index("epoch"), "epoch", pa.FixedShapeTensorArray.from_numpy_ndarray(x))
    tbl = tbl.set_column(tbl.schema.get_field_index("image_id"), "image_id", pa.array(ids))
    pq.write_table(tbl, part)
    with pytest.raises(BrainalignError, match="breaks the data contract") as err:
        run_training(_cfg(broken))
    msg = str(err.value)
    assert "NaN or Inf" in msg and "another split" in msg and part.name in msg
    assert not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "cache" / "prepared").exists()


def test_same_seed_same_metrics_through_ray(
    ray_session: object, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from brainalign import paths
    from brainalign.train.runner import RunSpec, run_training

    # the streaming path (the small-data in-memory path is the other test's)
    monkeypatch.setenv("BRAINALIGN_INLINE_MB", "0")
    cfg = _cfg(tiny_dataset, epochs=2, seed=11)
    a = run_training(cfg, RunSpec(evaluate_test=False, save_checkpoint=False))
    b = run_training(cfg, RunSpec(evaluate_test=False, save_checkpoint=False))
    client = MlflowClient(paths.mlflow_tracking_uri())

    def curve(run_id: str, key: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run_id, key)]

    for key in ("train_loss", "val_loss", "val_top1"):
        assert curve(a.run_id, key) == curve(b.run_id, key) and len(curve(a.run_id, key)) == 2, key
    # no test metric exists on runs trained without evaluate_test
    assert not [k for k in client.get_run(a.run_id).data.metrics if k.startswith("test")]


def test_a_subject_aware_zoo_encoder_trains_through_ray(ray_session: object, tiny_dataset: Path) -> None:
    """ATM-S (subject tokens) through the same runner: two training subjects, each tested."""
    from mlflow.tracking import MlflowClient

    from brainalign import paths
    from brainalign.train.runner import run_training

    data = DataConfig(path=str(tiny_dataset), subjects=("01", "02"), image_table="sim-clip:simulated")
    cfg = _cfg(tiny_dataset, data=data, encoder="atms", epochs=2,
               arch={"d_model": 80, "n_heads": 2, "d_ff": 32, "n_filters": 8})
    res = run_training(cfg)
    assert {"test_top1_sub-01", "test_top1_sub-02"} <= set(res.test)
    run = MlflowClient(paths.mlflow_tracking_uri()).get_run(res.run_id)
    assert run.data.tags["brain_encoder"] == "atms" and run.data.params["arch.d_model"] == "80"
    assert run.data.metrics["train_loss"] > 0 and res.best_epoch in (0, 1)
