"""Run a study end to end: dataset, searches, finals, report; resumable at every step.

MLflow layout (one experiment per study, named after it)::

    <study> (role=report)             parent run: study params, the report artifacts
    ├── <arm> (role=search)           one per encoder x table; best config, leaderboard
    │   ├── <arm>-trial-<id> (role=trial)   per-epoch validation curves, no test metrics
    │   └── <arm>-sub<S>-seed<k> (role=final) test top-1/top-5, checkpoint, rankings
    └── ...

Progress is recorded in ``<ray storage>/<study>/sweep_state.json`` (see ``_state``); the
Tune experiments live next to it (``<arm>/`` per search, ``finals/``).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import paths, tracking
from .._checks import BrainalignError, check_option
from . import _state
from .finals import final_rows, plan_finals
from .report import Report, write_report
from .study import Arm, Study, ensure_dataset, validate_data

__all__ = ["StudyOutcome", "run_study", "study_storage"]

log = logging.getLogger(__name__)
MODES = ("auto", "resume", "fresh")


@dataclass
class StudyOutcome:
    """What :func:`run_study` produced."""

    study: str
    parent_run_id: str
    experiment: str
    report: Report
    searches: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def study_storage(study: Study) -> Path:
    """The study's Ray storage folder (Tune experiments and the state file)."""
    return paths.ray_storage() / study.name


def _start_parent(study: Study, uri: str) -> str:
    params: dict[str, Any] = {
        "study.file": study.path,
        "study.dataset": str(study.dataset_path),
        "study.subjects": ",".join(study.subjects),
        "study.search_subject": study.search_subject,
        "study.encoders": ",".join(e.name for e in study.encoders),
        "study.pairs": ",".join(f"{p.aligned_table}|{p.base_table}" for p in study.pairs),
        "study.trials": study.trials,
        "study.max_epochs": study.max_epochs,
        "study.grace_period": study.grace_period,
        "study.reduction_factor": study.reduction_factor,
        "study.final_seeds": ",".join(map(str, study.final_seeds)),
        "study.seed": study.seed,
        "study.fingerprint": study.fingerprint(),
    } | {f"config.{k}": v for k, v in study.config.items()}
    tags = {"role": "report", "study": study.name, "git_commit": tracking.code_version()}
    if study.description:
        tags["mlflow.note.content"] = study.description
    run_id = tracking.start_run(study.name, run_name=f"study-{study.name}", params=params, tags=tags, uri=uri)
    tracking.log_dict(run_id, study.to_json(), "study/study.json", uri=uri)
    return run_id


def _search_tags(study: Study, arm: Arm) -> dict[str, str]:
    return {"study": study.name, "search": arm.name, "arm": arm.arm, "subject": study.search_subject}


