"""Gradient analysis: attribution methods on every registered encoder, views, statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from brainalign._checks import BrainalignError
from brainalign.analysis.explain import (
    BANDS,
    GRADCAM_LAYERS,
    band_energy,
    gradcam,
    integrated_gradients,
    subject_tests,
    views,
)
from brainalign.encoders import create_encoder, encoder_info, list_encoders

SMALL = dict(n_chans=6, n_times=100, embed_dim=8)
#: encoders with no layer whose output keeps the input's time axis (Grad-CAM does not apply)
NO_TIME_LAYER = {"atms": "maps time through a learned linear embedding first", "mlp": "fMRI: no time axis"}


def test_every_encoder_is_covered() -> None:
    # a new encoder must say whether Grad-CAM applies (a layer in GRADCAM_LAYERS) or not
    assert set(GRADCAM_LAYERS) | set(NO_TIME_LAYER) == set(list_encoders())
    assert not set(GRADCAM_LAYERS) & set(NO_TIME_LAYER)


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor, bool]:
    torch.manual_seed(0)
    fmri = "fmri" in encoder_info(name).modalities
    shape = dict(n_chans=40, n_times=1, embed_dim=8) if fmri else SMALL
    arch = {"width": 16} if name == "mlp" else {}
    m = create_encoder(name, n_subjects=2, **shape, **arch).eval()
    return m, torch.randn(3, shape["n_chans"], shape["n_times"]), encoder_info(name).subject_aware


@pytest.mark.parametrize("name", list_encoders())
def test_attributions_of_every_encoder(name: str) -> None:
    model, x, aware = _model(name)
    target = torch.randn(len(x), 8)
    sid = torch.zeros(len(x), dtype=torch.long)
    ig = integrated_gradients(model, x, target, sid, subject_aware=aware, n_steps=4)
    assert ig.shape == tuple(x.shape) and np.isfinite(ig).all()
    assert ig.min() >= 0 and np.allclose(ig.reshape(len(x), -1).max(1), 1.0)  # positive part, max 1
    # integrated gradients are input x path gradient: an all-zero channel gets no attribution
    x0 = x.clone()
    x0[:, 2] = 0
    assert np.all(integrated_gradients(model, x0, target, sid, subject_aware=aware, n_steps=4)[:, 2] == 0)
    if name in GRADCAM_LAYERS:
        cam = gradcam(model, name, x, target, sid, subject_aware=aware)
        assert cam.shape == (len(x), x.shape[-1]) and cam.min() >= 0 and cam.max() <= 1 + 1e-6
    else:
        with pytest.raises(BrainalignError, match="Use method 'ig'"):
            gradcam(model, name, x, target, sid, subject_aware=aware)


def test_views_on_known_maps() -> None:
    sfreq, n_t = 100.0, 100
    times = np.arange(n_t) / sfreq
    a = np.zeros((4, 3, n_t))
    a[:, 0, 10:15] = 1.0  # early, channel 0
    a[:, 2, 60:70] = 0.5  # late, channel 2
    pos = np.array([[0, -1.0], [0, 0.0], [0, 0.5]])
    v = views(a, "ig", times, sfreq, pos)
    assert v.temporal_counts[10:15].sum() == v.temporal_counts.sum() > 0  # only the largest values are > p99
    expected_com = (5 * 0.12 + 10 * 0.5 * 0.645) / (5 + 5)
    assert v.summary["temporal_com_s"] == pytest.approx(expected_com)
    assert v.summary["early_share"] == 1.0
    assert v.channels is not None and v.channels.sum() == pytest.approx(1.0)
    assert v.summary["spatial_y"] == pytest.approx(0.5 * -1.0 + 0.5 * 0.5)
    # fMRI (one sample): no time views, the spatial one stays
    f = views(np.random.default_rng(0).random((4, 7, 1)), "ig", np.zeros(1), 0.0, np.zeros((7, 2)))
    assert "temporal_com_s" not in f.summary and f.bands == {} and "spatial_y" in f.summary


def test_band_energy_is_the_periodogram_share() -> None:
    sfreq, n_t = 200.0, 200
    t = np.arange(n_t) / sfreq
    alpha = np.sin(2 * np.pi * 10 * t)  # exactly on a frequency bin
    shares = band_energy(np.stack([alpha, 2 * alpha]), sfreq)
    assert shares["alpha"] == pytest.approx(1.0) and sum(shares.values()) == pytest.approx(1.0)
    mixed = band_energy((1.0 + np.sin(2 * np.pi * 40 * t))[None], sfreq)  # DC counts in delta (Eq. 3)
    p_dc, p_40 = n_t**2 / n_t, (n_t / 2) ** 2 / n_t
    assert mixed["delta"] == pytest.approx(p_dc / (p_dc + p_40)) and mixed["gamma"] == pytest.approx(
        p_40 / (p_dc + p_40))
    assert [b[0] for b in BANDS] == ["delta", "theta", "alpha", "beta", "gamma"]


def test_subject_tests_are_subject_level_with_holm() -> None:
    from brainalign import stats as bstats

    rng = np.random.default_rng(0)
    subjects = ["01", "02", "03", "04", "05"]
    # two seeds per subject: the test must average them first (seeds are not samples)
    a = {s: {"x": list(1 + rng.normal(0, 0.1, 2)), "y": list(rng.normal(size=2)), "z": [2.0, 2.0]} for s in subjects}
    b = {s: {"x": list(rng.normal(0, 0.1, 2)), "y": list(rng.normal(size=2)), "z": [2.0, 2.0]} for s in subjects}
    rows = {r["measure"]: r for r in subject_tests(a, b)}
    for m in ("x", "y"):
        am = [np.mean(a[s][m]) for s in subjects]
        bm = [np.mean(b[s][m]) for s in subjects]
        res = stats.ttest_rel(am, bm)
        assert rows[m]["p_t"] == pytest.approx(res.pvalue) and rows[m]["t"] == pytest.approx(res.statistic)
        assert rows[m]["n"] == 5 and rows[m]["diff_mean"] == pytest.approx(np.mean(am) - np.mean(bm))
        assert rows[m]["p"] == pytest.approx(bstats.sign_flip_test(np.subtract(am, bm)).p)  # exact, 2^5 patterns
    assert math.isnan(rows["z"]["p"])  # all differences zero: undefined, not counted by Holm
    expected = bstats.adjust_pvalues([rows["x"]["p"], rows["y"]["p"]], "holm")
    assert (rows["x"]["p_holm"], rows["y"]["p_holm"]) == pytest.approx(expected)
    # x: the largest possible effect with 5 subjects: exact p = 2 / 2^5, Holm x2
    assert rows["x"]["p"] == pytest.approx(2 / 32) and rows["x"]["p_holm"] == pytest.approx(min(1, 2 * 2 / 32))
