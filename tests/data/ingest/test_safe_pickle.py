"""The restricted unpickler: numpy arrays and plain containers in, everything else refused."""

from __future__ import annotations

import builtins
import os
import pickle
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npformat
import pytest

from brainalign._checks import BrainalignError
from brainalign.data.ingest.safe_pickle import (
    LAZY_BYTES,
    FileBackedArray,
    UnsafePickleError,
    load_npy,
    load_pickle,
    load_release_file,
)


def _payload(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "big": rng.standard_normal((40, 4, 63, 25)),  # > LAZY_BYTES: stays on disk
        "small": np.arange(12, dtype=np.int16).reshape(3, 4),
        "names": ["Fp1", "Fp2"],
        "str_array": np.array(["00001_aardvark", "00002_abacus"]),
        "scalar": np.float64(2.5),
        "nested": {"t": (1, 2.0, None, True), "b": b"raw"},
    }


def _check(obj: dict[str, Any], want: dict[str, Any]) -> None:
    assert isinstance(obj["big"], FileBackedArray) and obj["big"].shape == want["big"].shape
    np.testing.assert_array_equal(obj["big"].read(3, 9), want["big"][3:9])
    np.testing.assert_array_equal(np.asarray(obj["big"]), want["big"])
    np.testing.assert_array_equal(obj["small"], want["small"])
    assert obj["small"].dtype == np.int16
    assert obj["names"] == want["names"] and obj["str_array"].tolist() == want["str_array"].tolist()
    assert obj["scalar"] == 2.5 and obj["nested"] == want["nested"]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_raw_pickles_of_every_protocol(tmp_path: Path, protocol: int) -> None:
    want = _payload(np.random.default_rng(protocol))
    assert want["big"].nbytes > LAZY_BYTES
    path = tmp_path / "preprocessed_eeg_training.npy"
    with open(path, "wb") as f:
        pickle.dump(want, f, protocol=protocol)
    obj = load_release_file(path)
    if protocol == 2:  # protocol 2 spells bytes as _codecs.encode(...): read in memory
        np.testing.assert_array_equal(np.asarray(obj["big"]), want["big"])
    else:
        _check(obj, want)


def test_np_save_of_a_dict(tmp_path: Path) -> None:
    want = _payload(np.random.default_rng(0))
    path = tmp_path / "meta.npy"
    np.save(path, want)
    _check(load_release_file(path), want)


def test_numpy1_module_names_are_accepted(tmp_path: Path) -> None:
    """Files written by numpy 1.x name numpy.core.multiarray (numpy 2 writes numpy._core)."""
    want = {"x": np.arange(6.0).reshape(2, 3), "s": np.float32(1.5)}
    payload = pickle.dumps(np.array(want, dtype=object), protocol=3)  # what numpy 1.x np.save wrote
    payload = payload.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in payload and b"numpy._core" not in payload
    path = tmp_path / "legacy.npy"
    with open(path, "wb") as f:
        npformat.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(payload)
    obj = load_release_file(path)
    np.testing.assert_array_equal(obj["x"], want["x"])
    assert obj["s"] == np.float32(1.5)


def test_numeric_npy_is_file_backed(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(">f4")
    path = tmp_path / "x.npy"
    np.save(path, x)
    fb = load_npy(path)
    assert isinstance(fb, FileBackedArray) and fb.shape == (5, 3, 4) and fb.dtype == np.dtype(">f4")
    np.testing.assert_array_equal(fb.read(1, 4), x[1:4])
    xf = np.asfortranarray(x)
    np.save(path, xf)
    np.testing.assert_array_equal(load_npy(path).read(2, 3), x[2:3])


class _Evil:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


@pytest.mark.parametrize(
    "func,name",
    [
        (os.system, "posix.system"),
        (builtins.eval, "builtins.eval"),
        (subprocess.check_output, "subprocess.check_output"),
        (np.load, "numpy.load"),  # numpy, but not an array constructor
    ],
)
@pytest.mark.parametrize("container", ["pickle", "npy"])
def test_code_execution_is_refused_and_never_runs(
    tmp_path: Path, func: Any, name: str, container: str
) -> None:
    marker = tmp_path / "PWNED"
    arg = {
        os.system: f"touch {marker}",
        builtins.eval: f"open({str(marker)!r}, 'w')",
        subprocess.check_output: ["touch", str(marker)],
        np.load: str(marker),
    }[func]
    evil = {"preprocessed_eeg_data": np.zeros(3), "ch_names": _Evil(func, arg)}
    path = tmp_path / "preprocessed_eeg_training.npy"
    if container == "pickle":
        with open(path, "wb") as f:
            pickle.dump(evil, f, protocol=4)
    else:
        np.save(path, evil)
    with pytest.raises(UnsafePickleError, match=re.escape(f"{path}: refusing to unpickle global '{name}'")):
        load_release_file(path)
    assert not marker.exists()


def test_extension_codes_and_persistent_ids_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.PROTO + b"\x04" + pickle.EXT1 + b"\x01" + pickle.STOP)
    with pytest.raises(UnsafePickleError, match="copy-registry extension code"):
        load_pickle(path)
    path.write_bytes(
        pickle.PROTO + b"\x04" + pickle.SHORT_BINUNICODE + b"\x01a" + pickle.BINPERSID + pickle.STOP
    )
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_pickle(path)


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    x = {"big": np.zeros((300, 1000))}
    path = tmp_path / "t.npy"
    with open(path, "wb") as f:
        pickle.dump(x, f, protocol=4)
    path.write_bytes(path.read_bytes()[:-100_000])
    with pytest.raises(BrainalignError, match=r"t.npy: truncated file: a 2400000-byte payload"):
        load_release_file(path)
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(BrainalignError, match=r"a.txt: neither a .npy file nor a pickle"):
        load_release_file(tmp_path / "a.txt")
    with pytest.raises(BrainalignError, match=r"missing.npy does not exist"):
        load_release_file(tmp_path / "missing.npy")
    np.save(tmp_path / "n.npy", np.zeros((10, 10)))
    (tmp_path / "n.npy").write_bytes((tmp_path / "n.npy").read_bytes()[:-8])
    with pytest.raises(BrainalignError, match=r"n.npy: truncated file: the header says"):
        load_release_file(tmp_path / "n.npy")
