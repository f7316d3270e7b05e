"""``brainalign sweep --study PATH [--resume | --fresh] [--check]``: deprecated alias of ``brainalign study``."""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("sweep", help="deprecated: use `brainalign study run|check STUDY`",
                       description="Deprecated alias: `brainalign sweep --study S` = `brainalign study run S`, "
                                   "`--check` = `brainalign study check S`.")
    p.add_argument("--study", required=True, help="study TOML (e.g. jobs/mini_study.toml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="as `study run --set`")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="require saved state and resume it")
    mode.add_argument("--fresh", action="store_true", help="discard saved state and start over")
    mode.add_argument("--check", action="store_true", help="validate the study and its data, print the plan, exit")
    p.add_argument("--quiet", action="store_true", help="no live progress view")
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from . import study

    log.warning("`brainalign sweep` is deprecated; use `brainalign study %s %s`", "check" if args.check else "run",
                args.study)
    ns = argparse.Namespace(study=args.study, study_opt=None, sets=args.sets, kind=None,
                            action="check" if args.check else "run", resume=args.resume, fresh=args.fresh,
                            quiet=args.quiet)
    return study._study(ns)
