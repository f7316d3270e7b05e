"""``brainalign grids``: top-5 retrieved images of a finished aligned/base pair (Figs. 5-7)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "grids",
        help="top-5 retrieved images of an aligned/base pair of finished runs, with cosine similarities",
        description=(
            "For test queries of one subject: the query image, the aligned and the base model's top-5 "
            "retrieved images and their cosine similarities, on the test and/or test+train gallery. Give "
            "two runs, or a finished study (and optionally encoder/backbone/subject/seed). PNGs go to "
            "reports/<study>/grids/ and to the study run's MLflow artifacts (grids/)."
        ),
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--study", help="study file or name of a finished study")
    what.add_argument("--aligned", help="MLflow run id of the aligned run (with --base)")
    p.add_argument("--base", help="MLflow run id of the base run (with --aligned)")
    p.add_argument("--encoder", help="study only: brain encoder (default: the first)")
    p.add_argument("--backbone", help="study only: backbone (default: the first)")
    p.add_argument("--subject", help="study only: subject (default: the first)")
    p.add_argument("--seed", type=int, help="study only: final seed (default: the first)")
    p.add_argument("--gallery", default="test,test+train",
                   help="comma-separated galleries: test, test+train (default both)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--queries", help="comma-separated test image ids to show")
    sel.add_argument("--random", type=int, metavar="N", help="N queries at random (with --query-seed)")
    sel.add_argument("--disagree", type=int, metavar="N", help="N queries where the arms disagree most (default 4)")
    p.add_argument("--query-seed", type=int, default=0, help="seed of --random (default 0)")
    p.add_argument("--images-root", type=Path, help="folder the catalog's relative image paths are under")
    p.add_argument("--out", type=Path, help="output folder (default reports/<study>/grids)")
    p.set_defaults(func=_grids)


def _grids(args: argparse.Namespace) -> int:
    from .._checks import BrainalignError
    from ..analysis.grids import image_grids, pair_from_study

    if args.aligned and not args.base:
        raise BrainalignError("--aligned needs --base (the run of the same subject trained on the base table).")
    if args.study:
        from ._study_ref import study_ref

        ref = study_ref(args.study)
        aligned, base, report = pair_from_study(ref.name, encoder=args.encoder, backbone=args.backbone,
                                                subject=args.subject, seed=args.seed, experiment=ref.experiment,
                                                study_run_id=ref.study_run_id)
    else:
        aligned, base, report = args.aligned, args.base, None
    if args.queries:
        select, n, given = "given", 0, [q.strip() for q in args.queries.split(",") if q.strip()]
    elif args.random:
        select, n, given = "random", args.random, []
    else:
        select, n, given = "disagree", args.disagree or 4, []
    res = image_grids(aligned, base, galleries=[g.strip() for g in args.gallery.split(",") if g.strip()],
                      select=select, n=n, seed=args.query_seed, queries=given, out_dir=args.out, log_to=report,
                      images_root=args.images_root)
    for g, f in res.files.items():
        sys.stdout.write(f"{g} gallery ({res.n_way[g]}-way): {f}  queries {', '.join(res.queries[g])}\n")
    return 0
