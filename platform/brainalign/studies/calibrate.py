"""The ``calibrate`` kind: how often the report's tests reject when they should not, and when they should.

A calibration runs many independent *draws* of the simulator through the real training and
evaluation code (:mod:`brainalign.data.prepare`, :func:`brainalign.train.loop.build_run`,
``train_one_epoch``, ``evaluate`` with early stopping on the config's ``select_metric``, the
same repetition-averaged N-way test retrieval as a tested run) at one small fixed recipe
(``[config]``, no search). Each draw trains every subject x arm x seed of the study, compares
aligned with base exactly as a study report does (:func:`brainalign.stats.paired_comparison`
per metric, Holm over the draw's metrics) and keeps only the p-values. Draws run as Ray
tasks, in parallel; each writes its simulated data under the study's ``dataset`` folder
(shared storage) and removes it when done.

Two kinds of draws (``effects``):

* ``null``: the simulator's null mode (``simulate.null``): aligned and base tables identical in
  distribution. The fraction of draws with ``p < alpha`` is the test's false-positive rate.
* ``planted``: the simulator's default aligned/base weights: the fraction is the power.

Where the tables come from (``tables``):

* ``"per_subject"`` (default): every subject of a draw gets its own simulated dataset and so
  its own realization of the two tables. The subjects' differences are then independent and,
  under the null, symmetric about zero: exactly the null hypothesis of the subject-level
  tests ("the arms are exchangeable within a subject").
* ``"shared"``: one dataset per draw, so all subjects share one table pair (what a real study
  does: one human-aligned and one base model). The subject-level tests then test "this table
  pair differs on this population"; under the simulator null two independently drawn tables
  do differ by chance, and that difference is common to all subjects, so these tests reject
  more often than ``alpha``. This design measures that (docs/statistics.md).

``[study]`` keys of this kind: ``draws`` (per effect), ``effects`` (default
``["null", "planted"]``), ``tables``, ``first_seed`` (draw ``k`` of an effect uses data seed
``first_seed + k``; null and planted draws use different seeds) and ``bins`` (p-value
histogram); the common ``correction`` (``holm`` or ``bh``) is applied over each draw's metrics. ``simulate`` gives the preset and its overrides; its
``seed`` and ``null`` are set per draw. Run it with ``brainalign calibrate STUDY`` (or
``brainalign study run STUDY``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import stats
from .._checks import BrainalignError, check_option
from ..config import TrainConfig
from .searchspace import SearchSpace
from .spec import Arm, Study, StudyKind, as_int, as_str, register_kind
from .units import RunUnit, SearchUnit, StudyContext

__all__ = [
    "TESTS",
    "CalibrationOptions",
    "CalibrationPlan",
    "CalibrationResult",
    "DrawSpec",
    "binomial_ci",
    "run_draw",
    "summarize_draws",
    "train_and_test",
]

log = logging.getLogger(__name__)

_KEYS = ("draws", "effects", "tables", "first_seed", "bins")
EFFECTS = ("null", "planted")
TABLES = ("per_subject", "shared")
#: The tests whose rejection rates a calibration reports (name -> how it is read from a comparison).
TESTS = ("permutation", "t", "wilcoxon", "permutation_holm", "mixed")
_TEST_LABELS = {
    "permutation": "exact sign-flip permutation (primary), raw p",
    "t": "paired t across subjects, raw p",
    "wilcoxon": "Wilcoxon signed-rank across subjects, raw p",
    "permutation_holm": "primary test, family-adjusted p (over the draw's metrics)",
    "mixed": "run-level mixed model (random subject intercept + arm effect), Wald p",
}
_METRICS = ("test_top1", "test_top5")
_SEED_STRIDE = 1_000_003  # planted draws use seeds far from the null draws'


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class CalibrationOptions:
    """The calibration's own ``[study]`` settings (see the module docstring)."""

    draws: Mapping[str, int]
    effects: tuple[str, ...] = EFFECTS
    tables: str = "per_subject"
    first_seed: int = 1
    correction: str = "holm"
    bins: int = 20

    def to_json(self) -> dict[str, Any]:
        return {"draws": dict(self.draws), "effects": list(self.effects), "tables": self.tables,
                "first_seed": self.first_seed, "correction": self.correction, "bins": self.bins}


