"""``brainalign encoders``: list the brain-encoder registry (like timm's ``list_models``).

One row per encoder: name, modalities, subject-aware, parameters at a reference shape
(63 x 250 and D = 768 by default; the fMRI MLP at 15,724 voxels x 1, marked ``*``), reference.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``encoders`` command to the ``brainalign`` sub-command parsers.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``parser.add_subparsers()`` returned.

    Returns
    -------
    argparse.ArgumentParser
        The ``encoders`` parser (its handler is set with ``set_defaults(func=...)``).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "encoders",
        help="list the registered brain encoders",
        description=(
            "List the registered brain encoders with their modalities, whether they are "
            "subject-aware, their parameter count at a reference shape and their reference."
        ),
    )
    parser.add_argument(
        "action", nargs="?", choices=["list"], default="list", help="what to do (only 'list', the default)"
    )
    parser.add_argument("--n-chans", type=int, default=63, help="channels to count parameters at (63)")
    parser.add_argument("--n-times", type=int, default=250, help="samples to count parameters at (250)")
    parser.add_argument("--embed-dim", type=int, default=768, help="embedding dimension D (768)")
    parser.add_argument(
        "--n-subjects", type=int, default=10, help="training subjects for subject-aware encoders"
    )
    parser.add_argument("--names", action="store_true", help="print the names only, one per line")
    parser.set_defaults(func=_run)
    return parser


def _format_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _run(args: argparse.Namespace) -> int:
    from ..encoders import describe_encoders, list_encoders

    if args.names:
        sys.stdout.write("".join(f"{name}\n" for name in list_encoders()))
        return 0
    rows = list(
        describe_encoders(
            n_chans=args.n_chans, n_times=args.n_times, embed_dim=args.embed_dim, n_subjects=args.n_subjects
        )
    )
    shape = f"{args.n_chans}x{args.n_times}"
    header = ("name", "modalities", "subject-aware", f"params@{shape} D={args.embed_dim}", "reference")
    table: list[tuple[str, ...]] = [header]
    notes: list[str] = []
    for row in rows:
        params = _format_params(row["params"])
        if row["params"] is not None and row["shape"] != shape:
            params += "*"
            notes.append(f"* {row['name']}: counted at its own input shape {row['shape']}")
        if row["error"]:
            notes.append(f"- {row['name']}: {row['error']}")
        table.append(
            (
                row["name"],
                ",".join(row["modalities"]),
                "yes" if row["subject_aware"] else "no",
                params,
                row["reference"],
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in table]
    sys.stdout.write("\n".join(lines + notes) + "\n")
    return 0
