"""The study file: one format for every kind of study, parsed and checked before any compute.

A study file (``jobs/*.toml``, format in ``docs/sweep.md``) has three tables:

* ``[study]``: ``kind`` (default ``"sweep"``), the keys every kind shares (name, dataset,
  subjects, encoders, image-embedding pairs, epochs, seeds...) and the keys of its kind
  (registered with :func:`register_kind`, e.g. a sweep's search budget);
* ``[resources]``: Ray resources of one run;
* ``[config]``: :class:`~brainalign.TrainConfig` keys shared by every run, except the keys
  the study sets itself (:data:`STUDY_OWNED`).

``--set KEY=VALUE`` overrides (:func:`load_study`'s ``sets``) edit the file as it is read:
``study.<key>`` and ``resources.<key>`` replace those entries, any other key is a config
override that wins over ``[config]`` and over configs a study inherits (a search's best
config, ``config_from_run``). Every problem raises a :class:`~brainalign.BrainalignError`
naming the file, the key and, for typos, the closest valid key.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from .._checks import (
    BrainalignError,
    check_gpu_share,
    check_name,
    check_option,
    check_range,
    check_type,
    suggest,
)
from ..config import TrainConfig, flatten_toml
from ..paths import resolve

__all__ = [
    "INHERIT_NEVER",
    "MACHINE_KEYS",
    "PACKS",
    "STUDY_OWNED",
    "Arm",
    "PairSpec",
    "Resources",
    "SimulateSpec",
    "Study",
    "StudyKind",
    "inheritable",
    "kind_info",
    "list_kinds",
    "load_study",
    "parse_simulate",
    "register_kind",
]

#: TrainConfig keys a study sets itself, and where: ``[config]``, ``--set`` and search spaces
#: may not set them, and no config inherited from another run can change them.
STUDY_OWNED: dict[str, str] = {
    "encoder": "[study] encoders",
    "data.path": "[study] dataset",
    "data.subjects": "[study] subjects (the plan picks each run's training subjects)",
    "data.test_subjects": "[study] subjects (the plan picks each run's test subjects)",
    "data.image_table": "[study] pairs",
    "epochs": "[study] max_epochs",
    "seed": "[study] seed and final_seeds",
    "experiment": "[study] experiment (default: the study name)",
    "run_name": "the plan (one name per run)",
    "num_workers": "[resources] workers_per_trial",
    "cpus_per_worker": "[resources] cpus_per_worker",
    "use_gpu": "[resources] use_gpu",
    "gpus_per_worker": "[resources] gpus_per_worker",
}
#: Keys ``[config]`` may set but that describe this machine, not the model: never taken from
#: another run's config.
MACHINE_KEYS = frozenset({"data.embeddings_dir", "torch_threads"})
#: Keys never inherited from another run (``config_from_run``, ``config_from_sweep``): the
#: study's own selection metric included.
INHERIT_NEVER = frozenset(STUDY_OWNED) | MACHINE_KEYS | {"select_metric"}

_TABLES = ("study", "resources", "config")
_COMMON_KEYS = ("kind", "name", "experiment", "description", "dataset", "simulate", "subjects", "encoders",
                "pairs", "max_epochs", "final_seeds", "correction", "select_metric", "explain", "grids",
                "parallel_searches")
#: ``[resources]`` keys that shape every run (in the fingerprint) ...
_RUN_RESOURCE_KEYS = ("workers_per_trial", "cpus_per_worker", "use_gpu", "trial_cpus")
#: ... and all of them: ``pack`` only groups runs for dispatch (results do not depend on it)
_RESOURCE_KEYS = (*_RUN_RESOURCE_KEYS, "pack")
#: ``[resources]`` keys that place runs on nodes (Ray custom resources); not in the fingerprint:
#: where a run is placed does not change what it computes.
_PLACEMENT_KEYS = ("custom_per_worker", "trial_custom", "gpus_per_worker")
#: Resource names Ray manages itself (set through cpus_per_worker, trial_cpus and use_gpu).
_RAY_OWN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
#: ``[resources] pack``: how tested runs share a Train worker group (``studies._tune.pack_units``)
PACKS = ("subject", "arm")
_SIMULATE_KEYS = ("preset", "seed", "null", "overrides")
_ENCODER_KEYS = ("name", "searchspace")
_PAIR_KEYS = ("backbone", "aligned", "base")


def inheritable(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of another run's flat config a study may take over (no data, fold, seed,
    tracking, resource or machine keys)."""
    return {k: v for k, v in flat.items() if k not in INHERIT_NEVER}


