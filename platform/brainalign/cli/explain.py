"""``brainalign explain --run RUN_ID | --study STUDY``: gradient analysis of finished runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help="gradient analysis (Grad-CAM, integrated gradients) of finished runs: temporal, spectral, spatial",
        description=(
            "Attributions of each test trial's similarity to its image embedding, for a finished run or every "
            "final of a finished study; the study's aligned and base arms compared per subject (paired t, "
            "Holm). Tables go to each run's MLflow artifacts (explain/); for a study the figures, statistics "
            "and explain.md go to its study run and to reports/<study>/explain/ (docs/analyses.md)."
        ),
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="MLflow run id of a finished run (a final, or brainalign train)")
    what.add_argument("--study", help="study file or name of a finished study")
    p.add_argument("--methods", default="gradcam,ig", help="comma-separated: gradcam, ig (default both)")
    p.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps (default 32)")
    p.set_defaults(func=_explain)


def _explain(args: argparse.Namespace) -> int:
    from ..analysis.explain import explain_run, explain_study

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = sys.stdout
    if args.run:
        r = explain_run(args.run, methods=methods, ig_steps=args.ig_steps)
        out.write(f"run {r.run_id}: {r.encoder} {r.table} sub-{r.subject} seed {r.seed} ({r.seconds:.1f} s)\n")
        for m, v in r.views.items():
            out.write(f"  {m}: " + ", ".join(f"{k} {val:.4g}" for k, val in v.summary.items()) + "\n")
        out.write("tables logged to the run's artifacts under explain/\n")
        return 0
    from ._study_ref import study_ref

    ref = study_ref(args.study)
    res = explain_study(ref.name, methods=methods, ig_steps=args.ig_steps, experiment=ref.experiment,
                        study_run_id=ref.study_run_id)
    out.write(res.markdown + "\n")
    out.write(f"files: {res.files['explain.md'].parent}  ({len(res.runs)} runs, {res.seconds:.0f} s)\n")
    return 0