def _parse(w: str, st: Mapping[str, Any], study: Study) -> CalibrationOptions:
    if study.simulate is None:
        raise BrainalignError(f"{w} simulate: a calibration draws its data from the simulator; add e.g. "
                              "simulate = { preset = \"tiny\", overrides = { n_subjects = 8 } }.")
    if len(study.encoders) != 1 or len(study.pairs) != 1:
        raise BrainalignError(f"{w}: a calibration compares one encoder on one pair (got encoders "
                              f"{list(study.encoders)}, {len(study.pairs)} pair(s)); list one of each.")
    raw_effects = st.get("effects", list(EFFECTS))
    if not isinstance(raw_effects, list) or not raw_effects:
        raise BrainalignError(f"{w} effects must be a non-empty list of {list(EFFECTS)}.")
    effects = tuple(check_option(f"{w} effects entry", as_str(f"{w} effects entry", e), EFFECTS)
                    for e in raw_effects)
    if len(set(effects)) != len(effects):
        raise BrainalignError(f"{w} effects has duplicates: {list(effects)}.")
    raw_draws = st.get("draws", 200)
    if isinstance(raw_draws, Mapping):
        unknown = sorted(set(raw_draws) - set(effects))
        if unknown:
            raise BrainalignError(f"{w} draws names {unknown}, which are not in effects {list(effects)}; "
                                  f"use e.g. draws = {{ null = 200, planted = 100 }}.")
        draws = {e: as_int(f"{w} draws.{e}", raw_draws.get(e, 200), 1) for e in effects}
    else:
        n = as_int(f"{w} draws", raw_draws, 1)
        draws = {e: n for e in effects}
    opts = CalibrationOptions(
        draws=draws,
        effects=effects,
        tables=check_option(f"{w} tables", as_str(f"{w} tables", st.get("tables", "per_subject")), TABLES),
        first_seed=as_int(f"{w} first_seed", st.get("first_seed", 1), 0),
        correction=study.correction,
        bins=as_int(f"{w} bins", st.get("bins", 20), 2),
    )
    from ..data.simulate import make_params

    n_sim = make_params(study.simulate.preset, study.simulate.overrides).n_subjects
    sim_subjects = tuple(f"{i + 1:02d}" for i in range(n_sim))
    if opts.tables == "shared" and not set(study.subjects) <= set(sim_subjects):
        raise BrainalignError(
            f"{w} subjects {list(study.subjects)}: the simulator preset {study.simulate.preset!r} makes subjects "
            f"{list(sim_subjects)}; set simulate.overrides.n_subjects = {len(study.subjects)} or fewer subjects.")
    return opts


# --------------------------------------------------------------------------- one draw
@dataclass(frozen=True)
class DrawSpec:
    """One draw: what a Ray task receives (plain values only).

    Parameters
    ----------
    effect : {"null", "planted"}
        Simulator null mode or the default planted effect.
    index : int
        Draw number within its effect.
    data_seed : int
        Simulator seed (per-subject draws derive one seed per subject from it).
    folder : str
        Where the draw's data and cache live (shared storage; removed when done).
    preset : str
        Simulator preset.
    overrides : mapping
        Simulator overrides.
    tables : {"per_subject", "shared"}
        See the module docstring.
    subjects : tuple of str
        The study's subjects.
    seeds : tuple of int
        Training seeds per subject and arm.
    arms : tuple of Arm
        Aligned arm, then base arm.
    config : mapping
        Flat TrainConfig shared by every run (data path, subjects, seed and table set per run).
    correction : str
        Family-wise method over the draw's metrics.
    """

    effect: str
    index: int
    data_seed: int
    folder: str
    preset: str
    overrides: Mapping[str, Any]
    tables: str
    subjects: tuple[str, ...]
    seeds: tuple[int, ...]
    arms: tuple[Arm, Arm]
    config: Mapping[str, Any]
    correction: str = "holm"


