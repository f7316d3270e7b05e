"""Render the simulator's images, so a simulated dataset can go through real image encoders.

A simulated dataset has no image files, only the perceptual factors each image was drawn
from (``<root>/simulator/latents.parquet``, see :func:`brainalign.data.simulate.read_latents`).
:func:`render_images` draws one small RGB PNG per image from them and writes a contract
catalog with paths, so that ``simulate -> embed (real encoder code) -> train`` runs end to
end on any machine.

The picture of an image (``size`` x ``size`` px, mid-grey background):

* a shape of class ``shape`` (:data:`brainalign.data.simulate.SHAPES`: circle, square,
  triangle, diamond, star, cross, ring, crescent), centred, of diameter ``size`` x side,
  rotated so that its axis points along ``orientation`` (radians);
* filled with the colour ``HSV(hue, saturation, brightness)``, modulated by a sinusoidal
  grating of ``spatial_freq`` cycles per image running along ``orientation``
  (intensity ``0.55 + 0.45 * cos(...)``);
* edges anti-aliased by drawing the mask at 4x and averaging down.

Rendering is deterministic (same latents -> byte-identical PNGs), so re-rendering leaves
image hashes, and hence up-to-date embedding tables, unchanged.
"""

from __future__ import annotations

import colorsys
import logging
import math
import os
from pathlib import Path

import numpy as np

from .._checks import BrainalignError, check_range, check_type
from .._io import atomic_dir, write_json_atomic
from ..data.contract import CATALOG, read_catalog, write_catalog

__all__ = ["default_render_dir", "render_image", "render_images"]

log = logging.getLogger(__name__)

_SUPERSAMPLE = 4
_BACKGROUND = 128


