"""Search-space files (``searchspaces/<encoder>.toml``): what varies during a search.

The one parser of these files (format: ``searchspaces/README.md``). Every name must be a
:class:`~brainalign.TrainConfig` key or an ``arch.<option>`` of the encoder, no key the study
sets itself (:data:`~brainalign.studies.spec.STUDY_OWNED`), no impossible range, and every
bound and choice must give a valid ``TrainConfig`` on top of the study's base config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._checks import BrainalignError, check_option, suggest
from ..config import TrainConfig
from .spec import STUDY_OWNED, as_number, as_str, check_keys, need, read_toml

__all__ = ["SEARCH_METRICS", "ParamSpec", "SearchSpace", "load_searchspace"]

#: Metrics a search may select on: validation metrics reported at every epoch, never test.
SEARCH_METRICS: dict[str, str] = {
    "val_top1_best": "max",
    "val_top1": "max",
    "val_top5": "max",
    "val_loss": "min",
}
_SPACE_KEYS = ("encoder", "metric", "mode", "description", "params")
_PARAM_KINDS = ("float", "int", "choice")
_PARAM_KEYS = ("float", "int", "choice", "log", "step")


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
    """What varies in the search of one brain encoder.

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

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def to_json(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "metric": self.metric, "mode": self.mode,
                "params": {p.name: p.to_json() for p in self.params}}


def _parse_param(where: str, name: str, spec: Any) -> ParamSpec:
    w = f"{where}: parameter {name!r}"
    if not isinstance(spec, Mapping):
        raise BrainalignError(
            f"{w} must be a table like {{ float = [1e-5, 1e-3], log = true }}, {{ int = [1, 8] }} or "
            f"{{ choice = [64, 128] }}; got {spec!r}."
        )
    check_keys(w, spec, _PARAM_KEYS)
    kinds = [k for k in _PARAM_KINDS if k in spec]
    if len(kinds) != 1:
        raise BrainalignError(f"{w} needs exactly one of {list(_PARAM_KINDS)}, got {kinds or 'none'}.")
    kind = kinds[0]
    log_scale = spec.get("log", False)
    if not isinstance(log_scale, bool):
        raise BrainalignError(f"{w}: log must be true or false, got {log_scale!r}.")
    if kind == "choice":
        if "log" in spec or "step" in spec:
            raise BrainalignError(f"{w}: 'log' and 'step' do not apply to a choice.")
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            raise BrainalignError(f"{w}: choice must be a non-empty list, got {choices!r}.")
        for c in choices:
            if not isinstance(c, str | int | float | bool):
                raise BrainalignError(f"{w}: choices must be strings, numbers or booleans, got {c!r}.")
        if len(set(map(repr, choices))) != len(choices):
            raise BrainalignError(f"{w}: duplicate choices in {choices!r}.")
        return ParamSpec(name, "choice", choices=tuple(choices))
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise BrainalignError(f"{w}: {kind} must be [low, high], got {bounds!r}.")
    for b in bounds:
        if kind == "int" and (isinstance(b, bool) or not isinstance(b, int)):
            raise BrainalignError(f"{w}: int bounds must be integers, got {bounds!r}.")
        if isinstance(b, bool) or not isinstance(b, int | float) or b != b or abs(b) == float("inf"):
            raise BrainalignError(f"{w}: bounds must be finite numbers, got {bounds!r}.")
    low, high = float(bounds[0]), float(bounds[1])
    if low >= high:
        raise BrainalignError(f"{w}: low must be < high, got [{bounds[0]}, {bounds[1]}].")
    if log_scale and low <= 0:
        raise BrainalignError(f"{w}: a log-scale range needs low > 0, got [{bounds[0]}, {bounds[1]}].")
    step = spec.get("step")
    if step is not None:
        step = as_number(f"{w}: step", step)
        if log_scale:
            raise BrainalignError(f"{w}: 'step' cannot be combined with log = true.")
        if kind == "int" and not float(step).is_integer():
            raise BrainalignError(f"{w}: an int step must be an integer, got {step}.")
    return ParamSpec(name, kind, low=low, high=high, log=log_scale, step=step)


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
        Flat base config (the study's ``[config]`` plus owned keys) on top of which every
        bound and choice is checked by building a :class:`~brainalign.TrainConfig`.

    Returns
    -------
    SearchSpace

    Raises
    ------
    BrainalignError
        Unknown keys, an unknown or study-owned parameter, an impossible range (``low >=
        high``, a log range with ``low <= 0``, an empty choice), a metric that is not a
        validation metric, or a value that ``TrainConfig`` rejects (e.g. ``batch_size`` < 2).
    """
    from ..encoders import encoder_info

    p = Path(path)
    where = f"search space {p}"
    doc = read_toml(p, "Search space")
    check_keys(where, doc, _SPACE_KEYS)
    file_encoder = as_str(f"{where}: encoder", need(where, doc, "encoder"))
    encoder_info(file_encoder)  # unknown encoder -> closest match
    if encoder is not None and file_encoder != encoder:
        raise BrainalignError(f"{where} is for encoder {file_encoder!r}, but the study uses it for {encoder!r}.")
    metric = as_str(f"{where}: metric", doc.get("metric", "val_top1_best"))
    if metric not in SEARCH_METRICS:
        hint = " Test metrics are never used for selection." if metric.startswith("test") else ""
        raise BrainalignError(
            f"{where}: metric {metric!r} is not a validation metric reported every epoch; expected one of "
            f"{list(SEARCH_METRICS)}.{suggest(metric, SEARCH_METRICS)}{hint}"
        )
    mode = check_option(f"{where}: mode", doc.get("mode", SEARCH_METRICS[metric]), ("max", "min"))
    if mode != SEARCH_METRICS[metric]:
        raise BrainalignError(
            f"{where}: metric {metric!r} is selected with mode {SEARCH_METRICS[metric]!r}, got {mode!r}."
        )
    params_doc = need(where, doc, "params")
    if not isinstance(params_doc, Mapping) or not params_doc:
        raise BrainalignError(f"{where}: [params] must define at least one parameter.")
    known = set(TrainConfig().to_flat())
    arch_known = encoder_info(file_encoder).arch_params()
    params: list[ParamSpec] = []
    for name, spec in _flatten_params(params_doc).items():
        if name in STUDY_OWNED:
            raise BrainalignError(f"{where}: {name!r} cannot be searched; it is set by {STUDY_OWNED[name]}.")
        if name.startswith("arch."):
            if name[5:] not in arch_known:
                raise BrainalignError(
                    f"{where}: {name!r} is not an architecture option of encoder {file_encoder!r}; "
                    f"expected one of {sorted(arch_known)}.{suggest(name[5:], arch_known)}"
                )
        elif name not in known:
            keys = sorted(known - set(STUDY_OWNED))
            raise BrainalignError(
                f"{where}: {name!r} is not a TrainConfig key (or arch.<option>).{suggest(name, keys)}"
            )
        params.append(_parse_param(where, name, spec))
    space = SearchSpace(file_encoder, metric, mode, tuple(params), str(p))
    _check_values(space, dict(base or {}) | {"encoder": file_encoder}, where)
    return space


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