def train_and_test(cfg: TrainConfig, cache: Path) -> dict[str, float]:
    """Train ``cfg`` in this process with the platform's training loop and test it.

    The same functions a Ray Train worker and the run driver use: ``prepare`` (seeded
    validation split, normalization, repetition averaging), ``build_run``,
    ``train_one_epoch`` on full seeded batches, ``evaluate`` on the validation rows each
    epoch, :class:`~brainalign.train.loop.EarlyStopping` on ``cfg.select_metric`` (the
    checkpoint is the best validation epoch), then N-way retrieval of every test subject's
    repetition-averaged test trials. Nothing is tracked (a calibration makes thousands of these).

    Returns
    -------
    dict
        ``test_top1``, ``test_top5`` (means over ``cfg.data.eval_subjects``), ``best_epoch``.

    Raises
    ------
    BrainalignError
        Bad data or sizes, or a diverged run (NaN loss or weights).
    """
    import pyarrow.parquet as pq
    import torch

    from ..data.contract import open_dataset
    from ..data.prepare import catalog_embeddings, check_sizes, load_table_for, load_test, prepare
    from ..metrics import retrieval_ranks
    from ..train.loop import EarlyStopping, build_run, encode, evaluate, train_one_epoch
    from ..train.ray_worker import _shuffled_batches

    cfg = cfg.resolved()
    ds = open_dataset(cfg.data.path)
    table, _ = load_table_for(cfg)
    emb = catalog_embeddings(ds, table, ds.image_ids("train") + ds.image_ids("test"))
    prepared = prepare(cfg, cache)
    check_sizes(n_train_rows=prepared.n_train_rows, n_val_images=len(prepared.val_images), batch_size=cfg.batch_size,
                num_workers=1, val_fraction=cfg.data.val_fraction, where=f"calibration data {cfg.data.path}")

    def rows(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = pq.read_table(folder)
        x = t.column("epoch").combine_chunks().to_numpy_ndarray()
        return (torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                torch.from_numpy(t.column("image_index").to_numpy().astype(np.int64)),
                torch.from_numpy(t.column("subject_index").to_numpy().astype(np.int64)))

    train, val = rows(prepared.train_dir), rows(prepared.val_dir)
    torch.set_num_threads(max(1, cfg.torch_threads or int(cfg.cpus_per_worker)))
    run = build_run(cfg, n_chans=prepared.n_chans, n_times=prepared.n_times, image_emb=torch.from_numpy(emb))
    stopper = EarlyStopping(cfg.select_metric, cfg.patience)
    for epoch in range(cfg.epochs):
        metrics = train_one_epoch(run, _shuffled_batches(train, cfg.batch_size, cfg.seed * 10_000 + epoch))
        metrics |= evaluate(run, *val)
        if not math.isfinite(metrics["val_loss"]):
            raise BrainalignError(f"calibration run diverged: validation loss {metrics['val_loss']} at epoch {epoch} "
                                  f"(lr {cfg.lr:g}); lower the learning rate in [config].")
        stopper.update(run, metrics)
        if stopper.should_stop:
            break
    run.model.load_state_dict(stopper.state_copy())
    pos = ds.image_index()
    acc: dict[int, list[float]] = {1: [], 5: []}
    for subject in cfg.data.eval_subjects:
        ids, x = load_test(cfg, subject)
        sidx = cfg.data.subjects.index(subject) if subject in cfg.data.subjects else -1
        z = encode(run, torch.from_numpy(x), torch.full((len(ids),), sidx, dtype=torch.long))
        ranks = retrieval_ranks(z, run.image_emb[[pos[i] for i in ids]], torch.arange(len(ids)))
        for k in acc:
            acc[k].append(float((ranks <= k).float().mean()))
    return {"test_top1": float(np.mean(acc[1])), "test_top5": float(np.mean(acc[5])),
            "best_epoch": float(stopper.best_epoch)}


def _simulate(spec: DrawSpec, folder: Path, seed: int, n_subjects: int | None) -> Path:
    from ..data.simulate import simulate_dataset

    overrides = dict(spec.overrides) | ({"n_subjects": n_subjects} if n_subjects else {})
    return simulate_dataset(folder, spec.preset, seed=seed, null=spec.effect == "null", overrides=overrides,
                            progress=False)


def run_draw(spec: DrawSpec) -> dict[str, Any]:
    """Simulate one draw, train and test every subject x arm x seed, compare the arms.

    Returns
    -------
    dict
        ``effect``, ``index``, ``data_seed``, ``seconds``, and per metric the subject-level
        mean difference and the p-values of :data:`TESTS` (NaN where undefined).
    """
    t0 = time.perf_counter()
    root = Path(spec.folder)
    if root.exists():  # a draw interrupted earlier: start it over
        shutil.rmtree(root)
    root.mkdir(parents=True)
    try:
        values: dict[tuple[str, str], dict[str, list[float]]] = {}
        for si, subject in enumerate(spec.subjects):
            if spec.tables == "per_subject":
                # its own dataset (and so its own pair of table realizations) per subject
                data = _simulate(spec, root / f"sub-{subject}", spec.data_seed * 1_000 + si, 1)
                data_subject = "01"
            else:
                data = root / "data"
                if not data.exists():
                    _simulate(spec, data, spec.data_seed, None)
                data_subject = subject
            for arm in spec.arms:
                for seed in spec.seeds:
                    flat = dict(spec.config) | {"data.path": str(data), "data.subjects": (data_subject,),
                                                "data.test_subjects": (), "data.image_table": arm.table,
                                                "seed": seed, "encoder": arm.encoder}
                    res = train_and_test(TrainConfig.from_flat(flat, strict_types=False), root / "cache")
                    for m in _METRICS:
                        values.setdefault((m, arm.arm), {}).setdefault(subject, []).append(res[m])
        comparisons = [stats.paired_comparison(values[(m, "aligned")], values[(m, "base")], name=m,
                                               seed=spec.data_seed, n_bootstrap=999)
                       for m in _METRICS]
        comparisons = list(stats.correct_family(comparisons, spec.correction))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"effect": spec.effect, "index": spec.index, "data_seed": spec.data_seed,
                           "seconds": time.perf_counter() - t0}
    for c in comparisons:
        out[c.name] = {
            "mean_difference": c.mean_difference, "d_z": c.d_z,
            "p": {"permutation": c.permutation.p, "t": c.t_test.p, "wilcoxon": c.wilcoxon.p,
                  "permutation_holm": c.permutation.p_adjusted,
                  "mixed": c.mixed.p if c.mixed is not None else math.nan},
            "min_p": c.permutation.min_p,
        }
    return out


