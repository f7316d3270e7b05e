"""Typed, validated, frozen run configuration.

A :class:`TrainConfig` is built once (from a TOML file, ``key=value`` overrides, or a flat
dict sampled by Tune) and then passed around. ``to_flat()`` gives dotted keys one level deep
(``data.subjects``, ``arch.drop_prob``): what Tune samples, what the CLI overrides and what
MLflow logs. Unknown keys and bad values fail with the closest valid key suggested.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ._checks import BrainalignError, check_gpu_share, check_name, check_option, check_range, check_type
from .paths import resolve

__all__ = ["DataConfig", "EvaluationConfig", "TrainConfig", "load_config", "parse_overrides"]

TRIAL_MODES = ("average", "single")
NORMALIZATIONS = ("none", "center_l2", "alignvis")
SELECT_METRICS = ("val_loss", "val_top1")
VAL_SPLITS = ("image", "concept")
#: Cap of a learned logit scale ``1/T`` (CLIP's 100): a learned temperature stays >= 0.01.
MAX_LOGIT_SCALE = 100.0
#: Image sets a test query can be ranked among (``test.gallery``).
GALLERIES = ("test", "test+train")


@dataclass(frozen=True)
class DataConfig:
    """Which brain data and which image-embedding table a run uses.

    ``image_table`` is ``"backbone:alignment"`` (e.g. ``"sim-clip:simulated"``), a table in
    ``embeddings_dir`` (default ``<path>/embeddings``). ``subjects`` train; ``test_subjects``
    (default: the same) are evaluated. ``train_trials="average"`` trains on
    repetition-averaged epochs (AlignVis), ``"single"`` on single trials (ATM).
    ``normalize="center_l2"`` makes each repetition and channel zero-mean and unit-norm over
    time before averaging; ``"alignvis"`` is the reference's exact formula, which divides the
    centred series by the norm of the *uncentred* one (see ``data.prepare.normalize_epochs``).
    ``val_split`` says what the seeded ``val_fraction`` holds out of training: ``"image"``
    (images; a validation image's concept still has other images in training) or
    ``"concept"`` (whole concepts: every image of a validation concept goes to validation, so
    validation concepts are novel, as test concepts are).
    """

    path: str = "data/sim-mini"
    subjects: tuple[str, ...] = ("01",)
    test_subjects: tuple[str, ...] = ()
    image_table: str = "sim-clip:simulated"
    embeddings_dir: str = ""
    train_trials: str = "average"
    normalize: str = "center_l2"
    val_fraction: float = 0.1
    val_split: str = "image"

    def __post_init__(self) -> None:
        check_option("data.train_trials", self.train_trials, TRIAL_MODES)
        check_option("data.val_split", self.val_split, VAL_SPLITS)
        check_option("data.normalize", self.normalize, NORMALIZATIONS)
        check_range("data.val_fraction", self.val_fraction, low=0.0, high=0.5, low_inclusive=False)
        if not self.subjects:
            raise BrainalignError("data.subjects must name at least one training subject.")
        for key in ("subjects", "test_subjects"):
            ids = getattr(self, key)
            for sid in ids:
                check_name(f"data.{key} entry", sid)
            dups = sorted({s for s in ids if ids.count(s) > 1})
            if dups:
                raise BrainalignError(
                    f"data.{key} lists {dups} more than once ({','.join(ids)}); name each subject once "
                    "(a repeated subject would be weighted twice)."
                )
        if self.image_table.count(":") != 1 or not all(self.image_table.split(":")):
            raise BrainalignError(
                f"data.image_table must be 'backbone:alignment' (e.g. 'sim-clip:simulated'), "
                f"got {self.image_table!r}."
            )

    @property
    def eval_subjects(self) -> tuple[str, ...]:
        return self.test_subjects or self.subjects

    @property
    def cross_subject(self) -> bool:
        return bool(set(self.eval_subjects) - set(self.subjects))


@dataclass(frozen=True)
class EvaluationConfig:
    """How a finished run is tested (keys ``test.*``).

    ``gallery`` names the image sets each test query is ranked among. ``"test"`` (the N test
    images: the N-way retrieval of the paper's tables) is always evaluated and gives
    ``test_top1`` / ``test_top5``. ``"test+train"`` ranks each query among the test images and
    every training image of the catalog (the paper's App. F: 16,740-way for Things-EEG2) and is
    logged as ``test_top1_<N>way`` / ``test_top5_<N>way``. A string is one gallery; a list or a
    comma-separated string several.
    """

    gallery: tuple[str, ...] = ("test",)

    def __post_init__(self) -> None:
        if not self.gallery:
            raise BrainalignError(f"test.gallery must name at least one of {list(GALLERIES)}.")
        for g in self.gallery:
            check_option("test.gallery", g, GALLERIES)
        if len(set(self.gallery)) != len(self.gallery):
            raise BrainalignError(f"test.gallery lists a gallery twice: {list(self.gallery)}.")

    @property
    def galleries(self) -> tuple[str, ...]:
        """The galleries to evaluate: ``"test"`` first (always), then the others as given."""
        return ("test", *(g for g in self.gallery if g != "test"))


#: Config sections: dotted-key prefix -> dataclass (``data.path``, ``test.gallery``).
_SECTIONS: dict[str, type] = {"data": DataConfig, "test": EvaluationConfig}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Defaults follow AlignVis's NICE recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    test: EvaluationConfig = field(default_factory=EvaluationConfig)
    encoder: str = "nice"
    arch: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 50
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.1
    warmup_epochs: int = 0
    min_lr: float = 1e-7
    grad_clip: float = 1.0
    temperature: float = 0.04
    learn_temperature: bool = False
    amp: bool = True
    patience: int = 30
    select_metric: str = "val_loss"
    seed: int = 42
    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu: a fraction (e.g. 0.25) packs several small runs on one GPU
    cpus_per_worker: float = 1.0
    torch_threads: int = 0
    shuffle_buffer_mb: float = 1024.0  # a Train worker's local shuffle buffer (train/ray_worker.py)
    checkpoint_every: int = 1  # epochs between full-state checkpoints (0: only the last epoch)
    max_failures: int = 2  # worker-group failures a run recovers from (from its latest checkpoint)
    experiment: str = "brainalign"
    run_name: str = ""

    def __post_init__(self) -> None:
        from .encoders import _registry, encoder_info

        encoder_info(self.encoder)  # unknown name -> closest match
        _registry.check_arch_kwargs(self.encoder, dict(self.arch))
        object.__setattr__(self, "arch", types.MappingProxyType(dict(self.arch)))
        for name in ("epochs", "batch_size", "num_workers", "patience"):
            check_range(name, getattr(self, name), low=1)
        check_range("warmup_epochs", self.warmup_epochs, low=0, high=self.epochs - 1)
        check_range("lr", self.lr, low=0.0, low_inclusive=False)
        check_range("min_lr", self.min_lr, low=0.0, high=self.lr)
        check_range("weight_decay", self.weight_decay, low=0.0)
        check_range("grad_clip", self.grad_clip, low=0.0)
        check_range("temperature", self.temperature, low=0.0, low_inclusive=False)
        if self.learn_temperature:  # a learned T is kept >= 1 / MAX_LOGIT_SCALE (losses.py)
            check_range("temperature (initial value of a learned temperature)", self.temperature,
                        low=1.0 / MAX_LOGIT_SCALE)
        check_range("cpus_per_worker", self.cpus_per_worker, low=0.0, low_inclusive=False)
        check_gpu_share("gpus_per_worker", self.gpus_per_worker)
        check_range("torch_threads", self.torch_threads, low=0)
        check_range("shuffle_buffer_mb", self.shuffle_buffer_mb, low=0.0, low_inclusive=False)
        check_range("checkpoint_every", self.checkpoint_every, low=0)
        check_range("max_failures", self.max_failures, low=0)
        check_option("select_metric", self.select_metric, SELECT_METRICS)
        check_name("experiment", self.experiment)  # an MLflow experiment: a folder of artifacts
        if self.run_name:
            check_name("run_name", self.run_name)
        if self.batch_size < 2:
            raise BrainalignError("batch_size must be >= 2: InfoNCE needs in-batch negatives.")
        if self.batch_size % self.num_workers:
            lower = self.batch_size - self.batch_size % self.num_workers
            options = [b for b in (lower, lower + self.num_workers) if b >= 2]
            raise BrainalignError(
                f"batch_size={self.batch_size} is not divisible by num_workers={self.num_workers}: batch_size is "
                f"the global batch (the loss sees all of it) and each of the {self.num_workers} workers encodes "
                f"batch_size / num_workers rows per step. Use batch_size={' or '.join(map(str, options))}, or "
                f"another num_workers."
            )

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled as its flat view: plain pickle works (the arch mapping is read-only) and
        # the process that unpickles it (a Ray worker) validates it again
        return (_from_flat, (self.to_flat(),))

    # ----------------------------------------------------------------- flat view
    def to_flat(self) -> dict[str, Any]:
        """Dotted keys one level deep; tuples stay tuples."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _SECTIONS:
                out |= {f"{f.name}.{k}": x for k, x in asdict(v).items()}
            elif f.name == "arch":
                out |= {f"arch.{k}": x for k, x in v.items()}
            else:
                out[f.name] = v
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], *, strict_types: bool = True) -> TrainConfig:
        """Build from dotted keys (missing keys take defaults). Values are type-checked."""
        base = _defaults_flat()
        section_kw: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        top_kw: dict[str, Any] = {}
        arch: dict[str, Any] = {}
        for key, value in flat.items():
            if key.startswith("arch."):
                arch[key[5:]] = value
                continue
            check_option("config key", key, list(base))
            value = _coerce(key, value, _FIELD_TYPES[key], strict=strict_types)
            section, _, sub = key.partition(".")
            if sub and section in _SECTIONS:
                section_kw[section][sub] = value
            else:
                top_kw[key] = value
        sections = {name: cls_(**section_kw[name]) for name, cls_ in _SECTIONS.items()}
        return cls(arch=arch, **sections, **top_kw)

    def with_overrides(self, flat: Mapping[str, Any]) -> TrainConfig:
        """A new config with dotted-key overrides applied on top of this one."""
        merged = {k: v for k, v in self.to_flat().items()} | dict(flat)
        return TrainConfig.from_flat(merged)

    def resolved(self) -> TrainConfig:
        """A copy whose data paths are absolute (what the driver hands to workers)."""
        emb = str(resolve(self.data.embeddings_dir, "data.embeddings_dir")) if self.data.embeddings_dir else ""
        data = replace(self.data, path=str(resolve(self.data.path, "data.path")), embeddings_dir=emb)
        return replace(self, data=data)

    def config_hash(self) -> str:
        """Short hash of the flat config (a tag that identifies identical runs)."""
        blob = json.dumps(self.to_flat(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def embeddings_dir(self) -> Path:
        return Path(self.data.embeddings_dir) if self.data.embeddings_dir else Path(self.data.path) / "embeddings"


def _from_flat(flat: Mapping[str, Any]) -> TrainConfig:
    return TrainConfig.from_flat(flat)


def _defaults_flat() -> dict[str, Any]:
    return {k: v for k, v in TrainConfig().to_flat().items() if not k.startswith("arch.")}


def _field_types() -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in _SECTIONS:
            for k, t in typing.get_type_hints(_SECTIONS[f.name]).items():
                out[f"{f.name}.{k}"] = t
        elif f.name != "arch":
            out[f.name] = hints[f.name]
    return out


_FIELD_TYPES = _field_types()
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(key: str, value: Any, typ: Any, *, strict: bool) -> Any:
    """Convert CLI strings to the field type; check the type of everything else."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        check_type(key, value, (list, tuple))
        return tuple(str(v) if not isinstance(v, str) else v for v in value)
    if isinstance(value, str) and typ is not str:
        s = value.strip()
        try:
            if typ is bool:
                if s.lower() in _TRUE | _FALSE:
                    return s.lower() in _TRUE
                raise ValueError
            return typ(float(s)) if typ is int and float(s).is_integer() else typ(s)
        except ValueError:
            raise BrainalignError(f"{key} must be {typ.__name__}, got {value!r}.") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer() and not strict:
        return int(value)
    return check_type(key, value, typ)


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["lr=1e-3", "data.subjects=01,02"]`` -> ``{"lr": "1e-3", ...}`` (values typed later)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise BrainalignError(f"Override {item!r} must look like key=value (e.g. lr=1e-3).")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def flatten_toml(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> dotted keys (``[data] path = ...`` -> ``data.path``)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= flatten_toml(v, prefix=f"{key}.")
        else:
            out[key] = v
    return out


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Config from an optional TOML file (its ``[config]`` table, or the whole file) plus overrides.

    Raises
    ------
    BrainalignError
        The file is missing or not TOML; it is a study file (``[study]``: run it with
        ``brainalign study run``); it has keys or tables next to a ``[config]`` table (they
        would be silently ignored); or any key or value is invalid.
    """
    flat: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise BrainalignError(f"Config file {p} does not exist.")
        try:
            doc = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise BrainalignError(f"Config file {p} is not valid TOML: {e}.") from e
        if "study" in doc:
            raise BrainalignError(
                f"{p} is a study file (it has a [study] table), not a train config: run it with "
                f"`brainalign study run {p}`. "
                "`brainalign train --config` reads a [config] table or top-level TrainConfig keys."
            )
        if "config" in doc:
            others = sorted(k for k in doc if k != "config")
            if others:
                raise BrainalignError(
                    f"{p}: {others} stand next to the [config] table and would be ignored; move them into "
                    "[config] (e.g. `epochs = 1` under [config], `[config.data]` for data keys) or remove them."
                )
            if not isinstance(doc["config"], Mapping):
                raise BrainalignError(f"{p}: 'config' must be a table ([config]), got {doc['config']!r}.")
        flat = flatten_toml(doc.get("config", doc))
    flat |= dict(overrides or {})
    return TrainConfig.from_flat(flat)
