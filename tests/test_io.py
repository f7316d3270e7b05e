"""Ownership markers, atomic writes, staging clean-up and permissions (brainalign._io)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brainalign import BrainalignError
from brainalign._io import (
    OWNER_FILE,
    STAGING_FILE,
    atomic_dir,
    atomic_file,
    check_writable,
    claim_dir,
    mark_owned,
    owned_kind,
    remove_owned,
    sigterm_as_interrupt,
    sweep_stale,
)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- ownership
def test_claim_dir_creates_marks_and_refuses_folders_that_are_not_ours(tmp_path: Path) -> None:
    out = claim_dir(tmp_path / "reports" / "s", "report")
    assert owned_kind(out) == "report" and json.loads((out / OWNER_FILE).read_text())["kind"] == "report"
    (out / "table.md").write_text("x")
    assert claim_dir(out, "report") == out  # ours: fine again
    with pytest.raises(BrainalignError, match=r"refusing to write into .*brainalign 'report' folder"):
        claim_dir(out, "images")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("precious")
    with pytest.raises(BrainalignError, match="not empty and has no brainalign marker"):
        claim_dir(theirs, "report")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert owned_kind(claim_dir(empty, "report")) == "report"


def test_remove_owned_only_removes_a_folder_of_the_same_kind(tmp_path: Path) -> None:
    theirs = tmp_path / "ray_results"
    theirs.mkdir()
    (theirs / "data.bin").write_text("x")
    with pytest.raises(BrainalignError, match="refusing to remove"):
        remove_owned(theirs, "study-storage")
    assert (theirs / "data.bin").exists()
    ours = claim_dir(tmp_path / "study", "study-storage")
    with pytest.raises(BrainalignError, match="brainalign 'study-storage' folder"):
        remove_owned(ours, "dataset")
    assert remove_owned(ours, "study-storage") and not ours.exists()
    assert remove_owned(tmp_path / "missing", "study-storage") is False


def test_atomic_dir_replaces_only_its_own_kind(tmp_path: Path) -> None:
    dataset = tmp_path / "D"
    with atomic_dir(dataset, kind="dataset") as tmp:
        (tmp / "dataset.json").write_text("{}")
    assert owned_kind(dataset) == "dataset" and not (dataset / STAGING_FILE).exists()
    with pytest.raises(BrainalignError, match=r"refusing to replace .*'dataset' folder"):
        with atomic_dir(dataset, kind="images", replace=True) as tmp:
            pytest.fail("the block must not run")  # refused before any work
    assert (dataset / "dataset.json").exists()
    with atomic_dir(dataset, kind="dataset", replace=True) as tmp:
        (tmp / "new").write_text("1")
    assert (dataset / "new").exists() and not (dataset / "dataset.json").exists()
    with pytest.raises(BrainalignError, match="already exists; refusing to overwrite"):
        with atomic_dir(dataset, kind="dataset"):
            pytest.fail("the block must not run")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_legacy_dataset_without_marker_is_recognised_by_its_manifest(tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"contract_version": 1, "meta": {}, "files": {}}))
    assert owned_kind(root) == "dataset"
    (root / "dataset.json").write_text("{}")  # any JSON file is not enough
    assert owned_kind(root) is None


# --------------------------------------------------------------------------- permissions
def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d", kind="dataset") as tmp:
            (tmp / "f").write_text("x")
        with atomic_file(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755  # tempfile alone gives 0700
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644  # tempfile alone gives 0600


def test_check_writable_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(BrainalignError, match=r"the cache .*file/cache is not writable"):
        check_writable(tmp_path / "file" / "cache", "the cache")
    assert check_writable(tmp_path / "ok", "x").is_dir()


# --------------------------------------------------------------------------- staging
def test_a_failed_block_leaves_no_temporary_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "D", kind="dataset") as tmp:
            (tmp / "part").write_text("x" * 1000)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_of_dead_writers_is_swept_never_others(tmp_path: Path) -> None:
    dead = tmp_path / ".D.tmp-dead"
    dead.mkdir()
    (dead / STAGING_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "start": "x",
                                                 "time": time.time()}))
    alive = tmp_path / ".D.tmp-alive"
    alive.mkdir()
    (alive / STAGING_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "start": "", "time": time.time()}))
    foreign = tmp_path / ".D.tmp-foreign"  # the pattern, but no marker: not provably ours
    foreign.mkdir()
    old_other_host = tmp_path / ".D.tmp-remote"
    old_other_host.mkdir()
    (old_other_host / STAGING_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0.0}))
    replaced = tmp_path / f".D.old-{_dead_pid()}"
    replaced.mkdir()
    mark_owned(replaced, "dataset")
    with atomic_dir(tmp_path / "D", kind="dataset") as tmp:  # the next write sweeps first
        (tmp / "x").write_text("1")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".D.tmp-alive", ".D.tmp-foreign", "D"]
    assert sweep_stale(tmp_path, ".D.tmp-*") == []


def test_sigterm_during_a_write_removes_the_temporary_folder(tmp_path: Path) -> None:
    code = (
        "import time, pathlib, sys\n"
        "from brainalign._io import atomic_dir, sigterm_as_interrupt\n"
        "with sigterm_as_interrupt():\n"
        f"    with atomic_dir(pathlib.Path({str(tmp_path / 'D')!r}), kind='dataset') as tmp:\n"
        "        (tmp / 'big').write_bytes(b'0' * 100000)\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".D.tmp-")]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == [], "SIGTERM left the staging folder behind"


def test_sigterm_as_interrupt_restores_the_previous_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