def _run_search(study: Study, arm: Arm, state: _state.StudyState, uri: str, max_concurrent: int,
                verbose: int) -> None:
    from .search import run_search

    space = study.space(arm.encoder)
    rec = state.searches.get(arm.name, {})
    run_id = rec.get("run_id")
    if not run_id:
        # an interruption between creating the run and saving the state leaves it unrecorded:
        # adopt it (the newest, deleting any older ones) rather than add a second search run
        run_id = _state.reconcile_runs(
            _state.find_runs(study.name, {"role": "search", "search": arm.name,
                                          "mlflow.parentRunId": state.parent_run_id}, uri), None, uri)
        if run_id:
            _state.set_status(run_id, "RUNNING", uri)
    if not run_id:
        run_id = tracking.start_run(
            study.name, run_name=arm.name, parent_run_id=state.parent_run_id, uri=uri,
            params={"searchspace": space.path, "metric": space.metric, "mode": space.mode,
                    "trials": study.trials, "max_epochs": study.max_epochs, "grace_period": study.grace_period,
                    "reduction_factor": study.reduction_factor, "optuna_seed": study.seed,
                    "image_table": arm.table, "search_subject": study.search_subject},
            tags={"role": "search", "brain_encoder": arm.encoder, "backbone": arm.backbone,
                  "alignment": arm.alignment, "aligned": str(arm.aligned).lower(), "seed": str(study.seed),
                  "image_table": arm.table} | _search_tags(study, arm),
        )
    if not rec.get("run_id"):
        tracking.log_dict(run_id, space.to_json(), "searchspace.json", uri=uri)
        state.searches[arm.name] = {"run_id": run_id, "done": False}
        state.save()
    else:
        _state.set_status(run_id, "RUNNING", uri)
    log.info("search %s (%d trials, <= %d epochs) -> MLflow run %s", arm.name, study.trials, study.max_epochs,
             run_id)
    try:
        outcome = run_search(
            name=arm.name, storage=study_storage(study), space=space,
            base=study.base_flat(arm, study.search_subject, study.seed), parent_run_id=run_id,
            tags=_search_tags(study, arm), trials=study.trials, max_epochs=study.max_epochs,
            grace_period=study.grace_period, reduction_factor=study.reduction_factor, seed=study.seed,
            resources=study.resources, max_concurrent=max_concurrent, verbose=verbose,
        )
    except KeyboardInterrupt:
        tracking.end_run(run_id, "KILLED", uri=uri)
        raise
    except BaseException:
        tracking.end_run(run_id, "FAILED", uri=uri)
        raise
    # one MLflow run per Tune trial (a resumed trial ran again); trials stopped by ASHA
    # could not end their run
    n_stopped = 0
    for t in outcome.trials:
        runs = _state.find_runs(study.name, {"mlflow.parentRunId": run_id, "tune_trial_id": t.trial_id}, uri)
        stopped = not t.error and t.epochs < study.max_epochs
        tags = {"stopped_early": "true"} if stopped else {}
        kept = _state.reconcile_runs(runs, None, uri, finish_tags=None if t.error else tags)
        n_stopped += bool(kept and stopped and runs[-1].info.status != "FINISHED")
        if kept and t.error:
            _state.set_status(kept, "FAILED", uri)
    leaderboard = sorted(
        ({"trial_id": t.trial_id, space.metric: None if math.isnan(t.value) else t.value, "epochs": t.epochs,
          "error": t.error.splitlines()[0] if t.error else "", **t.config} for t in outcome.trials),
        key=lambda d: (d[space.metric] is None, -(d[space.metric] or 0) if space.mode == "max"
                       else (d[space.metric] or 0)),
    )
    tracking.log_dict(run_id, outcome.best_config, "best_config.json", uri=uri)
    tracking.log_dict(run_id, leaderboard, "leaderboard.json", uri=uri)
    tracking.log_metrics(run_id, {f"best_{space.metric}": outcome.best_value, "n_trials": len(outcome.trials),
                                  "n_errored": outcome.n_errored,
                                  "n_stopped_early": n_stopped},
                         uri=uri)
    tracking.set_tags(run_id, {"best_trial_id": outcome.best_trial_id}, uri=uri)
    tracking.end_run(run_id, "FINISHED", uri=uri)
    state.searches[arm.name] = {"run_id": run_id, "done": True, "best_config": outcome.best_config,
                                "best_value": outcome.best_value, "best_trial_id": outcome.best_trial_id}
    state.save()
    log.info("search %s: best %s = %.4f with %s", arm.name, space.metric, outcome.best_value, outcome.best_config)


def _prepare(study: Study, runs: list[tuple[str, int]]) -> None:
    """Prepare (cache) the training data of each (subject, seed) once, here in the driver.

    Concurrent trials would otherwise prepare the same cache entry at the same time (every
    search trial uses the same subject and seed); the cache key does not depend on the
    image table, so one entry serves both arms.
    """
    from ..config import TrainConfig
    from ..data.prepare import prepare

    arm = study.arms()[0]
    for subject, seed in dict.fromkeys(runs):
        t0 = time.perf_counter()
        prepared = prepare(TrainConfig.from_flat(study.base_flat(arm, subject, seed)))
        log.info("training data of sub-%s (seed %d): %s (%.1f s)", subject, seed, prepared.root,
                 time.perf_counter() - t0)


