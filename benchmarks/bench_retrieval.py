"""Retrieval at scale: ``brainalign.metrics`` (gallery-chunked, no sort) vs a naive full sort.

200 queries (D=768) against galleries of 16,740 (the paper's large gallery: 200 test + 16,540
training images) and 1,000,000 embeddings. Three exact methods run side by side (interleaved,
in one process per gallery size):

* ``brainalign``: :func:`brainalign.metrics.topk_accuracy` (-> ``retrieval_ranks``);
* ``naive``: ``similarity`` then ``argsort`` of the full (Q, G) matrix, rank = position of the
  target (what a straightforward implementation does);
* ``query-chunked``: the library's previous method, kept here as a second baseline: the
  whole gallery normalized once (two gallery-sized copies), then the (Q, G) scores per chunk
  of queries. The library now makes one pass over the gallery in chunks instead (normalize a
  chunk, one matmul, count the items scoring at least the target), so neither the normalized
  gallery nor the (Q, G) scores exist at once.

The benchmark FAILS if any method's ranks (hence top-1/top-5) differ from the naive sort's.
Peak memory per call is the kernel's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` before each call) minus the RSS before the call, i.e. the extra
memory on top of the gallery the caller already holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# benchmarks/ is sys.path[0] when this file runs as a script (python benchmarks/bench_retrieval.py)
from _common import (
    EquivalenceError,
    Options,
    PeakRSS,
    Result,
    bench_main,
    interleaved,
    make_result,
    median,
    rss_bytes,
)

from brainalign.losses import center_normalize
from brainalign.metrics import retrieval_ranks, similarity, topk_accuracy

N_QUERIES = 200
DIM = 768


# --------------------------------------------------------------------------- methods
def naive_ranks(queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target by a full descending sort of the similarity matrix."""
    s = similarity(queries, gallery)
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    return (order == targets.view(-1, 1)).nonzero()[:, 1] + 1


