"""``brainalign explain`` on a finished mini final: wall time (goal < 60 s on 2 CPU cores).

Set-up (not timed): the simulated ``mini`` dataset (subject 01) and one final run of the mini
study's recipe (NICE x ``sim-clip:simulated``, 12 epochs) through ``run_training`` (Ray Train +
MLflow), so that a finished run with its resolved config, checkpoint and rankings exists.

Timed, interleaved over rounds: ``explain_run`` (download the run's config and checkpoint,
rebuild the model, reload and normalize the subject's 200 test trials, Grad-CAM on NICE's
projection layer, integrated gradients with 32 steps, the three views, six artifacts logged to
the run) against the same run's test evaluation done the same way (download, rebuild, reload,
encode, 200-way ranks): the baseline every analysis of a finished run pays anyway. Both use
the process's torch threads (2 on the development machine). Also reported: the time of each
stage of one explain call.

Usage::

    .venv/bin/python benchmarks/bench_explain.py [--quick]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# benchmarks/ is sys.path[0] when this file runs as a script
from _common import Options, Result, bench_main, interleaved, make_result, median, paired_ratios

GOAL_S = 60.0


def _finished_final(opts: Options) -> str:
    """Simulate mini (subject 01) and train one final run of the mini study's recipe; its run id."""
    from brainalign.config import TrainConfig
    from brainalign.data.simulate import simulate_dataset
    from brainalign.train.runner import RunSpec, run_training

    root = simulate_dataset(opts.workdir / "sim-mini-s01", "mini", seed=0, overrides={"n_subjects": 1},
                            progress=False)
    cfg = TrainConfig.from_flat({
        "data.path": str(root), "data.image_table": "sim-clip:simulated", "encoder": "nice",
        "epochs": 2 if opts.quick else 12, "select_metric": "val_top1", "experiment": "bench-explain",
        "run_name": "bench-explain-final",
    })
    return run_training(cfg, RunSpec(role="final")).run_id


def _test_eval(run_id: str) -> float:
    """The baseline: reload the finished run and score its test set (as analyses do)."""
    from brainalign.analysis._runs import load_model, open_run
    from brainalign.metrics import topk_accuracy
    from brainalign.train.loop import encode

    with tempfile.TemporaryDirectory() as d:
        lm = load_model(open_run(run_id, Path(d)))
    z = encode(lm.run, torch.from_numpy(lm.test_x))
    return topk_accuracy(z, lm.run.image_emb[lm.test_rows])["top1"]


def _stages(run_id: str) -> dict[str, float]:
    """Seconds of each stage of one explain call (the same steps explain_run takes)."""
    from brainalign import tracking
    from brainalign.analysis._runs import load_model, open_run
    from brainalign.analysis.explain import attributions, positions_for, views

    out: dict[str, float] = {}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        fr = open_run(run_id, Path(d))
        out["download config + checkpoint"] = time.perf_counter() - t
        t = time.perf_counter()
        lm = load_model(fr)
    out["rebuild model, reload test data"] = time.perf_counter() - t
    for m in ("gradcam", "ig"):
        t = time.perf_counter()
        a = attributions(lm.run, lm.test_x, lm.test_rows, lm.subject_index, [m], ig_steps=32)[m]
        out[f"attributions: {m}"] = time.perf_counter() - t
        meta = lm.ds.meta
        t = time.perf_counter()
        views(a, m, meta.tmin + np.arange(meta.n_times) / meta.sfreq, meta.sfreq, positions_for(lm.ds))
        out[f"views: {m}"] = time.perf_counter() - t
    t = time.perf_counter()
    tracking.log_dict(run_id, {"bench": True}, "bench/explain_stage.json")
    out["one artifact logged (x6 in explain)"] = time.perf_counter() - t
    return out


def run(opts: Options) -> list[Result]:
    from brainalign.analysis.explain import explain_run

    os.environ.setdefault("BRAINALIGN_HOME", str(opts.workdir / "home"))
    run_id = _finished_final(opts)
    rounds = 1 if opts.quick else 3
    times = interleaved({"explain": lambda: explain_run(run_id), "test": lambda: _test_eval(run_id)},
                        rounds=rounds, warmup=1)
    stages = _stages(run_id)
    ours, base = median(times["explain"]), median(times["test"])
    ratio = median(paired_ratios(times["explain"], times["test"]))
    return [make_result(
        bench="explain", case="mini final (NICE, 17 x 100, 200 test trials)", metric="wall time",
        ours=ours, baseline=base, unit="s", ratio=ratio,
        ratio_def="explain / reload + test evaluation of the same run",
        goal=f"explain < {GOAL_S:.0f} s", met=bool(ours < GOAL_S),
        raw={"explain_s": times["explain"], "test_eval_s": times["test"], "torch_threads": torch.get_num_threads(),
             "stages_s": {k: round(v, 3) for k, v in stages.items()}, "run_id": run_id},
        notes="methods gradcam + ig (32 steps); the goal is absolute: the ratio shows what explain adds "
              "to reloading a finished run",
    )]


if __name__ == "__main__":
    raise SystemExit(bench_main("explain", run))
