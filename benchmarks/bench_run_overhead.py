"""Run overhead: a whole mini final through the platform vs the same loop in-process.

brainalign side: ``brainalign.train.runner`` exactly as a study's final runs it: checks,
prepared data (cached once by the driver, as the study engine does), MLflow run, TorchTrainer
(Ray Train worker group, Ray Data shard), per-epoch MLflow logging, checkpoint, test and
artifacts. Two dispatches are timed: one run per Train worker group (``run_training``) and a
pack of N seeds trained one after the other by ONE worker group (``run_pack``, what the
study engine now does for an arm's seeds on one subject). Wall time per run.

Baseline: the same ``build_run`` / ``train_one_epoch`` / ``evaluate`` / early-stopping state /
test retrieval on the same prepared rows in one process, with the worker's own batch order
(the same seeded in-memory shuffle), so it trains the same model: its test metrics must equal
the platform's (checked, as is packed == alone). Run before and after the Ray side.

Also reported: where a lone run's start-up goes (driver checks and prepared-data lookup,
MLflow run creation, handing the splits to Ray, Train controller + worker group start-up,
the worker's own set-up before its first epoch, test + artifacts) and Ray's own start.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

# benchmarks/ is sys.path[0] when this file runs as a script, and Ray adds it to its workers
from _common import EquivalenceError, Options, Result, make_result, median, spread
from bench_overhead import load_tensors

from brainalign.config import DataConfig, TrainConfig


def _cfg(path: Path, seed: int, epochs: int) -> TrainConfig:
    # the mini study's final recipe (jobs/mini_study.toml [config]; the search's batch size)
    data = DataConfig(path=str(path), subjects=("01",), image_table="sim-clip:simulated")
    return TrainConfig(data=data, encoder="nice", epochs=epochs, batch_size=64, seed=seed, amp=False,
                       num_workers=1, cpus_per_worker=1.0, select_metric="val_top1", patience=10,
                       experiment="bench-run-overhead", run_name=f"final-s{seed}")


def plain_run(cfg: TrainConfig, cache: Path) -> dict[str, float]:
    """One final in-process: the worker's loop on in-memory tensors, then the runner's test."""
    from brainalign.data.contract import open_dataset
    from brainalign.data.prepare import catalog_embeddings, load_table_for, load_test, prepare
    from brainalign.metrics import retrieval_ranks
    from brainalign.train.loop import EarlyStopping, build_run, encode, evaluate, train_one_epoch
    from brainalign.train.ray_worker import _shuffled_batches

    t0 = time.perf_counter()
    cfg = cfg.resolved()
    torch.set_num_threads(cfg.torch_threads or 1)
    ds = open_dataset(cfg.data.path)
    table, _ = load_table_for(cfg)
    emb = catalog_embeddings(ds, table, ds.image_ids("train") + ds.image_ids("test"))
    prepared = prepare(cfg, cache)
    train = load_tensors(prepared.train_dir)
    val = load_tensors(prepared.val_dir)
    run = build_run(cfg, n_chans=prepared.n_chans, n_times=prepared.n_times, image_emb=torch.from_numpy(emb))
    stopper = EarlyStopping(cfg.select_metric, cfg.patience)
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        m = train_one_epoch(run, _shuffled_batches(train, cfg.batch_size, cfg.seed * 10_000 + epoch))
        m |= evaluate(run, *val)
        stopper.update(run, m)
        if stopper.should_stop:
            break
    t_test = time.perf_counter()
    run.model.load_state_dict(stopper.state_copy())
    pos = ds.image_index()
    ids, x = load_test(cfg, "01")
    z = encode(run, torch.from_numpy(x), torch.zeros(len(ids), dtype=torch.long))
    ranks = retrieval_ranks(z, run.image_emb[[pos[i] for i in ids]], torch.arange(len(ids)))
    t_end = time.perf_counter()
    return {"wall_s": t_end - t0, "train_s": t_test - t_train, "test_s": t_end - t_test,
            "test_top1": float((ranks <= 1).float().mean()), "test_top5": float((ranks <= 5).float().mean())}


def run(opts: Options) -> list[Result]:
    home = opts.workdir / "run-overhead-home"
    os.environ["BRAINALIGN_HOME"] = str(home)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    from brainalign import paths
    from brainalign.data.prepare import prepare
    from brainalign.data.simulate import simulate_dataset

    preset = "tiny" if opts.quick else "mini"
    epochs = 3 if opts.quick else 12
    seeds = [0, 1] if opts.quick else [0, 1, 2]
    data = home / "data" / f"sim-{preset}"
    if not data.exists():
        simulate_dataset(data, preset=preset, seed=0, progress=False)
    cfgs = [_cfg(data, s, epochs) for s in seeds]
    cache = paths.cache_dir()
    for c in cfgs:  # the engine prepares every run's data in the driver before dispatching
        prepare(c.resolved(), cache)

    # the study engine creates the MLflow store and experiment once, before any run: so here
    # (a fresh SQLite store's schema creation is not a per-run cost)
    from brainalign import tracking

    tracking.ensure_experiment(cfgs[0].experiment, paths.mlflow_tracking_uri())
    before = [plain_run(c, cache) for c in cfgs]
    import ray

    from brainalign._ray import ensure_ray
    from brainalign.train.runner import run_pack, run_training

    t0 = time.perf_counter()
    ensure_ray()
    ray_start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = run_training(cfgs[0])
    alone_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = run_pack([(c, _spec()) for c in cfgs])
    packed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone2 = run_training(cfgs[0])  # bracket: a second lone run after the pack
    alone2_s = time.perf_counter() - t0
    ray.shutdown()
    after = [plain_run(c, cache) for c in cfgs]

    # equivalence: packed == alone (same seed), and the in-process loop trains the same model
    for name, a, b in (("packed seed 0 vs alone", packed[0].test, alone.test),
                       ("second lone run vs first", alone2.test, alone.test)):
        if {k: a[k] for k in ("test_top1", "test_top5")} != {k: b[k] for k in ("test_top1", "test_top5")}:
            raise EquivalenceError(f"{name}: test metrics differ: {a} vs {b}")
    for r, p in zip(packed, before, strict=True):
        if (r.test["test_top1"], r.test["test_top5"]) != (p["test_top1"], p["test_top5"]):
            raise EquivalenceError(f"platform vs in-process: test metrics differ: {r.test} vs {p}")

    plain = [p["wall_s"] for p in before + after]
    plain_med = median(plain)
    per_run_packed = packed_s / len(cfgs)
    per_run_alone = median([alone_s, alone2_s])
    t = alone.timings
    epoch_s = median([p["train_s"] / epochs for p in before + after])
    breakdown = {
        "ray_init_s (once per study)": ray_start_s,
        "driver_checks_and_prepared_lookup_s": t.get("checks_and_prepare_s", float("nan")),
        "mlflow_run_creation_s": t.get("mlflow_runs_s", float("nan")),
        "splits_to_ray_data_s": t.get("data_to_ray_s", float("nan")),
        "train_controller_and_worker_group_start_s": t.get("train_startup_s", float("nan")),
        "worker_setup_before_first_epoch_s (first report - one plain epoch)":
            t.get("run_start_to_first_report_s", float("nan")) - epoch_s,
        "test_and_artifacts_s": t.get("test_and_artifacts_s", float("nan")),
        "pack_fit_s (fit of the lone run)": t.get("pack_fit_s", float("nan")),
    }
    startup = alone_s - median([p["train_s"] for p in before + after])
    raw: dict[str, Any] = {
        "seeds": seeds, "epochs": epochs, "dataset": f"simulated {preset}, subject 01",
        "per_run_wall_s": {"plain": spread(plain), "alone": [round(alone_s, 2), round(alone2_s, 2)],
                           "packed": round(per_run_packed, 2), "pack_total": round(packed_s, 2)},
        "plain_train_s": spread([p["train_s"] for p in before + after]),
        "plain_test_s": spread([p["test_s"] for p in before + after]),
        "test_top1": {"platform_packed": [r.test["test_top1"] for r in packed],
                      "platform_alone_seed0": alone.test["test_top1"],
                      "in_process": [p["test_top1"] for p in before]},
        "startup_breakdown_s (lone run)": {k: round(v, 2) for k, v in breakdown.items()},
        "packed_timings_s": [{k: round(v, 2) for k, v in r.timings.items()} for r in packed],
    }
    common = dict(bench="run_overhead", metric="wall seconds per run", baseline=plain_med, unit="s",
                  ratio_def="platform per-run wall / in-process per-run wall", raw=raw)
    return [
        make_result(case=f"mini final ({epochs} epochs), {len(cfgs)} seeds packed into one Train worker group",
                    ours=per_run_packed, ratio=per_run_packed / plain_med, goal="<= 1.3",
                    notes="test metrics equal to the in-process loop and to the same run trained alone", **common),
        make_result(case=f"mini final ({epochs} epochs), one Train worker group per run",
                    ours=per_run_alone, ratio=per_run_alone / plain_med, goal="",
                    notes=f"start-up beyond the in-process run: {startup:.1f} s (breakdown in raw)", **common),
    ]


def _spec() -> Any:
    from brainalign.train.spec import RunSpec

    return RunSpec()


if __name__ == "__main__":
    from _common import bench_main

    raise SystemExit(bench_main("run_overhead", run))
