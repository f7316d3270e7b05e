"""Top-5 retrieved images of an aligned/base pair (the paper's Figs. 5-7).

For chosen test queries of one subject: the query's image, then the aligned model's top-5
retrieved images and the base model's top-5, each with the cosine similarity between the brain
embedding and the image embedding (after the loss's mean-centring), the correct image framed
in green. Galleries: ``test`` (the N test images, Fig. 5) and ``test+train`` (every catalog
image, Figs. 6-7).

Everything comes from finished runs: the ranks and top-5 lists from each run's test rankings
CSV (``retrieval/test_rankings.csv``, ``retrieval/test_rankings_<N>way.csv``); where a run lacks
the CSV of a gallery (it was tested before ``test.gallery`` existed, or without the large
gallery) or its similarities, they are recomputed from the run's checkpoint. Images come from
the catalog's ``path`` column (relative to the dataset root or absolute); a simulated dataset
without paths uses its rendered images (``brainalign embed --render-simulated``) or renders
the few it needs (:func:`brainalign.images.render.render_image`).

Queries: given by the user, drawn at random with a seed, or those where the two arms disagree
most (largest ``|log rank_aligned - log rank_base|``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import BrainalignError, check_option, check_range

__all__ = ["GALLERIES", "SELECTIONS", "GridResult", "ImageSource", "Retrieval", "image_grids", "pair_from_study",
           "select_queries"]

log = logging.getLogger(__name__)
GALLERIES = ("test", "test+train")
SELECTIONS = ("disagree", "random", "given")


@dataclass(frozen=True)
class Retrieval:
    """One query's result under one model: target rank, top-5 image ids and similarities."""

    rank: int
    top: tuple[str, ...]
    scores: tuple[float, ...]


def _read_rankings(text: str, subject: str) -> dict[str, Retrieval] | None:
    """The CSV of one run (None when it has no similarity column: an older run)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "top5_scores" not in rows[0]:
        return None
    out = {}
    for r in rows:
        if r["subject"] != subject:
            continue
        out[r["image_id"]] = Retrieval(int(r["rank"]), tuple(r["top5"].split(";")),
                                       tuple(float(v) for v in r["top5_scores"].split(";")))
    return out


def _computed(fr: Any, gallery: str) -> tuple[dict[str, Retrieval], int]:
    """Ranks and top-5 recomputed from the run's checkpoint (CPU, chunked)."""
    import torch

    from ..metrics import retrieval_ranks, retrieval_topk
    from ..train.loop import encode
    from ._runs import load_model

    lm = load_model(fr)
    pos = lm.ds.image_index()
    rows = lm.test_rows + ([pos[i] for i in lm.ds.image_ids("train")] if gallery == "test+train" else [])
    catalog = lm.ds.image_ids()
    z = encode(lm.run, torch.from_numpy(lm.test_x), torch.full((len(lm.test_ids),), lm.subject_index))
    g = lm.run.image_emb[torch.as_tensor(rows)]
    t = torch.arange(len(lm.test_ids))
    ranks = retrieval_ranks(z, g, t)
    idx, sc = retrieval_topk(z, g, t, k=5)
    return {q: Retrieval(int(ranks[i]), tuple(catalog[rows[j]] for j in idx[i].tolist()),
                         tuple(float(v) for v in sc[i].tolist())) for i, q in enumerate(lm.test_ids)}, len(rows)


def retrievals(fr: Any, gallery: str) -> tuple[dict[str, Retrieval], int]:
    """``image_id -> Retrieval`` of a finished run's subject on ``gallery``, and the gallery size."""
    from .. import tracking

    check_option("gallery", gallery, GALLERIES)
    names = [Path(p).name for p in tracking.list_artifacts(fr.run_id, "retrieval")]
    if gallery == "test":
        wanted = "test_rankings.csv" if "test_rankings.csv" in names else None
    else:
        large = sorted((n for n in names if n.startswith("test_rankings_") and n.endswith("way.csv")),
                       key=lambda n: int(n[len("test_rankings_"):-len("way.csv")]))
        wanted = large[-1] if large else None
    if wanted is not None:
        got = _read_rankings(fr.artifact(f"retrieval/{wanted}").read_text(), fr.subject)
        if got:
            n_way = int(wanted[len("test_rankings_"):-len("way.csv")]) if "way" in wanted else -1
            if n_way < 0:
                n_way = int(round(fr.record.metrics.get("test_n_way", len(got))))
            return got, n_way
    log.info("run %s: no %s rankings with similarities logged; recomputing from its checkpoint", fr.run_id, gallery)
    return _computed(fr, gallery)


