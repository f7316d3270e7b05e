"""Final runs: the best config of each search, retrained per subject and seed, then tested.

Each arm's best config (selected on validation only) is trained once per (study subject,
final seed) with ``run_training(role="final", evaluate_test=True)``; this is the only place
test metrics are computed. A final's MLflow run is a child of its arm's search run and is
tagged ``final_key`` (``<arm>/sub-<subject>/seed-<seed>``) so that a resumed study finds it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .report import GALLERY_METRIC, FinalRow
from .study import Arm, Study

__all__ = ["FinalSpec", "final_rows", "plan_finals"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalSpec:
    """One final run."""

    key: str
    arm: Arm
    subject: str
    seed: int
    flat: Mapping[str, Any]
    parent_run_id: str
    tags: Mapping[str, str]

    def job(self) -> dict[str, Any]:
        """What the Tune trainable needs (plain, picklable)."""
        return {"flat": dict(self.flat), "parent_run_id": self.parent_run_id, "tags": dict(self.tags)}


def final_key(arm: Arm, subject: str, seed: int) -> str:
    """Stable id of a final: ``<encoder>__<backbone>__<alignment>/sub-<subject>/seed-<seed>``."""
    return f"{arm.name}/sub-{subject}/seed-{seed}"


def plan_finals(study: Study, searches: Mapping[str, Mapping[str, Any]]) -> list[FinalSpec]:
    """Every final of the study, from the recorded searches (``arm name -> {run_id, best_config}``).

    Parameters
    ----------
    study : Study
        The study.
    searches : mapping
        The state's search records; each needs ``run_id`` and ``best_config``.

    Returns
    -------
    list of FinalSpec
        Arm-major, then subject, then seed.
    """
    out = []
    for arm in study.arms():
        rec = searches[arm.name]
        for subject in study.subjects:
            for seed in study.final_seeds:
                key = final_key(arm, subject, seed)
                flat = study.base_flat(arm, subject, seed) | dict(rec["best_config"]) | {
                    "run_name": f"{arm.name}-sub{subject}-seed{seed}"
                }
                tags = {
                    "study": study.name,
                    "search": arm.name,
                    "arm": arm.arm,
                    "subject": subject,
                    "final_key": key,
                    "selected_by": f"{study.space(arm.encoder).metric} on sub-{study.search_subject} validation",
                }
                out.append(FinalSpec(key, arm, subject, seed, flat, str(rec["run_id"]), tags))
    return out


def final_rows(specs: list[FinalSpec], records: Mapping[str, Mapping[str, Any]]) -> list[FinalRow]:
    """Report rows of the finished finals (``records``: key -> recorded metrics)."""
    rows = []
    for s in specs:
        rec = records[s.key]
        rows.append(FinalRow(
            encoder=s.arm.encoder, backbone=s.arm.backbone, alignment=s.arm.alignment, arm=s.arm.arm,
            subject=s.subject, seed=s.seed, run_id=str(rec["run_id"]),
            test_top1=float(rec["test_top1"]), test_top5=float(rec["test_top5"]),
            test_n_way=float(rec.get("test_n_way", float("nan"))),
            extra={k: float(v) for k, v in rec.items() if GALLERY_METRIC.match(k)},
        ))
    return rows
