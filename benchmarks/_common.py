"""Shared plumbing for the benchmarks: results, side-by-side timing, memory, machine facts.

Every benchmark compares brainalign against a baseline run *side by side* (same process or
same command, interleaved) and reports the RATIO, because absolute times on a shared
machine are noise. A benchmark never asserts anything about speed; it fails (non-zero exit,
:class:`EquivalenceError`) only when the two sides compute different results.

A benchmark module exposes ``run(opts: Options) -> list[Result]`` and calls
:func:`bench_main` under ``if __name__ == "__main__"``; ``run_all.py`` runs each in its own
subprocess (fresh memory, fresh Ray) and collects the JSON it writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARED_NOTE = (
    "The machine can be shared with other jobs (2 cores; each section records the load average "
    "at its start and end): absolute times are noise; compare the ratios, each measured "
    "with both sides interleaved in one process or command."
)


class EquivalenceError(AssertionError):
    """The benchmarked implementation and its baseline computed different results."""


@dataclass(frozen=True)
class Options:
    """What every benchmark is told: smoke size or not, where inputs go, a size fraction."""

    quick: bool
    workdir: Path
    fraction: float | None = None  # share of the full data size (benchmarks that support it)


@dataclass
class Result:
    """One row of the benchmark table.

    ``ratio`` is always oriented so that the goal reads naturally: for speed-ups
    ``baseline_time / ours_time`` (goal ``>=``), for overheads and memory growth
    ``ours / baseline`` (goal ``<=``).
    """

    bench: str
    case: str
    metric: str
    ours: float
    baseline: float
    unit: str
    ratio: float
    ratio_def: str
    goal: str  # e.g. ">= 2.5"; "" when informational only
    met: bool | None
    raw: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    bound: str = ""  # what bounds it where the goal is missed (profile summary) and the fix

    @staticmethod
    def judge(ratio: float, goal: str) -> bool | None:
        """``">= 2.5"`` / ``"<= 1.15"`` judged on the ratio; any other goal text: None (judge it yourself)."""
        parts = goal.split()
        if len(parts) != 2 or parts[0] not in (">=", "<="):
            return None
        try:
            value = float(parts[1])
        except ValueError:
            return None
        return ratio >= value if parts[0] == ">=" else ratio <= value


def make_result(**kw: Any) -> Result:
    if "met" not in kw:
        kw["met"] = Result.judge(kw["ratio"], kw.get("goal", ""))
    return Result(**kw)


# --------------------------------------------------------------------------- statistics
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> str:
    """``median [min-max] (n)`` as text, for the raw figures."""
    if not xs:
        return "n/a"
    return f"{median(xs):.4g} [{min(xs):.4g}-{max(xs):.4g}] (n={len(xs)})"


def interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each ``fn`` per round, run interleaved (order reversed every round).

    Interleaving puts the two sides under the same background load; reversing the order
    cancels a drift within a round. ``warmup`` untimed rounds come first.
    """
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                out[n].append(dt)
    return out


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios ``num[i] / den[i]`` (same round = same background load)."""
    return [a / b for a, b in zip(num, den, strict=True) if b > 0]


# --------------------------------------------------------------------------- equivalence
def check_close(what: str, ours: Any, ref: Any, *, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Raise :class:`EquivalenceError` unless the tensors/arrays agree; return max abs diff."""
    import numpy as np

    a = ours.detach().cpu().double().numpy() if hasattr(ours, "detach") else np.asarray(ours, dtype=float)
    b = ref.detach().cpu().double().numpy() if hasattr(ref, "detach") else np.asarray(ref, dtype=float)
    if a.shape != b.shape:
        raise EquivalenceError(f"{what}: shapes differ, ours {a.shape} vs baseline {b.shape}")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    if not np.allclose(a, b, rtol=rtol, atol=atol):
        raise EquivalenceError(
            f"{what}: results differ (max |diff| {diff:.3g}, rtol {rtol}, atol {atol}); "
            "brainalign and the baseline do not compute the same function"
        )
    return diff


def check_rel(what: str, ours: Any, ref: Any, *, tol: float = 1e-3) -> float:
    """Raise :class:`EquivalenceError` unless ``||ours - ref|| <= tol * ||ref||``; return that ratio.

    For float32 paths that are mathematically identical but sum in another order: a
    relative error of ~1e-7 can grow ~100x where a batch norm subtracts a large mean.
    """
    import numpy as np

    a = ours.detach().cpu().double().numpy() if hasattr(ours, "detach") else np.asarray(ours, dtype=float)
    b = ref.detach().cpu().double().numpy() if hasattr(ref, "detach") else np.asarray(ref, dtype=float)
    if a.shape != b.shape:
        raise EquivalenceError(f"{what}: shapes differ, ours {a.shape} vs baseline {b.shape}")
    rel = float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))
    if not rel <= tol:
        raise EquivalenceError(
            f"{what}: results differ (relative error {rel:.3g} > {tol}); "
            "brainalign and the baseline do not compute the same function"
        )
    return rel


