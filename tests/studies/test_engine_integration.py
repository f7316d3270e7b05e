"""A real tiny sweep through the engine: Ray Tune + Optuna + ASHA + Ray Train + MLflow
(SQLite), resumed.

One study runs once per module (2 arms x 2 trials x 2 epochs on subject 01, then finals on
2 subjects x 2 seeds per arm); the tests inspect what it left in MLflow (the layout a
researcher browses: tags, datasets, system metrics, pruned trials, the description), in
Ray's storage and in the report, then interrupt-and-resume it and count runs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from scipy import stats

pytestmark = pytest.mark.integration

SPACE = """
encoder = "nice"
metric = "val_top1_best"
mode = "max"
[params]
lr = { float = [2e-4, 2e-3], log = true }
temperature = { float = [0.03, 0.1], log = true }
"""

STUDY = """
[study]
name = "sweep-it"
dataset = "{dataset}"
subjects = ["01", "02"]
encoders = [{{ name = "nice", searchspace = "space.toml" }}]
pairs = [{{ backbone = "sim-clip", aligned = "simulated" }}]
trials = 2
max_epochs = 2
grace_period = 1
final_seeds = 2
seed = 0

[config]
batch_size = 16
"arch.n_filters" = 8
"""


def _client(home: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")


def _runs(home: Path, experiment: str = "sweep-it") -> list[Any]:
    client = _client(home)
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id], max_results=1000))


@pytest.fixture(scope="module")
def study_run(ray_session: object, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from brainalign.studies import load_study, run_study

    home = tmp_path_factory.mktemp("sweep-home")
    library_log = logging.getLogger("brainalign")
    level = library_log.level
    library_log.setLevel(logging.INFO)  # what the CLI configures: the study's log file gets INFO records
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAINALIGN_HOME", str(home))
        for var in ("MLFLOW_TRACKING_URI", "BRAINALIGN_CACHE", "BRAINALIGN_RAY_STORAGE"):
            mp.delenv(var, raising=False)
        (home / "space.toml").write_text(SPACE)
        path = home / "study.toml"
        path.write_text(STUDY.format(dataset=tiny_dataset))
        study = load_study(path)
        outcome = run_study(study, live=False)
        library_log.setLevel(level)
        yield SimpleNamespace(home=home, study=study, outcome=outcome, path=path)


@pytest.fixture
def home(study_run: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BRAINALIGN_HOME", str(study_run.home))
    return Path(study_run.home)


def test_mlflow_tree_roles_parents_tags_and_curves(study_run: Any, home: Path) -> None:
    runs = _runs(home)
    by_role: dict[str, list[Any]] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("role", "?"), []).append(r)
    assert {k: len(v) for k, v in by_role.items()} == {"report": 1, "search": 2, "trial": 4, "final": 8}
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    (parent,) = by_role["report"]
    assert parent.info.run_id == study_run.outcome.study_run_id
    searches = {r.info.run_id: r for r in by_role["search"]}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in searches.values())
    assert {r.data.tags["alignment"] for r in searches.values()} == {"simulated", "none"}
    by_arm = {r.data.tags["search"]: r for r in searches.values()}
    for r in by_role["trial"] + by_role["final"]:
        tags = r.data.tags
        for key in ("brain_encoder", "backbone", "alignment", "subject", "seed", "role", "study", "study_kind"):
            assert tags.get(key), (key, r.info.run_name)
        search = searches.get(tags["mlflow.parentRunId"]) or by_arm[tags["search"]]
        assert tags["alignment"] == search.data.tags["alignment"] and tags["brain_encoder"] == "nice"
    assert all(r.data.tags["mlflow.parentRunId"] in searches for r in by_role["trial"])
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in by_role["final"])
    assert {r.data.tags["subject"] for r in by_role["trial"]} == {"01"}
    finals = Counter((r.data.tags["alignment"], r.data.tags["subject"], r.data.tags["seed"]) for r in by_role["final"])
    assert set(finals.values()) == {1} and len(finals) == 8
    client = _client(home)
    for r in by_role["trial"]:
        curve = client.get_metric_history(r.info.run_id, "val_top1_best")
        assert len(curve) >= 1 and [m.step for m in curve] == list(range(len(curve)))
    for r in by_role["final"]:
        assert 0.0 <= r.data.metrics["test_top1"] <= r.data.metrics["test_top5"] <= 1.0
    for s in searches.values():
        assert "best_val_top1_best" in s.data.metrics and s.data.metrics["n_trials"] == 2


def test_mlflow_is_what_a_researcher_expects(study_run: Any, home: Path) -> None:
    """Model-development experiment, datasets as run inputs, system metrics on every Train run,
    ASHA's stopped trials tagged pruned, the report table as the study run's description."""
    client = _client(home)
    exp = client.get_experiment_by_name("sweep-it")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = _runs(home)
    fingerprint = json.loads((Path(study_run.study.dataset_path) / "dataset.json").read_text())["fingerprint"]
    for r in runs:
        role = r.data.tags["role"]
        if role in ("trial", "final"):
            names = {(i.dataset.name, i.dataset.digest) for i in r.inputs.dataset_inputs}
            assert ("sim-tiny", fingerprint) in names, (r.info.run_name, names)
            assert "system/cpu_utilization_percentage" in r.data.metrics, r.info.run_name
            assert "system/system_memory_usage_megabytes" in r.data.metrics, r.info.run_name
    trials = [r for r in runs if r.data.tags["role"] == "trial"]
    pruned = [r for r in trials if r.data.tags.get("pruned") == "true"]
    for r in trials:  # patience (30) never stops these 2-epoch runs: a short trial was pruned by ASHA
        assert (r.data.metrics["epoch"] + 1 < 2) == (r in pruned), r.info.run_name
    searches = [r for r in runs if r.data.tags["role"] == "search"]
    assert sum(s.data.metrics["n_pruned"] for s in searches) == len(pruned)
    parent = client.get_run(study_run.outcome.study_run_id)
    note = parent.data.tags["mlflow.note.content"]
    assert note.endswith(study_run.outcome.report.markdown) and "| nice | sim-clip (simulated vs none)" in note
    assert [i.dataset.digest for i in parent.inputs.dataset_inputs] == [fingerprint]
    log_file = home / "ray_results" / "sweep-it" / "study.log"
    text = log_file.read_text()
    assert "search nice__sim-clip__simulated" in text and "Trial" in text  # ours and Tune's


def test_search_never_sees_test_metrics(study_run: Any, home: Path) -> None:
    for r in _runs(home):
        if r.data.tags.get("role") in ("trial", "search"):
            assert not [k for k in r.data.metrics if k.startswith("test")], r.info.run_name
    # what Tune and Optuna saw: every reported result of every search trial
    storage = home / "ray_results" / "sweep-it"
    seen: set[str] = set()
    for arm in study_run.study.arms():
        files = list((storage / arm.name).glob("*/result.json"))
        assert files, arm.name
        for f in files:
            for line in f.read_text().splitlines():
                seen |= set(json.loads(line))
    assert "val_top1_best" in seen and not [k for k in seen if k.startswith("test")]


def test_report_artifacts_and_p_values_equal_scipy(study_run: Any, home: Path, tmp_path: Path) -> None:
    client = _client(home)
    pid = study_run.outcome.study_run_id
    names = {Path(a.path).name for a in client.list_artifacts(pid, "report")}
    assert names == {"table.md", "table.html", "figure.png", "forest.png", "runs.csv", "subjects.csv", "stats.json"}
    d = Path(client.download_artifacts(pid, "report", str(tmp_path)))
    rows = list(csv.DictReader(io.StringIO((d / "runs.csv").read_text())))
    assert len(rows) == 8
    # the logged per-run values are the finals' MLflow metrics
    for row in rows:
        assert client.get_run(row["run_id"]).data.metrics["test_top1"] == pytest.approx(float(row["test_top1"]))
    doc = json.loads((d / "stats.json").read_text())
    parent = client.get_run(pid).data.metrics
    for comp in doc["comparisons"]:
        metric = comp["metric"]
        c = comp["comparison"]
        val = {(r["arm"], r["subject"], int(r["seed"])): float(r[metric]) for r in rows}
        keys = sorted({(s, k) for _, s, k in val})
        subs = sorted({s for s, _ in keys})
        a_sub = [sum(val[("aligned", s, k)] for s2, k in keys if s2 == s) / 2 for s in subs]
        b_sub = [sum(val[("base", s, k)] for s2, k in keys if s2 == s) / 2 for s in subs]
        # subject level only (seed-averaged): no across-runs test anywhere in the report
        assert "ttest_runs" not in comp and "wilcoxon_runs" not in comp and c["design"] == "2 x 2"
        if c["t_test"]["p"] is None:  # undefined (e.g. constant differences): NaN with a note
            assert c["notes"]
        else:
            assert c["t_test"]["p"] == pytest.approx(stats.ttest_rel(a_sub, b_sub).pvalue)
            assert parent[f"nice.sim-clip.{metric}.p_ttest"] == pytest.approx(c["t_test"]["p"])
        assert c["a"]["mean"] == pytest.approx(sum(a_sub) / len(a_sub)) and c["correction"] == "holm"
    md = (d / "table.md").read_text()
    assert md == study_run.outcome.report.markdown and "| nice | sim-clip (simulated vs none)" in md
    assert (d / "figure.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_interruption_adds_no_duplicate_runs(study_run: Any, home: Path) -> None:
    from brainalign import tracking
    from brainalign.studies import load_study, run_study
    from brainalign.studies.units import unit_key

    before = {r.info.run_id for r in _runs(home)}
    study = load_study(study_run.path)
    state_path = home / "ray_results" / "sweep-it" / "study_state.json"
    state = json.loads(state_path.read_text())
    arm = study.arms()[1]
    study_run_id = state["study_run_id"]
    # an interruption after the arm's search had finished in Tune but before its "done" marker,
    # and in the middle of its finals: one final's record is lost, another final was cut short
    # (its process was killed: its run stays RUNNING, its record was never written)
    state["searches"][arm.name]["done"] = False
    state["report_logged"] = False
    lost, killed = unit_key(arm, "01", 0), unit_key(arm, "02", 1)
    killed_run, lost_run = state["finals"][killed]["run_id"], state["finals"][lost]["run_id"]
    del state["finals"][lost], state["finals"][killed]
    state_path.write_text(json.dumps(state))
    search_run = state["searches"][arm.name]["run_id"]
    stale = tracking.start_run("sweep-it", run_name="killed attempt", parent_run_id=study_run_id,
                               tags={"role": "final", "final_key": killed, "study": "sweep-it"})
    tracking.log_metrics(stale, {"train_loss": 1.0}, step=0)
    # a finished final of the same key from an EARLIER execution of this study (another study
    # run): it must be neither adopted nor deleted
    old_study = tracking.start_run("sweep-it", run_name="earlier study", tags={"role": "report"})
    decoy = tracking.start_run("sweep-it", run_name="earlier final", parent_run_id=old_study,
                               tags={"role": "final", "final_key": lost})
    tracking.log_metrics(decoy, {"test_top1": 0.99, "test_top5": 1.0}, step=0)
    tracking.end_run(decoy, "FINISHED")
    tracking.end_run(old_study, "FINISHED")

    outcome = run_study(study, live=False)

    after = {r.info.run_id: r for r in _runs(home) if r.info.run_id not in (decoy, old_study)}
    assert set(after) == before  # the stale attempt is deleted, nothing is re-run
    assert _client(home).get_run(decoy).info.lifecycle_stage == "active"
    assert outcome.study_run_id == study_run.outcome.study_run_id
    new_state = json.loads(state_path.read_text())
    assert new_state["searches"][arm.name]["done"] and new_state["searches"][arm.name]["run_id"] == search_run
    assert new_state["finals"][killed]["run_id"] == killed_run
    assert new_state["finals"][lost]["run_id"] == lost_run  # this execution's run, not the earlier decoy
    assert _client(home).get_run(stale).info.lifecycle_stage == "deleted"
    assert all(r.info.status == "FINISHED" for r in after.values())
    assert outcome.report.markdown == study_run.outcome.report.markdown


def test_fresh_is_refused_for_an_edited_study(study_run: Any, home: Path) -> None:
    from brainalign import BrainalignError
    from brainalign.studies import load_study, run_study

    edited = home / "edited.toml"
    edited.write_text(study_run.path.read_text().replace("final_seeds = 2", "final_seeds = 3"))
    with pytest.raises(BrainalignError, match="was edited since it started.*--fresh"):
        run_study(load_study(edited), live=False)


def test_sigint_mid_search_then_rerun_gives_exactly_one_run_per_trial_and_final(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """A real interruption: `brainalign study run` (its own Ray) gets SIGINT once its first trial
    has reported an epoch; the same command then resumes (Tuner.restore of an UNFINISHED
    experiment) and the MLflow tree holds exactly one finished run per trial and final."""
    import os
    import signal
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    home.mkdir()
    (home / "space.toml").write_text(SPACE)
    study = STUDY.format(dataset=tiny_dataset).replace('name = "sweep-it"', 'name = "sweep-int"')
    study = study.replace('subjects = ["01", "02"]', 'subjects = ["01"]').replace("final_seeds = 2", "final_seeds = 1")
    study = study.replace("max_epochs = 2", "max_epochs = 3")
    (home / "study.toml").write_text(study)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env |= {"BRAINALIGN_HOME": str(home), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    cmd = [str(Path(sys.executable).parent / "brainalign"), "study", "run", str(home / "study.toml"), "--quiet"]

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        reported = False
        while time.monotonic() < deadline and proc.poll() is None and not reported:
            time.sleep(2)
            # the state file is written after the driver created (and migrated) the MLflow DB: opening
            # a client on a DB still being migrated races the driver (alembic "table already exists")
            if (home / "ray_results" / "sweep-int" / "study_state.json").exists():
                try:
                    trials = [r for r in _runs(home, "sweep-int") if r.data.tags.get("role") == "trial"]
                except Exception:  # the experiment is not created yet
                    continue
                reported = any("val_top1_best" in r.data.metrics for r in trials)
        assert reported and proc.poll() is None, "the sweep ended before a trial reported"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "Resume with the same command" in out
    assert not [r for r in _runs(home, "sweep-int") if r.info.status == "RUNNING"]

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    runs = _runs(home, "sweep-int")
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    roles = Counter(r.data.tags.get("role") for r in runs)
    assert roles == {"report": 1, "search": 2, "trial": 4, "final": 2}, roles
    per_trial = Counter(r.data.tags.get("tune_trial_id") for r in runs if r.data.tags.get("role") == "trial")
    assert set(per_trial.values()) == {1}


def _units_of(study: Any, study_run_id: str) -> tuple[Any, Any]:
    from brainalign.paths import Locations
    from brainalign.studies.engine import make_plan
    from brainalign.studies.units import StudyContext

    plan = make_plan(study)
    return plan, StudyContext(study_run_id, Locations.current())


def test_searches_ran_side_by_side_and_each_equals_the_search_run_alone(study_run: Any, home: Path,
                                                                          tmp_path: Path) -> None:
    """The study's two searches ran at the same time (their MLflow runs overlap; one after the
    other, the second starts after the first ended), and each found what it finds alone: the
    second arm's search, run again by itself in the main thread, has the same trials (configs,
    best values, epochs reached: ASHA decided the same) and the same best config."""
    from dataclasses import replace

    from brainalign import tracking
    from brainalign.studies import _tune

    searches = [r for r in _runs(home) if r.data.tags.get("role") == "search"]
    a, b = (r.info for r in searches)
    assert a.start_time < b.end_time and b.start_time < a.end_time, "the searches ran one after the other"

    plan, ctx = _units_of(study_run.study, study_run.outcome.study_run_id)
    unit = plan.searches(ctx)[1]
    recorded = next(r for r in searches if r.data.tags["search"] == unit.key)
    tracking.ensure_experiment("sweep-it-alone")
    parent = tracking.start_run("sweep-it-alone", run_name=unit.key, tags={"role": "search"})
    alone_unit = replace(unit, trial=replace(unit.trial, experiment="sweep-it-alone"),
                         trial_spec=replace(unit.trial_spec, parent_run_id=parent))
    alone = _tune.run_search(alone_unit, folder=tmp_path, resources=study_run.study.resources,
                             max_concurrent=_tune.SEARCH_CONCURRENCY, log_file=tmp_path / "alone.log")
    tracking.end_run(parent)

    def trials(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((r["lr"], r["temperature"], r["val_top1_best"], r["epochs"]) for r in rows)

    board = tracking.download_json(recorded.info.run_id, "leaderboard.json")
    assert trials(board) == trials([{"val_top1_best": t.value, "epochs": t.epochs, **t.config} for t in alone.trials])
    assert tracking.download_json(recorded.info.run_id, "best_config.json") == alone.best_config
    assert recorded.data.metrics["best_val_top1_best"] == alone.best_value


def test_packs_by_arm_give_every_run_what_it_got_packed_by_subject(study_run: Any, home: Path,
                                                                    tmp_path: Path) -> None:
    """``[resources] pack = "arm"``: one Train worker group trains all of an arm's runs (2
    subjects x 2 seeds) one after the other; every run gets the test and validation metrics
    it got in the study, where it was packed with its subject's seeds only."""
    from dataclasses import replace

    from brainalign import tracking
    from brainalign.studies import _tune, load_study

    study = load_study(study_run.path, ['resources.pack="arm"'])
    assert study.resources.pack == "arm" and study.fingerprint() == study_run.study.fingerprint()
    state = json.loads((home / "ray_results" / "sweep-it" / "study_state.json").read_text())
    plan, ctx = _units_of(study, state["study_run_id"])
    arm = study.arms()[0].name
    tracking.ensure_experiment("sweep-it-arm")
    parent = tracking.start_run("sweep-it-arm", run_name="packed by arm", tags={"role": "report"})
    units = [replace(u, config=replace(u.config, experiment="sweep-it-arm"), spec=replace(u.spec, parent_run_id=parent))
             for u in plan.runs(ctx, {k: r["best_config"] for k, r in state["searches"].items()}) if u.arm.name == arm]
    assert len(units) == 4 and len(_tune.pack_units(units, "arm")) == 1
    outcome = _tune.run_units(units, name=_tune.units_experiment("arm"), folder=tmp_path,
                              state_path=tmp_path / "no_state.json", resources=study.resources, max_concurrent=2,
                              log_file=tmp_path / "runs.log")
    tracking.end_run(parent)
    assert not outcome.failed and not outcome.interrupted and set(outcome.results) == {u.key for u in units}
    for key, rec in outcome.results.items():
        before = state["finals"][key]
        assert rec["run_id"] != before["run_id"]
        same = {k: v == before[k] or (v != v and before[k] != before[k]) for k, v in rec.items() if k != "run_id"}
        assert same and all(same.values()), (key, rec, before)  # (NaN equals NaN here)
    packed = {r.data.tags["tune_trial_id"] for r in _runs(home, "sweep-it-arm") if r.data.tags.get("role") == "final"}
    assert len(packed) == 1  # one Tune trial (one worker group) trained the four runs
