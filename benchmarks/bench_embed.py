"""Images/s of the Ray Data embed pipeline vs a plain sequential loop, same model, on CPU.

Both paths run the same decode (``decode_batch``) and the same model actor code
(``EmbedActor``); the sequential one calls them in a Python loop in this process, the Ray
one is ``embed_catalog`` (parallel decode tasks + a 1-CPU model actor). Both timings include
loading the model; the Ray one is run twice (cold: fresh worker processes; warm: ``force=True``
again in the same Ray session). The outputs are compared (max |difference|).

Usage: ``make bench`` (all benchmarks), or ``.venv/bin/python benchmarks/run_all.py --only embed``.
Both sides decode and embed the same generated JPEGs with a tiny timm ViT on CPU; with a GPU
lent, the same pipeline runs a real ViT-B with one model actor per GPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# benchmarks/ is sys.path[0] when this file runs as a script
from _common import EquivalenceError, Options, Result, bench_main, make_result


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


def measure(encoder: str, n_images: int, side: int, batch_size: int, work: Path) -> dict[str, Any]:
    """Sequential loop, then the Ray Data pipeline cold and warm, on the same generated JPEGs."""
    import ray
    import torch

    from brainalign.data.contract import read_embedding_table
    from brainalign.images import embed_catalog, embed_images_local, image_encoder_info
    from brainalign.images.testing import register_tiny_encoders, write_tiny_weights

    weights = write_tiny_weights(work / "weights")
    register_tiny_encoders()
    _spec, alignment = image_encoder_info(encoder)
    cat = make_images(work / "cat", n_images, side)
    files = [cat.parent / f"imgs/im{k:05d}.jpg" for k in range(n_images)]

    t0 = time.perf_counter()
    seq = embed_images_local(encoder, files, weights=weights, batch_size=batch_size)[alignment]
    t_seq = time.perf_counter() - t0

    cpus = max(4, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        runs = []
        for k in range(2):  # cold (fresh worker processes), then warm (workers already up)
            t0 = time.perf_counter()
            report = embed_catalog(cat, encoder, work / "tables", weights=weights, batch_size=batch_size,
                                   force=k > 0)
            runs.append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    table = read_embedding_table(report.written[encoder])
    return {"t_seq": t_seq, "t_cold": runs[0], "t_warm": runs[1], "max_abs_diff": float(np.abs(table.vectors - seq).max()),
            "ray_cpus": cpus, "torch_threads": torch.get_num_threads()}


def run(opts: Options) -> list[Result]:
    encoder, side, batch = "tiny-test_vit:none", 256, 32
    n = 64 if opts.quick else 256
    work = Path(tempfile.mkdtemp(prefix="bench_embed_", dir=opts.workdir))
    try:
        m = measure(encoder, n, side, batch, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if m["max_abs_diff"] > 1e-4:
        raise EquivalenceError(f"Ray Data and the sequential loop embed differently: max |diff| {m['max_abs_diff']:.3g}")
    raw = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()} | {
        "encoder": encoder, "images": n, "jpeg_side": side, "batch": batch}
    return [
        make_result(
            bench="embed", case=f"{encoder}, {n} JPEG {side}px, {label}", metric="images per second",
            ours=n / m[key], baseline=n / m["t_seq"], unit="img/s", ratio=m["t_seq"] / m[key],
            ratio_def="sequential time / Ray Data time", goal="", raw=raw if key == "t_cold" else {},
            notes=note,
        )
        for key, label, note in (
            ("t_cold", "cold", "includes starting Ray's worker processes and the model actor"),
            ("t_warm", "warm", "second run in the same Ray session (force=True)"),
        )
    ]


if __name__ == "__main__":
    raise SystemExit(bench_main("embed", run))
