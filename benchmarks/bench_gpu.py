"""GPU: NICE training-step throughput on the GPU (AMP and fp32) vs the CPU, side by side.

Runs where CUDA is present (a lent GPU machine: ``.venv/bin/python benchmarks/run_all.py --only
gpu``); elsewhere it reports nothing and the table says it was skipped. Both devices train the
same seeded model on the same prepared rows with brainalign's own ``build_run`` +
``train_one_epoch`` (batch 128, pinned host memory and non-blocking copies on the GPU side),
interleaved rounds, medians. From the GPU step time it derives the training compute of one run
of the mini and of the full-size study per GPU-hour (compute only: the per-run start-up is
section 8's figure, and four ``gpus_per_worker = 0.25`` runs side by side are not measured here).

``BRAINALIGN_BENCH_GPU_DEVICE=cpu`` runs the same code with the CPU on both sides (a dry run of
this script on a machine without CUDA; its ratio is ~1 by construction and is not a result).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

# benchmarks/ is sys.path[0] when this file runs as a script
from _common import Options, Result, bench_main, make_result, median, spread

from brainalign.config import TrainConfig
from brainalign.train.loop import build_run, train_one_epoch

EMBED_DIM = 512
BATCH = 128
#: (label, channels, times, training rows of one subject, epochs of one run)
SHAPES = (
    ("mini (17 x 100)", 17, 100, 1_800, 12),
    ("full-size (63 x 250)", 63, 250, 14_886, 50),
)


def _device() -> torch.device | None:
    forced = os.environ.get("BRAINALIGN_BENCH_GPU_DEVICE", "")
    if forced:
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch_time(device: torch.device, amp: bool, x: torch.Tensor, emb: torch.Tensor, steps: int) -> float:
    """Seconds of ``steps`` training steps on ``device`` (after one warm-up step)."""
    cfg = TrainConfig(encoder="nice", batch_size=BATCH, epochs=1, lr=2e-4, temperature=0.04, seed=0, amp=amp)
    run = build_run(cfg, n_chans=x.shape[1], n_times=x.shape[2], image_emb=emb, device=device)
    idx = torch.arange(len(x))
    if device.type == "cuda":
        x, idx = x.pin_memory(), idx.pin_memory()

    n_batches = len(x) // BATCH

    def batches(n: int):  # type: ignore[no-untyped-def]
        for s in range(n):
            sl = slice((s % n_batches) * BATCH, (s % n_batches + 1) * BATCH)
            yield {"epoch": x[sl], "image_index": idx[sl]}

    train_one_epoch(run, batches(1))
    _sync(device)
    t0 = time.perf_counter()
    train_one_epoch(run, batches(steps))
    _sync(device)
    return time.perf_counter() - t0


def run(opts: Options) -> list[Result]:
    device = _device()
    if device is None:
        print("bench gpu: no CUDA device here; skipped (run it on a GPU machine)")
        return []
    torch.set_num_threads(os.cpu_count() or 1)  # the CPU side gets every core it has
    steps, rounds = (4, 2) if opts.quick else (20, 5)
    out = []
    for label, c, t, rows, epochs in SHAPES:
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.standard_normal((4 * BATCH, c, t), dtype=np.float32))
        emb = torch.from_numpy(rng.standard_normal((len(x), EMBED_DIM), dtype=np.float32))
        times: dict[str, list[float]] = {"cpu": [], "gpu_amp": [], "gpu_fp32": []}
        for _ in range(rounds):  # interleaved: drift in the machine's speed hits every side alike
            times["cpu"].append(_epoch_time(torch.device("cpu"), False, x, emb, steps) / steps)
            times["gpu_amp"].append(_epoch_time(device, True, x, emb, steps) / steps)
            times["gpu_fp32"].append(_epoch_time(device, False, x, emb, steps) / steps)
        step = {k: median(v) for k, v in times.items()}
        steps_per_run = epochs * math.ceil(rows / BATCH)
        per_hour = {k: 3600.0 / (steps_per_run * s) for k, s in step.items()}
        raw = {
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "step_s": {k: spread(v) for k, v in times.items()},
            "samples_per_s": {k: round(BATCH / s, 1) for k, s in step.items()},
            "steps_per_run": steps_per_run,
            "runs_per_device_hour_compute_only": {k: round(v, 1) for k, v in per_hour.items()},
            "torch_threads_cpu": torch.get_num_threads(),
            "dry_run_on_cpu": device.type != "cuda",
        }
        out.append(make_result(
            bench="gpu", case=f"NICE step, {label}, batch {BATCH}, AMP", metric="seconds per training step",
            ours=step["gpu_amp"], baseline=step["cpu"], unit="s", ratio=step["cpu"] / step["gpu_amp"],
            ratio_def="CPU step time / GPU step time", goal="", raw=raw,
            notes=f"{per_hour['gpu_amp']:.0f} runs of {epochs} epochs x {rows:,} rows per GPU-hour (training compute "
                  f"only); fp32 step {step['gpu_fp32'] * 1e3:.1f} ms",
        ))
    return out


if __name__ == "__main__":
    raise SystemExit(bench_main("gpu", run))
