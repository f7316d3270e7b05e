"""brainalign: decode what a person saw from brain signals, with human-aligned image encoders.

The public surface is small and light: importing ``brainalign`` does not import Ray or
MLflow (those live in ``brainalign.train.runner``, ``brainalign.sweep`` and
``brainalign.tracking``).
"""

from ._checks import BrainalignError
from .config import DataConfig, TrainConfig, load_config
from .data.contract import open_dataset
from .losses import SymmetricInfoNCE
from .metrics import topk_accuracy

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
