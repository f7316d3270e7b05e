"""The sweep plan: searches on the search subject, finals per subject and seed, typed units."""

from __future__ import annotations

from pathlib import Path

from brainalign.paths import Locations
from brainalign.studies import StudyContext, SweepPlan, load_study

SPACE = """
encoder = "nice"
[params]
lr = { float = [1e-5, 1e-3], log = true }
"""
STUDY = """
[study]
name = "plan"
dataset = "data/sim-tiny"
subjects = ["01", "02"]
search_subject = "02"
encoders = [{ name = "nice", searchspace = "space.toml" }]
pairs = [{ backbone = "sim-clip", aligned = "simulated" }]
trials = 3
max_epochs = 4
final_seeds = [5, 6]
seed = 9
[resources]
cpus_per_worker = 2
[config]
batch_size = 16
lr = 5e-4
"""


def _plan(tmp_path: Path) -> SweepPlan:
    (tmp_path / "space.toml").write_text(SPACE)
    (tmp_path / "s.toml").write_text(STUDY)
    return SweepPlan(load_study(tmp_path / "s.toml"), "sqlite:///unused")


def test_searches_are_typed_units_on_the_search_subject(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    ctx = StudyContext("study-run", Locations.current())
    s = plan.searches(ctx)
    assert [u.key for u in s] == ["nice__sim-clip__simulated", "nice__sim-clip__none"]
    u = s[1]
    assert u.trials == 3 and u.max_epochs == 4 and u.seed == 9 and u.space.names == ("lr",)
    assert u.trial.data.subjects == ("02",) and u.trial.seed == 9 and u.trial.data.image_table == "sim-clip:none"
    assert Path(u.trial.data.path).is_absolute() and u.trial.cpus_per_worker == 2.0 and u.trial.epochs == 4
    assert u.trial_spec.role == "trial" and not u.trial_spec.evaluate_test and not u.trial_spec.save_checkpoint
    assert u.trial_spec.locations == ctx.locations
    assert u.tags["search"] == u.key and u.tags["arm"] == "base" and u.tags["subject"] == "02"


def test_finals_take_each_arms_best_config(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    ctx = StudyContext("study-run", Locations.current())
    runs = plan.runs(ctx, {"nice__sim-clip__simulated": {"lr": 1e-3}, "nice__sim-clip__none": {"lr": 2e-5}})
    assert [u.key for u in runs] == plan.run_keys() and len(runs) == 2 * 2 * 2
    assert runs[0].key == "nice__sim-clip__simulated/sub-01/seed-5"
    by_arm = {u.arm.arm: u for u in runs if u.subject == "02" and u.seed == 6}
    assert by_arm["aligned"].config.lr == 1e-3 and by_arm["base"].config.lr == 2e-5
    u = by_arm["base"]
    assert u.config.data.subjects == ("02",) and u.config.data.test_subjects == () and u.config.seed == 6
    assert u.config.run_name == "nice__sim-clip__none-sub02-seed6"
    assert u.spec.role == "final" and u.spec.evaluate_test and u.spec.parent_run_id == "study-run"
    assert u.spec.tags["final_key"] == u.key and u.spec.tags["selected_by"] == "val_top1_best on sub-02 validation"
    assert "sweep" in plan.describe()[0] and "8 finals" in plan.describe()[0]
    assert plan.params()["study.trials"] == 3
