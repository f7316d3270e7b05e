"""Images/s of the Ray Data embed pipeline vs a plain sequential loop, same model, on CPU.

Both paths run the same decode (``decode_batch``) and the same model actor code
(``EmbedActor``); the sequential one calls them in a Python loop in this process, the Ray
one is ``embed_catalog`` (parallel decode tasks + a 1-CPU model actor). Both timings include
loading the model; the Ray one is run twice (cold: fresh worker processes; warm: ``force=True``
again in the same Ray session). The outputs are compared (max |difference|).

Usage::

    python benchmarks/bench_embed.py                       # tiny timm test_vit, 256 images
    python benchmarks/bench_embed.py --encoder efficientnet_lite0:none --n-images 128
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(root: Path, n: int, side: int) -> Path:
    from PIL import Image

    from brainalign.data.contract import write_catalog

    (root / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side]
    names = []
    for k in range(n):
        f = rng.uniform(1, 8, 3)
        arr = np.stack([127 + 120 * np.sin(2 * np.pi * f[c] * (x + k) / side + c) for c in range(3)], -1)
        arr = np.clip(arr + rng.normal(0, 20, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "imgs" / f"im{k:05d}.jpg", quality=90)
        names.append(f"imgs/im{k:05d}.jpg")
    write_catalog(root / "images.parquet", [f"im{k:05d}" for k in range(n)], ["c"] * n, ["train"] * n, names)
    return root / "images.parquet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="tiny-test_vit:none")
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--side", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ray-cpus", type=int, default=max(4, os.cpu_count() or 1))
    args = ap.parse_args()

    import ray
    import torch

    from brainalign.data.contract import read_embedding_table
    from brainalign.images import embed_catalog, embed_images_local, image_encoder_info
    from brainalign.images.testing import register_tiny_encoders, write_tiny_weights

    work = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        weights = write_tiny_weights(work / "weights")
        register_tiny_encoders()
        spec, alignment = image_encoder_info(args.encoder)
        cat = make_images(work / "cat", args.n_images, args.side)
        files = [cat.parent / f"imgs/im{k:05d}.jpg" for k in range(args.n_images)]
        print(
            f"encoder {args.encoder}, {args.n_images} images {args.side}px JPEG, batch {args.batch_size}, "
            f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
        )

        t0 = time.perf_counter()
        seq = embed_images_local(args.encoder, files, weights=weights, batch_size=args.batch_size)[alignment]
        t_seq = time.perf_counter() - t0

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        runs = []
        for k in range(2):  # cold (fresh worker processes), then warm (workers already up)
            t0 = time.perf_counter()
            report = embed_catalog(
                cat, args.encoder, work / "tables", weights=weights, batch_size=args.batch_size, force=k > 0
            )
            runs.append(time.perf_counter() - t0)
        table = read_embedding_table(report.written[args.encoder])
        diff = float(np.abs(table.vectors - seq).max())

        n = args.n_images
        print(f"sequential loop : {t_seq:7.2f} s  {n / t_seq:8.1f} img/s  (decode + model in one process)")
        for label, t in zip(("Ray Data cold  ", "Ray Data warm  "), runs, strict=True):
            print(f"{label} : {t:7.2f} s  {n / t:8.1f} img/s  ({args.ray_cpus} logical CPUs, 1 model actor)")
        print(f"ratio Ray/sequential img/s: cold {t_seq / runs[0]:.2f}x, warm {t_seq / runs[1]:.2f}x")
        print(f"same outputs: max |ray - sequential| = {diff:.2e} ({'OK' if diff < 1e-4 else 'MISMATCH'})")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