def _regular(n: int, r: float, phase: float) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _star(r: float, phase: float, points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = phase + np.pi * np.arange(2 * points) / points
    rr = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    return np.stack([rr * np.cos(a), rr * np.sin(a)], 1)


def _rotate(pts: np.ndarray, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    out: np.ndarray = pts @ np.array([[c, s], [-s, c]])
    return out


def _mask(shape_name: str, side: int, diameter: float, theta: float) -> np.ndarray:
    """Anti-aliased ``(side, side)`` float mask in [0, 1] of one shape."""
    from PIL import Image, ImageDraw

    big = side * _SUPERSAMPLE
    r = diameter * big / 2
    c = big / 2
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)

    def poly(pts: np.ndarray, fill: int = 255) -> None:
        # image y runs downwards; flip so that positive angles turn counter-clockwise
        xy = [(float(c + x), float(c - y)) for x, y in pts]
        draw.polygon(xy, fill=fill)

    def disc(cx: float, cy: float, rad: float, fill: int) -> None:
        draw.ellipse([c + cx - rad, c - cy - rad, c + cx + rad, c - cy + rad], fill=fill)

    if shape_name == "circle":
        disc(0, 0, r, 255)
    elif shape_name == "square":
        poly(_regular(4, r, theta + np.pi / 4))
    elif shape_name == "triangle":
        poly(_regular(3, r, theta))
    elif shape_name == "diamond":
        poly(_rotate(np.array([[r, 0], [0, 0.55 * r], [-r, 0], [0, -0.55 * r]]), theta))
    elif shape_name == "star":
        poly(_star(r, theta))
    elif shape_name == "cross":
        w = 0.32 * r
        for arm in (
            np.array([[r, w], [-r, w], [-r, -w], [r, -w]]),
            np.array([[w, r], [-w, r], [-w, -r], [w, -r]]),
        ):
            poly(_rotate(arm, theta))
    elif shape_name == "ring":
        disc(0, 0, r, 255)
        disc(0, 0, 0.55 * r, 0)
        # a gap along the axis makes the ring's orientation visible
        poly(
            _rotate(
                np.array([[0.0, 0.18 * r], [1.1 * r, 0.18 * r], [1.1 * r, -0.18 * r], [0.0, -0.18 * r]]),
                theta,
            ),
            0,
        )
    elif shape_name == "crescent":
        disc(0, 0, r, 255)
        disc(0.45 * r * math.cos(theta), 0.45 * r * math.sin(theta), 0.8 * r, 0)
    else:
        raise BrainalignError(f"Unknown shape {shape_name!r}.")
    small = img.resize((side, side), Image.Resampling.BOX)
    mask: np.ndarray = np.asarray(small, dtype=np.float32) / np.float32(255.0)
    return mask


def render_image(
    *,
    hue: float,
    saturation: float,
    brightness: float,
    shape: int,
    orientation: float,
    size: float,
    spatial_freq: float,
    side: int = 64,
) -> np.ndarray:
    """One image as ``uint8 (side, side, 3)`` from its perceptual factors.

    Parameters
    ----------
    hue : float
        Fraction of the colour wheel (taken modulo 1).
    saturation, brightness : float
        In [0, 1] (clipped).
    shape : int
        Index into :data:`brainalign.data.simulate.SHAPES`.
    orientation : float
        Radians; axis of the shape and of the grating.
    size : float
        Shape diameter / image side (clipped to [0.05, 1]).
    spatial_freq : float
        Grating cycles per image (clipped to [0.5, side / 2], below Nyquist).
    side : int
        Output side in pixels.
    """
    from ..data.simulate import SHAPES

    if not 0 <= int(shape) < len(SHAPES):
        raise BrainalignError(f"shape must be an index into {SHAPES} (0..{len(SHAPES) - 1}), got {shape!r}.")
    rgb = np.array(
        colorsys.hsv_to_rgb(
            float(hue) % 1.0, float(np.clip(saturation, 0, 1)), float(np.clip(brightness, 0, 1))
        ),
        dtype=np.float32,
    )
    theta = float(orientation)
    freq = float(np.clip(spatial_freq, 0.5, side / 2))
    m = _mask(SHAPES[int(shape)], side, float(np.clip(size, 0.05, 1.0)), theta)
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side - 0.5
    x, y = np.meshgrid(coords, -coords)
    grating = 0.55 + 0.45 * np.cos(2 * np.pi * freq * (x * math.cos(theta) + y * math.sin(theta)))
    tex = 255.0 * rgb[None, None, :] * grating[..., None]
    out = _BACKGROUND * (1 - m[..., None]) + tex * m[..., None]
    pixels: np.ndarray = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return pixels


def default_render_dir(dataset_root: str | os.PathLike[str]) -> Path:
    """``$BRAINALIGN_CACHE/rendered/<dataset name>-<fingerprint>`` (outside the dataset root,
    whose manifest lists every Parquet file it holds)."""
    from .. import paths
    from ..data.contract import open_dataset

    try:
        ds = open_dataset(Path(dataset_root))
        name = f"{ds.meta.name}-{ds.fingerprint}"
    except BrainalignError:
        name = Path(dataset_root).resolve().name
    return paths.cache_dir() / "rendered" / name


def render_images(
    dataset_root: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, size: int = 64
) -> Path:
    """Draw every image of a simulated dataset and write a catalog with their paths.

    Parameters
    ----------
    dataset_root : path
        A dataset written by ``brainalign data simulate`` (it holds ``images.parquet`` and
        ``simulator/latents.parquet``).
    out_dir : path, optional
        Where to write ``images/<image_id>.png`` and ``images.parquet`` (paths relative to
        it); replaced atomically, but only if it is empty or an earlier render (never a
        dataset or a folder brainalign did not create). Default :func:`default_render_dir`.
    size : int
        Image side in pixels (8..1024). Encoders resize to their own input size.

    Returns
    -------
    Path
        The written catalog (``<out_dir>/images.parquet``); image ids, concepts and splits
        are the dataset's, in its catalog order.

    Raises
    ------
    BrainalignError
        If the dataset has no latents, or lacks latents for some catalog images.
    """
    from .. import paths
    from ..data.simulate import LATENT_COLUMNS, read_latents

    check_type("size", size, int)
    check_range("size", size, low=8, high=1024)
    root = paths.resolve(dataset_root)
    out = paths.resolve(out_dir) if out_dir is not None else default_render_dir(root)
    if out == root or root in out.parents:
        raise BrainalignError(
            f"the rendered images cannot go to {out}: it is {'the dataset' if out == root else 'inside the dataset'} "
            f"{root}, whose manifest lists every file it holds. Choose a folder outside it (default: "
            f"{default_render_dir(root)})."
        )
    latents = read_latents(root)
    lacking = sorted(set(LATENT_COLUMNS) - set(latents.column_names))
    if lacking:
        raise BrainalignError(f"{root}/simulator/latents.parquet lacks columns {lacking}.")
    cat = read_catalog(root / CATALOG)
    ids = [str(i) for i in cat.column("image_id").to_pylist()]
    lat = {c: latents.column(c).to_numpy() for c in LATENT_COLUMNS if c != "image_id"}
    row = {str(k): i for i, k in enumerate(latents.column("image_id").to_pylist())}
    missing = [i for i in ids if i not in row]
    if missing:
        raise BrainalignError(
            f"{root}/simulator/latents.parquet has no factors for {len(missing)} catalog image(s), e.g. {missing[:5]}."
        )
    for i in ids:
        if "/" in i or "\\" in i or i.startswith("."):
            raise BrainalignError(f"image_id {i!r} cannot be used as a file name.")
    from PIL import Image

    rel = [f"images/{i}.png" for i in ids]
    with atomic_dir(out, kind="images", replace=True) as tmp:
        (tmp / "images").mkdir()
        for i, r in zip(ids, rel, strict=True):
            k = row[i]
            arr = render_image(
                hue=lat["hue"][k],
                saturation=lat["saturation"][k],
                brightness=lat["brightness"][k],
                shape=int(lat["shape"][k]),
                orientation=lat["orientation"][k],
                size=lat["size"][k],
                spatial_freq=lat["spatial_freq"][k],
                side=size,
            )
            Image.fromarray(arr, "RGB").save(tmp / r, format="PNG", optimize=False)
        write_catalog(
            tmp / CATALOG,
            ids,
            [str(c) for c in cat.column("concept").to_pylist()],
            [str(s) for s in cat.column("split").to_pylist()],
            rel,
        )
        write_json_atomic(tmp / "render.json", {"dataset": str(root), "size": size, "n_images": len(ids)})
    log.info("Rendered %d images (%dx%d) to %s", len(ids), size, size, out)
    return out / CATALOG