def query_chunked_ranks(
    queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """The library's previous ``retrieval_ranks``: normalized gallery held whole."""
    g = center_normalize(gallery.float())
    ranks = []
    for start in range(0, queries.shape[0], chunk):
        q = center_normalize(queries[start : start + chunk].float())
        t = targets[start : start + chunk]
        s = q @ g.T
        own = s.gather(1, t.view(-1, 1))
        ranks.append(1 + (s > own).sum(1) + (s == own).sum(1) - 1)
    return torch.cat(ranks)


def ranks_to_topk(ranks: torch.Tensor) -> dict[str, float]:
    return {f"top{k}": float((ranks <= k).float().mean()) for k in (1, 5)}


# --------------------------------------------------------------------------- memory
def _hwm_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_extra(fn: Any) -> tuple[Any, int, str]:
    """Run ``fn``; return its result and the peak RSS above the RSS before the call."""
    before = rss_bytes()
    if _hwm_reset():
        out = fn()
        return out, max(0, _hwm() - before), "VmHWM"
    with PeakRSS(interval=0.005) as w:
        out = fn()
    return out, max(0, w.peak_rss - before), "psutil polling 5 ms"


# --------------------------------------------------------------------------- one gallery size
def measure(n_gallery: int, rounds: int, out_json: Path) -> None:
    """Worker (own process): build the gallery, check ranks, time and measure every method."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(n_gallery)
    gallery = torch.randn(n_gallery, DIM, generator=gen)
    targets = torch.randperm(n_gallery, generator=gen)[:N_QUERIES]
    queries = gallery[targets] + 6.0 * torch.randn(N_QUERIES, DIM, generator=gen)  # top-1 well below 1
    methods = {
        "brainalign": lambda: retrieval_ranks(queries, gallery, targets),
        "naive": lambda: naive_ranks(queries, gallery, targets),
        "query-chunked": lambda: query_chunked_ranks(queries, gallery, targets),
    }
    res: dict[str, Any] = {"gallery_bytes": gallery.numel() * 4, "n_gallery": n_gallery}
    ranks: dict[str, torch.Tensor] = {}
    for name, fn in methods.items():  # first call: correctness and peak memory
        t0 = time.perf_counter()
        r, extra, how = peak_extra(fn)
        res[f"{name}_first_s"] = time.perf_counter() - t0
        res[f"{name}_peak_extra_bytes"] = extra
        res["memory_method"] = how
        ranks[name] = r
    # the public entry point gives the same fractions as the ranks
    acc = topk_accuracy(queries, gallery, targets)
    res["topk"] = {name: ranks_to_topk(r) for name, r in ranks.items()} | {"topk_accuracy": acc}
    res["mismatch"] = {name: int((r != ranks["naive"]).sum()) for name, r in ranks.items()}
    res["topk_accuracy_matches"] = acc == ranks_to_topk(ranks["naive"])
    # GEMM ceiling: how fast one (Q, D) x (D, chunk) float32 matmul runs here
    q = center_normalize(queries)
    g = center_normalize(gallery[:65536])
    gemm = interleaved({"mm": lambda: q @ g.T}, rounds=5, warmup=1)["mm"]
    res["gemm_gflops"] = 2 * N_QUERIES * DIM * g.shape[0] / median(gemm) / 1e9
    res["flop_total"] = 2 * N_QUERIES * DIM * n_gallery
    fns = dict(methods)
    if n_gallery > 200_000:  # the naive sort takes tens of seconds at 1M: fewer rounds of it
        times = interleaved({k: v for k, v in fns.items() if k != "naive"}, rounds=rounds, warmup=0)
        times |= interleaved({"naive": fns["naive"]}, rounds=1, warmup=0)
        times["naive"] = [res["naive_first_s"]] + times["naive"]
    else:
        times = interleaved(fns, rounds=rounds, warmup=1)
    res["times"] = times
    res["torch_threads"] = torch.get_num_threads()
    out_json.write_text(json.dumps(res))


def summarize(n_wanted: int, r: dict[str, Any]) -> list[Result]:
    """Rows of the table for one gallery size from a ``measure`` record (raises on a rank mismatch)."""
    n = int(r["n_gallery"])
    results: list[Result] = []
    bad = {k: v for k, v in r["mismatch"].items() if v}
    if bad or not r["topk_accuracy_matches"]:
        raise EquivalenceError(
            f"gallery {n}: ranks differ from the naive full sort for {bad} queries "
            f"(topk_accuracy matches: {r['topk_accuracy_matches']})"
        )
    t_ours, t_naive, t_chunk = (median(r["times"][k]) for k in ("brainalign", "naive", "query-chunked"))
    gb = r["gallery_bytes"]
    raw = {
        "time_s": {k: [round(x, 3) for x in v] for k, v in r["times"].items()},
        "peak_extra_MiB": {
            k: round(r[f"{k}_peak_extra_bytes"] / 2**20) for k in ("brainalign", "naive", "query-chunked")
        },
        "gallery_MiB": round(gb / 2**20),
        "memory_method": r["memory_method"],
        "topk": r["topk"]["naive"],
        "gemm_gflops_measured": round(r["gemm_gflops"], 1),
        "gemm_floor_s": round(r["flop_total"] / (r["gemm_gflops"] * 1e9), 3),
        "torch_threads": r["torch_threads"],
        "query_chunked_time_over_brainalign": round(t_chunk / t_ours, 2),
    }
    big = n_wanted >= 1_000_000
    scale = n_wanted / n  # time and memory grow linearly in the gallery size
    time_goal = "< 1 s (absolute, 1M)" if big else ""
    if scale > 1:
        raw["measured_gallery"] = n
        raw["extrapolated_to"] = n_wanted
        raw["brainalign_time_extrapolated_s"] = round(t_ours * scale, 2)
    results.append(
        make_result(
            bench="retrieval",
            case=f"time, {N_QUERIES} q x {n:,} x {DIM}",
            metric="seconds per top-k evaluation",
            ours=t_ours,
            baseline=t_naive,
            unit="s",
            ratio=t_naive / t_ours,
            ratio_def="naive sort time / brainalign time",
            goal=time_goal,
            met=(t_ours * scale < 1.0) if big else None,
            raw=raw,
            notes=f"ranks identical to the full sort for all {N_QUERIES} queries; previous query-chunked "
            f"method {t_chunk:.3g} s"
            + (
                f"; MEASURED AT {n:,} (memory available on the shared box), goal judged on "
                f"the linear extrapolation {t_ours * scale:.3g} s"
                if scale > 1
                else ""
            ),
        )
    )
    res_t = results[-1]
    if res_t.met is False:
        res_t.bound = (
            f"float32 GEMM FLOPs: 2*Q*G*D = {2 * N_QUERIES * n_wanted * DIM / 1e9:.0f} GFLOP at 1M; one "
            f"(200 x 768) x (768 x 65,536) matmul ran at {r['gemm_gflops']:.1f} GFLOP/s here, a floor of "
            f"{raw['gemm_floor_s'] * scale:.2f} s at 1M, and brainalign took {t_ours * scale:.2f} s "
            f"({t_ours / raw['gemm_floor_s']:.2f}x the floor). < 1 s needs >= 307 GFLOP/s sustained: not "
            "reachable on 2 AVX2 cores even unloaded (~100-150 GFLOP/s peak); on one GPU it is milliseconds. "
            "Beyond the GEMM, each chunk's normalization and the (s >= own) count are memory-bound passes"
        )
    extra_ours = r["brainalign_peak_extra_bytes"]
    extra_naive = r["naive_peak_extra_bytes"]
    results.append(
        make_result(
            bench="retrieval",
            case=f"peak extra memory, {n:,} gallery",
            metric="peak RSS above the held gallery",
            ours=extra_ours / 2**20,
            baseline=extra_naive / 2**20,
            unit="MiB",
            ratio=extra_ours / gb,
            ratio_def="brainalign extra / gallery size",
            goal="<= 1.0" if big else "",
            raw={
                "query_chunked_extra_MiB": round(r["query-chunked_peak_extra_bytes"] / 2**20),
                "naive_extra_over_gallery": round(extra_naive / gb, 2),
            },
            notes="goal read as: extra memory no more than the gallery itself",
        )
    )
    if results[-1].met is False:
        results[-1].bound = (
            f"extra memory {extra_ours / gb:.2f}x the gallery: the per-chunk scores and normalized chunk "
            "should stay at a few hundred MiB; compare query_chunked_extra_MiB (the previous method)"
        )
    return results


def run(opts: Options) -> list[Result]:
    quick, workdir = opts.quick, opts.workdir
    sizes = (16_740, 100_000) if quick else (16_740, 1_000_000)
    rounds = 3
    results: list[Result] = []
    for n_wanted in sizes:
        # the largest method holds ~3.6x the gallery at once (gallery, two normalized copies, scores):
        # on a shared box, shrink the gallery rather than push other people's jobs out of memory
        import psutil

        avail = psutil.virtual_memory().available
        per_row = 3.6 * DIM * 4
        n = (
            n_wanted
            if avail >= n_wanted * per_row + 1.5 * 2**30
            else int((avail - 1.5 * 2**30) / per_row) // 10_000 * 10_000
        )
        if n < n_wanted:
            print(f"retrieval: only {avail / 2**30:.1f} GiB available: gallery {n:,} instead of {n_wanted:,}")
        # the raw record stays in the work dir (the measurement at 1M takes many minutes)
        out = workdir / f"retrieval-measure-{n}.json"
        subprocess.run(
            [sys.executable, __file__, "_measure", str(n), str(rounds), str(out)],
            check=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        results += summarize(n_wanted, json.loads(out.read_text()))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        measure(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        raise SystemExit(0)
    raise SystemExit(bench_main("retrieval", run))