def _run_finals(study: Study, state: _state.StudyState, uri: str, max_concurrent: int, verbose: int) -> None:
    from .search import gallery_metrics, run_finals_tune

    specs = plan_finals(study, state.searches)
    todo = [s for s in specs if s.key not in state.finals]
    # a final finished in MLflow whose record was lost (interrupted between the two) is adopted;
    # attempts cut short are deleted (Tune runs them again). Only runs under THIS sweep's
    # search run count: an earlier sweep of the study (--fresh, or an edited study) left runs
    # with the same final_key that must not be taken for this one's.
    for s in todo:
        runs = _state.find_runs(study.name, {"final_key": s.key, "mlflow.parentRunId": s.parent_run_id}, uri)
        finished = [r for r in runs if r.info.status == "FINISHED" and "test_top1" in r.data.metrics]
        if finished:
            kept = _state.reconcile_runs(runs, finished[-1].info.run_id, uri)
            m = finished[-1].data.metrics
            state.finals[s.key] = {"run_id": kept, "test_top1": m["test_top1"], "test_top5": m["test_top5"],
                                   "test_n_way": m.get("test_n_way", float("nan"))} | gallery_metrics(m)
        else:
            for r in runs:
                log.info("deleting final run %s left by an interrupted attempt", r.info.run_id)
                _state.delete_run(r.info.run_id, uri)
    state.save()
    if all(s.key in state.finals for s in specs):
        return
    log.info("finals: %d of %d to run (%d at a time)", sum(s.key not in state.finals for s in specs), len(specs),
             max_concurrent)
    _prepare(study, [(s.subject, s.seed) for s in specs if s.key not in state.finals])
    outcome = run_finals_tune(
        name="finals", storage=study_storage(study), finals={s.key: s.job() for s in specs},
        state_path=state.path, resources=study.resources, max_concurrent=max_concurrent, verbose=verbose,
    )
    parents = {s.key: s.parent_run_id for s in specs}
    for key, rec in outcome.results.items():
        runs = _state.find_runs(study.name, {"final_key": key, "mlflow.parentRunId": parents[key]}, uri)
        _state.reconcile_runs(runs, str(rec["run_id"]), uri)
        state.finals[key] = {k: v for k, v in rec.items()}
    state.save()
    if outcome.interrupted:
        raise KeyboardInterrupt("finals were interrupted; run the same command again to resume.")
    if outcome.failed:
        shown = "; ".join(f"{k}: {e}" for k, e in sorted(outcome.failed.items())[:5])
        raise RuntimeError(f"{len(outcome.failed)} final run(s) failed ({shown}). Fix the cause and re-run to resume.")
    missing = [s.key for s in specs if s.key not in state.finals]
    if missing:
        raise RuntimeError(f"finals finished without results for {missing}")


def _report(study: Study, state: _state.StudyState, uri: str) -> Report:
    specs = plan_finals(study, state.searches)
    rows = final_rows(specs, state.finals)
    out_dir = paths.home() / "reports" / study.name
    context = {"study": study.name, "study_file": study.path, "parent_run_id": state.parent_run_id,
               "tracking_uri": uri, "selection": {a: {"best_config": r.get("best_config"),
                                                     "best_value": r.get("best_value")}
                                                 for a, r in state.searches.items()}}
    title = f"Study {study.name}: human-aligned vs base (test, {len(study.subjects)} subjects × " \
            f"{len(study.final_seeds)} seeds)"
    report = write_report(rows, out_dir, title=title, context=context)
    if not state.report_logged:
        for f in report.files.values():
            tracking.log_artifact(state.parent_run_id, f, "report", uri=uri)
        metrics: dict[str, float] = {}
        for s in report.stats:
            pre = f"{s.encoder}.{s.backbone}.{s.metric}"
            for name, v in (("aligned_mean", s.aligned_subject_mean), ("base_mean", s.base_subject_mean),
                            ("rel_improvement", s.relative_improvement), ("p_ttest_subjects", s.ttest_subjects.p),
                            ("p_ttest_runs", s.ttest_runs.p), ("p_wilcoxon_subjects", s.wilcoxon_subjects.p),
                            ("p_wilcoxon_runs", s.wilcoxon_runs.p)):
                if not math.isnan(v):
                    metrics[f"{pre}.{name}"] = v
        tracking.log_metrics(state.parent_run_id, metrics, uri=uri)
        tracking.end_run(state.parent_run_id, "FINISHED", uri=uri)
        state.report_logged = True
        state.save()
    return report


