"""GPU smoke test (marker ``gpu``): runs only where CUDA is present, e.g. on a lent GPU machine.

A quarter-GPU run of the tiny dataset through Ray Train with AMP finishes and scores finite test
metrics; its MLflow run records the GPU share.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from brainalign import TrainConfig
from brainalign.config import DataConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run it on a GPU machine)"),
]


def test_a_quarter_gpu_run_trains_and_scores(ray_session: object, tiny_dataset: Path) -> None:
    import ray

    from brainalign import tracking
    from brainalign.train.runner import run_training

    if float(ray.cluster_resources().get("GPU", 0.0)) < 0.25:  # type: ignore[no-untyped-call]
        pytest.skip("the test Ray instance has no GPU resource")
    data = DataConfig(path=str(tiny_dataset), subjects=("01",), image_table="sim-clip:simulated")
    cfg = TrainConfig(data=data, epochs=3, batch_size=32, lr=1e-3, seed=0, experiment="gpu", use_gpu=True,
                      gpus_per_worker=0.25, amp=True)
    res = run_training(cfg)
    assert math.isfinite(res.test["test_top1"]) and 0.0 <= res.test["test_top1"] <= 1.0
    run = tracking.get_run(res.run_id)
    assert run.status == "FINISHED" and float(run.params["gpus_per_worker"]) == 0.25
