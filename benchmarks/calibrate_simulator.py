"""Calibrate the simulated Things-EEG2: NICE on ``mini``, aligned vs base image encoders.

A plain in-process torch script (no Ray, no MLflow) that runs the paper's default NICE recipe
on a simulated dataset and prints 200-way test top-1/top-5 for the aligned
(``<backbone>:simulated``) and base (``<backbone>:none``) tables, per subject and training
seed, for the normal and (with ``--null``) the null simulation.

Recipe (AlignVis, docs/simulator.md "Calibration"): one subject; each repetition and channel
normalized as ``(x - mean_t x) / ||x - mean_t x||``, then repetitions averaged; a seeded
90/10 image-level train/validation split; AdamW (lr 2e-4, weight decay 0.1), batch 128
(drop_last), gradient clipping 1.0, symmetric InfoNCE with fixed T = 0.04; ``--epochs``
epochs (30), keeping the weights of the epoch with the lowest validation loss (batches of
64); test retrieval = the test trials averaged over repetitions per image against the test
images' embeddings.

Usage::

    python benchmarks/calibrate_simulator.py --subjects 01 02 --seeds 0 1 --null
    python benchmarks/calibrate_simulator.py --override noise_pink=4.0 --override n_subjects=2
    # THINGS-MEG-like: NICE with the paper's MEG recipe
    python benchmarks/calibrate_simulator.py --preset meg-mini --lr 5e-5 --batch 256 --temperature 0.1
    # NSD-like: the residual MLP on single trials, no per-series normalization (one value per voxel)
    python benchmarks/calibrate_simulator.py --preset fmri-mini --encoder mlp --arch width=512 \
        --train-trials single --normalize none --lr 1e-4 --temperature 0.07

Datasets are simulated into ``--workdir`` (default ``$TMPDIR/brainalign-calib``) and reused.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brainalign.data.contract import open_dataset, read_embedding_table
from brainalign.data.simulate import simulate_dataset
from brainalign.encoders import create_encoder
from brainalign.losses import SymmetricInfoNCE
from brainalign.metrics import topk_accuracy


def normalize_reps(x: np.ndarray) -> np.ndarray:
    """AlignVis's per-repetition, per-channel normalization ``(x - mean_t) / ||x - mean_t||``."""
    x = x - x.mean(-1, keepdims=True)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def averaged(ds, subject: str, split: str, normalize: bool = True) -> tuple[list[str], np.ndarray]:
    """(image_ids, epochs averaged over repetitions) in first-appearance order."""
    ids, _, x = ds.load_epochs(subject, split)
    x = normalize_reps(x) if normalize else x
    order = list(dict.fromkeys(ids))
    index = {k: i for i, k in enumerate(order)}
    inv = np.array([index[i] for i in ids])
    out = np.zeros((len(order),) + x.shape[1:], np.float64)
    np.add.at(out, inv, x)
    out /= np.bincount(inv)[:, None, None]
    return order, out.astype(np.float32)


