"""Ray Train adapter: the code that runs in every Train worker. Thin on purpose.

It takes the run's :class:`~brainalign.train.spec.WorkerSpec`, feeds ``train_one_epoch``
from the worker's Ray Data shard, evaluates on the (unsplit, repetition-averaged)
validation set, logs each epoch to MLflow from rank 0 (with the node's system metrics) and
reports to Ray Train (a barrier every rank calls). The best weights by the VALIDATION
selection metric are attached as a checkpoint to the last report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .loop import EarlyStopping, NonFiniteError, build_run, evaluate, train_one_epoch
from .spec import WorkerSpec

__all__ = ["train_loop_per_worker"]


def _collect(shard: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ii, ss = [], [], []
    for b in shard.iter_torch_batches(batch_size=1024):
        xs.append(b["epoch"])
        ii.append(b["image_index"])
        ss.append(b["subject_index"])
    return torch.cat(xs), torch.cat(ii), torch.cat(ss)


def _shuffled_batches(
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Full batches of a seeded permutation (drop_last: batch composition is the negatives)."""
    x, ii, ss = data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield {"epoch": x[idx], "image_index": ii[idx], "subject_index": ss[idx]}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Train worker: ``config = {"spec": WorkerSpec}`` (the only key)."""
    import ray.train
    import ray.train.torch

    from .. import tracking

    spec: WorkerSpec = config["spec"]
    cfg = spec.config
    torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    emb = torch.from_numpy(np.load(spec.emb_path))
    run = build_run(cfg, n_chans=spec.n_chans, n_times=spec.n_times, image_emb=emb, device=device)
    if ctx.get_world_size() > 1:
        run.model = ray.train.torch.prepare_model(run.model)
    train = ray.train.get_dataset_shard("train")
    vx, vi, vs = _collect(ray.train.get_dataset_shard("val"))
    stopper = EarlyStopping(cfg.select_metric, cfg.patience)
    track = rank == 0 and bool(spec.mlflow_run_id)
    buffer = max(4 * cfg.batch_size, min(spec.n_train_rows, 20_000))
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    monitor = tracking.system_metrics(spec.mlflow_run_id, uri=spec.tracking_uri) if track else nullcontext()
    with monitor:
        for epoch in range(cfg.epochs):
            shuffle_seed = cfg.seed * 10_000 + epoch + 1_000_000 * rank
            if spec.cache_shard:
                # small shard: one pass through Ray Data, then a full in-memory shuffle per epoch
                # (the streaming path below re-starts a Ray Data executor every epoch: seconds)
                if cached is None:
                    cached = _collect(train)
                batches = _shuffled_batches(cached, cfg.batch_size, shuffle_seed)
            else:
                batches = train.iter_torch_batches(
                    batch_size=cfg.batch_size,
                    drop_last=True,  # batch composition is the negatives: keep batches full
                    local_shuffle_buffer_size=buffer,
                    local_shuffle_seed=shuffle_seed,
                )
            metrics = train_one_epoch(run, batches)
            metrics |= evaluate(run, vx, vi, vs)
            if not math.isfinite(metrics["val_loss"]):  # finite weights, NaN on validation data: never select it
                raise NonFiniteError(
                    f"the validation loss is {metrics['val_loss']} at epoch {epoch} (lr {metrics['lr']:.3g}, "
                    f"temperature {metrics['temperature']:.3g}): the model produces NaN/Inf on the validation "
                    "epochs. Check them (`brainalign data validate`) or lower the learning rate. The run is "
                    "marked FAILED."
                )
            stopper.update(run, metrics)
            metrics |= {"epoch": epoch, "best_epoch": stopper.best_epoch, "val_top1_best": stopper.best_top1}
            last = epoch == cfg.epochs - 1 or stopper.should_stop
            if track:
                tracking.log_metrics(spec.mlflow_run_id, metrics, step=epoch, uri=spec.tracking_uri)
            if last and spec.save_checkpoint and rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    torch.save(stopper.state_copy(), os.path.join(d, "model.pt"))
                    Path(d, "best.json").write_text(json.dumps(
                        {"best_epoch": stopper.best_epoch, "metric": cfg.select_metric, "value": stopper.best}
                    ))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
            if last:
                break
