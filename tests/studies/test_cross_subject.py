"""The cross-subject plan: leave-one-subject-out units, and hyperparameters from MLflow runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign import BrainalignError, tracking
from brainalign.config import TrainConfig
from brainalign.paths import Locations
from brainalign.studies import CrossSubjectPlan, StudyContext, load_study

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "jobs" / "cross_subject_mini.toml"


def _study(tiny: Path, *sets: str) -> object:
    return load_study(MINI, [f"study.dataset={tiny}", "study.simulate.preset=tiny", 'study.subjects=["01", "02"]',
                             "study.final_seeds=[1]", "study.max_epochs=1", *sets])


def test_plan_holds_each_subject_out(tiny_dataset: Path) -> None:
    st = _study(tiny_dataset)
    plan = CrossSubjectPlan(st, tracking.tracking_uri())
    assert plan.searches(StudyContext("p", Locations.current())) == []
    units = plan.runs(StudyContext("p", Locations.current()), {})
    assert len(units) == 2 * 2 and [u.key for u in units] == plan.run_keys()
    u = next(u for u in units if u.subject == "02" and u.arm.arm == "base")
    cfg = u.config
    assert cfg.data.subjects == ("01",) and cfg.data.test_subjects == ("02",) and cfg.data.cross_subject
    assert cfg.data.image_table == "sim-clip:none" and cfg.seed == 1 and cfg.epochs == 1
    assert cfg.experiment == "brainalign-cross-subject" and Path(cfg.data.path).is_absolute()
    assert cfg.lr == 1e-4 and cfg.select_metric == "val_loss"  # the study's [config]
    assert u.spec.parent_run_id == "p" and u.spec.tags["held_out_subject"] == "02" and u.spec.evaluate_test


@pytest.mark.integration  # a real (SQLite) MLflow store
def test_config_from_run_takes_hyperparameters_only(tiny_dataset: Path) -> None:
    src = TrainConfig().with_overrides({"lr": 3e-4, "temperature": 0.07, "seed": 99, "num_workers": 3,
                                        "data.path": "/elsewhere", "data.image_table": "x:y", "torch_threads": 3})
    with tracking.run("xs-src", run_name="best") as run:
        tracking.log_dict(run, src.to_flat(), "config/resolved_config.json")
    st = _study(tiny_dataset, f"study.config_from_run={run}", "temperature=0.05")
    u = CrossSubjectPlan(st, tracking.tracking_uri()).runs(StudyContext("p", Locations.current()), {})[0]
    assert u.config.lr == 3e-4 and u.config.temperature == 0.05  # from the run; --set still wins
    assert u.config.data.path == str(tiny_dataset) and u.config.num_workers == 1 and u.config.seed == 1
    assert u.config.torch_threads == 0 and u.config.epochs == 1  # machine and study-owned keys never move
    with pytest.raises(BrainalignError, match="config_from_run: cannot read"):
        CrossSubjectPlan(_study(tiny_dataset, "study.config_from_run=" + "0" * 32), tracking.tracking_uri())


@pytest.mark.integration
def test_config_from_sweep_gives_each_arm_its_own_best_config(tiny_dataset: Path) -> None:
    """A sweep's tree (study run -> one search per table, each with best_config.json): each
    arm's runs take their own search's config; bad ids fail before any run."""
    uri = tracking.tracking_uri()
    parent = tracking.start_run("xs-sweep", run_name="study-x", tags={"role": "report"})
    for table, lr, temp in (("sim-clip:simulated", 3e-4, 0.05), ("sim-clip:none", 7e-4, 0.09)):
        with tracking.run("xs-sweep", run_name=table, parent_run_id=parent,
                          tags={"role": "search", "brain_encoder": "nice", "image_table": table}) as child:
            tracking.log_dict(child, {"lr": lr, "temperature": temp, "seed": 5, "epochs": 9}, "best_config.json")
    tracking.end_run(parent)
    plan = CrossSubjectPlan(_study(tiny_dataset, f"study.config_from_sweep={parent}"), uri)
    units = plan.runs(StudyContext("p", Locations.current()), {})
    got = {(u.arm.alignment, u.config.lr, u.config.temperature, u.config.seed, u.config.epochs) for u in units}
    assert got == {("simulated", 3e-4, 0.05, 1, 1), ("none", 7e-4, 0.09, 1, 1)}
    lonely = tracking.start_run("xs-sweep", run_name="lonely")
    with pytest.raises(BrainalignError, match="no finished search"):
        CrossSubjectPlan(_study(tiny_dataset, f"study.config_from_sweep={lonely}"), uri)
    other = _study(tiny_dataset, f"study.config_from_sweep={parent}",
                   'study.pairs=[{ backbone = "sim-clip", aligned = "simulated", base = "other" }]')
    with pytest.raises(BrainalignError, match=r"tuned no 'nice' search for table\(s\) \['sim-clip:other'\]"):
        CrossSubjectPlan(other, uri)
