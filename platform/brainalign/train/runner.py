"""Driver side of a training run: checks, data preparation, MLflow run, TorchTrainer, test.

Everything that can be wrong with the inputs (paths, subjects, tables, coverage of image
ids, shapes) is checked before any Ray resource is requested. Test data are touched only
here, after training, with the checkpoint selected on validation data; search trials call
``run_training(..., evaluate_test=False)`` and never load the test split.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import tracking
from .._checks import BrainalignError
from .._io import atomic_file
from ..config import TrainConfig
from ..data.contract import open_dataset
from ..data.prepare import (
    catalog_embeddings,
    check_normalization,
    check_subjects,
    load_table_for,
    load_test,
    prepare,
)
from ..data.validate import require_valid
from ..metrics import retrieval_ranks
from ..paths import ray_storage
from .loop import build_run, encode

__all__ = ["TrainResult", "ensure_ray", "gallery_metric", "load_model", "run_tags", "run_training"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_id: str
    val: dict[str, float]
    test: dict[str, float] = field(default_factory=dict)
    best_epoch: int = -1
    checkpoint: Path | None = None


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray with the dashboard.

    Locally we declare at least 4 logical CPUs: a Tune trial, a Train worker and Ray Data
    each need a whole logical CPU, and on a 2-core machine fewer deadlocks Ray Data.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], configure_logging=False)
        return
    ray.init(
        address="local",  # a new local instance, never a stray cluster registered in /tmp/ray
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=False,
        log_to_driver=False,
    )


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


def run_training(
    cfg: TrainConfig,
    *,
    role: str = "train",
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    callbacks: Sequence[Any] = (),
    storage_name: str | None = None,
    evaluate_test: bool = True,
    save_checkpoint: bool = True,
    mlflow_uri: str | None = None,
) -> TrainResult:
    """Train ``cfg`` through Ray Train + Ray Data, track it in MLflow, optionally test it."""
    cfg = cfg.resolved()
    ds = open_dataset(cfg.data.path)
    check_subjects(ds, cfg.data.subjects, "data.subjects")
    check_subjects(ds, cfg.data.eval_subjects, "data.test_subjects")
    table, table_path = load_table_for(cfg)
    needed = ds.image_ids("train") + (ds.image_ids("test") if evaluate_test else [])
    emb = catalog_embeddings(ds, table, needed)  # raises on missing ids, before any compute
    check_encoder(cfg, ds.meta.n_chans, ds.meta.n_times, table.dim)
    check_normalization(cfg.data.normalize, ds.meta.n_times)
    require_valid(ds)  # NaNs, duplicates, test images in training files, ...: once per fingerprint
    prepared = prepare(cfg)
    emb_path = prepared.root / f"emb-{table.sha256[:16]}.npy"
    if not emb_path.is_file():
        with atomic_file(emb_path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb)

    uri = mlflow_uri or tracking.tracking_uri()
    tags = run_tags(cfg, fingerprint=ds.fingerprint, source=str(ds.meta.source.get("kind")),
                    backbone=table.backbone, alignment=table.alignment, table_sha=table.sha256, role=role)
    tags |= dict(extra_tags or {})
    params = cfg.to_flat() | {"n_train_rows": prepared.n_train_rows, "n_val_rows": prepared.n_val_rows}
    run_name = cfg.run_name or f"{cfg.encoder}-{table.backbone}-{table.alignment}-s{cfg.seed}"
    run_id = tracking.start_run(cfg.experiment, run_name=run_name, params=params, tags=tags,
                                parent_run_id=parent_run_id, uri=uri)
    log.info("MLflow run %s (%s)", run_id, run_name)
    try:
        result = _fit(cfg, prepared, emb_path, run_id, uri, callbacks, storage_name, save_checkpoint)
        if evaluate_test:
            if result.checkpoint is None:
                raise RuntimeError("training produced no checkpoint to test")
            result.test = _test(cfg, result.checkpoint, emb, ds, run_id, uri)
        _log_artifacts(cfg, result, run_id, uri)
        tracking.end_run(run_id, "FINISHED", uri=uri)
    except KeyboardInterrupt:
        tracking.end_run(run_id, "KILLED", uri=uri)
        raise
    except BaseException:
        tracking.end_run(run_id, "FAILED", uri=uri)
        raise
    return result


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


def _split_dataset(path: Path, nbytes: int) -> Any:
    """A prepared split (``nbytes`` of float32 epochs) as a Ray Dataset: inline when small,
    else read by tasks (and materialized once, so later epochs do not re-read Parquet)."""
    import pyarrow.parquet as pq
    import ray.data

    if nbytes <= inline_max_bytes():
        return ray.data.from_arrow(pq.read_table(path))
    return ray.data.read_parquet(str(path)).materialize()


def _fit(cfg: TrainConfig, prepared: Any, emb_path: Path, run_id: str, uri: str,
         callbacks: Sequence[Any], storage_name: str | None, save_checkpoint: bool) -> TrainResult:
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from .ray_worker import train_loop_per_worker

    ensure_ray()
    # Train V2's controller collects a worker's report only when it polls (every 2 s by
    # default) and a worker blocks on its next report until then: short epochs would each
    # cost 2 s. Ray propagates this variable from here to the controller it starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    row_bytes = 4 * prepared.n_chans * prepared.n_times
    train_bytes = prepared.n_train_rows * row_bytes
    train_ds = _split_dataset(prepared.train_dir, train_bytes)
    val_ds = _split_dataset(prepared.val_dir, prepared.n_val_rows * row_bytes)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_flat(),
            "emb_path": str(emb_path),
            "n_chans": prepared.n_chans,
            "n_times": prepared.n_times,
            "n_train_rows": prepared.n_train_rows,
            "mlflow_run_id": run_id,
            "mlflow_uri": uri,
            "save_checkpoint": save_checkpoint,
            # each worker keeps its shard in memory after the first pass when it is small
            "cache_shard": train_bytes <= inline_max_bytes(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {}),
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=storage_name or f"train-{run_id}",
            storage_path=str(ray_storage()),
            callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    ckpt_path: Path | None = None
    best: dict[str, Any] = {}
    if result.checkpoint is not None:
        ckpt_path = Path(result.checkpoint.path) / "model.pt"
        best = json.loads((Path(result.checkpoint.path) / "best.json").read_text())
    metrics = dict(result.metrics or {})
    return TrainResult(
        run_id=run_id,
        val={k: float(v) for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))},
        best_epoch=int(best.get("best_epoch", -1)),
        checkpoint=ckpt_path,
    )


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


def _test(cfg: TrainConfig, checkpoint: Path, emb: np.ndarray, ds: Any, run_id: str, uri: str) -> dict[str, float]:
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

    device = _test_device(cfg)
    run = load_model(cfg, checkpoint, ds.meta.n_chans, ds.meta.n_times, emb, device=device)
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
    tracking.log_artifact(run_id, result.checkpoint, "checkpoint", uri=uri)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "best.json"
        p.write_text(json.dumps({"best_epoch": result.best_epoch, "val": result.val, "test": result.test}, indent=2))
        tracking.log_artifact(run_id, p, "checkpoint", uri=uri)
