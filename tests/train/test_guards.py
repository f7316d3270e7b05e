"""A run never trains on nothing, never hangs silently and never scores after diverging (issue 11)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from brainalign import BrainalignError, TrainConfig
from brainalign.config import DataConfig


def _cfg(root: Path, **kw: object) -> TrainConfig:
    data = DataConfig(path=str(root), subjects=("01",), image_table="sim-clip:simulated",
                      **kw.pop("data_kw", {}))  # type: ignore[arg-type]
    base: dict[str, object] = dict(data=data, epochs=2, batch_size=32, lr=1e-3, seed=7, experiment="it")
    return TrainConfig(**(base | kw))  # type: ignore[arg-type]


def _no_run_created(home: Path) -> bool:
    return not (home / "mlruns" / "mlflow.db").exists()


# --------------------------------------------------------------------------- class 3: sizes (no Ray)
def test_a_batch_larger_than_the_training_rows_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    from brainalign.train.runner import run_training

    # the tiny preset: 120 training images, 12 for validation -> 108 averaged rows for one subject
    with pytest.raises(BrainalignError, match=r"batch_size 200 \(the global batch: 200 rows per worker and step\) is "
                                              r"larger than the training rows \(at most 108, 108 per worker of 1\)"
                                              r".*batch_size <= 108"):
        run_training(_cfg(tiny_dataset, batch_size=200))
    # the global batch of 128 is 64 rows per worker and step: more than a worker's 54 rows
    with pytest.raises(BrainalignError, match=r"batch_size 128 .* \(at most 108, 54 per worker of 2\)"):
        run_training(_cfg(tiny_dataset, batch_size=128, num_workers=2))
    assert _no_run_created(tmp_path) and not (tmp_path / "cache" / "prepared").exists()


@pytest.mark.parametrize(("fraction", "n_val"), [(0.005, 1), (0.03, 4)])
def test_a_validation_set_smaller_than_the_top_k_is_refused(
    tiny_dataset: Path, tmp_path: Path, fraction: float, n_val: int
) -> None:
    from brainalign.train.runner import run_training

    with pytest.raises(BrainalignError, match=rf"validation split has {n_val} image\(s\).*at least 5"):
        run_training(_cfg(tiny_dataset, data_kw={"val_fraction": fraction}))
    assert _no_run_created(tmp_path)


def test_an_unwritable_cache_is_a_message(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from brainalign.train.runner import run_training

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("BRAINALIGN_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(BrainalignError, match=r"the cache \(BRAINALIGN_CACHE.*is not writable"):
        run_training(_cfg(tiny_dataset))


# --------------------------------------------------------------------------- class 1: divergence (no Ray)
def test_the_loop_stops_at_the_first_non_finite_loss(tiny_dataset: Path) -> None:
    from brainalign.data.contract import open_dataset, read_embedding_table
    from brainalign.train.loop import NonFiniteError, build_run, train_one_epoch

    ds = open_dataset(tiny_dataset)
    ids, _r, x = ds.load_epochs("01", "train")
    pos = ds.image_index()
    emb = torch.from_numpy(read_embedding_table(tiny_dataset / "embeddings" / "sim-clip__simulated.parquet")
                           .lookup(ds.image_ids()))
    cfg = _cfg(tiny_dataset, lr=1e9)
    run = build_run(cfg, n_chans=x.shape[1], n_times=x.shape[2], image_emb=emb)
    xs, idx = torch.from_numpy(x), torch.tensor([pos[i] for i in ids])
    batches = [{"epoch": xs[s:s + 32], "image_index": idx[s:s + 32]} for s in range(0, len(xs) - 31, 32)]
    with pytest.raises(NonFiniteError, match=r"training diverged: .* at epoch 0, batch \d+ \(lr 1e\+09, "
                                             r"temperature 0.04.*learning rate too high") as e:
        for _ in range(3):
            train_one_epoch(run, batches)
    assert isinstance(e.value, BrainalignError)


def test_an_epoch_without_a_full_batch_is_an_error(tiny_dataset: Path) -> None:
    from brainalign.train.loop import build_run, train_one_epoch

    run = build_run(_cfg(tiny_dataset), n_chans=17, n_times=100, image_emb=torch.randn(140, 512))
    with pytest.raises(BrainalignError, match="trained on 0 samples"):
        train_one_epoch(run, [{"epoch": torch.randn(1, 17, 100), "image_index": torch.tensor([0])}])


# --------------------------------------------------------------------------- through Ray Train and MLflow
@pytest.mark.integration
def test_a_diverging_run_ends_failed_and_never_scores(ray_session: object, tiny_dataset: Path) -> None:
    from mlflow.tracking import MlflowClient

    from brainalign import paths
    from brainalign.train.loop import NonFiniteError
    from brainalign.train.runner import run_training

    with pytest.raises(NonFiniteError, match=r"training diverged.*epoch 0.*lr 1e\+09") as e:
        run_training(_cfg(tiny_dataset, lr=1e9, epochs=2))
    assert "Traceback" not in str(e.value)
    client = MlflowClient(paths.mlflow_tracking_uri())
    exp = client.get_experiment_by_name("it")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not any(k.startswith("test_") for k in runs[0].data.metrics)  # never tested, never scored


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"use_gpu": True}, r"use_gpu=true needs 1 worker\(s\) x 1 GPU = 1, but the cluster has 0 GPU\(s\).*CPU-only"),
        ({"num_workers": 8, "batch_size": 16}, r"8 worker\(s\) x 1 CPU = 8 CPUs, but the cluster has 4 CPUs"),
        ({"cpus_per_worker": 8.0}, r"8 CPUs, but the cluster has 4 CPUs"),
    ],
)
def test_requests_the_cluster_cannot_hold_are_refused_before_compute(
    ray_session: object, tiny_dataset: Path, tmp_path: Path, kw: dict[str, object], match: str
) -> None:
    from brainalign.train.runner import run_training

    with pytest.raises(BrainalignError, match=match):
        run_training(_cfg(tiny_dataset, **kw))
    assert _no_run_created(tmp_path)


@pytest.mark.integration
def test_a_long_wait_for_resources_is_logged(ray_session: object, caplog: pytest.LogCaptureFixture) -> None:
    import time

    from ray.util.placement_group import placement_group, remove_placement_group

    from brainalign._ray import watch_resource_wait

    pg = placement_group([{"CPU": 64}])  # more than the cluster has: stays PENDING
    try:
        with caplog.at_level(logging.WARNING, logger="brainalign._ray"):
            with watch_resource_wait("the test", after_s=1.0, poll_s=0.5):
                time.sleep(4.0)
    finally:
        remove_placement_group(pg)
    text = caplog.text
    assert "the test has waited" in text and "for Ray resources" in text
    assert "'CPU': 64" in text and "free {" in text
