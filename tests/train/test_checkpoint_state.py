"""A pack's checkpoint: where a restarted worker group resumes, and every finished run's
best weights kept in the latest checkpoint (read back through Ray's Checkpoint API)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint

from brainalign import BrainalignError
from brainalign.config import TrainConfig
from brainalign.train.loop import EarlyStopping, build_run
from brainalign.train.ray_worker import load_checkpoint, restore_state, run_files, write_checkpoint


def _run(seed: int):  # a tiny NICE run with a recorded best epoch
    torch.manual_seed(seed)
    cfg = TrainConfig(epochs=4, seed=seed, select_metric="val_top1")
    run = build_run(cfg, n_chans=4, n_times=100, image_emb=torch.randn(10, 8))
    stopper = EarlyStopping(cfg.select_metric, cfg.patience)
    run.epoch = 2
    stopper.update(run, {"val_top1": 0.25 + seed / 10, "val_loss": 1.0})
    return run, stopper


def test_the_latest_checkpoint_of_a_pack_holds_every_finished_run(tmp_path: Path) -> None:
    first, s1 = _run(1)
    second, s2 = _run(2)
    finished = {0: (s1.state_copy(), {"best_epoch": s1.best_epoch, "report": {"val_top1": 0.35}})}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_checkpoint(folder, second, s2, {"val_top1": 0.45, "epoch": 1}, pack_index=1, n_runs=3, finished=finished)
    assert sorted(p.name for p in folder.iterdir()) == ["best-0.json", "best-1.json", "model-0.pt", "model-1.pt",
                                                         "state.pt"]
    state, done = load_checkpoint(Checkpoint.from_directory(str(folder)), 3)
    # run 1 has not ended: a restart resumes it (run 0 is skipped, its weights kept)
    assert state["pack_index"] == 1 and not state["done"] and list(done) == [0]
    w0 = done[0][0]
    assert all(torch.equal(w0[k], s1.best_state[k]) for k in w0) and done[0][1]["report"]["val_top1"] == 0.35
    fresh, stopper = _run(3)
    restore_state(fresh, stopper, state)
    assert fresh.epoch == 2 and stopper.best_epoch == s2.best_epoch
    assert all(torch.equal(v, second.model.state_dict()[k]) for k, v in fresh.model.state_dict().items())
    # once run 1 has ended, the same pack resumes with run 2 and keeps runs 0 and 1
    write_checkpoint(folder, second, s2, {"val_top1": 0.45}, pack_index=1, n_runs=3, finished=finished, done=True)
    state, done = load_checkpoint(Checkpoint.from_directory(str(folder)), 3)
    assert state["done"] and sorted(done) == [0, 1]
    assert run_files(0, 1) == ("model.pt", "best.json") and run_files(2, 3) == ("model-2.pt", "best-2.json")


def test_a_checkpoint_of_another_version_is_refused(tmp_path: Path) -> None:
    run, stopper = _run(1)
    write_checkpoint(tmp_path, run, stopper, {})
    state, _ = load_checkpoint(Checkpoint.from_directory(str(tmp_path)))
    with pytest.raises(BrainalignError, match="state version 1.*Remove the run's Ray storage folder"):
        restore_state(*_run(2), state | {"version": 1})
