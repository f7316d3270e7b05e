"""Fault injection with real processes: a Train worker killed with SIGKILL mid-run.

The run must resume from its last checkpoint (not start over), stay one FINISHED MLflow run
with every epoch logged once, and end with the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle
from ray.train import UserCallback

from brainalign import TrainConfig
from brainalign.config import DataConfig

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

# the callback below runs in the Train controller, which cannot import this test module
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillWorkerAfter(UserCallback):  # type: ignore[misc]
    """Runs in the Train controller: records every epoch the workers report (one JSON line
    each in ``log_path``) and, once, SIGKILLs the run's RayTrainWorker processes right after
    the report of epoch ``epoch`` (whose checkpoint the controller has registered by then).

    Only workers of THIS test's Ray cluster can be hit: they are found among the children of
    the controller's own raylet.
    """

    def __init__(self, epoch: int, log_path: Path) -> None:
        self.epoch = epoch
        self.log_path = log_path
        self.killed = False

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        import psutil

        epoch = int(metrics[0]["epoch"])
        rec: dict[str, Any] = {"epoch": epoch, "checkpoint": checkpoint is not None}
        if epoch == self.epoch and not self.killed:
            raylet = psutil.Process(os.getpid()).parent()
            victims = [p for p in raylet.children() if "RayTrainWorker" in " ".join(p.cmdline())]
            for p in victims:
                os.kill(p.pid, signal.SIGKILL)
            self.killed = bool(victims)
            rec["killed_pids"] = [p.pid for p in victims]
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _cfg(root: Path, experiment: str, **kw: object) -> TrainConfig:
    data = DataConfig(path=str(root), subjects=("01",), image_table="sim-clip:simulated")
    base: dict[str, object] = dict(data=data, epochs=6, batch_size=32, lr=1e-3, seed=7, patience=100,
                                   experiment=experiment, run_name="ft")
    return TrainConfig(**(base | kw))  # type: ignore[arg-type]


def _history(run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    from brainalign import paths

    client = MlflowClient(paths.mlflow_tracking_uri())
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in ("train_loss", "val_loss", "val_top1", "lr", "epoch", "best_epoch")}


def test_killed_worker_resumes_from_checkpoint(ray_session: object, tiny_dataset: Path, tmp_path: Path) -> None:
    from brainalign import tracking
    from brainalign.train.runner import run_training

    epochs, kill_after = 6, 2
    events = tmp_path / "events.jsonl"
    killed = run_training(_cfg(tiny_dataset, "ft-killed"), callbacks=[KillWorkerAfter(kill_after, events)])
    reports = [json.loads(line) for line in events.read_text().splitlines()]
    log.info("reports seen by the controller: %s", reports)
    assert any(r.get("killed_pids") for r in reports), "no RayTrainWorker was killed"
    # resumed from the checkpoint of epoch 2, not started over: every epoch reported once,
    # each with a checkpoint (checkpoint_every=1)
    assert [r["epoch"] for r in reports] == list(range(epochs))
    assert all(r["checkpoint"] for r in reports)

    runs = tracking.find_runs("ft-killed", {})
    assert [(r.run_id, r.status) for r in runs] == [(killed.run_id, "FINISHED")]
    hist = _history(killed.run_id)
    for key, points in hist.items():
        assert [s for s, _ in points] == list(range(epochs)), key  # each epoch logged once

    clean = run_training(_cfg(tiny_dataset, "ft-clean"))
    ref = _history(clean.run_id)
    log.info("test metrics killed %s vs uninterrupted %s", killed.test, clean.test)
    for key in hist:
        assert [v for _, v in hist[key]] == pytest.approx([v for _, v in ref[key]], rel=1e-5, abs=1e-6), key
    assert killed.best_epoch == clean.best_epoch
    for key in ("test_top1", "test_top5"):
        assert killed.test[key] == pytest.approx(clean.test[key], abs=1e-6), key
    assert killed.val == pytest.approx(clean.val, rel=1e-5, abs=1e-6)
    # the selected (best-on-validation) weights the driver tested and logged are the same
    import torch
    from mlflow.tracking import MlflowClient

    from brainalign import paths

    client = MlflowClient(paths.mlflow_tracking_uri())
    a, b = (torch.load(client.download_artifacts(r.run_id, "checkpoint/model.pt", str(tmp_path / r.run_id)),
                       weights_only=True) for r in (killed, clean))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
