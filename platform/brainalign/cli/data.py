"""``brainalign data simulate|validate|ingest``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("data", help="create, ingest and validate datasets in the brainalign contract")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    s = dsub.add_parser("simulate", help="write a simulated Things-EEG2 / THINGS-MEG / NSD dataset (known ground truth)")
    s.add_argument("--preset", default="mini",
                   help="tiny | mini | full | meg | meg-mini | fmri | fmri-mini (default: mini; docs/simulator.md)")
    s.add_argument("--out", required=True, type=Path, help="dataset root to write")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--null", action="store_true", help="aligned and base tables identical in distribution")
    s.add_argument("--replace", action="store_true", help="replace an existing dataset with other parameters")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override simulator parameters")
    s.set_defaults(func=_simulate)

    v = dsub.add_parser("validate", help="check a dataset against the contract; lists every problem")
    v.add_argument("path", type=Path)
    v.add_argument("--no-hashes", action="store_true", help="skip re-hashing files (faster)")
    v.set_defaults(func=_validate)

    try:
        from .ingest import register_ingest
    except ModuleNotFoundError as e:
        if e.name != "brainalign.cli.ingest":
            raise
    else:
        register_ingest(dsub)


def _simulate(args: argparse.Namespace) -> int:
    from ..config import parse_overrides
    from ..data.simulate import simulate_dataset

    overrides: dict[str, Any] = {}
    for k, v in parse_overrides(args.set).items():
        try:
            overrides[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            overrides[k] = v
    out = simulate_dataset(args.out, args.preset, seed=args.seed, null=args.null,
                           overrides=overrides or None, replace=args.replace)
    sys.stdout.write(f"dataset: {out}\n")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ..data.validate import validate_dataset

    problems = validate_dataset(args.path, check_hashes=not args.no_hashes)
    if not problems:
        sys.stdout.write(f"{args.path}: valid\n")
        return 0
    sys.stdout.write(f"{args.path}: {len(problems)} problem(s)\n")
    for p in problems:
        sys.stdout.write(f"  - {p}\n")
    return 1
