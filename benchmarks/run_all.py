"""`make bench`: every benchmark, side by side with its baseline, as a table of ratios.

Runs each benchmark in its own subprocess (fresh memory, fresh Ray), prints one table of
ratios with the raw figures behind them, and writes it (atomically) to ``docs/benchmarks.md``
with the machine description and the command that reproduces it. Benchmarks assert nothing
about speed; this command exits non-zero if any benchmark's two sides computed different
results (or a benchmark crashed).

Usage::

    .venv/bin/python benchmarks/run_all.py                      # everything, writes docs/benchmarks.md
    .venv/bin/python benchmarks/run_all.py --quick              # smoke sizes; prints, writes nothing
    .venv/bin/python benchmarks/run_all.py --only step,retrieval
    .venv/bin/python benchmarks/run_all.py --fraction 0.25      # overhead/memory at 25% of full size

With ``--only``, the other benchmarks' last results are kept in the document (marked with
the date they were measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# benchmarks/ is sys.path[0] when this file runs as a script
from _common import SHARED_NOTE, Result, fmt, machine_info

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOC = REPO / "docs" / "benchmarks.md"
MARK = "<!-- bench-results-json"
MACHINE_MARK = "<!-- bench-machine-json"

BENCHES: dict[str, str] = {
    "step": "bench_step.py",
    "overhead": "bench_overhead.py",
    "sweep": "bench_sweep_efficiency.py",
    "retrieval": "bench_retrieval.py",
    "memory": "bench_memory.py",
    "embed": "bench_embed.py",
    "run_overhead": "bench_run_overhead.py",
    "explain": "bench_explain.py",
    "gpu": "bench_gpu.py",
}
TITLES = {
    "step": "1. Training step: brainalign NICE step vs reference-style step",
    "overhead": "2. Platform overhead: Ray Train + Ray Data epoch vs plain in-process loop",
    "sweep": "3. Sweep efficiency: TPE + ASHA vs the reference's grid",
    "retrieval": "4. Retrieval at scale: exact ranks vs the float32 GEMM floor",
    "memory": "5. Memory: Train worker peak RSS, 1 vs 4 subjects",
    "embed": "7. Image embedding: Ray Data pipeline vs sequential loop (issue 4)",
    "run_overhead": "8. Run overhead: a mini final through the platform vs the same loop in-process",
    "explain": "9. Gradient analysis: `brainalign explain` on a finished mini final (issue 16)",
    "gpu": "6. GPU",
}
WHAT = {
    "step": (
        "Samples/s of `build_run` + `train_one_epoch` (fast NICE, in-memory prepared batches) vs the published "
        "NICE written plainly with a per-item `Dataset` (per-repetition normalization + averaging of 4 reps in "
        "`__getitem__`) + `DataLoader`, AdamW, grad clipping; same data, batch 128, 1 torch thread each. "
        "Before timing: same weights give the same outputs (eval and train mode), loss, clipped gradients and "
        "post-step weights; the reference Dataset's batch equals brainalign's prepared rows."
    ),
    "overhead": (
        "Steady-state seconds per epoch (train + validation) of the library's `train_loop_per_worker` under "
        "a `TorchTrainer` fed by the materialized prepared Parquet (as `runner._fit`), from the spacing of "
        "its per-epoch reports, vs the same loop functions over in-memory tensors in one process (run "
        "before and after the Ray run). Plus the start-up of a Tune trial driving a TorchTrainer."
    ),
    "sweep": (
        "Epochs trained by a seeded Optuna TPE + ASHA (SuccessiveHalvingPruner, rungs 1/3/9) search until a "
        "trial reports a validation top-1 within 1 point of the best the reference's 12-point grid "
        "(T {0.04, 0.07, 0.1} x batch {128, 256, 512, 1024}, all epochs) found, on simulated mini "
        "(1 subject), averaged over 10 search seeds; per-point curves trained once with the platform loop "
        "and replayed (determinism checked)."
    ),
    "retrieval": (
        "200 queries x D=768 against galleries of 16,740 and 1,000,000, interleaved in one process with the "
        "same torch threads: `brainalign.metrics.retrieval_ranks` (float32 screen of the raw gallery rows, exact "
        "float64 rescoring of the items within the float32 error bound of the target's score) vs the floor, one "
        "plain float32 GEMM of the same shape (`torch.mm`, scores only), the same GEMM through oneDNN (what the "
        "library calls), the previous method (normalize each chunk, `torch.mm`, count) and the naive one "
        "(normalized copies, full score matrix, count >= target). Ranks must equal the naive ones (queries = "
        "target + noise) and an exact float64 reference (chance-level queries: the screen's worst case). Peak "
        "memory = kernel high-water mark (VmHWM, reset per call) above the RSS holding the gallery."
    ),
    "memory": (
        "Peak private RSS (RssAnon, polled) and VmHWM of the Ray Train worker (library "
        "`train_loop_per_worker`, one epoch, the runner's decisions on what to hold whole) with 1 vs 4 subjects "
        "of 63 x 250 rows, measured at a fraction of full size with the byte bounds (shuffle buffer, held-whole "
        "threshold) scaled by the same fraction, and extrapolated to full size with a per-row model."
    ),
    "embed": (
        "Images/s of `brainalign.images.embed_catalog` (Ray Data: parallel JPEG decode tasks, then a "
        "map_batches actor holding the model) vs a plain sequential loop of the same decode and model code "
        "(`embed_images_local`), tiny timm ViT on CPU, 256 generated 256px JPEGs; both include model loading. "
        "The tables must agree to 1e-4. With a tiny model the sequential loop has 0.7 s of work, which "
        "the pipeline's fixed costs (worker processes, the model actor, task scheduling) dwarf: Ray Data "
        "pays off where decoding and a real backbone (ViT-B, on GPUs) dominate, which no GPU here could measure."
    ),
    "run_overhead": (
        "Wall seconds per tested run of a mini final (simulated mini, subject 01, 12 epochs, the mini study's "
        "recipe) through `brainalign.train.runner` (checks, MLflow run, TorchTrainer on Ray Data, per-epoch "
        "MLflow logging, checkpoint, test, artifacts), dispatched one run per Train worker group and as a pack "
        "of 3 seeds trained one after the other by one worker group (what the study engine does), vs the same "
        "loop functions, batch order, early stopping and test retrieval in one process (before and after). "
        "The test metrics must be equal on all sides. Raw: the start-up breakdown of a lone run. The "
        "closing note gives `make sweep` before/after."
    ),
    "explain": (
        "Wall seconds of `explain_run` on a finished final of the mini study's recipe (NICE x sim-clip:simulated, "
        "12 epochs, trained through `run_training`): download of its resolved config and checkpoint, model rebuild, "
        "reload of the subject's 200 test trials, Grad-CAM on NICE's projection layer, integrated gradients "
        "(32 steps), the temporal/spectral/spatial views and six artifacts logged to the run; against reloading the "
        "same run and evaluating its test set the same way (interleaved rounds). The goal is absolute (under a "
        "minute on 2 CPU cores); `stages_s` in the raw figures splits one explain call."
    ),
    "gpu": (
        "Seconds per NICE training step (batch 128) on the GPU with AMP (and fp32, raw) vs the CPU with all its "
        "cores, same seeded model and rows, brainalign's `build_run` + `train_one_epoch`, pinned memory and "
        "non-blocking copies, interleaved rounds; runs of the mini and full-size study per GPU-hour from the step "
        "time (training compute only). Runs only where CUDA is: `benchmarks/bench_gpu.py`."
    ),
}


#: Measured by hand (two full `make sweep` runs side by side take too long for `make bench`);
#: the commands are in the note. Edit when re-measured.
SWEEP_NOTE: list[str] = [
    "Measured 2026-12-02 on the shared 2-core box while other sessions ran (load average 50-110, memory up to "
    "95% used, Ray's OOM killer active): **no `make sweep` before/after pair finished with comparable results "
    "in this session**, so the <= 4 min goal is neither shown nor refuted here. Each run: `git archive <rev>` "
    "into a temporary folder, `PYTHONPATH=<folder>/platform BRAINALIGN_HOME=<fresh dir> .venv/bin/brainalign "
    "study run jobs/mini_study.toml --quiet` (dataset simulation included).",
    "",
    "| run | code | started (load avg) | what happened | wall |",
    "|---|---|---|---|---|",
    "| before | main `0c15216` | 06:43 (1.7) | simulation 16 s; search 1 (2 trials at a time) 279 s; search 2 "
    "**hung**: waiting for CPUs held by placement groups of trials ASHA had stopped (the Train "
    "`PlacementGroupCleaner` thread died: \"Found multiple active Ray instances\", 7 times); stopped | "
    "2402 s, unfinished |",
    "| after | `2dcf788` (packing, one-at-a-time searches) | 07:02 (74.5) | search 1 (sequential) 599 s; search 2 "
    "hung on the same leak; stopped. Fixed in `_ray.ensure_ray` (daemons get their own `RAY_ADDRESS`) | "
    "1249 s, unfinished |",
    "| before2 / after2 | main + that fix / HEAD, side by side | 07:23 (108.9) | Ray's OOM killer killed trial "
    "workers in both (22.4 of 23.5 GB used): errored trials, results not comparable; stopped | - |",
    "| after3 | `f12578b` (packing, one-at-a-time searches, Ray address fix), alone | 07:41 (70.0; "
    "23.5 at the end) | simulation + Ray start 2.5 min; search 1 (sequential) 9.5 min, search 2 8.3 min (no "
    "waits: the cleaner found its cluster); 24 finals in 8 packs, 2 at a time, 10.3 min (packs 100-189 s, i.e. "
    "33-63 s per run at this load); report base 10.5 / 31.5, aligned 18.0 / 46.0 test top-1 / top-5 | "
    "1748 s (29.1 min), finished |",
    "",
    "What the numbers in this session do show: with the same finals recipe, a pack of 3 seeds in one Train "
    "worker group costs 3.2x less wall per run than one worker group per run (section 8: 54.3 s vs 171.7 s at "
    "load 60), with test metrics equal to the lone run and to the in-process loop; the first search selected "
    "the same config (lr 1.25e-4, batch 64, T 0.0885; val top-1 0.115) in the concurrent and the sequential "
    "run. The idle-machine reference from 2026-12-01 (docs/sweep.md): 8.7 min (745 s on a fresh run), base "
    "10.7 / 31.1, aligned 18.0 / 45.3 test top-1 / top-5; after3 gives base 10.5 / 31.5, aligned 18.0 / 46.0. "
    "Main changed since that reference (global-batch InfoNCE, guards), and its selected configs are not on "
    "record, so equality of the report with a before run is NOT shown here; a before/after pair on an idle "
    "box (same procedure) is still to be done.",
]


def _run_one(name: str, script: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        cmd = [sys.executable, str(HERE / script), "--json", str(out)]
        if args.quick:
            cmd.append("--quick")
        if args.workdir:
            cmd += ["--workdir", str(args.workdir)]
        if args.fraction is not None and name in ("overhead", "memory"):
            cmd += ["--fraction", str(args.fraction)]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd, cwd=REPO, env=os.environ | {"PYTHONUNBUFFERED": "1"}).returncode
        if out.is_file():
            payload = json.loads(out.read_text())
        else:
            payload = {
                "bench": name,
                "status": "error",
                "error": f"exit code {rc}, no result file",
                "results": [],
            }
        payload["rc"] = rc
        payload["measured_at"] = dt.datetime.now().isoformat(timespec="seconds")
        return payload


def _previous() -> dict[str, Any]:
    if not DOC.is_file():
        return {}
    text = DOC.read_text()
    if MARK not in text:
        return {}
    blob = text.split(MARK, 1)[1].split("-->", 1)[0]
    try:
        return json.loads(blob)
    except json.JSONDecodeError:
        return {}


def _results(payload: dict[str, Any]) -> list[Result]:
    return [Result(**r) for r in payload.get("results", [])]


def _summary_rows(payloads: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| benchmark | case | brainalign | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in BENCHES:
        p = payloads.get(name)
        if name == "gpu" and (p is None or (p["status"] == "ok" and not p.get("results"))):
            lines.append("| gpu | all | - | - | - | - | skipped (no CUDA on the machine that ran it) |")
            continue
        if p is None:
            lines.append(f"| {name} | - | - | - | - | - | not run |")
            continue
        if p["status"] != "ok":
            lines.append(f"| {name} | - | - | - | - | - | **{p['status'].upper()}**: {p['error'][:160]} |")
            continue
        for r in _results(p):
            met = "n/a" if r.met is None else ("yes" if r.met else "**no**")
            ratio = "n/a" if r.ratio != r.ratio else f"{r.ratio:.3g}x"
            lines.append(
                f"| {name} | {r.case} | {fmt(r.ours, r.unit)} | {fmt(r.baseline, r.unit)} | {ratio} "
                f"({r.ratio_def}) | {r.goal or '-'} | {met} |"
            )
    return lines


def render(payloads: dict[str, dict[str, Any]], machine: dict[str, Any], command: str) -> str:
    now = dt.datetime.now().isoformat(timespec="minutes")
    m = machine
    lines = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/run_all.py` (do not edit by hand). Every figure is a ratio of brainalign against a "
        "baseline run side by side (interleaved in one process or command); a benchmark fails only if the two sides "
        "compute different results, never on speed.",
        "",
        f"- **Reproduce:** `{command}` (`make bench` runs `.venv/bin/python benchmarks/run_all.py`; one benchmark: "
        "`--only NAME`, whose section below names its exact command; smoke sizes: `--quick`; overhead/memory at a "
        "share of full size: `--fraction F`).",
        f"- **Generated:** {now}.",
        f"- **Machine:** {m['cpu']} ({m['simd']}), {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
        f"{m['ram_gib']} GiB RAM ({m['ram_available_gib']} GiB available at start), load average at start "
        f"{m['load_avg']}; GPU: {m['gpu']}; Python {m['python']}, torch {m['torch']}, ray {m['ray']}, "
        f"numpy {m['numpy']}, pyarrow {m['pyarrow']}, optuna {m['optuna']}; {m['os']}.",
        f"- **Shared box:** {SHARED_NOTE}",
        "",
        "## Summary",
        "",
        *_summary_rows(payloads),
        "",
    ]
    for name in BENCHES:
        lines += [f"## {TITLES[name]}", "", WHAT[name], ""]
        p = payloads.get(name)
        if p is None or (name == "gpu" and p["status"] == "ok" and not p.get("results")):
            lines += ["Not run." if name != "gpu" else
                      "Skipped: no CUDA on the machine that ran it (no GPU has been lent to this task so far).", ""]
            continue
        flags = [f"measured {p.get('measured_at', '?')}", f"{p.get('elapsed_s', '?')} s"]
        if p.get("load_avg_start_end"):
            flags.append(f"load average {p['load_avg_start_end'][0]} at start, {p['load_avg_start_end'][1]} at end")
        if p.get("quick"):
            flags.append("QUICK (smoke) sizes")
        if p.get("fraction") is not None:
            flags.append(f"--fraction {p['fraction']}")
        lines += [
            f"_{'; '.join(flags)}; reproduce: `.venv/bin/python benchmarks/run_all.py --only {name}"
            f"{' --quick' if p.get('quick') else ''}"
            f"{' --fraction ' + str(p['fraction']) if p.get('fraction') is not None else ''}`_",
            "",
        ]
        if p["status"] != "ok":
            lines += [f"**{p['status'].upper()}**: {p['error']}", ""]
        for r in _results(p):
            met = "not judged" if r.met is None else ("met" if r.met else "**missed**")
            ratio = "n/a" if r.ratio != r.ratio else f"{r.ratio:.3g}x"
            lines += [
                f"### {r.case}",
                "",
                f"- {r.metric}: brainalign {fmt(r.ours, r.unit)}, baseline {fmt(r.baseline, r.unit)}; "
                f"ratio **{ratio}** ({r.ratio_def}); goal {r.goal or 'none'}: {met}.",
            ]
            if r.notes:
                lines.append(f"- Notes: {r.notes}.")
            if r.bound:
                lines.append(f"- What bounds it: {r.bound}")
            if r.raw:
                lines.append("- Raw figures:")
                lines += [f"  - `{k}`: {json.dumps(v, default=str)}" for k, v in r.raw.items()]
            lines.append("")
    lines += ["## Closing note: `make sweep` before/after (issue 15)", "", *SWEEP_NOTE, ""]
    lines += [
        f"{MARK}",
        json.dumps(payloads, default=str),
        "-->",
        MACHINE_MARK,
        json.dumps(machine),
        "-->",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke sizes; prints the table, writes no document")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--render-only", action="store_true", help="rewrite the document from its stored results")
    p.add_argument("--fraction", type=float, help="overhead/memory at this share of the full data size")
    p.add_argument(
        "--workdir", type=Path, help="where inputs are generated (default: $BRAINALIGN_CACHE/bench)"
    )
    p.add_argument(
        "--out", type=Path, help=f"document to write (default {DOC.relative_to(REPO)}; none with --quick)"
    )
    args = p.parse_args(argv)
    selected = [s.strip() for s in args.only.split(",") if s.strip()] or list(BENCHES)
    unknown = sorted(set(selected) - set(BENCHES))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    if args.render_only:  # e.g. after a change to this renderer; measures nothing
        out = args.out or DOC
        old = _previous()
        if not old:
            p.error(f"{DOC} holds no stored results")
        text = DOC.read_text()
        machine = (
            json.loads(text.split(MACHINE_MARK, 1)[1].split("-->", 1)[0]) if MACHINE_MARK in text else {}
        )
        command = (
            text.split("- **Reproduce:** `", 1)[1].split("`", 1)[0]
            if "**Reproduce:**" in text
            else "make bench"
        )
        write_atomic(out, render(old, machine or machine_info(), command))
        print(f"re-rendered {out}")
        return 0
    machine = machine_info()
    payloads: dict[str, dict[str, Any]] = {}
    for name in selected:
        script = BENCHES[name]
        for attempt in range(3):
            payloads[name] = _run_one(name, script, args)
            # Ray's node start waits a fixed 30 s for the raylet: a loaded box can miss it
            if "timed out during startup" not in payloads[name].get("error", "") or attempt == 2:
                break
            print(
                f"{name}: Ray did not start in time (loaded machine); retrying in a fresh process", flush=True
            )
            time.sleep(30)
    failed = {n: pl for n, pl in payloads.items() if pl["status"] != "ok" or pl["rc"] != 0}

    out = args.out or (None if args.quick else DOC)
    merged = dict(payloads)
    if out is not None and set(selected) != set(BENCHES):
        for name, old in _previous().items():
            merged.setdefault(name, old)
    given = list(sys.argv[1:] if argv is None else argv)
    command = "make bench" if not given else " ".join([".venv/bin/python benchmarks/run_all.py", *given])
    text = render(merged, machine, command.strip())
    print("\n" + "\n".join(_summary_rows(merged)))
    if out is not None:
        write_atomic(out, text)
        print(f"\nwrote {out}")
    for name, pl in failed.items():
        print(f"FAILED {name}: {pl['status']}: {pl.get('error', '')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
