"""One engine for every kind of study: run a plan with resume, a stop guard and a report.

:func:`run_study` does, for any :class:`~brainalign.studies.units.Plan`:

1. checks before compute: where it runs (inside a Ray job ``BRAINALIGN_HOME`` must be
   absolute), the plan (a kind may read MLflow here, e.g. ``config_from_run``), the dataset
   (simulated when the study says so, then checked against the study);
2. the study's MLflow run and state file, created or resumed (:mod:`._state`);
3. the searches (:func:`._tune.run_search`), side by side in driver threads as far as the
   cluster fits them (:func:`side_by_side`; ``[study] parallel_searches = false``: one after
   the other), each one trial at a time and recorded when done;
4. the tested runs, dispatched as units (:func:`._tune.run_units`), reconciled with MLflow;
5. the report, rendered from what the runs logged in MLflow (:mod:`.report`), written to
   ``$BRAINALIGN_HOME/reports/<study>/``, logged to the study run (artifacts, metrics and its
   description).

Stopping: SIGTERM (``ray job stop``) and SIGINT (Ctrl-C) mark the study's RUNNING runs
KILLED at once (``ray job stop`` sends SIGKILL after a grace period) and unwind (searches
running side by side end their Tune loops first); any other failure marks them FAILED.
Either way the partial report of what finished is logged, and the same command resumes:
finished searches and tested runs are neither repeated nor logged twice. MLflow layout (one
experiment per study, default: named after it)::

    study-<name>                      role=report   study params, report/, p-values, description = table
    ├── <enc>__<backbone>__<align>    role=search   best_config.json, leaderboard.json
    │   └── <search>-trial-<tune id>  role=trial    validation curves only; pruned=true if ASHA stopped it
    └── <arm>-sub<S>-seed<k>          role=final    curves, test metrics, checkpoint; tag final_key
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

from .. import paths, tracking
from .._checks import BrainalignError, check_option
from .._io import claim_dir, remove_owned
from ..paths import Locations
from ._state import STATE_FILE, StudyState
from ._stats import gallery_values
from .data import ensure_dataset, validate_data
from .progress import LiveView, status_lines
from .report import (
    CombinedReport,
    Report,
    build_report,
    combine_reports,
    rows_from_runs,
    write_combined,
    write_report,
)
from .spec import Study, kind_info
from .units import Plan, RunUnit, SearchUnit, StudyContext

__all__ = [
    "MODES",
    "JobStopped",
    "StopGuard",
    "StudyOutcome",
    "check_locations",
    "check_study",
    "combine_studies",
    "make_plan",
    "ray_job_id",
    "render_report",
    "run_study",
    "side_by_side",
    "study_folder",
    "study_run_of",
    "study_status",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
MODES = ("auto", "resume", "fresh")
#: Set by the Ray job supervisor in the driver's environment: we run inside ``ray job submit``.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


# --------------------------------------------------------------------------- where it runs
def ray_job_id() -> str:
    """The submission id of the Ray job this driver runs in, or ``""``."""
    try:
        meta = json.loads(os.environ.get(RAY_JOB_ENV, "{}")).get("metadata", {})
    except ValueError:
        return ""
    return str(meta.get("job_submission_id", "")) if RAY_JOB_ENV in os.environ else ""


def check_locations() -> None:
    """Refuse stores that would silently resolve inside a Ray job's temporary working copy.

    Raises
    ------
    BrainalignError
        Inside a Ray job: ``BRAINALIGN_HOME`` unset or relative.
    """
    home = os.environ.get("BRAINALIGN_HOME", "")
    if RAY_JOB_ENV in os.environ and not os.path.isabs(home):
        raise BrainalignError(
            f"BRAINALIGN_HOME must be an absolute path inside a Ray job (got {home!r}): the job runs in a "
            f"temporary copy of the working dir ({os.getcwd()}), so the cache, Ray results and relative "
            "dataset paths would resolve there. Start the cluster with scripts/cluster_up.sh (it exports "
            "BRAINALIGN_HOME to jobs) or pass it with --runtime-env-json "
            "'{\"env_vars\": {\"BRAINALIGN_HOME\": \"/abs/path\"}}'."
        )


def study_folder(study: Study) -> Path:
    """The study's folder: state file, Tune experiments, ``study.log``."""
    return paths.ray_storage() / study.name


def _report_folder(study: Study) -> Path:
    return paths.home() / "reports" / study.name


def make_plan(study: Study, uri: str | None = None) -> Plan:
    """The plan of ``study``'s kind (which may read MLflow, e.g. a cross-subject study's
    ``config_from_run``)."""
    plan: Plan = kind_info(study.kind).plan(study, uri or tracking.tracking_uri())
    return plan


def check_study(study: Study) -> Plan:
    """Everything ``brainalign study check`` checks: the plan, then the dataset (simulated
    first when the study says so and it is missing). Returns the plan."""
    plan = make_plan(study)
    if hasattr(plan, "execute"):  # a kind that runs its own draws (calibrate): no study dataset
        plan.check()
        return plan
    ensure_dataset(study)
    validate_data(study, plan.search_spaces(), plan.training_sets())
    return plan


# --------------------------------------------------------------------------- stopping
class JobStopped(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGINT (``ray job stop``, Ctrl-C).

    A ``KeyboardInterrupt``, so every run lifecycle marks its run KILLED, not FAILED.
    """


class StopGuard:
    """While active: SIGTERM and SIGINT mark the study's RUNNING runs KILLED, then unwind.

    The runs are ended inside the handler, before anything else, because ``ray job stop``
    sends SIGKILL after a short grace period (``RAY_JOB_STOP_WAIT_TIME_S``). Enter it AFTER
    ``ray.init``: Ray's driver installs its own SIGTERM handler (``sys.exit``). During
    ``Tuner.fit`` in the main thread Tune owns SIGINT (a graceful stop, reported as an
    interruption); searches side by side run ``Tuner.fit`` in other threads, where Tune
    installs no handler, so the guard takes SIGINT then too. Outside the main thread it does
    nothing.

    Parameters
    ----------
    experiment : str
        The study's MLflow experiment.
    tags : mapping
        Tags of the study's runs (``{"study": name}``).
    uri : str
        Tracking URI.
    """

    def __init__(self, experiment: str, tags: Mapping[str, str], uri: str) -> None:
        self.experiment, self.tags, self.uri = experiment, dict(tags), uri
        self.signal: str | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # a second signal while unwinding: keep unwinding
            return
        self.signal = signal.Signals(signum).name
        log.warning("received %s: marking the study's running MLflow runs KILLED", self.signal)
        try:
            n = tracking.end_running(self.experiment, self.tags, "KILLED", self.uri)
            log.warning("%d run(s) -> KILLED", n)
        finally:
            raise JobStopped(f"stopped by {self.signal}")

    def check(self) -> None:
        """Raise if a signal arrived and its exception was swallowed somewhere below us."""
        if self.signal is not None:
            raise JobStopped(f"stopped by {self.signal}")


def side_by_side(items: Sequence[T], work: Callable[[T, threading.Event], None], limit: int, *,
                 name: Callable[[T], str] = str, poll_s: float = 0.5) -> None:
    """``work(item, stop)`` for every item, each in its own thread, up to ``limit`` at once.

    Items start in order as threads end. When an item's work raises, the running ones go on to
    their end, no other starts, and then the error of the first failed item (in order) is
    raised (the others are logged). An exception in the calling thread while it waits (a
    signal: :class:`JobStopped`, Ctrl-C) sets ``stop``, waits for every thread to end, then
    propagates; so does an interruption (not an ``Exception``) inside one thread. ``work``
    must end soon after ``stop`` is set (a search ends its Tune loop, resumable).

    Parameters
    ----------
    items : sequence
        The work items, in start order.
    work : callable
        ``work(item, stop)``; runs in a daemon thread.
    limit : int
        Threads at once (>= 1).
    name : callable
        The thread name of an item.
    poll_s : float
        How often the calling thread looks at its threads (signals are handled meanwhile).
    """
    stop = threading.Event()
    ended = threading.Event()
    errors: dict[int, BaseException] = {}
    lock = threading.Lock()

    def target(i: int, item: T) -> None:
        try:
            work(item, stop)
        except BaseException as e:  # handed to the calling thread
            with lock:
                errors[i] = e
            if not isinstance(e, Exception):
                stop.set()
        finally:
            ended.set()

    queue = list(enumerate(items))
    running: list[threading.Thread] = []
    try:
        while queue or running:
            while queue and len(running) < max(1, limit) and not errors and not stop.is_set():
                i, item = queue.pop(0)
                thread = threading.Thread(target=target, args=(i, item), name=name(item), daemon=True)
                thread.start()
                running.append(thread)
            if not running:
                break
            ended.wait(poll_s)
            ended.clear()
            running = [t for t in running if t.is_alive()]
    except BaseException:
        stop.set()
        log.warning("stopping %d running thread(s): %s", len(running), ", ".join(t.name for t in running))
        for t in running:
            while t.is_alive():
                t.join(poll_s)
        raise
    if errors:
        first = min(errors)
        for i, e in sorted(errors.items()):
            if i != first:
                log.error("%s failed too: %s", name(items[i]), e)
        raise errors[first]


# --------------------------------------------------------------------------- the engine
@dataclass
class StudyOutcome:
    """What :func:`run_study` produced."""

    study: str
    kind: str
    study_run_id: str
    experiment: str
    report: Report
    searches: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def _remove_folder(folder: Path) -> None:
    """``--fresh``: remove the study's folder, only if this tool created it (its marker, or a
    legacy ``sweep_state.json``); anything else is refused and left alone."""
    if remove_owned(folder, "study-storage"):
        log.info("--fresh: removed %s", folder)


@dataclass
class _Execution:
    """One execution of a study (what the steps share)."""

    study: Study
    plan: Plan
    state: StudyState
    uri: str
    folder: Path
    max_concurrent: int
    ctx: StudyContext

    @property
    def log_file(self) -> Path:
        return self.folder / "study.log"

    # ----------------------------------------------------------------- searches
    def searches(self, units: Sequence[SearchUnit], guard: StopGuard) -> None:
        """Every unfinished search: side by side (``[study] parallel_searches``, up to
        ``max_concurrent`` at once, each still one trial at a time), else one after the other.

        A search's result is the same either way: it is its own Tune experiment with its own
        seeded sampler and scheduler, and its trials are deterministic. Side by side, a search
        that fails lets the others finish (their results are recorded), then its error is
        raised; a stop (SIGINT/SIGTERM) stops them all, each resumable.
        """
        todo = []
        for unit in units:
            if self.state.searches.get(unit.key, {}).get("done"):
                log.info("search %s already done", unit.key)
            else:
                todo.append(unit)
        n = min(self.max_concurrent, len(todo)) if self.study.parallel_searches else 1
        if n <= 1:
            for unit in todo:
                self.search(unit)
                guard.check()
            return
        log.info("%d searches, %d side by side (each one trial at a time)", len(todo), n)
        self._prepare([u.trial for u in todo])  # here, once: two threads must not prepare one cache entry
        side_by_side(todo, lambda unit, stop: self.search(unit, stop=stop, prepared=True), n,
                     name=lambda unit: f"search-{unit.key}")
        guard.check()

    def search(self, unit: SearchUnit, *, stop: threading.Event | None = None, prepared: bool = False) -> None:
        """Run (or resume) one search and record it (in a thread of :meth:`searches` too:
        ``stop`` ends its Tune loop, resumable)."""
        st, state, uri = self.study, self.state, self.uri
        rec = state.searches.get(unit.key, {})
        run_id = rec.get("run_id")
        if not run_id:
            # an interruption between creating the run and saving the state leaves it
            # unrecorded: adopt it (the newest, deleting older ones) rather than add another
            run_id = tracking.reconcile_runs(tracking.find_runs(
                st.experiment, {"role": "search", "search": unit.key, "mlflow.parentRunId": state.study_run_id}, uri
            ), None, uri)
        if run_id:
            tracking.set_status(run_id, "RUNNING", uri)
        else:
            run_id = tracking.start_run(st.experiment, run_name=unit.key, parent_run_id=state.study_run_id,
                                        params=unit.params, tags=dict(unit.tags) | {"role": "search"}, uri=uri)
        if not rec.get("run_id"):
            tracking.log_dict(run_id, unit.space.to_json(), "searchspace.json", uri=uri)
            state.record("searches", unit.key, {"run_id": run_id, "done": False})
        log.info("search %s (%d trials, <= %d epochs) -> MLflow run %s", unit.key, unit.trials, unit.max_epochs,
                 run_id)
        if not prepared:
            self._prepare([unit.trial])
        from . import _tune

        with tracking.ended(run_id, uri=uri):
            unit = replace(unit, trial_spec=replace(unit.trial_spec, parent_run_id=run_id))
            # one trial at a time: ASHA decides a rung from the values recorded there so far,
            # so with concurrent trials the arrival order (timing) would pick the best config
            outcome = _tune.run_search(unit, folder=self.folder, resources=st.resources,
                                       max_concurrent=_tune.SEARCH_CONCURRENCY, log_file=self.log_file, stop=stop)
            n_pruned = self._reconcile_trials(unit, run_id, outcome.trials, outcome.trial_ids)
            space = unit.space
            leaderboard = sorted(
                ({"trial_id": t.trial_id, space.metric: None if math.isnan(t.value) else t.value,
                  "epochs": t.epochs, "error": t.error.splitlines()[0] if t.error else "", **t.config}
                 for t in sorted(outcome.trials, key=lambda t: t.order)),  # ties: in proposal order
                key=lambda d: (d[space.metric] is None, -(d[space.metric] or 0) if space.mode == "max"
                               else (d[space.metric] or 0)),
            )
            tracking.log_dict(run_id, outcome.best_config, "best_config.json", uri=uri)
            tracking.log_dict(run_id, leaderboard, "leaderboard.json", uri=uri)
            tracking.log_metrics(run_id, {f"best_{space.metric}": outcome.best_value, "n_trials": len(outcome.trials),
                                          "n_errored": outcome.n_errored, "n_pruned": n_pruned}, uri=uri)
            tracking.set_tags(run_id, {"best_trial_id": outcome.best_trial_id}, uri=uri)
        state.record("searches", unit.key, {"run_id": run_id, "done": True, "best_config": outcome.best_config,
                                            "best_value": outcome.best_value, "best_trial_id": outcome.best_trial_id})
        log.info("search %s: best %s = %.4f with %s", unit.key, unit.space.metric, outcome.best_value,
                 outcome.best_config)

    def _reconcile_trials(self, unit: SearchUnit, run_id: str, trials: Sequence[Any], trial_ids: set[str]) -> int:
        """One run per Tune trial (a resumed trial ran again, the older attempt is deleted); trials
        ASHA stopped are tagged ``pruned`` (the scheduler does it as it stops them; this catches
        what it missed); runs of trials the experiment does not know (started by a driver that
        died before Tune saved them) are deleted."""
        n_pruned = 0
        for t in trials:
            runs = tracking.find_runs(self.study.experiment, {"mlflow.parentRunId": run_id,
                                                              "tune_trial_id": t.trial_id}, self.uri)
            stopped = not t.error and t.epochs < unit.max_epochs
            pruned = bool(runs) and (runs[-1].tags.get("pruned") == "true"
                                     or (stopped and runs[-1].status != "FINISHED"))
            kept = tracking.reconcile_runs(runs, None, self.uri,
                                           finish_tags=None if t.error else ({"pruned": "true"} if pruned else {}))
            n_pruned += pruned
            if kept and t.error:
                tracking.end_run(kept, "FAILED", self.uri)
        # trials a killed driver had started after Tune last saved its state are not in the
        # restored experiment (Optuna proposed them again as new trials): their runs go
        known = set(trial_ids) | {t.trial_id for t in trials}
        for r in tracking.find_runs(self.study.experiment, {"mlflow.parentRunId": run_id, "role": "trial"}, self.uri):
            if r.tags.get("tune_trial_id") not in known:
                log.info("deleting run %s of trial %s, lost with a dead driver", r.run_id, r.tags.get("tune_trial_id"))
                tracking.delete_run(r.run_id, self.uri)
        return n_pruned

    # ----------------------------------------------------------------- tested runs
    def _prepare(self, configs: Sequence[Any]) -> None:
        """Prepare (cache) each run's training data once, here in the driver: concurrent
        trials would otherwise prepare the same cache entry at the same time."""
        from ..data.prepare import prepare

        for cfg in configs:
            t0 = time.perf_counter()
            prepared = prepare(cfg, Path(self.ctx.locations.cache))
            log.info("training data of %s (seed %d): %s (%.1f s)", ",".join(cfg.data.subjects), cfg.seed,
                     prepared.root, time.perf_counter() - t0)

    def run_units(self, units: Sequence[RunUnit]) -> None:
        st, state, uri = self.study, self.state, self.uri
        # a run finished in MLflow whose record was lost (interrupted between the two) is
        # adopted; attempts cut short are deleted (Tune runs them again). Only runs under
        # THIS study run count: an earlier execution (--fresh, an edited study) left runs
        # with the same key that must not be taken for this one's.
        for u in units:
            if u.key in state.finals:
                continue
            runs = tracking.find_runs(st.experiment, {"final_key": u.key, "mlflow.parentRunId": state.study_run_id},
                                      uri)
            finished = [r for r in runs if r.status == "FINISHED" and "test_top1" in r.metrics]
            if finished:
                kept = tracking.reconcile_runs(runs, finished[-1].run_id, uri)
                m = finished[-1].metrics
                state.finals[u.key] = {"run_id": kept, "test_top1": m["test_top1"], "test_top5": m["test_top5"],
                                       "test_n_way": m.get("test_n_way", float("nan"))} | gallery_values(m)
            else:
                for r in runs:
                    log.info("deleting run %s left by an interrupted attempt", r.run_id)
                    tracking.delete_run(r.run_id, uri)
        state.save()
        todo = [u for u in units if u.key not in state.finals]
        if not todo:
            return
        log.info("tested runs: %d of %d to run (packed by %s, %d pack(s) at a time)", len(todo), len(units),
                 st.resources.pack, self.max_concurrent)
        self._prepare([u.config for u in todo])
        from . import _tune

        outcome = _tune.run_units(units, name=_tune.units_experiment(st.resources.pack), folder=self.folder,
                                  state_path=state.path, resources=st.resources, max_concurrent=self.max_concurrent,
                                  log_file=self.log_file)
        parents = {u.key: u.spec.parent_run_id for u in units}
        for key, rec in outcome.results.items():
            runs = tracking.find_runs(st.experiment, {"final_key": key, "mlflow.parentRunId": parents[key]}, uri)
            tracking.reconcile_runs(runs, str(rec["run_id"]), uri)
            state.finals[key] = dict(rec)
        state.save()
        if outcome.interrupted:
            raise KeyboardInterrupt("the tested runs were interrupted; run the same command again to resume.")
        if outcome.failed:
            shown = "; ".join(f"{k}: {e}" for k, e in sorted(outcome.failed.items())[:5])
            raise RuntimeError(f"{len(outcome.failed)} run(s) failed ({shown}). Fix the cause and re-run to resume.")
        missing = [u.key for u in units if u.key not in state.finals]
        if missing:
            raise RuntimeError(f"the tested runs finished without results for {missing}")

    # ----------------------------------------------------------------- analyses
    def analyses(self) -> None:
        """``[study] explain`` and ``[study] grids`` on the finished tested runs, once (recorded
        in the state file); their files go to the study run and show in the report."""
        st, state = self.study, self.state
        todo = [a for a, on in (("explain", st.explain), ("grids", st.grids > 0)) if on and a not in state.analyses]
        if todo:
            claim_dir(_report_folder(st), "report")  # the analyses write into its explain/ and grids/
        for what in todo:
            t0 = time.perf_counter()
            if what == "explain":
                from ..analysis.explain import explain_study

                res = explain_study(st.name, experiment=st.experiment, study_run_id=state.study_run_id,
                                    out_dir=_report_folder(st) / "explain", update_report=False, uri=self.uri)
                log.info("explain: %d tested runs explained in %.1f s", len(res.runs), time.perf_counter() - t0)
            else:
                from ..analysis.grids import image_grids, pair_from_study
                from ..config import TrainConfig

                aligned, base, _ = pair_from_study(st.name, experiment=st.experiment,
                                                   study_run_id=state.study_run_id, uri=self.uri)
                # the grids are of the first encoder (arch.* options are checked against it)
                galleries = TrainConfig.from_flat(
                    dict(st.config) | dict(st.overrides) | {"encoder": st.encoders[0]}).test.galleries
                image_grids(aligned, base, galleries=galleries, n=st.grids, out_dir=_report_folder(st) / "grids",
                            log_to=state.study_run_id, uri=self.uri)
                log.info("grids: top-5 images of %d queries in %.1f s", st.grids, time.perf_counter() - t0)
            state.analyses.append(what)
            state.report_logged = False  # the report gains a section: log it again
            state.save()

    # ----------------------------------------------------------------- report
    def report(self, *, final: bool) -> Report:
        st, state, uri = self.study, self.state, self.uri
        report = _render(st, self.plan, state.study_run_id, uri, selection={
            k: {"best_config": r.get("best_config"), "best_value": r.get("best_value")}
            for k, r in state.searches.items()})
        if final and report.partial:
            raise RuntimeError(f"{report.title}: MLflow holds fewer finished runs than the state records")
        if not state.report_logged:
            for f in report.files.values():
                tracking.log_artifact(state.study_run_id, f, "report", uri=uri)
            tracking.log_metrics(state.study_run_id, report.metrics(), uri=uri)
            head = f"{st.description}\n\n" if st.description else ""
            tracking.set_description(state.study_run_id, head + report.markdown, uri=uri)
            if final:
                state.report_logged = True
                state.save()
        return report

    def partial_report(self) -> None:
        """Keep what finished: the partial report goes onto the study run (never masks the error)."""
        try:
            if not self.state.report_logged:
                self.report(final=False)
        except Exception:
            log.exception("could not log the partial report")


def _render(study: Study, plan: Plan, study_run_id: str, uri: str, selection: Mapping[str, Any] | None = None
            ) -> Report:
    """The report of a study run, from what its tested runs logged in MLflow; files written."""
    keys = plan.run_keys()
    runs = tracking.children(study_run_id, uri, tags={"role": "final"})
    report = build_report(
        rows_from_runs(runs, set(keys)), subjects=study.subjects, expected=len(keys), protocol=plan.protocol(),
        correction=study.correction,
        title=f"Study {study.name}: human-aligned vs base (test, {len(study.subjects)} subjects × "
              f"{len(study.final_seeds)} seeds)",
    )
    context = {"study": study.name, "kind": study.kind, "study_file": study.path, "study_run_id": study_run_id,
               "tracking_uri": uri, "selection": dict(selection or {})}
    report.sections += _analysis_sections(study_run_id, uri, _report_folder(study))
    return write_report(report, _report_folder(study), context)


def _analysis_sections(study_run_id: str, uri: str, folder: Path) -> list[str]:
    """Report sections of the analyses logged to the study run (``grids/``, ``explain/``); their
    files are fetched from MLflow into the report folder when missing there."""
    out = []
    for sub in ("grids", "explain"):
        names = sorted(Path(p).name for p in tracking.list_artifacts(study_run_id, sub, uri))
        if not names:
            continue
        if any(not (folder / sub / n).is_file() for n in names):
            claim_dir(folder, "report")
            claim_dir(folder / sub, "report")
            tracking.download_artifacts(study_run_id, sub, folder, uri)
        if sub == "grids":
            pngs = [n for n in names if n.endswith(".png")]
            out.append("\n".join(["## Top-5 retrieved images", "",
                                   "The aligned (top) and base (bottom) model's five best images for test queries "
                                   "where the arms disagree most (`brainalign grids`, docs/analyses.md).", "",
                                   *[f"![{n[:-4]}](grids/{n})" for n in pngs]]) + "\n")
        elif "explain.md" in names:
            from ..analysis.explain import report_section

            out.append(report_section((folder / sub / "explain.md").read_text(), "explain/"))
    return out


def _start_study_run(study: Study, plan: Plan, uri: str) -> str:
    from ..data.contract import open_dataset

    params: dict[str, Any] = {
        "study.kind": study.kind, "study.file": study.path, "study.dataset": str(study.dataset_path),
        "study.subjects": ",".join(study.subjects), "study.encoders": ",".join(study.encoders),
        "study.pairs": ",".join(f"{p.aligned_table}|{p.base_table}" for p in study.pairs),
        "study.max_epochs": study.max_epochs, "study.final_seeds": ",".join(map(str, study.final_seeds)),
        "study.fingerprint": study.fingerprint(),
    } | plan.params() | {f"config.{k}": v for k, v in study.config.items()} | {
        f"override.{k}": v for k, v in study.overrides.items()}
    tags = {"role": "report", "study": study.name, "study_kind": study.kind, "git_commit": tracking.code_version()}
    if ray_job_id():
        tags["ray_job"] = ray_job_id()
    if study.description:
        tags["mlflow.note.content"] = study.description
    run_id = tracking.start_run(study.experiment, run_name=f"study-{study.name}", params=params, tags=tags, uri=uri)
    tracking.log_dict(run_id, study.to_json(), "study/study.json", uri=uri)
    ds = open_dataset(study.dataset_path)
    tracking.log_dataset(run_id, name=ds.root.name, digest=ds.fingerprint, source=str(ds.root), context="study",
                         profile={"subjects": list(study.subjects)}, uri=uri)
    return run_id


def run_study(study: Study, *, mode: str = "auto", live: bool = True, plan: Plan | None = None) -> StudyOutcome:
    """Run (or resume) a study of any kind: checks, searches, tested runs, report.

    Parameters
    ----------
    study : Study
        From :func:`~brainalign.studies.load_study`.
    mode : {"auto", "resume", "fresh"}
        ``auto`` resumes a study with saved state and starts one without; ``resume`` requires
        saved state; ``fresh`` discards the saved state and the study's Tune experiments and
        starts over (a new study run; the old runs stay in MLflow).
    live : bool
        Show the live progress view on the console.
    plan : Plan, optional
        The study's plan, if the caller made it already (:func:`make_plan`).

    Returns
    -------
    StudyOutcome

    Raises
    ------
    BrainalignError
        Invalid data for the study, an edited study with saved state, or ``resume`` without state.
    KeyboardInterrupt
        Interrupted (Ctrl-C, or :class:`JobStopped` on SIGTERM); the same call resumes.
    """
    from .._ray import check_tracking_for_cluster, ensure_ray

    check_option("mode", mode, MODES)
    check_locations()
    t0 = time.perf_counter()
    loc = Locations.current()
    uri = loc.tracking_uri
    plan = plan or make_plan(study, uri)
    if hasattr(plan, "execute"):  # a kind that runs its own draws (calibrate: studies/calibrate.py)
        outcome: StudyOutcome = plan.execute(live=live, mode=mode)
        return outcome
    folder = study_folder(study)
    if mode == "fresh":
        _remove_folder(folder)
    state = StudyState.load(folder, study)
    if state is None and mode == "resume":
        raise BrainalignError(f"nothing to resume for study {study.name}: {folder / STATE_FILE} does not exist.")
    ensure_dataset(study)
    validate_data(study, plan.search_spaces(), plan.training_sets())
    claim_dir(folder, "study-storage")  # refuses a non-empty folder that brainalign did not create
    tracking.ensure_experiment(study.experiment, uri)  # created once, here, before any trial process
    ensure_ray()
    check_tracking_for_cluster(uri)  # trials on other nodes cannot write a SQLite file of this one
    import ray

    from ._tune import custom_per_trial, max_concurrent_trials

    cluster = ray.cluster_resources()  # type: ignore[no-untyped-call]
    max_concurrent = max_concurrent_trials(study.resources, cluster)
    custom = custom_per_trial(study.resources)
    log.info("Ray has %s CPUs%s: %d run(s) at a time (%g CPU each%s, 1 CPU kept free for Ray Data)",
             cluster.get("CPU"), f", {cluster.get('GPU')} GPUs" if cluster.get("GPU") else "", max_concurrent,
             study.resources.cpus_per_trial, f" and custom resources {custom}" if custom else "")
    if state is None:
        state = StudyState.new(folder, study)
        state.study_run_id = _start_study_run(study, plan, uri)
        state.save()
        log.info("study %s: MLflow experiment %r, study run %s", study.name, study.experiment, state.study_run_id)
    else:
        log.info("study %s: resuming (study run %s)", study.name, state.study_run_id)
        if not state.report_logged:
            tracking.set_status(state.study_run_id, "RUNNING", uri)
    for line in plan.describe():
        log.info("%s", line)
    ex = _Execution(study, plan, state, uri, folder, max_concurrent, StudyContext(state.study_run_id, loc))
    cascade = (study.experiment, {"study": study.name})
    with (StopGuard(*cascade, uri) as guard,
          tracking.ended(state.study_run_id, uri=uri, cascade=cascade),
          LiveView(study, plan, state.study_run_id, uri, log_file=ex.log_file, enabled=live)):
        try:
            ex.searches(plan.searches(ex.ctx), guard)
            ex.run_units(plan.runs(ex.ctx, state.selected()))
            guard.check()
            ex.analyses()
            guard.check()
            report = ex.report(final=True)
        except BaseException:
            ex.partial_report()
            raise
    return StudyOutcome(study=study.name, kind=study.kind, study_run_id=state.study_run_id,
                        experiment=study.experiment, report=report, searches=dict(state.searches),
                        seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- report, status
def study_run_of(study: Study, uri: str) -> str:
    """The study run of the state file, else the newest study run of this study in MLflow."""
    try:
        state = StudyState.load(study_folder(study), study)
    except BrainalignError:
        state = None
    if state is not None and state.study_run_id:
        return state.study_run_id
    runs = tracking.find_runs(study.experiment, {"role": "report", "study": study.name}, uri)
    return runs[-1].run_id if runs else ""


def render_report(study: Study) -> Report:
    """Re-render the report of a finished or partly finished study from MLflow (files in
    ``$BRAINALIGN_HOME/reports/<study>/``; MLflow is only read).

    Raises
    ------
    BrainalignError
        The study has no study run in MLflow yet.
    """
    uri = tracking.tracking_uri()
    plan = make_plan(study, uri)
    if hasattr(plan, "execute"):  # calibrate: re-rendered from its recorded draws
        report: Report = plan.report()
        return report
    run_id = study_run_of(study, uri)
    if not run_id:
        raise BrainalignError(f"study {study.name} has no study run in experiment {study.experiment!r} at {uri}.")
    return _render(study, plan, run_id, uri)


def combine_studies(studies: Sequence[Study]) -> CombinedReport:
    """``brainalign study report A B C``: re-render each study's report from MLflow and combine
    the comparisons they share with Stouffer's z (weights sqrt(n subjects)); written to
    ``$BRAINALIGN_HOME/reports/combined-<A>+<B>+.../`` (correction: the first study's).

    Raises
    ------
    BrainalignError
        Fewer than two studies, the same study twice, a study of a kind without a report
        (calibrate), or what :func:`~brainalign.studies.report.combine_reports` refuses.
    """
    names = [s.name for s in studies]
    if len(set(names)) != len(names):
        raise BrainalignError(f"a study is named twice: {names}; combine different studies.")
    reports: dict[str, Report] = {}
    for st in studies:
        rep = render_report(st)
        if not isinstance(rep, Report):
            raise BrainalignError(f"study {st.name} is a {st.kind} study: it has no comparison to combine.")
        reports[st.name] = rep
    combined = combine_reports(reports, correction=studies[0].correction if studies else "holm")
    return write_combined(combined, paths.home() / "reports" / ("combined-" + "+".join(names)))


def study_status(study: Study) -> list[str]:
    """What ``brainalign study status`` prints: searches, trials and tested runs, from MLflow."""
    uri = tracking.tracking_uri()
    plan = make_plan(study, uri)
    if hasattr(plan, "execute"):  # calibrate: its recorded draws
        from .calibrate import draws_file, load_draws

        draws = load_draws(study)
        done = {e: sum(d["effect"] == e for d in draws) for e in study.options.effects}
        return [f"study {study.name} ({study.kind})",
                "  draws done: " + ", ".join(f"{e} {n}/{study.options.draws[e]}" for e, n in done.items()),
                f"  recorded in: {draws_file(study)}"]
    run_id = study_run_of(study, uri)
    state = study_folder(study) / STATE_FILE
    extra = [f"  state: {state}" if state.is_file() else "  state: none (not started here)"]
    return status_lines(study, plan, run_id, uri, extra)
