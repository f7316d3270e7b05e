"""brainalign: decode what a person saw from brain signals, with human-aligned image encoders.

The public surface is small and light: ``import brainalign`` imports neither torch, Ray nor
MLflow (torch-backed names load on first use; Ray and MLflow live in
``brainalign.train.runner``, ``brainalign.studies`` and ``brainalign.tracking``).
"""

from typing import Any

from ._checks import BrainalignError
from .config import DataConfig, TrainConfig, load_config
from .data.contract import open_dataset

__version__ = "0.1.0"

__all__ = [
    "BrainalignError",
    "DataConfig",
    "SymmetricInfoNCE",
    "TrainConfig",
    "__version__",
    "load_config",
    "open_dataset",
    "topk_accuracy",
]

_LAZY = {"SymmetricInfoNCE": "losses", "topk_accuracy": "metrics"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'brainalign' has no attribute {name!r}")
