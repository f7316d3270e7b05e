"""``brainalign sweep --study PATH [--resume | --fresh] [--check]``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a study: per-arm Tune+Optuna searches, multi-seed finals, aligned-vs-base report",
        description=(
            "Run the study in --study (format: docs/sweep.md). An interrupted sweep resumes when run "
            "again: finished searches and finals are neither repeated nor logged twice."
        ),
    )
    p.add_argument("--study", required=True, help="study TOML (e.g. jobs/mini_study.toml)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="require saved state and resume it")
    mode.add_argument("--fresh", action="store_true", help="discard saved state and start over")
    mode.add_argument("--check", action="store_true", help="validate the study and its data, print the plan, exit")
    p.add_argument("--quiet", action="store_true", help="no Tune status tables")
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from ..sweep import load_study

    study = load_study(args.study)
    out = sys.stdout
    n = study.n_runs()
    plan = (
        f"study {study.name}: {len(study.encoders)} encoder(s) x {len(study.pairs)} pair(s) = {n['searches']} "
        f"searches of {study.trials} trials (<= {study.max_epochs} epochs, ASHA grace {study.grace_period}) on "
        f"sub-{study.search_subject}; {n['finals']} finals ({len(study.subjects)} subjects x "
        f"{len(study.final_seeds)} seeds per arm)\n"
    )
    out.write(plan)
    if args.check:
        from ..sweep import ensure_dataset, validate_data

        if study.dataset_path.exists() or study.simulate is None:
            validate_data(study)
            out.write(f"dataset {study.dataset_path}: subjects, tables and encoders check out\n")
        else:
            ensure_dataset(study)  # checks the simulated subjects/tables, then simulates
            validate_data(study)
            out.write(f"dataset {study.dataset_path} simulated; subjects, tables and encoders check out\n")
        return 0
    from ..sweep import run_study

    mode = "resume" if args.resume else "fresh" if args.fresh else "auto"
    try:
        res = run_study(study, mode=mode, verbose=0 if args.quiet else 1)
    except KeyboardInterrupt as e:
        sys.stderr.write(f"brainalign: interrupted: {e or 'Ctrl-C'}\n"
                         f"Resume with the same command: brainalign sweep --study {args.study}\n")
        return 130
    out.write("\n" + res.report.markdown + "\n")
    out.write(f"report files: {res.report.files['table.md'].parent}\n")
    out.write(f"MLflow: experiment {res.experiment!r}, study run {res.parent_run_id} (artifacts under report/)\n")
    out.write(f"wall time: {res.seconds / 60:.1f} min\n")
    out.write("Open the MLflow UI with:  make mlflow-ui   (then http://127.0.0.1:5000)\n")
    return 0
