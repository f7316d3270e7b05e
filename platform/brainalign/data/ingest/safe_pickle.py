"""Read pickled release files without executing code, and without loading big arrays.

The public Things-EEG2 releases ship ``.npy`` files that are really pickles: NICE/AlignVis
wrote ``pickle.dump(dict, protocol=4)`` under a ``.npy`` name, and Gifford's release used
``np.save(dict)``, i.e. a ``.npy`` header followed by a pickled 0-d object array. Loading a
pickle with :func:`pickle.load` runs whatever callables the file names, so a tampered or
corrupt download could execute code. Everything here goes through
:class:`RestrictedUnpickler` instead, which admits only what these files need:

* numpy array and scalar reconstruction (``numpy[._]core.multiarray._reconstruct`` /
  ``scalar``, ``numpy[._]core.numeric._frombuffer``, ``numpy.ndarray``, ``numpy.dtype``)
  and ``_codecs.encode`` (protocol-2 pickles spell ``bytes`` that way);
* the containers and atoms pickle builds by opcode (dict, list, tuple, set, str, bytes,
  int, float, bool, None).

Any other global is refused with :class:`UnsafePickleError` naming the file and the global,
before anything is called. Copy-registry extension codes and persistent ids are refused too.

Bounded memory: a large ``bytes`` payload (the raw data of a big array; pickle writes those
outside protocol-4 frames) is not read. The unpickler records its file offset and skips it,
and the array comes back as a :class:`FileBackedArray` that reads rows on demand with
``np.fromfile``. A 8 GB ``preprocessed_eeg_training.npy`` therefore "loads" in
milliseconds and a few kilobytes, and is then converted chunk by chunk. ``np.fromfile``
rather than ``np.memmap`` keeps the process RSS bounded too: pages of a memory map that have
been read count towards RSS until they are unmapped.

This module uses CPython's pure-Python unpickler (``pickle._Unpickler``) because its opcode
table can be extended; its speed is irrelevant here (a release file holds a handful of
objects).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from struct import unpack
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.lib.format as npformat

from ..._checks import BrainalignError

try:  # numpy >= 2 (numpy.core still works there, but warns)
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

__all__ = [
    "ALLOWED_GLOBALS",
    "FileBackedArray",
    "UnsafePickleError",
    "load_npy",
    "load_pickle",
    "load_release_file",
    "read_rows",
]

log = logging.getLogger(__name__)

#: Payloads at least this large are left on disk and served by :class:`FileBackedArray`.
LAZY_BYTES = 1 << 20

_NPY_MAGIC = b"\x93NUMPY"


class UnsafePickleError(BrainalignError):
    """A pickle asked for something other than numpy arrays and plain containers."""


# --------------------------------------------------------------------------- lazy arrays
@dataclass(frozen=True)
class FileBackedArray:
    """A C- or Fortran-ordered array whose bytes stay in a file until rows are read.

    Parameters
    ----------
    path : Path
        File holding the raw array bytes.
    offset : int
        Byte offset of the first element.
    dtype : numpy.dtype
        Element type (byte order included).
    shape : tuple of int
        Array shape.
    fortran_order : bool
        True if the bytes are in Fortran order (reading rows then needs the whole array).
    """

    path: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` along axis 0 as an in-memory array (a fresh copy).

        Returns
        -------
        numpy.ndarray
            Shape ``(stop - start, *shape[1:])``, dtype :attr:`dtype`.
        """
        n0 = self.shape[0] if self.shape else 1
        stop = n0 if stop is None else min(stop, n0)
        start = max(0, min(start, stop))
        if self.fortran_order and self.ndim > 1:
            # Rows are not contiguous in Fortran order: gather them through a read-only map, so
            # memory stays ~ the rows asked for (slower: strided reads; rare in real releases).
            mm = np.memmap(self.path, self.dtype, mode="r", offset=self.offset, shape=self.shape, order="F")
            try:
                return np.array(mm[start:stop], order="C")
            finally:
                del mm
        row = int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1
        count = (stop - start) * row
        out = np.fromfile(
            self.path, self.dtype, count, offset=self.offset + start * row * self.dtype.itemsize
        )
        if out.size != count:
            raise BrainalignError(
                f"{self.path}: file is truncated: expected {count} values of {self.dtype} at byte "
                f"{self.offset + start * row * self.dtype.itemsize}, got {out.size}; re-download it."
            )
        return out.reshape((stop - start, *self.shape[1:]) if self.shape else ())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.read()
        return a if dtype is None else a.astype(dtype)