class ImageSource:
    """Stimulus images of a dataset by image id (RGB ``uint8`` arrays).

    Parameters
    ----------
    root : Path
        The dataset root (holds ``images.parquet``).
    images_root : Path, optional
        Where relative catalog paths are resolved instead of the dataset root.
    """

    def __init__(self, root: Path, images_root: Path | None = None) -> None:
        from ..data.contract import open_dataset

        self.ds = open_dataset(root)
        self.base = Path(images_root) if images_root else self.ds.root
        cat = self.ds.catalog
        self.paths = dict(zip(cat.column("image_id").to_pylist(), cat.column("path").to_pylist(), strict=True))
        self._latents: dict[str, dict[str, float]] | None = None
        self._rendered: Path | None = None
        if self.ds.meta.simulated:
            from ..images.render import default_render_dir

            d = default_render_dir(self.ds.root) / "images"
            self._rendered = d if d.is_dir() else None

    def path(self, image_id: str) -> Path | None:
        """The file of ``image_id``, or None for a simulated image without one."""
        p = self.paths.get(image_id)
        if image_id not in self.paths:
            raise BrainalignError(f"image {image_id!r} is not in the catalog of {self.ds.root}.")
        if p:
            path = Path(p) if Path(p).is_absolute() else self.base / p
            if not path.is_file():
                raise BrainalignError(
                    f"image file {path} of image {image_id!r} (catalog {self.ds.root / 'images.parquet'}) does "
                    "not exist: copy the stimulus images there, or pass --images-root with the folder the "
                    "catalog paths are relative to."
                )
            return path
        if self._rendered is not None and (self._rendered / f"{image_id}.png").is_file():
            return self._rendered / f"{image_id}.png"
        if not self.ds.meta.simulated:
            raise BrainalignError(
                f"image {image_id!r} has no path in the catalog of {self.ds.root}: ingest the dataset with "
                "--images so that the catalog points at the stimulus files."
            )
        return None

    def load(self, image_id: str, size: int = 96) -> np.ndarray:
        """``(size, size, 3)`` uint8 (simulated images without files are rendered)."""
        from PIL import Image

        p = self.path(image_id)
        if p is not None:
            with Image.open(p) as im:
                return np.asarray(im.convert("RGB").resize((size, size)))
        if self._latents is None:
            from ..data.simulate import read_latents

            t = read_latents(self.ds.root).to_pylist()
            self._latents = {str(r.pop("image_id")): r for r in t}
        from ..images.render import render_image

        lat = self._latents[image_id]
        return render_image(**{k: lat[k] for k in ("hue", "saturation", "brightness", "shape", "orientation",
                                                    "size", "spatial_freq")}, side=size)


def select_queries(aligned: dict[str, Retrieval], base: dict[str, Retrieval], *, mode: str = "disagree",
                   n: int = 4, seed: int = 0, given: Sequence[str] = ()) -> list[str]:
    """Test queries to show.

    Parameters
    ----------
    aligned, base : dict
        Each arm's retrievals (``image_id -> Retrieval``).
    mode : {"disagree", "random", "given"}
        ``disagree``: largest ``|log rank_aligned - log rank_base|`` (ties by image id);
        ``random``: ``n`` drawn with ``seed``; ``given``: ``given`` as listed.
    n : int
        How many (``disagree`` and ``random``).
    """
    check_option("query selection", mode, SELECTIONS)
    common = sorted(set(aligned) & set(base))
    if not common:
        raise BrainalignError("the aligned and base runs share no test queries (different subjects or datasets?).")
    if mode == "given" or given:
        missing = [q for q in given if q not in aligned or q not in base]
        if missing:
            raise BrainalignError(
                f"queries {missing} are not test images of both runs (e.g. {common[:5]} are)."
            )
        if not given:
            raise BrainalignError("query selection 'given' needs the image ids (--queries).")
        return list(given)
    check_range("n", n, low=1)
    if mode == "random":
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(common, size=min(n, len(common)), replace=False).tolist())
    gap = {q: abs(math.log(aligned[q].rank) - math.log(base[q].rank)) for q in common}
    return sorted(common, key=lambda q: (-gap[q], q))[:n]


