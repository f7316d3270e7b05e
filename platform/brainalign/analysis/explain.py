"""Gradient analysis of brain encoders (the paper's Section 5.5, Fig. 4 and App. G).

What is attributed: for a test trial ``x`` (repetition-averaged, normalized as in training)
and its image's embedding ``e``, the cosine similarity ``s(x) = <c(f(x)), c(e)>`` between the
brain encoder's output and the target, after the loss's mean-centring and L2 normalization
``c``. Two methods:

* **Grad-CAM** (Selvaraju et al. 2017), the paper's method: on a layer whose output keeps a
  time axis (NICE's ``projection``, AlignVis's ``encoder.0.projection.0``), the activations
  weighted by their time-averaged gradients, summed over filters, positive part, each trial
  normalized to [0, 1] and linearly interpolated to the input's length (App. G.1). The
  interpolation spreads the layer's steps evenly over the epoch, which is not where their
  receptive fields sit (NICE at 100 Hz: 6 steps seeing samples ``5p ... 5p + 74``, centred at
  0.37-0.62 s, drawn at 0.08-0.92 s; :func:`layer_receptive_fields` measures them and
  :func:`explain_run` records the centres): Grad-CAM's time axis is approximate. A
  ``(trials, n_times)`` map: it has no channel axis (the layer sits after NICE's spatial
  convolution), so it gives the temporal and spectral views only.
* **Integrated gradients** (Sundararajan et al. 2017) through Captum, layer-free: the input
  times the gradient averaged along the straight path from a zero epoch (the per-channel
  normalized data have mean 0) to ``x``; ``(trials, n_chans, n_times)``, positive part, each
  trial normalized to [0, 1]. It applies to every registered encoder, including the fMRI MLP
  (voxels x 1: spatial view only).

Views, per model (one final run), aligned vs base:

* **temporal** (App. G.1): the 99th percentile of a model's attribution values over all its
  test trials (and channels) is its threshold; the histogram over time of the values above it
  (``temporal_counts``); summaries: the centre of mass of the attribution over time
  (``temporal_com_s``) and the share of above-threshold values in 0-200 ms (``early_share``);
* **spectral** (App. G.2): the periodogram ``|X_k|^2 / N`` of each trial's (and channel's)
  attribution time course, energy per band (delta 0-4, theta 4-8, alpha 8-12, beta 12-30,
  gamma > 30 Hz) over the total energy (DC included, as the paper's Eq. 3), averaged over
  trials (``band_<name>``);
* **spatial**: the mean attribution per channel (summing to 1), drawn as an MNE topomap on the
  dataset's montage (the 10-05 template for EEG, MNE's CTF-275 layout for MEG, the voxel sheet
  for simulated fMRI); summary: the attribution-weighted mean front-back position
  (``spatial_y``: lower = more occipital) in the head frame of
  :func:`brainalign.data.simulate.sensor_layout`.

Statistics (:func:`subject_tests`, through :mod:`brainalign.stats`): each summary is averaged
over a subject's seeds, then aligned vs base is compared across subjects (exact sign-flip
permutation test as the primary test, paired t-test beside it), Holm-corrected over the
summaries of one method. The paper tested bands with an unpaired t-test over seeds; seeds are
not independent samples.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import BrainalignError, check_option, check_range

__all__ = [
    "BANDS",
    "GRADCAM_LAYERS",
    "METHODS",
    "Views",
    "attributions",
    "explain_model",
    "explain_run",
    "explain_study",
    "gradcam",
    "integrated_gradients",
    "layer_receptive_fields",
    "subject_tests",
    "views",
]

log = logging.getLogger(__name__)

#: EEG frequency bands (Hz) of Section 5.5: [low, high); gamma runs to Nyquist.
BANDS: tuple[tuple[str, float, float], ...] = (
    ("delta", 0.0, 4.0),
    ("theta", 4.0, 8.0),
    ("alpha", 8.0, 12.0),
    ("beta", 12.0, 30.0),
    ("gamma", 30.0, math.inf),
)
#: Grad-CAM layer of each encoder whose layer output keeps a time axis in step with the
#: input: (module path, time dimension of its output). ATM-S maps time through a learned
#: linear embedding first and the fMRI MLP has no time: integrated gradients only.
GRADCAM_LAYERS: dict[str, tuple[str, int]] = {
    "nice": ("projection", -1),  # AlignVis encoder.0.projection.0: (B, 40, 1, patches)
    "eegnet": ("backbone.conv_separable_point", -1),
    "eegconformer": ("backbone.patch_embedding.shallownet", -1),
    "shallowfbcspnet": ("backbone.conv_time_spat", 2),
}
METHODS = ("gradcam", "ig")
#: Seconds after onset counted as "early" (low-level visual processing, Section 5.5).
EARLY_S = 0.2
PERCENTILE = 99.0


# --------------------------------------------------------------------------- attribution
class _Similarity(nn.Module):
    """``x -> <c(f(x)), c(e)>`` per trial: the attributed output (``c`` = centre + L2)."""

    def __init__(self, encoder: nn.Module, subject_aware: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.subject_aware = subject_aware

    def forward(self, x: torch.Tensor, target: torch.Tensor, subject_index: torch.Tensor) -> torch.Tensor:
        from ..losses import center_normalize

        z = self.encoder(x, subject_index) if self.subject_aware else self.encoder(x)
        return (center_normalize(z.float()) * center_normalize(target.float())).sum(-1)


def _normalize_max(a: torch.Tensor) -> torch.Tensor:
    """Positive part, each trial scaled to max 1 (all-zero trials stay 0)."""
    a = a.clamp(min=0)
    peak = a.flatten(1).amax(1).clamp(min=1e-12)
    return a / peak.view(-1, *([1] * (a.dim() - 1)))


def _module(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def gradcam(
    model: nn.Module,
    encoder: str,
    x: torch.Tensor,
    targets: torch.Tensor,
    subject_index: torch.Tensor,
    *,
    subject_aware: bool = False,
    batch_size: int = 256,
) -> np.ndarray:
    """Grad-CAM of the similarity to the target on the encoder's time layer (App. G.1).

    Parameters
    ----------
    model : nn.Module
        The brain encoder, in eval mode.
    encoder : str
        Its registry name (a key of :data:`GRADCAM_LAYERS`).
    x : torch.Tensor
        ``(N, n_chans, n_times)`` test trials.
    targets : torch.Tensor
        ``(N, D)`` each trial's image embedding.
    subject_index : torch.Tensor
        ``(N,)`` subject index (used by subject-aware encoders).
    subject_aware : bool
        Whether the encoder takes ``subject_index``.
    batch_size : int
        Trials per backward pass.

    Returns
    -------
    np.ndarray
        ``(N, n_times)`` float32 in [0, 1]: per trial, the positive part of
        ``sum_f mean_t(grad_f) * act_f`` normalized to its maximum, linearly interpolated from
        the layer's time steps to the input's length (the paper's App. G.1; steps spread evenly).

    Raises
    ------
    BrainalignError
        The encoder has no Grad-CAM layer.
    """
    from captum.attr import LayerGradCam

    if encoder not in GRADCAM_LAYERS:
        raise BrainalignError(
            f"Grad-CAM needs a layer with a time axis; encoder {encoder!r} has none registered "
            f"(those with one: {sorted(GRADCAM_LAYERS)}). Use method 'ig'."
        )
    path, tdim = GRADCAM_LAYERS[encoder]
    objective = _Similarity(model, subject_aware).eval()
    layer = _module(model, path)
    cam = LayerGradCam(objective, layer)
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s : s + batch_size]
        a = cam.attribute(xb, additional_forward_args=(targets[s : s + batch_size], subject_index[s : s + batch_size]),
                          relu_attributions=True)  # (B, 1, ...) with the layer's spatial dims
        a = a.detach().movedim(tdim, -1).flatten(1, -2) if a.dim() > 3 else a.detach()
        a = a.sum(1) if a.dim() == 3 else a  # (B, steps): sum any remaining non-time dims
        # App. G.1 "interpolated to match the EEG input size": the layer's steps stretched evenly
        # over the epoch (captum's LayerAttribution.interpolate). Where the steps' receptive
        # fields really sit: layer_receptive_fields (recorded by explain_run).
        a = torch.nn.functional.interpolate(a.unsqueeze(1).float(), size=x.shape[-1], mode="linear")
        out.append(_normalize_max(a[:, 0]))
    return torch.cat(out).float().cpu().numpy()


def layer_receptive_fields(model: nn.Module, layer: nn.Module, tdim: int, x: torch.Tensor,
                           subject_index: torch.Tensor, subject_aware: bool) -> np.ndarray:
    """Receptive field over input time of each time step of ``layer``'s output, ``(steps, n_times)``.

    Found from the model itself: the gradient of step ``p``'s summed output with respect to the
    input (at ``x`` plus a little noise), summed over channels in absolute value, normalized to
    sum 1 per step. NICE's projection at 17 x 100 has 6 steps, each seeing 75 samples
    (``5p ... 5p + 74``): stretching the 6 values over the epoch, as the paper's interpolation to
    the input length does, draws the first at 80 ms although it sees 0-740 ms (centre 370 ms).
    """
    grabbed: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, o: grabbed.append(o))
    xg = (x.detach().clone() + 0.1 * torch.randn_like(x)).requires_grad_(True)
    try:
        with torch.enable_grad():
            model(xg, subject_index) if subject_aware else model(xg)
            out = grabbed[0].movedim(tdim, -1)
            fields = []
            for p in range(out.shape[-1]):
                (g,) = torch.autograd.grad(out[..., p].sum(), xg, retain_graph=True)
                fields.append(g.detach().abs().sum(dim=tuple(range(g.dim() - 1))).double().cpu().numpy())
    finally:
        hook.remove()
    w = np.stack(fields)
    total = w.sum(1, keepdims=True)
    if not np.all(total > 0):  # a step that sees nothing: spread the steps evenly instead
        edges = np.linspace(0, x.shape[-1], len(w) + 1).round().astype(int)
        w = np.zeros_like(w)
        for p in range(len(w)):
            w[p, edges[p] : max(edges[p + 1], edges[p] + 1)] = 1.0
        total = w.sum(1, keepdims=True)
    return np.asarray(w / total)


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    subject_index: torch.Tensor,
    *,
    subject_aware: bool = False,
    n_steps: int = 32,
    batch_size: int = 64,
) -> np.ndarray:
    """Integrated gradients of the similarity to the target from a zero epoch (Captum).

    Parameters
    ----------
    model, x, targets, subject_index, subject_aware
        As :func:`gradcam`.
    n_steps : int
        Riemann steps (Gauss-Legendre, Captum's default) along the path.
    batch_size : int
        Trials per call (each expands to ``n_steps`` forward/backward rows).

    Returns
    -------
    np.ndarray
        ``(N, n_chans, n_times)`` float32 in [0, 1]: positive part, per trial normalized to
        its maximum.
    """
    from captum.attr import IntegratedGradients

    check_range("n_steps", n_steps, low=1)
    ig = IntegratedGradients(_Similarity(model, subject_aware).eval())
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s : s + batch_size]
        a = ig.attribute(xb, baselines=torch.zeros_like(xb), n_steps=n_steps,
                         additional_forward_args=(targets[s : s + batch_size], subject_index[s : s + batch_size]),
                         internal_batch_size=max(batch_size, 1) * min(n_steps, 8))
        out.append(_normalize_max(a.detach()))
    return torch.cat(out).float().cpu().numpy()


def attributions(
    run: Any,
    x: np.ndarray,
    target_rows: Sequence[int],
    subject_index: int,
    methods: Sequence[str] = METHODS,
    *,
    ig_steps: int = 32,
) -> dict[str, np.ndarray]:
    """Attributions of a trained :class:`~brainalign.train.loop.Run` for test trials.

    Parameters
    ----------
    run : train.loop.Run
        Model (eval mode is set here) and the catalog's image embeddings (``run.image_emb``).
    x : np.ndarray
        ``(N, n_chans, n_times)`` test trials.
    target_rows : sequence of int
        Catalog row of each trial's image.
    subject_index : int
        The trials' subject among the training subjects (-1 unseen).
    methods : sequence of {"gradcam", "ig"}
        Methods; ``gradcam`` is skipped (with a log line) for encoders without a time layer.
    ig_steps : int
        Integrated-gradients steps.

    Returns
    -------
    dict
        ``method -> array``: ``gradcam`` ``(N, n_times)``, ``ig`` ``(N, n_chans, n_times)``.
    """
    for m in methods:
        check_option("method", m, METHODS)
    model = run.model.module if hasattr(run.model, "module") else run.model
    model.eval()
    dev = run.device
    xt = torch.from_numpy(np.ascontiguousarray(x)).float().to(dev)
    tg = run.image_emb[torch.as_tensor(list(target_rows), device=run.image_emb.device)].float().to(dev)
    si = torch.full((len(xt),), subject_index, dtype=torch.long, device=dev)
    out: dict[str, np.ndarray] = {}
    with torch.autocast(dev.type, enabled=False):
        for m in methods:
            if m == "gradcam":
                if run.cfg.encoder not in GRADCAM_LAYERS or x.shape[-1] < 2:
                    log.info("Grad-CAM skipped: encoder %r has no layer with a time axis", run.cfg.encoder)
                    continue
                out[m] = gradcam(model, run.cfg.encoder, xt, tg, si, subject_aware=run.subject_aware)
            else:
                out[m] = integrated_gradients(model, xt, tg, si, subject_aware=run.subject_aware, n_steps=ig_steps)
    return out


# --------------------------------------------------------------------------- views
@dataclass
class Views:
    """The three views of one model's attributions (one method).

    Attributes
    ----------
    method : str
    times : np.ndarray
        ``(n_times,)`` seconds after onset.
    temporal_counts : np.ndarray
        ``(n_times,)`` values above the model's 99th percentile, summed over trials (and channels).
    temporal_mass : np.ndarray
        ``(n_times,)`` mean attribution over trials (and channels), summing to 1.
    bands : dict of str to float
        Normalized periodogram energy per band (sums to 1).
    channels : np.ndarray or None
        ``(n_chans,)`` mean attribution per channel, summing to 1 (None for Grad-CAM).
    summary : dict of str to float
        ``temporal_com_s``, ``early_share``, ``band_<name>`` and (with channels) ``spatial_y``.
    """

    method: str
    times: np.ndarray
    temporal_counts: np.ndarray
    temporal_mass: np.ndarray
    bands: dict[str, float]
    channels: np.ndarray | None
    summary: dict[str, float] = field(default_factory=dict)


def band_energy(a: np.ndarray, sfreq: float) -> dict[str, float]:
    """Periodogram band shares of time courses ``a`` (``(..., n_times)``), averaged over rows.

    ``S_k = |X_k|^2 / N`` (one-sided, DC included) of every row; each row's band energies are
    divided by its total energy; the shares are averaged over rows.
    """
    n_t = a.shape[-1]
    rows = a.reshape(-1, n_t).astype(np.float64)
    power = np.abs(np.fft.rfft(rows, axis=-1)) ** 2 / n_t
    freqs = np.fft.rfftfreq(n_t, 1.0 / sfreq)
    total = power.sum(-1, keepdims=True)
    share = np.divide(power, total, out=np.zeros_like(power), where=total > 0)
    return {name: float(share[:, (freqs >= lo) & (freqs < hi)].sum(-1).mean()) for name, lo, hi in BANDS}


def views(a: np.ndarray, method: str, times: np.ndarray, sfreq: float,
          positions: np.ndarray | None = None) -> Views:
    """Temporal, spectral and spatial views of one model's attributions.

    Parameters
    ----------
    a : np.ndarray
        ``(N, n_times)`` (Grad-CAM) or ``(N, n_chans, n_times)`` (IG), non-negative.
    method : str
        Recorded in the result.
    times : np.ndarray
        ``(n_times,)`` seconds.
    sfreq : float
        Sampling rate (Hz); 0 or ``n_times == 1`` (fMRI) leaves the time views empty.
    positions : np.ndarray, optional
        ``(n_chans, 2)`` head-frame positions for ``spatial_y``.
    """
    per_time = a if a.ndim == 2 else a.mean(1)  # (N, T)
    thr = np.percentile(a, PERCENTILE)
    above = (a >= thr) if thr > 0 else (a > 0)
    counts = above.sum(0) if a.ndim == 2 else above.sum((0, 1))
    mass = per_time.mean(0)
    mass = mass / mass.sum() if mass.sum() > 0 else mass
    summary: dict[str, float] = {}
    bands: dict[str, float] = {}
    if len(times) > 1 and sfreq > 0:
        summary["temporal_com_s"] = float((mass * times).sum())
        n_above = counts.sum()
        summary["early_share"] = float(counts[times < EARLY_S].sum() / n_above) if n_above else float("nan")
        bands = band_energy(a, sfreq)
        summary |= {f"band_{k}": v for k, v in bands.items()}
    channels = None
    if a.ndim == 3:
        ch = a.mean((0, 2))
        channels = ch / ch.sum() if ch.sum() > 0 else ch
        if positions is not None:
            summary["spatial_y"] = float((channels * positions[:, 1]).sum())
    return Views(method, np.asarray(times), counts.astype(np.float64), mass, bands, channels, summary)


def explain_model(run: Any, x: np.ndarray, target_rows: Sequence[int], subject_index: int, *,
                  times: np.ndarray, sfreq: float, positions: np.ndarray | None,
                  methods: Sequence[str] = METHODS, ig_steps: int = 32) -> dict[str, Views]:
    """:func:`attributions` then :func:`views`, per method."""
    att = attributions(run, x, target_rows, subject_index, methods, ig_steps=ig_steps)
    return {m: views(a, m, times, sfreq, positions) for m, a in att.items()}


def positions_for(ds: Any) -> np.ndarray | None:
    """Head-frame positions of a dataset's channels (None where they are unknown)."""
    from ..data.simulate import sensor_layout, voxel_sheet

    meta = ds.meta
    if meta.modality == "fmri":
        if meta.simulated:
            return voxel_sheet(meta.n_chans)
        return None
    try:
        return sensor_layout(meta.ch_names)
    except BrainalignError:
        return None


# --------------------------------------------------------------------------- statistics
def subject_tests(aligned: Mapping[str, Mapping[str, Sequence[float]]],
                  base: Mapping[str, Mapping[str, Sequence[float]]]) -> list[dict[str, Any]]:
    """Aligned vs base for every measure, at the subject level, Holm-corrected over the measures.

    The one place the gradient analysis does statistics; it delegates to
    :mod:`brainalign.stats`: :func:`~brainalign.stats.paired_comparison` per measure (each
    subject's seeds averaged first; the primary test is the exact sign-flip permutation test
    on the subject differences, with the paired t-test beside it) and
    :func:`~brainalign.stats.correct_family` (Holm) over the measures given.

    Parameters
    ----------
    aligned, base : mapping
        ``subject -> {measure: [value per seed]}``. A measure is compared over the subjects
        both arms have with finite values.

    Returns
    -------
    list of dict
        Per measure: ``measure, n, aligned_mean, base_mean, diff_mean, ci_low, ci_high`` (t-based
        95 % CI of the mean difference), ``d_z, t, p_t, p`` (sign-flip permutation),
        ``p_holm`` (Holm-adjusted permutation p), ``p_t_holm`` and ``notes``. NaN where a
        statistic is undefined (e.g. one subject).
    """
    from .. import stats

    subjects = sorted(set(aligned) & set(base))
    measures = sorted({k for s in subjects for k in aligned[s]} & {k for s in subjects for k in base[s]})
    comps = []
    for m in measures:
        a = {s: [float(v) for v in aligned[s].get(m, [])] for s in subjects}
        b = {s: [float(v) for v in base[s].get(m, [])] for s in subjects}
        keep = [s for s in subjects if a[s] and b[s] and np.isfinite(a[s]).all() and np.isfinite(b[s]).all()]
        if not keep:
            continue
        comps.append(stats.paired_comparison({s: a[s] for s in keep}, {s: b[s] for s in keep}, name=m,
                                             run_level=False, n_bootstrap=999))
    rows = []
    for c in stats.correct_family(comps, "holm") if comps else ():
        rows.append({"measure": c.name, "n": c.n_subjects, "aligned_mean": c.a.mean, "base_mean": c.b.mean,
                     "diff_mean": c.mean_difference, "ci_low": c.ci_t.low, "ci_high": c.ci_t.high, "d_z": c.d_z,
                     "t": c.t_test.statistic, "p_t": c.t_test.p, "p": c.permutation.p,
                     "p_holm": c.permutation.p_adjusted, "p_t_holm": c.t_test.p_adjusted,
                     "notes": "; ".join(c.notes)})
    return rows


# --------------------------------------------------------------------------- runs and studies
@dataclass
class RunExplanation:
    """A finished run's attribution views and its identity."""

    run_id: str
    encoder: str
    table: str
    arm: str
    subject: str
    seed: int
    modality: str
    sfreq: float
    ch_names: tuple[str, ...]
    simulated: bool
    views: dict[str, Views]
    seconds: float = 0.0


def _views_tables(views_: Mapping[str, Views]) -> dict[str, str]:
    """CSV texts: ``temporal.csv`` (per time), ``bands.csv``, ``channels.csv``."""
    out: dict[str, str] = {}
    any_v = next(iter(views_.values()))
    if len(any_v.times) > 1:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = [f"{m}_{k}" for m in views_ for k in ("count", "mass")]
        w.writerow(["time_s", *cols])
        for i, t in enumerate(any_v.times):
            w.writerow([f"{t:.4f}", *[f"{getattr(v, 'temporal_' + ('counts' if k == 'count' else 'mass'))[i]:.6g}"
                                       for v in views_.values() for k in ("count", "mass")]])
        out["temporal.csv"] = buf.getvalue()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", *[b[0] for b in BANDS]])
        for m, v in views_.items():
            w.writerow([m, *[f"{v.bands[b[0]]:.6g}" for b in BANDS]])
        out["bands.csv"] = buf.getvalue()
    chans = {m: v.channels for m, v in views_.items() if v.channels is not None}
    if chans:
        out["channels.csv"] = ""  # filled by the caller, which knows the names
    return out


def explain_run(run_id: str, *, methods: Sequence[str] = METHODS, ig_steps: int = 32,
                workdir: Path | None = None, log_artifacts: bool = True,
                uri: str | None = None) -> RunExplanation:
    """Attributions of a finished run's test trials; tables logged to the run (``explain/``).

    Loads ``config/resolved_config.json`` and ``checkpoint/model.pt`` (``weights_only=True``),
    reloads the test data of the run's subject from its dataset, computes ``methods`` and the
    three views, and logs ``explain/summary.json``, ``explain/temporal.csv``,
    ``explain/bands.csv`` and ``explain/channels.csv`` to the run.

    Raises
    ------
    BrainalignError
        The run is not finished, lacks its artifacts, or its dataset is gone.
    """
    from .. import tracking
    from ._runs import load_model, open_run

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fr = open_run(run_id, workdir or Path(tmp), uri)
        lm = load_model(fr)
    meta = lm.ds.meta
    times = meta.tmin + np.arange(meta.n_times) / meta.sfreq if meta.sfreq > 0 else np.full(1, meta.tmin)
    v = explain_model(lm.run, lm.test_x, lm.test_rows, lm.subject_index, times=times, sfreq=meta.sfreq,
                      positions=positions_for(lm.ds), methods=methods, ig_steps=ig_steps)
    out = RunExplanation(run_id=run_id, encoder=fr.cfg.encoder, table=fr.cfg.data.image_table, arm=fr.arm,
                         subject=fr.subject, seed=fr.seed, modality=meta.modality, sfreq=meta.sfreq,
                         ch_names=tuple(meta.ch_names), simulated=bool(meta.simulated), views=v,
                         seconds=time.perf_counter() - t0)
    if log_artifacts and v:
        tables = _views_tables(v)
        if "channels.csv" in tables:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            ms = [m for m in v if v[m].channels is not None]
            w.writerow(["channel", *ms])
            for i, name in enumerate(meta.ch_names):
                w.writerow([name, *[f"{v[m].channels[i]:.6g}" for m in ms]])  # type: ignore[index]
            tables["channels.csv"] = buf.getvalue()
        for name, text in tables.items():
            tracking.log_text(run_id, text, f"explain/{name}", uri=uri)
        extra: dict[str, Any] = {}
        if "gradcam" in v:  # where the Grad-CAM layer's steps really look (the map spreads them evenly)
            model = lm.run.model
            path, tdim = GRADCAM_LAYERS[fr.cfg.encoder]
            fields = layer_receptive_fields(model, _module(model, path), tdim,
                                            torch.from_numpy(lm.test_x[:1]).to(lm.run.device),
                                            torch.full((1,), lm.subject_index, dtype=torch.long),
                                            lm.run.subject_aware)
            extra["gradcam_step_centres_s"] = [float(t) for t in fields @ times]
        tracking.log_dict(run_id, {"methods": list(v), "ig_steps": ig_steps, "n_trials": len(lm.test_ids),
                                   "summary": {m: vv.summary for m, vv in v.items()}} | extra,
                          "explain/summary.json", uri=uri)
    log.info("explained run %s (%s) in %.1f s", run_id, fr.label, out.seconds)
    return out


def _by_subject(runs: Sequence[RunExplanation], method: str, arm: str) -> dict[str, dict[str, list[float]]]:
    """``subject -> {measure: [value per seed]}`` of one arm and method."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        if r.arm != arm or method not in r.views:
            continue
        for k, val in r.views[method].summary.items():
            acc.setdefault(r.subject, {}).setdefault(k, []).append(val)
    return acc


@dataclass
class StudyExplanation:
    """What :func:`explain_study` produced."""

    study: str
    runs: list[RunExplanation]
    stats: dict[str, list[dict[str, Any]]]  # method -> subject_tests rows, per encoder x backbone
    files: dict[str, Path]
    markdown: str
    seconds: float


def explain_study(name: str, *, methods: Sequence[str] = METHODS, ig_steps: int = 32,
                  out_dir: Path | None = None, experiment: str | None = None, study_run_id: str | None = None,
                  update_report: bool = True, uri: str | None = None) -> StudyExplanation:
    """Explain every tested run of a study, compare the arms, log and write the results.

    Per tested run: :func:`explain_run` (tables logged to the run). Per study: the figures
    ``temporal.png``, ``spectral.png``, ``spatial.png``, the tables ``stats.csv`` (subject-level
    tests), ``runs.csv`` (every run's summaries), ``stats.json`` and ``explain.md``, written to
    ``$BRAINALIGN_HOME/reports/<study>/explain/`` (or ``out_dir``) and logged to the study run
    under ``explain/``. The study report shows ``explain.md`` as its gradient-analysis section
    (``brainalign study report`` re-renders it from the study run's artifacts).

    Parameters
    ----------
    name : str
        The study name.
    methods : sequence of {"gradcam", "ig"}
        Attribution methods.
    ig_steps : int
        Integrated-gradients steps.
    out_dir : Path, optional
        Output folder (default ``$BRAINALIGN_HOME/reports/<study>/explain``).
    experiment, study_run_id : str, optional
        Where the study's runs are (see :func:`brainalign.analysis._runs.study_runs`).
    update_report : bool
        Also add the section to an existing ``reports/<study>/table.md`` and re-log it (the
        study engine, which renders the report afterwards, passes False).
    uri : str, optional
        Tracking URI.

    Raises
    ------
    BrainalignError
        No finished study of that name, or its runs cannot be reloaded.
    """
    from .. import paths, tracking
    from .._io import claim_dir
    from ._runs import study_runs

    t0 = time.perf_counter()
    sr = study_runs(name, uri, experiment=experiment, study_run_id=study_run_id)
    runs = [explain_run(r.run_id, methods=methods, ig_steps=ig_steps, uri=uri) for r in sr.finals]
    report_dir = paths.home() / "reports" / name
    if out_dir is None:
        claim_dir(report_dir, "report")
        out_dir = report_dir / "explain"
    out = claim_dir(out_dir, "report")
    stats: dict[str, list[dict[str, Any]]] = {}
    groups = sorted({(r.encoder, r.table.split(":")[0]) for r in runs})
    for enc, bb in groups:
        sel = [r for r in runs if r.encoder == enc and r.table.split(":")[0] == bb]
        for m in methods:
            al, ba = _by_subject(sel, m, "aligned"), _by_subject(sel, m, "base")
            if al and ba:
                stats[f"{enc} x {bb} / {m}"] = subject_tests(al, ba)
    files = _write_study_outputs(name, runs, stats, out)
    md = files.pop("_markdown").read_text()
    for f in files.values():
        tracking.log_artifact(sr.report.run_id, f, "explain", uri=uri)
    report_md = report_dir / "table.md"
    if update_report and report_md.is_file():
        _append_section(report_md, md, "explain/")
        tracking.log_artifact(sr.report.run_id, report_md, "report", uri=uri)
    return StudyExplanation(name, runs, stats, files, md, time.perf_counter() - t0)


_MARK = "<!-- brainalign explain -->"


def report_section(md: str, rel: str = "explain/") -> str:
    """``explain.md`` as a section of the study report (``table.md`` next to ``explain/``)."""
    return _MARK + "\n" + md.replace("](", f"]({rel}")


def _append_section(report_md: Path, md: str, rel: str) -> None:
    """Replace (or add) the gradient-analysis section at the end of a report's ``table.md``."""
    from .._io import atomic_file

    if not report_md.is_file():
        return
    text = report_md.read_text().split(_MARK)[0].rstrip() + "\n\n" + report_section(md, rel)
    with atomic_file(report_md) as tmp:
        tmp.write_text(text)


def _fmt(v: float, pct: bool = False) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.3g}"


def _write_text(path: Path, text: str) -> None:
    from .._io import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _write_study_outputs(name: str, runs: Sequence[RunExplanation], stats: Mapping[str, list[dict[str, Any]]],
                         out: Path) -> dict[str, Path]:
    from . import _figures

    files: dict[str, Path] = {}
    # every run's summaries
    keys = sorted({k for r in runs for v in r.views.values() for k in v.summary})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run_id", "encoder", "table", "arm", "subject", "seed", "method", *keys])
    for r in runs:
        for m, v in r.views.items():
            w.writerow([r.run_id, r.encoder, r.table, r.arm, r.subject, r.seed, m,
                        *[repr(v.summary[k]) if k in v.summary else "" for k in keys]])
    files["runs.csv"] = out / "runs.csv"
    _write_text(files["runs.csv"], buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["measure", "n", "aligned_mean", "base_mean", "diff_mean", "ci_low", "ci_high", "d_z", "t", "p_t", "p",
            "p_holm", "p_t_holm", "notes"]
    w.writerow(["comparison", *cols])
    for comp, rows in stats.items():
        for r in rows:
            w.writerow([comp, *[repr(r[c]) if isinstance(r[c], float) else r[c] for c in cols]])
    files["stats.csv"] = out / "stats.csv"
    _write_text(files["stats.csv"], buf.getvalue())
    files["stats.json"] = out / "stats.json"
    _write_text(files["stats.json"], json.dumps({"study": name, "stats": stats, "runs": [
        {k: v for k, v in asdict(r).items() if k != "views"} | {"summary": {m: vv.summary for m, vv in r.views.items()}}
        for r in runs]}, indent=2, default=float))
    figs = _figures.study_figures(runs, stats, out)
    files |= figs
    # markdown section
    lines = [f"## Gradient analysis (study {name})", "",
             "Attributions of each final model's similarity to the target image embedding, per test trial "
             "(Section 5.5 / App. G). Means over subjects of seed-averaged values; p: exact sign-flip "
             "permutation test on the subject differences (`brainalign.stats`), Holm-corrected over the "
             "measures of one method; t: paired t across subjects.", ""]
    for fig in ("temporal.png", "spectral.png", "spatial.png"):
        if fig in figs:
            lines.append(f"![{fig[:-4]}]({fig})")
    lines.append("")
    labels = {"temporal_com_s": "temporal centre of mass (s)", "early_share": "share above p99 in 0-200 ms",
              "spatial_y": "spatial centre (y; lower = occipital)"}
    for comp, rows in stats.items():
        lines += [f"### {comp}", "", "| measure | n subj. | aligned | base | aligned − base [95 % CI] | t | "
                  "p (perm.) | p (Holm) |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lab = labels.get(r["measure"], r["measure"].replace("band_", "band energy: "))
            lines.append(f"| {lab} | {r['n']} | {_fmt(r['aligned_mean'])} | {_fmt(r['base_mean'])} | "
                         f"{_fmt(r['diff_mean'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {_fmt(r['t'])} | "
                         f"{_fmt(r['p'])} | {_fmt(r['p_holm'])} |")
        notes = sorted({n for r in rows for n in r["notes"].split("; ") if n})
        lines += ["", *[f"- {n}" for n in notes], ""]
    files["explain.md"] = out / "explain.md"
    _write_text(files["explain.md"], "\n".join(lines) + "\n")
    files["_markdown"] = files["explain.md"]
    return files
