"""Ray Tune + Optuna: the only module of brainalign that imports Tune or Optuna.

Two kinds of Tune experiments run here, both with *function trainables that drive a Ray
Train run* (the Train V2 pattern; ``Tuner(TorchTrainer)`` is gone):

* a **search** (:func:`run_search`): Optuna TPE (seeded) proposes configs from a search
  space, ASHA stops weak trials early on ``training_iteration`` (= epochs), and every trial
  is ``run_training(role="trial", evaluate_test=False, callbacks=[TuneReportCallback()])``,
  so the metric Tune and Optuna see is the validation metric each epoch reports;
* the **finals** (:func:`run_finals_tune`): a grid over ``(arm, subject, seed)`` keys, each
  ``run_training(role="final", evaluate_test=True)``; Tune gives them bounded concurrency and
  resume.

Both live under a stable path ``<ray storage>/<study>/<name>`` and are resumed with
``Tuner.restore`` when that path holds an experiment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import BrainalignError
from ..config import TrainConfig
from .study import ParamSpec, Resources, SearchSpace

__all__ = ["FinalsOutcome", "SearchOutcome", "TrialSummary", "max_concurrent_trials", "run_finals_tune", "run_search"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- resources
def max_concurrent_trials(resources: Resources, cluster: Mapping[str, float]) -> int:
    """Trials that fit at once: ``(CPUs - 1) // cpus_per_trial``, and GPUs // workers with GPUs.

    One whole CPU stays free because every Ray Data pipeline (the parquet listing task)
    needs one; with fewer free CPUs a trial's data loading waits forever.

    Parameters
    ----------
    resources : Resources
        The study's per-trial resources.
    cluster : mapping
        ``ray.cluster_resources()``.

    Returns
    -------
    int
        At least 1.

    Raises
    ------
    BrainalignError
        The cluster cannot fit even one trial (the sweep would hang).
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
        if gpus < resources.workers_per_trial:
            raise BrainalignError(
                f"[resources] use_gpu needs {resources.workers_per_trial} GPU(s) per trial; Ray has {gpus:g}."
            )
        n = min(n, int(gpus // resources.workers_per_trial))
    return n


def _env() -> dict[str, str]:
    """Absolute store locations for trial processes (Tune runs them in trial directories and
    a long-running Ray may have been started with another ``$BRAINALIGN_HOME``)."""
    from .. import paths

    return {
        "BRAINALIGN_HOME": str(paths.home()),
        "BRAINALIGN_CACHE": str(paths.cache_dir()),
        "BRAINALIGN_RAY_STORAGE": str(paths.ray_storage()),
        "MLFLOW_TRACKING_URI": paths.mlflow_tracking_uri(),
    }


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


# --------------------------------------------------------------------------- trainables
def _quiet_data() -> None:
    """No Ray Data progress bars from trial processes (they flood the console when a remote
    cluster forwards worker output to the driver)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _search_trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """Tune function trainable: one search trial = one validation-only Train run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train.runner import run_training

    os.environ.update(job["env"])
    _quiet_data()
    tid = ray.tune.get_context().get_trial_id()
    flat = dict(job["base"]) | dict(config) | {"run_name": f"{job['name']}-trial-{tid}"}
    cfg = TrainConfig.from_flat(flat, strict_types=False)
    run_training(
        cfg,
        role="trial",
        parent_run_id=job["parent_run_id"],
        extra_tags=dict(job["tags"]) | {"tune_trial_id": tid},
        callbacks=[TuneReportCallback()],  # type: ignore[no-untyped-call]
        storage_name=f"trial-{tid}",
        evaluate_test=False,
        save_checkpoint=False,
        mlflow_uri=job["env"]["MLFLOW_TRACKING_URI"],
    )


def _final_trial(config: dict[str, Any], jobs: dict[str, Any]) -> None:
    """Tune function trainable: one final = one Train run on a subject + its test evaluation."""
    import ray.tune

    from ..train.runner import run_training

    os.environ.update(jobs["env"])
    _quiet_data()
    key = config["final"]
    job = jobs["finals"][key]
    done = _recorded_final(Path(jobs["state_path"]), key)
    if done is not None:  # finished by an earlier attempt whose Tune state was not saved
        ray.tune.report(done)
        return
    tid = ray.tune.get_context().get_trial_id()
    cfg = TrainConfig.from_flat(dict(job["flat"]), strict_types=False)
    res = run_training(
        cfg,
        role="final",
        parent_run_id=job["parent_run_id"],
        extra_tags=dict(job["tags"]) | {"tune_trial_id": tid},
        storage_name=f"final-{tid}",
        evaluate_test=True,
        save_checkpoint=True,
        mlflow_uri=jobs["env"]["MLFLOW_TRACKING_URI"],
    )
    ray.tune.report({
        "final": key,
        "run_id": res.run_id,
        "test_top1": res.test["test_top1"],
        "test_top5": res.test["test_top5"],
        "test_n_way": res.test.get("test_n_way", float("nan")),
        "val_top1_best": res.val.get("val_top1_best", float("nan")),
        "best_epoch": res.best_epoch,
    } | gallery_metrics(res.test))


_GALLERY_METRIC = re.compile(r"^test_top[15]_\d+way$")


def gallery_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The subject-mean retrieval metrics of every gallery (``test_top1_16740way`` ...) in ``metrics``."""
    return {k: float(v) for k, v in metrics.items() if _GALLERY_METRIC.match(k)}


def _recorded_final(state_path: Path, key: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(state_path.read_text()).get("finals", {}).get(key)
    except (OSError, json.JSONDecodeError):
        return None
    return dict(rec) | {"final": key} if rec else None


# --------------------------------------------------------------------------- search
@dataclass
class TrialSummary:
    """One search trial as Tune saw it."""

    trial_id: str
    config: dict[str, Any]
    value: float
    epochs: int
    error: str = ""


@dataclass
class SearchOutcome:
    """What a search found."""

    best_config: dict[str, Any]
    best_value: float
    best_trial_id: str
    trials: list[TrialSummary] = field(default_factory=list)

    @property
    def n_errored(self) -> int:
        return sum(bool(t.error) for t in self.trials)


def _tuner_fit(tuner: Any) -> tuple[Any, bool]:
    """``Tuner.fit()`` and whether it was interrupted.

    Ctrl-C makes Tune stop gracefully: it saves its state, stops the trials (which may then
    look finished) and returns normally. Tune's SIGINT handler puts the previous handler back
    only when it fires, so an unchanged handler after ``fit`` means an interruption. The
    previous handler is restored in any case: Tune leaves its own installed after a normal
    run, where it would swallow a later Ctrl-C.
    """
    main = threading.current_thread() is threading.main_thread()
    watch = main and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        results = tuner.fit()
    finally:
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


def run_search(
    *,
    name: str,
    storage: Path,
    space: SearchSpace,
    base: Mapping[str, Any],
    parent_run_id: str,
    tags: Mapping[str, str],
    trials: int,
    max_epochs: int,
    grace_period: int,
    reduction_factor: int,
    seed: int,
    resources: Resources,
    max_concurrent: int,
    verbose: int = 1,
) -> SearchOutcome:
    """Run (or resume) one Optuna + ASHA search of Train runs; select on validation only.

    Parameters
    ----------
    name : str
        Experiment name; the experiment lives in ``storage / name``.
    storage : Path
        The study's Ray storage folder.
    space : SearchSpace
        What varies, the metric and the mode.
    base : mapping
        Flat config every trial starts from (study ``[config]``, encoder, table, subject...).
    parent_run_id : str
        The search's MLflow run; every trial run is its child (``role=trial``).
    tags : mapping
        Extra MLflow tags of every trial run.
    trials, max_epochs, grace_period, reduction_factor, seed : int
        Budget, ASHA parameters and the TPE sampler seed.
    resources : Resources
        Per-trial resources.
    max_concurrent : int
        Tune's ``max_concurrent_trials``.
    verbose : int
        Tune's console verbosity (0 silent, 1 status table).

    Returns
    -------
    SearchOutcome

    Raises
    ------
    KeyboardInterrupt
        The search was interrupted (Ctrl-C); re-running resumes it.
    RuntimeError
        No trial produced the metric.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    path = storage / name
    job = {"base": dict(base), "parent_run_id": parent_run_id, "tags": dict(tags), "env": _env(), "name": name}
    trainable = tune.with_resources(tune.with_parameters(_search_trial, job=job), {"cpu": resources.trial_cpus})
    if tune.Tuner.can_restore(str(path)):
        log.info("resuming search %s from %s", name, path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        searcher = OptunaSearch(space=DefineByRun(space.params), metric=space.metric, mode=space.mode, seed=seed)
        # stop_last_trials=False: a trial that reaches max_t ends on its own (its Train run
        # finishes, ends its MLflow run and frees its placement group) instead of being killed
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=grace_period,
                                  reduction_factor=reduction_factor, stop_last_trials=False)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.metric,  # here as well as on the searcher: get_best_result needs it
                mode=space.mode,
                num_samples=trials,
                max_concurrent_trials=max_concurrent,
                search_alg=searcher,
                scheduler=scheduler,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    results, interrupted = _tuner_fit(tuner)
    if interrupted or len(results) < trials:
        raise _interrupted(f"search {name}", path)
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
    scored = [t for t in summaries if not math.isnan(t.value)]
    if not scored:
        errors = "; ".join(t.error.splitlines()[0] for t in summaries if t.error)[:2000]
        raise RuntimeError(f"search {name}: no trial reported {space.metric}. Errors: {errors or 'none'}")
    best_t = max(scored, key=lambda t: t.value) if space.mode == "max" else min(scored, key=lambda t: t.value)
    return SearchOutcome(best_config=dict(best_t.config), best_value=best_t.value,
                         best_trial_id=best_t.trial_id, trials=summaries)


# --------------------------------------------------------------------------- finals
@dataclass
class FinalsOutcome:
    """What the finals experiment produced: ``key -> metrics`` of every finished final."""

    results: dict[str, dict[str, Any]]
    failed: dict[str, str]
    interrupted: bool


def run_finals_tune(
    *,
    name: str,
    storage: Path,
    finals: Mapping[str, Mapping[str, Any]],
    state_path: Path,
    resources: Resources,
    max_concurrent: int,
    verbose: int = 1,
) -> FinalsOutcome:
    """Run (or resume) every final as a Tune grid over final keys.

    Parameters
    ----------
    name : str
        Experiment name (``storage / name``).
    storage : Path
        The study's Ray storage folder.
    finals : mapping
        ``key -> {"flat": flat config, "parent_run_id": ..., "tags": {...}}``.
    state_path : Path
        The study state file; a final it already records is reported without training.
    resources : Resources
        Per-final resources (the same as a search trial).
    max_concurrent : int
        Finals at once.
    verbose : int
        Tune's console verbosity.

    Returns
    -------
    FinalsOutcome
        Finished finals (``run_id``, ``test_top1``, ``test_top5`` ...), failed ones with their
        error, and whether Tune was interrupted. Errored finals are restarted from scratch
        when the experiment is resumed.
    """
    from ray import tune

    path = storage / name
    jobs = {"finals": {k: dict(v) for k, v in finals.items()}, "env": _env(), "state_path": str(state_path)}
    trainable = tune.with_resources(tune.with_parameters(_final_trial, jobs=jobs), {"cpu": resources.trial_cpus})
    if tune.Tuner.can_restore(str(path)):
        log.info("resuming finals from %s", path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"final": tune.grid_search(sorted(finals))},
            # finals always run to the end (no scheduler stops them), so a finished final's
            # process can take the next one: it has torch, Ray Train and MLflow imported already
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=verbose,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    results, interrupted = _tuner_fit(tuner)
    done: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for r in results:
        key = str((r.config or {}).get("final", ""))
        metrics = dict(r.metrics or {})
        if r.error is not None:
            text = str(r.error)
            failed[key] = text.splitlines()[0] if text else type(r.error).__name__
        elif "run_id" in metrics:
            done[key] = {k: metrics[k] for k in ("run_id", "test_top1", "test_top5", "test_n_way",
                                                  "val_top1_best", "best_epoch") if k in metrics}
            done[key] |= gallery_metrics(metrics)
    return FinalsOutcome(results=done, failed=failed, interrupted=interrupted)
