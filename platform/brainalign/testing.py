"""Small datasets in the exact contract, for tests and examples (cf. ``optuna.testing``).

:func:`write_toy_dataset` writes a learnable linear-Gaussian dataset in seconds: each image
has a latent ``z``; epochs are ``(z @ A)`` times a temporal bump plus white noise; the
embedding tables are linear maps of ``z`` (the "aligned" one with less nuisance noise).
The simulator (``brainalign.data.simulate``) is the scientific default; this is plumbing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.contract import DatasetMeta, DatasetWriter

__all__ = ["write_toy_dataset"]


def write_toy_dataset(
    root: Path | str,
    *,
    n_chans: int = 17,
    n_times: int = 100,
    n_train_concepts: int = 30,
    images_per_concept: int = 4,
    n_test: int = 20,
    train_reps: int = 2,
    test_reps: int = 4,
    subjects: tuple[str, ...] = ("01", "02"),
    dim: int = 32,
    noise: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write a toy dataset with tables ``toy:simulated`` and ``toy:none``; returns ``root``."""
    rng = np.random.default_rng(seed)
    ids = [f"tr{c:03d}_{i}" for c in range(n_train_concepts) for i in range(images_per_concept)]
    concepts = [f"c{c:03d}" for c in range(n_train_concepts) for _ in range(images_per_concept)]
    ids += [f"te{k:03d}" for k in range(n_test)]
    concepts += [f"t{k:03d}" for k in range(n_test)]
    splits = ["train"] * (n_train_concepts * images_per_concept) + ["test"] * n_test
    z = rng.normal(size=(len(ids), 16))
    mix = rng.normal(size=(16, n_chans))
    bump = np.exp(-0.5 * ((np.arange(n_times) - n_times * 0.3) / (n_times * 0.08)) ** 2)
    meta = DatasetMeta(
        name="toy", modality="eeg", ch_names=tuple(f"E{i}" for i in range(n_chans)), sfreq=100.0,
        tmin=0.0, n_times=n_times, subjects=subjects,
        source={"kind": "simulated", "generator": "brainalign.testing.write_toy_dataset", "seed": seed},
    )
    with DatasetWriter(root, meta, replace=True) as w:
        w.write_catalog(ids, concepts, splits)
        for subject in subjects:
            for split, reps in (("train", train_reps), ("test", test_reps)):
                sel = [i for i, s in enumerate(splits) if s == split]
                signal = (z[sel] @ mix)[:, None, :, None] * bump  # (n, 1, C, T)
                x = signal + noise * rng.normal(size=(len(sel), reps, n_chans, n_times))
                w.write_epochs(
                    subject, split,
                    [ids[i] for i in sel for _ in range(reps)],
                    [concepts[i] for i in sel for _ in range(reps)],
                    [r for _ in sel for r in range(reps)],
                    x.reshape(-1, n_chans, n_times).astype(np.float32),
                )
        proj = rng.normal(size=(16, dim))
        for alignment, nuisance in (("simulated", 0.5), ("none", 3.0)):
            vec = z @ proj + nuisance * rng.normal(size=(len(ids), dim))
            w.write_embedding_table(image_ids=ids, vectors=vec.astype(np.float32), backbone="toy",
                                    alignment=alignment, provenance={"simulated": True, "seed": seed})
    return Path(root)


def ddp_temperature_step(rank: int, world: int, port: int, out_dir: str) -> None:
    """One training step of a learned-temperature run on ``rank`` of a gloo group (for tests).

    Each rank sees different data, so unsynchronized temperatures would differ; writes the
    rank's temperature after the step to ``out_dir/rank-<rank>.txt``.
    """
    import os
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from .config import TrainConfig
    from .train.loop import build_run, train_one_epoch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        emb = torch.randn(32, 16)
        cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, learn_temperature=True, temperature=0.1, seed=0)
        run = build_run(cfg, n_chans=17, n_times=100, image_emb=emb)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        # several steps: AdamW's first step is lr * sign(grad) whatever the gradient's size
        batches = [{"epoch": torch.randn(8, 17, 100, generator=gen) * (1 + 3 * rank),
                    "image_index": torch.randperm(32, generator=gen)[:8]} for _ in range(4)]
        train_one_epoch(run, batches)
        Path(out_dir, f"rank-{rank}.txt").write_text(repr(run.loss_fn.temperature))
    finally:
        dist.destroy_process_group()
