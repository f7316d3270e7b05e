"""Cross-subject (leave-one-subject-out) study, aligned vs base image embeddings, as a Ray job.

For every held-out subject ``k`` of the study, for every image-embedding pair
``(aligned, base)`` and every seed, train on the *other* subjects' training data (the
validation split is by image, across all training subjects: ``brainalign.data.prepare``)
and test on subject ``k``'s test set. Hyperparameters come from the study file's
``[config]`` table, optionally replaced by the resolved config of a finished MLflow run
(``config_from_run``, e.g. the best final run of a sweep), or per arm by a finished sweep's
best configs (``config_from_sweep``: each image table gets the best config of its own
search), and then by ``--set`` overrides.
The result is a Table-2-style report (AlignVis ``scripts/clip_eeg_cross.sh`` protocol):
per-subject rows, aligned vs base top-1/top-5, mean +- s.e.m. across subjects, and a
paired t-test (and Wilcoxon signed-rank test) across subjects.

Submit it to a running cluster (``make cluster-up``; see docs/cluster.md)::

    source .cluster/env.sh
    ray job submit --working-dir . -- python jobs/cross_subject.py --study jobs/cross_subject_mini.toml

or run it directly (``python jobs/cross_subject.py --study ...``): it then starts or joins a
local Ray through ``brainalign.train.runner.ensure_ray``.

MLflow layout (same as the sweep's): one parent run ``role=report`` holding the report
(markdown + CSV) and summary metrics, with one child run ``role=final`` per
(held-out subject, table, seed), tagged ``brain_encoder``, ``backbone``, ``alignment``,
``subject`` (= the held-out subject) and ``seed``.

Stopping: ``ray job stop`` sends SIGTERM (then SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S``;
``cluster_up.sh`` sets 15 s), Ctrl-C sends SIGINT. Either one marks the active child run
and the parent run KILLED before the script unwinds; any other failure marks them FAILED.
Only a SIGKILL with no SIGTERM first (a lost node) can leave a run RUNNING.

Paths: ``ray job submit --working-dir .`` runs this script in a temporary copy of the
repository, so nothing here depends on the submitter's working directory. Inside a job,
``BRAINALIGN_HOME`` (the stores: prepared-data cache, Ray results, local MLflow) must be
set to an absolute path (the cluster scripts export it to every job) and ``data.path`` is
taken against it unless absolute (``--data /abs/path`` wins). All of it is resolved and
checked before any training starts.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import signal
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from brainalign import paths, tracking
from brainalign._checks import BrainalignError, check_name, check_option, check_type
from brainalign.config import TrainConfig, flatten_toml, parse_overrides
from brainalign.data.contract import open_dataset
from brainalign.data.prepare import check_subjects, load_table_for

log = logging.getLogger("brainalign.jobs.cross_subject")

STUDY_KEYS = ("name", "experiment", "subjects", "seeds", "pairs", "config_from_run", "config_from_sweep",
              "simulate")
#: Keys never taken from another run's config: they define the data, the fold, the seed,
#: where the run is tracked and what it may use on THIS cluster.
NOT_FROM_RUN = frozenset({
    "data.path", "data.subjects", "data.test_subjects", "data.image_table", "data.embeddings_dir",
    "seed", "experiment", "run_name", "num_workers", "use_gpu", "cpus_per_worker", "torch_threads",
})
ARMS = ("aligned", "base")
#: Set by the Ray job supervisor in the driver's environment: we run inside ``ray job submit``.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


# --------------------------------------------------------------------------- study
@dataclass(frozen=True)
class Study:
    """A resolved cross-subject study: what to run, all paths absolute.

    Parameters
    ----------
    name : str
        Study name (tag ``study`` on every run).
    experiment : str
        MLflow experiment of the parent and child runs.
    subjects : tuple of str
        The subject pool; each is held out once and the others train.
    seeds : tuple of int
        Seeds per (held-out subject, table).
    pairs : tuple of (str, str)
        ``(aligned, base)`` image tables, each ``"backbone:alignment"``.
    base : TrainConfig
        Hyperparameters shared by every run, data path absolute.
    config_from_run : str
        MLflow run id whose resolved config supplied the hyperparameters, or ``""``.
    config_from_sweep : str
        MLflow parent run id of a finished sweep whose per-arm best configs were used, or ``""``.
    table_configs : mapping
        Image table -> hyperparameters of that table's own best search config (from
        ``config_from_sweep``); applied over ``base`` for that table's runs.
    """

    name: str
    experiment: str
    subjects: tuple[str, ...]
    seeds: tuple[int, ...]
    pairs: tuple[tuple[str, str], ...]
    base: TrainConfig
    config_from_run: str = ""
    config_from_sweep: str = ""
    table_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def folds(self) -> list[tuple[str, tuple[str, ...]]]:
        """``[(held_out, training_subjects), ...]`` in subject order."""
        return [(s, tuple(t for t in self.subjects if t != s)) for s in self.subjects]

    def run_config(self, held_out: str, table: str, seed: int) -> TrainConfig:
        """The config of one child run: train on the others, test on ``held_out``."""
        train = tuple(t for t in self.subjects if t != held_out)
        backbone, alignment = table.split(":")
        return self.base.with_overrides(dict(self.table_configs.get(table, {})) | {
            "data.subjects": train,
            "data.test_subjects": (held_out,),
            "data.image_table": table,
            "seed": seed,
            "experiment": self.experiment,
            "run_name": f"xs-sub{held_out}-{backbone}-{alignment}-s{seed}",
        })

    @property
    def n_runs(self) -> int:
        return len(self.subjects) * len(self.pairs) * len(ARMS) * len(self.seeds)


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_pair(item: Any) -> tuple[str, str]:
    if isinstance(item, str):
        item = _csv_list(item)
    check_type("pair", item, (list, tuple))
    if len(item) != 2 or not all(isinstance(t, str) and t.count(":") == 1 for t in item):
        raise BrainalignError(
            f"A pair must be [aligned, base] image tables such as "
            f"['sim-clip:simulated', 'sim-clip:none'], got {item!r}."
        )
    return str(item[0]), str(item[1])


def in_ray_job() -> bool:
    """True when this process is the driver of a ``ray job submit`` job."""
    return RAY_JOB_ENV in os.environ


def ray_job_id() -> str:
    """The submission id of the Ray job this driver runs in, or ``""``."""
    import json

    try:
        meta = json.loads(os.environ.get(RAY_JOB_ENV, "{}")).get("metadata", {})
    except ValueError:
        return ""
    return str(meta.get("job_submission_id", ""))


def check_locations(data_path: str) -> None:
    """Refuse paths that would silently resolve inside a Ray job's temporary working copy.

    Raises
    ------
    BrainalignError
        Inside a Ray job: ``BRAINALIGN_HOME`` unset or relative.
    """
    home = os.environ.get("BRAINALIGN_HOME", "")
    if in_ray_job() and not os.path.isabs(home):
        raise BrainalignError(
            f"BRAINALIGN_HOME must be an absolute path inside a Ray job (got {home!r}): the job "
            f"runs in a temporary copy of the working dir ({os.getcwd()}), so the cache, Ray "
            f"results and data.path={data_path!r} would resolve there. Start the cluster with "
            f"scripts/cluster_up.sh (it exports BRAINALIGN_HOME to jobs) or pass it with "
            f"--runtime-env-json '{{\"env_vars\": {{\"BRAINALIGN_HOME\": \"/abs/path\"}}}}'."
        )


def config_from_run(run_id: str, uri: str) -> dict[str, Any]:
    """Hyperparameters of a finished run (its ``config/resolved_config.json`` artifact).

    Keys in :data:`NOT_FROM_RUN` (data, fold, seed, tracking, resources) are dropped.

    Raises
    ------
    BrainalignError
        The run does not exist or has no resolved config.
    """
    import json
    import tempfile

    # TODO(cross-subject issue): move this query into brainalign.tracking (the one mlflow owner).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
        with tempfile.TemporaryDirectory() as d:
            p = client.download_artifacts(run_id, "config/resolved_config.json", d)
            flat = json.loads(Path(p).read_text())
    except Exception as e:
        raise BrainalignError(
            f"config_from_run: cannot read config/resolved_config.json of MLflow run {run_id!r} at "
            f"{uri}: {e}"
        ) from e
    return {k: v for k, v in flat.items() if k not in NOT_FROM_RUN}


def configs_from_sweep(parent_run_id: str, uri: str, encoder: str) -> dict[str, dict[str, Any]]:
    """Image table -> best config of that table's search under a sweep's parent run.

    Reads the ``role=search`` children of ``parent_run_id`` for brain encoder ``encoder``
    and their ``best_config.json`` (selected on validation data by the sweep); keys in
    :data:`NOT_FROM_RUN` are dropped.

    Raises
    ------
    BrainalignError
        The run is not a sweep's parent, or has no finished search for ``encoder``.
    """
    import json
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        parent = client.get_run(parent_run_id)
    except Exception as e:
        raise BrainalignError(f"config_from_sweep: no MLflow run {parent_run_id!r} at {uri}: {e}") from e
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.role = 'search'",
    )
    out: dict[str, dict[str, Any]] = {}
    for run in children:
        if run.data.tags.get("brain_encoder") != encoder or "image_table" not in run.data.tags:
            continue
        try:
            with tempfile.TemporaryDirectory() as d:
                flat = json.loads(Path(client.download_artifacts(run.info.run_id, "best_config.json", d)).read_text())
        except Exception:  # an unfinished search logs no best config
            continue
        out[run.data.tags["image_table"]] = {k: v for k, v in flat.items() if k not in NOT_FROM_RUN}
    if not out:
        raise BrainalignError(
            f"config_from_sweep: run {parent_run_id!r} has no finished search of brain encoder {encoder!r} "
            f"(expected the parent run of a `brainalign sweep` study, role=report)."
        )
    return out


def load_study(path: str | Path, *, data: str | None = None, sets: Sequence[str] = (),
               subjects: str | None = None, seeds: str | None = None, pairs: Sequence[str] = (),
               experiment: str | None = None, from_run: str | None = None, from_sweep: str | None = None,
               uri: str | None = None) -> Study:
    """Read a study TOML, apply command-line overrides, resolve and check everything.

    The file has a ``[study]`` table (keys :data:`STUDY_KEYS`) and a ``[config]`` table of
    :class:`~brainalign.config.TrainConfig` keys (``[config.data]`` nests).

    Parameters
    ----------
    path : str or Path
        The study TOML.
    data : str, optional
        Dataset root (absolute, or relative to ``BRAINALIGN_HOME``); wins over ``data.path``.
    sets : sequence of str
        ``key=value`` TrainConfig overrides; win over the file and ``from_run``.
    subjects, seeds : str, optional
        Comma-separated subject pool / seeds replacing the study's.
    pairs : sequence of str
        ``"aligned,base"`` table pairs replacing the study's.
    experiment : str, optional
        MLflow experiment replacing the study's.
    from_run : str, optional
        MLflow run whose resolved config supplies the hyperparameters (``""`` = none),
        replacing the study's ``config_from_run``.
    from_sweep : str, optional
        Parent run of a finished sweep: each image table takes its own search's best config
        (``""`` = none), replacing the study's ``config_from_sweep``.
    uri : str, optional
        MLflow tracking URI (default: :func:`brainalign.tracking.tracking_uri`).

    Returns
    -------
    Study

    Raises
    ------
    BrainalignError
        Unknown keys, bad values, a relative location inside a Ray job, a missing dataset,
        subject or image table: all before any run starts.
    """
    p = Path(path)
    if not p.is_file():
        raise BrainalignError(f"Study file {p} does not exist (cwd {os.getcwd()}).")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BrainalignError(f"Study file {p} is not valid TOML: {e}.") from e
    for key in doc:
        check_option(f"table in {p.name}", key, ("study", "config"))
    st = dict(doc.get("study", {}))
    for key in st:
        check_option(f"[study] key in {p.name}", key, STUDY_KEYS)

    flat = flatten_toml(doc.get("config", {}))
    flat |= dict(parse_overrides(sets))
    if data:
        flat["data.path"] = data
    check_locations(str(flat.get("data.path", TrainConfig().data.path)))  # before any store is touched
    run_id = from_run if from_run is not None else str(st.get("config_from_run", ""))
    sweep_id = from_sweep if from_sweep is not None else str(st.get("config_from_sweep", ""))
    if run_id and sweep_id:
        raise BrainalignError("Use config_from_run or config_from_sweep, not both.")
    uri = uri or tracking.tracking_uri()
    if run_id:  # precedence: [config] < that run's hyperparameters < --set / --data
        flat = flatten_toml(doc.get("config", {})) | config_from_run(run_id, uri)
        flat |= dict(parse_overrides(sets)) | ({"data.path": data} if data else {})
    base = TrainConfig.from_flat(flat).resolved()

    root = Path(base.data.path)
    if "simulate" in st:  # validated always; creates data.path (absent only) where the job runs
        from brainalign.data.contract import MANIFEST
        from brainalign.data.simulate import simulate_dataset
        from brainalign.sweep.study import parse_simulate

        sim = parse_simulate(f"[study] of {p.name}:", st["simulate"])
        if not (root / MANIFEST).is_file():
            log.info("simulating %s (preset %s, seed %d): data.path is missing", root, sim.preset, sim.seed)
            simulate_dataset(root, sim.preset, seed=sim.seed, null=sim.null,
                             overrides=dict(sim.overrides) or None, progress=False)
    ds = open_dataset(root)  # raises if missing
    pool = tuple(_csv_list(subjects)) if subjects else tuple(str(s) for s in st.get("subjects", ()))
    pool = pool or tuple(ds.meta.subjects)
    check_subjects(ds, pool, "study subjects")
    if len(pool) < 2:
        raise BrainalignError(f"A cross-subject study needs at least 2 subjects, got {list(pool)}.")
    try:
        seed_list = [int(s) for s in _csv_list(seeds)] if seeds else list(st.get("seeds", [base.seed]))
    except ValueError:
        raise BrainalignError(f"--seeds must be comma-separated integers, got {seeds!r}.") from None
    for s in seed_list:
        check_type("seed", s, int)
    pair_list = tuple(_parse_pair(x) for x in (pairs or st.get("pairs", ())))
    if not pair_list:
        raise BrainalignError("The study has no pairs: set [study] pairs = [[aligned, base], ...] or --pair.")
    for table in {t for pr in pair_list for t in pr}:  # every table exists and covers the images
        load_table_for(base.with_overrides({"data.image_table": table}))
    table_configs: dict[str, dict[str, Any]] = {}
    if sweep_id:
        found = configs_from_sweep(sweep_id, uri, base.encoder)
        missing = sorted({t for pr in pair_list for t in pr} - set(found))
        if missing:
            raise BrainalignError(
                f"config_from_sweep: sweep {sweep_id!r} tuned no {base.encoder!r} search for table(s) {missing} "
                f"(it tuned {sorted(found)}); choose pairs the sweep covered."
            )
        overrides = dict(parse_overrides(sets))  # --set still wins over the sweep
        for table, flat in found.items():
            table_configs[table] = {k: v for k, v in flat.items() if k not in overrides}
            base.with_overrides(table_configs[table])  # validated now, before any run
    return Study(
        name=check_name("[study] name", str(st.get("name", p.stem))),  # part of Ray storage names
        experiment=check_name("experiment", experiment or str(st.get("experiment", "brainalign-cross-subject"))),
        subjects=pool,
        seeds=tuple(dict.fromkeys(seed_list)),
        pairs=pair_list,
        base=base,
        config_from_run=run_id,
        config_from_sweep=sweep_id,
        table_configs=table_configs,
    )


# --------------------------------------------------------------------------- statistics
@dataclass
class Paired:
    """Summary of paired per-subject values ``a`` (aligned) vs ``b`` (base)."""

    n: int
    mean_a: float
    sem_a: float
    mean_b: float
    sem_b: float
    mean_diff: float
    sem_diff: float
    t: float
    p_t: float
    p_wilcoxon: float
    notes: tuple[str, ...] = ()


def paired_stats(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Mean +- s.e.m. of ``a``, ``b`` and ``a - b``; two-sided paired t-test and Wilcoxon.

    The statistics are the sweep report's (:func:`brainalign.sweep.report.mean_sem`,
    :func:`brainalign.sweep.report.paired_tests`), so a cross-subject table and a sweep's
    Table 1 compute their numbers the same way.

    Parameters
    ----------
    a, b : sequence of float
        Paired values (here: per-subject, seed-averaged accuracies), same length.

    Returns
    -------
    Paired
        Tests are ``nan`` when undefined (fewer than 2 pairs, all differences zero, or equal
        differences for the t-test), with the reason in ``notes``.

    Raises
    ------
    ValueError
        ``a`` and ``b`` differ in length.
    """
    from brainalign.sweep.report import mean_sem, paired_tests

    ttest, wilcoxon = paired_tests(a, b)
    d = [x - y for x, y in zip(a, b, strict=True)]
    (ma, sa), (mb, sb), (md, sd) = mean_sem(a), mean_sem(b), mean_sem(d)
    notes = tuple(dict.fromkeys(x.note for x in (ttest, wilcoxon) if x.note))
    return Paired(len(d), ma, sa, mb, sb, md, sd, ttest.statistic, ttest.p, wilcoxon.p, notes)


