"""The pure-torch loop: schedule, learning, early stopping, determinism (no Ray)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from brainalign import TrainConfig
from brainalign.config import DataConfig
from brainalign.data.contract import open_dataset, read_embedding_table
from brainalign.train.loop import (
    EarlyStopping,
    build_run,
    cosine_lr,
    encode_batches,
    evaluate,
    evaluate_embeddings,
    train_one_epoch,
)


def test_cosine_schedule_over_epochs_with_warmup() -> None:
    cfg = TrainConfig(epochs=10, warmup_epochs=2, lr=1e-3, min_lr=1e-5)
    lrs = [cosine_lr(cfg, e) for e in range(10)]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert cosine_lr(cfg, 10) == pytest.approx(1e-5)


def _toy_tensors(root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ds = open_dataset(root)
    ids, _r, x = ds.load_epochs("01", "train")
    pos = ds.image_index()
    table = read_embedding_table(root / "embeddings" / "toy__simulated.parquet")
    emb = torch.from_numpy(table.lookup(ds.image_ids()))
    return torch.from_numpy(x), torch.tensor([pos[i] for i in ids]), emb


def _fit(root: Path, epochs: int, seed: int = 0, **kw: object) -> tuple[list[dict[str, float]], object]:
    x, idx, emb = _toy_tensors(root)
    cfg = TrainConfig(data=DataConfig(path=str(root)), epochs=epochs, batch_size=16, lr=1e-3, seed=seed,
                      **kw)  # type: ignore[arg-type]
    run = build_run(cfg, n_chans=x.shape[1], n_times=x.shape[2], image_emb=emb)
    g = torch.Generator().manual_seed(seed)
    hist = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        batches = [{"epoch": x[perm[s:s + 16]], "image_index": idx[perm[s:s + 16]]} for s in range(0, len(x), 16)]
        m = train_one_epoch(run, batches)
        m |= evaluate(run, x[:40], idx[:40], None)
        hist.append(m)
    return hist, run


def test_training_reduces_loss_and_is_deterministic(tmp_path: Path) -> None:
    from brainalign.testing import write_toy_dataset

    root = write_toy_dataset(tmp_path / "toy", subjects=("01",), n_train_concepts=10, n_test=4, noise=0.3)
    torch.set_num_threads(1)
    h1, _ = _fit(root, 6)
    h2, _ = _fit(root, 6)
    assert h1[-1]["train_loss"] < h1[0]["train_loss"]
    assert h1[-1]["val_top1"] > 2 / 40  # well above 1/40 chance on (seen) images
    assert [m["train_loss"] for m in h1] == [m["train_loss"] for m in h2]


def test_learned_temperature_is_optimized(tmp_path: Path) -> None:
    from brainalign.testing import write_toy_dataset

    root = write_toy_dataset(tmp_path / "toy", subjects=("01",), n_train_concepts=5, n_test=2)
    hist, run = _fit(root, 2, learn_temperature=True, temperature=0.2)
    assert hist[-1]["temperature"] != pytest.approx(0.2)
    _, fixed = _fit(root, 2, temperature=0.2)
    assert fixed.loss_fn.temperature == pytest.approx(0.2)


def test_early_stopping_keeps_best_weights_by_validation() -> None:
    class R:
        epoch = 0
        model = torch.nn.Linear(2, 2)

    stop = EarlyStopping("val_loss", patience=2)
    run = R()
    for e, loss in enumerate([3.0, 2.0, 2.5, 2.6]):
        run.epoch = e + 1
        with torch.no_grad():
            run.model.weight.fill_(float(e))
        stop.update(run, {"val_loss": loss, "val_top1": 0.1 * e})  # type: ignore[arg-type]
    assert stop.best_epoch == 1 and stop.should_stop
    assert torch.all(stop.state_copy()["weight"] == 1.0)
    assert stop.best_top1 == pytest.approx(0.3)
    assert np.isclose(stop.best, 2.0)


# The zoo through the one loop: every registered encoder, small arch kwargs, toy data of its
# modality's shape (EEG channels x times, fMRI voxels x 1).
ZOO_ARCH: dict[str, dict[str, object]] = {
    "nice": {"n_filters": 8},
    "atms": {"d_model": 80, "n_heads": 2, "d_ff": 32, "n_filters": 8},
    "eegnet": {},
    "eegconformer": {"num_layers": 1, "n_filters_time": 8},
    "shallowfbcspnet": {"n_filters_time": 8, "n_filters_spat": 8},
    "mlp": {"width": 64, "n_blocks": 2},
}


def test_zoo_table_covers_the_registry() -> None:
    from brainalign.encoders import list_encoders

    assert set(ZOO_ARCH) == set(list_encoders())


@pytest.mark.parametrize("name", sorted(ZOO_ARCH))
def test_every_encoder_trains_through_the_loop(name: str, tmp_path: Path) -> None:
    from brainalign.encoders import encoder_info
    from brainalign.testing import write_toy_dataset

    fmri = "fmri" in encoder_info(name).modalities
    shape = {"n_chans": 64, "n_times": 1} if fmri else {"n_chans": 6, "n_times": 100}
    root = write_toy_dataset(tmp_path / "toy", subjects=("01",), n_train_concepts=10, n_test=4, noise=0.3,
                             **shape)  # type: ignore[arg-type]
    torch.set_num_threads(1)
    hist, run = _fit(root, 8, encoder=name, arch=dict(ZOO_ARCH[name]))
    losses = [m["train_loss"] for m in hist]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert 0.0 <= hist[-1]["val_top1"] <= hist[-1]["val_top5"] <= 1.0
    assert sum(p.numel() for p in run.model.parameters()) > 0


def test_learned_temperature_stays_equal_across_data_parallel_workers(tmp_path: Path) -> None:
    """Two gloo ranks, different data: the temperature (outside the DDP-wrapped model) is
    averaged like the model's gradients, so both ranks hold the same value after a step."""
    import socket

    import torch.multiprocessing as mp

    from brainalign.testing import ddp_temperature_step

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_temperature_step, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    t0, t1 = (float((tmp_path / f"rank-{r}.txt").read_text()) for r in range(2))
    assert t0 == t1 and t0 != pytest.approx(0.1)


