"""Where things live. The only module that reads path-like environment variables.

Every key is declared here with its meaning (MNE's ``_known_config_types``); the rest of
the package asks this module and never builds a store path itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ._checks import BrainalignError

__all__ = [
    "KNOWN_ENV",
    "Locations",
    "cache_dir",
    "home",
    "mlflow_tracking_uri",
    "ray_storage",
    "resolve",
    "weights_dir",
]

KNOWN_ENV: dict[str, str] = {
    "BRAINALIGN_HOME": "root for local stores: data/, mlruns/, ray_results/, cache/ (default: cwd)",
    "BRAINALIGN_CACHE": "derived training data (prepared Parquet) (default: $BRAINALIGN_HOME/cache)",
    "BRAINALIGN_WEIGHTS": "directory holding image-encoder weights (no downloads ever happen)",
    "MLFLOW_TRACKING_URI": "MLflow server or store (default: sqlite:///$BRAINALIGN_HOME/mlruns/mlflow.db)",
    "BRAINALIGN_RAY_STORAGE": "Ray Train/Tune storage_path (default: $BRAINALIGN_HOME/ray_results)",
}


def home() -> Path:
    """The local root for stores (absolute)."""
    return Path(os.environ.get("BRAINALIGN_HOME") or os.getcwd()).resolve()


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def resolve(path: str | os.PathLike[str], what: str = "") -> Path:
    """An absolute path: relative paths are taken against :func:`home`.

    Raises
    ------
    BrainalignError
        ``path`` is a URI (``s3://...``): stores and datasets are filesystem paths (a shared
        filesystem on a cluster). ``Path`` would otherwise turn ``s3://b/x`` into a local
        folder ``s3:/b/x`` under ``$BRAINALIGN_HOME``, silently.
    """
    if _URI.match(os.fspath(path)):
        raise BrainalignError(
            f"{what or 'a path'} is the URI {os.fspath(path)!r}; brainalign reads datasets and writes its stores "
            "(cache, Ray storage) through filesystem paths only, object storage (s3://, gs://) is not supported "
            "yet. On a cluster, use a shared filesystem mounted at the same path on every node (docs/cluster.md, "
            "\"Storage on more than one node\")."
        )
    p = Path(path).expanduser()
    return p if p.is_absolute() else (home() / p).resolve()


def cache_dir() -> Path:
    return resolve(os.environ.get("BRAINALIGN_CACHE") or home() / "cache", "BRAINALIGN_CACHE")


def ray_storage() -> Path:
    return resolve(os.environ.get("BRAINALIGN_RAY_STORAGE") or home() / "ray_results", "BRAINALIGN_RAY_STORAGE")


def mlflow_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store under ``$BRAINALIGN_HOME/mlruns``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home() / 'mlruns' / 'mlflow.db'}"


def mlflow_artifact_root() -> Path:
    """Absolute artifact root for experiments created in the local SQLite store."""
    return home() / "mlruns" / "artifacts"


def weights_dir() -> Path | None:
    """``BRAINALIGN_WEIGHTS`` as an absolute path, or None when unset (no default: weights are
    never downloaded, the user names where they are)."""
    value = os.environ.get("BRAINALIGN_WEIGHTS")
    return resolve(value, "BRAINALIGN_WEIGHTS") if value else None


@dataclass(frozen=True)
class Locations:
    """The stores one run uses, resolved once in the driver and handed to Ray processes.

    A Tune trial or a Train worker never reads these variables from its own environment (a
    long-running cluster may have been started with another ``$BRAINALIGN_HOME``, and Tune
    runs trials in their own working directories): the driver resolves them here and they
    travel with the run. On a cluster they must name shared storage.

    Parameters
    ----------
    cache : str
        Prepared training data and validation markers (:func:`cache_dir`).
    ray_storage : str
        Ray Train/Tune ``storage_path`` (:func:`ray_storage`).
    tracking_uri : str
        MLflow tracking URI (:func:`mlflow_tracking_uri`).
    """

    cache: str
    ray_storage: str
    tracking_uri: str

    @classmethod
    def current(cls) -> Locations:
        """The locations this process's environment names (all absolute)."""
        return cls(cache=str(cache_dir()), ray_storage=str(ray_storage()), tracking_uri=mlflow_tracking_uri())