# --------------------------------------------------------------------------- summary
def binomial_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) CI of a rate ``k / n`` (``scipy.stats.binomtest``)."""
    from scipy import stats as st

    if n == 0:
        return math.nan, math.nan
    ci = st.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


@dataclass
class RateRow:
    """How often one test rejected at ``alpha`` in one effect and metric."""

    effect: str
    metric: str
    test: str
    rejections: int
    n: int
    rate: float
    ci_low: float
    ci_high: float
    histogram: list[int] = field(default_factory=list)
    note: str = ""


def summarize_draws(draws: Sequence[Mapping[str, Any]], *, alpha: float = stats.ALPHA, bins: int = 20
                    ) -> list[RateRow]:
    """Rejection rate with a Clopper-Pearson 95 % CI and a p-value histogram per effect x metric x test.

    A draw whose test is undefined (NaN p) does not count towards that test's ``n``.
    """
    out = []
    edges = np.linspace(0.0, 1.0, bins + 1)
    for effect in EFFECTS:
        sel = [d for d in draws if d["effect"] == effect]
        if not sel:
            continue
        for metric in _METRICS:
            for test in TESTS:
                p = np.array([d[metric]["p"][test] for d in sel], dtype=float)
                p = p[np.isfinite(p)]
                k, n = int(np.sum(p < alpha)), int(p.size)
                lo, hi = binomial_ci(k, n)
                hist = np.histogram(p, bins=edges)[0].tolist() if n else [0] * bins
                note = "" if n else "undefined in every draw"
                if n and n < len(sel):
                    note = f"undefined in {len(sel) - n} of {len(sel)} draws"
                out.append(RateRow(effect, metric, test, k, n, k / n if n else math.nan, lo, hi, hist, note))
    return out


@dataclass
class CalibrationResult:
    """What a calibration produced (``markdown`` and ``files``: the interface of a study report)."""

    title: str
    markdown: str
    rates: list[RateRow]
    draws: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``<effect>.<metric>.<test>.rate`` for the study run."""
        return {f"{r.effect}.{r.metric}.{r.test}.rate": r.rate for r in self.rates if not math.isnan(r.rate)}


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def render(rates: Sequence[RateRow], draws: Sequence[Mapping[str, Any]], *, title: str, protocol: str,
           alpha: float = stats.ALPHA) -> str:
    """The calibration's markdown: rates with CIs per effect, metric and test."""
    lines = [f"### {title}", "", protocol, ""]
    min_ps = sorted({d[m]["min_p"] for d in draws for m in _METRICS})
    if min_ps and min_ps[0] >= alpha:
        lines += [f"**The design cannot reach p < {alpha:g}**: the smallest permutation p is {min_ps[0]:.3g} "
                  "(too few subjects); every primary-test rate below is 0 by construction.", ""]
    head = ["Effect", "Metric", "Test", "Rejections / draws", f"Rate at α = {alpha:g} (%)", "95% CI (%)", "Note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rates:
        lines.append(f"| {r.effect} | {r.metric.replace('test_', '')} | {_TEST_LABELS[r.test]} | {r.rejections} / "
                     f"{r.n} | {_pct(r.rate)} | [{_pct(r.ci_low)}, {_pct(r.ci_high)}] | {r.note} |")
    lines += ["", "Null rows are false-positive rates (target: alpha inside the CI); planted rows are power. "
              "CI: exact binomial (Clopper-Pearson). Histograms of the p-values: figure.png."]
    for effect in EFFECTS:
        sel = [d for d in draws if d["effect"] == effect]
        if sel:
            secs = np.array([d["seconds"] for d in sel])
            diffs = {m: np.array([d[m]["mean_difference"] for d in sel]) for m in _METRICS}
            lines.append(f"- {effect}: {len(sel)} draws, mean subject-level difference top-1 "
                         f"{100 * diffs['test_top1'].mean():+.2f} (sd {100 * diffs['test_top1'].std(ddof=1) if len(sel) > 1 else math.nan:.2f}) "
                         f"points, top-5 {100 * diffs['test_top5'].mean():+.2f}; {secs.mean():.0f} s per draw")
    return "\n".join(lines) + "\n"


def render_histograms(rates: Sequence[RateRow], path: Path, title: str = "") -> None:
    """p-value histograms (one panel per effect x metric; one line per test) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.effect, r.metric) for r in rates}, key=lambda t: (EFFECTS.index(t[0]), t[1]))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (effect, metric) in zip(axes[0], panels, strict=False):
        for r in rates:
            if (r.effect, r.metric) != (effect, metric) or not r.n:
                continue
            k = len(r.histogram)
            centers = (np.arange(k) + 0.5) / k
            ax.step(centers, np.array(r.histogram) / r.n * k, where="mid", label=r.test)
        ax.axhline(1.0, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("p")
        ax.set_ylabel("density")
        ax.set_title(f"{effect} · {metric.replace('test_', '')}", fontsize=9)
        ax.legend(fontsize=6, frameon=False)
    fig.suptitle(title or "calibration: p-value histograms (uniform under a calibrated null)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- plan
class CalibrationPlan:
    """Draws instead of units: the engine hands a calibration to :meth:`execute`."""

    def __init__(self, study: Study, uri: str) -> None:
        self.study = study
        self.options: CalibrationOptions = study.options

    # the Plan protocol: a calibration has no searches and no tested runs of its own
    def search_spaces(self) -> Mapping[str, SearchSpace]:
        return {}

    def searches(self, ctx: StudyContext) -> list[SearchUnit]:
        return []

    def run_keys(self) -> list[str]:
        return []

    def runs(self, ctx: StudyContext, selected: Mapping[str, Mapping[str, Any]]) -> list[RunUnit]:
        return []

    def training_sets(self) -> list[tuple[tuple[str, ...], int]]:
        return []

    def draw_specs(self) -> list[DrawSpec]:
        """Every draw, null draws first."""
        st, o = self.study, self.options
        assert st.simulate is not None
        arms = st.arms()
        flat = st.run_flat(arms[0], subjects=st.subjects[:1], seed=0, run_name="calibration")
        shared = {k: v for k, v in flat.items() if k not in ("data.path", "data.subjects", "data.test_subjects",
                                                             "data.image_table", "seed", "encoder")}
        out = []
        for k in range(max(o.draws.values())):  # effects interleaved: a stopped calibration covers each evenly
            for effect in o.effects:
                if k >= o.draws[effect]:
                    continue
                seed = o.first_seed + k + EFFECTS.index(effect) * _SEED_STRIDE
                out.append(DrawSpec(
                    effect=effect, index=k, data_seed=seed, folder=str(st.dataset_path / f"{effect}-{k:05d}"),
                    preset=st.simulate.preset, overrides=dict(st.simulate.overrides), tables=o.tables,
                    subjects=st.subjects, seeds=st.final_seeds, arms=(arms[0], arms[1]), config=shared,
                    correction=o.correction,
                ))
        return out

    def describe(self) -> list[str]:
        st, o = self.study, self.options
        per_draw = len(st.subjects) * 2 * len(st.final_seeds)
        return [f"study {st.name} (calibrate): draws {_counts(o)} of simulator preset "
                f"{st.simulate.preset if st.simulate else '?'} ({o.tables} tables), each {len(st.subjects)} subjects "
                f"x 2 arms x {len(st.final_seeds)} seed(s) = {per_draw} trainings of {st.max_epochs} epochs; "
                f"{per_draw * sum(o.draws.values())} in all"]

    def protocol(self) -> str:
        st, o = self.study, self.options
        sim = st.simulate
        return (f"Calibration of the study report's tests: independent draws ({_counts(o)}) of the simulator "
                f"(preset {sim.preset if sim else '?'}, overrides {dict(sim.overrides) if sim else {}}; "
                f"{o.tables.replace('_', '-')} table realizations), each training {st.encoders[0]} on "
                f"{len(st.subjects)} subjects x {{{st.pairs[0].aligned_table}, {st.pairs[0].base_table}}} x seeds "
                f"{list(st.final_seeds)} for {st.max_epochs} epochs at the fixed [config] (no search), tested on "
                f"each subject's test set and compared at the subject level; family correction: {o.correction} "
                "over top-1 and top-5.")

    def params(self) -> dict[str, Any]:
        return {f"study.{k}": v for k, v in self.options.to_json().items()}

    def check(self) -> None:
        """Cheap checks before compute: the simulator parameters and every run config."""
        for spec in self.draw_specs()[:1]:
            for arm in spec.arms:
                TrainConfig.from_flat(dict(spec.config) | {"data.path": "x", "data.subjects": ("01",),
                                                           "data.image_table": arm.table, "encoder": arm.encoder})

    def execute(self, *, live: bool = True, mode: str = "auto") -> Any:
        """Run every draw over Ray (skipping draws already recorded, unless ``mode="fresh"``),
        summarize, write the report and log it to MLflow."""
        if mode == "fresh":
            draws_file(self.study).unlink(missing_ok=True)
        return execute(self, live=live)

    def report(self) -> CalibrationResult:
        """Re-render the report from the recorded draws (``brainalign study report``)."""
        draws = load_draws(self.study)
        if not draws:
            raise BrainalignError(f"calibration {self.study.name} has no finished draw in {draws_file(self.study)}; "
                                  "run it first (`brainalign calibrate STUDY`).")
        return write_calibration(self, draws)


def execute(plan: CalibrationPlan, *, live: bool = True) -> Any:
    """See :meth:`CalibrationPlan.execute`; returns an object with ``report`` (markdown, files)."""
    from types import SimpleNamespace

    from .. import tracking
    from .._io import claim_dir
    from .._ray import ensure_ray

    st = plan.study
    t0 = time.perf_counter()
    plan.check()
    uri = tracking.tracking_uri()
    specs = plan.draw_specs()
    claim_dir(st.dataset_path, "calibration")
    ensure_ray()
    import ray

    cpus = float(st.resources.cpus_per_worker)
    task = ray.remote(num_cpus=cpus, max_retries=1)(run_draw)
    tags = {"role": "report", "study": st.name, "study_kind": st.kind, "git_commit": tracking.code_version()}
    run_id = tracking.start_run(st.experiment, run_name=f"study-{st.name}", tags=tags,
                                params={"study.kind": st.kind, "study.file": st.path,
                                        "study.fingerprint": st.fingerprint()} | plan.params()
                                | {f"config.{k}": v for k, v in st.config.items()}, uri=uri)
    from .engine import study_folder

    claim_dir(study_folder(st), "study-storage")  # refuses a folder brainalign did not create
    record = draws_file(st)
    draws = load_draws(st)
    have = {(d["effect"], d["index"]) for d in draws}
    todo = [s for s in specs if (s.effect, s.index) not in have]
    if have:
        log.info("calibration %s: %d draw(s) already done (%s), %d to run", st.name, len(have), record, len(todo))
    with tracking.ended(run_id, uri=uri):
        pending = {task.remote(s): s for s in todo}
        log.info("calibration %s: %d draws over Ray (%g CPU each)", st.name, len(specs), cpus)
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="calibration draws", disable=not live)
        except ImportError:  # pragma: no cover
            bar = None
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                spec = pending.pop(done[0])
                res = ray.get(done[0])
                draws.append(res)
                with record.open("a") as f:  # one line per draw: a stopped calibration resumes here
                    f.write(json.dumps(_jsonable(res | {"fingerprint": draw_fingerprint(st)})) + "\n")
                if bar is not None:
                    bar.update(1)
                log.debug("draw %s-%d done", spec.effect, spec.index)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        result = write_calibration(plan, draws)
        files = result.files
        for name in ("calibration.md", "calibration.json", "figure.png"):
            tracking.log_artifact(run_id, files[name], "report", uri=uri)
        tracking.log_metrics(run_id, result.metrics(), uri=uri)
        tracking.set_description(run_id, result.markdown, uri=uri)
    return SimpleNamespace(report=result, study_run_id=run_id, experiment=st.experiment,
                           seconds=time.perf_counter() - t0, study=st.name, kind=st.kind)


def _counts(o: CalibrationOptions) -> str:
    return ", ".join(f"{o.draws[e]} {e}" for e in o.effects)


def draw_fingerprint(study: Study) -> str:
    """Hash of what a draw's result depends on: the study minus how many draws are planned.

    A recorded draw stays valid when ``draws``, ``effects``, ``bins``, the resources or the
    experiment change (draw ``k`` of an effect always uses the same seeds), so a calibration can
    be extended from 100 to 200 draws by editing ``draws`` and running the same command again.
    Anything that changes a draw (recipe, subjects, simulator, tables, seeds, correction)
    changes the hash, and draws recorded under another hash are ignored.
    """
    import hashlib

    doc = study.to_json()
    for key in ("resources", "experiment", "name"):
        doc.pop(key, None)
    doc["options"] = {k: v for k, v in (doc.get("options") or {}).items() if k not in ("draws", "effects", "bins")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def draws_file(study: Study) -> Path:
    """``<study folder>/draws.jsonl``: one line per finished draw (the folder is created by a run)."""
    from .engine import study_folder

    return study_folder(study) / "draws.jsonl"


def load_draws(study: Study) -> list[dict[str, Any]]:
    """The finished draws of this study (same :func:`draw_fingerprint`) that it plans, one per (effect, index)."""
    path = draws_file(study)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    opts = study.options
    if path.is_file():
        fp = draw_fingerprint(study)
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if (d.get("fingerprint") == fp and d.get("effect") in opts.effects
                    and int(d["index"]) < opts.draws[d["effect"]]):
                out[(d["effect"], int(d["index"]))] = _nan(d)
    return list(out.values())


def _nan(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _nan(v) for k, v in x.items()}
    return math.nan if x is None else x


def write_calibration(plan: CalibrationPlan, draws: Sequence[Mapping[str, Any]]) -> CalibrationResult:
    """Summarize ``draws`` and write ``calibration.md``, ``calibration.json`` and ``figure.png``
    into ``$BRAINALIGN_HOME/reports/<study>/``."""
    from .. import paths
    from .._io import atomic_file, claim_dir

    st = plan.study
    draws = sorted(draws, key=lambda d: (EFFECTS.index(d["effect"]), d["index"]))
    rates = summarize_draws(draws, bins=plan.options.bins)
    n = {e: sum(d["effect"] == e for d in draws) for e in plan.options.effects}
    done = ", ".join(f"{v} {e}" for e, v in n.items())
    title = f"Calibration {st.name}: {done} draws (planned {_counts(plan.options)})"
    md = render(rates, draws, title=title, protocol=plan.protocol())
    out_dir = paths.home() / "reports" / st.name
    claim_dir(out_dir, "report")
    files = {}
    for name, text in (("calibration.md", md),
                       ("calibration.json", json.dumps(_jsonable({
                           "study": st.name, "protocol": plan.protocol(), "options": plan.options.to_json(),
                           "rates": [vars(r) for r in rates], "draws": draws}), indent=2, sort_keys=True))):
        with atomic_file(out_dir / name) as tmp:
            tmp.write_text(text)
        files[name] = out_dir / name
    with atomic_file(out_dir / "figure.png") as tmp:
        render_histograms(rates, tmp, title)
    files["figure.png"] = out_dir / "figure.png"
    files["table.md"] = files["calibration.md"]
    return CalibrationResult(title=title, markdown=md, rates=rates, draws=list(draws), files=files)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


register_kind(StudyKind(
    name="calibrate", keys=_KEYS, parse=_parse, plan=CalibrationPlan,
    summary="many null and planted-effect simulator draws at a fixed small recipe: false-positive rate and power "
            "of the report's tests",
))

