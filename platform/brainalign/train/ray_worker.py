"""Ray Train adapter: the code that runs in every Train worker. Thin on purpose.

It takes the run's :class:`~brainalign.train.spec.WorkerSpec`, feeds ``train_one_epoch``
from the worker's Ray Data shard, evaluates on the (unsplit, repetition-averaged)
validation set, logs each epoch to MLflow from rank 0 (with the node's system metrics) and
reports to Ray Train (a barrier every rank calls). A worker group may train several runs one
after the other (a pack: ``{"specs": (WorkerSpec, ...)}``), each exactly as it would alone.

Fault tolerance: every ``checkpoint_every`` epochs (and at each run's last) rank 0 attaches a
checkpoint to its report (:func:`write_checkpoint`): the current run's full state (weights,
optimizer, AMP scaler, loss, epoch, early-stopping state with the best weights, its index in
the pack) and the best weights by the VALIDATION selection metric of the current run and of
every run of the pack already finished, with a summary of each (``best*.json``: what the
driver tests and logs). When Ray Train restarts a failed worker group
(``FailureConfig(max_failures)``), each worker restores that state from
``ray.train.get_checkpoint()``, skips the finished runs and continues with the next epoch.
The random streams are a function of the epoch (:func:`epoch_seed`: the shuffle order and
torch's global RNG, e.g. dropout, are re-seeded at the start of every epoch), so a resumed run
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
import time
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
    "dataset_names",
    "epoch_seed",
    "load_checkpoint",
    "restore_state",
    "run_files",
    "shuffle_buffer_rows",
    "train_loop_per_worker",
    "train_one_run",
    "training_state",
    "worker_share",
    "worker_specs",
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


def dataset_names(index: int, n_runs: int) -> tuple[str, str]:
    """Names of run ``index``'s train/val datasets in a Train run serving ``n_runs`` runs
    (``"train"``/``"val"`` for a lone run, ``"train-<i>"``/``"val-<i>"`` in a pack)."""
    return ("train", "val") if n_runs == 1 else (f"train-{index}", f"val-{index}")


def worker_specs(config: dict[str, Any]) -> tuple[WorkerSpec, ...]:
    """The runs this worker group trains: ``{"spec": WorkerSpec}`` (one run) or
    ``{"specs": (WorkerSpec, ...)}`` (a pack, trained one after the other)."""
    if "specs" in config:
        return tuple(config["specs"])
    return (config["spec"],)


STATE_FILE = "state.pt"  # a checkpoint's full training state of the current run
STATE_VERSION = 2


def run_files(index: int, n_runs: int) -> tuple[str, str]:
    """The files of run ``index``'s best weights and summary in a checkpoint of a Train run
    serving ``n_runs`` runs (``model.pt``/``best.json`` for a lone run)."""
    return ("model.pt", "best.json") if n_runs == 1 else (f"model-{index}.pt", f"best-{index}.json")


def epoch_seed(cfg: TrainConfig, epoch: int, rank: int) -> int:
    """The seed of one worker's random streams in one epoch (shuffle order, dropout).

    A function of (seed, epoch, rank) only, so a run resumed at any epoch draws the same
    numbers as an uninterrupted run.
    """
    return cfg.seed * 10_000 + epoch + 1_000_000 * rank


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def training_state(run: Run, stopper: EarlyStopping, pack_index: int = 0, done: bool = False) -> dict[str, Any]:
    """The full state of a run after its last finished epoch (tensors and plain values:
    ``torch.load(weights_only=True)`` reads it back); ``done``: the run has ended."""
    return {
        "version": STATE_VERSION,
        "pack_index": pack_index,
        "done": done,
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


#: a finished run of this pack: its best weights and its summary (``best*.json``)
Finished = tuple[dict[str, torch.Tensor], dict[str, Any]]


def _summary(stopper: EarlyStopping, report: dict[str, Any]) -> dict[str, Any]:
    return {"best_epoch": stopper.best_epoch, "metric": stopper.metric, "value": stopper.best,
            "report": {k: float(v) for k, v in report.items() if isinstance(v, (int, float))}}


def write_checkpoint(folder: Path, run: Run, stopper: EarlyStopping, report: dict[str, Any], *,
                     pack_index: int = 0, n_runs: int = 1, finished: dict[int, Finished] | None = None,
                     done: bool = False) -> None:
    """A checkpoint folder: ``state.pt`` (to resume the current run) and, for the current run
    and every finished run of the pack, its best-on-validation weights and summary
    (:func:`run_files`: what the driver tests and logs)."""
    torch.save(training_state(run, stopper, pack_index, done), folder / STATE_FILE)
    runs = dict(finished or {}) | {pack_index: (stopper.state_copy(), _summary(stopper, report))}
    for i, (weights, summary) in runs.items():
        model_file, summary_file = run_files(i, n_runs)
        torch.save(weights, folder / model_file)
        (folder / summary_file).write_text(json.dumps(summary))


def load_checkpoint(checkpoint: Any, n_runs: int = 1) -> tuple[dict[str, Any], dict[int, Finished]]:
    """The training state in a Ray ``Checkpoint`` and the pack's finished runs (read through
    ``as_directory``, so a checkpoint on a shared filesystem and one in object storage read the
    same way)."""
    with checkpoint.as_directory() as d:
        state: dict[str, Any] = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        finished: dict[int, Finished] = {}
        for i in range(int(state["pack_index"]) + bool(state.get("done"))):
            model_file, summary_file = run_files(i, n_runs)
            finished[i] = (torch.load(Path(d) / model_file, map_location="cpu", weights_only=True),
                           json.loads((Path(d) / summary_file).read_text()))
    return state, finished


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Train worker: ``config = {"spec": WorkerSpec}`` or ``{"specs": (WorkerSpec, ...)}``.

    A pack's runs are trained one after the other in this process, each exactly as it would
    be alone (:func:`train_one_run` seeds everything from its own config and reads its own
    datasets); the worker group, its process group and the imports are paid once. A restarted
    worker group resumes the run its latest checkpoint was written by and skips those before.
    """
    import ray.train

    t_worker = time.time()
    specs = worker_specs(config)
    n = len(specs)
    state: dict[str, Any] | None = None
    finished: dict[int, Finished] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, finished = load_checkpoint(checkpoint, n)
    # resume the run the checkpoint was written by, or the next one when that run had ended
    start = int(state["pack_index"]) + bool(state["done"]) if state is not None else 0
    for i in range(start, n):
        spec = specs[i]
        train_name, val_name = dataset_names(i, n)
        extra = {"t_worker_start": t_worker} | ({"pack_index": i} if n > 1 else {})
        # a split handed over through the object store has no Ray Data dataset
        train = None if spec.train_ref is not None else ray.train.get_dataset_shard(train_name)
        val = None if spec.val_ref is not None else ray.train.get_dataset_shard(val_name)
        train_one_run(spec, train, val, report_extra=extra, pack_index=i, n_runs=n, finished=finished,
                      resume=state if i == start else None)