def train_and_test(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    *,
    seed: int,
    epochs: int,
    lr: float = 2e-4,
    wd: float = 0.1,
    batch: int = 128,
    temperature: float = 0.04,
    encoder: str = "nice",
    arch: dict | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Train ``encoder`` on (x_tr, y_tr) with a 90/10 split (of ``groups``, the image of each
    row, when rows are single trials), select by val loss, return test top-k."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    groups = np.arange(len(x_tr)) if groups is None else groups
    uniq = np.unique(groups)
    val_groups = uniq[gen.permutation(len(uniq))[: len(uniq) // 10]]
    is_val = np.isin(groups, val_groups)
    val, tr = np.flatnonzero(is_val), np.flatnonzero(~is_val)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    model = create_encoder(encoder, n_chans=x_tr.shape[1], n_times=x_tr.shape[2], embed_dim=y_tr.shape[1],
                           **(arch or {}))
    loss_fn = SymmetricInfoNCE(temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    best, best_state, best_epoch = float("inf"), None, -1
    for epoch in range(epochs):
        model.train()
        order = tr[gen.permutation(len(tr))]
        for s in range(0, len(order) - batch + 1, batch):
            b = torch.from_numpy(order[s : s + batch])
            loss = loss_fn(model(xt[b]), yt[b], torch.from_numpy(groups[order[s : s + batch]]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        with torch.no_grad():
            losses = [
                loss_fn(
                    model(xt[torch.from_numpy(val[s : s + 64])]), yt[torch.from_numpy(val[s : s + 64])]
                ).item()
                for s in range(0, len(val) - 1, 64)
                if len(val[s : s + 64]) > 1
            ]
        v = float(np.mean(losses))
        if v < best:
            best, best_state, best_epoch = v, copy.deepcopy(model.state_dict()), epoch
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        q = model(torch.from_numpy(x_te))
    res = topk_accuracy(q, torch.from_numpy(y_te), ks=(1, 5))
    return {**res, "best_epoch": best_epoch, "val_loss": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--subjects", nargs="+", default=["01", "02"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds")
    ap.add_argument("--backbones", nargs="+", default=["sim-clip"])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--null", action="store_true", help="also run the null simulation")
    ap.add_argument("--no-normal", action="store_true", help="skip the normal simulation")
    ap.add_argument("--override", action="append", default=[], help="param=JSON value, e.g. noise_pink=4.0")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "brainalign-calib")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--encoder", default="nice")
    ap.add_argument("--arch", action="append", default=[], help="encoder option=JSON value, e.g. width=512")
    ap.add_argument("--train-trials", choices=("average", "single"), default="average")
    ap.add_argument("--normalize", choices=("center_l2", "none"), default="center_l2")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.04)
    args = ap.parse_args()
    arch = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.arch)}
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    overrides = {}
    for item in args.override:
        k, v = item.split("=", 1)
        overrides[k] = json.loads(v)
    tag = "-".join(f"{k}={v}" for k, v in sorted(overrides.items())).replace("/", "_") or "default"
    modes = ([] if args.no_normal else [False]) + ([True] if args.null else [])
    rows = []
    for null in modes:
        root = args.workdir / f"{args.preset}-s{args.data_seed}-{'null' if null else 'normal'}-{tag}"
        t0 = time.perf_counter()
        simulate_dataset(
            root,
            args.preset,
            seed=args.data_seed,
            null=null,
            overrides=overrides,
            replace=True,
            progress=False,
        )
        print(
            f"[{'null' if null else 'normal'}] dataset {root} ready in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        ds = open_dataset(root)
        tables = ds.tables()
        for sid in args.subjects:
            norm = args.normalize != "none"
            if args.train_trials == "single":
                ids_tr, _, x_tr = ds.load_epochs(sid, "train")
                x_tr = normalize_reps(x_tr) if norm else x_tr
            else:
                ids_tr, x_tr = averaged(ds, sid, "train", norm)
            first = {k: i for i, k in reversed(list(enumerate(ids_tr)))}
            groups = np.array([first[k] for k in ids_tr])
            ids_te, x_te = averaged(ds, sid, "test", norm)
            for backbone in args.backbones:
                for alignment in ("simulated", "none"):
                    tbl = read_embedding_table(tables[f"{backbone}:{alignment}"])
                    y_tr, y_te = tbl.lookup(ids_tr), tbl.lookup(ids_te)
                    for seed in args.seeds:
                        t0 = time.perf_counter()
                        r = train_and_test(x_tr, y_tr, x_te, y_te, seed=seed, epochs=args.epochs, lr=args.lr,
                                           batch=args.batch, temperature=args.temperature,
                                           encoder=args.encoder, arch=arch, groups=groups)
                        row = dict(
                            mode="null" if null else "normal",
                            subject=sid,
                            table=f"{backbone}:{alignment}",
                            seed=seed,
                            **r,
                            secs=time.perf_counter() - t0,
                        )
                        rows.append(row)
                        print(
                            f"{row['mode']:6s} sub-{sid} {row['table']:20s} seed {seed}: top1 {r['top1']:.3f} "
                            f"top5 {r['top5']:.3f} (best epoch {r['best_epoch']}, val {r['val_loss']:.3f}, "
                            f"{row['secs']:.0f} s)",
                            flush=True,
                        )
    print("\nsummary (mean over subjects and seeds)")
    for mode in modes:
        m = "null" if mode else "normal"
        for backbone in args.backbones:
            a = [r for r in rows if r["mode"] == m and r["table"] == f"{backbone}:simulated"]
            b = [r for r in rows if r["mode"] == m and r["table"] == f"{backbone}:none"]
            d1 = [x["top1"] - y["top1"] for x, y in zip(a, b, strict=True)]
            print(
                f"{m:6s} {backbone:9s} aligned top1 {np.mean([r['top1'] for r in a]):.3f} "
                f"top5 {np.mean([r['top5'] for r in a]):.3f} | base top1 {np.mean([r['top1'] for r in b]):.3f} "
                f"top5 {np.mean([r['top5'] for r in b]):.3f} | diff top1 {np.mean(d1):+.3f} "
                f"(min {min(d1):+.3f}, max {max(d1):+.3f}, n={len(d1)})"
            )


if __name__ == "__main__":
    main()
