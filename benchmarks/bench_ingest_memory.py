"""Peak memory (RSS) of ingesting one Things-EEG2 subject, as a function of the file size.

Writes a synthetic NICE/AlignVis subject in exactly the release format (a protocol-4 pickle
of ``{'preprocessed_eeg_data': float64 (n, 4, 63, 250), 'ch_names', 'times'}`` under a
``.npy`` name, plus the test file and ``image_metadata.npy``) at a fraction of the real
16,540 training images, ingests it in a fresh process, and reports that process's peak RSS
(``ru_maxrss``), its RSS right before the ingest (imports done), the wall time and the
throughput. The synthetic files are written by a streaming pickler, so even the full-size
8.3 GB file needs no RAM to create; it emits the same bytes as ``pickle.dump`` (checked on a
small array first).

Usage::

    python benchmarks/bench_ingest_memory.py                      # fractions 1/16 and 1/8
    python benchmarks/bench_ingest_memory.py --fractions 0.25 --chunk-mb 64
    python benchmarks/bench_ingest_memory.py --fractions 1.0      # full size: ~13 GB of disk

The ingest streams the file in ``chunk_mb`` chunks, so the peak should not grow with the
file: compare the rows for different fractions.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from brainalign.data.ingest.things_eeg2 import CHANNELS_63

N_TRAIN_FULL, N_TEST_FULL, TRAIN_REPS, TEST_REPS = 16540, 200, 4, 80
N_CH, N_T = 63, 250


class _Payload:
    """Raw array bytes produced chunk by chunk while pickling."""

    def __init__(self, shape: tuple[int, ...], seed: int, chunk_bytes: int = 32 << 20) -> None:
        self.shape, self.seed = shape, seed
        self.nbytes = int(np.prod(shape)) * 8
        self.rows = max(1, chunk_bytes // (self.nbytes // shape[0]))  # bounded, even for 80-rep test rows

    def chunks(self) -> Iterator[bytes]:
        rng = np.random.default_rng(self.seed)
        for i in range(0, self.shape[0], self.rows):
            k = min(self.rows, self.shape[0] - i)
            yield rng.standard_normal((k, *self.shape[1:])).tobytes()


class _StreamedArray:
    """Pickles exactly like a C-ordered float64 ndarray of ``payload.shape``."""

    def __init__(self, payload: _Payload) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        from numpy._core.multiarray import _reconstruct

        state = (1, self.payload.shape, np.dtype("<f8"), False, self.payload)
        return (_reconstruct, (np.ndarray, (0,), b"b"), state)


class _StreamingPickler(pickle._Pickler):  # pure-Python pickler: its dispatch table is extensible
    # attributes of CPython's pure-Python pickler that typeshed does not declare
    framer: Any
    memoize: Any
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def _save_payload(self, obj: _Payload) -> None:
        # as save_bytes(): BINBYTES8 above 4 GiB, BINBYTES otherwise; written outside frames
        n = obj.nbytes
        head = (
            pickle.BINBYTES8 + struct.pack("<Q", n)
            if n > 0xFFFFFFFF
            else pickle.BINBYTES + struct.pack("<I", n)
        )
        self.framer.write_large_bytes(head, b"")
        for chunk in obj.chunks():
            self.framer.file_write(chunk)
        self.memoize(obj)

    dispatch[_Payload] = _save_payload


def write_subject_file(path: Path, shape: tuple[int, ...], seed: int) -> None:
    """A NICE/AlignVis subject file (pickle protocol 4) with streamed random float64 data."""
    d = {
        "preprocessed_eeg_data": _StreamedArray(_Payload(shape, seed)),
        "ch_names": list(CHANNELS_63),
        "times": np.round(-0.2 + np.arange(300) / 250.0, 6),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        _StreamingPickler(f, protocol=4).dump(d)


def check_writer_matches_pickle_dump(tmp: Path) -> bool:
    """The streaming writer's bytes equal ``pickle.dump`` of the real array (small case)."""
    shape = (300, 2, 63, 25)  # > 64 KiB, so the payload is written outside a frame, as in real files
    write_subject_file(tmp / "streamed.npy", shape, seed=7)
    real = {
        "preprocessed_eeg_data": np.concatenate(
            [np.frombuffer(c, "<f8") for c in _Payload(shape, 7).chunks()]
        ).reshape(shape),
        "ch_names": list(CHANNELS_63),
        "times": np.round(-0.2 + np.arange(300) / 250.0, 6),
    }
    return (tmp / "streamed.npy").read_bytes() == pickle.dumps(real, protocol=4)