# --------------------------------------------------------------------------- parse helpers
def check_keys(where: str, doc: Iterable[str], allowed: Sequence[str]) -> None:
    """Every key of ``doc`` must be in ``allowed`` (typos get the closest match)."""
    for key in doc:
        check_option(f"key in {where}:", key, allowed)


def need(where: str, doc: Mapping[str, Any], key: str) -> Any:
    """``doc[key]``, or an error naming the missing key."""
    if key not in doc:
        raise BrainalignError(f"{where}: missing required key {key!r}.")
    return doc[key]


def as_int(name: str, value: Any, low: int) -> int:
    """An integer >= ``low`` (bools are not integers)."""
    check_type(name, value, int)
    check_range(name, value, low=low)
    return int(value)


def as_number(name: str, value: Any, *, positive: bool = True) -> float:
    """A finite number (> 0 when ``positive``, else >= 0)."""
    check_type(name, value, (int, float))
    check_range(name, float(value), low=0.0, low_inclusive=not positive, high=math.inf, high_inclusive=False)
    return float(value)


def as_str(name: str, value: Any) -> str:
    """A non-empty string, stripped."""
    check_type(name, value, str)
    if not value.strip():
        raise BrainalignError(f"{name} must not be empty.")
    return str(value).strip()


def as_bool(name: str, value: Any) -> bool:
    """``true`` or ``false``."""
    return bool(check_type(name, value, bool))


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict (missing file or bad syntax: a clear error)."""
    if not path.is_file():
        raise BrainalignError(f"{what} {path} does not exist.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BrainalignError(f"{what} {path} is not valid TOML: {e}.") from e


def _check_study_name(name: str, what: str) -> str:
    # a study name becomes a folder (Ray storage, reports) and an MLflow experiment: never
    # '.', '..' or a path (``--fresh`` on a study named '..' would address $BRAINALIGN_HOME)
    return check_name(what, name)


# --------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class SimulateSpec:
    """How to create the study's dataset with the simulator when it is missing."""

    preset: str = "mini"
    seed: int = 0
    null: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.preset, "seed": self.seed, "null": self.null, "overrides": dict(self.overrides)}


def parse_simulate(where: str, sim: Any) -> SimulateSpec:
    """A study's ``simulate = { preset, seed, null, overrides }``, validated (an unknown preset
    or simulator parameter names the closest match)."""
    if not isinstance(sim, Mapping):
        raise BrainalignError(f"{where} simulate must be a table like {{ preset = \"mini\", seed = 0 }}.")
    check_keys(f"{where} simulate", sim, _SIMULATE_KEYS)
    overrides = sim.get("overrides", {})
    if not isinstance(overrides, Mapping):
        raise BrainalignError(f"{where} simulate.overrides must be a table of simulator parameters.")
    spec = SimulateSpec(
        preset=as_str(f"{where} simulate.preset", sim.get("preset", "mini")),
        seed=as_int(f"{where} simulate.seed", sim.get("seed", 0), 0),
        null=as_bool(f"{where} simulate.null", sim.get("null", False)),
        overrides=dict(overrides),
    )
    from ..data.simulate import make_params

    make_params(spec.preset, spec.overrides)  # unknown preset/parameter -> closest match
    return spec


@dataclass(frozen=True)
class PairSpec:
    """An image-embedding pair: one backbone under its human-aligned and its base alignment."""

    backbone: str
    aligned: str
    base: str = "none"

    @property
    def aligned_table(self) -> str:
        return f"{self.backbone}:{self.aligned}"

    @property
    def base_table(self) -> str:
        return f"{self.backbone}:{self.base}"


