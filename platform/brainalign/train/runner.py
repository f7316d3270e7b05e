"""Driver side of a training run: checks, data preparation, MLflow run, TorchTrainer, test.

Everything that can be wrong with the inputs (paths, subjects, tables, coverage of image
ids, shapes) is checked before any Ray resource is requested. Test data are touched only
here, after training, with the checkpoint selected on validation data; search trials run
with ``RunSpec(evaluate_test=False)`` and never load the test split.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import tracking
from .._checks import BrainalignError, check_name
from .._io import check_writable
from .._ray import check_resources, check_tracking_for_cluster, ensure_ray, loopback_only, watch_resource_wait
from ..config import TrainConfig
from ..data.contract import open_dataset
from ..data.prepare import (
    catalog_embeddings,
    check_normalization,
    check_sizes,
    check_subjects,
    load_table_for,
    load_test,
    planned_sizes,
    prepare,
)
from ..data.validate import require_valid
from ..metrics import retrieval_ranks
from ..paths import home
from .loop import build_run, encode
from .spec import RunSpec, WorkerSpec

# ``ensure_ray`` lives in brainalign._ray (the only module that calls ray.init); it is
# re-exported here for existing callers.
__all__ = ["RunSpec", "TrainResult", "ensure_ray", "gallery_metric", "load_model", "put_split", "run_pack",
           "run_tags", "run_training"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_id: str
    val: dict[str, float]
    test: dict[str, float] = field(default_factory=dict)
    best_epoch: int = -1
    #: the run's Ray ``Checkpoint`` (read it with ``as_directory()``: it may live in object
    #: storage); its file :attr:`checkpoint_file` holds the best-on-validation weights
    checkpoint: Any = None
    checkpoint_file: str = "model.pt"
    #: wall seconds of the run's phases (driver-side checks, MLflow, data, Train start-up...)
    timings: dict[str, float] = field(default_factory=dict)

    def best_weights(self) -> dict[str, torch.Tensor]:
        """The best-on-validation weights (through Ray's Checkpoint API; ``weights_only``)."""
        if self.checkpoint is None:
            raise BrainalignError(f"run {self.run_id} kept no checkpoint (save_checkpoint was off).")
        with self.checkpoint.as_directory() as d:
            weights: dict[str, torch.Tensor] = torch.load(Path(d) / self.checkpoint_file, map_location="cpu",
                                                          weights_only=True)
        return weights


def run_tags(cfg: TrainConfig, *, fingerprint: str, source: str, backbone: str, alignment: str,
             table_sha: str, role: str) -> dict[str, str]:
    """The tags every run carries (filterable in the MLflow UI)."""
    return {
        "role": role,
        "dataset": Path(cfg.data.path).name,
        "data_source": source,
        "data_fingerprint": fingerprint,
        "table_sha256": table_sha[:16],
        "subjects": ",".join(cfg.data.subjects),
        "test_subjects": ",".join(cfg.data.eval_subjects),
        "brain_encoder": cfg.encoder,
        "image_table": cfg.data.image_table,
        "backbone": backbone,
        "alignment": alignment,
        "aligned": str(alignment != "none").lower(),
        "seed": str(cfg.seed),
        "git_commit": tracking.code_version(),
        "config_hash": cfg.config_hash(),
    }


def run_training(cfg: TrainConfig, spec: RunSpec | None = None, *, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train ``cfg`` through Ray Train + Ray Data, track it in MLflow, optionally test it.

    Everything that can be wrong is checked before any Ray resource is requested or MLflow
    run is created: names, subjects, the embedding table (ids and finiteness), encoder
    shapes, the dataset contract, impossible sizes (a batch larger than the training rows, a
    validation set smaller than the top-k) and the Ray resources asked for. A run that
    diverges (NaN/Inf loss or weights) ends FAILED with a :class:`~.loop.NonFiniteError`.

    Parameters
    ----------
    cfg : TrainConfig
        The run's config (resolved here: data paths become absolute).
    spec : RunSpec, optional
        Role, MLflow parent and tags, stores, test/checkpoint switches (default: a plain
        ``role="train"`` run that is tested, with this process's stores).
    callbacks : sequence
        Ray Train run callbacks (a search trial passes Tune's report callback).

    Returns
    -------
    TrainResult

    Raises
    ------
    BrainalignError
        A problem with the data, the table or the encoder, before any Ray resource or
        MLflow run exists.
    """
    return run_pack([(cfg, spec or RunSpec())], callbacks=callbacks)[0]


def run_pack(runs: Sequence[tuple[TrainConfig, RunSpec]], *, callbacks: Sequence[Any] = ()) -> list[TrainResult]:
    """Train several runs through ONE ``TorchTrainer``: one worker group trains them one
    after the other; each is still its own MLflow run with its own seed, data, checkpoint,
    metrics and test, and gets the results it would get alone (the worker seeds and builds
    every run from its own config; ``tests/train/test_pack.py`` checks the equality).

    The per-run start-up (controller and worker processes, imports, process group, MLflow
    and dataset set-up of the worker) is paid once per pack; the checks of every run still
    happen before any Ray resource or MLflow run exists. If one run of a pack fails, every
    run of the pack ends FAILED (a resumed study trains the pack again).

    Parameters
    ----------
    runs : sequence of (TrainConfig, RunSpec)
        The runs, in training order. They must ask for the same workers and resources
        (``num_workers``, ``cpus_per_worker``, ``use_gpu``) and use the same stores.
    callbacks : sequence
        Ray Train run callbacks (only for a single run: a Tune search trial).

    Returns
    -------
    list of TrainResult
        One per run, in order.

    Raises
    ------
    BrainalignError
        An empty pack, runs that ask for different resources, or any check of a run.
    """
    if not runs:
        raise BrainalignError("run_pack got no runs: pass at least one (TrainConfig, RunSpec) pair.")
    if len(runs) > 1 and callbacks:
        raise BrainalignError("Ray Train callbacks (a Tune search trial's report callback) need a single run per "
                              "Train run; train the trial alone with run_training.")
    t0 = time.perf_counter()
    _check_packable(runs)
    planned = [_plan_run(cfg, spec) for cfg, spec in runs]
    t_checked = time.perf_counter()
    first = planned[0]
    uri = first.spec.locations.tracking_uri
    with contextlib.ExitStack() as stack:
        run_ids = []
        for p in planned:
            cfg, spec, ds, table = p.cfg, p.spec, p.ds, p.table
            tags = run_tags(cfg, fingerprint=ds.fingerprint, source=str(ds.meta.source.get("kind")),
                            backbone=table.backbone, alignment=table.alignment, table_sha=table.sha256,
                            role=spec.role)
            tags |= dict(spec.tags)
            params = cfg.to_flat() | {"n_train_rows": p.prepared.n_train_rows, "n_val_rows": p.prepared.n_val_rows}
            run_name = cfg.run_name or f"{cfg.encoder}-{table.backbone}-{table.alignment}-s{cfg.seed}"
            run_id = stack.enter_context(tracking.run(cfg.experiment, run_name=run_name, params=params, tags=tags,
                                                      parent_run_id=spec.parent_run_id or None, uri=uri))
            log.info("MLflow run %s (%s)", run_id, run_name)
            splits = "train/val/test" if spec.evaluate_test else "train/val"
            tracking.log_dataset(run_id, name=ds.root.name, digest=ds.fingerprint, source=str(ds.root),
                                 context=splits, profile={"subjects": list(cfg.data.subjects),
                                                          "test_subjects": list(cfg.data.eval_subjects),
                                                          "n_chans": ds.meta.n_chans, "n_times": ds.meta.n_times},
                                 uri=uri)
            tracking.log_dataset(run_id, name=cfg.data.image_table, digest=table.sha256, source=str(p.table_path),
                                 context="image embeddings", profile={"dim": table.dim}, uri=uri)
            run_ids.append(run_id)
        t_mlflow = time.perf_counter()
        results = _fit(planned, run_ids, callbacks)
        t_fit = time.perf_counter()
        for p, result in zip(planned, results, strict=True):
            t_test = time.perf_counter()
            if p.spec.evaluate_test:
                if result.checkpoint is None:
                    raise RuntimeError("training produced no checkpoint to test")
                result.test = _test(p.cfg, result, p.emb, p.ds, uri)
            _log_artifacts(p.cfg, result, result.run_id, uri)
            result.timings["test_and_artifacts_s"] = time.perf_counter() - t_test
    n = len(planned)
    for result in results:  # the shared phases, split evenly over the pack's runs
        result.timings |= {"checks_and_prepare_s": (t_checked - t0) / n, "mlflow_runs_s": (t_mlflow - t_checked) / n,
                           "pack_size": float(n), "pack_fit_s": t_fit - t_mlflow}
    return results


@dataclass(frozen=True)
class _Planned:
    """A run whose inputs were checked and prepared (driver side, before any Ray resource)."""

    cfg: TrainConfig
    spec: RunSpec
    ds: Any
    table: Any
    table_path: Path
    emb: np.ndarray
    prepared: Any


def _plan_run(cfg: TrainConfig, spec: RunSpec) -> _Planned:
    """Every check of one run, its prepared data and its embedding matrix in the shared cache."""
    loc = spec.locations
    cfg = cfg.resolved()
    if spec.storage_name:
        check_name("Ray storage name", spec.storage_name)
    ds = open_dataset(cfg.data.path)
    check_subjects(ds, cfg.data.subjects, "data.subjects")
    check_subjects(ds, cfg.data.eval_subjects, "data.test_subjects")
    table, table_path = load_table_for(cfg)  # unknown table, NaN/Inf vectors
    needed = ds.image_ids("train") + (ds.image_ids("test") if spec.evaluate_test else [])
    emb = catalog_embeddings(ds, table, needed)  # raises on missing ids, before any compute
    check_encoder(cfg, ds.meta.n_chans, ds.meta.n_times, table.dim)
    check_normalization(cfg.data.normalize, ds.meta.n_times)
    where = f"data.subjects {list(cfg.data.subjects)} of {cfg.data.path}"
    rows, n_val = planned_sizes(ds, cfg.data.subjects, train_trials=cfg.data.train_trials,
                                val_fraction=cfg.data.val_fraction, val_split=cfg.data.val_split, seed=cfg.seed)
    check_sizes(n_train_rows=rows, n_val_images=n_val, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                val_fraction=cfg.data.val_fraction, where=where, planned=True)
    check_writable(Path(loc.cache), "the cache (BRAINALIGN_CACHE, default $BRAINALIGN_HOME/cache)")
    require_valid(ds, Path(loc.cache))  # NaNs, duplicates, test images in training files: once per fingerprint
    check_writable(Path(loc.ray_storage),
                   "the Ray storage (BRAINALIGN_RAY_STORAGE, default $BRAINALIGN_HOME/ray_results)")
    uri = loc.tracking_uri
    if uri.startswith("sqlite:///"):
        check_writable(Path(uri.removeprefix("sqlite:///")).parent, "the MLflow store (MLFLOW_TRACKING_URI, "
                       f"default under $BRAINALIGN_HOME={home()})")
    prepared = prepare(cfg, Path(loc.cache))
    check_sizes(n_train_rows=prepared.n_train_rows, n_val_images=len(prepared.val_images),
                batch_size=cfg.batch_size, num_workers=cfg.num_workers, val_fraction=cfg.data.val_fraction,
                where=where)
    ensure_ray()
    custom = dict(spec.custom_resources)
    check_resources(num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu,
                    gpus_per_worker=cfg.gpus_per_worker, custom_per_worker=custom,
                    what=f"this run (num_workers={cfg.num_workers}, cpus_per_worker={cfg.cpus_per_worker:g}, "
                         f"use_gpu={str(cfg.use_gpu).lower()}" + (f", custom resources {custom}" if custom else "")
                         + ")")
    check_tracking_for_cluster(uri)  # workers on other nodes cannot write a SQLite file of this one
    return _Planned(cfg=cfg, spec=spec, ds=ds, table=table, table_path=table_path, emb=emb, prepared=prepared)


def _check_packable(runs: Sequence[tuple[TrainConfig, RunSpec]]) -> None:
    """Runs of one pack share one worker group and one Ray storage: same workers and stores."""
    first = runs[0]

    def shape(run: tuple[TrainConfig, RunSpec]) -> tuple[Any, ...]:
        c, spec = run
        return (c.num_workers, c.cpus_per_worker, c.use_gpu, c.gpus_per_worker, spec.locations,
                dict(spec.custom_resources))

    for run in runs[1:]:
        if shape(run) != shape(first):
            raise BrainalignError(
                f"runs {first[0].run_name or first[0].seed!r} and {run[0].run_name or run[0].seed!r} cannot share a "
                "worker group: they ask for different workers, resources or stores (num_workers, cpus_per_worker, "
                "use_gpu, custom resources, locations). Pack only runs that differ in what the worker trains (seed, "
                "hyperparameters, subjects)."
            )


def inline_max_bytes() -> int:
    """Prepared splits up to this size go to Ray Data as one in-memory Arrow table.

    ``BRAINALIGN_INLINE_MB`` (default 256; 0 = always stream). Reading a small Parquet folder
    with ``read_parquet`` costs several seconds of task start-up on a busy 2-core machine
    (listing task, read task, worker processes) for milliseconds of I/O; ``from_arrow`` puts
    the table into the object store at once. Larger splits are read by parallel tasks.
    """
    value = os.environ.get("BRAINALIGN_INLINE_MB", "256")
    try:
        mb = float(value)
    except ValueError:
        raise BrainalignError(f"BRAINALIGN_INLINE_MB={value!r} is not a number of megabytes (e.g. 256; 0 streams)") from None
    return int(mb * 2**20)


def put_split(path: Path) -> Any:
    """A small prepared split into the object store as ``(epoch, image_index, subject_index)``
    numpy arrays, in file order (the order a one-worker Ray Data shard yields).

    Used for splits up to :func:`inline_max_bytes`: a Ray Data dataset costs every run a
    streaming executor in the worker and, for the split training set, a coordinator actor
    (a process) started with the worker group: seconds each on a busy machine, for
    milliseconds of data. Returns the ``ray.ObjectRef``.
    """
    import pyarrow.parquet as pq
    import ray

    table = pq.read_table(path)
    x = np.asarray(table.column("epoch").combine_chunks().to_numpy_ndarray(), dtype=np.float32)
    ii = table.column("image_index").to_numpy()
    ss = table.column("subject_index").to_numpy()
    return ray.put((x, ii, ss))


def _split_dataset(path: Path, nbytes: int) -> Any:
    """A prepared split (``nbytes`` of float32 epochs) as a Ray Dataset: inline when small,
    else read by tasks (and materialized once, so later epochs do not re-read Parquet)."""
    import pyarrow.parquet as pq
    import ray.data

    if nbytes <= inline_max_bytes():
        return ray.data.from_arrow(pq.read_table(path))
    return ray.data.read_parquet(str(path)).materialize()


def _fit(planned: Sequence[_Planned], run_ids: Sequence[str], callbacks: Sequence[Any]) -> list[TrainResult]:
    """One ``TorchTrainer`` for the runs of ``planned`` (one after the other in its workers)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from .ray_worker import dataset_names, run_files, train_loop_per_worker

    # Train V2's controller collects a worker's report only when it polls (every 2 s by
    # default) and a worker blocks on its next report until then: short epochs would each
    # cost 2 s. Ray propagates this variable from here to the controller it starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    first = planned[0]
    cfg, spec = first.cfg, first.spec
    n = len(planned)
    t0 = time.perf_counter()
    datasets: dict[str, Any] = {}
    workers: list[WorkerSpec] = []
    # image embeddings travel through the object store (no worker reads the driver's disk),
    # once per distinct table of the pack
    emb_refs: dict[str, Any] = {}
    for i, (p, run_id) in enumerate(zip(planned, run_ids, strict=True)):
        if p.table.sha256 not in emb_refs:
            emb_refs[p.table.sha256] = ray.put(np.ascontiguousarray(p.emb, dtype=np.float32))
        prepared = p.prepared
        row_bytes = 4 * prepared.n_chans * prepared.n_times
        train_bytes = prepared.n_train_rows * row_bytes
        val_bytes = prepared.n_val_rows * row_bytes
        train_name, val_name = dataset_names(i, n)
        refs: dict[str, Any] = {}
        if train_bytes <= inline_max_bytes():  # small: through the object store, no Ray Data per run
            refs["train_ref"] = put_split(prepared.train_dir)
        else:
            datasets[train_name] = _split_dataset(prepared.train_dir, train_bytes)
        if val_bytes <= inline_max_bytes():
            refs["val_ref"] = put_split(prepared.val_dir)
        else:
            datasets[val_name] = _split_dataset(prepared.val_dir, val_bytes)
        workers.append(WorkerSpec(
            config=p.cfg, embeddings=emb_refs[p.table.sha256], n_chans=prepared.n_chans, n_times=prepared.n_times,
            n_train_rows=prepared.n_train_rows, mlflow_run_id=run_id, tracking_uri=p.spec.locations.tracking_uri,
            save_checkpoint=p.spec.save_checkpoint,
            # each worker keeps its shard in memory after the first pass when it is small, and the
            # validation rows when they are small; larger splits stream every epoch (worker memory
            # bounded in bytes: docs/training.md, "Worker memory")
            cache_shard=train_bytes <= inline_max_bytes(),
            cache_val=val_bytes <= inline_max_bytes(),
            **refs,
        ))
    t_data = time.perf_counter()
    torch_config = None
    if loopback_only():  # all workers on this machine: keep torch's rendezvous store on 127.0.0.1 too
        from ._torch_backend import LoopbackTorchConfig

        torch_config = LoopbackTorchConfig()
    loop_config: dict[str, Any] = {"spec": workers[0]} if n == 1 else {"specs": tuple(workers)}
    # one Train run per MLflow run (or pack): a restarted worker group resumes from its own
    # checkpoints; a new attempt (a study resumed after its driver died) starts its own
    name = f"{spec.storage_name or 'train'}-{run_ids[0]}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        torch_config=torch_config,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            # custom resources (a study's [resources] custom_per_worker) pin workers to nodes
            resources_per_worker={"CPU": cfg.cpus_per_worker} | ({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})
            | dict(spec.custom_resources),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[k for k in datasets if k.startswith("train")]),
        run_config=ray.train.RunConfig(
            name=name if n == 1 else f"{name}-pack{n}",
            storage_path=spec.locations.ray_storage,
            callbacks=list(callbacks),
            # the latest checkpoint holds the state to resume from and the best weights of every
            # finished run of the pack (ray_worker.write_checkpoint): it is the only one needed
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            # a dead worker (OOM, preemption, lost node) restarts the worker group, which resumes
            # from the latest checkpoint (ray_worker.py; one every checkpoint_every epochs)
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    t_fit = time.time()
    try:
        with watch_resource_wait(f"training run {run_ids[0]}" + (f" (+{n - 1} packed)" if n > 1 else "")):
            result = trainer.fit()
    except Exception as e:
        user = _user_error(e)
        if user is None:
            raise
        raise user from e
    if result.error:
        raise _user_error(result.error) or result.error
    infos: dict[int, dict[str, Any]] = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:  # a local path or object storage alike
            for i in range(n):
                info_file = Path(d) / run_files(i, n)[1]
                if info_file.is_file():
                    infos[i] = json.loads(info_file.read_text())
    out = []
    for i, (p, run_id) in enumerate(zip(planned, run_ids, strict=True)):
        info = infos.get(i)
        if info is None and n > 1:
            raise RuntimeError(f"the pack's last checkpoint holds no summary of run {i} ({run_id})")
        metrics = dict(info["report"]) if info else dict(result.metrics or {})
        timings = {"data_to_ray_s": (t_data - t0) / n}
        if "t_run_start" in metrics and "t_first_report" in metrics:
            # wall-clock stamps of the worker: Train start-up (controller, worker group, process
            # group, imports) before the first run; the run's own set-up; its first epoch
            timings |= {"train_startup_s": float(metrics["t_worker_start"]) - t_fit if i == 0 else 0.0,
                        "run_start_to_first_report_s": float(metrics["t_first_report"]) - float(metrics["t_run_start"])}
        keep = p.spec.save_checkpoint and result.checkpoint is not None and info is not None
        out.append(TrainResult(
            run_id=run_id,
            val={k: float(v) for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))},
            best_epoch=int(info["best_epoch"]) if info else -1,
            checkpoint=result.checkpoint if keep else None,
            checkpoint_file=run_files(i, n)[0],
            timings=timings,
        ))
    return out


def _user_error(e: BaseException) -> BrainalignError | None:
    """The :class:`BrainalignError` a Train worker raised (e.g. ``NonFiniteError``), found in the
    Ray exception that wraps it, re-raised as itself so the user sees the message, not Ray's
    traceback; None if there is none."""
    seen: set[int] = set()
    todo: list[Any] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, BrainalignError):
            try:
                return type(x)(str(x))
            except Exception:
                return BrainalignError(str(x))
        todo += [getattr(x, "__cause__", None), getattr(x, "__context__", None), getattr(x, "cause", None),
                 getattr(x, "controller_failure", None)]
        failures = getattr(x, "worker_failures", None)
        if isinstance(failures, Mapping):
            todo += list(failures.values())
    return None


def load_model(cfg: TrainConfig, checkpoint: Path, n_chans: int, n_times: int, emb: np.ndarray,
               device: torch.device | str = "cpu") -> Any:
    """A ``Run`` with the checkpoint's weights (loaded with ``weights_only=True``) on ``device``."""
    run = build_run(cfg, n_chans=n_chans, n_times=n_times, image_emb=torch.from_numpy(emb), device=device)
    state = torch.load(checkpoint, map_location=run.device, weights_only=True)
    run.model.load_state_dict(state)
    return run


def gallery_metric(metric: str, n_way: int) -> str:
    """MLflow name of a large-gallery metric: ``test_top1`` -> ``test_top1_16740way``.

    MLflow metric names allow letters, digits, ``_ - . / :`` and spaces (no ``@``)."""
    return f"{metric}_{n_way}way"


def _test_device(cfg: TrainConfig) -> torch.device:
    """Where the test ranks: the GPU when the run uses one and this process sees one."""
    return torch.device("cuda") if cfg.use_gpu and torch.cuda.is_available() else torch.device("cpu")


def _test(cfg: TrainConfig, result: TrainResult, emb: np.ndarray, ds: Any, uri: str) -> dict[str, float]:
    """N-way retrieval of repetition-averaged test trials against the test images and, with
    ``test.gallery = "test+train"``, against the test and all training images (App. F).

    Ranks run where the model is (a GPU when the run has one; on CPU ``retrieval_ranks`` scores
    the gallery in chunks, so a 16,740- or 100,000-image gallery never needs a full score
    matrix). Logs ``test_top{1,5}`` (test gallery), ``test_top{1,5}_<N>way`` for every gallery,
    per-subject values, and one rankings CSV per gallery (``retrieval/test_rankings.csv`` for
    the test gallery, ``retrieval/test_rankings_<N>way.csv`` for the others) whose ``top5`` and
    ``top5_scores`` columns list the best five images and their cosine similarities.
    """
    from ..metrics import retrieval_topk

    run_id = result.run_id
    device = _test_device(cfg)
    with result.checkpoint.as_directory() as d:  # read through Ray's Checkpoint API (local or remote)
        run = load_model(cfg, Path(d) / result.checkpoint_file, ds.meta.n_chans, ds.meta.n_times, emb,
                         device=device)
    pos = ds.image_index()
    catalog_ids = ds.image_ids()
    train_rows = [pos[i] for i in ds.image_ids("train")]
    out: dict[str, float] = {}
    tables: dict[str, list[tuple[Any, ...]]] = {g: [] for g in cfg.test.galleries}
    per_gallery: dict[str, list[dict[int, float]]] = {g: [] for g in cfg.test.galleries}
    n_ways: dict[str, int] = {}
    for subject in cfg.data.eval_subjects:
        ids, x = load_test(cfg, subject)
        sidx = cfg.data.subjects.index(subject) if subject in cfg.data.subjects else -1
        z = encode(run, torch.from_numpy(x), torch.full((len(ids),), sidx, dtype=torch.long))
        test_rows = [pos[i] for i in ids]
        targets = torch.arange(len(ids), device=z.device)
        for gallery in cfg.test.galleries:
            rows = test_rows if gallery == "test" else test_rows + train_rows
            g = run.image_emb[torch.as_tensor(rows, device=run.image_emb.device)]
            ranks = retrieval_ranks(z, g, targets).cpu()
            top_i, top_s = retrieval_topk(z, g, targets, k=5)
            top_i, top_s = top_i.cpu().tolist(), top_s.cpu().tolist()
            acc = {k: float((ranks <= k).float().mean()) for k in (1, 5)}
            per_gallery[gallery].append(acc)
            n_ways[gallery] = len(rows)
            for k in (1, 5):
                out[gallery_metric(f"test_top{k}", len(rows)) + f"_sub-{subject}"] = acc[k]
                if gallery == "test":
                    out[f"test_top{k}_sub-{subject}"] = acc[k]
            for i, image_id in enumerate(ids):
                tables[gallery].append((
                    subject, image_id, int(ranks[i]),
                    ";".join(catalog_ids[rows[j]] for j in top_i[i]),
                    ";".join(f"{v:.6f}" for v in top_s[i]),
                ))
    for gallery, accs in per_gallery.items():
        for k in (1, 5):
            value = float(np.mean([a[k] for a in accs]))
            out[gallery_metric(f"test_top{k}", n_ways[gallery])] = value
            if gallery == "test":
                out[f"test_top{k}"] = value
    out["test_n_way"] = float(len(tables["test"]) / max(len(per_gallery["test"]), 1))
    tracking.log_metrics(run_id, out, uri=uri)
    for gallery, rows_ in tables.items():
        buf = io.StringIO()
        buf.write("subject,image_id,rank,top5,top5_scores\n")
        for r in rows_:
            buf.write(",".join(map(str, r)) + "\n")
        name = "test_rankings.csv" if gallery == "test" else f"test_rankings_{n_ways[gallery]}way.csv"
        tracking.log_text(run_id, buf.getvalue(), f"retrieval/{name}", uri=uri)
    return out


def check_encoder(cfg: TrainConfig, n_chans: int, n_times: int, embed_dim: int) -> None:
    """Build the encoder on the meta device: an impossible shape or architecture fails here,
    naming the dataset's shape, before an MLflow run or a Ray worker exists."""
    from ..encoders import count_parameters

    try:
        count_parameters(cfg.encoder, n_chans=n_chans, n_times=n_times, embed_dim=embed_dim,
                         n_subjects=len(cfg.data.subjects), **cfg.arch)
    except BrainalignError as e:
        raise BrainalignError(
            f"encoder {cfg.encoder!r} cannot take the epochs of {cfg.data.path} ({n_chans} channels x "
            f"{n_times} samples, embedding dim {embed_dim}): {e}"
        ) from None


def _log_artifacts(cfg: TrainConfig, result: TrainResult, run_id: str, uri: str) -> None:
    """Resolved config always; the selected checkpoint and its summary when one was saved."""
    tracking.log_dict(run_id, cfg.to_flat(), "config/resolved_config.json", uri=uri)
    if result.checkpoint is None:
        return
    with tempfile.TemporaryDirectory() as d:
        with result.checkpoint.as_directory() as c:  # the best weights, as checkpoint/model.pt
            shutil.copyfile(Path(c) / result.checkpoint_file, Path(d) / "model.pt")
        tracking.log_artifact(run_id, Path(d) / "model.pt", "checkpoint", uri=uri)
        p = Path(d) / "best.json"
        p.write_text(json.dumps({"best_epoch": result.best_epoch, "val": result.val, "test": result.test}, indent=2))
        tracking.log_artifact(run_id, p, "checkpoint", uri=uri)