def write_release(root: Path, fraction: float) -> tuple[Path, Path, int]:
    n_train = max(10, round(N_TRAIN_FULL * fraction) // 10 * 10)
    n_test = max(1, round(N_TEST_FULL * fraction))
    concepts = [f"{i // 10 + 1:05d}_c{i // 10}" for i in range(n_train)]
    files = [f"c{i // 10}_{i % 10:02d}b.jpg" for i in range(n_train)]
    meta = {
        "train_img_concepts": concepts,
        "train_img_files": files,
        "test_img_concepts": [f"{i + 1:05d}_t{i}" for i in range(n_test)],
        "test_img_files": [f"t{i}_01s.jpg" for i in range(n_test)],
    }
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "image_metadata.npy", meta)  # type: ignore[arg-type]  # np.save of a dict, as the release
    eeg = root / "Preprocessed_data_250Hz"
    write_subject_file(eeg / "sub-01" / "preprocessed_eeg_training.npy", (n_train, TRAIN_REPS, N_CH, N_T), 1)
    write_subject_file(eeg / "sub-01" / "preprocessed_eeg_test.npy", (n_test, TEST_REPS, N_CH, N_T), 2)
    return eeg, root / "image_metadata.npy", n_train


_CHILD = r"""
import json, resource, sys, time
from brainalign.data.ingest import ingest_things_eeg2   # imports first: baseline RSS
import pyarrow, pyarrow.parquet, tqdm                    # noqa: F401
def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
base = status_mb("VmRSS")
t = time.time()
ingest_things_eeg2(sys.argv[1], sys.argv[2], sys.argv[3], chunk_mb=float(sys.argv[4]), show_progress=False)
wall = time.time() - t
# VmHWM: peak RSS of this process's own address space. Not ru_maxrss: Linux carries the
# parent's high-water mark across fork/vfork + exec into the child's ru_maxrss.
print(json.dumps({"baseline_rss_mb": base, "peak_rss_mb": status_mb("VmHWM"), "wall_s": wall,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(fraction: float, chunk_mb: float, workdir: Path) -> dict[str, Any]:
    root = workdir / f"release-{fraction:g}"
    t = time.time()
    eeg, meta, n_train = write_release(root, fraction)
    gen_s = time.time() - t
    train = eeg / "sub-01" / "preprocessed_eeg_training.npy"
    test = eeg / "sub-01" / "preprocessed_eeg_test.npy"
    out = workdir / f"out-{fraction:g}"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(eeg), str(meta), str(out), str(chunk_mb)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    in_bytes = train.stat().st_size + test.stat().st_size
    out_bytes = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    res.update(
        fraction=fraction,
        n_train_images=n_train,
        train_file_gb=train.stat().st_size / 1e9,
        test_file_gb=test.stat().st_size / 1e9,
        output_gb=out_bytes / 1e9,
        generate_s=gen_s,
        throughput_mb_s=in_bytes / 1e6 / res["wall_s"],
        chunk_mb=chunk_mb,
    )
    shutil.rmtree(root)
    shutil.rmtree(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[1 / 16, 1 / 8],
        help="fractions of the full 16,540-image training file (default: 1/16 1/8)",
    )
    ap.add_argument("--chunk-mb", type=float, default=128.0, help="ingest chunk size (default: 128)")
    ap.add_argument("--workdir", type=Path, help="where to write (default: a temp dir, removed after)")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        same = check_writer_matches_pickle_dump(workdir)
        print(f"streaming writer == pickle.dump(protocol=4): {same}")
        rows = [run(f, args.chunk_mb, workdir) for f in args.fractions]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{'fraction':>8} {'train GB':>8} {'test GB':>7} {'base MB':>8} {'peak MB':>8} {'peak-base':>9} "
        f"{'wall s':>7} {'MB/s':>6}"
    )
    for r in rows:
        print(
            f"{r['fraction']:8.4g} {r['train_file_gb']:8.3f} {r['test_file_gb']:7.3f} {r['baseline_rss_mb']:8.0f} "
            f"{r['peak_rss_mb']:8.0f} {r['peak_rss_mb'] - r['baseline_rss_mb']:9.0f} {r['wall_s']:7.1f} "
            f"{r['throughput_mb_s']:6.0f}"
        )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
