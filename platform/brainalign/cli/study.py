"""``brainalign study run|check|report|status STUDY [--set KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

_HELP = {
    "run": "run or resume the study (searches, tested runs, report)",
    "check": "validate the study, its search spaces and its data; print the plan",
    "report": "re-render the report from MLflow (finished or partly finished study)",
    "status": "what is done, running, pruned and failed, from MLflow",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", nargs="?", default=None, help="study TOML (e.g. jobs/mini_study.toml)")
    p.add_argument("--study", dest="study_opt", default=None, metavar="STUDY", help="the study TOML, as an option")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override: study.<key>=... / resources.<key>=... edit those tables, any other key is a "
                        "TrainConfig key (e.g. --set study.final_seeds=[1] --set lr=1e-3); repeatable")
    p.add_argument("--kind", default=None, help="refuse a study of another kind (e.g. cross_subject)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "study", help="run, check, report or inspect a study (sweep, cross_subject)",
        description="Studies (format: docs/sweep.md). An interrupted study resumes when run again: finished "
                    "searches and tested runs are neither repeated nor logged twice.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in _HELP.items():
        q = actions.add_parser(action, help=text, description=text)
        _add_common(q)
        if action == "run":
            mode = q.add_mutually_exclusive_group()
            mode.add_argument("--resume", action="store_true", help="require saved state and resume it")
            mode.add_argument("--fresh", action="store_true", help="discard saved state and start over")
            q.add_argument("--quiet", action="store_true", help="no live progress view")
        q.set_defaults(func=_study)


def _load(args: argparse.Namespace) -> Any:
    from .._checks import BrainalignError, check_option
    from ..studies import load_study

    path = args.study or args.study_opt
    if path is None or (args.study and args.study_opt):
        raise BrainalignError("name one study file: `brainalign study ACTION STUDY` (or --study STUDY).")
    study = load_study(path, args.sets)
    if args.kind is not None:
        check_option(f"study kind of {path} (--kind {args.kind})", study.kind, [args.kind])
    return study


def _study(args: argparse.Namespace) -> int:
    study = _load(args)
    out = sys.stdout
    if args.action == "status":
        from ..studies import study_status

        out.write("\n".join(study_status(study)) + "\n")
        return 0
    if args.action == "report":
        from ..studies import render_report

        rep = render_report(study)
        out.write(rep.markdown + f"\nreport files: {rep.files['table.md'].parent}\n")
        return 0
    from ..studies import check_study

    if args.action == "check":
        plan = check_study(study)
        out.write("\n".join(plan.describe()) + "\n")
        out.write(f"dataset {study.dataset_path}: subjects, tables and encoders check out\n")
        return 0
    return run(study, mode="resume" if args.resume else "fresh" if args.fresh else "auto", quiet=args.quiet)


def run(study: Any, *, mode: str, quiet: bool) -> int:
    """``study run``: run, then print the report and where everything is (130 if stopped)."""
    from ..studies import make_plan, run_study

    out = sys.stdout
    plan = make_plan(study)
    out.write("\n".join(plan.describe()) + "\n")
    out.flush()
    try:
        res = run_study(study, mode=mode, live=not quiet, plan=plan)
    except KeyboardInterrupt as e:
        sys.stderr.write(f"brainalign: interrupted: {e or 'Ctrl-C'}; the study's running MLflow runs are marked "
                         "KILLED.\nResume with the same command.\n")
        return 130
    out.write("\n" + res.report.markdown + "\n")
    out.write(f"report files: {res.report.files['table.md'].parent}\n")
    out.write(f"MLflow: experiment {res.experiment!r}, study run {res.study_run_id} (artifacts under report/)\n")
    out.write(f"wall time: {res.seconds / 60:.1f} min\n")
    out.write("Open the MLflow UI with:  make mlflow-ui   (then http://127.0.0.1:5000)\n")
    return 0