@dataclass(frozen=True)
class Resources:
    """Ray resources of one run: ``workers_per_trial`` Train workers of ``cpus_per_worker``
    CPUs (and one GPU each with ``use_gpu``), plus ``trial_cpus`` for the Tune trial that
    drives them (it only waits on its workers; ``0`` is refused by Ray).

    ``custom_per_worker`` and ``trial_custom`` are Ray custom resources (``ray start
    --resources='{"gpu_a100": 4}'``) that each Train worker and the trial process request on
    top: they pin runs to the nodes that advertise them (docs/cluster.md, "Storage on more
    than one node"). ``gpus_per_worker`` (with ``use_gpu``) is each worker's share of a GPU:
    ``0.25`` packs four small runs on one GPU (not in the fingerprint: it changes where a run
    trains, not what it computes).
    ``pack`` (one of :data:`PACKS`) groups the tested runs that one worker group trains one
    after the other: ``"subject"`` (an arm's seeds on one subject) or ``"arm"`` (all of an
    arm's runs). It changes how often a worker group starts, never a run's result.
    """

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    trial_cpus: float = 0.01
    custom_per_worker: Mapping[str, float] = field(default_factory=dict)
    trial_custom: Mapping[str, float] = field(default_factory=dict)
    pack: str = "subject"
    gpus_per_worker: float = 1.0

    @property
    def cpus_per_trial(self) -> float:
        return self.workers_per_trial * self.cpus_per_worker + self.trial_cpus


@dataclass(frozen=True)
class Arm:
    """One brain encoder trained against one image-embedding table."""

    encoder: str
    backbone: str
    alignment: str
    aligned: bool

    @property
    def table(self) -> str:
        return f"{self.backbone}:{self.alignment}"

    @property
    def name(self) -> str:
        """Stable id used for Ray storage, state keys, unit keys and MLflow run names."""
        return f"{self.encoder}__{self.backbone}__{self.alignment}"

    @property
    def arm(self) -> str:
        return "aligned" if self.aligned else "base"


class KindOptions(Protocol):
    """A kind's own ``[study]`` settings (a frozen dataclass)."""

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StudyKind:
    """A kind of study: its own ``[study]`` keys, how to read them and how to plan it.

    Adding a kind = one module that defines its options, its parser and its plan (see
    :mod:`brainalign.studies.sweep`) and calls :func:`register_kind`; ``studies/__init__``
    imports it.

    Parameters
    ----------
    name : str
        The value of ``[study] kind``.
    keys : tuple of str
        ``[study]`` keys of this kind, beyond the common ones.
    parse : callable
        ``parse(where, table, study) -> options``: reads and checks the kind's keys of the
        ``[study]`` table; ``study`` has every common field already.
    plan : callable
        ``plan(study, tracking_uri) -> Plan`` (see :mod:`brainalign.studies.units`).
    searches : bool
        Whether encoders may name a search space.
    summary : str
        One line for ``--help`` and the docs.
    """

    name: str
    keys: tuple[str, ...]
    parse: Callable[[str, Mapping[str, Any], Study], KindOptions]
    plan: Callable[[Study, str], Any]
    searches: bool = False
    summary: str = ""


_KINDS: dict[str, StudyKind] = {}


def register_kind(kind: StudyKind) -> StudyKind:
    """Add a study kind; a name that is taken raises."""
    if kind.name in _KINDS:
        raise ValueError(f"study kind {kind.name!r} is registered twice")
    clash = set(kind.keys) & set(_COMMON_KEYS)
    if clash:
        raise ValueError(f"study kind {kind.name!r} redefines common [study] keys {sorted(clash)}")
    _KINDS[kind.name] = kind
    return kind


def list_kinds() -> list[str]:
    """Registered study kinds."""
    return sorted(_KINDS)


def kind_info(name: str) -> StudyKind:
    """The registered kind ``name`` (unknown: the closest match)."""
    return _KINDS[check_option("study kind", name, sorted(_KINDS))]