def test_streamed_validation_equals_the_in_memory_one(tmp_path: Path) -> None:
    """The Train worker's streamed validation (chunks of rows in, only embeddings kept) gives the
    metrics of ``evaluate`` on the whole set: bit for bit with the worker's 512-row chunks (the
    same forward calls as ``encode``), to float rounding with any other chunking."""
    from brainalign.testing import write_toy_dataset
    from brainalign.train.ray_worker import VAL_CHUNK

    root = write_toy_dataset(tmp_path / "toy", subjects=("01",), n_train_concepts=10, n_test=4, noise=0.3)
    _, run = _fit(root, 1)
    x, idx, _ = _toy_tensors(root)
    x = torch.cat([x] * 20)[:1100]  # more than two chunks
    idx = torch.cat([idx] * 20)[:1100]
    whole = evaluate(run, x, idx, None)

    def chunks(n: int) -> list[dict[str, torch.Tensor]]:
        return [{"epoch": x[s : s + n], "image_index": idx[s : s + n]} for s in range(0, len(x), n)]

    assert VAL_CHUNK == 512
    z, ii = encode_batches(run, chunks(VAL_CHUNK))
    assert z.shape == (1100, run.image_emb.shape[1]) and torch.equal(ii, idx)
    assert evaluate_embeddings(run, z, ii) == whole
    other = evaluate_embeddings(run, *encode_batches(run, chunks(37)))
    assert other["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
    assert (other["val_top1"], other["val_top5"]) == (whole["val_top1"], whole["val_top5"])
    empty_z, empty_i = encode_batches(run, [])
    assert empty_z.shape == (0, run.image_emb.shape[1]) and empty_i.numel() == 0


def test_shuffle_buffer_is_bounded_in_bytes_not_rows() -> None:
    from brainalign import BrainalignError
    from brainalign.train.ray_worker import shuffle_buffer_rows

    row = 63 * 250 * 4  # a full-size EEG row (63 KB)
    cfg = TrainConfig(shuffle_buffer_mb=256)
    # Ray's buffer peaks at ~3.5x its minimum fill: the minimum is a quarter of the budget
    assert shuffle_buffer_rows(cfg, row, 10**6, 128) == 64 * 2**20 // row  # 1,065 rows, whatever the data
    assert shuffle_buffer_rows(cfg, row, 700, 128) == 700  # all rows when they fit
    assert shuffle_buffer_rows(cfg, 10 * 2**20, 10**6, 32) == 4 * 32  # at least 4 batches
    # the default (1 GiB) bounds one full-size subject (14,886 rows) and four (59,544) alike
    assert shuffle_buffer_rows(TrainConfig(), row, 14_886, 128) == shuffle_buffer_rows(TrainConfig(), row, 59_544, 128)
    assert 3.5 * shuffle_buffer_rows(TrainConfig(), row, 59_544, 128) * row <= 2**30
    with pytest.raises(BrainalignError, match="shuffle_buffer_mb"):
        TrainConfig(shuffle_buffer_mb=0)


def test_validation_loss_does_not_depend_on_the_trial_batch_size(tmp_path: Path) -> None:
    """The same model evaluated under batch_size 8 and 64 gives the same val loss: the loss is
    over the full validation gallery (chance ~ log N), not over batches of the trial's size
    (chance log B, which would favour small batches in a val_loss search)."""
    import math

    from brainalign.testing import write_toy_dataset

    root = write_toy_dataset(tmp_path / "toy", subjects=("01",), n_train_concepts=10, n_test=4, noise=0.3)
    x, idx, emb = _toy_tensors(root)
    out = {}
    for bs in (8, 64):
        cfg = TrainConfig(data=DataConfig(path=str(root)), batch_size=bs, seed=3)
        run = build_run(cfg, n_chans=x.shape[1], n_times=x.shape[2], image_emb=emb)
        out[bs] = evaluate(run, x, idx, None)
    assert out[8] == out[64]
    # it is the InfoNCE of all rows as one batch
    with torch.no_grad():
        from brainalign.train.loop import encode

        full = run.loss_fn(encode(run, x), emb[idx], idx).item()
    assert out[64]["val_loss"] == pytest.approx(full, rel=1e-5)
    # the old per-batch loss of the same model moved with the batch size (chance log B)
    with torch.no_grad():
        z = encode(run, x)
        per_batch = {bs: np.mean([run.loss_fn(z[s:s + bs], emb[idx[s:s + bs]], idx[s:s + bs]).item()
                                  for s in range(0, len(z) - bs + 1, bs)]) for bs in (8, 64)}
    assert per_batch[64] - per_batch[8] > 1.0
    # one distinct image: nothing to contrast, the loss is NaN rather than a perfect 0
    one = evaluate(run, x[:3], torch.full((3,), int(idx[0])), None)
    assert math.isnan(one["val_loss"])


def test_learned_temperature_can_leave_the_cap(tmp_path: Path) -> None:
    """Matched pairs push T down to the cap (0.01), where the optimizer step hook holds it;
    unmatched pairs then pull it back up: its gradient is alive at the cap. With the old
    forward clamp on exp(logit_scale) the parameter overshot the cap, its gradient was 0
    and T stayed at 0.01 for good."""
    import math

    from brainalign.losses import MAX_LOGIT_SCALE

    emb = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(learn_temperature=True, temperature=0.05, lr=0.5, weight_decay=0.0, seed=0)
    run = build_run(cfg, n_chans=4, n_times=100, image_emb=emb)
    cap = math.log(MAX_LOGIT_SCALE)

    def step(brain: torch.Tensor) -> None:
        run.optimizer.zero_grad(set_to_none=True)
        run.loss_fn(brain, emb).backward()
        run.optimizer.step()

    for _ in range(20):
        step(emb)  # perfect matches: lower T always lowers the loss
        assert run.loss_fn.logit_scale.item() <= cap + 1e-7  # the cap holds after every step
    assert run.loss_fn.temperature == pytest.approx(0.01, rel=1e-5)
    run.optimizer.zero_grad(set_to_none=True)
    noise = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    run.loss_fn(noise, emb).backward()
    assert run.loss_fn.logit_scale.grad.abs().item() > 0  # alive at the cap
    for _ in range(5):
        step(noise)  # unrelated pairs: a higher T lowers the loss
    assert run.loss_fn.temperature > 0.02
    with pytest.raises(ValueError, match="initial value of a learned temperature"):
        TrainConfig(learn_temperature=True, temperature=0.005)
