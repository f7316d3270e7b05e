"""Ray Train adapter: the code that runs in every Train worker. Thin on purpose.

It takes the run's :class:`~brainalign.train.spec.WorkerSpec`, feeds ``train_one_epoch``
from the worker's Ray Data shard, evaluates on the (unsplit, repetition-averaged)
validation set, logs each epoch to MLflow from rank 0 (with the node's system metrics) and
reports to Ray Train (a barrier every rank calls). The best weights
by the VALIDATION selection metric are attached as a checkpoint to the last report.

Memory is bounded in bytes, not in subjects: a training shard is held whole only when the
driver found the split small (``cache_shard``), else it streams through a local shuffle buffer
of about ``shuffle_buffer_mb``; the validation rows are held only when small
(``cache_val``), else each epoch streams them in chunks and keeps only their embeddings.
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

from ..config import TrainConfig
from .loop import (
    EarlyStopping,
    NonFiniteError,
    build_run,
    encode_batches,
    evaluate,
    evaluate_embeddings,
    train_one_epoch,
)
from .spec import WorkerSpec

__all__ = ["shuffle_buffer_rows", "train_loop_per_worker"]

VAL_CHUNK = 512  # validation rows per streamed chunk (loop.encode's chunk: same batches)


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


def shuffle_buffer_rows(cfg: TrainConfig, row_bytes: int, n_train_rows: int, local_batch: int) -> int:
    """``local_shuffle_buffer_size`` for Ray Data: a quarter of ``shuffle_buffer_mb`` in rows.

    Ray's buffer yields batches once it holds this many rows, refills to 1.5 times it before
    each re-shuffle and copies the rows while re-shuffling, so its private memory peaks at about
    3.5 times this size (plus up to two Ray Data blocks): a quarter keeps the buffer near
    ``shuffle_buffer_mb``. At least 4 batches; all rows when the shard is smaller.
    """
    cap = int(cfg.shuffle_buffer_mb * 2**20 / 4) // max(1, row_bytes)
    return max(4 * local_batch, min(n_train_rows, cap))


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
    val = ray.train.get_dataset_shard("val")
    val_rows = _collect(val) if spec.cache_val else None
    stopper = EarlyStopping(cfg.select_metric, cfg.patience)
    track = rank == 0 and bool(spec.mlflow_run_id)
    # batch_size is the global batch (the loss gathers every worker's rows): each worker draws
    # its share per step; TrainConfig refuses a batch_size that num_workers does not divide
    local_batch = cfg.batch_size // ctx.get_world_size()
    buffer = shuffle_buffer_rows(cfg, 4 * spec.n_chans * spec.n_times, spec.n_train_rows, local_batch)
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
                batches = _shuffled_batches(cached, local_batch, shuffle_seed)
            else:
                batches = train.iter_torch_batches(
                    batch_size=local_batch,
                    drop_last=True,  # batch composition is the negatives: keep batches full
                    local_shuffle_buffer_size=buffer,
                    local_shuffle_seed=shuffle_seed,
                )
            metrics = train_one_epoch(run, batches)
            if val_rows is not None:
                metrics |= evaluate(run, *val_rows)
            else:  # stream: only the embeddings (N x D) stay in memory
                metrics |= evaluate_embeddings(
                    run, *encode_batches(run, val.iter_torch_batches(batch_size=VAL_CHUNK))
                )
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
