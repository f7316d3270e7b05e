"""Figures of the gradient analysis: temporal histograms, band energies, topomaps (matplotlib Agg)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["study_figures", "topomap"]

log = logging.getLogger(__name__)
_COLORS = {"aligned": "#1f77b4", "base": "#7f7f7f"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stars(p: float) -> str:
    if p is None or math.isnan(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "n.s."


def _p_of(stats: Mapping[str, list[dict[str, Any]]], comp: str, measure: str) -> float:
    for r in stats.get(comp, []):
        if r["measure"] == measure:
            return float(r["p_holm"])
    return float("nan")


def _groups(runs: Sequence[Any]) -> list[tuple[str, str]]:
    return sorted({(r.encoder, r.table.split(":")[0]) for r in runs})


def topomap(ax: Any, values: np.ndarray, ch_names: Sequence[str], modality: str, simulated: bool,
            cmap: str = "Reds", vlim: tuple[float, float] | None = None) -> Any:
    """Draw per-channel values on the dataset's sensor montage (MNE) or the voxel sheet.

    EEG: ``mne.viz.plot_topomap`` with the 10-05 template montage (``standard_1005``, in MNE
    1.13 ``colin27_1005``); MEG: MNE's CTF-275
    layout positions (2-D); simulated fMRI: a scatter over the voxel sheet. Returns the image
    (for a colour bar) or None where no positions are known.
    """
    import mne

    from ..data.simulate import ctf_layout, voxel_sheet

    if modality == "fmri":
        if not simulated:
            ax.text(0.5, 0.5, "no voxel positions\n(real fMRI)", ha="center", va="center")
            ax.set_axis_off()
            return None
        pos = voxel_sheet(len(values))
        im = ax.scatter(pos[:, 0], pos[:, 1], c=values, s=4, cmap=cmap,
                        vmin=None if vlim is None else vlim[0], vmax=None if vlim is None else vlim[1])
        ax.add_patch(_circle())
        ax.set_aspect("equal")
        ax.set_axis_off()
        return im
    # extrapolate only around the sensors: 17 occipito-parietal channels say nothing about the front
    kw: dict[str, Any] = {"axes": ax, "show": False, "cmap": cmap, "contours": 0, "extrapolate": "local"}
    if vlim is not None:
        kw["vlim"] = vlim
    try:
        if modality == "meg":
            im, _ = mne.viz.plot_topomap(values, ctf_layout(ch_names), sphere=1.08, **kw)
        else:
            info = mne.create_info(list(ch_names), 100.0, "eeg")
            info.set_montage(_eeg_montage(), match_case=False, on_missing="raise")
            im, _ = mne.viz.plot_topomap(values, info, **kw)
        return im
    except Exception as e:  # a channel set the montage cannot place: say so in the figure
        log.warning("topomap not drawn: %s", e)
        ax.text(0.5, 0.5, f"no montage for\nthese channels\n({type(e).__name__})", ha="center", va="center")
        ax.set_axis_off()
        return None


def _eeg_montage() -> str:
    """The 10-05 template montage: ``standard_1005``, renamed ``colin27_1005`` in MNE 1.13."""
    import mne

    names = mne.channels.get_builtin_montages()
    return "colin27_1005" if "colin27_1005" in names else "standard_1005"


def _circle() -> Any:
    from matplotlib.patches import Circle

    return Circle((0, 0), 1.0, fill=False, lw=1, color="k")


def study_figures(runs: Sequence[Any], stats: Mapping[str, list[dict[str, Any]]], out: Path) -> dict[str, Path]:
    """``temporal.png``, ``spectral.png`` and ``spatial.png`` (those that apply) in ``out``."""
    from .explain import BANDS

    plt = _plt()
    files: dict[str, Path] = {}
    groups = _groups(runs)
    timed = [(g, m) for g in groups for m in ("gradcam", "ig")
             if any(m in r.views and len(r.views[m].times) > 1 for r in runs
                    if (r.encoder, r.table.split(":")[0]) == g)]
    if timed:
        # temporal: App. G.1 histogram of above-p99 values over time, every subject and seed
        fig, axes = plt.subplots(1, len(timed), figsize=(4.6 * len(timed), 3.2), squeeze=False)
        for ax, ((enc, bb), m) in zip(axes[0], timed, strict=True):
            comp = f"{enc} x {bb} / {m}"
            for arm in ("aligned", "base"):
                sel = [r.views[m] for r in runs if r.arm == arm and m in r.views
                       and (r.encoder, r.table.split(":")[0]) == (enc, bb)]
                if not sel:
                    continue
                t = sel[0].times * 1000
                counts = np.sum([v.temporal_counts for v in sel], 0)
                ax.step(t, counts / max(counts.sum(), 1), where="mid", color=_COLORS[arm], label=f"{arm} ({len(sel)} runs)")
                com = np.mean([v.summary.get("temporal_com_s", np.nan) for v in sel]) * 1000
                ax.axvline(com, color=_COLORS[arm], ls=":", lw=1)
            p = _p_of(stats, comp, "temporal_com_s")
            ax.set_title(f"{enc} × {bb}, {'Grad-CAM' if m == 'gradcam' else 'integrated gradients'}\n"
                         f"centre of mass (dotted): p_Holm = {p:.2g} {_stars(p)}", fontsize=9)
            ax.set_xlabel("time after onset (ms)")
            ax.set_ylabel("share of values > p99")
            ax.legend(frameon=False, fontsize=7)
        fig.tight_layout()
        files["temporal.png"] = out / "temporal.png"
        _save(fig, files["temporal.png"])
        plt.close(fig)

        # spectral: App. G.2 normalized periodogram energy per band
        fig, axes = plt.subplots(1, len(timed), figsize=(4.6 * len(timed), 3.2), squeeze=False)
        names = [b[0] for b in BANDS]
        for ax, ((enc, bb), m) in zip(axes[0], timed, strict=True):
            comp = f"{enc} x {bb} / {m}"
            x = np.arange(len(names))
            tops = []
            for k, arm in enumerate(("base", "aligned")):
                per_sub: dict[str, list[list[float]]] = {}
                for r in runs:
                    if r.arm == arm and m in r.views and (r.encoder, r.table.split(":")[0]) == (enc, bb):
                        per_sub.setdefault(r.subject, []).append([r.views[m].bands[n] for n in names])
                if not per_sub:
                    continue
                vals = np.array([np.mean(v, 0) for v in per_sub.values()])
                mean = vals.mean(0)
                sem = vals.std(0, ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else np.zeros(len(names))
                ax.bar(x + (k - 0.5) * 0.38, mean, 0.38, yerr=sem, capsize=2, color=_COLORS[arm], label=arm)
                tops.append(mean + sem)
            if tops:
                top = np.max(tops, 0)
                for i, n in enumerate(names):
                    ax.text(x[i], top[i] * 1.05 + 0.005, _stars(_p_of(stats, comp, f"band_{n}")), ha="center",
                            fontsize=7)
            ax.set_yscale("log")
            ax.set_xticks(x, names)
            ax.set_ylabel("normalized energy")
            ax.set_title(f"{enc} × {bb}, {'Grad-CAM' if m == 'gradcam' else 'integrated gradients'}", fontsize=9)
            ax.legend(frameon=False, fontsize=7)
        fig.text(0.01, 0.01, "mean ± s.e.m. over subjects (seed-averaged); * p_Holm < .05 (sign-flip permutation "
                 "test across subjects, Holm over the measures)", fontsize=7)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        files["spectral.png"] = out / "spectral.png"
        _save(fig, files["spectral.png"])
        plt.close(fig)

    spatial = [g for g in groups if any("ig" in r.views and r.views["ig"].channels is not None for r in runs
                                        if (r.encoder, r.table.split(":")[0]) == g)]
    if spatial:
        fig, axes = plt.subplots(len(spatial), 3, figsize=(9.5, 3.2 * len(spatial)), squeeze=False)
        for row, (enc, bb) in zip(axes, spatial, strict=True):
            comp = f"{enc} x {bb} / ig"
            maps = {}
            ref = None
            for arm in ("aligned", "base"):
                sel = [r for r in runs if r.arm == arm and "ig" in r.views and (r.encoder, r.table.split(":")[0]) == (enc, bb)]
                if sel:
                    maps[arm] = np.mean([r.views["ig"].channels for r in sel], 0)
                    ref = sel[0]
            if ref is None or len(maps) < 2:
                continue
            hi = max(float(maps["aligned"].max()), float(maps["base"].max()))
            for ax, arm in zip(row[:2], ("aligned", "base"), strict=True):
                im = topomap(ax, maps[arm], ref.ch_names, ref.modality, ref.simulated, "Reds", (0.0, hi))
                ax.set_title(f"{arm}: {enc} × {bb}", fontsize=9)
                if im is not None:
                    fig.colorbar(im, ax=ax, shrink=0.7)
            diff = maps["aligned"] - maps["base"]
            lim = float(np.abs(diff).max()) or 1e-12
            im = topomap(row[2], diff, ref.ch_names, ref.modality, ref.simulated, "RdBu_r", (-lim, lim))
            p = _p_of(stats, comp, "spatial_y")
            row[2].set_title(f"aligned − base\nfront-back centre: p_Holm = {p:.2g} {_stars(p)}", fontsize=9)
            if im is not None:
                fig.colorbar(im, ax=row[2], shrink=0.7)
        fig.suptitle("Integrated gradients: share of attribution per channel (mean over runs)", fontsize=9)
        fig.tight_layout()
        files["spatial.png"] = out / "spatial.png"
        _save(fig, files["spatial.png"])
        plt.close(fig)
    return files


def _save(fig: Any, path: Path) -> None:
    """Write a figure as PNG atomically (temp file, then rename)."""
    from .._io import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