def read_rows(a: np.ndarray | FileBackedArray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of an in-memory or file-backed array, as an in-memory array."""
    if isinstance(a, FileBackedArray):
        return a.read(start, stop)
    return np.asarray(a[start:stop])


# --------------------------------------------------------------------------- unpickler
@dataclass(frozen=True)
class _FileSpan:
    """A large bytes payload left on disk: ``length`` bytes at ``offset`` of ``path``."""

    path: Path
    offset: int
    length: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise BrainalignError(f"{self.path}: truncated pickle payload at byte {self.offset}; re-download it.")
        return data


def _materialize(x: Any) -> Any:
    return x.read() if isinstance(x, _FileSpan) else x


class _ArrayBuilder:
    """Stands in for ``ndarray`` during unpickling; ``__setstate__`` builds the real array."""

    def __init__(self) -> None:
        self.array: np.ndarray | FileBackedArray | None = None

    def __setstate__(self, state: Any) -> None:
        # ndarray.__reduce__ state: (version, shape, dtype, is_fortran, rawdata)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError(f"unexpected ndarray state of type {type(state).__name__}")
        _version, shape, dtype, fortran, raw = state
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"ndarray state has dtype {dtype!r}, not a numpy.dtype")
        shape = tuple(int(s) for s in shape)
        order: Literal["C", "F"] = "F" if fortran else "C"
        if dtype.hasobject:
            if not isinstance(raw, list):
                raise pickle.UnpicklingError("object array state must hold a list of its items")
            arr = np.empty(shape, dtype=object)
            flat = arr.reshape(-1, order=order) if arr.ndim else arr.reshape(1)
            if len(raw) != flat.size:
                raise pickle.UnpicklingError(f"object array of shape {shape} has {len(raw)} items")
            for i, item in enumerate(raw):
                flat[i] = item
            if arr.ndim and order == "F":
                arr = flat.reshape(shape, order="F")
            self.array = arr
        elif isinstance(raw, _FileSpan):
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if n != raw.length:
                raise pickle.UnpicklingError(
                    f"array of shape {shape} {dtype} needs {n} bytes, payload has {raw.length}"
                )
            self.array = FileBackedArray(raw.path, raw.offset, dtype, shape, bool(fortran))
        else:
            buf = raw.encode("latin1") if isinstance(raw, str) else bytes(raw)  # py2 pickles store str
            self.array = np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy(order="K")


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayBuilder:
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"_reconstruct of {cls!r}; only numpy.ndarray is allowed")
    return _ArrayBuilder()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray | FileBackedArray:
    # Protocol-5 spelling of an ndarray (numpy's ndarray.__reduce_ex__(5)).
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError(f"_frombuffer with dtype {dtype!r}")
    shape = tuple(int(s) for s in shape)
    if isinstance(buf, _FileSpan):
        return FileBackedArray(buf.path, buf.offset, dtype, shape, order == "F")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy()


def _scalar(dtype: Any, raw: Any = None) -> Any:
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError(f"numpy scalar with dtype {dtype!r}")
    return _multiarray.scalar(dtype, _materialize(raw)) if raw is not None else _multiarray.scalar(dtype)


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    if not isinstance(obj, str):
        raise pickle.UnpicklingError("_codecs.encode of a non-string")
    return obj.encode(encoding, errors)


_CORE = ("numpy.core", "numpy._core")
#: ``(module, name)`` globals a release pickle may name, and what each resolves to.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    **{(f"{c}.multiarray", "_reconstruct"): _reconstruct for c in _CORE},
    **{(f"{c}.multiarray", "scalar"): _scalar for c in _CORE},
    **{(f"{c}.numeric", "_frombuffer"): _frombuffer for c in _CORE},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be overridden
    """Unpickler that admits only :data:`ALLOWED_GLOBALS` and leaves big payloads on disk.

    Parameters
    ----------
    file : binary file
        Opened in ``"rb"`` mode and seekable, positioned at the start of the pickle.
    path : Path
        The file's path, used in error messages and by :class:`FileBackedArray`.
    """

    # attributes of CPython's pure-Python unpickler that typeshed does not declare
    _unframer: Any
    read: Callable[[int], bytes]
    append: Callable[[Any], None]
    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedReader, path: Path) -> None:
        super().__init__(file)
        self._f = file
        self._path = path
        self._size = os.fstat(file.fileno()).st_size

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refusing to unpickle global '{module}.{name}': only numpy arrays, numpy "
                "scalars and plain containers (dict, list, tuple, str, numbers) are allowed in a release "
                "file. The file may be corrupt or tampered with; re-download it from the official release."
            ) from None

    def _refuse(self, what: str) -> None:
        raise UnsafePickleError(
            f"{self._path}: refusing to unpickle: the pickle uses {what}, which release files never do."
        )

    def persistent_load(self, pid: Any) -> Any:
        self._refuse("a persistent id")

    # ---- opcodes overridden
    def _lazy_or_read(self, n: int) -> bytes | _FileSpan:
        frame = self._unframer.current_frame
        if frame is not None and frame.tell() < len(frame.getbuffer()):
            return self.read(n)  # inside a frame: small by construction
        if n < LAZY_BYTES:
            return self.read(n)
        self._unframer.current_frame = None
        offset = self._f.tell()
        if offset + n > self._size:
            raise BrainalignError(
                f"{self._path}: truncated file: a {n}-byte payload starts at byte {offset} but the file "
                f"has {self._size} bytes. Re-download it."
            )
        self._f.seek(n, io.SEEK_CUR)
        return _FileSpan(self._path, offset, n)

    def _load_binbytes(self) -> None:
        (n,) = unpack("<I", self.read(4))
        self.append(self._lazy_or_read(n))

    def _load_binbytes8(self) -> None:
        (n,) = unpack("<Q", self.read(8))
        self.append(self._lazy_or_read(n))

    def _load_bytearray8(self) -> None:
        (n,) = unpack("<Q", self.read(8))
        self.append(self._lazy_or_read(n))

    def _load_ext(self) -> None:
        self._refuse("a copy-registry extension code")

    def _load_next_buffer(self) -> None:
        self._refuse("an out-of-band buffer")

    dispatch[pickle.BINBYTES[0]] = _load_binbytes
    dispatch[pickle.BINBYTES8[0]] = _load_binbytes8
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _load_ext
    dispatch[pickle.NEXT_BUFFER[0]] = _load_next_buffer
    del _op


def _resolve(obj: Any, memo: dict[int, Any]) -> Any:
    """Replace array builders and leftover file spans by their values, recursively."""
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, _ArrayBuilder):
        out: Any = _resolve(obj.array, memo)
    elif isinstance(obj, _FileSpan):
        out = obj.read()
    elif isinstance(obj, dict):
        memo[key] = obj
        for k in list(obj):
            obj[k] = _resolve(obj[k], memo)
        out = obj
    elif isinstance(obj, list):
        memo[key] = obj
        obj[:] = [_resolve(v, memo) for v in obj]
        out = obj
    elif isinstance(obj, tuple):
        out = tuple(_resolve(v, memo) for v in obj)
    elif isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        memo[key] = obj
        flat = obj.reshape(-1) if obj.ndim else obj.reshape(1)
        for i in range(flat.size):
            flat[i] = _resolve(flat[i], memo)
        out = obj
    else:
        out = obj
    memo[key] = out
    return out


def _unpickle(f: io.BufferedReader, path: Path) -> Any:
    try:
        obj = RestrictedUnpickler(f, path).load()
    except BrainalignError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        OverflowError,
        MemoryError,  # e.g. an array header claiming an absurd shape
    ) as e:
        cut = isinstance(e, EOFError) or "exhausted" in str(e) or "truncated" in str(e)
        if cut:
            raise BrainalignError(
                f"{path}: the file is truncated (its pickle ends early: {type(e).__name__}: {e or 'end of file'}); "
                "the download or copy was cut short: re-download it."
            ) from e
        raise BrainalignError(f"{path}: not a readable pickle ({type(e).__name__}: {e}).") from e
    return _resolve(obj, {})


# --------------------------------------------------------------------------- public readers
def load_pickle(path: Path | str) -> Any:
    """Unpickle a raw pickle file through :class:`RestrictedUnpickler`.

    Parameters
    ----------
    path : Path or str
        A file written by :func:`pickle.dump` (any protocol >= 2).

    Returns
    -------
    object
        The unpickled object; large arrays are :class:`FileBackedArray`.

    Raises
    ------
    UnsafePickleError
        If the pickle names a global that is not a numpy array, scalar or dtype constructor.
    BrainalignError
        If the file is not a readable pickle or is truncated.
    """
    path = Path(path)
    with open(path, "rb") as f:
        return _unpickle(f, path)


def load_npy(path: Path | str) -> np.ndarray | FileBackedArray:
    """Open a ``.npy`` file: numeric arrays file-backed, object arrays restricted-unpickled.

    Parameters
    ----------
    path : Path or str
        A file written by :func:`numpy.save`.

    Returns
    -------
    numpy.ndarray or FileBackedArray
        A :class:`FileBackedArray` for numeric dtypes (nothing read yet); for object dtypes,
        the object array rebuilt by :class:`RestrictedUnpickler`.

    Raises
    ------
    UnsafePickleError
        If an object array's pickle names a refused global.
    BrainalignError
        If the header is invalid or the file truncated.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            version = npformat.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npformat.read_array_header_2_0(f)
            else:
                # (3, 0): utf-8 header; numpy has no public reader for it
                shape, fortran, dtype = npformat._read_array_header(f, version)  # type: ignore[attr-defined]
        except ValueError as e:
            hint = "; the file is truncated: re-download it" if "EOF" in str(e) else ""
            raise BrainalignError(f"{path}: invalid .npy header ({e}){hint}.") from e
        if dtype.hasobject:
            arr = _unpickle(f, path)
            if not isinstance(arr, np.ndarray) or tuple(arr.shape) != tuple(shape):
                raise BrainalignError(
                    f"{path}: the .npy header says an object array of shape {shape}, the payload holds "
                    f"{type(arr).__name__} {getattr(arr, 'shape', '')}."
                )
            return arr
        offset = f.tell()
    fb = FileBackedArray(path, offset, dtype, tuple(shape), bool(fortran))
    if offset + fb.nbytes > path.stat().st_size:
        raise BrainalignError(
            f"{path}: truncated file: the header says {shape} {dtype} ({fb.nbytes} bytes from byte {offset}), "
            f"the file has {path.stat().st_size} bytes; re-download it."
        )
    return fb


def load_release_file(path: Path | str) -> Any:
    """Load a release file that is either a raw pickle or a ``.npy``, whatever its name says.

    A 0-d object array (``np.save`` of a dict) is unwrapped, so both Things-EEG2 releases
    give back their dict.

    Parameters
    ----------
    path : Path or str
        The file.

    Returns
    -------
    object
        The stored object (see :func:`load_pickle` and :func:`load_npy`).

    Raises
    ------
    UnsafePickleError, BrainalignError
        As :func:`load_pickle` and :func:`load_npy`; also if the file is missing or is
        neither a pickle nor a ``.npy``.
    """
    path = Path(path)
    if not path.is_file():
        raise BrainalignError(f"{path} does not exist.")
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head == _NPY_MAGIC:
        obj: Any = load_npy(path)
        if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.ndim == 0:
            obj = obj.item()
        log.debug("%s: .npy container", path)
        return obj
    if head[:1] == pickle.PROTO:
        log.debug("%s: raw pickle, protocol %d", path, head[1])
        return load_pickle(path)
    raise BrainalignError(
        f"{path}: neither a .npy file nor a pickle (starts with {head!r}); expected a Things-EEG2 "
        "release file written by np.save or pickle.dump."
    )
