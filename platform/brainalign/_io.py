"""Atomic writes, ownership markers, staging clean-up and content fingerprints.

Every file or directory the platform produces is first written under a temporary name in
the same directory and then renamed into place, so an interrupted write never leaves a
half-written result where a reader (or a resumed run) would take it for a finished one.

Ownership
---------
A folder this tool creates carries a small marker file, :data:`OWNER_FILE`
(``.brainalign-owned``, JSON ``{"kind": ...}``) naming what it is (:data:`KINDS`). Only a
folder whose marker names the *same* kind is ever replaced or removed
(:func:`remove_owned`, ``atomic_dir(..., replace=True)``); writing into a non-empty folder
that is not ours is refused (:func:`claim_dir`). So ``--fresh``, ``--replace`` and ``--out``
can never delete a user's data, a dataset by a render, or ``$BRAINALIGN_HOME`` by a study
named ``..``.

Staging
-------
Temporary folders (``.<name>.tmp-*``) carry a second marker, :data:`STAGING_FILE`, with the
writing process's host, pid and start time. They are removed when the write fails or is
interrupted (SIGTERM included, see :func:`sigterm_as_interrupt`), and a later write next to
them removes those whose process is gone (:func:`sweep_stale`): never a folder without our
marker, never one a live process is still writing.

Permissions follow the umask: temporary folders and files are created private by
``tempfile`` (0700/0600) and opened up to ``0777 & ~umask`` / ``0666 & ~umask`` before they
are renamed into place, so a lab's shared data folder stays readable to colleagues.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ._checks import BrainalignError, check_option

__all__ = [
    "KINDS",
    "OWNER_FILE",
    "STAGING_FILE",
    "Terminated",
    "atomic_dir",
    "atomic_file",
    "check_writable",
    "claim_dir",
    "mark_owned",
    "mark_staging",
    "owned_kind",
    "remove_owned",
    "sha256_file",
    "sigterm_as_interrupt",
    "sweep_stale",
    "write_json_atomic",
]

log = logging.getLogger(__name__)

#: Marker file naming the kind of a folder this tool created.
OWNER_FILE = ".brainalign-owned"
#: Marker file of a temporary (staging) folder: who is writing it.
STAGING_FILE = ".brainalign-staging"
#: The kinds of folders brainalign creates (the ``kind`` of :data:`OWNER_FILE`).
KINDS: dict[str, str] = {
    "dataset": "a dataset root in the data contract (simulate, ingest)",
    "images": "rendered images and their catalog (embed --render-simulated)",
    "prepared": "prepared training data under $BRAINALIGN_CACHE/prepared",
    "study-storage": "a study's Ray storage folder (Tune experiments, sweep state)",
    "report": "a study report folder under $BRAINALIGN_HOME/reports",
    "ingest-staging": "per-subject staging of an ingest (beside its --out)",
    "tables": "a folder of embedding tables (<backbone>__<alignment>.parquet)",
}
#: A staging folder whose writer cannot be checked (another host) is stale after this long.
STALE_AFTER_S = 2 * 24 * 3600.0


# --------------------------------------------------------------------------- permissions
def current_umask() -> int:
    """The process umask (read without changing it where ``/proc`` allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # no /proc: the classic set-and-restore
    os.umask(old)
    return old


def _open_up(path: Path, *, directory: bool) -> None:
    """Give a ``tempfile`` folder/file the mode a plain ``mkdir``/``open`` would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def check_writable(folder: Path, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, or raise a message.

    Parameters
    ----------
    folder : Path
        The folder.
    what : str
        What it is and how to change it, e.g. ``"the cache ($BRAINALIGN_CACHE)"``.

    Raises
    ------
    BrainalignError
        The folder cannot be created or written (permissions, read-only file system, full disk).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".brainalign-write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise BrainalignError(
            f"{what} {folder} is not writable ({e.strerror or e}); point it at a writable folder with free space."
        ) from e
    return folder


# --------------------------------------------------------------------------- ownership
def mark_owned(folder: Path, kind: str) -> None:
    """Write :data:`OWNER_FILE` naming ``kind`` into ``folder`` (which must exist)."""
    check_option("folder kind", kind, list(KINDS))
    doc = {"kind": kind, "tool": "brainalign"}  # no time stamp: identical inputs give identical folders
    (Path(folder) / OWNER_FILE).write_text(json.dumps(doc, sort_keys=True) + "\n")


def _legacy_kind(folder: Path) -> str | None:
    """The kind of a folder written before markers existed, recognised by its own files."""
    if (folder / "dataset.json").is_file():
        try:
            doc = json.loads((folder / "dataset.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(doc, dict) and "contract_version" in doc and "meta" in doc:
            return "dataset"
    if (folder / "sweep_state.json").is_file():
        try:
            doc = json.loads((folder / "sweep_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(doc, dict) and doc.get("study") == folder.name:
            return "study-storage"
    if (folder / "render.json").is_file() and (folder / "images.parquet").is_file():
        return "images"
    if (folder / "prepared.json").is_file() and (folder / "train").is_dir():
        return "prepared"
    children = [c for c in folder.iterdir() if not c.name.startswith(".")]
    if children and all(c.is_file() and re.fullmatch(r"[^_].*__.+\.parquet", c.name) for c in children):
        return "tables"  # e.g. a dataset's embeddings/ folder
    if re.fullmatch(r"\..+\.ingest-[0-9a-f]{16}", folder.name):
        subs = list(folder.iterdir())
        if subs and all(c.is_dir() and c.name.startswith(("sub-", ".sub-")) for c in subs):
            return "ingest-staging"
    return None


def owned_kind(folder: Path) -> str | None:
    """The kind of ``folder`` if brainalign created it, else None.

    Read from :data:`OWNER_FILE`; folders written before markers existed are recognised by
    their own bookkeeping files (a dataset's ``dataset.json``, a study's ``sweep_state.json``,
    a render's ``render.json``, a folder holding only ``<backbone>__<alignment>.parquet`` tables).
    """
    folder = Path(folder)
    marker = folder / OWNER_FILE
    if marker.is_file():
        try:
            doc = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        kind = doc.get("kind") if isinstance(doc, dict) else None
        return kind if isinstance(kind, str) else None
    return _legacy_kind(folder) if folder.is_dir() else None


def _is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())


def _not_ours(folder: Path, kind: str, action: str) -> BrainalignError:
    found = owned_kind(folder)
    what = (
        f"it holds a brainalign {found!r} folder, not {KINDS[kind]}"
        if found
        else "it is not empty and has no brainalign marker, so brainalign did not create it"
    )
    return BrainalignError(
        f"refusing to {action} {folder}: {what}. Choose another (new or empty) folder, or remove or "
        "rename this one yourself if you are sure it may go."
    )


def claim_dir(folder: Path, kind: str) -> Path:
    """An output folder of ``kind`` to write files into, created and marked if needed.

    Parameters
    ----------
    folder : Path
        The folder (created with its parents when missing).
    kind : str
        One of :data:`KINDS`.

    Returns
    -------
    Path
        ``folder``.

    Raises
    ------
    BrainalignError
        ``folder`` exists and is a file, or is not empty and does not carry our marker of
        ``kind`` (brainalign never writes into someone else's folder).
    """
    check_option("folder kind", kind, list(KINDS))
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BrainalignError(f"{folder} is a file; expected a folder for {KINDS[kind]}.")
    if folder.is_dir():
        found = owned_kind(folder)
        if found == kind:
            if not (folder / OWNER_FILE).is_file():
                mark_owned(folder, kind)  # a legacy folder of ours: mark it now
            return folder
        if not _is_empty_dir(folder):
            raise _not_ours(folder, kind, "write into")
    folder.mkdir(parents=True, exist_ok=True)
    mark_owned(folder, kind)
    return folder


def remove_owned(folder: Path, kind: str) -> bool:
    """Delete ``folder`` if (and only if) it carries our marker of ``kind``.

    Returns
    -------
    bool
        True if something was removed, False if ``folder`` did not exist.

    Raises
    ------
    BrainalignError
        ``folder`` exists but is not a brainalign folder of ``kind`` (an empty folder is
        removed too: it holds nothing).
    """
    check_option("folder kind", kind, list(KINDS))
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return False
    if folder.is_symlink() or not folder.is_dir():
        raise BrainalignError(f"refusing to remove {folder}: it is not a folder brainalign created.")
    if owned_kind(folder) != kind and not _is_empty_dir(folder):
        raise _not_ours(folder, kind, "remove")
    shutil.rmtree(folder)
    return True


# --------------------------------------------------------------------------- staging
def _start_time(pid: int) -> str:
    """A process's start time (``/proc/<pid>/stat`` field 22), "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def _staging_doc() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid), "time": time.time()}


def mark_staging(folder: Path) -> None:
    """Write :data:`STAGING_FILE` into ``folder``: this process (host, pid, start time) is
    writing it, so :func:`sweep_stale` leaves it alone while the process lives."""
    (Path(folder) / STAGING_FILE).write_text(json.dumps(_staging_doc()) + "\n")


def _writer_alive(doc: dict[str, Any]) -> bool:
    """Whether the process that wrote a staging marker may still be writing."""
    if doc.get("host") != socket.gethostname():
        return time.time() - float(doc.get("time", 0.0)) < STALE_AFTER_S
    pid = int(doc.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    start = doc.get("start")
    return not start or _start_time(pid) in ("", start)  # a recycled pid is another process


def sweep_stale(parent: Path, pattern: str, *, exclude: Iterable[Path] = ()) -> list[Path]:
    """Remove our staging folders matching ``pattern`` in ``parent`` whose writer is gone.

    Only folders that carry :data:`STAGING_FILE` (or, for ``.old-<pid>`` folders of a
    replace, :data:`OWNER_FILE` and a dead pid) are touched; anything else matching the
    pattern is only reported. Returns the removed folders.
    """
    removed: list[Path] = []
    parent = Path(parent)
    skip = {Path(x).resolve() for x in exclude}
    if not parent.is_dir():
        return removed
    for p in sorted(parent.glob(pattern)):
        if not p.is_dir() or p.is_symlink() or p.resolve() in skip:
            continue
        stale = False
        staging = p / STAGING_FILE
        if staging.is_file():
            try:
                stale = not _writer_alive(json.loads(staging.read_text()))
            except (OSError, ValueError, TypeError):
                stale = False
        elif ".old-" in p.name and (p / OWNER_FILE).is_file():
            pid = p.name.rsplit("-", 1)[-1]
            stale = pid.isdigit() and not _writer_alive(
                {"host": socket.gethostname(), "pid": int(pid), "start": ""}
            )
        else:
            log.warning("%s looks like an interrupted write but carries no brainalign staging marker; "
                        "left alone (delete it yourself if it is a leftover)", p)
        if stale:
            log.info("removing %s, left behind by an interrupted brainalign write", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (see
    :func:`sigterm_as_interrupt`): an interruption, handled like Ctrl-C (clean-up runs,
    MLflow runs end KILLED)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` inside the block (main thread only).

    Python's default SIGTERM action ends the process at once, skipping every ``finally``:
    temporary folders of an interrupted write would stay behind. With this, clean-up runs
    exactly as for Ctrl-C. The previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- atomic writes
def _raced(final: Path) -> BrainalignError:
    return BrainalignError(
        f"{final} was written by another process while this one was writing it; nothing of this run "
        "was kept. Check what the other process wrote, or use another output path."
    )


@contextlib.contextmanager
def atomic_dir(final: Path, *, kind: str, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``final`` when the block succeeds.

    Parameters
    ----------
    final : Path
        The folder to create.
    kind : str
        What it is (one of :data:`KINDS`); ``final`` gets the :data:`OWNER_FILE` marker.
    replace : bool
        Swap out an existing ``final``, but only one that carries our marker of the same
        ``kind`` (or is empty), and only after the new one is complete.

    Raises
    ------
    BrainalignError
        ``final`` exists and ``replace`` is False, or it is not ours to replace (checked
        before and after the block), or another process wrote ``final`` meanwhile.

    Notes
    -----
    On an exception (Ctrl-C and SIGTERM under :func:`sigterm_as_interrupt` included) the
    temporary directory is removed and ``final`` is untouched. Temporary folders of
    interrupted writes by processes that are gone are removed here first (:func:`sweep_stale`).
    """
    check_option("folder kind", kind, list(KINDS))
    final = Path(final)
    if final.exists() and not replace:
        raise BrainalignError(f"{final} already exists; refusing to overwrite it (choose another path).")
    if replace and final.exists() and owned_kind(final) != kind and not _is_empty_dir(final):
        raise _not_ours(final, kind, "replace")
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final.parent, f".{final.name}.tmp-*")
    sweep_stale(final.parent, f".{final.name}.old-*")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _open_up(tmp, directory=True)
        mark_staging(tmp)
        mark_owned(tmp, kind)
        yield tmp
        (tmp / STAGING_FILE).unlink(missing_ok=True)
        if final.exists() or final.is_symlink():
            if not replace:
                raise BrainalignError(
                    f"{final} already exists (written by another process meanwhile?); refusing to overwrite it."
                )
            if owned_kind(final) != kind and not _is_empty_dir(final):
                raise _not_ours(final, kind, "replace")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            try:
                final.rename(old)
                moved = True
            except FileNotFoundError:  # another writer moved it away just now
                moved = False
            try:
                tmp.rename(final)
            except OSError as e:
                if moved and not final.exists():
                    old.rename(final)  # put it back
                raise _raced(final) from e
            if moved:
                shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(final)
            except OSError as e:  # a non-empty final appeared between the check and the rename
                raise _raced(final) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; it replaces ``final`` when the block succeeds.

    The file gets the mode a plain ``open()`` would give it (``0666 & ~umask``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _open_up(tmp, directory=False)
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

