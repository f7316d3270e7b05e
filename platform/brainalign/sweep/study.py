"""Study files and search spaces: parsing and validation, before any compute.

A *study* (``jobs/*.toml``) fixes what is compared: a dataset, subjects, brain encoders,
image-embedding *pairs* (one backbone under its human-aligned and its base alignment), the
search budget, the number of final seeds, the resources and base ``[config]`` overrides. A
*search space* (``searchspaces/<encoder>.toml``) says what varies during a search. The file
formats are documented in ``docs/sweep.md`` and ``searchspaces/README.md``.

Everything that can be checked without training is checked here, and every problem raises a
:class:`~brainalign.BrainalignError` naming the file, the key and (for typos) the closest
valid key: unknown keys, impossible ranges, search-space keys that are not
:class:`~brainalign.TrainConfig` keys or architecture options of the encoder, values that
``TrainConfig`` rejects, tables or subjects that are not in the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import BrainalignError, suggest
from ..config import DataConfig, TrainConfig, flatten_toml
from ..paths import resolve

__all__ = [
    "CONTROLLED_KEYS",
    "Arm",
    "EncoderSpec",
    "PairSpec",
    "ParamSpec",
    "Resources",
    "SearchSpace",
    "SimulateSpec",
    "Study",
    "ensure_dataset",
    "load_searchspace",
    "load_study",
    "validate_data",
]

log = logging.getLogger(__name__)

#: TrainConfig keys the study sets itself; neither ``[config]`` nor a search space may set them.
CONTROLLED_KEYS: dict[str, str] = {
    "encoder": "[study] encoders",
    "data.path": "[study] dataset",
    "data.subjects": "[study] subjects / search_subject",
    "data.test_subjects": "[study] subjects",
    "data.image_table": "[study] pairs",
    "epochs": "[study] max_epochs",
    "seed": "[study] seed (searches) and [study] final_seeds (finals)",
    "experiment": "[study] name (the MLflow experiment)",
    "run_name": "the sweep (trial/final names)",
    "num_workers": "[resources] workers_per_trial",
    "cpus_per_worker": "[resources] cpus_per_worker",
    "use_gpu": "[resources] use_gpu",
}
#: Metrics a search may select on: validation metrics reported at every epoch, never test.
SEARCH_METRICS: dict[str, str] = {
    "val_top1_best": "max",
    "val_top1": "max",
    "val_top5": "max",
    "val_loss": "min",
}

_STUDY_TABLES = ("study", "resources", "config")
_STUDY_KEYS = (
    "name",
    "description",
    "dataset",
    "simulate",
    "subjects",
    "search_subject",
    "encoders",
    "pairs",
    "trials",
    "max_epochs",
    "grace_period",
    "reduction_factor",
    "final_seeds",
    "seed",
)
_RESOURCE_KEYS = ("workers_per_trial", "cpus_per_worker", "use_gpu", "trial_cpus")
_SIMULATE_KEYS = ("preset", "seed", "null", "overrides")
_ENCODER_KEYS = ("name", "searchspace")
_PAIR_KEYS = ("backbone", "aligned", "base")
_SPACE_KEYS = ("encoder", "metric", "mode", "description", "params")
_PARAM_KINDS = ("float", "int", "choice")
_PARAM_KEYS = ("float", "int", "choice", "log", "step")


# --------------------------------------------------------------------------- small helpers
def _unknown(where: str, keys: Iterable[str], allowed: Sequence[str]) -> None:
    for key in keys:
        if key not in allowed:
            raise BrainalignError(
                f"{where}: unknown key {key!r}; expected one of {list(allowed)}.{suggest(key, allowed)}"
            )


def _need(where: str, doc: Mapping[str, Any], key: str) -> Any:
    if key not in doc:
        raise BrainalignError(f"{where}: missing required key {key!r}.")
    return doc[key]


def _int(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BrainalignError(f"{where} must be an integer, got {value!r}.")
    if value < low:
        raise BrainalignError(f"{where} must be >= {low}, got {value}.")
    return value


def _num(where: str, value: Any, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BrainalignError(f"{where} must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise BrainalignError(f"{where} must be > 0, got {value!r}.")
    return float(value)


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BrainalignError(f"{where} must be a non-empty string, got {value!r}.")
    return value.strip()


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise BrainalignError(f"{what} {path} does not exist.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BrainalignError(f"{what} {path} is not valid TOML: {e}.") from e


# --------------------------------------------------------------------------- search spaces
@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter.

    Parameters
    ----------
    name : str
        A flat :class:`~brainalign.TrainConfig` key (``lr``, ``data.normalize``) or
        ``arch.<option>`` of the encoder.
    kind : {"float", "int", "choice"}
        Distribution family.
    low, high : float
        Bounds (inclusive) of ``float``/``int`` parameters.
    log : bool
        Sample on a log scale (``low`` must be > 0).
    step : float or None
        Discretization step of ``float``/``int`` parameters.
    choices : tuple
        The values of a ``choice`` parameter.
    """

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def candidates(self) -> list[Any]:
        """Values that bound the parameter (``low``, ``high``) or all its choices."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def to_json(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"choice": list(self.choices)}
        out: dict[str, Any] = {self.kind: [self.low, self.high], "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class SearchSpace:
    """What varies in the search of one brain encoder (``searchspaces/<encoder>.toml``).

    Parameters
    ----------
    encoder : str
        The brain encoder the space is for.
    metric, mode : str
        The selection metric (a validation metric reported at every epoch) and its direction.
    params : tuple of ParamSpec
        The searched parameters.
    path : str
        The file it was read from (for messages and MLflow params).
    """

    encoder: str
    metric: str
    mode: str
    params: tuple[ParamSpec, ...]
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "metric": self.metric, "mode": self.mode,
                "params": {p.name: p.to_json() for p in self.params}}


def _parse_param(where: str, name: str, spec: Any) -> ParamSpec:
    if not isinstance(spec, Mapping):
        raise BrainalignError(
            f"{where}: parameter {name!r} must be a table like {{ float = [1e-5, 1e-3], log = true }}, "
            f"{{ int = [1, 8] }} or {{ choice = [64, 128] }}; got {spec!r}."
        )
    _unknown(f"{where}: parameter {name!r}", spec, _PARAM_KEYS)
    kinds = [k for k in _PARAM_KINDS if k in spec]
    if len(kinds) != 1:
        raise BrainalignError(
            f"{where}: parameter {name!r} needs exactly one of {list(_PARAM_KINDS)}, got {kinds or 'none'}."
        )
    kind = kinds[0]
    log_scale = spec.get("log", False)
    if not isinstance(log_scale, bool):
        raise BrainalignError(f"{where}: parameter {name!r}: log must be true or false, got {log_scale!r}.")
    if kind == "choice":
        if "log" in spec or "step" in spec:
            raise BrainalignError(f"{where}: parameter {name!r}: 'log' and 'step' do not apply to a choice.")
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            raise BrainalignError(f"{where}: parameter {name!r}: choice must be a non-empty list, got {choices!r}.")
        for c in choices:
            if not isinstance(c, str | int | float | bool):
                raise BrainalignError(
                    f"{where}: parameter {name!r}: choices must be strings, numbers or booleans, got {c!r}."
                )
        if len(set(map(repr, choices))) != len(choices):
            raise BrainalignError(f"{where}: parameter {name!r}: duplicate choices in {choices!r}.")
        return ParamSpec(name, "choice", choices=tuple(choices))
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise BrainalignError(f"{where}: parameter {name!r}: {kind} must be [low, high], got {bounds!r}.")
    for b in bounds:
        if kind == "int" and (isinstance(b, bool) or not isinstance(b, int)):
            raise BrainalignError(f"{where}: parameter {name!r}: int bounds must be integers, got {bounds!r}.")
        _num(f"{where}: parameter {name!r} bound", b, positive=False)
    low, high = float(bounds[0]), float(bounds[1])
    if low >= high:
        raise BrainalignError(f"{where}: parameter {name!r}: low must be < high, got [{bounds[0]}, {bounds[1]}].")
    if log_scale and low <= 0:
        raise BrainalignError(
            f"{where}: parameter {name!r}: a log-scale range needs low > 0, got [{bounds[0]}, {bounds[1]}]."
        )
    step = spec.get("step")
    if step is not None:
        step = _num(f"{where}: parameter {name!r}: step", step)
        if log_scale:
            raise BrainalignError(f"{where}: parameter {name!r}: 'step' cannot be combined with log = true.")
        if kind == "int" and not float(step).is_integer():
            raise BrainalignError(f"{where}: parameter {name!r}: an int step must be an integer, got {step}.")
    return ParamSpec(name, kind, low=low, high=high, log=log_scale, step=step)


def load_searchspace(path: str | Path, encoder: str | None = None,
                     base: Mapping[str, Any] | None = None) -> SearchSpace:
    """Read and validate a search-space file.

    Parameters
    ----------
    path : path
        A ``searchspaces/*.toml`` file (format: ``searchspaces/README.md``).
    encoder : str, optional
        The encoder the study uses the space for; it must match the file's ``encoder``.
    base : mapping, optional
        Flat base config (the study's ``[config]`` plus controlled keys) on top of which every
        bound and choice is checked by building a :class:`~brainalign.TrainConfig`.

    Returns
    -------
    SearchSpace

    Raises
    ------
    BrainalignError
        Unknown keys, an unknown or controlled parameter, an impossible range (``low >= high``,
        a log range with ``low <= 0``, an empty choice), a metric that is not a validation
        metric, or a value that ``TrainConfig`` rejects (e.g. ``batch_size`` choices < 2).
    """
    from ..encoders import encoder_info

    p = Path(path)
    where = f"search space {p}"
    doc = _read_toml(p, "Search space")
    _unknown(where, doc, _SPACE_KEYS)
    file_encoder = _str(f"{where}: encoder", _need(where, doc, "encoder"))
    encoder_info(file_encoder)  # unknown encoder -> closest match
    if encoder is not None and file_encoder != encoder:
        raise BrainalignError(f"{where} is for encoder {file_encoder!r}, but the study uses it for {encoder!r}.")
    metric = _str(f"{where}: metric", doc.get("metric", "val_top1_best"))
    if metric not in SEARCH_METRICS:
        hint = " Test metrics are never used for selection." if metric.startswith("test") else ""
        raise BrainalignError(
            f"{where}: metric {metric!r} is not a validation metric reported every epoch; expected one of "
            f"{list(SEARCH_METRICS)}.{suggest(metric, SEARCH_METRICS)}{hint}"
        )
    mode = doc.get("mode", SEARCH_METRICS[metric])
    if mode not in ("max", "min"):
        raise BrainalignError(f"{where}: mode must be 'max' or 'min', got {mode!r}.")
    if mode != SEARCH_METRICS[metric]:
        raise BrainalignError(
            f"{where}: metric {metric!r} is selected with mode {SEARCH_METRICS[metric]!r}, got {mode!r}."
        )
    params_doc = _need(where, doc, "params")
    if not isinstance(params_doc, Mapping) or not params_doc:
        raise BrainalignError(f"{where}: [params] must define at least one parameter.")
    known = set(TrainConfig().to_flat())
    arch_known = encoder_info(file_encoder).arch_params()
    params: list[ParamSpec] = []
    for name, spec in _flatten_params(params_doc).items():
        if name in CONTROLLED_KEYS:
            raise BrainalignError(f"{where}: {name!r} cannot be searched; it is set by {CONTROLLED_KEYS[name]}.")
        if name.startswith("arch."):
            opt = name[5:]
            if opt not in arch_known:
                raise BrainalignError(
                    f"{where}: {name!r} is not an architecture option of encoder {file_encoder!r}; "
                    f"expected one of {sorted(arch_known)}.{suggest(opt, arch_known)}"
                )
        elif name not in known:
            keys = sorted(known - set(CONTROLLED_KEYS))
            raise BrainalignError(
                f"{where}: {name!r} is not a TrainConfig key (or arch.<option>).{suggest(name, keys)}"
            )
        params.append(_parse_param(where, name, spec))
    space = SearchSpace(file_encoder, metric, mode, tuple(params), str(p))
    _check_values(space, dict(base or {}) | {"encoder": file_encoder}, where)
    return space


def _flatten_params(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``[params.arch] drop_prob = {...}`` and ``"arch.drop_prob" = {...}`` both become dotted keys."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            for sub, v in _flatten_params(value).items():
                out[f"{key}.{sub}"] = v
        else:
            out[str(key)] = value
    return out


def _check_values(space: SearchSpace, base: Mapping[str, Any], where: str) -> None:
    """Every bound and choice must give a valid TrainConfig on top of ``base``."""
    try:
        cfg = TrainConfig.from_flat(base)
    except BrainalignError as e:
        raise BrainalignError(f"{where}: the base config is invalid: {e}") from None
    for p in space.params:
        if p.name == "batch_size" and any(
            isinstance(v, int | float) and not isinstance(v, bool) and v < 2 for v in p.candidates()
        ):
            raise BrainalignError(
                f"{where}: batch_size values must be >= 2 (InfoNCE needs in-batch negatives), got {p.candidates()}."
            )
        for value in p.candidates():
            try:
                cfg.with_overrides({p.name: value})
            except BrainalignError as e:
                raise BrainalignError(f"{where}: {p.name} = {value!r} is not a valid value: {e}") from None


# --------------------------------------------------------------------------- study
@dataclass(frozen=True)
class SimulateSpec:
    """How to create the study's dataset with the simulator if it is missing."""

    preset: str = "mini"
    seed: int = 0
    null: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.preset, "seed": self.seed, "null": self.null, "overrides": dict(self.overrides)}


def parse_simulate(where: str, sim: Any) -> SimulateSpec:
    """A study file's ``simulate = { preset, seed, null, overrides }`` table, validated
    (unknown keys, preset or simulator parameter name the closest match)."""
    if not isinstance(sim, Mapping):
        raise BrainalignError(f"{where} simulate must be a table like {{ preset = \"mini\", seed = 0 }}.")
    _unknown(f"{where} simulate", sim, _SIMULATE_KEYS)
    null = sim.get("null", False)
    if not isinstance(null, bool):
        raise BrainalignError(f"{where} simulate.null must be true or false, got {null!r}.")
    overrides = sim.get("overrides", {})
    if not isinstance(overrides, Mapping):
        raise BrainalignError(f"{where} simulate.overrides must be a table of simulator parameters.")
    spec = SimulateSpec(
        preset=_str(f"{where} simulate.preset", sim.get("preset", "mini")),
        seed=_int(f"{where} simulate.seed", sim.get("seed", 0), 0),
        null=null,
        overrides=dict(overrides),
    )
    from ..data.simulate import make_params

    make_params(spec.preset, spec.overrides)  # unknown preset/parameter -> closest match
    return spec


@dataclass(frozen=True)
class EncoderSpec:
    """A brain encoder of the study and its search space."""

    name: str
    space: SearchSpace


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
    """Ray resources of one trial: ``workers_per_trial`` Train workers of ``cpus_per_worker``
    CPUs (and one GPU each with ``use_gpu``), plus ``trial_cpus`` for the Tune trial that
    drives them (it only waits on its workers; ``0`` is refused by Ray)."""

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    trial_cpus: float = 0.01

    @property
    def cpus_per_trial(self) -> float:
        return self.workers_per_trial * self.cpus_per_worker + self.trial_cpus


@dataclass(frozen=True)
class Arm:
    """One search: a brain encoder trained against one image-embedding table."""

    encoder: str
    backbone: str
    alignment: str
    aligned: bool

    @property
    def table(self) -> str:
        return f"{self.backbone}:{self.alignment}"

    @property
    def name(self) -> str:
        """Stable id used for Ray storage, state keys and MLflow run names."""
        return f"{self.encoder}__{self.backbone}__{self.alignment}"

    @property
    def arm(self) -> str:
        return "aligned" if self.aligned else "base"


@dataclass(frozen=True)
class Study:
    """A validated study (see ``docs/sweep.md``). Build it with :func:`load_study`.

    Parameters
    ----------
    name : str
        Study name; also the MLflow experiment name and the Ray storage folder.
    dataset : str
        Dataset root (relative paths are taken against ``$BRAINALIGN_HOME``).
    simulate : SimulateSpec or None
        Create the dataset with the simulator when it is missing.
    subjects : tuple of str
        Subjects the finals are trained and tested on (one model per subject).
    search_subject : str
        Subject the searches train and validate on (default: the first subject).
    encoders : tuple of EncoderSpec
        Brain encoders and their search spaces.
    pairs : tuple of PairSpec
        Image-embedding pairs; each arm of a pair gets its own search with the same budget.
    trials, max_epochs, grace_period, reduction_factor : int
        Search budget: Optuna TPE trials per search, ASHA ``max_t`` / ``grace_period`` /
        ``reduction_factor`` (in epochs).
    final_seeds : tuple of int
        Seeds of the final runs (per subject and arm).
    seed : int
        Seed of Optuna's sampler and of every search trial's training.
    resources : Resources
        Per-trial Ray resources.
    config : mapping
        Flat base ``TrainConfig`` overrides shared by every run.
    path : str
        The study file.
    description : str
        Free text, logged with the study run.
    """

    name: str
    dataset: str
    simulate: SimulateSpec | None
    subjects: tuple[str, ...]
    search_subject: str
    encoders: tuple[EncoderSpec, ...]
    pairs: tuple[PairSpec, ...]
    trials: int
    max_epochs: int
    grace_period: int
    reduction_factor: int
    final_seeds: tuple[int, ...]
    seed: int
    resources: Resources
    config: Mapping[str, Any]
    path: str = ""
    description: str = ""

    # ----------------------------------------------------------------- derived
    @property
    def dataset_path(self) -> Path:
        """Absolute dataset root."""
        return resolve(self.dataset)

    def arms(self) -> list[Arm]:
        """Every search of the study: encoder x pair x {aligned, base}, in a stable order."""
        out = []
        for enc in self.encoders:
            for pair in self.pairs:
                out.append(Arm(enc.name, pair.backbone, pair.aligned, True))
                out.append(Arm(enc.name, pair.backbone, pair.base, False))
        return out

    def space(self, encoder: str) -> SearchSpace:
        return next(e.space for e in self.encoders if e.name == encoder)

    def base_flat(self, arm: Arm, subject: str, seed: int) -> dict[str, Any]:
        """The flat config of a run of ``arm`` (before the searched parameters)."""
        r = self.resources
        return dict(self.config) | {
            "encoder": arm.encoder,
            "data.path": str(self.dataset_path),
            "data.subjects": (subject,),
            "data.test_subjects": (),
            "data.image_table": arm.table,
            "epochs": self.max_epochs,
            "seed": seed,
            "experiment": self.name,
            "num_workers": r.workers_per_trial,
            "cpus_per_worker": r.cpus_per_worker,
            "use_gpu": r.use_gpu,
        }

    def to_json(self) -> dict[str, Any]:
        """Everything that defines the study's results (hashed to detect edits on resume)."""
        return {
            "name": self.name,
            "dataset": self.dataset,
            "simulate": self.simulate.to_json() if self.simulate else None,
            "subjects": list(self.subjects),
            "search_subject": self.search_subject,
            "encoders": {e.name: e.space.to_json() for e in self.encoders},
            "pairs": [[p.backbone, p.aligned, p.base] for p in self.pairs],
            "trials": self.trials,
            "max_epochs": self.max_epochs,
            "grace_period": self.grace_period,
            "reduction_factor": self.reduction_factor,
            "final_seeds": list(self.final_seeds),
            "seed": self.seed,
            "resources": {k: getattr(self.resources, k) for k in _RESOURCE_KEYS},
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(self.config.items())},
        }

    def fingerprint(self) -> str:
        """Short hash of :meth:`to_json`."""
        blob = json.dumps(self.to_json(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def n_runs(self) -> dict[str, int]:
        """How many Train runs the study makes (trials are an upper bound: ASHA stops some early)."""
        arms = len(self.arms())
        return {"searches": arms, "trials": arms * self.trials,
                "finals": arms * len(self.subjects) * len(self.final_seeds)}


def _searchspace_path(where: str, study_file: Path, encoder: str, given: str | None) -> Path:
    rel = Path(given) if given else Path("searchspaces") / f"{encoder}.toml"
    if rel.is_absolute():
        return rel
    tried = [study_file.parent / rel, study_file.parent.parent / rel, Path.cwd() / rel]
    for cand in tried:
        if cand.is_file():
            return cand.resolve()
    raise BrainalignError(
        f"{where}: no search space for encoder {encoder!r}: looked for {rel} next to the study file, one "
        f"level up and in the working directory ({', '.join(str(t) for t in tried)})."
    )


def _parse_config(where: str, doc: Any) -> dict[str, Any]:
    if not isinstance(doc, Mapping):
        raise BrainalignError(f"{where}: [config] must be a table of TrainConfig keys.")
    flat = flatten_toml(doc)
    known = set(TrainConfig().to_flat())
    for key in flat:
        if key in CONTROLLED_KEYS:
            raise BrainalignError(f"{where}: [config] {key!r} is set by {CONTROLLED_KEYS[key]}; remove it.")
        if not key.startswith("arch.") and key not in known:
            raise BrainalignError(
                f"{where}: [config] {key!r} is not a TrainConfig key.{suggest(key, sorted(known))}"
            )
    return flat


def load_study(path: str | Path) -> Study:
    """Read and validate a study file (and its search spaces); no data or compute is touched.

    Parameters
    ----------
    path : path
        The study TOML (format: ``docs/sweep.md``).

    Returns
    -------
    Study

    Raises
    ------
    BrainalignError
        Any problem with the study or a search space (see the module docstring). Tables and
        subjects are checked against the dataset by :func:`validate_data`.
    """
    from ..encoders import encoder_info

    p = Path(path).resolve()
    where = f"study {path}"
    doc = _read_toml(p, "Study file")
    _unknown(where, doc, _STUDY_TABLES)
    st = _need(where, doc, "study")
    if not isinstance(st, Mapping):
        raise BrainalignError(f"{where}: [study] must be a table.")
    _unknown(f"{where}: [study]", st, _STUDY_KEYS)
    w = f"{where}: [study]"
    name = _str(f"{w} name", _need(w, st, "name"))
    if not all(c.isalnum() or c in "-_." for c in name):
        raise BrainalignError(f"{w} name {name!r} may only hold letters, digits, '-', '_' and '.'.")
    dataset = _str(f"{w} dataset", _need(w, st, "dataset"))

    simulate = parse_simulate(w, st["simulate"]) if "simulate" in st else None

    subjects_raw = _need(w, st, "subjects")
    if not isinstance(subjects_raw, list) or not subjects_raw:
        raise BrainalignError(f"{w} subjects must be a non-empty list like [\"01\", \"02\"], got {subjects_raw!r}.")
    subjects = tuple(str(s) for s in subjects_raw)
    if len(set(subjects)) != len(subjects):
        raise BrainalignError(f"{w} subjects has duplicates: {list(subjects)}.")
    search_subject = str(st.get("search_subject", subjects[0]))
    if search_subject not in subjects:
        raise BrainalignError(
            f"{w} search_subject {search_subject!r} is not one of the study subjects {list(subjects)}."
        )

    max_epochs = _int(f"{w} max_epochs", _need(w, st, "max_epochs"), 1)
    trials = _int(f"{w} trials", _need(w, st, "trials"), 1)
    grace = _int(f"{w} grace_period", st.get("grace_period", max(1, max_epochs // 4)), 1)
    if grace > max_epochs:
        raise BrainalignError(f"{w} grace_period ({grace}) must be <= max_epochs ({max_epochs}).")
    reduction = _int(f"{w} reduction_factor", st.get("reduction_factor", 2), 2)
    seeds_raw = st.get("final_seeds", 3)
    if isinstance(seeds_raw, list):
        if not seeds_raw:
            raise BrainalignError(f"{w} final_seeds must not be empty.")
        seeds = tuple(_int(f"{w} final_seeds entry", s, 0) for s in seeds_raw)
        if len(set(seeds)) != len(seeds):
            raise BrainalignError(f"{w} final_seeds has duplicates: {list(seeds)}.")
    else:
        seeds = tuple(range(_int(f"{w} final_seeds", seeds_raw, 1)))
    seed = _int(f"{w} seed", st.get("seed", 0), 0)

    res_doc = doc.get("resources", {})
    if not isinstance(res_doc, Mapping):
        raise BrainalignError(f"{where}: [resources] must be a table.")
    _unknown(f"{where}: [resources]", res_doc, _RESOURCE_KEYS)
    use_gpu = res_doc.get("use_gpu", False)
    if not isinstance(use_gpu, bool):
        raise BrainalignError(f"{where}: [resources] use_gpu must be true or false, got {use_gpu!r}.")
    trial_cpus = _num(f"{where}: [resources] trial_cpus", res_doc.get("trial_cpus", 0.01), positive=False)
    if trial_cpus <= 0:
        raise BrainalignError(
            f"{where}: [resources] trial_cpus must be > 0 (Ray refuses a 0-CPU trial); use e.g. 0.01."
        )
    resources = Resources(
        workers_per_trial=_int(f"{where}: [resources] workers_per_trial", res_doc.get("workers_per_trial", 1), 1),
        cpus_per_worker=_num(f"{where}: [resources] cpus_per_worker", res_doc.get("cpus_per_worker", 1.0)),
        use_gpu=use_gpu,
        trial_cpus=trial_cpus,
    )
    config = _parse_config(where, doc.get("config", {}))

    enc_raw = _need(w, st, "encoders")
    if not isinstance(enc_raw, list) or not enc_raw:
        raise BrainalignError(f"{w} encoders must be a non-empty list like [\"nice\"].")
    encoders: list[EncoderSpec] = []
    for entry in enc_raw:
        doc_e = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(doc_e, Mapping):
            raise BrainalignError(f"{w} encoders entries must be names or {{ name = ..., searchspace = ... }}.")
        _unknown(f"{w} encoders entry", doc_e, _ENCODER_KEYS)
        ename = _str(f"{w} encoders name", _need(f"{w} encoders entry", doc_e, "name"))
        encoder_info(ename)  # unknown -> closest match
        if ename in [x.name for x in encoders]:
            raise BrainalignError(f"{w} encoders lists {ename!r} twice.")
        try:  # [config] with this encoder: its arch.* options are checked against the encoder
            TrainConfig.from_flat(dict(config) | {"epochs": max_epochs, "encoder": ename})
        except BrainalignError as e:
            raise BrainalignError(f"{where}: [config] (with max_epochs = {max_epochs}) is invalid: {e}") from None
        space_path = _searchspace_path(w, p, ename, doc_e.get("searchspace"))
        base = dict(config) | {"epochs": max_epochs}
        encoders.append(EncoderSpec(ename, load_searchspace(space_path, ename, base)))

    pairs_raw = _need(w, st, "pairs")
    if not isinstance(pairs_raw, list) or not pairs_raw:
        raise BrainalignError(f"{w} pairs must be a non-empty list like [{{ backbone = \"sim-clip\", aligned = \"simulated\" }}].")
    pairs: list[PairSpec] = []
    for q in pairs_raw:
        if not isinstance(q, Mapping):
            raise BrainalignError(f"{w} pairs entries must be tables {{ backbone = ..., aligned = ..., base = ... }}.")
        _unknown(f"{w} pairs entry", q, _PAIR_KEYS)
        pair = PairSpec(
            backbone=_str(f"{w} pairs backbone", _need(f"{w} pairs entry", q, "backbone")),
            aligned=_str(f"{w} pairs aligned", _need(f"{w} pairs entry", q, "aligned")),
            base=_str(f"{w} pairs base", q.get("base", "none")),
        )
        if pair.aligned == pair.base:
            raise BrainalignError(f"{w} pair {pair.backbone!r}: aligned and base must differ, both are {pair.base!r}.")
        if any(x.backbone == pair.backbone and x.aligned == pair.aligned for x in pairs):
            raise BrainalignError(f"{w} pairs lists {pair.aligned_table!r} twice.")
        pairs.append(pair)

    study = Study(
        name=name, dataset=dataset, simulate=simulate, subjects=subjects, search_subject=search_subject,
        encoders=tuple(encoders), pairs=tuple(pairs), trials=trials, max_epochs=max_epochs,
        grace_period=grace, reduction_factor=reduction, final_seeds=seeds, seed=seed, resources=resources,
        config=config, path=str(p), description=str(st.get("description", "")),
    )
    # every run's config must be valid (e.g. warmup_epochs < max_epochs, batch sizes)
    for arm in study.arms():
        try:
            TrainConfig.from_flat(study.base_flat(arm, search_subject, seed))
        except BrainalignError as e:
            raise BrainalignError(f"{where}: the run config of {arm.name} is invalid: {e}") from None
    return study


# --------------------------------------------------------------------------- data
def _simulated_contents(spec: SimulateSpec) -> tuple[tuple[str, ...], set[str]]:
    from ..data.simulate import make_params

    params = make_params(spec.preset, spec.overrides)
    subjects = tuple(f"{i + 1:02d}" for i in range(params.n_subjects))
    tables = {f"{b}:{a}" for b in params.encoder_names for a in ("simulated", "none")}
    return subjects, tables


def _check_contents(study: Study, subjects: Sequence[str], tables: Iterable[str], where: str) -> None:
    missing = [s for s in study.subjects if s not in subjects]
    if missing:
        raise BrainalignError(
            f"study {study.name}: subjects {missing} are not in {where} (subjects: {list(subjects)})."
        )
    have = sorted(tables)
    for pair in study.pairs:
        for t in (pair.aligned_table, pair.base_table):
            if t not in have:
                raise BrainalignError(
                    f"study {study.name}: image table {t!r} is not in {where} (tables: {have}).{suggest(t, have)}"
                )


def ensure_dataset(study: Study) -> Path:
    """Create the study's dataset with the simulator if it is configured and missing.

    The subjects and tables a simulation would produce are checked first, so a typo fails
    before minutes of simulation. An existing dataset is left as it is (the simulator
    refuses one that was simulated with other settings).

    Returns
    -------
    Path
        The absolute dataset root.
    """
    root = study.dataset_path
    if study.simulate is None:
        return root
    subjects, tables = _simulated_contents(study.simulate)
    _check_contents(study, subjects, tables, f"the simulated {study.simulate.preset!r} preset")
    from ..data.simulate import simulate_dataset

    s = study.simulate
    log.info("dataset %s (simulated preset %s, seed %d, null=%s)", root, s.preset, s.seed, s.null)
    simulate_dataset(root, s.preset, seed=s.seed, null=s.null, overrides=dict(s.overrides) or None,
                     progress=False)
    return root


def validate_data(study: Study) -> None:
    """Check the study against its dataset: subjects, tables and encoder input shapes.

    Raises
    ------
    BrainalignError
        The dataset is missing, a study subject or image table is not in it, or an encoder
        (with the ``[config]`` architecture options) cannot take the dataset's epochs.
    """
    from ..data.contract import open_dataset, read_table_meta
    from ..data.prepare import check_normalization
    from ..encoders import create_encoder

    ds = open_dataset(study.dataset_path)
    tables = ds.tables()
    _check_contents(study, ds.meta.subjects, tables, f"dataset {ds.root}")
    try:
        check_normalization(str(study.config.get("data.normalize", DataConfig().normalize)), ds.meta.n_times)
    except BrainalignError as e:
        raise BrainalignError(f"study {study.name} ({ds.root}): {e}") from None
    dims = {t: int(read_table_meta(tables[t])["dim"]) for p in study.pairs for t in (p.aligned_table, p.base_table)}
    arch_base = {k[5:]: v for k, v in study.config.items() if k.startswith("arch.")}
    for enc in study.encoders:
        for spec in [None, *[q for q in enc.space.params if q.name.startswith("arch.")]]:
            for value in spec.candidates() if spec else [None]:
                arch = dict(arch_base)
                if spec is not None:
                    arch[spec.name[5:]] = value
                try:
                    create_encoder(enc.name, n_chans=ds.meta.n_chans, n_times=ds.meta.n_times,
                                   embed_dim=min(dims.values()), n_subjects=1, **arch)
                except BrainalignError as e:
                    what = f" with {spec.name} = {value!r}" if spec else ""
                    raise BrainalignError(
                        f"study {study.name}: encoder {enc.name!r}{what} cannot take the epochs of {ds.root} "
                        f"({ds.meta.n_chans} channels x {ds.meta.n_times} samples): {e}"
                    ) from None
