"""What crosses a Ray boundary with a training run: frozen, typed, complete.

A run is its resolved :class:`~brainalign.config.TrainConfig` plus a :class:`RunSpec` (the
side facts: role, MLflow parent and tags, where the stores are, whether to test and save a
checkpoint). The driver builds both; a Tune trial receives them as they are and a Train
worker receives a :class:`WorkerSpec`. Nothing is passed through environment variables or
untyped side keys of a config dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._checks import check_option
from ..config import TrainConfig
from ..paths import Locations

__all__ = ["ROLES", "RunSpec", "WorkerSpec"]

#: ``train``: a single ``brainalign train``; ``trial``: a search trial (validation only);
#: ``final``: a run of a study that is tested (a final, a cross-subject fold).
ROLES = ("train", "trial", "final")


@dataclass(frozen=True)
class RunSpec:
    """The side facts of one training run (everything it needs besides its config).

    Parameters
    ----------
    role : {"train", "trial", "final"}
        What the run is for (MLflow tag ``role``).
    parent_run_id : str
        MLflow run to nest this run under (``""``: top level).
    tags : mapping
        Extra MLflow tags (study, arm, subject, unit key...).
    storage_name : str
        Name of the Ray Train run under ``locations.ray_storage`` (``""``: one from the run id).
    evaluate_test : bool
        Test the selected checkpoint after training (search trials never do).
    save_checkpoint : bool
        Keep the best-on-validation weights as a checkpoint artifact.
    locations : Locations
        The stores (cache, Ray storage, MLflow URI), resolved by the driver.
    custom_resources : mapping
        Ray custom resources each Train worker requests on top of its CPUs/GPU (a study's
        ``[resources] custom_per_worker``): they pin the workers to the nodes that have them.
    """

    role: str = "train"
    parent_run_id: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    storage_name: str = ""
    evaluate_test: bool = True
    save_checkpoint: bool = True
    locations: Locations = field(default_factory=Locations.current)
    custom_resources: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_option("run role", self.role, ROLES)


@dataclass(frozen=True)
class WorkerSpec:
    """What every Ray Train worker of a run receives (``train_loop_config={"spec": ...}``).

    Parameters
    ----------
    config : TrainConfig
        The resolved run config.
    embeddings : ray.ObjectRef
        The run's image-embedding matrix (float32, catalog order), put in Ray's object store
        by the driver: any node fetches it, no worker reads a file of the driver's disk.
    n_chans, n_times : int
        Epoch shape of the dataset.
    n_train_rows : int
        Rows of the prepared training split (sizes the shuffle buffer).
    mlflow_run_id : str
        Run that rank 0 logs per-epoch metrics and system metrics to (``""``: none).
    tracking_uri : str
        MLflow tracking URI.
    save_checkpoint : bool
        The driver keeps the best weights (every run checkpoints its full state for fault
        tolerance either way: ``checkpoint_every``).
    cache_shard : bool
        Keep the worker's (small) training shard in memory after the first pass.
    cache_val : bool
        Hold the (small) validation rows in memory; else each epoch streams them in chunks
        and keeps only their embeddings.
    train_ref, val_ref : ray.ObjectRef, optional
        A small split handed over through the object store as ``(epoch, image_index,
        subject_index)`` arrays (the driver's :func:`~brainalign.train.runner.put_split`)
        instead of a Ray Data dataset: no streaming executor, no split coordinator actor per
        run. ``None``: the worker reads its Ray Data shard.
    """

    config: TrainConfig
    embeddings: Any
    n_chans: int
    n_times: int
    n_train_rows: int
    mlflow_run_id: str = ""
    tracking_uri: str = ""
    save_checkpoint: bool = True
    cache_shard: bool = False
    cache_val: bool = True
    train_ref: Any = None
    val_ref: Any = None