# --------------------------------------------------------------------------- report
@dataclass
class RunRow:
    """One finished child run."""

    subject: str
    pair: int
    arm: str
    image_table: str
    seed: int
    top1: float
    top5: float
    n_way: int
    run_id: str
    best_epoch: int


@dataclass
class Report:
    """The Table-2-style report of a study: markdown, CSVs and summary metrics."""

    markdown: str
    subjects_csv: str
    runs_csv: str
    metrics: dict[str, float] = field(default_factory=dict)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def _pm(m: float, s: float) -> str:
    return f"{_pct(m)} ± {_pct(s)}" if not math.isnan(s) else _pct(m)


def _p(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3g}"


def build_report(study: Study, rows: Sequence[RunRow], *, partial: bool = False) -> Report:
    """Per-subject table (seed means), mean +- s.e.m. across subjects and paired tests."""
    md = [f"# Cross-subject study `{study.name}`{' (PARTIAL: the study did not finish)' if partial else ''}",
          "",
          f"Leave-one-subject-out: train on the other {len(study.subjects) - 1} subject(s) "
          f"(validation split by image), test on the held-out subject. Encoder `{study.base.encoder}`, "
          f"{study.base.epochs} epochs, batch {study.base.batch_size}, lr {study.base.lr:g}, "
          f"T {study.base.temperature:g}; seeds {list(study.seeds)}. Accuracies in %, mean over seeds; "
          f"tests are paired across subjects.", ""]
    sub_out = io.StringIO()
    sw = csv.writer(sub_out, lineterminator="\n")
    sw.writerow(["pair", "aligned_table", "base_table", "subject", "n_seeds",
                 "aligned_top1", "base_top1", "diff_top1", "aligned_top5", "base_top5", "diff_top5"])
    metrics: dict[str, float] = {}
    for i, (aligned, base) in enumerate(study.pairs):
        prefix = "" if len(study.pairs) == 1 else f"pair{i}_"
        per: dict[str, dict[str, dict[str, list[float]]]] = {}
        n_way = 0
        for r in rows:
            if r.pair != i:
                continue
            cell = per.setdefault(r.subject, {}).setdefault(r.arm, {"top1": [], "top5": []})
            cell["top1"].append(r.top1)
            cell["top5"].append(r.top5)
            n_way = max(n_way, r.n_way)
        md += [f"## `{aligned}` (aligned) vs `{base}` (base)" + (f", {n_way}-way retrieval" if n_way else ""),
               "",
               "| held-out subject | seeds | aligned top-1 | base top-1 | Δ top-1 | aligned top-5 | base top-5 | Δ top-5 |",
               "|---|---|---|---|---|---|---|---|"]
        paired: dict[str, tuple[list[float], list[float]]] = {"top1": ([], []), "top5": ([], [])}
        for subject in study.subjects:
            cells = per.get(subject, {})
            if not all(a in cells for a in ARMS):
                md.append(f"| sub-{subject} | – | – | – | – | – | – | – |")
                continue
            m = {(a, k): sum(cells[a][k]) / len(cells[a][k]) for a in ARMS for k in ("top1", "top5")}
            n_seeds = min(len(cells[a]["top1"]) for a in ARMS)
            for k in ("top1", "top5"):
                paired[k][0].append(m["aligned", k])
                paired[k][1].append(m["base", k])
            d1 = m["aligned", "top1"] - m["base", "top1"]
            d5 = m["aligned", "top5"] - m["base", "top5"]
            md.append(f"| sub-{subject} | {n_seeds} | {_pct(m['aligned', 'top1'])} | {_pct(m['base', 'top1'])} | "
                      f"{d1 * 100:+.1f} | {_pct(m['aligned', 'top5'])} | {_pct(m['base', 'top5'])} | {d5 * 100:+.1f} |")
            sw.writerow([i, aligned, base, subject, n_seeds, f"{m['aligned', 'top1']:.6f}", f"{m['base', 'top1']:.6f}",
                         f"{d1:.6f}", f"{m['aligned', 'top5']:.6f}", f"{m['base', 'top5']:.6f}", f"{d5:.6f}"])
        s1 = paired_stats(*paired["top1"])
        s5 = paired_stats(*paired["top5"])
        md += [f"| **mean ± s.e.m.** (n={s1.n}) | | {_pm(s1.mean_a, s1.sem_a)} | {_pm(s1.mean_b, s1.sem_b)} | "
               f"{_pm(s1.mean_diff, s1.sem_diff)} | {_pm(s5.mean_a, s5.sem_a)} | {_pm(s5.mean_b, s5.sem_b)} | "
               f"{_pm(s5.mean_diff, s5.sem_diff)} |",
               "",
               f"Paired t-test across subjects (two-sided, df={max(s1.n - 1, 0)}): top-1 t={_p(s1.t)}, "
               f"p={_p(s1.p_t)}; top-5 t={_p(s5.t)}, p={_p(s5.p_t)}. Wilcoxon signed-rank: top-1 "
               f"p={_p(s1.p_wilcoxon)}, top-5 p={_p(s5.p_wilcoxon)}.", ""]
        md += [f"- top-{k[-1]}: {note}." for k, s in (("top1", s1), ("top5", s5)) for note in s.notes]
        md += [""] if s1.notes or s5.notes else []
        for k, s in (("top1", s1), ("top5", s5)):
            metrics |= {f"{prefix}xs_{k}_aligned_mean": s.mean_a, f"{prefix}xs_{k}_aligned_sem": s.sem_a,
                        f"{prefix}xs_{k}_base_mean": s.mean_b, f"{prefix}xs_{k}_base_sem": s.sem_b,
                        f"{prefix}xs_{k}_diff_mean": s.mean_diff, f"{prefix}xs_{k}_ttest_t": s.t,
                        f"{prefix}xs_{k}_ttest_p": s.p_t, f"{prefix}xs_{k}_wilcoxon_p": s.p_wilcoxon}
        metrics[f"{prefix}xs_n_subjects"] = float(s1.n)
    runs_out = io.StringIO()
    rw = csv.writer(runs_out, lineterminator="\n")
    rw.writerow(["subject", "pair", "arm", "image_table", "seed", "test_top1", "test_top5", "n_way",
                 "best_epoch", "run_id"])
    for r in rows:
        rw.writerow([r.subject, r.pair, r.arm, r.image_table, r.seed, f"{r.top1:.6f}", f"{r.top5:.6f}",
                     r.n_way, r.best_epoch, r.run_id])
    # undefined statistics (n < 2 subjects) stay out of the metrics; the markdown says "n/a"
    metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
    return Report("\n".join(md), sub_out.getvalue(), runs_out.getvalue(), metrics)


