"""Ray Train adapter: the code that runs in every Train worker. Thin on purpose.

It takes the run's :class:`~brainalign.train.spec.WorkerSpec`, feeds ``train_one_epoch``
from the worker's Ray Data shard, evaluates on the (unsplit, repetition-averaged)
validation set, logs each epoch to MLflow from rank 0 (with the node's system metrics) and
reports to Ray Train (a barrier every rank calls).

Fault tolerance: every ``checkpoint_every`` epochs (and at the last) rank 0 attaches a
checkpoint of the run's full state to its report (:func:`write_checkpoint`: weights,
optimizer, AMP scaler, loss, epoch, early-stopping state with the best weights, and the best
weights by the VALIDATION selection metric as ``model.pt`` for the driver). When Ray Train
restarts a failed worker group (``FailureConfig(max_failures)``), each worker restores that
state from ``ray.train.get_checkpoint()`` and continues with the next epoch. The random
streams are a function of the epoch (:func:`epoch_seed`: the shuffle order and torch's
global RNG, e.g. dropout, are re-seeded at the start of every epoch), so a resumed run
trains exactly as the uninterrupted one would. Rank 0 asks MLflow which epochs the run
already holds and logs each epoch once.

Memory is bounded in bytes, not in subjects: a training shard is held whole only when the
driver found the split small (``cache_shard``), else it streams through a local shuffle buffer
of about ``shuffle_buffer_mb``; the validation rows are held only when small
(``cache_val``), else each epoch streams them in chunks and keeps only their embeddings.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import BrainalignError
from ..config import TrainConfig
from .loop import (
    EarlyStopping,
    NonFiniteError,
    Run,
    build_run,
    encode_batches,
    evaluate,
    evaluate_embeddings,
    train_one_epoch,
)
from .spec import WorkerSpec

__all__ = [
    "STATE_FILE",
    "epoch_seed",
    "load_checkpoint",
    "restore_state",
    "shuffle_buffer_rows",
    "training_state",
    "train_loop_per_worker",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

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


STATE_FILE = "state.pt"  # a checkpoint's full training state (model.pt: the best weights only)
STATE_VERSION = 1


def epoch_seed(cfg: TrainConfig, epoch: int, rank: int) -> int:
    """The seed of one worker's random streams in one epoch (shuffle order, dropout).

    A function of (seed, epoch, rank) only, so a run resumed at any epoch draws the same
    numbers as an uninterrupted run.
    """
    return cfg.seed * 10_000 + epoch + 1_000_000 * rank


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def training_state(run: Run, stopper: EarlyStopping) -> dict[str, Any]:
    """The full state of a run after its last finished epoch (tensors and plain values:
    ``torch.load(weights_only=True)`` reads it back)."""
    return {
        "version": STATE_VERSION,
        "epoch": run.epoch,  # epochs finished = the next epoch to train
        "model": _unwrapped(run.model).state_dict(),
        "loss": run.loss_fn.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else {},
        "stopper": stopper.state_dict(),
    }


def restore_state(run: Run, stopper: EarlyStopping, state: dict[str, Any]) -> None:
    """Put :func:`training_state`'s ``state`` back into ``run`` and ``stopper`` (call it
    before the model is wrapped for data-parallel training)."""
    if state.get("version") != STATE_VERSION:
        raise BrainalignError(
            f"the run's checkpoint has state version {state.get('version')!r}, this brainalign writes "
            f"{STATE_VERSION}: it was written by another version. Remove the run's Ray storage folder to start over."
        )
    _unwrapped(run.model).load_state_dict(state["model"])
    run.loss_fn.load_state_dict(state["loss"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    stopper.load_state_dict(state["stopper"])
    run.epoch = int(state["epoch"])


def write_checkpoint(folder: Path, run: Run, stopper: EarlyStopping) -> None:
    """A checkpoint folder: ``state.pt`` (to resume), ``model.pt`` and ``best.json`` (the
    best-on-validation weights and their epoch, what the driver tests and logs)."""
    torch.save(training_state(run, stopper), folder / STATE_FILE)
    torch.save(stopper.state_copy(), folder / "model.pt")
    (folder / "best.json").write_text(json.dumps(
        {"best_epoch": stopper.best_epoch, "metric": stopper.metric, "value": stopper.best}
    ))


def load_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """The training state in a Ray ``Checkpoint`` (read through ``as_directory``, so a
    checkpoint on a shared filesystem and one in object storage read the same way)."""
    with checkpoint.as_directory() as d:
        state: dict[str, Any] = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    return state


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Train worker: ``config = {"spec": WorkerSpec}`` (the only key)."""
    import ray
    import ray.train
    import ray.train.torch

    from .. import tracking

    spec: WorkerSpec = config["spec"]
    cfg = spec.config
    torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    emb = torch.from_numpy(np.array(ray.get(spec.embeddings)))  # object store (read-only): own copy
    run = build_run(cfg, n_chans=spec.n_chans, n_times=spec.n_times, image_emb=emb, device=device)
    stopper = EarlyStopping(cfg.select_metric, cfg.patience)
    track = rank == 0 and bool(spec.mlflow_run_id)
    logged: set[int] = set()  # epochs MLflow holds already (a resumed run logs each epoch once)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restore_state(run, stopper, load_checkpoint(checkpoint))
        if track:
            logged = tracking.logged_steps(spec.mlflow_run_id, "epoch", uri=spec.tracking_uri)
        log.info("rank %d resumes at epoch %d of %d (best epoch %d)", rank, run.epoch, cfg.epochs, stopper.best_epoch)
        if run.epoch >= cfg.epochs or stopper.should_stop:
            return  # the failure came after the last report: nothing left to train
    if ctx.get_world_size() > 1:
        run.model = ray.train.torch.prepare_model(run.model)
    train = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val")
    val_rows = _collect(val) if spec.cache_val else None
    # batch_size is the global batch (the loss gathers every worker's rows): each worker draws
    # its share per step; TrainConfig refuses a batch_size that num_workers does not divide
    local_batch = cfg.batch_size // ctx.get_world_size()
    buffer = shuffle_buffer_rows(cfg, 4 * spec.n_chans * spec.n_times, spec.n_train_rows, local_batch)
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    monitor = tracking.system_metrics(spec.mlflow_run_id, uri=spec.tracking_uri) if track else nullcontext()
    with monitor:
        for epoch in range(run.epoch, cfg.epochs):
            seed = epoch_seed(cfg, epoch, rank)
            torch.manual_seed(seed + 500_000)  # dropout & co: the same numbers whether resumed or not
            if spec.cache_shard:
                # small shard: one pass through Ray Data, then a full in-memory shuffle per epoch
                # (the streaming path below re-starts a Ray Data executor every epoch: seconds)
                if cached is None:
                    cached = _collect(train)
                batches = _shuffled_batches(cached, local_batch, seed)
            else:
                batches = train.iter_torch_batches(
                    batch_size=local_batch,
                    drop_last=True,  # batch composition is the negatives: keep batches full
                    local_shuffle_buffer_size=buffer,
                    local_shuffle_seed=seed,
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
            if track and epoch not in logged:
                tracking.log_metrics(spec.mlflow_run_id, metrics, step=epoch, uri=spec.tracking_uri)
            _report(metrics, run, stopper, save=rank == 0 and _checkpoint_due(cfg, epoch, last))
            if last:
                break


def _checkpoint_due(cfg: TrainConfig, epoch: int, last: bool) -> bool:
    """Checkpoint after every ``checkpoint_every``-th epoch and after the last one."""
    return last or (cfg.checkpoint_every > 0 and (epoch + 1) % cfg.checkpoint_every == 0)


def _report(metrics: dict[str, Any], run: Run, stopper: EarlyStopping, *, save: bool) -> None:
    """``ray.train.report`` (every rank calls it: a barrier), with a checkpoint when ``save``."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(Path(d), run, stopper)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
