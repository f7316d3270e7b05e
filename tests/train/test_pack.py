"""Packed runs (several runs through one TorchTrainer) give what each run gives alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign import BrainalignError, TrainConfig
from brainalign.config import DataConfig

pytestmark = pytest.mark.integration


def _cfg(root: Path, seed: int, **kw: object) -> TrainConfig:
    data = DataConfig(path=str(root), subjects=("01",), image_table="sim-clip:simulated")
    base: dict[str, object] = dict(data=data, epochs=3, batch_size=32, lr=1e-3, seed=seed, experiment="pack",
                                   run_name=f"s{seed}")
    return TrainConfig(**(base | kw))  # type: ignore[arg-type]


def test_packed_runs_equal_runs_trained_alone(ray_session: object, tiny_dataset: Path) -> None:
    """Two seeds trained one after the other in one worker group: each its own MLflow run
    with its own seed, checkpoint and metrics, equal to the same run trained alone."""
    import torch
    from mlflow.tracking import MlflowClient

    from brainalign import paths
    from brainalign.train.runner import RunSpec, run_pack, run_training

    cfgs = [_cfg(tiny_dataset, 3), _cfg(tiny_dataset, 4)]
    packed = run_pack([(c, RunSpec()) for c in cfgs])
    alone = [run_training(c) for c in cfgs]
    client = MlflowClient(paths.mlflow_tracking_uri())
    assert len({r.run_id for r in packed + alone}) == 4
    for p, a, c in zip(packed, alone, cfgs, strict=True):
        assert p.test == a.test and p.test["test_n_way"] == 20
        assert p.val == a.val and p.best_epoch == a.best_epoch
        assert p.checkpoint is not None and a.checkpoint is not None and p.checkpoint.path != a.checkpoint.path
        wp, wa = p.best_weights(), a.best_weights()
        assert wp.keys() == wa.keys() and all(torch.equal(wp[k], wa[k]) for k in wp)
        run = client.get_run(p.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["seed"] == str(c.seed)
        curve_p = [h.value for h in client.get_metric_history(p.run_id, "val_loss")]
        curve_a = [h.value for h in client.get_metric_history(a.run_id, "val_loss")]
        assert len(curve_p) == c.epochs and curve_p == curve_a
        assert run.data.metrics["test_top1"] == a.test["test_top1"]
    # the two seeds really differ (a pack that trained one run twice would pass the above)
    w0, w1 = packed[0].best_weights(), packed[1].best_weights()
    assert packed[0].checkpoint_file != packed[1].checkpoint_file  # one checkpoint holds both runs' weights
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert packed[0].timings["pack_size"] == 2 and "train_startup_s" in packed[0].timings


def test_pack_refuses_mixed_resources(tiny_dataset: Path) -> None:
    from brainalign.train.runner import RunSpec, run_pack

    with pytest.raises(BrainalignError, match="cannot share a worker group"):
        run_pack([(_cfg(tiny_dataset, 1), RunSpec()), (_cfg(tiny_dataset, 2, cpus_per_worker=0.5), RunSpec())])
    with pytest.raises(BrainalignError, match="got no runs"):
        run_pack([])
