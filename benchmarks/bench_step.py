"""Training step: brainalign's NICE step vs a straightforward reference-style step, side by side.

brainalign: ``build_run`` + ``train_one_epoch`` over in-memory batches of epochs that
``data.prepare`` already normalized per repetition and averaged over repetitions (once, when
the prepared Parquet is written; its cost per epoch is nil), NICE with its default fast
temporal stage.

Baseline, written plainly the way the reference does it (alignvis-facts sections 1.2, 3, 4):
the published NICE (``Conv2d`` temporal -> ``AvgPool2d`` -> BN -> ELU -> spatial conv -> BN ->
ELU -> Dropout -> 1x1 conv -> ``b e h w -> b (h w) e`` -> projector -> ``repr_layer``), a
per-item ``torch.utils.data.Dataset`` over numpy arrays of all 4 repetitions whose
``__getitem__`` normalizes each repetition and channel and averages the repetitions, a
``DataLoader`` (shuffle, drop_last, default collate), AdamW (weight decay 0.1), symmetric
InfoNCE on centred, L2-normalized embeddings, gradient clipping at 1.0. Choices that favour
the baseline: numpy float32 storage (the reference holds float64), image embeddings in memory
(the reference ``np.load``s one ``.npy`` file per item), ``num_workers=0`` (measured here;
``num_workers=2`` is reported as a raw figure in full runs).

Before timing, both sides are checked to compute the same thing: the same weights give the
same outputs (eval and train mode, with the same dropout masks), the same loss, gradients and
post-step weights; and the reference Dataset's batch equals brainalign's prepared batch.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# benchmarks/ is sys.path[0] when this file runs as a script (python benchmarks/bench_step.py)
from _common import (
    EquivalenceError,
    Options,
    Result,
    bench_main,
    check_close,
    check_rel,
    interleaved,
    make_result,
    median,
    paired_ratios,
    spread,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

from brainalign.config import TrainConfig
from brainalign.data.prepare import normalize_epochs
from brainalign.train.loop import build_run, train_one_epoch

N_REPS = 4
EMBED_DIM = 512  # dreamsim_clip_vitb32, the paper's main target


# --------------------------------------------------------------------------- reference-style code
class RefNICE(nn.Module):
    """NICE as published (NICE-EEG PatchEmbedding + FlattenHead, AlignVis projector + repr_layer)."""

    def __init__(self, n_chans: int, n_times: int, embed_dim: int) -> None:
        super().__init__()
        self.tsconv = nn.Sequential(
            nn.Conv2d(1, 40, (1, 25), (1, 1)),
            nn.AvgPool2d((1, 51), (1, 5)),
            nn.BatchNorm2d(40),
            nn.ELU(),
            nn.Conv2d(40, 40, (n_chans, 1), (1, 1)),
            nn.BatchNorm2d(40),
            nn.ELU(),
            nn.Dropout(0.5),
        )
        self.projection = nn.Conv2d(40, 40, (1, 1), stride=(1, 1))
        n_patches = (n_times - 25 + 1 - 51) // 5 + 1
        self.proj_in = nn.Linear(40 * n_patches, embed_dim)
        self.res = nn.Sequential(nn.GELU(), nn.Linear(embed_dim, embed_dim), nn.Dropout(0.5))
        self.norm = nn.LayerNorm(embed_dim)
        self.repr_layer = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, C, T)
        x = self.projection(self.tsconv(x))  # (B, 40, 1, P)
        x = x.flatten(2).transpose(1, 2)  # Rearrange('b e (h) (w) -> b (h w) e')
        x = x.contiguous().view(x.size(0), -1)  # FlattenHead
        x = self.proj_in(x)
        x = x + self.res(x)  # ResidualAdd
        return self.repr_layer(self.norm(x))


class RefThingsEEG(Dataset):  # type: ignore[type-arg]
    """Per-item Dataset over ``(N, reps, C, T)`` numpy epochs, as the reference's ``__getitem__``.

    ``norm="reference"`` divides by the norm of the *uncentred* repetition, exactly as
    AlignVis does (``(eeg - mean) / ||eeg||``); ``norm="centred"`` divides by the norm of the
    centred one, as ``brainalign.data.prepare.normalize_epochs`` does (used for the check).
    """

    def __init__(self, eeg: np.ndarray, img_emb: np.ndarray, norm: str = "reference") -> None:
        self.eeg, self.img, self.norm = eeg, img_emb, norm

    def __len__(self) -> int:
        return len(self.eeg)

    def __getitem__(self, item: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        eeg = self.eeg[item].copy()
        eeg = np.expand_dims(eeg, axis=0)  # (1, reps, C, T)
        centred = eeg - np.mean(eeg, axis=-1, keepdims=True)
        denom = np.linalg.norm(eeg if self.norm == "reference" else centred, axis=-1, keepdims=True)
        if self.norm != "reference":
            denom = denom + 1e-8
        eeg = centred / denom
        sample = (
            torch.from_numpy(np.mean(eeg, axis=1)).to(torch.float),
            torch.from_numpy(self.img[item]).to(torch.float),
        )
        return sample, item


def ref_center_normalize(z: torch.Tensor) -> torch.Tensor:
    z = z - z.mean(dim=-1, keepdim=True)
    return F.normalize(z, dim=-1)


def ref_clip_loss(z_i: torch.Tensor, z_j: torch.Tensor, logit_scale: float) -> torch.Tensor:
    logits = (z_i @ z_j.T) * logit_scale
    labels = torch.arange(z_i.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def ref_step(
    model: nn.Module, opt: torch.optim.Optimizer, eeg: torch.Tensor, img: torch.Tensor, logit_scale: float
) -> float:
    """One reference training step (fp32 on CPU: the reference's autocast/GradScaler are CUDA-only)."""
    opt.zero_grad()
    z_i = ref_center_normalize(model(eeg))
    z_j = ref_center_normalize(img)
    loss = ref_clip_loss(z_i, z_j, logit_scale)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def ref_state_from_brainalign(sd: dict[str, torch.Tensor], n_patches: int) -> dict[str, torch.Tensor]:
    """Map a brainalign NICE state_dict onto :class:`RefNICE` (flatten order: filter- vs patch-major)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("tsconv."):
            out[k] = v
        elif k.startswith("projection."):
            out[k] = v
        elif k.startswith("projector.0."):
            if k.endswith("weight"):  # columns f*P+p (brainalign) -> p*F+f (reference)
                d = v.shape[0]
                v = v.view(d, -1, n_patches).permute(0, 2, 1).reshape(d, -1)
            out["proj_in." + k.split(".")[-1]] = v
        elif k.startswith("projector.1.fn.1."):
            out["res.1." + k.split(".")[-1]] = v
        elif k.startswith("projector.2."):
            out["norm." + k.split(".")[-1]] = v
        elif k.startswith("repr_layer."):
            out[k] = v
        else:
            raise KeyError(f"unmapped brainalign NICE parameter {k!r}")
    return out


# --------------------------------------------------------------------------- set-up
def _config(batch: int, epochs: int = 50) -> TrainConfig:
    return TrainConfig(
        encoder="nice",
        batch_size=batch,
        epochs=epochs,
        lr=2e-4,
        weight_decay=0.1,
        grad_clip=1.0,
        temperature=0.04,
        seed=0,
        amp=False,
    )


def _data(n: int, n_chans: int, n_times: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # EEG-like: a per-(rep, channel) offset so the two normalizations really differ
    eeg = rng.standard_normal((n, N_REPS, n_chans, n_times), dtype=np.float32)
    eeg += rng.standard_normal((n, N_REPS, n_chans, 1), dtype=np.float32)
    emb = rng.standard_normal((n, EMBED_DIM), dtype=np.float32)
    return eeg, emb


def _prepared(eeg: np.ndarray) -> torch.Tensor:
    """What brainalign's prepare writes: center_l2 per repetition/channel, then the mean over reps."""
    return torch.from_numpy(normalize_epochs(eeg, "center_l2").mean(axis=1).astype(np.float32))


def check_equivalence(n_chans: int, n_times: int, batch: int) -> dict[str, float]:
    """Raise EquivalenceError unless both sides compute the same step on the same batch."""
    eeg, emb = _data(batch, n_chans, n_times, seed=123)
    cfg = _config(batch)
    run = build_run(cfg, n_chans=n_chans, n_times=n_times, image_emb=torch.from_numpy(emb))
    n_patches = run.model.n_patches
    ref = RefNICE(n_chans, n_times, EMBED_DIM)
    ref.load_state_dict(ref_state_from_brainalign(run.model.state_dict(), n_patches))
    diffs: dict[str, float] = {}

    # data path: reference per-item Dataset (with brainalign's centred norm) == prepared rows
    ds = RefThingsEEG(eeg, emb, norm="centred")
    (x_ref, e_ref), _ = next(iter(DataLoader(ds, batch_size=batch, shuffle=False)))
    x_ours = _prepared(eeg)
    diffs["data_batch"] = check_close(
        "data: per-item normalize+average vs prepared rows", x_ours, x_ref[:, 0], rtol=1e-5, atol=1e-6
    )
    check_close("data: image embeddings", torch.from_numpy(emb), e_ref, rtol=0, atol=0)
    # the reference's literal normalization (uncentred norm) differs: reported, not fatal
    (x_lit, _), _ = next(iter(DataLoader(RefThingsEEG(eeg, emb, "reference"), batch_size=batch)))
    diffs["reference_norm_rel_diff"] = float((x_lit[:, 0] - x_ours).norm() / x_ours.norm())

    x4 = x_ours.unsqueeze(1)
    # Relative (norm) tolerances: the fast temporal stage sums in another order (~1e-7), and the
    # train-mode batch norm after it subtracts a mean up to ~200x the std, which magnifies that.
    run.model.eval()
    ref.eval()
    with torch.no_grad():
        diffs["eval_output_rel"] = check_rel("eval-mode outputs", run.model(x_ours), ref(x4), tol=1e-4)
    run.model.train()
    ref.train()
    torch.manual_seed(7)
    out_ours = run.model(x_ours)
    torch.manual_seed(7)
    out_ref = ref(x4)
    diffs["train_output_rel"] = check_rel(
        "train-mode outputs (same dropout masks)", out_ours, out_ref, tol=1e-2
    )

    # one full step each from the same weights, same batch, same dropout seed
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(11)
    m = train_one_epoch(run, [{"epoch": x_ours, "image_index": torch.arange(batch)}])
    torch.manual_seed(11)
    loss_ref = ref_step(ref, opt, x4, torch.from_numpy(emb), 1.0 / cfg.temperature)
    diffs["loss"] = check_close(
        "training loss", torch.tensor(m["train_loss"]), torch.tensor(loss_ref), rtol=1e-4, atol=1e-5
    )
    grads = ref_state_from_brainalign(
        {k: p.grad for k, p in run.model.named_parameters() if p.grad is not None}, n_patches
    )
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    if set(grads) != set(ref_grads):
        raise EquivalenceError(f"parameters with gradients differ: {sorted(set(grads) ^ set(ref_grads))}")
    # The conv biases right before a train-mode batch norm (tsconv.0, tsconv.4) have a gradient
    # that is mathematically 0 (the norm removes the mean): float noise on both sides (and AdamW
    # moves them by ~lr * sign(noise) in the reference too). For those, both must be ~0; every
    # other gradient must agree relative to its norm.
    total = float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())))
    worst_rel = 0.0
    for k, g in grads.items():
        if k in ("tsconv.0.bias", "tsconv.4.bias"):
            small = max(float(g.norm()), float(ref_grads[k].norm())) / total
            diffs[f"{k}_grad_norm_share"] = small
            if small > 5e-2:
                raise EquivalenceError(
                    f"gradient of {k} should be ~0 (bias before batch norm), got {small:.3g}"
                )
            continue
        rel = float((g.double() - ref_grads[k].double()).norm() / ref_grads[k].double().norm())
        worst_rel = max(worst_rel, rel)
        if rel > 1e-2:
            raise EquivalenceError(f"clipped gradient of {k} differs (relative error {rel:.3g} > 0.01)")
    diffs["clipped_grads_rel"] = worst_rel
    # AdamW's first step moves each weight by ~lr * sign(grad): compare within a small share of lr,
    # and allow a sign flip only where a gradient is ~0 (a small share of the weights). Batch-norm
    # running statistics are not optimized: they follow the batch statistics, compared relatively.
    after = ref_state_from_brainalign(run.model.state_dict(), n_patches)
    ref_sd = ref.state_dict()
    params = set(ref_grads)
    n_off = n_all = 0
    worst = worst_buf = 0.0
    for k, v in after.items():
        if k not in params:
            if k.endswith("running_mean"):
                # a batch mean near 0 carries the amplified float noise of the norm before it: measure
                # its error in units of the running std (the shift it causes in eval-mode outputs)
                std = torch.sqrt(ref_sd[k.replace("running_mean", "running_var")].double() + 1e-5)
                shift = float(((v.double() - ref_sd[k].double()).abs() / std).max())
                worst_buf = max(worst_buf, shift)
                if shift > 1e-2:
                    raise EquivalenceError(f"batch-norm {k} differs by {shift:.3g} running std")
            elif v.is_floating_point():
                worst_buf = max(worst_buf, check_rel(f"batch-norm statistic {k}", v, ref_sd[k], tol=5e-3))
            elif not torch.equal(v, ref_sd[k]):
                raise EquivalenceError(f"{k} differs: {v} vs {ref_sd[k]}")
            continue
        d = (v.double() - ref_sd[k].double()).abs()
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
        n_off += int((d > 0.05 * cfg.lr).sum())
        n_all += d.numel()
    diffs["weights_after_step_max_abs"] = worst
    diffs["weights_after_step_off_share"] = n_off / max(n_all, 1)
    diffs["bn_running_stats_max_err"] = worst_buf
    if worst > 2.5 * cfg.lr or n_off > 2e-3 * n_all:
        raise EquivalenceError(
            f"weights after one step differ: max |diff| {worst:.3g} (lr {cfg.lr}), "
            f"{n_off}/{n_all} weights off by more than 5% of lr"
        )
    return diffs


