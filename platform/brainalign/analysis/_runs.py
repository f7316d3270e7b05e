"""Read finished runs back from MLflow: config, checkpoint, model, test data, study finals."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import tracking
from .._checks import BrainalignError
from ..config import TrainConfig

__all__ = ["FinishedRun", "LoadedModel", "StudyRuns", "load_model", "open_run", "study_runs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinishedRun:
    """A finished training run and its downloaded artifacts.

    Parameters
    ----------
    record : tracking.RunRecord
        The MLflow run (tags: ``alignment``, ``subject``, ``seed``, ``study`` ...).
    cfg : TrainConfig
        The run's resolved config (``config/resolved_config.json``).
    checkpoint : Path
        The downloaded ``checkpoint/model.pt`` (selected on validation data).
    workdir : Path
        Where its artifacts were downloaded.
    """

    record: tracking.RunRecord
    cfg: TrainConfig
    checkpoint: Path
    workdir: Path

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def aligned(self) -> bool:
        return self.record.tags.get("alignment", self.cfg.data.image_table.split(":")[1]) != "none"

    @property
    def arm(self) -> str:
        return self.record.tags.get("arm") or ("aligned" if self.aligned else "base")

    @property
    def subject(self) -> str:
        return self.cfg.data.eval_subjects[0]

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def label(self) -> str:
        """``nice sim-clip:simulated sub-01 seed 0``."""
        return f"{self.cfg.encoder} {self.cfg.data.image_table} sub-{self.subject} seed {self.seed}"

    def artifact(self, path: str) -> Path:
        """Download another artifact of the run (e.g. ``retrieval/test_rankings.csv``)."""
        return tracking.download_artifacts(self.run_id, path, self.workdir)


def open_run(run_id: str, workdir: Path, uri: str | None = None) -> FinishedRun:
    """Download a finished run's resolved config and checkpoint into ``workdir/<run_id>``.

    Raises
    ------
    BrainalignError
        The run does not exist, is not FINISHED, or lacks the config or checkpoint artifact.
    """
    rec = tracking.get_run(run_id, uri)
    if rec.status != "FINISHED":
        raise BrainalignError(
            f"MLflow run {run_id} ({rec.name}) is {rec.status}, not FINISHED: analyses read finished runs only."
        )
    d = workdir / run_id
    cfg_file = tracking.download_artifacts(run_id, "config/resolved_config.json", d, uri)
    flat = json.loads(cfg_file.read_text())
    cfg = TrainConfig.from_flat(flat, strict_types=False)
    ckpt = tracking.download_artifacts(run_id, "checkpoint/model.pt", d, uri)
    return FinishedRun(rec, cfg, ckpt, d)


@dataclass
class LoadedModel:
    """A finished run's model with its dataset, image embeddings and a subject's test data."""

    run: Any  # train.loop.Run
    ds: Any  # data.contract.BrainDataset
    emb: np.ndarray  # (n_catalog, D), catalog order
    test_ids: list[str]
    test_x: np.ndarray  # (n_test, n_chans, n_times), repetition-averaged, normalized as trained
    subject_index: int  # position of the tested subject among the training subjects, -1 if unseen

    @property
    def test_rows(self) -> list[int]:
        pos = self.ds.image_index()
        return [pos[i] for i in self.test_ids]


def load_model(fr: FinishedRun, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the encoder of ``fr`` with its checkpoint (``weights_only=True``) and load the test
    data of its (first) evaluated subject, normalized as in training.

    Raises
    ------
    BrainalignError
        The dataset or embedding table the run used is gone or changed shape.
    """
    from ..data.contract import open_dataset
    from ..data.prepare import catalog_embeddings, load_table_for, load_test
    from ..train.runner import load_model as _load

    cfg = fr.cfg
    if not Path(cfg.data.path).is_dir():
        raise BrainalignError(
            f"run {fr.run_id} was trained on {cfg.data.path}, which does not exist here: analyses reload "
            "the run's test data from its dataset."
        )
    ds = open_dataset(cfg.data.path)
    table, _ = load_table_for(cfg)
    needed = ds.image_ids()
    emb = catalog_embeddings(ds, table, needed)
    run = _load(cfg, fr.checkpoint, ds.meta.n_chans, ds.meta.n_times, emb, device=device)
    subject = fr.subject
    ids, x = load_test(cfg, subject)
    sidx = cfg.data.subjects.index(subject) if subject in cfg.data.subjects else -1
    return LoadedModel(run, ds, emb, ids, x, sidx)


@dataclass(frozen=True)
class StudyRuns:
    """A study run (``role=report``) and the finished tested runs under it."""

    name: str
    report: tracking.RunRecord
    finals: list[tracking.RunRecord]


def study_runs(name: str, uri: str | None = None, *, experiment: str | None = None,
               study_run_id: str | None = None) -> StudyRuns:
    """The study run of study ``name`` and its FINISHED tested runs (``role=final``).

    Parameters
    ----------
    name : str
        The study's ``[study] name`` (the ``study`` tag of its runs).
    uri : str, optional
        Tracking URI.
    experiment : str, optional
        The study's MLflow experiment (default: the study name, as ``[study] experiment``).
    study_run_id : str, optional
        The study run to read (the study engine passes its own, still RUNNING); default the
        newest FINISHED study run of ``name``.

    The tested runs are the study run's children (the engine's layout), so those of an earlier
    execution of the same study (``--fresh``) are not mixed in.

    Raises
    ------
    BrainalignError
        No (finished) study of that name, or one without finished tested runs.
    """
    if study_run_id:
        report = tracking.get_run(study_run_id, uri)
    else:
        reports = [r for r in tracking.find_runs(experiment or name, {"role": "report", "study": name}, uri)
                   if r.status == "FINISHED"]
        if not reports:
            raise BrainalignError(
                f"no finished study {name!r} in experiment {experiment or name!r} of the tracking store "
                f"{uri or tracking.tracking_uri()}: run `brainalign study run <study file>` first."
            )
        report = reports[-1]
    newest: dict[str, tracking.RunRecord] = {}
    for r in tracking.children(report.run_id, uri, tags={"role": "final"}, status="FINISHED"):
        key = r.tags.get("final_key", r.run_id)
        if key not in newest or r.start_time >= newest[key].start_time:
            newest[key] = r
    finals = [newest[k] for k in sorted(newest)]
    if not finals:
        raise BrainalignError(f"study {name!r} (study run {report.run_id}) has no finished tested runs.")
    return StudyRuns(name, report, finals)