def run_study(study: Study, *, mode: str = "auto", verbose: int = 1) -> StudyOutcome:
    """Run a study: simulate/check data, search every arm, train and test finals, report.

    Parameters
    ----------
    study : Study
        From :func:`~brainalign.sweep.load_study`.
    mode : {"auto", "resume", "fresh"}
        ``auto`` resumes a study with saved state and starts one without; ``resume`` requires
        saved state; ``fresh`` discards the saved state and the study's Tune experiments and
        starts over (a new parent run; the old runs stay in MLflow).
    verbose : int
        Tune's console verbosity (0 silent, 1 trial status tables).

    Returns
    -------
    StudyOutcome

    Raises
    ------
    BrainalignError
        Invalid data for the study, an edited study with saved state, or ``resume`` without state.
    KeyboardInterrupt
        Interrupted (Ctrl-C); the same call resumes.
    """
    from ..train.runner import ensure_ray

    check_option("mode", mode, MODES)
    t0 = time.perf_counter()
    storage = study_storage(study)
    state_path = storage / "sweep_state.json"
    if mode == "fresh" and storage.exists():
        log.info("--fresh: removing %s", storage)
        shutil.rmtree(storage)
    state = _state.StudyState.load(state_path, study.name, study.fingerprint())
    if state is None and mode == "resume":
        raise BrainalignError(f"nothing to resume for study {study.name}: {state_path} does not exist.")

    ensure_dataset(study)
    validate_data(study)
    uri = tracking.tracking_uri()
    tracking.ensure_experiment(study.name, uri)  # created once, here, before any trial process
    ensure_ray()
    import ray

    max_concurrent = _concurrency(study, ray.cluster_resources())  # type: ignore[no-untyped-call]

    if state is None:
        state = _state.StudyState(path=state_path, study=study.name, fingerprint=study.fingerprint())
        state.parent_run_id = _start_parent(study, uri)
        state.save()
        log.info("study %s: MLflow experiment %r, parent run %s", study.name, study.name, state.parent_run_id)
    else:
        log.info("study %s: resuming (parent run %s)", study.name, state.parent_run_id)
        if not state.report_logged:
            _state.set_status(state.parent_run_id, "RUNNING", uri)
    try:
        if not all(state.searches.get(a.name, {}).get("done") for a in study.arms()):
            _prepare(study, [(study.search_subject, study.seed)])
        for arm in study.arms():
            if state.searches.get(arm.name, {}).get("done"):
                log.info("search %s already done", arm.name)
                continue
            _run_search(study, arm, state, uri, max_concurrent, verbose)
        _run_finals(study, state, uri, max_concurrent, verbose)
        report = _report(study, state, uri)
    except KeyboardInterrupt:
        if not state.report_logged:
            tracking.end_run(state.parent_run_id, "KILLED", uri=uri)
        _state.end_running(study.name, study.name, "KILLED", uri)
        raise
    except BaseException:
        if not state.report_logged:
            tracking.end_run(state.parent_run_id, "FAILED", uri=uri)
        _state.end_running(study.name, study.name, "FAILED", uri)
        raise
    return StudyOutcome(study=study.name, parent_run_id=state.parent_run_id, experiment=study.name,
                        report=report, searches=dict(state.searches), seconds=time.perf_counter() - t0)


def _concurrency(study: Study, cluster: Mapping[str, float]) -> int:
    from .search import max_concurrent_trials

    n = max_concurrent_trials(study.resources, cluster)
    log.info("Ray has %s CPUs%s: %d trial(s) at a time (%g CPU each, 1 CPU kept free for Ray Data)",
             cluster.get("CPU"), f", {cluster.get('GPU')} GPUs" if cluster.get("GPU") else "", n,
             study.resources.cpus_per_trial)
    return n