def _profile_ours(n_chans: int, n_times: int, batch: int, x: torch.Tensor, emb: torch.Tensor) -> list[str]:
    """Top ops of brainalign's step by self CPU time (torch.profiler), as text lines."""
    from torch.profiler import ProfilerActivity, profile

    run = build_run(_config(batch), n_chans=n_chans, n_times=n_times, image_emb=emb)
    batches = [
        {"epoch": x[i * batch : (i + 1) * batch], "image_index": torch.arange(i * batch, (i + 1) * batch)}
        for i in range(2)
    ]
    train_one_epoch(run, batches[:1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_one_epoch(run, batches)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return [f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in rows]


# --------------------------------------------------------------------------- benchmark
def bench_shape(n_chans: int, n_times: int, batch: int, steps: int, rounds: int, full: bool) -> Result:
    diffs = check_equivalence(n_chans, n_times, batch)
    n = steps * batch
    eeg, emb = _data(n, n_chans, n_times, seed=0)
    emb_t = torch.from_numpy(emb)
    t0 = time.perf_counter()
    x = _prepared(eeg)  # brainalign pays this once per prepared dataset, not per epoch
    prepare_s = time.perf_counter() - t0
    idx = torch.arange(n)
    cfg = _config(batch)
    run = build_run(cfg, n_chans=n_chans, n_times=n_times, image_emb=emb_t)
    ref = RefNICE(n_chans, n_times, EMBED_DIM)
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scale = 1.0 / cfg.temperature
    loader = DataLoader(RefThingsEEG(eeg, emb), batch_size=batch, shuffle=True, drop_last=True, num_workers=0)

    def ours() -> None:
        perm = torch.randperm(n)
        batches = (
            {"epoch": x[perm[s : s + batch]], "image_index": idx[perm[s : s + batch]]}
            for s in range(0, n - batch + 1, batch)
        )
        train_one_epoch(run, batches)

    def reference() -> None:
        ref.train()
        for (eeg_b, img_b), _ in loader:
            ref_step(ref, opt, eeg_b, img_b, scale)

    def ref_data_only() -> None:
        for _ in loader:
            pass

    times = interleaved({"brainalign": ours, "reference": reference}, rounds=rounds, warmup=1)
    ratios = paired_ratios(times["reference"], times["brainalign"])
    data_only = interleaved({"ref_data": ref_data_only}, rounds=max(2, rounds // 2), warmup=0)["ref_data"]
    ours_sps = n / median(times["brainalign"])
    ref_sps = n / median(times["reference"])
    raw: dict[str, Any] = {
        "samples_per_s_brainalign": round(ours_sps, 1),
        "samples_per_s_reference": round(ref_sps, 1),
        "epoch_s_brainalign": spread(times["brainalign"]),
        "epoch_s_reference": spread(times["reference"]),
        "ratio_per_round": [round(r, 3) for r in ratios],
        "reference_data_only_s": spread(data_only),
        "reference_data_share": round(median(data_only) / median(times["reference"]), 3),
        "prepare_once_s": round(prepare_s, 3),
        "steps_per_round": steps,
        "batch": batch,
        "embed_dim": EMBED_DIM,
        "torch_threads": torch.get_num_threads(),
        "equivalence_max_abs_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()},
    }
    if full:
        loader2 = DataLoader(
            RefThingsEEG(eeg, emb), batch_size=batch, shuffle=True, drop_last=True, num_workers=2
        )

        def reference_nw2() -> None:
            for (eeg_b, img_b), _ in loader2:
                ref_step(ref, opt, eeg_b, img_b, scale)

        t2 = interleaved({"brainalign": ours, "reference_nw2": reference_nw2}, rounds=3, warmup=1)
        raw["ratio_vs_reference_num_workers_2"] = round(
            median(paired_ratios(t2["reference_nw2"], t2["brainalign"])), 3
        )
    ratio = median(ratios)
    goal = ">= 2.5" if (n_chans, n_times) == (63, 250) else ""
    res = make_result(
        bench="step",
        case=f"NICE {n_chans}x{n_times}, batch {batch}",
        metric="training samples/s",
        ours=ours_sps,
        baseline=ref_sps,
        unit="samples/s",
        ratio=ratio,
        ratio_def="reference time / brainalign time",
        goal=goal,
        raw=raw,
        notes=(
            f"median of {rounds} interleaved rounds of {steps} steps; same weights, outputs, loss, grads "
            f"and post-step weights checked equal; reference literal normalization (uncentred norm) differs "
            f"from brainalign's center_l2 by {diffs['reference_norm_rel_diff']:.2%} (relative) on EEG-like data "
            f"with DC offsets"
        ),
    )
    if res.met is False or full:
        top = _profile_ours(n_chans, n_times, batch, x, emb_t)
        res.raw["profile_brainalign_top_self_cpu"] = top
        if res.met is False:
            res.bound = "brainalign step profile (self CPU): " + ", ".join(top)
    return res


def run(opts: Options) -> list[Result]:
    quick = opts.quick
    # One intra-op thread on each side: what a Ray Train worker uses by default
    # (cpus_per_worker=1), and on an oversubscribed box two OpenMP threads stall each other.
    torch.set_num_threads(1)
    steps, rounds = (3, 3) if quick else (8, 5)
    out = []
    for c, t in ((63, 250), (17, 100)):
        out.append(
            bench_shape(c, t, 128, steps=steps if c == 63 else steps * 2, rounds=rounds, full=not quick)
        )
    return out


if __name__ == "__main__":
    raise SystemExit(bench_main("step", run))
