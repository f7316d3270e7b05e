"""gLocal (Muttenthaler et al., NeurIPS 2023): an affine transform of a model's base features.

The ``<backbone>:glocal`` table is computed in the same forward pass as ``<backbone>:none``
and is that table's vectors mapped through the transform, so the aligned/base pair shares
backbone, feature and preprocessing exactly.

Transform file format (what thingsvision's ``extractor.align(..., alignment_type="gLocal")``
downloads from the gLocal repository as ``transforms/<model>/<module>/transform.npz``)::

    weights  (D, D')  float   required
    bias     (D',)    float   optional (0 if absent)
    mean     (D,)     float   optional (0 if absent)   feature mean over THINGS
    std      (D,)     float   optional (1 if absent)   feature std over THINGS

    aligned = ((base - mean) / std) @ weights + bias

The transform must have been fit on exactly the features this backbone's ``:none`` table
holds (same layer, token and preprocessing); the loader checks the dimensions only. Files
live at ``<weights>/glocal/<backbone>/transform.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._checks import BrainalignError
from ._registry import OutputSpec, WeightFile

if TYPE_CHECKING:
    import torch

__all__ = ["GlocalTransform", "glocal_output", "load_glocal_transform"]


@dataclass(frozen=True)
class GlocalTransform:
    """An affine map ``((x - mean) / std) @ weights + bias`` on ``(B, D)`` features."""

    weights: np.ndarray  # (D, D')
    bias: np.ndarray  # (D',)
    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)

    @property
    def in_dim(self) -> int:
        return int(self.weights.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.weights.shape[1])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform a ``(B, in_dim)`` tensor; returns ``(B, out_dim)`` on the same device."""
        import torch

        if x.shape[-1] != self.in_dim:
            raise BrainalignError(
                f"gLocal transform expects {self.in_dim}-d features, the backbone gives {x.shape[-1]}: "
                "the transform was fit on another model or layer."
            )
        t = {
            k: torch.as_tensor(getattr(self, k), dtype=torch.float32, device=x.device)
            for k in ("weights", "bias", "mean", "std")
        }
        return ((x.float() - t["mean"]) / t["std"]) @ t["weights"] + t["bias"]


def load_glocal_transform(path: Path) -> GlocalTransform:
    """Read a gLocal ``transform.npz``; a missing key or a bad shape raises naming the file.

    Raises
    ------
    BrainalignError
        If ``weights`` is missing or not 2-D, or ``bias``/``mean``/``std`` do not fit it.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data: dict[str, Any] = {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
    except (OSError, ValueError) as e:
        raise BrainalignError(f"gLocal transform {path} is not a readable .npz file ({e}).") from e
    if "weights" not in data or data["weights"].ndim != 2:
        raise BrainalignError(
            f"gLocal transform {path} must hold a 2-D array 'weights' (D, D'); it has keys {sorted(data)}."
        )
    w = data["weights"]
    d_in, d_out = w.shape
    parts = {
        "bias": data.get("bias", np.zeros(d_out)),
        "mean": data.get("mean", np.zeros(d_in)),
        "std": data.get("std", np.ones(d_in)),
    }
    for key, want in (("bias", d_out), ("mean", d_in), ("std", d_in)):
        parts[key] = np.asarray(parts[key]).reshape(-1)
        if parts[key].size == 1:
            parts[key] = np.full(want, float(parts[key][0]))
        if parts[key].shape != (want,):
            raise BrainalignError(
                f"gLocal transform {path}: '{key}' has shape {parts[key].shape}, expected ({want},)."
            )
    if not np.all(parts["std"] > 0):
        raise BrainalignError(f"gLocal transform {path}: 'std' must be positive.")
    return GlocalTransform(weights=w, **parts)


def glocal_output(backbone: str, dim: int, base_feature: str) -> OutputSpec:
    """The ``:glocal`` output of ``backbone``, needing ``glocal/<backbone>/transform.npz``."""
    return OutputSpec(
        "glocal",
        dim,
        f"gLocal affine transform of: {base_feature}",
        weights=(
            WeightFile(
                "glocal_transform",
                (f"glocal/{backbone}/transform.npz",),
                "gLocal transform (.npz: weights (D,D'), optional bias, mean, std), fit on this backbone's "
                "base features; user-provided",
            ),
        ),
    )
