"""Data commands never lose data, never crash on damaged files, never leave staging behind (issue 11)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from brainalign import BrainalignError
from brainalign.cli import main
from brainalign.data.contract import open_dataset

CLI = [sys.executable, "-c", "import sys; from brainalign.cli import main; sys.exit(main(sys.argv[1:]))"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- class 6: validate never crashes
def test_validate_reports_damaged_files_instead_of_crashing(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy(tiny_dataset, tmp_path / "ds")
    part = sorted((root / "epochs").rglob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:500])  # a truncated part file
    table = sorted((root / "embeddings").glob("*.parquet"))[0]
    table.write_bytes(table.read_bytes()[:300])  # a truncated embedding table
    assert main(["data", "validate", str(root)]) == 1
    out = capsys.readouterr().out
    assert "unreadable Parquet file" in out and part.name in out and table.name in out


def test_validate_reports_a_manifest_without_meta(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy(tiny_dataset, tmp_path / "ds")
    man = json.loads((root / "dataset.json").read_text())
    del man["meta"]
    (root / "dataset.json").write_text(json.dumps(man))
    assert main(["data", "validate", str(root)]) == 1
    assert "lacks ['meta']" in capsys.readouterr().out
    with pytest.raises(BrainalignError, match=r"lacks \['meta'\]"):
        open_dataset(root)


# --------------------------------------------------------------------------- class 9: simulator guards
@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ("n_times=1", r"n_times 1 is too short"),
        ("sfreq=1e-3", r"sfreq 0.001 Hz cannot represent the simulated signal"),
        ("sfreq=5", r"sfreq 5 Hz cannot represent"),
        ("n_times=20", r"epoch window \[0, 0.2\) s .* does not contain the simulated responses"),
    ],
)
def test_simulate_refuses_epochs_that_cannot_hold_the_signal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, match: str
) -> None:
    code = main(["data", "simulate", "--preset", "tiny", "--out", str(tmp_path / "sim"), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err), err
    assert not (tmp_path / "sim").exists()


# --------------------------------------------------------------------------- class 7: SIGTERM
def test_sigterm_during_simulate_leaves_no_staging_folder(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    proc = subprocess.Popen([*CLI, "data", "simulate", "--preset", "mini", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".sim.tmp-*/epochs")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the simulation ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "SIGTERM left a staging folder behind"


# --------------------------------------------------------------------------- class 6: concurrent writers
def test_two_concurrent_simulations_into_one_out_both_succeed(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    procs = [subprocess.Popen([*CLI, "data", "simulate", "--preset", "tiny", "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    assert open_dataset(out).meta.simulated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"]


# --------------------------------------------------------------------------- class 1: tables
def test_a_nan_table_row_is_refused_when_training_loads_it(tiny_dataset: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from brainalign import TrainConfig
    from brainalign.data.contract import read_embedding_table
    from brainalign.data.prepare import load_table_for

    root = _copy(tiny_dataset, tmp_path / "ds")
    path = root / "embeddings" / "sim-clip__simulated.parquet"
    t = read_embedding_table(path)
    vectors = t.vectors.copy()
    vectors[3, 7] = np.nan  # one value of one row, as a broken upstream model would leave it
    meta = pq.read_schema(path).metadata
    tbl = pa.table({"image_id": pa.array(list(t.image_ids), pa.string()),
                    "embedding": pa.FixedShapeTensorArray.from_numpy_ndarray(vectors)})
    pq.write_table(tbl.replace_schema_metadata(meta), path)
    cfg = TrainConfig.from_flat({"data.path": str(root), "data.image_table": "sim-clip:simulated"})
    with pytest.raises(BrainalignError, match=r"1 vector\(s\) with NaN or Inf.*" + str(t.image_ids[3])):
        load_table_for(cfg)


def test_an_output_path_that_cannot_be_written_is_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("x")
    code = main(["data", "simulate", "--preset", "tiny", "--out", str(tmp_path / "a-file" / "sim")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write" in err and "writable folder" in err, err