def log_report(parent: str, report: Report, uri: str) -> None:
    """Markdown, CSVs and summary metrics onto the parent run."""
    tracking.log_text(parent, report.markdown, "report/cross_subject.md", uri=uri)
    tracking.log_text(parent, report.subjects_csv, "report/cross_subject.csv", uri=uri)
    tracking.log_text(parent, report.runs_csv, "report/cross_subject_runs.csv", uri=uri)
    if report.metrics:
        tracking.log_metrics(parent, report.metrics, uri=uri)


# --------------------------------------------------------------------------- stop handling
class JobStopped(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGINT (``ray job stop``, Ctrl-C).

    A ``KeyboardInterrupt`` so that ``run_training`` marks its run KILLED, not FAILED.
    """


class StopGuard:
    """On SIGTERM/SIGINT: mark the running child runs and the parent KILLED, then unwind.

    The runs are ended inside the handler, before anything else, because ``ray job stop``
    sends SIGKILL after a short grace period (``RAY_JOB_STOP_WAIT_TIME_S``, Ray's default 3 s).
    Install it AFTER ``ray.init``: Ray's driver installs its own SIGTERM handler
    (``sys.exit``), which would end the runs as FAILED. Ray Train's ``fit()`` installs its own
    SIGINT handler (a graceful abort) for the duration of training, so a Ctrl-C *during*
    training ends the child and the parent FAILED (never RUNNING); SIGTERM is always ours.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.parent: str | None = None
        self.experiment_id: str | None = None
        self.signal: str | None = None
        self.killed: set[str] = set()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # second signal while unwinding: keep unwinding
            return
        self.signal = signal.Signals(signum).name
        log.warning("received %s: marking the study's MLflow runs KILLED", self.signal)
        try:
            self.kill_runs()
        finally:
            raise JobStopped(f"stopped by {self.signal}")

    def check(self) -> None:
        """Raise if a signal arrived and its exception was swallowed somewhere below us."""
        if self.signal is not None:
            raise JobStopped(f"stopped by {self.signal}")

    def kill_runs(self) -> None:
        """End every RUNNING child of the parent and the parent itself as KILLED."""
        if self.parent is None:
            return
        self.killed |= set(running_children(self.parent, self.experiment_id, self.uri))
        for run_id in sorted(self.killed):
            tracking.end_run(run_id, "KILLED", uri=self.uri)
            log.warning("child run %s -> KILLED", run_id)
        tracking.end_run(self.parent, "KILLED", uri=self.uri)
        log.warning("parent run %s -> KILLED", self.parent)


def running_children(parent: str, experiment_id: str | None, uri: str) -> list[str]:
    """Ids of the RUNNING runs whose ``mlflow.parentRunId`` is ``parent``."""
    # TODO(cross-subject issue): move this query into brainalign.tracking (the one mlflow owner).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = experiment_id or client.get_run(parent).info.experiment_id
    runs = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    return [r.info.run_id for r in runs]


# --------------------------------------------------------------------------- the study
def run_study(study: Study, *, uri: str, guard: StopGuard) -> tuple[str, list[RunRow], Report]:
    """Create the parent run, train and test every child, log the report; returns them all."""
    from brainalign.train.runner import run_training

    base = study.base
    tags = {
        "role": "report", "study": study.name, "study_kind": "cross_subject",
        "brain_encoder": base.encoder, "dataset": Path(base.data.path).name,
        "subjects": ",".join(study.subjects), "seeds": ",".join(map(str, study.seeds)),
        "pairs": ";".join(f"{a}|{b}" for a, b in study.pairs), "git_commit": tracking.code_version(),
        "config_from_run": study.config_from_run, "config_from_sweep": study.config_from_sweep,
        "ray_job": ray_job_id(),
    }
    params = {k: v for k, v in base.to_flat().items()
              if k not in ("data.subjects", "data.test_subjects", "data.image_table", "seed", "run_name")}
    params |= {"study.subjects": study.subjects, "study.seeds": study.seeds, "study.n_runs": study.n_runs,
               "study.pairs": [f"{a}|{b}" for a, b in study.pairs]}
    parent = tracking.start_run(study.experiment, run_name=f"{study.name}-report", params=params, tags=tags, uri=uri)
    if study.table_configs:
        tracking.log_dict(parent, {t: dict(c) for t, c in study.table_configs.items()},
                          "config/table_configs.json", uri=uri)
    guard.parent = parent
    guard.experiment_id = tracking.ensure_experiment(study.experiment, uri)
    log.info("parent MLflow run %s (experiment %s, %d child runs)", parent, study.experiment, study.n_runs)
    rows: list[RunRow] = []
    try:
        done = 0
        for held_out, train in study.folds():
            for i, pair in enumerate(study.pairs):
                for arm, table in zip(ARMS, pair, strict=True):
                    for seed in study.seeds:
                        guard.check()
                        cfg = study.run_config(held_out, table, seed)
                        done += 1
                        log.info("[%d/%d] held-out sub-%s, train %s, %s (%s), seed %d", done, study.n_runs,
                                 held_out, ",".join(train), table, arm, seed)
                        t0 = time.monotonic()
                        res = run_training(
                            cfg, role="final", parent_run_id=parent,
                            extra_tags={"subject": held_out, "held_out_subject": held_out, "study": study.name,
                                        "study_kind": "cross_subject", "arm": arm, "pair": f"{pair[0]}|{pair[1]}"},
                            storage_name=f"{study.name}-{parent[:8]}-{cfg.run_name}",
                            mlflow_uri=uri,
                        )
                        guard.check()
                        guard.install()  # Ray Train's fit() replaced our SIGINT handler with its own
                        rows.append(RunRow(
                            subject=held_out, pair=i, arm=arm, image_table=table, seed=seed,
                            top1=res.test[f"test_top1_sub-{held_out}"], top5=res.test[f"test_top5_sub-{held_out}"],
                            n_way=int(res.test.get("test_n_way", 0)), run_id=res.run_id, best_epoch=res.best_epoch,
                        ))
                        log.info("  -> run %s: top-1 %.3f, top-5 %.3f (%.0f s)", res.run_id, rows[-1].top1,
                                 rows[-1].top5, time.monotonic() - t0)
        report = build_report(study, rows)
        log_report(parent, report, uri)
        tracking.end_run(parent, "FINISHED", uri=uri)
        return parent, rows, report
    except BaseException as e:
        stopped = guard.signal is not None
        if stopped:
            # Re-assert KILLED: code unwinding below the handler (run_training, Ray Train) may
            # have ended the child FAILED after the handler marked it KILLED.
            guard.kill_runs()
        _log_partial(study, rows, parent, uri)
        if not stopped:
            tracking.end_run(parent, "FAILED", uri=uri)
            raise
        if isinstance(e, JobStopped):
            raise
        raise JobStopped(f"stopped by {guard.signal}") from e


def _log_partial(study: Study, rows: Sequence[RunRow], parent: str, uri: str) -> None:
    """Keep what finished: the partial report goes onto the parent before it is ended."""
    try:
        log_report(parent, build_report(study, rows, partial=True), uri)
    except Exception:  # the report is a courtesy here; never mask the original error
        log.exception("could not log the partial report")


# --------------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/cross_subject.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="study TOML ([study] + [config])")
    p.add_argument("--data", default=None, help="dataset root (absolute, or relative to BRAINALIGN_HOME)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set epochs=2 (repeatable)")
    p.add_argument("--subjects", default=None, help="subject pool, e.g. 01,02,03 (default: study or all)")
    p.add_argument("--seeds", default=None, help="e.g. 7,42 (default: the study's)")
    p.add_argument("--pair", dest="pairs", action="append", default=[], metavar="ALIGNED,BASE",
                   help="image tables, e.g. sim-clip:simulated,sim-clip:none (repeatable)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the study's)")
    p.add_argument("--config-from-run", dest="from_run", default=None, metavar="RUN_ID",
                   help="take the hyperparameters from this MLflow run's resolved config")
    p.add_argument("--config-from-sweep", dest="from_sweep", default=None, metavar="PARENT_RUN_ID",
                   help="each image table takes the best config of its own search in this sweep")
    p.add_argument("--dry-run", action="store_true", help="resolve and print the plan, run nothing")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: resolve the study, connect to Ray, run it, print the report.

    Returns
    -------
    int
        0 on success, 2 for a bad study or location (nothing ran), 130 when stopped by a
        signal (runs marked KILLED). Other failures raise (runs marked FAILED).
    """
    # Ray Data's progress bars would bury the report in the job log (the driver's DataContext,
    # which carries this default, travels with the datasets to the Train workers).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    uri = tracking.tracking_uri()
    try:
        study = load_study(args.study, data=args.data, sets=args.sets, subjects=args.subjects, seeds=args.seeds,
                           pairs=args.pairs, experiment=args.experiment, from_run=args.from_run,
                           from_sweep=args.from_sweep, uri=uri)
    except BrainalignError as e:
        print(f"cross_subject: {e}", file=sys.stderr)
        return 2
    print(f"study {study.name}: subjects {list(study.subjects)}, pairs {list(study.pairs)}, seeds "
          f"{list(study.seeds)} -> {study.n_runs} runs; data {study.base.data.path}; MLflow {uri}; "
          f"home {paths.home()}", flush=True)
    if args.dry_run:
        for held_out, _ in study.folds():
            for pair in study.pairs:
                for table in pair:
                    for seed in study.seeds:
                        c = study.run_config(held_out, table, seed)
                        print(f"  {c.run_name}: train {list(c.data.subjects)} test {list(c.data.test_subjects)}")
        return 0

    from brainalign.train.runner import ensure_ray

    ensure_ray()  # connects to RAY_ADDRESS inside a job; must precede the guard (see StopGuard)
    guard = StopGuard(uri)
    guard.install()
    try:
        parent, _rows, report = run_study(study, uri=uri, guard=guard)
    except JobStopped as e:
        print(f"cross_subject: {e}; MLflow runs marked KILLED", file=sys.stderr, flush=True)
        return 130
    print(report.markdown, flush=True)
    print(f"\nparent MLflow run: {parent}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
