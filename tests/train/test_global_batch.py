"""Global-batch InfoNCE (issue 14): N data-parallel workers train exactly like one worker.

Two real gloo ranks (``torch.multiprocessing`` spawn, CPU, DDP as Ray Train's
``prepare_model`` builds it) each take half of a global batch; the loss, the gradients of every
model parameter and of the learned temperature (after DDP's averaging), and the weights after
``train_one_epoch`` must equal one worker's on the whole batch. The encoder is the MLP without
dropout (LayerNorm only): per-worker BatchNorm statistics or dropout masks would differ by
construction, not because of the loss.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from brainalign._checks import BrainalignError
from brainalign.config import DataConfig, TrainConfig
from brainalign.train.loop import _sync_temperature_grad, build_run, train_one_epoch

N_CHANS, EMB, BATCH = 12, 16, 8


def _cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        data=DataConfig(subjects=("01",)),
        encoder="mlp",
        arch={"width": 24, "n_blocks": 1, "drop_prob": 0.0, "block_drop_prob": 0.0},
        batch_size=BATCH,
        learn_temperature=True,
        temperature=0.07,
        lr=1e-2,
        amp=False,
        seed=3,
    )
    return TrainConfig(**(base | kw))


def _data(duplicates: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(20, EMB, generator=gen)
    x = torch.randn(2 * BATCH, N_CHANS, 1, generator=gen)  # two global batches
    ids = torch.randperm(20, generator=gen)[: 2 * BATCH]
    if duplicates:  # the same image within a rank and across ranks (rank 0 rows 0-3, rank 1 rows 4-7)
        ids[1] = ids[0]
        ids[5] = ids[0]
        ids[6] = ids[2]
        ids[BATCH + 7] = ids[BATCH + 1]
    return {"emb": emb, "x": x, "ids": ids}


def _step(rank: int, world: int, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Loss + gradients of the first global batch, then weights after one epoch of two batches."""
    torch.manual_seed(0)
    run = build_run(_cfg(num_workers=world), n_chans=N_CHANS, n_times=1, image_emb=data["emb"])
    if world > 1:
        run.model = torch.nn.parallel.DistributedDataParallel(run.model)
    b = BATCH // world
    rows = [torch.arange(g * BATCH + rank * b, g * BATCH + (rank + 1) * b) for g in range(2)]
    x, ids = data["x"][rows[0]], data["ids"][rows[0]]
    run.model.train()
    z = run.model(x)
    loss = run.loss_fn(z, run.image_emb[ids], ids, gather=world > 1)
    loss.backward()
    _sync_temperature_grad(run)
    # the one-process loss of the global batch is the mean of the ranks' losses
    total = loss.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(total)
        total /= world
    module = run.model.module if world > 1 else run.model
    grads = {k: p.grad.clone() for k, p in module.named_parameters()}
    t_grad = run.loss_fn.logit_scale.grad.clone()
    run.optimizer.zero_grad(set_to_none=True)
    batches = [{"epoch": data["x"][r], "image_index": data["ids"][r]} for r in rows]
    metrics = train_one_epoch(run, batches)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {
        "loss": float(total),
        "grads": grads,
        "t_grad": t_grad,
        "weights": weights,
        "logit_scale": run.loss_fn.logit_scale.detach().clone(),
        "epoch": metrics,
    }


def _worker(rank: int, world: int, port: int, data: dict[str, torch.Tensor], out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_step(rank, world, data), Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "duplicates-across-ranks"])
def test_two_workers_equal_one_worker_on_the_global_batch(tmp_path: Path, duplicates: bool) -> None:
    data = _data(duplicates)
    one = _step(0, 1, data)
    mp.spawn(_worker, args=(2, _free_port(), data, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for two in ranks:
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        for k, g in one["grads"].items():  # DDP's average = the one-worker gradient, no scale factor
            torch.testing.assert_close(two["grads"][k], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(two["t_grad"], one["t_grad"], rtol=1e-4, atol=1e-7)
        for k, w in one["weights"].items():  # after two AdamW steps with clipping
            torch.testing.assert_close(two["weights"][k], w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(two["logit_scale"], one["logit_scale"], rtol=1e-6, atol=1e-6)
        assert two["epoch"]["train_loss"] == pytest.approx(one["epoch"]["train_loss"], rel=1e-5)
        assert two["epoch"]["train_samples"] == one["epoch"]["train_samples"] == 2 * BATCH
    # the learned temperature (outside DDP) is the same on both ranks, bit for bit
    assert torch.equal(ranks[0]["logit_scale"], ranks[1]["logit_scale"])
    assert float(one["logit_scale"]) != pytest.approx(math.log(1 / 0.07), abs=1e-4)  # it was learned


def test_local_only_negatives_would_differ(tmp_path: Path) -> None:
    """The check above can fail: each rank's loss over its own half alone (what DDP did
    before) is not the global-batch loss."""
    data = _data(False)
    run = build_run(_cfg(), n_chans=N_CHANS, n_times=1, image_emb=data["emb"])
    ids = data["ids"][:BATCH]
    with torch.no_grad():
        z = run.model(data["x"][:BATCH])
        full = float(run.loss_fn(z, run.image_emb[ids], ids))
        halves = [float(run.loss_fn(z[h], run.image_emb[ids[h]], ids[h])) for h in (slice(0, 4), slice(4, 8))]
    assert abs(sum(halves) / 2 - full) > 1e-3


def test_batch_not_divisible_by_workers_is_refused() -> None:
    with pytest.raises(BrainalignError, match=r"batch_size=130 is not divisible by num_workers=4.*128 or 132"):
        _cfg(batch_size=130, num_workers=4)
    assert _cfg(batch_size=128, num_workers=4).batch_size == 128
