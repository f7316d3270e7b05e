"""tracking.py against a real MLflow SQLite store: run lifecycle, queries, inputs, system metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign import tracking

pytestmark = pytest.mark.integration  # a real MLflow store (a new SQLite database per test)


def _client() -> object:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.tracking_uri())


def test_run_lifecycle_ends_finished_failed_or_killed() -> None:
    with tracking.run("lc", run_name="ok") as ok:
        assert tracking.get_run(ok).status == "RUNNING"
    assert tracking.get_run(ok).status == "FINISHED"
    ids = {}
    for name, exc in (("fails", RuntimeError("boom")), ("ctrl-c", KeyboardInterrupt()), ("exit", SystemExit(1))):
        with pytest.raises(type(exc)), tracking.run("lc", run_name=name) as rid:
            ids[name] = rid
            raise exc
    assert [tracking.get_run(ids[n]).status for n in ("fails", "ctrl-c", "exit")] == ["FAILED", "KILLED", "KILLED"]
    # a stop marks runs KILLED first; the failure its unwinding raises must not turn them FAILED
    tracking.end_run(ids["ctrl-c"], "FAILED")
    assert tracking.get_run(ids["ctrl-c"]).status == "KILLED"
    # the experiment opens as model development in the MLflow 3 UI, not as a GenAI experiment
    exp = _client().get_experiment_by_name("lc")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location.startswith("file://") and "mlruns/artifacts/lc" in exp.artifact_location


def test_ended_cascades_to_the_study_runs_only() -> None:
    parent = tracking.start_run("cas", run_name="study", tags={"study": "s"})
    child = tracking.start_run("cas", run_name="trial", tags={"study": "s"}, parent_run_id=parent)
    done = tracking.start_run("cas", run_name="done", tags={"study": "s"})
    tracking.end_run(done)
    other = tracking.start_run("cas", run_name="other study", tags={"study": "t"})
    with pytest.raises(RuntimeError), tracking.ended(parent, cascade=("cas", {"study": "s"})):
        raise RuntimeError("x")
    status = {r: tracking.get_run(r).status for r in (parent, child, done, other)}
    assert status == {parent: "FAILED", child: "FAILED", done: "FINISHED", other: "RUNNING"}
    with tracking.ended(other, finish=False):
        pass
    assert tracking.get_run(other).status == "RUNNING"


def test_queries_reconcile_and_json_artifacts() -> None:
    parent = tracking.start_run("q", run_name="p", tags={"role": "report"})
    a = tracking.start_run("q", run_name="a1", parent_run_id=parent, tags={"unit": "a"})
    a2 = tracking.start_run("q", run_name="a2", parent_run_id=parent, tags={"unit": "a"})
    b = tracking.start_run("q", run_name="b", parent_run_id=parent, tags={"unit": "b", "role": "x"})
    tracking.log_dict(a2, {"lr": 0.1}, "cfg/c.json")
    assert [r.run_id for r in tracking.find_runs("q", {"unit": "a"})] == [a, a2]  # oldest first
    assert {r.run_id for r in tracking.children(parent)} == {a, a2, b}
    assert [r.run_id for r in tracking.children(parent, tags={"role": "x"})] == [b]
    assert tracking.find_runs("nope", {"unit": "a"}) == []
    assert tracking.download_json(a2, "cfg/c.json") == {"lr": 0.1}
    kept = tracking.reconcile_runs(tracking.find_runs("q", {"unit": "a"}), None, finish_tags={"pruned": "true"})
    assert kept == a2 and tracking.get_run(a).deleted
    rec = tracking.get_run(a2)
    assert rec.status == "FINISHED" and rec.tags["pruned"] == "true" and rec.parent_run_id == parent
    assert tracking.end_running("q", {"role": "x"}, "KILLED") == 1 and tracking.get_run(b).status == "KILLED"
    assert tracking.end_running("q", {"role": "x"}, "KILLED") == 0  # idempotent
    tracking.set_description(parent, "| a | b |")
    assert tracking.get_run(parent).tags["mlflow.note.content"] == "| a | b |"


def test_dataset_input_and_system_metrics(tmp_path: Path) -> None:
    with tracking.run("inp", run_name="r") as rid:
        tracking.log_dataset(rid, name="sim-tiny", digest="0123456789abcdef", source=str(tmp_path), context="train/val",
                             profile={"subjects": ["01"]})
        with tracking.system_metrics(rid, interval=60):  # shorter than one interval: one sample at the end
            pass
    run = _client().get_run(rid)
    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("sim-tiny", "0123456789abcdef")
    assert str(tmp_path) in inp.dataset.source
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train/val"
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics
