"""Ray Tune + Optuna: the only module of brainalign that imports Tune or Optuna.

Two kinds of Tune experiments run here, both with *function trainables that drive a Ray
Train run* (the Train V2 pattern):

* a **search** (:func:`run_search`): Optuna TPE (seeded) proposes configs from a search
  space, ASHA stops weak trials on ``training_iteration`` (= epochs) and tags their MLflow
  runs ``pruned`` as it does; every trial is a validation-only Train run whose every epoch
  reports the selection metric;
* the **tested runs** (:func:`run_units`): a grid over unit keys, each a Train run that is
  tested; Tune gives them bounded concurrency and resume. It is the one function that
  dispatches run units: one Tune trial per *pack* (``[resources] pack``: an arm's seeds on
  one subject, or all of an arm's runs; :func:`pack_units`), whose runs one Train worker
  group trains one after the other.

Both live under ``<study folder>/<name>`` and are resumed with ``Tuner.restore``. Tune's own
console output (status tables, warnings) goes to the study's log file, not the terminal.

Searches may run side by side, each ``Tuner.fit`` in its own driver thread (the engine's
``side_by_side``). What that needs here: each search registers its trainable under its own
name (Tune's trainable registry is one per Ray job, keyed by name: two searches under one
name would run each other's trials), the console redirection is shared by the threads
(:func:`_output_to`), and a search's Tune loop ends when the engine sets its ``stop`` event
(:class:`EngineStop`; Tune installs its SIGINT handler in the main thread only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from .. import tracking
from .._checks import BrainalignError, check_option
from .._ray import watch_resource_wait
from ..config import TrainConfig
from ._state import recorded_final
from ._stats import gallery_values
from .searchspace import ParamSpec
from .spec import Resources
from .units import RunUnit, SearchUnit

__all__ = ["SEARCH_CONCURRENCY", "EngineStop", "SearchOutcome", "TrialSummary", "UnitsOutcome", "custom_per_trial",
           "max_concurrent_trials", "pack_units", "run_search", "run_units", "search_trainable_name", "trial_resources",
           "units_experiment"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- resources
def max_concurrent_trials(resources: Resources, cluster: Mapping[str, float]) -> int:
    """Trials that fit at once: ``(CPUs - 1) // cpus_per_trial``, GPUs // workers with GPUs, and
    each custom resource // what one trial holds of it.

    One whole CPU stays free because every Ray Data pipeline (the parquet listing task)
    needs one; with fewer free CPUs a trial's data loading waits forever.

    Parameters
    ----------
    resources : Resources
        The study's per-run resources.
    cluster : mapping
        ``ray.cluster_resources()``.

    Returns
    -------
    int
        At least 1.

    Raises
    ------
    BrainalignError
        The cluster cannot fit even one trial (the study would hang), e.g. no node advertises
        a custom resource of ``[resources]``.
    """
    cpus = float(cluster.get("CPU", 0.0))
    per_trial = resources.cpus_per_trial
    if cpus - 1.0 < per_trial - 1e-9:
        raise BrainalignError(
            f"Ray has {cpus:g} CPUs; one trial needs {per_trial:g} (workers x cpus_per_worker + trial_cpus) "
            "plus one free CPU for Ray Data. Lower [resources] or start Ray with more logical CPUs."
        )
    n = max(1, int(math.floor((cpus - 1.0 + 1e-9) / per_trial)))
    if resources.use_gpu:
        gpus = float(cluster.get("GPU", 0.0))
        need = resources.workers_per_trial * resources.gpus_per_worker
        if gpus + 1e-9 < need:
            raise BrainalignError(
                f"[resources] use_gpu needs {need:g} GPU(s) per trial (workers_per_trial x gpus_per_worker); "
                f"Ray has {gpus:g}."
            )
        n = min(n, int((gpus + 1e-9) // need))
    for name, need in custom_per_trial(resources).items():
        have = float(cluster.get(name, 0.0))
        if have + 1e-9 < need:
            raise BrainalignError(
                f"one trial needs {need:g} of the custom resource {name!r} ([resources] custom_per_worker x "
                f"workers_per_trial + trial_custom); Ray has {have:g}. Start the nodes meant for it with "
                f"`ray start --resources='{{\"{name}\": N}}'`, or change [resources]."
            )
        n = min(n, int(math.floor((have + 1e-9) / need)))
    return n


def custom_per_trial(resources: Resources) -> dict[str, float]:
    """Custom Ray resources one trial holds at once: its Train workers' and its own."""
    out = {k: resources.workers_per_trial * v for k, v in resources.custom_per_worker.items()}
    for k, v in resources.trial_custom.items():
        out[k] = out.get(k, 0.0) + v
    return out


def trial_resources(resources: Resources) -> dict[str, Any]:
    """What the Tune trial process itself requests (``tune.with_resources``): ``trial_cpus``
    and ``trial_custom`` (which pins it, with the run's driver-side work, to a node)."""
    out: dict[str, Any] = {"cpu": resources.trial_cpus}
    if resources.trial_custom:
        out["custom_resources"] = dict(resources.trial_custom)
    return out


#: Trials of one search run one at a time, so that a search's result does not depend on timing.
#: ASHA (``_Bracket.on_result``) stops a trial at a rung when its value is below the
#: ``1 - 1/reduction_factor`` quantile of the values recorded at that rung *so far*: with two
#: concurrent trials, which of them reaches a rung first depends on the machine's load, and so
#: does which one is stopped, and therefore the best config and every final run trained from it
#: (observed: base 10.7/31.1 vs 16.9/43.9 top-1/top-5 for the same study on an idle and a loaded
#: machine). Optuna's TPE draws its first ``n_startup_trials`` (10) configs from its seeded random
#: sampler whatever has finished, and from then on from the trials completed before each draw,
#: which one-at-a-time also fixes. Trials are deterministic themselves (seeded, fixed threads).
SEARCH_CONCURRENCY = 1


# --------------------------------------------------------------------------- search space
class DefineByRun:
    """A search space as an Optuna define-by-run function (picklable; does no work).

    Parameters
    ----------
    params : tuple of ParamSpec
        The searched parameters; names stay dotted (Tune un-nests on ``/`` only).
    """

    def __init__(self, params: tuple[ParamSpec, ...]) -> None:
        self.params = params

    def __call__(self, trial: Any) -> None:
        for p in self.params:
            if p.kind == "choice":
                trial.suggest_categorical(p.name, list(p.choices))
            elif p.kind == "int":
                step = int(p.step) if p.step else 1
                trial.suggest_int(p.name, int(p.low), int(p.high), step=step, log=p.log)
            else:
                trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


class PruningASHA(ASHAScheduler):
    """ASHA that marks the MLflow run of every trial it stops early: tag ``pruned=true`` (with
    the epoch) and status FINISHED, at once (the trial's process is killed and cannot end it).

    Parameters
    ----------
    experiment, search_run_id, uri : str
        Where the trials' runs are (children of the search run, tagged ``tune_trial_id``).
    **kwargs
        :class:`ray.tune.schedulers.ASHAScheduler` arguments.
    """

    def __init__(self, *, experiment: str, search_run_id: str, uri: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._runs = (experiment, search_run_id, uri)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action: str = super().on_trial_result(tune_controller, trial, result)
        # a STOP at max_t (ASHA's top rung) ends a trial that trained its whole budget: not pruned
        if action == TrialScheduler.STOP and result.get(self._time_attr, self._max_t) < self._max_t:
            experiment, parent, uri = self._runs
            try:
                runs = tracking.find_runs(experiment, {"mlflow.parentRunId": parent,
                                                       "tune_trial_id": str(trial.trial_id)}, uri)
                if runs:
                    tracking.set_tags(runs[-1].run_id, {"pruned": "true",
                                                        "pruned_at_epoch": result.get("training_iteration")}, uri)
                    tracking.end_run(runs[-1].run_id, "FINISHED", uri)
            except Exception:  # bookkeeping must never stop the search; the engine reconciles later
                log.warning("could not mark trial %s pruned", trial.trial_id, exc_info=True)
        return action


# --------------------------------------------------------------------------- trainables
def _quiet_data() -> None:
    """No Ray Data progress bars from trial processes (they flood the console when a remote
    cluster forwards worker output to the driver)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _search_trial(params: dict[str, Any], unit: SearchUnit) -> None:
    """Tune function trainable: one search trial = one validation-only Train run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train.runner import run_training

    _quiet_data()
    tid = ray.tune.get_context().get_trial_id()
    cfg = TrainConfig.from_flat(unit.trial.to_flat() | dict(params) | {"run_name": f"{unit.key}-trial-{tid}"},
                                strict_types=False)
    spec = replace(unit.trial_spec, tags=dict(unit.trial_spec.tags) | {"tune_trial_id": tid},
                   storage_name=f"{unit.trial_spec.storage_name}-{tid}")
    run_training(cfg, spec, callbacks=[TuneReportCallback()])  # type: ignore[no-untyped-call]


def pack_units(units: Sequence[RunUnit], by: str = "subject") -> dict[str, list[RunUnit]]:
    """The run units grouped into packs, in order: ``by="subject"``, one pack per arm and
    subject (all its seeds); ``by="arm"``, one pack per arm (all its subjects and seeds).

    A pack is trained by one Train worker group, its runs one after the other
    (:func:`~brainalign.train.runner.run_pack`): the start-up is paid once per pack instead
    of once per run, and every run is still its own MLflow run with the results it would get
    alone. The grouping depends on the units and ``by`` only (not on the cluster), so a
    resumed study finds the same packs under the same keys.

    Raises
    ------
    BrainalignError
        ``by`` is not one of :data:`~brainalign.studies.spec.PACKS`.
    """
    from .spec import PACKS

    check_option("[resources] pack", by, PACKS)
    packs: dict[str, list[RunUnit]] = {}
    for u in units:
        packs.setdefault(u.arm.name if by == "arm" else f"{u.arm.name}/sub-{u.subject}", []).append(u)
    return packs


def units_experiment(pack: str) -> str:
    """The Tune experiment of the tested runs under ``[resources] pack``: ``runs`` (by subject,
    the former layout) or ``runs-by-<pack>``. One per packing, because a restored experiment
    keeps the grid of pack keys it started with: a study resumed under another packing starts
    a new experiment, whose packs skip the runs the state file records."""
    return "runs" if pack == "subject" else f"runs-by-{pack}"


def _pack_trial(config: dict[str, Any], packs: Mapping[str, Sequence[RunUnit]], state_path: str) -> None:
    """Tune function trainable: one pack of run units = one Train run that trains them one
    after the other, then tests each; units the state file already records are skipped."""
    import ray.tune

    from ..train.runner import run_pack

    _quiet_data()
    key = config["pack"]
    if key not in packs:  # an experiment of another packing (units_experiment keeps them apart)
        raise BrainalignError(f"pack {key!r} is not a pack of this study ({sorted(packs)[:4]} ...); re-run with "
                              "--fresh if the study's folder was edited by hand.")
    tid = ray.tune.get_context().get_trial_id()
    done: dict[str, dict[str, Any]] = {}
    todo: list[RunUnit] = []
    for unit in packs[key]:
        rec = recorded_final(Path(state_path), unit.key)
        if rec is not None:  # finished by an earlier attempt whose Tune state was not saved
            done[unit.key] = rec
        else:
            todo.append(unit)
    if todo:
        runs = [(u.config, replace(u.spec, tags=dict(u.spec.tags) | {"tune_trial_id": tid},
                                   storage_name=f"{u.spec.storage_name}-{tid}")) for u in todo]
        for unit, res in zip(todo, run_pack(runs), strict=True):
            done[unit.key] = {
                "run_id": res.run_id,
                "test_top1": res.test["test_top1"],
                "test_top5": res.test["test_top5"],
                "test_n_way": res.test.get("test_n_way", float("nan")),
                "val_top1_best": res.val.get("val_top1_best", float("nan")),
                "best_epoch": res.best_epoch,
            } | gallery_values(res.test)
    ray.tune.report({"pack": key, "results": json.dumps(done)})


# --------------------------------------------------------------------------- running Tune
def _restorable(path: Path) -> bool:
    """Whether the Tune experiment in ``path`` can be resumed.

    ``Tuner.can_restore`` only looks for ``tuner.pkl``, written when the experiment starts;
    the trials and the searcher/scheduler state are in ``experiment_state-*.json``, saved
    every few seconds. A driver killed (SIGKILL, node loss) in between leaves the first
    without the second, and ``Tuner.restore`` then "fails to restore the run state" and
    runs a broken experiment. Such a folder holds nothing to resume: it is removed (it lies
    in the study's own folder) and the experiment starts again; MLflow runs its trials had
    opened are reconciled by the engine.
    """
    from ray import tune

    if not tune.Tuner.can_restore(str(path)):
        return False
    if any(path.glob("experiment_state-*.json")):
        return True
    log.warning("%s holds no saved experiment state (its driver died before Tune saved any): starting it again",
                path)
    shutil.rmtree(path)
    return False


class _SharedOutput:
    """The process's stdout, stderr and ``ray`` logger redirected into one file while at least
    one user holds it: searches side by side (threads) share one redirection (nested
    ``contextlib.redirect_stdout`` from two threads would restore each other's streams and
    leave ``sys.stdout`` on a closed file). The first user's path is used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: tuple[Any, Any, list[logging.Handler]] | None = None
        self._file: Any = None

    @contextlib.contextmanager
    def to(self, path: Path) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = open(path, "a", buffering=1)  # closed by the last user
                ray_log = logging.getLogger("ray")
                self._saved = (sys.stdout, sys.stderr, ray_log.handlers[:])
                handler = logging.StreamHandler(f)
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                ray_log.handlers = [handler]
                sys.stdout = sys.stderr = f
                self._file = f
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._saved is not None:
                    sys.stdout, sys.stderr, logging.getLogger("ray").handlers = self._saved
                    self._saved = None
                    self._file.close()
                    self._file = None


_OUTPUT = _SharedOutput()


def _output_to(path: Path) -> contextlib.AbstractContextManager[None]:
    """Tune's console output (printed tables, Ray's loggers, warnings) into ``path`` (shared
    by the threads that run at once: :class:`_SharedOutput`)."""
    return _OUTPUT.to(path)


#: Per thread: the stop event of the engine thread that runs a Tune loop (:func:`_tuner_fit`),
#: and whether it holds :data:`_SETUP`.
_THREAD = threading.local()
#: One Tune experiment at a time is built and started: Tune's trainable registry (one dict per
#: process, ``ray.tune.registry._Registry``) is not thread-safe, and two searches registering
#: their trainables at once fail with "dictionary changed size during iteration". A search
#: holds it from building its ``Tuner`` to the first step of its loop (:class:`EngineStop`),
#: by when Tune has registered everything; the loops themselves then run side by side.
_SETUP = threading.Lock()


@contextlib.contextmanager
def _setup_turn() -> Iterator[None]:
    """Hold :data:`_SETUP` in this thread until :func:`_end_setup_turn` or the block ends."""
    _SETUP.acquire()
    _THREAD.setup = True
    try:
        yield
    finally:
        _end_setup_turn()


def _end_setup_turn() -> None:
    if getattr(_THREAD, "setup", False):
        _THREAD.setup = False
        _SETUP.release()


class _Stopped(Exception):
    """Raised in a Tune loop by :class:`EngineStop`: an ``Exception``, so that Tune cleans up
    (stops its trial actors) before it propagates."""


class EngineStop(Callback):  # type: ignore[misc]
    """Tune callback: end the Tune loop of an engine thread once its ``stop`` event is set.

    Stateless (it is pickled with the experiment and restored with it): the event is the
    calling thread's, set by :func:`_tuner_fit`. At the loop's first step it also lets the
    next experiment set up (:data:`_SETUP`). Tune checks the event at every step of its loop
    (about every 0.1 s), stops the trial actors and raises; the experiment keeps the state it
    last saved (Tune saves it every few seconds) and resumes from there, like after a killed
    driver. A thread without an event (the main thread, Tune's own Ctrl-C) is never stopped.
    """

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        _end_setup_turn()  # the experiment is set up: the next one may start (_SETUP)
        stop = getattr(_THREAD, "stop", None)
        if stop is not None and stop.is_set():
            raise _Stopped("the engine stopped this Tune experiment")


def _tuner_fit(tuner: Any, log_file: Path, *, what: str = "the Tune experiment",
               stop: threading.Event | None = None) -> tuple[Any, bool]:
    """``Tuner.fit()`` (its output into ``log_file``) and whether it was interrupted.

    Ctrl-C makes Tune stop gracefully: it saves its state, stops the trials (which may then
    look finished) and returns normally. Tune's SIGINT handler puts the previous handler back
    only when it fires, so an unchanged handler after ``fit`` means an interruption. The
    previous handler is restored in any case: Tune leaves its own installed after a normal
    run, where it would swallow a later Ctrl-C. Outside the main thread Tune installs no
    handler; there ``stop`` (set by the engine) ends the loop of an experiment that has the
    :class:`EngineStop` callback, and :class:`_Stopped` is raised.
    """
    main = threading.current_thread() is threading.main_thread()
    watch = main and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
    before = signal.getsignal(signal.SIGINT) if main else None
    if stop is not None and stop.is_set():
        raise _Stopped(f"{what} was stopped before it started")
    _THREAD.stop = stop
    try:
        # Tune's output goes to the log file; a long wait for resources is logged to the console
        with _output_to(log_file), watch_resource_wait(what):
            results = tuner.fit()
    finally:
        _THREAD.stop = None
        after = signal.getsignal(signal.SIGINT) if main else None
        if main:
            signal.signal(signal.SIGINT, before)
    trials = results._experiment_analysis.trials  # trial statuses are not on the ResultGrid
    unfinished = sum(t.status not in ("TERMINATED", "ERROR") for t in trials)
    return results, bool(unfinished) or (watch and after is before)


def _interrupted(what: str, path: Path) -> KeyboardInterrupt:
    return KeyboardInterrupt(
        f"{what} was interrupted; its state is saved in {path}: run the same command again to resume."
    )


@dataclass
class TrialSummary:
    """One search trial as Tune saw it."""

    trial_id: str
    config: dict[str, Any]
    value: float
    epochs: int
    error: str = ""
    #: when the searcher proposed it (0, 1, ...): breaks ties between equal best values
    order: int = 0


@dataclass
class SearchOutcome:
    """What a search found."""

    best_config: dict[str, Any]
    best_value: float
    best_trial_id: str
    trials: list[TrialSummary] = field(default_factory=list)
    #: every trial of the experiment (runs tagged with another trial id are left by a dead driver)
    trial_ids: set[str] = field(default_factory=set)

    @property
    def n_errored(self) -> int:
        return sum(bool(t.error) for t in self.trials)


def select_best(trials: list[TrialSummary], metric: str, mode: str, name: str = "") -> TrialSummary:
    """The best trial by ``metric``/``mode`` among those that finished without error.

    An errored trial (e.g. one that diverged: ``NonFiniteError``) never wins, whatever it
    reported before it failed, and neither does a non-finite value. Among equal best values
    the trial proposed first wins (as Optuna's ``best_trial``): the order of Tune's results
    follows its random trial ids, so without this rule a tie (common: top-1 on a few hundred
    validation images moves in steps of 1/n) would pick the best config by chance.

    Raises
    ------
    BrainalignError
        No trial finished with a finite value (the message lists the trials' errors).
    """
    scored = [t for t in trials if not t.error and math.isfinite(t.value)]
    if not scored:
        errors = "; ".join(t.error.splitlines()[0] for t in trials if t.error)[:2000]
        raise BrainalignError(
            f"search {name}: no trial finished with a finite {metric} ({len(trials)} trial(s), "
            f"{sum(bool(t.error) for t in trials)} failed). Errors: {errors or 'none'}. Fix the cause (e.g. "
            "narrow the search space's lr range if trials diverged) and re-run with --fresh."
        )
    best = max(t.value for t in scored) if mode == "max" else min(t.value for t in scored)
    return min((t for t in scored if t.value == best), key=lambda t: t.order)


def search_trainable_name(unit: SearchUnit) -> str:
    """The name a search's trainable is registered under in Tune: one per search, so that
    searches side by side (one Ray job, one trainable registry) never swap trainables."""
    return f"search_{unit.key}"


def run_search(unit: SearchUnit, *, folder: Path, resources: Resources, max_concurrent: int,
               log_file: Path, stop: threading.Event | None = None) -> SearchOutcome:
    """Run (or resume) one Optuna + ASHA search of Train runs; select on validation only.

    Parameters
    ----------
    unit : SearchUnit
        The search; ``unit.trial_spec.parent_run_id`` is the search's MLflow run.
    folder : Path
        The study's folder; the Tune experiment lives in ``folder / unit.key``.
    resources : Resources
        Per-trial resources.
    max_concurrent : int
        Tune's ``max_concurrent_trials``.
    log_file : Path
        Where Tune's console output goes.
    stop : threading.Event, optional
        Set by the engine (from another thread) to end the search; resumable.

    Returns
    -------
    SearchOutcome

    Raises
    ------
    KeyboardInterrupt
        The search was interrupted (Ctrl-C, ``stop``); re-running resumes it.
    BrainalignError
        No trial finished with a finite value; or the search was started by an older
        brainalign whose trainable Tune cannot restore under today's name.
    """
    path = folder / unit.key
    with _setup_turn():  # released at the first step of the Tune loop: searches side by side set up in turn
        try:
            results, interrupted = _tuner_fit(_search_tuner(unit, folder, resources, max_concurrent), log_file,
                                              what=f"search {unit.key}", stop=stop)
        except _Stopped:
            raise _interrupted(f"search {unit.key}", path) from None
    if interrupted or len(results) < unit.trials:
        raise _interrupted(f"search {unit.key}", path)
    space = unit.space
    # the searcher's proposal order: Tune tags trial k (from 1) "k_<params>", kept on restore
    trials = results._experiment_analysis.trials
    order = {str(t.trial_id): _proposal(t.experiment_tag, i) for i, t in enumerate(trials)}
    summaries: list[TrialSummary] = []
    for r in results:
        metrics = dict(r.metrics or {})
        values = []
        if r.metrics_dataframe is not None and space.metric in r.metrics_dataframe:
            values = [float(v) for v in r.metrics_dataframe[space.metric].dropna()]
        best = (max(values) if space.mode == "max" else min(values)) if values else float("nan")
        summaries.append(TrialSummary(
            trial_id=str(metrics.get("trial_id", Path(r.path).name)),
            config={k: v for k, v in dict(r.config or {}).items()},
            value=best,
            epochs=int(metrics.get("training_iteration", 0)),
            error=str(r.error or "")[:500],
        ))
        summaries[-1].order = order.get(summaries[-1].trial_id, len(trials))
    best_t = select_best(summaries, space.metric, space.mode, unit.key)
    return SearchOutcome(best_config=dict(best_t.config), best_value=best_t.value,
                         best_trial_id=best_t.trial_id, trials=summaries,
                         trial_ids={str(t.trial_id) for t in trials})


def _proposal(tag: str, index: int) -> int:
    """A search trial's proposal number from its Tune ``experiment_tag`` (``"3_lr=..."``: 3rd),
    else its place in the experiment's trial list."""
    head = str(tag or "").split("_", 1)[0]
    return int(head) - 1 if head.isdigit() else index


def _search_tuner(unit: SearchUnit, folder: Path, resources: Resources, max_concurrent: int) -> Any:
    """The search's ``Tuner``: restored from ``folder / unit.key``, else new."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    space = unit.space
    path = folder / unit.key
    trainable = tune.with_resources(tune.with_parameters(_search_trial, unit=unit), trial_resources(resources))
    trainable.__name__ = search_trainable_name(unit)  # Tune registers it under this name (per Ray job)
    if _restorable(path):
        log.info("resuming search %s from %s", unit.key, path)
        try:
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
        except ValueError as e:
            if "trainable" not in str(e).lower():
                raise
            raise BrainalignError(
                f"search {unit.key} in {path} was started by an older brainalign (its trainable had another name: "
                f"{e}); finish the study with that version or start over with --fresh."
            ) from None
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no per-study INFO lines on the console
        searcher = OptunaSearch(space=DefineByRun(space.params), metric=space.metric, mode=space.mode, seed=unit.seed)
        # stop_last_trials=False: a trial that reaches max_t ends on its own (its Train run
        # finishes, ends its MLflow run and frees its placement group) instead of being killed
        scheduler = PruningASHA(
            experiment=unit.trial.experiment, search_run_id=unit.trial_spec.parent_run_id,
            uri=unit.trial_spec.locations.tracking_uri, time_attr="training_iteration", max_t=unit.max_epochs,
            grace_period=unit.grace_period, reduction_factor=unit.reduction_factor, stop_last_trials=False,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.metric,  # here as well as on the searcher: get_best_result needs it
                mode=space.mode,
                num_samples=unit.trials,
                max_concurrent_trials=max_concurrent,
                search_alg=searcher,
                scheduler=scheduler,
            ),
            # EngineStop: the engine can end this experiment from another thread (side by side)
            run_config=tune.RunConfig(name=unit.key, storage_path=str(folder), verbose=1, callbacks=[EngineStop()],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    return tuner


@dataclass
class UnitsOutcome:
    """What a dispatch of run units produced: ``key -> metrics`` of every finished unit."""

    results: dict[str, dict[str, Any]]
    failed: dict[str, str]
    interrupted: bool


def run_units(units: Sequence[RunUnit], *, name: str, folder: Path, state_path: Path, resources: Resources,
              max_concurrent: int, log_file: Path) -> UnitsOutcome:
    """Run (or resume) run units as a Tune grid over their packs, ``max_concurrent`` at a time.

    Parameters
    ----------
    units : sequence of RunUnit
        Every unit of the study (units the state file records report without training).
    name : str
        Tune experiment name (``folder / name``; :func:`units_experiment` of the packing).
    folder : Path
        The study's folder.
    state_path : Path
        The study's state file.
    resources : Resources
        Per-unit resources; ``resources.pack`` groups the units (:func:`pack_units`).
    max_concurrent : int
        Packs at once.
    log_file : Path
        Where Tune's console output goes.

    Returns
    -------
    UnitsOutcome
        Finished units (``run_id``, ``test_top1``, ``test_top5`` ...), failed ones with their
        error, and whether Tune was interrupted. Errored units are restarted from scratch
        when the experiment is resumed.
    """
    from ray import tune

    path = folder / name
    packs = pack_units(units, resources.pack)
    trainable = tune.with_resources(tune.with_parameters(_pack_trial, packs=packs, state_path=str(state_path)),
                                    trial_resources(resources))
    if _restorable(path):
        log.info("resuming %s from %s", name, path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"pack": tune.grid_search(list(packs))},
            # tested runs always run to the end (no scheduler stops them), so a finished pack's
            # process can take the next one: it has torch, Ray Train and MLflow imported already
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(folder), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    results, interrupted = _tuner_fit(tuner, log_file)
    done: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for r in results:
        key = str((r.config or {}).get("pack", ""))
        metrics = dict(r.metrics or {})
        if r.error is not None:
            text = str(r.error)
            for u in packs.get(key, []):
                failed[u.key] = text.splitlines()[0] if text else type(r.error).__name__
        elif "results" in metrics:
            for ukey, rec in json.loads(str(metrics["results"])).items():
                done[ukey] = {k: rec[k] for k in ("run_id", "test_top1", "test_top5", "test_n_way",
                                                  "val_top1_best", "best_epoch") if k in rec}
                done[ukey] |= gallery_values(rec)
    return UnitsOutcome(results=done, failed=failed, interrupted=interrupted)