# --------------------------------------------------------------------------- memory
def rss_bytes(pid: int | None = None) -> int:
    import psutil

    return int(psutil.Process(pid or os.getpid()).memory_info().rss)


class PeakRSS:
    """Poll a process's RSS (and its private part, RSS - shared) in a thread; keep the peaks.

    ``pid=None`` watches this process. ``find`` (called each poll until it returns a pid)
    lets the watcher attach to a process that starts later, e.g. a Ray Train worker.
    """

    def __init__(
        self, pid: int | None = None, interval: float = 0.02, find: Callable[[], int | None] | None = None
    ) -> None:
        self.pid = pid if pid is not None else (None if find else os.getpid())
        self.find = find
        self.interval = interval
        self.peak_rss = 0
        self.peak_private = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        proc = None
        while not self._stop.is_set():
            try:
                if proc is None:
                    if self.pid is None and self.find is not None:
                        self.pid = self.find()
                    if self.pid is not None:
                        proc = psutil.Process(self.pid)
                if proc is not None:
                    m = proc.memory_info()
                    self.peak_rss = max(self.peak_rss, m.rss)
                    self.peak_private = max(self.peak_private, m.rss - getattr(m, "shared", 0))
                    self.samples += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                proc = None
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load, library versions: the context every figure needs."""
    import psutil

    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next(
            (
                ln.split(":", 1)[1].split()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("flags")
            ),
            [],
        )
    except OSError:
        flags = []
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    versions: dict[str, str] = {}
    for mod in ("torch", "ray", "numpy", "pyarrow", "optuna"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - informational only
            versions[mod] = "missing"
    info: dict[str, Any] = {
        "cpu": model,
        "simd": " ".join(simd),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "ram_available_gib": round(psutil.virtual_memory().available / 2**30, 1),
        "load_avg": [round(x, 1) for x in os.getloadavg()],
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "gpu": "none",
        **versions,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover
        pass
    return info


def workdir() -> Path:
    """Where benchmark inputs (simulated datasets, prepared Parquet) are generated and reused.

    ``$BRAINALIGN_BENCH_DIR`` or ``<brainalign cache>/bench`` (git-ignored).
    """
    env = os.environ.get("BRAINALIGN_BENCH_DIR")
    if env:
        p = Path(env)
    else:
        from brainalign.paths import cache_dir

        p = cache_dir() / "bench"
    p.mkdir(parents=True, exist_ok=True)
    return p.resolve()


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    box: list[float] = []
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - t0)


# --------------------------------------------------------------------------- output
def fmt(x: float, unit: str = "") -> str:
    if x != x:  # nan
        return "n/a"
    if abs(x) >= 1000:
        s = f"{x:,.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.3g}"
    return f"{s} {unit}".strip()


def table_rows(results: Sequence[Result]) -> list[str]:
    lines = [
        "| benchmark | case | brainalign | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        met = "n/a" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {r.bench} | {r.case} | {fmt(r.ours, r.unit)} | {fmt(r.baseline, r.unit)} | "
            f"{r.ratio:.3g}x ({r.ratio_def}) | {r.goal or 'none'} | {met} |"
        )
    return lines


def print_results(results: Sequence[Result]) -> None:
    print("\n".join(table_rows(results)))
    for r in results:
        if r.raw:
            print(f"  {r.bench}/{r.case} raw: {json.dumps(r.raw, default=str)}")


def bench_main(name: str, run: Callable[[Options], list[Result]], argv: Sequence[str] | None = None) -> int:
    """CLI of one benchmark module: ``[--quick] [--json PATH] [--workdir DIR] [--fraction F]``."""
    p = argparse.ArgumentParser(description=f"brainalign benchmark: {name}")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--json", type=Path, help="write results as JSON here (used by run_all.py)")
    p.add_argument("--workdir", type=Path, help="where inputs are generated (default: cache/bench)")
    p.add_argument("--fraction", type=float, help="share of the full data size (overhead, memory)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    wd = args.workdir or workdir()
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_start = [round(x, 1) for x in os.getloadavg()]
    status, error = "ok", ""
    results: list[Result] = []
    try:
        results = run(Options(quick=args.quick, workdir=wd, fraction=args.fraction))
    except EquivalenceError as e:
        status, error = "mismatch", str(e)
        print(f"FAILED {name}: {e}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - reported, and the exit code says it
        status, error = "error", f"{type(e).__name__}: {e}"
        traceback.print_exc()
    elapsed = time.perf_counter() - t0
    if results:
        print_results(results)
    if args.json:
        payload = {
            "bench": name,
            "status": status,
            "error": error,
            "quick": args.quick,
            "fraction": args.fraction,
            "argv": list(sys.argv[1:] if argv is None else argv),
            "elapsed_s": round(elapsed, 1),
            "load_avg_start_end": [load_start, [round(x, 1) for x in os.getloadavg()]],
            "results": [dataclasses.asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    return 0 if status == "ok" else (2 if status == "mismatch" else 1)
