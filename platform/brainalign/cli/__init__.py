"""The ``brainalign`` command line. The only place that parses arguments.

Each sub-module registers one command group with ``register(subparsers)``; imports of heavy
libraries (torch, Ray, MLflow) happen inside the handlers, so ``brainalign --help`` is fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from collections.abc import Sequence

from .._checks import BrainalignError
from .._io import Terminated, sigterm_as_interrupt

__all__ = ["main"]

# (module, attribute): each module's ``register(subparsers)`` adds one command.
_COMMANDS = (
    "brainalign.cli.data",
    "brainalign.cli.train",
    "brainalign.cli.encoders",
    "brainalign.cli.embed",
    "brainalign.cli.study",
    "brainalign.cli.sweep",
    "brainalign.cli.grids",
    "brainalign.cli.explain",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainalign",
        description="Brain-to-image retrieval with human-aligned image encoders, on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _COMMANDS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue  # a command group not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C (no staging folders left)
            return int(args.func(args) or 0)
    except BrainalignError as e:
        sys.stderr.write(f"brainalign: error: {e}\n")
        return 2
    except Terminated:
        sys.stderr.write("brainalign: terminated (SIGTERM); temporary files were removed.\n")
        return 143
    except KeyboardInterrupt as e:
        sys.stderr.write(f"brainalign: interrupted{f': {e}' if str(e) else ''}; temporary files were removed.\n")
        return 130
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS:
            raise
        sys.stderr.write(f"brainalign: error: {_storage_message(e)}\n")
        return 2


#: File-system errors that are the user's environment, not a bug: said in one line.
_STORAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                   errno.EEXIST, errno.EISDIR}


def _storage_message(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    return (
        f"cannot write{where}: {e.strerror or e}. Point BRAINALIGN_HOME (stores: mlruns/, ray_results/, "
        "reports/), BRAINALIGN_CACHE (prepared data) or the output path at a writable folder with free space "
        "(docs/operations.md)."
    )
