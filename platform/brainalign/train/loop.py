"""The one training loop: plain functions over torch tensors. No Ray, no MLflow here.

``build_run`` assembles model, loss, optimizer and AMP scaler from a :class:`TrainConfig`;
``train_one_epoch`` and ``evaluate`` consume any iterable of batch dicts with keys
``epoch`` (B, n_chans, n_times) float32, ``image_index`` (B,) and ``subject_index`` (B,).
The Ray Train adapter (``ray_worker.py``) feeds them from Ray Data; benchmarks and tests
feed them from in-memory tensors.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._checks import BrainalignError
from ..config import TrainConfig
from ..encoders import create_encoder, encoder_info
from ..losses import SymmetricInfoNCE
from ..metrics import topk_accuracy

__all__ = [
    "EarlyStopping",
    "NonFiniteError",
    "Run",
    "build_run",
    "check_finite_weights",
    "cosine_lr",
    "encode",
    "encode_batches",
    "evaluate",
    "evaluate_embeddings",
    "train_one_epoch",
]

Batch = Mapping[str, torch.Tensor]
#: With AMP's GradScaler an inf/NaN step is skipped and the scale lowered; this many in a row
#: means the run itself diverged (a fresh scaler needs ~16 skips to come down from 2**16).
MAX_SKIPPED_AMP_STEPS = 32


class NonFiniteError(BrainalignError):
    """Training produced a NaN or Inf loss or weight: the run has diverged and must not score.

    Raised at the first non-finite loss (or weights after a step), naming the epoch, the
    batch, the learning rate and the temperature, and the likely causes. A run that raises it
    ends FAILED in MLflow; in a search the trial errors and is never selected.
    """


def _diverged(run: Run, what: str, batch: int | None, lr: float) -> NonFiniteError:
    where = f"epoch {run.epoch}" + (f", batch {batch}" if batch is not None else " (after its last step)")
    return NonFiniteError(
        f"training diverged: {what} at {where} (lr {lr:.3g}, temperature {run.loss_fn.temperature:.3g}, "
        f"batch_size {run.cfg.batch_size}). Likely causes: a learning rate too high for this model (try "
        "lr 10x lower, warmup_epochs > 0 or grad_clip > 0), a temperature too small, or non-finite / "
        "extreme values in the data or the embedding table (`brainalign data validate`). The run is "
        "marked FAILED; its metrics are not results."
    )


def check_finite_weights(run: Run, lr: float, batch: int | None = None) -> None:
    """Raise :class:`NonFiniteError` if any parameter of the model (or the loss) is NaN/Inf."""
    for name, p in list(run.model.named_parameters()) + list(run.loss_fn.named_parameters()):
        if not bool(torch.isfinite(p.detach()).all()):
            raise _diverged(run, f"parameter {name!r} became NaN/Inf", batch, lr)


#: Rows per chunk of the validation loss (memory only: the value is the full-set loss).
EVAL_CHUNK = 1024


@dataclass
class Run:
    """Mutable training state of one run."""

    cfg: TrainConfig
    model: nn.Module
    loss_fn: SymmetricInfoNCE
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    image_emb: torch.Tensor  # (n_catalog, D) on device
    subject_aware: bool
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def amp(self) -> bool:
        return self.scaler is not None


def build_run(
    cfg: TrainConfig,
    *,
    n_chans: int,
    n_times: int,
    image_emb: torch.Tensor,
    device: torch.device | str = "cpu",
) -> Run:
    """Model, loss, AdamW and (on CUDA with ``cfg.amp``) a GradScaler, seeded by ``cfg.seed``."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    info = encoder_info(cfg.encoder)
    model = create_encoder(
        cfg.encoder,
        n_chans=n_chans,
        n_times=n_times,
        embed_dim=int(image_emb.shape[1]),
        n_subjects=len(cfg.data.subjects),
        **dict(cfg.arch),
    ).to(device)
    loss_fn = SymmetricInfoNCE(cfg.temperature, learn_temperature=cfg.learn_temperature).to(device)
    params = list(model.parameters())
    groups: list[dict[str, Any]] = [{"params": params, "weight_decay": cfg.weight_decay}]
    if cfg.learn_temperature:
        # The temperature really is optimized (the reference built it but never optimized it).
        groups.append({"params": list(loss_fn.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.learn_temperature:
        # Cap T >= 0.01 on the parameter after every step (never in the forward, where the
        # clamp would cut the temperature's gradient at the cap): see losses.py.
        optimizer.register_step_post_hook(functools.partial(_clamp_temperature, loss_fn))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    return Run(cfg, model, loss_fn, optimizer, scaler, device, image_emb.to(device), info.subject_aware)


def _clamp_temperature(loss_fn: SymmetricInfoNCE, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
    loss_fn.clamp_()


def cosine_lr(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for ``epoch`` (0-based): linear warmup, then cosine to ``min_lr``.

    A real schedule over epochs (the reference passed the validation loss as the epoch).
    """
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / (cfg.warmup_epochs + 1)
    span = max(1, cfg.epochs - cfg.warmup_epochs)
    progress = min(1.0, (epoch - cfg.warmup_epochs) / span)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _forward(run: Run, x: torch.Tensor, subject_index: torch.Tensor | None) -> torch.Tensor:
    if run.subject_aware:
        if subject_index is None:
            subject_index = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        return run.model(x, subject_index.long())
    return run.model(x)


def _to(run: Run, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = batch["epoch"].to(run.device, non_blocking=True).float()
    idx = batch["image_index"].to(run.device, non_blocking=True).long()
    sid = batch.get("subject_index")
    return x, idx, (sid.to(run.device) if sid is not None else None)


def _sync_temperature_grad(run: Run) -> None:
    """Average a learned temperature's gradient over data-parallel workers.

    DDP averages the model's gradients only; the loss's ``logit_scale`` lives outside the
    wrapped model, so without this each worker's temperature would drift its own way.
    """
    if not run.loss_fn.learn_temperature:
        return
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    grad = run.loss_fn.logit_scale.grad
    if grad is None:
        grad = torch.zeros_like(run.loss_fn.logit_scale)
        run.loss_fn.logit_scale.grad = grad
    dist.all_reduce(grad)
    grad /= dist.get_world_size()


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def train_one_epoch(run: Run, batches: Iterable[Batch]) -> dict[str, float]:
    """One pass over ``batches``; returns mean train loss, lr, temperature, samples.

    With N data-parallel workers each worker's batches hold ``batch_size / N`` rows and the
    loss is computed over the global batch (:class:`~brainalign.losses.SymmetricInfoNCE` with
    ``gather=True``); every worker must then run the same number of equal-sized batches. The
    returned loss and sample count are over all workers (identical on every worker).
    """
    lr = cosine_lr(run.cfg, run.epoch)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    run.model.train()
    world = _world_size()
    total, n = 0.0, 0
    skipped = 0  # consecutive AMP steps the GradScaler skipped (inf/NaN gradients)
    for b, batch in enumerate(batches):
        x, idx, sid = _to(run, batch)
        if x.shape[0] * world < 2:
            continue  # InfoNCE needs negatives
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(run.device.type, enabled=run.amp):
            z = _forward(run, x, sid)
        if world > 1:
            loss = run.loss_fn(z.float(), run.image_emb[idx], idx, gather=True)
        else:
            loss = run.loss_fn(z.float(), run.image_emb[idx], idx)
        value = float(loss.detach())
        if not math.isfinite(value):
            if run.scaler is None or skipped >= MAX_SKIPPED_AMP_STEPS:
                raise _diverged(run, f"the loss is {value}", b, lr)
            skipped += 1  # fp16 overflow: the scaler skips this step and lowers its scale
        else:
            skipped = 0
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.optimizer)
        else:
            loss.backward()
        _sync_temperature_grad(run)
        if run.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        if math.isfinite(value):
            total += value * x.shape[0]
            n += x.shape[0]
    if world > 1:  # each worker's loss covers its own rows: sum over workers
        sums = torch.tensor([total, float(n)], dtype=torch.float64, device=run.device)
        torch.distributed.all_reduce(sums)
        total, n = float(sums[0]), int(sums[1])
    check_finite_weights(run, lr)
    if n == 0 and skipped == 0:
        raise BrainalignError(
            f"epoch {run.epoch} trained on 0 samples: no full batch of batch_size {run.cfg.batch_size} "
            "(drop_last) in this worker's training rows. Lower batch_size or num_workers, or use more data."
        )
    run.epoch += 1
    return {
        "train_loss": total / max(n, 1),
        "lr": lr,
        "temperature": run.loss_fn.temperature,
        "train_samples": float(n),
    }


@torch.no_grad()
def encode(
    run: Run, x: torch.Tensor, subject_index: torch.Tensor | None = None, batch_size: int = 512
) -> torch.Tensor:
    """Brain embeddings ``(N, D)`` in eval mode, in chunks."""
    run.model.eval()
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s : s + batch_size].to(run.device).float()
        sb = subject_index[s : s + batch_size].to(run.device) if subject_index is not None else None
        with torch.autocast(run.device.type, enabled=run.amp):
            out.append(_forward(run, xb, sb).float())
    return torch.cat(out) if out else torch.zeros(0, run.image_emb.shape[1], device=run.device)


@torch.no_grad()
def encode_batches(run: Run, batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Brain embeddings ``(N, D)`` and image indices ``(N,)`` of a stream of batches, in eval mode.

    Only the embeddings are kept: each batch's epochs are dropped once encoded, so memory is
    ``N x D`` plus one batch whatever the size of the rows (the validation split of many
    subjects streamed from Ray Data). Feed the result to :func:`evaluate_embeddings`.
    """
    run.model.eval()
    zs, ids = [], []
    for batch in batches:
        x, idx, sid = _to(run, batch)
        with torch.autocast(run.device.type, enabled=run.amp):
            zs.append(_forward(run, x, sid).float())
        ids.append(idx)
    if not zs:
        return torch.zeros(0, run.image_emb.shape[1], device=run.device), torch.zeros(0, dtype=torch.long)
    return torch.cat(zs), torch.cat(ids)


@torch.no_grad()
def evaluate(
    run: Run, x: torch.Tensor, image_index: torch.Tensor, subject_index: torch.Tensor | None, prefix: str = "val"
) -> dict[str, float]:
    """Encode the rows of ``x`` (in chunks) and score them: :func:`evaluate_embeddings`."""
    return evaluate_embeddings(run, encode(run, x, subject_index), image_index, prefix)


@torch.no_grad()
def evaluate_embeddings(
    run: Run, z: torch.Tensor, image_index: torch.Tensor, prefix: str = "val"
) -> dict[str, float]:
    """Validation loss over the full validation set and N-way top-1/top-5 retrieval.

    Queries are the brain embeddings ``z`` ``(N, D)`` (of repetition-averaged epochs, encoded
    by :func:`encode` or streamed by :func:`encode_batches`); the retrieval gallery is the
    unique images among ``image_index`` ``(N,)``.

    The loss is the symmetric InfoNCE of ALL validation rows as one batch
    (:meth:`SymmetricInfoNCE.gallery_loss`, chunked for memory), not of batches of the
    trial's ``batch_size``: InfoNCE's chance level is ``log(batch)``, so a loss in the trial's
    own batches would favour small batches in a ``val_loss`` search and make losses of
    different trials incomparable. With the full validation gallery the chance level is a
    property of the dataset (about ``log N``, the same for every trial) and the value does
    not depend on the order of the rows. A fixed evaluation batch would also be
    batch-independent, but its size is arbitrary and its value depends on how the rows
    happen to be grouped. Cost: one pass of ``N x N`` logits (``O(N^2 D)``, memory
    ``O(EVAL_CHUNK x N)``). Fewer than 2 distinct images give a NaN loss: nothing to
    contrast.
    """
    idx = image_index.to(run.device).long()
    gallery_idx, targets = torch.unique(idx, return_inverse=True)
    if gallery_idx.numel() >= 2:
        loss = float(run.loss_fn.gallery_loss(z, run.image_emb[idx], idx, chunk_size=EVAL_CHUNK))
    else:
        loss = float("nan")
    acc = topk_accuracy(z, run.image_emb[gallery_idx], targets)
    return {f"{prefix}_loss": loss, f"{prefix}_top1": acc["top1"], f"{prefix}_top5": acc["top5"]}


class EarlyStopping:
    """Track the best epoch by the selection metric (validation only) and keep its weights."""

    def __init__(self, metric: str, patience: int) -> None:
        self.metric = metric
        self.mode = "min" if metric.endswith("loss") else "max"
        self.patience = patience
        self.best: float | None = None
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_top1 = 0.0
        self.bad_epochs = 0

    def update(self, run: Run, metrics: Mapping[str, float]) -> bool:
        """Record this epoch; return True if it is the new best."""
        value = metrics[self.metric]
        self.best_top1 = max(self.best_top1, metrics.get("val_top1", 0.0))
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, run.epoch - 1, 0
            model = run.model.module if hasattr(run.model, "module") else run.model
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_copy(self) -> dict[str, torch.Tensor]:
        assert self.best_state is not None, "update() was never called"
        return copy.deepcopy(self.best_state)