def _rows_from_store(ref: Any, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A split put by the driver (``runner.put_split``) as tensors; with ``world_size > 1``
    this worker's equal share (every ``world_size``-th row from ``rank``, the remainder
    dropped so that every worker takes the same number of steps)."""
    import ray

    return worker_share(ray.get(ref), rank, world_size)


def worker_share(arrays: tuple[np.ndarray, ...], rank: int, world_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s rows of in-memory split arrays: every ``world_size``-th row from
    ``rank`` after dropping the remainder, so every worker holds the same number of rows (and
    takes the same number of steps: the loss gathers all workers' batches). Copies (the object
    store's arrays are read-only and must not stay pinned)."""
    n = len(arrays[0]) // world_size * world_size
    x, ii, ss = (torch.from_numpy(np.array(a[rank:n:world_size])) for a in arrays)
    return x, ii, ss


def train_one_run(spec: WorkerSpec, train: Any, val: Any, *, report_extra: dict[str, Any] | None = None,
                  pack_index: int = 0, n_runs: int = 1, finished: dict[int, Finished] | None = None,
                  resume: dict[str, Any] | None = None) -> None:
    """Train one run in this worker: its own model (seeded by its config), its shards, its
    MLflow run, its reports and its checkpoints.

    ``report_extra`` is added to every ``ray.train.report`` (not to MLflow): the pack index
    and wall-clock stamps (``t_worker_start``, ``t_run_start``, ``t_first_report``) for the
    start-up breakdown. ``finished`` (the pack's runs done so far) goes into every checkpoint
    and gets this run when it ends; ``resume`` is the state of this run to continue from.
    """
    import ray
    import ray.train
    import ray.train.torch

    from .. import tracking

    t_run = time.time()
    extra = dict(report_extra or {}) | {"t_run_start": t_run}
    finished = finished if finished is not None else {}
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
    if resume is not None:
        restore_state(run, stopper, resume)
        if track:
            logged = tracking.logged_steps(spec.mlflow_run_id, "epoch", uri=spec.tracking_uri)
        log.info("rank %d resumes run %d at epoch %d of %d (best epoch %d)", rank, pack_index, run.epoch,
                 cfg.epochs, stopper.best_epoch)
    if ctx.get_world_size() > 1:
        run.model = ray.train.torch.prepare_model(run.model)
    if spec.val_ref is not None:
        val_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = _rows_from_store(spec.val_ref)
    else:
        val_rows = _collect(val) if spec.cache_val else None
    # batch_size is the global batch (the loss gathers every worker's rows): each worker draws
    # its share per step; TrainConfig refuses a batch_size that num_workers does not divide
    local_batch = cfg.batch_size // ctx.get_world_size()
    buffer = shuffle_buffer_rows(cfg, 4 * spec.n_chans * spec.n_times, spec.n_train_rows, local_batch)
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    if spec.train_ref is not None:
        cached = _rows_from_store(spec.train_ref, rank, ctx.get_world_size())
    monitor = tracking.system_metrics(spec.mlflow_run_id, uri=spec.tracking_uri) if track else nullcontext()
    with monitor:
        for epoch in range(run.epoch, cfg.epochs):
            seed = epoch_seed(cfg, epoch, rank)
            torch.manual_seed(seed + 500_000)  # dropout & co: the same numbers whether resumed or not
            if cached is not None or spec.cache_shard:
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
            extra.setdefault("t_first_report", time.time())
            metrics |= extra
            if last:  # from now on this run is one of the pack's finished runs
                finished[pack_index] = (stopper.state_copy(), _summary(stopper, metrics))
            save = rank == 0 and (last or (cfg.checkpoint_every > 0 and (epoch + 1) % cfg.checkpoint_every == 0))
            _report(metrics, run, stopper, save=save, pack_index=pack_index, n_runs=n_runs,
                    finished={k: v for k, v in finished.items() if k != pack_index}, done=last)
            if last:
                break


def _report(metrics: dict[str, Any], run: Run, stopper: EarlyStopping, *, save: bool, pack_index: int,
            n_runs: int, finished: dict[int, Finished], done: bool) -> None:
    """``ray.train.report`` (every rank calls it: a barrier), with a checkpoint when ``save``.

    The checkpoint's state says where to resume: the next epoch of this run, or (``done``,
    after its last epoch) the next run of the pack."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(Path(d), run, stopper, metrics, pack_index=pack_index, n_runs=n_runs, finished=finished,
                         done=done)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