def draw_grid(queries: Sequence[str], aligned: dict[str, Retrieval], base: dict[str, Retrieval],
              images: ImageSource, path: Path, *, labels: tuple[str, str], title: str) -> Path:
    """One figure: per query a block of two rows (aligned top-5 above, base top-5 below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(queries)
    fig, axes = plt.subplots(2 * n, 7, figsize=(7.6, 2.4 * n + 0.4), squeeze=False,
                             gridspec_kw={"hspace": 0.45, "wspace": 0.08, "width_ratios": [1, 0.6, 1, 1, 1, 1, 1]})
    for qi, q in enumerate(queries):
        for ri, (res, lab) in enumerate(((aligned[q], labels[0]), (base[q], labels[1]))):
            row = axes[2 * qi + ri]
            ax0, axl = row[0], row[1]
            ax0.set_axis_off()
            axl.set_axis_off()
            if ri == 0:
                ax0.imshow(images.load(q))
                ax0.set_title(f"query {q}", fontsize=7)
            axl.text(0.95, 0.5, f"{lab}\nrank {res.rank}", transform=axl.transAxes, ha="right", va="center",
                     fontsize=7, color="#1f77b4" if ri == 0 else "#555555")
            for ax, img_id, s in zip(row[2:], res.top, res.scores, strict=False):
                ax.imshow(images.load(img_id))
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{s:.3f}", fontsize=7)
                hit = img_id == q
                for sp in ax.spines.values():
                    sp.set_edgecolor("#2ca02c" if hit else "#cccccc")
                    sp.set_linewidth(3 if hit else 0.5)
            for ax in row[2 + len(res.top):]:
                ax.set_axis_off()
    fig.suptitle("\n".join(textwrap.wrap(title, 95)), fontsize=7)
    from .._io import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


@dataclass
class GridResult:
    """The written figures and the queries shown."""

    files: dict[str, Path] = field(default_factory=dict)
    queries: dict[str, list[str]] = field(default_factory=dict)
    n_way: dict[str, int] = field(default_factory=dict)


def pair_from_study(name: str, *, encoder: str | None = None, backbone: str | None = None,
                    subject: str | None = None, seed: int | None = None, experiment: str | None = None,
                    study_run_id: str | None = None, uri: str | None = None) -> tuple[str, str, str]:
    """``(aligned run id, base run id, study run id)`` of one subject and seed of a study.

    Defaults: the study's first encoder and backbone, its first subject and first seed; the
    newest finished study run of ``name`` unless ``study_run_id`` is given.
    """
    from ._runs import study_runs

    sr = study_runs(name, uri, experiment=experiment, study_run_id=study_run_id)
    runs = sr.finals

    def pick(key: str, want: Any, cands: list[Any]) -> list[Any]:
        values = sorted({r.tags.get(key, "") for r in cands})
        if want is None:
            want = values[0]
        sel = [r for r in cands if r.tags.get(key) == str(want)]
        if not sel:
            raise BrainalignError(f"study {name!r} has no final run with {key} = {want!r} (it has {values}).")
        return sel

    runs = pick("brain_encoder", encoder, runs)
    runs = pick("backbone", backbone, runs)
    runs = pick("subject", subject, runs)
    runs = pick("seed", None if seed is None else str(seed), runs)
    arms = {r.tags.get("arm"): r for r in runs}
    if set(arms) != {"aligned", "base"}:
        raise BrainalignError(f"study {name!r}: expected an aligned and a base final, found {sorted(map(str, arms))}.")
    return arms["aligned"].run_id, arms["base"].run_id, sr.report.run_id


def image_grids(aligned_run: str, base_run: str, *, galleries: Sequence[str] = ("test",),
                select: str = "disagree", n: int = 4, seed: int = 0, queries: Sequence[str] = (),
                out_dir: Path | None = None, log_to: str | None = None, images_root: Path | None = None,
                uri: str | None = None) -> GridResult:
    """Top-5 image grids of a finished aligned/base pair, per gallery.

    Parameters
    ----------
    aligned_run, base_run : str
        MLflow run ids of the two finished runs (same subject and dataset).
    galleries : sequence of {"test", "test+train"}
        One figure per gallery (``grids_test.png``, ``grids_test+train.png``).
    select, n, seed, queries
        Query selection (:func:`select_queries`); the queries are chosen on the first gallery
        and shown on every gallery.
    out_dir : Path, optional
        Where the PNGs go; default ``$BRAINALIGN_HOME/reports/<study>/grids`` for runs of a
        study, else ``reports/grids/<aligned>-vs-<base>``.
    log_to : str, optional
        Run to log the PNGs to (``grids/``); default the study run the aligned run is nested
        under (a study's tested run), else the aligned run.
    images_root : Path, optional
        Folder the catalog's relative image paths are resolved against (default: the dataset root).

    Raises
    ------
    BrainalignError
        Unfinished runs, runs of different subjects or datasets, unknown queries, missing images.
    """
    from .. import paths, tracking
    from .._io import claim_dir
    from ._runs import open_run

    for g in galleries:
        check_option("gallery", g, GALLERIES)
    with tempfile.TemporaryDirectory() as tmp:
        fa = open_run(aligned_run, Path(tmp), uri)
        fb = open_run(base_run, Path(tmp), uri)
        if fa.cfg.data.path != fb.cfg.data.path or fa.subject != fb.subject:
            raise BrainalignError(
                f"runs {aligned_run} and {base_run} differ in dataset or subject ({fa.cfg.data.path} sub-{fa.subject} "
                f"vs {fb.cfg.data.path} sub-{fb.subject}): a grid compares two models on the same queries."
            )
        if fa.aligned == fb.aligned:
            log.warning("runs %s and %s are both %s; showing them as given", aligned_run, base_run, fa.arm)
        study = fa.record.tags.get("study")
        if out_dir is None:
            out_dir = (paths.home() / "reports" / study / "grids") if study else (
                paths.home() / "reports" / "grids" / f"{aligned_run[:8]}-vs-{base_run[:8]}")
        if study and out_dir == paths.home() / "reports" / study / "grids":
            claim_dir(out_dir.parent, "report")
        claim_dir(out_dir, "report")
        if log_to is None:
            parent = fa.record.tags.get("mlflow.parentRunId", "") if study else ""
            log_to = parent or aligned_run
        images = ImageSource(Path(fa.cfg.data.path), images_root)
        result = GridResult()
        chosen: list[str] | None = None
        for g in galleries:
            ra, n_way = retrievals(fa, g)
            rb, _ = retrievals(fb, g)
            if chosen is None:
                chosen = select_queries(ra, rb, mode="given" if queries else select, n=n, seed=seed, given=queries)
            for q in chosen:  # fail on a missing image before drawing anything
                images.path(q)
            why = {"disagree": "where the arms disagree most", "random": f"at random (seed {seed})",
                   "given": "chosen"}["given" if queries else select]
            title = (f"Top-5 retrieved images, {n_way}-way ({g} gallery), sub-{fa.subject}, seed {fa.seed}: "
                     f"{fa.cfg.data.image_table} (top) vs {fb.cfg.data.image_table} (bottom); queries {why}; "
                     "cosine similarity above each image, the correct image framed green")
            path = draw_grid(chosen, ra, rb, images, out_dir / f"grids_{g}.png",
                             labels=("aligned", "base"),
                             title=title)
            result.files[g] = path
            result.queries[g] = list(chosen)
            result.n_way[g] = n_way
            tracking.log_artifact(log_to, path, "grids", uri=uri)
    log.info("image grids written to %s (logged to run %s)", out_dir, log_to)
    return result