# --------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class Study:
    """A validated study file. Build it with :func:`load_study`.

    Parameters
    ----------
    kind : str
        The registered kind (``sweep``, ``cross_subject``...).
    name : str
        Study name: the Ray storage folder, the report folder and the ``study`` tag of every run.
    experiment : str
        MLflow experiment (default: ``name``).
    description : str
        Free text, shown on the study run.
    dataset : str
        Dataset root (relative paths are taken against ``$BRAINALIGN_HOME``).
    simulate : SimulateSpec or None
        Create the dataset with the simulator when it is missing.
    subjects : tuple of str
        The subjects the study's tested runs cover.
    encoders : tuple of str
        Brain encoders; each is compared on every pair.
    searchspaces : mapping
        Encoder -> search-space path as written in the file (kinds that search).
    pairs : tuple of PairSpec
        Image-embedding pairs (human-aligned vs base).
    max_epochs : int
        Every run's ``epochs`` (and ASHA's ``max_t`` in a search).
    final_seeds : tuple of int
        Seeds of the tested runs (per subject and arm).
    resources : Resources
        Per-run Ray resources.
    config : mapping
        Flat ``[config]``: TrainConfig keys shared by every run.
    overrides : mapping
        Flat config overrides from ``--set`` (win over ``[config]`` and inherited configs).
    correction : {"holm", "bh"}
        Family-wise correction over all comparisons of the report (Holm: family-wise error
        rate, the default; ``bh``: Benjamini-Hochberg false discovery rate).
    select_metric : {"val_loss", "val_top1"}
        The validation metric that selects: every run's checkpoint (``select_metric`` of its
        config) and, in a sweep, the search's trials (ranked by the same quantity at their best
        epoch). ``[study] select_metric``, else ``[config]``/``--set`` ``select_metric``, else
        for a sweep the metric of its search spaces, else ``val_loss``; they may not disagree.
    options : KindOptions or None
        The kind's own settings.
    path : str
        The study file.
    explain : bool
        ``[study] explain = true``: once the tested runs finished, run the gradient analysis
        (:func:`brainalign.analysis.explain.explain_study`) on them; its figures and tables go to
        the study run and the report. Not part of the fingerprint: turning it on for a finished
        study and running the same command again explains it.
    grids : int
        ``[study] grids = N``: top-5 image grids (:func:`brainalign.analysis.grids.image_grids`)
        of the first encoder x pair, first subject and seed, on the N test queries where the arms
        disagree most, for each gallery of ``test.gallery`` (0: none; not in the fingerprint).
    parallel_searches : bool
        ``[study] parallel_searches`` (default true): the study's searches (each its own
        Optuna + ASHA experiment, one trial at a time) run side by side, as many at once as
        the cluster fits runs; false: one after the other. A search's result is the same
        either way (not in the fingerprint).
    """

    kind: str
    name: str
    experiment: str
    description: str
    dataset: str
    simulate: SimulateSpec | None
    subjects: tuple[str, ...]
    encoders: tuple[str, ...]
    searchspaces: Mapping[str, str]
    pairs: tuple[PairSpec, ...]
    max_epochs: int
    final_seeds: tuple[int, ...]
    resources: Resources
    config: Mapping[str, Any]
    overrides: Mapping[str, Any] = field(default_factory=dict)
    correction: str = "holm"
    select_metric: str = "val_loss"
    options: Any = None
    path: str = ""
    explain: bool = False
    grids: int = 0
    parallel_searches: bool = True

    @property
    def dataset_path(self) -> Path:
        """Absolute dataset root."""
        return resolve(self.dataset, "[study] dataset")

    def arms(self) -> list[Arm]:
        """Encoder x pair x {aligned, base}, in a stable order."""
        out = []
        for enc in self.encoders:
            for pair in self.pairs:
                out.append(Arm(enc, pair.backbone, pair.aligned, True))
                out.append(Arm(enc, pair.backbone, pair.base, False))
        return out

    def run_flat(self, arm: Arm, *, subjects: Sequence[str], seed: int, run_name: str,
                 test_subjects: Sequence[str] = (), inherited: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The flat config of one run: ``[config]`` < inherited < ``--set`` < study-owned keys.

        Parameters
        ----------
        arm : Arm
            Encoder and image table.
        subjects, test_subjects : sequence of str
            Training subjects and (when they differ) the subjects tested.
        seed : int
            The run's seed.
        run_name : str
            The MLflow run name.
        inherited : mapping, optional
            Hyperparameters taken from elsewhere (a search's best config, another run);
            study-owned and machine keys in it are ignored.
        """
        r = self.resources
        owned = {
            "encoder": arm.encoder,
            "data.path": str(self.dataset_path),
            "data.subjects": tuple(subjects),
            "data.test_subjects": tuple(test_subjects),
            "data.image_table": arm.table,
            "epochs": self.max_epochs,
            "seed": seed,
            "experiment": self.experiment,
            "run_name": run_name,
            "num_workers": r.workers_per_trial,
            "cpus_per_worker": r.cpus_per_worker,
            "use_gpu": r.use_gpu,
            "gpus_per_worker": r.gpus_per_worker,
        }
        assert set(owned) == set(STUDY_OWNED), "run_flat must set exactly the study-owned keys"
        return dict(self.config) | inheritable(inherited or {}) | dict(self.overrides) | owned

    def to_json(self) -> dict[str, Any]:
        """Everything that defines the study's results (hashed to detect edits on resume)."""
        def plain(d: Mapping[str, Any]) -> dict[str, Any]:
            return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(d.items())}

        return {
            "kind": self.kind, "name": self.name, "experiment": self.experiment, "dataset": self.dataset,
            "simulate": self.simulate.to_json() if self.simulate else None, "subjects": list(self.subjects),
            "encoders": list(self.encoders), "pairs": [[p.backbone, p.aligned, p.base] for p in self.pairs],
            "max_epochs": self.max_epochs, "final_seeds": list(self.final_seeds),
            # placement (custom_per_worker, trial_custom) and pack are left out: they do not change results
            "resources": {k: getattr(self.resources, k) for k in _RUN_RESOURCE_KEYS},
            "config": plain(self.config), "overrides": plain(self.overrides),
            "options": self.options.to_json() if self.options is not None else None,
        } | ({"correction": self.correction} if self.correction != "holm" else {})  # old fingerprints stay valid

    def fingerprint(self) -> str:
        """Short hash of :meth:`to_json`."""
        blob = json.dumps(self.to_json(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- loading
def _value(text: str) -> Any:
    """A ``--set`` value: TOML (``2``, ``[1, 2]``, ``true``, ``"x"``) or else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_sets(doc: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides to the parsed file; returns the config overrides."""
    overrides: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise BrainalignError(f"--set {item!r} must look like KEY=VALUE (e.g. lr=1e-3 or study.trials=2).")
        key, text = (s.strip() for s in item.split("=", 1))
        table, _, rest = key.partition(".")
        if table in ("study", "resources") and rest:
            target = doc.setdefault(table, {})
            *parents, leaf = rest.split(".")
            for p in parents:
                target = target.setdefault(p, {})
                if not isinstance(target, dict):
                    raise BrainalignError(f"--set {key}: {p!r} is not a table in the study file.")
            target[leaf] = _value(text)
        else:
            overrides[key.removeprefix("config.")] = _value(text)
    return overrides


def _check_config_keys(where: str, flat: Mapping[str, Any]) -> None:
    known = set(TrainConfig().to_flat())
    for key in flat:
        if key in STUDY_OWNED:
            raise BrainalignError(f"{where} {key!r} is set by {STUDY_OWNED[key]}; remove it.")
        if not key.startswith("arch.") and key not in known:
            keys = sorted(known - set(STUDY_OWNED))
            check_option(f"{where} key (a TrainConfig key)", key, keys)


def _parse_encoders(w: str, raw: Any, searches: bool) -> tuple[tuple[str, ...], dict[str, str]]:
    from ..encoders import encoder_info

    if not isinstance(raw, list) or not raw:
        raise BrainalignError(f"{w} encoders must be a non-empty list like [\"nice\"].")
    names: list[str] = []
    spaces: dict[str, str] = {}
    for entry in raw:
        doc = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(doc, Mapping):
            raise BrainalignError(f"{w} encoders entries must be names or {{ name = ..., searchspace = ... }}.")
        check_keys(f"{w} encoders entry", doc, _ENCODER_KEYS if searches else ("name",))
        name = as_str(f"{w} encoders name", need(f"{w} encoders entry", doc, "name"))
        encoder_info(name)  # unknown -> closest match
        if name in names:
            raise BrainalignError(f"{w} encoders lists {name!r} twice.")
        names.append(name)
        if "searchspace" in doc:
            spaces[name] = as_str(f"{w} encoders searchspace", doc["searchspace"])
    return tuple(names), spaces


def _parse_pairs(w: str, raw: Any) -> tuple[PairSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise BrainalignError(
            f"{w} pairs must be a non-empty list like [{{ backbone = \"sim-clip\", aligned = \"simulated\" }}].")
    pairs: list[PairSpec] = []
    for q in raw:
        if not isinstance(q, Mapping):
            raise BrainalignError(f"{w} pairs entries must be tables {{ backbone = ..., aligned = ..., base = ... }}.")
        check_keys(f"{w} pairs entry", q, _PAIR_KEYS)
        pair = PairSpec(
            backbone=as_str(f"{w} pairs backbone", need(f"{w} pairs entry", q, "backbone")),
            aligned=as_str(f"{w} pairs aligned", need(f"{w} pairs entry", q, "aligned")),
            base=as_str(f"{w} pairs base", q.get("base", "none")),
        )
        if pair.aligned == pair.base:
            raise BrainalignError(f"{w} pair {pair.backbone!r}: aligned and base must differ, both are {pair.base!r}.")
        if any(x.backbone == pair.backbone and x.aligned == pair.aligned for x in pairs):
            raise BrainalignError(f"{w} pairs lists {pair.aligned_table!r} twice.")
        pairs.append(pair)
    return tuple(pairs)


def _parse_seeds(w: str, raw: Any) -> tuple[int, ...]:
    if isinstance(raw, list):
        if not raw:
            raise BrainalignError(f"{w} final_seeds must not be empty.")
        seeds = tuple(as_int(f"{w} final_seeds entry", s, 0) for s in raw)
        if len(set(seeds)) != len(seeds):
            raise BrainalignError(f"{w} final_seeds has duplicates: {list(seeds)}.")
        return seeds
    return tuple(range(as_int(f"{w} final_seeds", raw, 1)))


def _select_metric(w: str, st: Mapping[str, Any], config: Mapping[str, Any], overrides: Mapping[str, Any]) -> str:
    """The study's one selection metric: ``--set`` > ``[study] select_metric`` > ``[config]``
    (``[study]`` and ``[config]``, or ``[study]`` and ``--set``, may not disagree); ``""`` when
    none says (the kind decides: a sweep follows its search spaces, others ``val_loss``)."""
    from ..config import SELECT_METRICS

    study_v, set_v, config_v = (None if v is None else str(v) for v in (
        st.get("select_metric"), overrides.get("select_metric"), config.get("select_metric")))
    for where, v in ((f"{w} select_metric", study_v), ("--set select_metric", set_v),
                     ("[config] select_metric", config_v)):
        if v is not None:
            check_option(where, v, SELECT_METRICS)
    other = set_v if set_v is not None else config_v
    if study_v is not None and other is not None and other != study_v:
        raise BrainalignError(
            f"{w} select_metric = {study_v!r} but {'--set' if set_v is not None else '[config]'} select_metric = "
            f"{other!r}: a study selects its searches and its checkpoints on one validation metric. Keep one."
        )
    return set_v or study_v or config_v or ""


def _parse_custom(w: str, key: str, value: Any) -> dict[str, float]:
    """``[resources] <key>``: a table of Ray custom resources ``{ name = amount }`` as Ray
    accepts them (amounts > 0, whole numbers above 1, none of the resources Ray manages itself)."""
    name = f"{w} {key}"
    if not isinstance(value, Mapping):
        raise BrainalignError(
            f"{name} must be a table of Ray custom resources like {key} = {{ node_b = 1 }}, got {value!r}.")
    out: dict[str, float] = {}
    for res, amount in value.items():
        if not str(res).strip():
            raise BrainalignError(f"{name} has an empty resource name; use the name given to `ray start --resources`.")
        if str(res).lower() in {r.lower() for r in _RAY_OWN_RESOURCES}:
            raise BrainalignError(
                f"{name} names {res!r}, which Ray manages itself: set CPUs with cpus_per_worker / trial_cpus and "
                "GPUs with use_gpu; custom resources are the names a node advertises with `ray start --resources`.")
        amount = as_number(f"{name}.{res}", amount)
        if amount > 1 and not amount.is_integer():
            raise BrainalignError(f"{name}.{res} = {amount:g}: Ray takes fractions of a resource only up to 1; "
                                  "use a whole number above 1.")
        out[str(res)] = amount
    return out


def _parse_resources(where: str, doc: Any) -> Resources:
    w = f"{where}: [resources]"
    if not isinstance(doc, Mapping):
        raise BrainalignError(f"{w} must be a table.")
    check_keys(w, doc, _RESOURCE_KEYS + _PLACEMENT_KEYS)
    trial_cpus = as_number(f"{w} trial_cpus", doc.get("trial_cpus", 0.01), positive=False)
    if trial_cpus <= 0:
        raise BrainalignError(f"{w} trial_cpus must be > 0 (Ray refuses a 0-CPU trial); use e.g. 0.01.")
    return Resources(
        workers_per_trial=as_int(f"{w} workers_per_trial", doc.get("workers_per_trial", 1), 1),
        cpus_per_worker=as_number(f"{w} cpus_per_worker", doc.get("cpus_per_worker", 1.0)),
        use_gpu=as_bool(f"{w} use_gpu", doc.get("use_gpu", False)),
        trial_cpus=trial_cpus,
        custom_per_worker=_parse_custom(w, "custom_per_worker", doc.get("custom_per_worker", {})),
        trial_custom=_parse_custom(w, "trial_custom", doc.get("trial_custom", {})),
        pack=_parse_pack(w, doc.get("pack", "subject")),
        gpus_per_worker=_parse_gpus(w, doc.get("gpus_per_worker", 1.0)),
    )


def _parse_gpus(w: str, raw: Any) -> float:
    value = as_number(f"{w} gpus_per_worker", raw)
    check_gpu_share(f"{w} gpus_per_worker", value)
    return value


def _parse_pack(w: str, raw: Any) -> str:
    pack = as_str(f"{w} pack", raw)
    if pack not in PACKS:
        raise BrainalignError(
            f"{w} pack = {pack!r} is not a way to pack tested runs.{suggest(pack, PACKS)} Use \"subject\" (one "
            "Train worker group per arm and subject trains its seeds one after the other) or \"arm\" (one per "
            "arm trains all its subjects and seeds)."
        )
    return pack


def load_study(path: str | Path, sets: Sequence[str] = ()) -> Study:
    """Read and validate a study file; no data, MLflow or Ray is touched.

    Parameters
    ----------
    path : path
        The study TOML (format: ``docs/sweep.md``).
    sets : sequence of str
        ``KEY=VALUE`` overrides: ``study.<key>`` / ``resources.<key>`` edit those tables,
        other keys are TrainConfig overrides (``lr=1e-3``, ``config.data.normalize=none``).
        Values are TOML (``2``, ``[1, 2]``, ``true``), else plain strings.

    Returns
    -------
    Study

    Raises
    ------
    BrainalignError
        Any problem with the file, its kind's keys or its search spaces. Subjects, tables and
        shapes are checked against the dataset by :func:`brainalign.studies.data.validate_data`.
    """
    p = Path(path).resolve()
    where = f"study {path}"
    doc = read_toml(p, "Study file")
    overrides = _apply_sets(doc, sets)
    check_keys(where, doc, _TABLES)
    st = need(where, doc, "study")
    if not isinstance(st, Mapping):
        raise BrainalignError(f"{where}: [study] must be a table.")
    w = f"{where}: [study]"
    kind = kind_info(as_str(f"{w} kind", st.get("kind", "sweep")))
    check_keys(w, st, _COMMON_KEYS + kind.keys)
    name = _check_study_name(as_str(f"{w} name", need(w, st, "name")), f"{w} name")
    subjects_raw = need(w, st, "subjects")
    if not isinstance(subjects_raw, list) or not subjects_raw:
        raise BrainalignError(f"{w} subjects must be a non-empty list like [\"01\", \"02\"], got {subjects_raw!r}.")
    subjects = tuple(str(s) for s in subjects_raw)
    if len(set(subjects)) != len(subjects):
        raise BrainalignError(f"{w} subjects has duplicates: {list(subjects)}.")
    encoders, spaces = _parse_encoders(w, need(w, st, "encoders"), kind.searches)
    max_epochs = as_int(f"{w} max_epochs", need(w, st, "max_epochs"), 1)

    config = flatten_toml(doc.get("config", {})) if isinstance(doc.get("config", {}), Mapping) else None
    if config is None:
        raise BrainalignError(f"{where}: [config] must be a table of TrainConfig keys.")
    _check_config_keys(f"{where}: [config]", config)
    _check_config_keys("--set", overrides)
    try:
        # arch.* options are checked against the study's encoder (not the default one)
        TrainConfig.from_flat(config | overrides | {"epochs": max_epochs, "encoder": encoders[0]})
    except BrainalignError as e:
        raise BrainalignError(f"{where}: [config] (with max_epochs = {max_epochs}) is invalid: {e}") from None

    select_metric = _select_metric(w, st, config, overrides)
    if select_metric:
        config = dict(config) | {"select_metric": select_metric}
        overrides = {k: v for k, v in overrides.items() if k != "select_metric"}
    study = Study(
        kind=kind.name, name=name,
        experiment=_check_study_name(as_str(f"{w} experiment", st.get("experiment", name)), f"{w} experiment"),
        description=str(st.get("description", "")).strip(),
        dataset=as_str(f"{w} dataset", need(w, st, "dataset")),
        simulate=parse_simulate(w, st["simulate"]) if "simulate" in st else None,
        subjects=subjects, encoders=encoders, searchspaces=spaces,
        pairs=_parse_pairs(w, need(w, st, "pairs")),
        max_epochs=max_epochs, final_seeds=_parse_seeds(w, st.get("final_seeds", 3)),
        resources=_parse_resources(where, doc.get("resources", {})),
        config=config, overrides=overrides, path=str(p),
        correction=check_option(f"{w} correction", as_str(f"{w} correction", st.get("correction", "holm")),
                                ("holm", "bh")),
        select_metric=select_metric,
        explain=as_bool(f"{w} explain", st.get("explain", False)),
        grids=as_int(f"{w} grids", st.get("grids", 0), 0),
        parallel_searches=as_bool(f"{w} parallel_searches", st.get("parallel_searches", True)),
    )
    study = replace(study, options=kind.parse(w, st, study))
    if not select_metric:  # unstated: the kind's choice (a sweep: its search spaces' metric), else val_loss
        select_metric = getattr(study.options, "select_metric", "") or "val_loss"
        config = dict(config) | ({"select_metric": select_metric} if select_metric != "val_loss" else {})
        study = replace(study, select_metric=select_metric, config=config)
    for arm in study.arms():  # every run's config must be valid (warmup < epochs, batch sizes...)
        try:
            TrainConfig.from_flat(study.run_flat(arm, subjects=subjects[:1], seed=0, run_name="check"))
        except BrainalignError as e:
            raise BrainalignError(f"{where}: the run config of {arm.name} is invalid: {e}") from None
    return study
