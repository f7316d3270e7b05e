"""A simulated Things-EEG2 (and THINGS-MEG, NSD) with known ground truth, in the data contract.

Every image has interpretable *perceptual* factors (hue, saturation, brightness, shape,
orientation, size, spatial frequency) and a *semantic* latent (its concept's vector plus a
small image-specific deviation). A subject's EEG is a sum of ERP-like sources: early
(~100 ms) and mid (~170 ms) occipital sources driven mainly by the perceptual features,
late (250-500 ms) parietal/central sources driven mainly by the semantic latent, each a
spatial pattern on a 2-D scalp layout times a temporal kernel times an amplitude linear in
the latents (with a mild nonlinearity), with subject-specific patterns, latencies and
weights. Each trial adds spatially correlated 1/f noise, white sensor noise and an alpha
rhythm. Simulated image encoders (``sim-clip``, ``sim-dino``) mix perceptual, semantic and
nuisance information through random nonlinear maps; the *aligned* version weights the
perceptual part more, which is the paper's hypothesis about human-aligned encoders.

The same ground truth drives three modalities (``SimulatorParams.modality``): ``eeg`` (10-10
electrodes), ``meg`` (CTF-275 axial gradiometers on MNE's bundled layout, THINGS-MEG-like) and
``fmri`` (one value per voxel of a 2-D visual-cortex sheet, NSD-like: each source's blob of
voxels responds with its drive, no time axis).

Every equation and parameter is documented in ``docs/simulator.md``. The entry point is
:func:`simulate_dataset`; :func:`build_world` gives the ground truth (latents, noiseless
responses) of a simulated dataset for analyses and tests.

Image ids (stable, part of the contract of this simulator):

* concepts ``c00001`` ... : the first ``n_train_concepts`` are training concepts, the next
  ``n_test_concepts`` test concepts (train and test concepts are disjoint);
* training images ``tr{concept:05d}_{image:02d}`` (1-based, e.g. ``tr00001_01``);
* test images ``te{k:05d}`` (1-based; test image ``k`` is the only image of concept
  ``n_train_concepts + k``).

The catalog lists training images (concept-major) then test images; epoch rows are sorted
by image (catalog order) then repetition ``0 .. R-1``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .._checks import BrainalignError, check_option, check_range, check_type
from .contract import MANIFEST, DatasetMeta, DatasetWriter

__all__ = [
    "DATASET_NAME",
    "DATASET_NAMES",
    "GIFFORD_17",
    "MODALITIES",
    "LATENT_COLUMNS",
    "PRESETS",
    "SHAPES",
    "SIMULATOR",
    "THINGS_EEG2_63",
    "THINGS_MEG_271",
    "SimWorld",
    "SimulatorParams",
    "build_world",
    "channel_layout",
    "ctf_layout",
    "dataset_name",
    "make_params",
    "perceptual_features",
    "read_latents",
    "sensor_layout",
    "simulate_dataset",
    "things_meg_channels",
    "voxel_sheet",
    "world_from_dataset",
]

log = logging.getLogger(__name__)

#: Simulator id and version, stored in ``meta.source["simulator"]``. Bump the version when
#: the generated numbers change for the same parameters and seed.
SIMULATOR = "brainalign.sim/1"
#: ``DatasetMeta.name`` (the ``dataset=`` partition value) of a simulated EEG dataset.
DATASET_NAME = "things-eeg2-sim"
#: Simulated modalities and the dataset name each is written under.
MODALITIES = ("eeg", "meg", "fmri")
DATASET_NAMES = {"eeg": DATASET_NAME, "meg": "things-meg-sim", "fmri": "nsd-sim"}
#: Shape classes, index = the ``shape`` latent.
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "crescent")
#: Columns of ``<root>/simulator/latents.parquet``.
LATENT_COLUMNS = (
    "image_id",
    "hue",
    "saturation",
    "brightness",
    "shape",
    "orientation",
    "size",
    "spatial_freq",
)
LATENTS_FILE = Path("simulator") / "latents.parquet"

#: Gifford et al.'s 17 occipito-parietal channels (their 100 Hz preprocessed release).
GIFFORD_17 = (
    "O1",
    "Oz",
    "O2",
    "PO7",
    "PO3",
    "POz",
    "PO4",
    "PO8",
    "P7",
    "P5",
    "P3",
    "P1",
    "Pz",
    "P2",
    "P4",
    "P6",
    "P8",
)
#: The 63 Things-EEG2 channels in the order of the NICE/AlignVis preprocessing.
THINGS_EEG2_63 = (
    "Fp1 Fp2 AF7 AF3 AFz AF4 AF8 F7 F5 F3 F1 F2 F4 F6 F8 FT9 FT7 FC5 FC3 FC1 FCz FC2 FC4 FC6 FT8 FT10 "
    "T7 C5 C3 C1 Cz C2 C4 C6 T8 TP9 TP7 CP5 CP3 CP1 CPz CP2 CP4 CP6 TP8 TP10 P7 P5 P3 P1 Pz P2 P4 P6 P8 "
    "PO7 PO3 POz PO4 PO8 O1 Oz O2"
).split()

#: THINGS-MEG's 271 CTF sensors as the simulator names them (:func:`things_meg_channels`: MNE's
#: CTF-275 layout minus its four most anterior sensors), without the system's ``-NNNN`` suffix.
THINGS_MEG_271 = (
    "MLC11 MLC12 MLC13 MLC14 MLC15 MLC16 MLC17 MLC21 MLC22 MLC23 MLC24 MLC25 MLC31 MLC32 MLC41 MLC42 "
    "MLC51 MLC52 MLC53 MLC54 MLC55 MLC61 MLC62 MLC63 MLF12 MLF13 MLF14 MLF21 MLF22 MLF23 MLF24 MLF25 "
    "MLF31 MLF32 MLF33 MLF34 MLF35 MLF41 MLF42 MLF43 MLF44 MLF45 MLF46 MLF51 MLF52 MLF53 MLF54 MLF55 "
    "MLF56 MLF61 MLF62 MLF63 MLF64 MLF65 MLF66 MLF67 MLO11 MLO12 MLO13 MLO14 MLO21 MLO22 MLO23 MLO24 "
    "MLO31 MLO32 MLO33 MLO34 MLO41 MLO42 MLO43 MLO44 MLO51 MLO52 MLO53 MLP11 MLP12 MLP21 MLP22 MLP23 "
    "MLP31 MLP32 MLP33 MLP34 MLP35 MLP41 MLP42 MLP43 MLP44 MLP45 MLP51 MLP52 MLP53 MLP54 MLP55 MLP56 "
    "MLP57 MLT11 MLT12 MLT13 MLT14 MLT15 MLT16 MLT21 MLT22 MLT23 MLT24 MLT25 MLT26 MLT27 MLT31 MLT32 "
    "MLT33 MLT34 MLT35 MLT36 MLT37 MLT41 MLT42 MLT43 MLT44 MLT45 MLT46 MLT47 MLT51 MLT52 MLT53 MLT54 "
    "MLT55 MLT56 MLT57 MRC11 MRC12 MRC13 MRC14 MRC15 MRC16 MRC17 MRC21 MRC22 MRC23 MRC24 MRC25 MRC31 "
    "MRC32 MRC41 MRC42 MRC51 MRC52 MRC53 MRC54 MRC55 MRC61 MRC62 MRC63 MRF13 MRF14 MRF21 MRF22 MRF23 "
    "MRF24 MRF25 MRF31 MRF32 MRF33 MRF34 MRF35 MRF41 MRF42 MRF43 MRF44 MRF45 MRF46 MRF51 MRF52 MRF53 "
    "MRF54 MRF55 MRF56 MRF61 MRF62 MRF63 MRF64 MRF65 MRF66 MRF67 MRO11 MRO12 MRO13 MRO14 MRO21 MRO22 "
    "MRO23 MRO24 MRO31 MRO32 MRO33 MRO34 MRO41 MRO42 MRO43 MRO44 MRO51 MRO52 MRO53 MRP11 MRP12 MRP21 "
    "MRP22 MRP23 MRP31 MRP32 MRP33 MRP34 MRP35 MRP41 MRP42 MRP43 MRP44 MRP45 MRP51 MRP52 MRP53 MRP54 "
    "MRP55 MRP56 MRP57 MRT11 MRT12 MRT13 MRT14 MRT15 MRT16 MRT21 MRT22 MRT23 MRT24 MRT25 MRT26 MRT27 "
    "MRT31 MRT32 MRT33 MRT34 MRT35 MRT36 MRT37 MRT41 MRT42 MRT43 MRT44 MRT45 MRT46 MRT47 MRT51 MRT52 "
    "MRT53 MRT54 MRT55 MRT56 MRT57 MZC01 MZC02 MZC03 MZC04 MZF02 MZF03 MZO01 MZO02 MZO03 MZP01 "
).split()

# Independent random streams: SeedSequence(seed, spawn_key=(stream, ...)).
_S_LATENTS, _S_BRAIN, _S_TRIAL, _S_ENCODER = 1, 2, 3, 4
# Rows of epochs generated (and written as one part file) at a time: about 32 MB of float32.
_CHUNK_BYTES = 32 << 20


# --------------------------------------------------------------------------- scalp layout
_ROWS = {
    "FP": 1,
    "AF": 2,
    "F": 3,
    "FC": 4,
    "FT": 4,
    "C": 5,
    "T": 5,
    "CP": 6,
    "TP": 6,
    "P": 7,
    "PO": 8,
    "O": 9,
    "I": 10,
}
_CH_RE = re.compile(r"^(FP|AF|FT|FC|TP|CP|PO|F|C|T|P|O|I)(Z|\d+)$")


def channel_layout(ch_names: Sequence[str]) -> np.ndarray:
    """Approximate 2-D positions of 10-10 electrodes, ``(n_chans, 2)``; x right, y to the nose.

    Azimuthal-equidistant style: Cz at the origin, the Fpz-T7-Oz circumference at radius 1.
    Row ``r`` (Fp=1 ... O=9) has its midline electrode at ``(0, 1 - (r-1)/4)`` and its edge
    electrode (index 7; 1 for Fp and O) at ``(sin 18r deg, cos 18r deg)`` on the circle;
    index ``k`` lies a fraction ``k/edge`` of the way from midline to edge (odd = left, even =
    right), and indices beyond the edge (e.g. FT9) lie outside the circle.

    Raises
    ------
    BrainalignError
        A name that is not of the form ``<row><index|z>``.
    """
    out = np.zeros((len(ch_names), 2))
    for i, name in enumerate(ch_names):
        m = _CH_RE.match(str(name).upper())
        if m is None:
            raise BrainalignError(
                f"Channel name {name!r} is not a 10-10 name the simulator can place (e.g. 'PO7', 'Oz')."
            )
        row = _ROWS[m.group(1)]
        mid = np.array([0.0, 1.0 - (row - 1) / 4.0])
        if m.group(2) == "Z":
            out[i] = mid
            continue
        k = int(m.group(2))
        right = k % 2 == 0
        k = k - 1 if right else k  # O1/O2, PO7/PO8, ...: mirror images
        edge_k = 1 if row in (1, 9, 10) else 7
        theta = math.radians(18.0 * row)
        edge = np.array([math.sin(theta), math.cos(theta)])
        if row == 10:
            edge = edge * 1.25
        if k <= edge_k:
            pos = mid + (k / edge_k) * (edge - mid)
        else:
            pos = edge * (1.0 + 0.1 * (k - edge_k))
        if not right:
            pos = pos * np.array([-1.0, 1.0])
        out[i] = pos
    return out


#: MNE's bundled CTF-275 layout (``mne/channels/data/layouts/CTF-275.lay``): the sensor
#: array of THINGS-MEG's CTF system. Read with ``mne.channels.read_layout``; nothing is downloaded.
CTF_LAYOUT = "CTF-275"
_CTF_RE = re.compile(r"^(M[LRZ][CFOPT]\d\d)(-\d+)?$")
#: THINGS-MEG's released epochs hold 271 of the system's 275 sensors. Which four were left out
#: is not known offline, so the simulator leaves out the four most anterior sensors (far from
#: every simulated source): a stand-in with the right count and the real geometry.
_N_THINGS_MEG = 271


@functools.lru_cache(maxsize=1)
def _ctf_positions() -> dict[str, tuple[float, float]]:
    """CTF-275 sensor name (no ``-NNNN`` suffix) -> 2-D position in the simulator's head frame."""
    import mne

    lay = mne.channels.read_layout(CTF_LAYOUT)
    centres = lay.pos[:, :2] + lay.pos[:, 2:4] / 2
    names = [n.split("-")[0] for n in lay.names]
    mid_c = [i for i, n in enumerate(names) if n.startswith("MZC")]
    mid = [i for i, n in enumerate(names) if n.startswith("MZ")]
    # Head frame of channel_layout(): x right, y to the nose, the midline-central sensors at
    # the origin and the most posterior sensor at y = -1 (where Oz sits in the EEG layout).
    origin = np.array([centres[mid, 0].mean(), centres[mid_c, 1].mean()])
    scale = origin[1] - centres[:, 1].min()
    pos = (centres - origin) / scale
    return {n: (float(x), float(y)) for n, (x, y) in zip(names, pos, strict=True)}


def things_meg_channels() -> tuple[str, ...]:
    """271 CTF sensor names (``MLC11`` ...; MNE's CTF-275 layout order minus its four most
    anterior sensors): the channel set of the simulated THINGS-MEG."""
    pos = _ctf_positions()
    drop = set(sorted(pos, key=lambda n: -pos[n][1])[: len(pos) - _N_THINGS_MEG])
    return tuple(n for n in pos if n not in drop)


def ctf_layout(ch_names: Sequence[str]) -> np.ndarray:
    """2-D positions of CTF MEG sensors, ``(n_chans, 2)``, in the frame of :func:`channel_layout`.

    Names are CTF sensor names with or without the system suffix (``MLC11`` or ``MLC11-4408``,
    as in THINGS-MEG's ``.fif`` files); positions come from MNE's bundled CTF-275 layout, moved
    so that the midline-central sensors sit at the origin and scaled so that the most posterior
    sensor lies at ``y = -1``.

    Raises
    ------
    BrainalignError
        A name that is not a sensor of the CTF-275 layout.
    """
    pos = _ctf_positions()
    out = np.zeros((len(ch_names), 2))
    for i, name in enumerate(ch_names):
        m = _CTF_RE.match(str(name).upper())
        if m is None or m.group(1) not in pos:
            raise BrainalignError(
                f"Channel name {name!r} is not a sensor of MNE's {CTF_LAYOUT} layout (e.g. 'MLO11', "
                "'MZO01', optionally with a '-NNNN' suffix)."
            )
        out[i] = pos[m.group(1)]
    return out


def voxel_sheet(n_voxels: int) -> np.ndarray:
    """Positions of ``n_voxels`` voxels on a flattened visual cortex, ``(n_voxels, 2)``.

    The sheet is the posterior part of the head frame of :func:`channel_layout` (``y <= 0.1``
    inside the unit circle), where the simulator's occipital (early), occipito-temporal (mid)
    and parietal (late) sources sit, like NSD's ``nsdgeneral`` ROI covers early visual,
    ventral and parietal cortex. Voxels fill it evenly along a 2-D low-discrepancy (R2)
    sequence; the positions depend on ``n_voxels`` only (the anatomy does not depend on the seed).
    """
    check_type("n_voxels", n_voxels, int)
    check_range("n_voxels", n_voxels, low=1)
    # R2 sequence (Roberts 2018): golden-ratio generalisation in 2-D, no clumps at any n
    g = 1.32471795724474602596
    a = np.array([1 / g, 1 / g**2])
    out = np.empty((0, 2))
    k = 0
    while len(out) < n_voxels:
        m = 2 * (n_voxels - len(out)) + 64
        u = (0.5 + np.outer(np.arange(k, k + m), a)) % 1.0
        k += m
        pts = np.stack([2 * u[:, 0] - 1, -1 + 1.1 * u[:, 1]], 1)
        pts = pts[(pts**2).sum(1) <= 1.0]
        out = np.concatenate([out, pts])
    return np.asarray(out[:n_voxels])


def sensor_layout(ch_names: Sequence[str]) -> np.ndarray:
    """Positions of EEG electrodes (10-10 names) or CTF MEG sensors, ``(n_chans, 2)``.

    Dispatches on the names: all CTF names -> :func:`ctf_layout`, else :func:`channel_layout`.
    """
    if ch_names and all(_CTF_RE.match(str(n).upper()) for n in ch_names):
        return ctf_layout(ch_names)
    return channel_layout(ch_names)


# --------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class SimulatorParams:
    """Every knob of the simulator. Units: seconds, Hz, layout units (head radius = 1).

    See ``docs/simulator.md`` for the equations each parameter enters.

    Parameters
    ----------
    n_subjects : int
        Number of subjects, ids ``"01"``, ``"02"``, ...
    n_train_concepts, n_train_images, n_train_reps : int
        Training concepts, images per training concept, repetitions per training image.
    n_test_concepts, n_test_reps : int
        Test concepts (one image each, disjoint from the training concepts) and repetitions.
    ch_names : tuple of str
        EEG: 10-10 channel names (layout :func:`channel_layout`); MEG: CTF sensor names (layout
        :func:`ctf_layout`); fMRI: empty (voxels are named ``v00000``... from ``n_voxels``).
    sfreq, tmin, n_times : float, float, int
        Sampling rate (Hz), time of the first sample after image onset (s), samples per epoch.
        fMRI: ``n_times == 1`` (one value per voxel) and ``sfreq`` is 0 (not a time series).
    d_semantic : int
        Dimension of the semantic latent.
    n_categories : int
        Superordinate categories that concepts cluster into.
    category_share : float
        Fraction of a concept vector's variance that comes from its category.
    image_semantic_dev : float
        Std of an image's semantic deviation from its concept vector (concept std = 1).
    shape_coherence : float
        Probability that an image has its concept's prototype shape (else uniform).
    hue_kappa : float
        von Mises concentration of an image's hue around its concept's prototype hue.
    n_early, n_mid, n_late : int
        Number of sources per ERP component (perceptual ~100 ms, perceptual ~170 ms,
        semantic 250-500 ms).
    latency_early, latency_mid : float
        Mean peak latencies (s) of the early and mid sources.
    latency_late : tuple of float
        Range (s) of the late sources' peak latencies.
    latency_spread : float
        Std (s) of the early/mid sources' latencies around their mean.
    width_early, width_mid, width_late : float
        Std (s) of the gaussian temporal kernels.
    amp_early, amp_mid, amp_late : float
        Source amplitudes (peak of the spatial pattern x kernel = 1).
    cross_drive : float
        Share of variance of a source's drive that comes from the *other* latent
        (semantic for early/mid sources, perceptual for late ones).
    nonlinearity : float
        Quadratic term of the drive nonlinearity ``a = u + nonlinearity * (u**2 - 1)/sqrt(2)``.
    pattern_width : float
        Std of a source's gaussian scalp blob (layout units).
    dipole_ratio, dipole_distance : float
        Relative amplitude and distance of the opposite-polarity blob of each pattern.
    erp_amp : float
        Amplitude of the image-independent ERP (same for every image).
    subject_pattern_jitter : float
        Std of the per-subject shift of each source location (layout units).
    subject_latency_jitter : float
        Half-width (s) of the uniform per-subject, per-source latency shift.
    subject_weight_jitter : float
        Share of a source's drive weights that is subject-specific (0 = all subjects alike).
    subject_gain_sd : float
        Std of the log of each subject's overall signal gain.
    trial_gain_sd : float
        Std of the per-trial multiplicative gain on the evoked signal.
    noise_pink, noise_white : float
        Per-sample std of the spatially correlated 1/f noise and of the white sensor noise.
    noise_exponent : float
        Exponent ``beta`` of the noise power spectrum ``1 / f**beta``.
    noise_corr_length : float
        Length scale (layout units) of the pink noise's spatial correlation.
    alpha_amp, alpha_freq : float
        Amplitude and mean frequency (Hz) of the occipital alpha rhythm (random phase per trial).
    encoder_names : tuple of str
        Simulated image-encoder backbones.
    encoder_dims : tuple of int
        Their embedding dimensions.
    base_mix, aligned_mix : tuple of (float, float, float)
        Per backbone: variance shares (perceptual, semantic, nuisance) of the base
        (``alignment="none"``) and the aligned (``alignment="simulated"``) embeddings.
    d_nuisance : int
        Dimension of each table's nuisance latent (image properties the brain ignores).
    encoder_hidden : int
        Hidden width of the random nonlinear maps.
    encoder_nonlinear_share : float
        Share of each map's variance from its nonlinear (tanh) branch.
    modality : {"eeg", "meg", "fmri"}
        What the sensors are. ``eeg``/``meg`` responses are time courses on a sensor layout;
        ``fmri`` responses are one value per voxel: each source's blob of voxels responds with
        its drive (the BOLD response integrates the source's time course), and the noise is
        spatially correlated plus white per voxel (no 1/f time course, no alpha rhythm).
    n_voxels : int
        fMRI only: number of voxels on :func:`voxel_sheet` (0 for EEG/MEG).
    """

    n_subjects: int = 4
    n_train_concepts: int = 200
    n_train_images: int = 10
    n_train_reps: int = 4
    n_test_concepts: int = 200
    n_test_reps: int = 20
    ch_names: tuple[str, ...] = GIFFORD_17
    sfreq: float = 100.0
    tmin: float = 0.0
    n_times: int = 100
    # semantic / perceptual structure
    d_semantic: int = 16
    n_categories: int = 12
    category_share: float = 0.4
    image_semantic_dev: float = 0.35
    shape_coherence: float = 0.5
    hue_kappa: float = 2.0
    # brain sources
    n_early: int = 6
    n_mid: int = 6
    n_late: int = 8
    latency_early: float = 0.10
    latency_mid: float = 0.17
    latency_late: tuple[float, float] = (0.25, 0.50)
    latency_spread: float = 0.01
    width_early: float = 0.02
    width_mid: float = 0.03
    width_late: float = 0.06
    amp_early: float = 1.0
    amp_mid: float = 1.0
    amp_late: float = 0.8
    cross_drive: float = 0.15
    nonlinearity: float = 0.2
    pattern_width: float = 0.35
    dipole_ratio: float = 0.6
    dipole_distance: float = 0.6
    erp_amp: float = 1.0
    # between-subject variation
    subject_pattern_jitter: float = 0.1
    subject_latency_jitter: float = 0.02
    subject_weight_jitter: float = 0.3
    subject_gain_sd: float = 0.2
    # trial noise
    trial_gain_sd: float = 0.1
    noise_pink: float = 2.0
    noise_white: float = 1.0
    noise_exponent: float = 1.0
    noise_corr_length: float = 0.5
    alpha_amp: float = 1.0
    alpha_freq: float = 10.0
    # simulated image encoders
    encoder_names: tuple[str, ...] = ("sim-clip", "sim-dino")
    encoder_dims: tuple[int, ...] = (512, 768)
    base_mix: tuple[tuple[float, float, float], ...] = ((0.10, 0.40, 0.50), (0.20, 0.30, 0.50))
    aligned_mix: tuple[tuple[float, float, float], ...] = ((0.45, 0.35, 0.20), (0.50, 0.30, 0.20))
    d_nuisance: int = 32
    encoder_hidden: int = 256
    encoder_nonlinear_share: float = 0.3
    # added after brainalign.sim/1's first release: written to JSON only when not default,
    # so datasets simulated before they existed keep their manifests (see to_json)
    modality: str = "eeg"
    n_voxels: int = 0

    def __post_init__(self) -> None:
        check_option("modality", self.modality, MODALITIES)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith(("n_", "d_")) or f.name == "encoder_hidden":
                check_type(f.name, v, int)
                low = 0 if f.name in ("n_early", "n_mid", "n_late", "n_voxels") else 1
                check_range(f.name, v, low=low)
            elif isinstance(v, float | int) and not isinstance(v, bool):
                check_type(f.name, v, (int, float))
                if not math.isfinite(v):
                    raise BrainalignError(f"{f.name} must be finite, got {v!r}.")
                if f.name not in ("tmin",):
                    check_range(f.name, v, low=0.0)
        if self.modality == "fmri":
            if self.n_voxels < 1 or self.ch_names or self.n_times != 1:
                raise BrainalignError(
                    "an fMRI simulation has n_voxels >= 1 voxels (named v00000 ...), no ch_names and "
                    f"n_times == 1; got n_voxels={self.n_voxels}, {len(self.ch_names)} ch_names, "
                    f"n_times={self.n_times}."
                )
        else:
            if self.n_voxels:
                raise BrainalignError(f"n_voxels is for modality 'fmri'; {self.modality} has ch_names.")
            check_range("sfreq", self.sfreq, low=0.0, low_inclusive=False)
            self._check_sampling()  # time series only: an fMRI epoch has no time axis to sample
        for name in (
            "category_share",
            "shape_coherence",
            "cross_drive",
            "subject_weight_jitter",
            "encoder_nonlinear_share",
        ):
            check_range(name, getattr(self, name), high=1.0)
        if self.n_early + self.n_mid + self.n_late < 1:
            raise BrainalignError("the simulator needs at least one source (n_early + n_mid + n_late >= 1).")
        lo, hi = self.latency_late
        if not 0 <= lo <= hi:
            raise BrainalignError(
                f"latency_late must be (low, high) with 0 <= low <= high, got {self.latency_late}."
            )
        if self.modality == "eeg":
            channel_layout(self.ch_names)  # raises on names it cannot place
        elif self.modality == "meg":
            ctf_layout(self.ch_names)
        if len(set(self.ch_names)) != len(self.ch_names):
            raise BrainalignError(f"ch_names has duplicates: {self.ch_names}.")
        n = len(self.encoder_names)
        if not (n == len(self.encoder_dims) == len(self.base_mix) == len(self.aligned_mix)) or n == 0:
            raise BrainalignError(
                "encoder_names, encoder_dims, base_mix and aligned_mix need one entry per simulated "
                f"backbone; got {n}, {len(self.encoder_dims)}, {len(self.base_mix)}, {len(self.aligned_mix)}."
            )
        if len(set(self.encoder_names)) != n:
            raise BrainalignError(f"encoder_names has duplicates: {self.encoder_names}.")
        for d in self.encoder_dims:
            check_type("encoder_dims entry", d, int)
            check_range("encoder_dims entry", d, low=1)
        for what in ("base_mix", "aligned_mix"):
            for mix in getattr(self, what):
                if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
                    raise BrainalignError(
                        f"each {what} entry is (perceptual, semantic, nuisance) shares >= 0 with a "
                        f"positive sum, got {mix!r}."
                    )

    def _check_sampling(self) -> None:
        """The epoch must sample the sources it simulates: fine enough and long enough."""
        narrowest = min(w for w, n in ((self.width_early, self.n_early), (self.width_mid, self.n_mid),
                                       (self.width_late, self.n_late)) if n > 0)
        min_sfreq = max(1.0 / narrowest, 2.0 * self.alpha_freq if self.alpha_amp > 0 else 0.0)
        if self.sfreq < min_sfreq:
            raise BrainalignError(
                f"sfreq {self.sfreq:g} Hz cannot represent the simulated signal: the narrowest source kernel "
                f"is {narrowest:g} s wide and the alpha rhythm is at {self.alpha_freq:g} Hz, so sfreq must be "
                f">= {min_sfreq:g} Hz (e.g. 100, 250)."
            )
        if self.n_times < 8:
            raise BrainalignError(
                f"n_times {self.n_times} is too short: an EEG/MEG epoch needs at least 8 samples (the default "
                f"is {100}: 1 s at 100 Hz). Only modality = 'fmri' has one value per channel (n_times = 1)."
            )
        latest = max([self.latency_early if self.n_early else 0.0, self.latency_mid if self.n_mid else 0.0,
                      self.latency_late[1] if self.n_late else 0.0])
        end = self.tmin + self.n_times / self.sfreq
        if end <= latest or self.tmin >= latest:
            raise BrainalignError(
                f"the epoch window [{self.tmin:g}, {end:g}) s (tmin + n_times / sfreq) does not contain the "
                f"simulated responses, which peak up to {latest:g} s after image onset; use e.g. n_times = "
                f"{math.ceil((latest + 0.2 - self.tmin) * self.sfreq)} at sfreq {self.sfreq:g}."
            )

    @property
    def n_train_images_total(self) -> int:
        """Number of training images."""
        return self.n_train_concepts * self.n_train_images

    @property
    def n_images(self) -> int:
        """Number of images (training + test)."""
        return self.n_train_images_total + self.n_test_concepts

    @property
    def n_sources(self) -> int:
        """Number of brain sources."""
        return self.n_early + self.n_mid + self.n_late

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Names of the epoch tensor's rows: ``ch_names``, or ``v00000``... for fMRI voxels."""
        if self.modality == "fmri":
            return tuple(f"v{i:05d}" for i in range(self.n_voxels))
        return self.ch_names

    @property
    def n_chans(self) -> int:
        """Channels (EEG/MEG sensors or fMRI voxels)."""
        return self.n_voxels if self.modality == "fmri" else len(self.ch_names)

    def positions(self) -> np.ndarray:
        """2-D positions of the channels (sensors or voxels) in the head frame, ``(n_chans, 2)``."""
        if self.modality == "fmri":
            return voxel_sheet(self.n_voxels)
        if self.modality == "meg":
            return ctf_layout(self.ch_names)
        return channel_layout(self.ch_names)

    def to_json(self) -> dict[str, Any]:
        """JSON-native dict (tuples become lists), as stored in ``meta.source["params"]``.

        Fields added after the simulator's first release (``modality``, ``n_voxels``) are left
        out at their defaults, so an EEG dataset's manifest is the same as before they existed
        and re-simulating it stays a no-op.
        """
        d = dataclasses.asdict(self)
        for name, default in _LATE_FIELDS.items():
            if d[name] == default:
                del d[name]
        return dict(_jsonable(d))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SimulatorParams:
        """Inverse of :meth:`to_json`; unknown keys raise with the closest known key."""
        return _apply(cls(), d)


#: Fields added after the first release and their defaults (omitted from to_json() at these).
_LATE_FIELDS: dict[str, Any] = {"modality": "eeg", "n_voxels": 0}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def _apply(params: SimulatorParams, overrides: Mapping[str, Any]) -> SimulatorParams:
    known = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        check_option("simulator parameter", key, list(known))
        default = known[key]
        if isinstance(default, tuple):
            if not isinstance(value, list | tuple):
                raise BrainalignError(f"simulator parameter {key} must be a sequence, got {value!r}.")
            value = _as_tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        else:
            check_type(key, value, type(default))
        changes[key] = value
    return dataclasses.replace(params, **changes)


# fMRI noise (per-trial std of the spatially correlated and the white voxel noise), calibrated
# with the residual MLP on fmri-mini (docs/simulator.md).
_FMRI_NOISE_PINK = 1.0
_FMRI_NOISE_WHITE = 3.0
_TINY = dict(
    n_subjects=2, n_train_concepts=30, n_train_images=4, n_train_reps=2, n_test_concepts=20, n_test_reps=4
)
_FULL = dict(
    n_subjects=10,
    n_train_concepts=1654,
    n_train_images=10,
    n_train_reps=4,
    n_test_concepts=200,
    n_test_reps=80,
    ch_names=tuple(THINGS_EEG2_63),
    sfreq=250.0,
    n_times=250,
)
# THINGS-MEG (Hebart et al. 2023, as NICE/AlignVis use it): 4 participants, 271 CTF sensors,
# 200 Hz, 0..1 s (201 samples); training = the 1,654 non-test concepts x 12 images, each shown
# once; test = 200 images x 12 repetitions (averaged at test time).
_MEG = dict(
    modality="meg",
    n_subjects=4,
    n_train_concepts=1654,
    n_train_images=12,
    n_train_reps=1,
    n_test_concepts=200,
    n_test_reps=12,
    ch_names=tuple(THINGS_MEG_271),
    sfreq=200.0,
    n_times=201,
)
# The same design at a size that trains in minutes on 2 CPU cores: all 271 sensors, 100 Hz.
_MEG_MINI = _MEG | dict(n_train_concepts=100, n_test_concepts=100, sfreq=100.0, n_times=101)
# NSD (Allen et al. 2022; the MindEye / AlignVis split): 4 subjects (NSD's 1, 2, 5, 7), one value
# per voxel of an nsdgeneral-sized ROI (subject 1: 15,724 voxels), 9,000 training images x 3
# single trials (trained unaveraged), the 1,000 shared images x 3 repetitions as test set
# (averaged: a 1000-way test). NSD has no concepts: each image is its own concept.
_FMRI = dict(
    modality="fmri",
    n_subjects=4,
    n_train_concepts=9000,
    n_train_images=1,
    n_train_reps=3,
    n_test_concepts=1000,
    n_test_reps=3,
    ch_names=(),
    n_voxels=15724,
    sfreq=0.0,
    n_times=1,
    # voxel populations are many and narrowly tuned: 80 sources with 0.15-wide blobs (EEG/MEG:
    # 20 sources seen through 0.35-wide scalp patterns), so the ROI carries more than the 32
    # latent dimensions, as nsdgeneral's thousands of voxels do
    n_early=24,
    n_mid=24,
    n_late=32,
    pattern_width=0.15,
    noise_pink=_FMRI_NOISE_PINK,
    noise_white=_FMRI_NOISE_WHITE,
    noise_corr_length=0.15,
    alpha_amp=0.0,
)
# The same design scaled down: 2,000 voxels, 1,500 training images, still a 1000-way test.
_FMRI_MINI = _FMRI | dict(n_train_concepts=1500, n_voxels=2000)
#: Named parameter sets: ``tiny`` (tests, seconds), ``mini`` (default; trains in minutes on
#: 2 CPU cores), ``full`` (Things-EEG2 sizes: 10 subjects x 16,540 images x 4 reps x 63 x 250),
#: ``meg`` / ``meg-mini`` (THINGS-MEG design) and ``fmri`` / ``fmri-mini`` (NSD design).
PRESETS: dict[str, SimulatorParams] = {
    "tiny": SimulatorParams(**_TINY),  # type: ignore[arg-type]
    "mini": SimulatorParams(),
    "full": SimulatorParams(**_FULL),  # type: ignore[arg-type]
    "meg": SimulatorParams(**_MEG),  # type: ignore[arg-type]
    "meg-mini": SimulatorParams(**_MEG_MINI),  # type: ignore[arg-type]
    "fmri": SimulatorParams(**_FMRI),  # type: ignore[arg-type]
    "fmri-mini": SimulatorParams(**_FMRI_MINI),  # type: ignore[arg-type]
}


def make_params(preset: str = "mini", overrides: Mapping[str, Any] | None = None) -> SimulatorParams:
    """The parameters of ``preset`` with ``overrides`` (field name -> value) applied.

    Raises
    ------
    BrainalignError
        Unknown preset or parameter (with the closest match), or an invalid value.
    """
    base = PRESETS[check_option("simulator preset", preset, list(PRESETS))]
    return _apply(base, overrides or {})


# --------------------------------------------------------------------------- ground truth
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def perceptual_features(latents: Mapping[str, np.ndarray]) -> np.ndarray:
    """Map the interpretable factors to the raw perceptual feature vector, ``(N, 16)``.

    Columns: ``saturation*cos(2 pi hue), saturation*sin(2 pi hue), saturation, brightness,
    onehot(shape) (8), cos(2 orientation), sin(2 orientation), size, log2(spatial_freq)``.
    Hue only matters in proportion to saturation; orientation is axial (period pi).
    """
    h = 2 * np.pi * np.asarray(latents["hue"], float)
    s = np.asarray(latents["saturation"], float)
    ori = 2 * np.asarray(latents["orientation"], float)
    shape = np.asarray(latents["shape"], int)
    onehot = np.eye(len(SHAPES))[shape]
    cols = [
        s * np.cos(h),
        s * np.sin(h),
        s,
        np.asarray(latents["brightness"], float),
        *onehot.T,
        np.cos(ori),
        np.sin(ori),
        np.asarray(latents["size"], float),
        np.log2(np.asarray(latents["spatial_freq"], float)),
    ]
    return np.stack(cols, axis=1)


# (first column, last column + 1) of each factor in perceptual_features(): hue, saturation,
# brightness, shape, orientation, size, spatial frequency.
_FACTOR_SLICES = ((0, 2), (2, 3), (3, 4), (4, 12), (12, 14), (14, 15), (15, 16))


def _standardize_groups(x: np.ndarray, groups: Sequence[tuple[int, int]]) -> np.ndarray:
    """z-score columns, then scale so each group has total variance ``1/len(groups)``."""
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    out: np.ndarray = np.empty_like(z)
    for a, b in groups:
        out[:, a:b] = z[:, a:b] / math.sqrt((b - a) * len(groups))
    return out


@dataclass
class _Subject:
    basis: np.ndarray  # (J, C*T): pattern_j (x) kernel_j, times the source amplitude
    weights: np.ndarray  # (J, d_p + d_s)
    erp: np.ndarray  # (C, T) image-independent ERP
    gain: float
    alpha_pattern: np.ndarray  # (C,)
    alpha_freq: float


@dataclass
class SimWorld:
    """The ground truth of one simulated dataset (params + seed): latents and brains.

    Attributes
    ----------
    params : SimulatorParams
    seed : int
    null : bool
    image_ids, concepts, splits : list of str
        Catalog columns (row order = image index).
    latents : dict of str to ndarray
        Interpretable perceptual factors per image (the ``LATENT_COLUMNS`` except image_id).
    perceptual : ndarray, shape (n_images, 16)
        Standardized perceptual features (each of the 7 factors has total variance 1/7).
    semantic : ndarray, shape (n_images, d_semantic)
        Standardized semantic latents (total variance 1).
    category : ndarray, shape (n_concepts,)
        Superordinate category of each concept.
    """

    params: SimulatorParams
    seed: int
    null: bool
    image_ids: list[str]
    concepts: list[str]
    splits: list[str]
    concept_index: np.ndarray
    category: np.ndarray
    latents: dict[str, np.ndarray]
    perceptual: np.ndarray
    semantic: np.ndarray
    _layout: np.ndarray
    _noise_mix: np.ndarray
    _subjects: dict[int, _Subject] = field(default_factory=dict)

    # ---- catalog helpers
    @property
    def subjects(self) -> tuple[str, ...]:
        """Subject ids ``("01", "02", ...)``."""
        return tuple(f"{i + 1:02d}" for i in range(self.params.n_subjects))

    @property
    def times(self) -> np.ndarray:
        """Sample times in seconds, ``(n_times,)``."""
        p = self.params
        if p.modality == "fmri":
            return np.full(1, p.tmin)
        return p.tmin + np.arange(p.n_times) / p.sfreq

    def rows(self, split: str) -> np.ndarray:
        """Catalog rows of ``split`` ("train" or "test"), in order."""
        check_option("split", split, ("train", "test"))
        n_train = self.params.n_train_images_total
        return np.arange(n_train) if split == "train" else np.arange(n_train, self.params.n_images)

    def n_reps(self, split: str) -> int:
        """Repetitions per image in ``split``."""
        return self.params.n_train_reps if split == "train" else self.params.n_test_reps

    # ---- brains
    def _subject(self, subject: int) -> _Subject:
        if subject not in self._subjects:
            self._subjects[subject] = _make_subject(self, subject)
        return self._subjects[subject]

    def drives(self, subject: int, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Source amplitudes ``a`` of ``subject`` (0-based) for catalog ``rows``, ``(n, J)``."""
        sub = self._subject(subject)
        z = np.concatenate([self.perceptual[rows], self.semantic[rows]], axis=1)
        u = z @ sub.weights.T
        return np.asarray(u + self.params.nonlinearity * (u**2 - 1.0) / math.sqrt(2.0))

    def evoked(self, subject: int, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Noiseless response of ``subject`` (0-based index) to catalog ``rows``, ``(n, C, T)``."""
        sub = self._subject(subject)
        p = self.params
        a = self.drives(subject, rows)
        x = sub.gain * (a @ sub.basis).reshape(len(a), p.n_chans, p.n_times)
        return np.asarray(x + sub.erp)

    def trials(self, subject: int, rows: np.ndarray | Sequence[int], n_reps: int) -> np.ndarray:
        """Single trials, ``(len(rows) * n_reps, C, T)`` float32, image-major then repetition.

        Each image's noise comes from its own stream ``SeedSequence(seed, (3, subject, row))``,
        so the result does not depend on how rows are chunked.
        """
        p = self.params
        rows = np.asarray(rows)
        n_ch, n_t = p.n_chans, p.n_times
        sub = self._subject(subject)
        evoked = self.evoked(subject, rows) - sub.erp  # (n, C, T), image-dependent part
        if p.modality == "fmri":
            return self._voxel_trials(subject, rows, n_reps, evoked, sub)
        white1 = np.empty((len(rows), n_reps, n_ch, n_t))
        white2 = np.empty_like(white1)
        gain = np.empty((len(rows), n_reps))
        phase = np.empty((len(rows), n_reps))
        alpha_a = np.empty((len(rows), n_reps))
        for i, row in enumerate(rows):
            rng = _rng(self.seed, _S_TRIAL, subject, int(row))
            white1[i] = rng.standard_normal((n_reps, n_ch, n_t))
            white2[i] = rng.standard_normal((n_reps, n_ch, n_t))
            gain[i] = 1.0 + p.trial_gain_sd * rng.standard_normal(n_reps)
            phase[i] = rng.uniform(0.0, 2 * np.pi, n_reps)
            alpha_a[i] = rng.lognormal(0.0, 0.5, n_reps)
        # In-place arithmetic keeps the peak memory at a few copies of the chunk.
        noise = np.einsum("cd,nrdt->nrct", self._noise_mix, _pink(white1, p.noise_exponent, p.sfreq))
        del white1
        noise *= p.noise_pink
        white2 *= p.noise_white
        noise += white2
        del white2
        t = self.times
        alpha = np.sin(2 * np.pi * sub.alpha_freq * t[None, None, :] + phase[..., None])  # (n, R, T)
        noise += (
            p.alpha_amp * (alpha_a[..., None] * alpha)[:, :, None, :] * sub.alpha_pattern[None, None, :, None]
        )
        x = gain[..., None, None] * evoked[:, None]
        x += sub.erp
        x += noise
        return np.asarray(x.reshape(len(rows) * n_reps, n_ch, n_t), dtype=np.float32)

    def _voxel_trials(
        self, subject: int, rows: np.ndarray, n_reps: int, evoked: np.ndarray, sub: _Subject
    ) -> np.ndarray:
        """fMRI single trials: gain x evoked + ERP + spatially correlated + white voxel noise."""
        p = self.params
        n_vox, n_fields = self._noise_mix.shape
        fields = np.empty((len(rows), n_reps, n_fields))
        white = np.empty((len(rows), n_reps, n_vox))
        gain = np.empty((len(rows), n_reps))
        for i, row in enumerate(rows):
            rng = _rng(self.seed, _S_TRIAL, subject, int(row))
            fields[i] = rng.standard_normal((n_reps, n_fields))
            white[i] = rng.standard_normal((n_reps, n_vox))
            gain[i] = 1.0 + p.trial_gain_sd * rng.standard_normal(n_reps)
        x = gain[..., None] * evoked[:, None, :, 0] + sub.erp[None, None, :, 0]
        x += p.noise_pink * (fields @ self._noise_mix.T)
        x += p.noise_white * white
        return np.asarray(x.reshape(len(rows) * n_reps, n_vox, 1), dtype=np.float32)

    # ---- image encoders
    def embeddings(self, backbone: str, alignment: str) -> tuple[np.ndarray, dict[str, float]]:
        """Simulated embedding table ``(n_images, dim)`` float32 and its variance shares.

        ``alignment`` is ``"simulated"`` (aligned) or ``"none"`` (base). With ``null=True`` both
        use the base shares but independent random maps and nuisance latents.
        """
        p = self.params
        b = p.encoder_names.index(check_option("simulated backbone", backbone, p.encoder_names))
        version = check_option("alignment", alignment, ("simulated", "none"))
        v = 0 if version == "simulated" else 1
        mix = p.base_mix[b] if (version == "none" or self.null) else p.aligned_mix[b]
        shares = np.asarray(mix, float) / float(sum(mix))
        dim = p.encoder_dims[b]
        rng = _rng(self.seed, _S_ENCODER, b, v)
        nuisance = rng.standard_normal((p.n_images, p.d_nuisance)) / math.sqrt(p.d_nuisance)
        parts = [
            _random_map(rng, self.perceptual, dim, p.encoder_hidden, p.encoder_nonlinear_share),
            _random_map(rng, self.semantic, dim, p.encoder_hidden, p.encoder_nonlinear_share),
            _random_map(rng, nuisance, dim, p.encoder_hidden, p.encoder_nonlinear_share),
        ]
        out = sum(math.sqrt(w) * part for w, part in zip(shares, parts, strict=True))
        weights = {"perceptual": float(shares[0]), "semantic": float(shares[1]), "nuisance": float(shares[2])}
        return np.asarray(out, np.float32), weights


def _random_map(
    rng: np.random.Generator, u: np.ndarray, dim: int, hidden: int, nl_share: float
) -> np.ndarray:
    """``sqrt(1-eta) * std(u G) + sqrt(eta) * std(tanh(u H1 * 2) H2)``: unit mean variance per output."""
    d = u.shape[1]
    u = u / math.sqrt(max((u**2).sum(1).mean(), 1e-12))  # unit mean squared norm
    lin = u @ rng.standard_normal((d, dim))
    h = np.tanh(2.0 * (u @ rng.standard_normal((d, hidden))))
    nl = h @ rng.standard_normal((hidden, dim))

    def unit(x: np.ndarray) -> np.ndarray:
        x = x - x.mean(0)
        return x / math.sqrt(max(x.var(0).mean(), 1e-12))

    return math.sqrt(1 - nl_share) * unit(lin) + math.sqrt(nl_share) * unit(nl)


def _pink(white: np.ndarray, exponent: float, sfreq: float) -> np.ndarray:
    """Filter white noise along the last axis to a ``1/f**exponent`` power spectrum, unit variance."""
    n_t = white.shape[-1]
    f = np.fft.rfftfreq(n_t, 1.0 / sfreq)
    h = np.zeros_like(f)
    h[1:] = f[1:] ** (-exponent / 2.0)  # no DC: epochs of noise have zero expected mean
    # Var of irfft(h * rfft(w)) for unit white w is sum over the two-sided spectrum of h^2 / n_t.
    two_sided = h[0] ** 2 + 2 * (h[1:] ** 2).sum() - (h[-1] ** 2 if n_t % 2 == 0 else 0.0)
    h = h * math.sqrt(n_t / two_sided)
    return np.fft.irfft(np.fft.rfft(white, axis=-1) * h, n=n_t, axis=-1)


#: Latent noise fields behind the spatially correlated fMRI noise (a Cholesky factor of a
#: 15,000-voxel covariance would not fit in memory).
_VOXEL_NOISE_FIELDS = 256


def _voxel_noise_mix(layout: np.ndarray, length: float) -> np.ndarray:
    """``(n_voxels, K)`` map from ``K`` unit-variance noise fields to voxels, unit-norm rows.

    Field ``k`` is a gaussian blob of width ``length`` centred at the ``k``-th point of the
    voxel sheet, so nearby voxels share noise (correlation ~ ``exp(-d^2 / 4 length^2)``).
    """
    centres = voxel_sheet(_VOXEL_NOISE_FIELDS)
    d2 = ((layout[:, None] - centres[None]) ** 2).sum(-1)
    mix = np.exp(-d2 / (2 * length**2))
    return np.asarray(mix / np.linalg.norm(mix, axis=1, keepdims=True))


def _blob(layout: np.ndarray, center: np.ndarray, width: float) -> np.ndarray:
    d2 = ((layout - center) ** 2).sum(1)
    return np.asarray(np.exp(-d2 / (2 * width**2)))


def _source_templates(p: SimulatorParams, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Population-level sources (shared by subjects): locations, latencies, widths, weights."""
    ne, nm, nl = p.n_early, p.n_mid, p.n_late
    loc = np.concatenate(
        [
            # early: occipital, near the midline
            np.stack([rng.normal(0.0, 0.25, ne), rng.normal(-0.85, 0.08, ne)], 1),
            # mid: lateral occipito-temporal
            np.stack(
                [rng.choice([-1.0, 1.0], nm) * rng.uniform(0.3, 0.7, nm), rng.normal(-0.65, 0.1, nm)], 1
            ),
            # late: parietal / central
            np.stack([rng.normal(0.0, 0.35, nl), rng.normal(-0.35, 0.25, nl)], 1),
        ]
    )
    angle = rng.uniform(0, 2 * np.pi, p.n_sources)
    offset = p.dipole_distance * np.stack([np.cos(angle), np.sin(angle)], 1)
    latency = np.concatenate(
        [
            rng.normal(p.latency_early, p.latency_spread, ne),
            rng.normal(p.latency_mid, p.latency_spread, nm),
            rng.uniform(p.latency_late[0], p.latency_late[1], nl),
        ]
    )
    width = np.concatenate([np.full(ne, p.width_early), np.full(nm, p.width_mid), np.full(nl, p.width_late)])
    amp = np.concatenate([np.full(ne, p.amp_early), np.full(nm, p.amp_mid), np.full(nl, p.amp_late)])
    d_p = 16
    # Perceptual and semantic features each have total variance 1, so w ~ N(0, I) gives
    # drives of unit expected variance; the shares then mix the two latents.
    w_p = rng.standard_normal((p.n_sources, d_p))
    w_s = rng.standard_normal((p.n_sources, p.d_semantic))
    perceptual_driven = np.arange(p.n_sources) < ne + nm
    share_p = np.where(perceptual_driven, 1 - p.cross_drive, p.cross_drive)
    w_p = w_p * np.sqrt(share_p)[:, None]
    w_s = w_s * np.sqrt(1 - share_p)[:, None]
    erp_sign = rng.choice([-1.0, 1.0], p.n_sources)
    return dict(
        loc=loc,
        offset=offset,
        latency=latency,
        width=width,
        amp=amp,
        weights=np.concatenate([w_p, w_s], 1),
        erp_sign=erp_sign,
    )


def _make_subject(world: SimWorld, subject: int) -> _Subject:
    p = world.params
    tpl = _source_templates(p, _rng(world.seed, _S_BRAIN))
    rng = _rng(world.seed, _S_BRAIN, subject + 1)
    n_src = p.n_sources
    loc = (
        tpl["loc"] + rng.normal(0.0, p.subject_pattern_jitter, (n_src, 2))
        if p.subject_pattern_jitter
        else tpl["loc"]
    )
    latency = tpl["latency"] + rng.uniform(-p.subject_latency_jitter, p.subject_latency_jitter, n_src)
    nu = p.subject_weight_jitter
    w_own = rng.standard_normal(tpl["weights"].shape) * np.sqrt(
        (tpl["weights"] ** 2).sum(1, keepdims=True) / tpl["weights"].shape[1]
    )
    weights = math.sqrt(1 - nu) * tpl["weights"] + math.sqrt(nu) * w_own
    gain = float(np.exp(rng.normal(0.0, p.subject_gain_sd)))
    layout = world._layout
    patterns = np.stack(
        [
            _blob(layout, loc[j], p.pattern_width)
            - p.dipole_ratio * _blob(layout, loc[j] + tpl["offset"][j], p.pattern_width)
            for j in range(n_src)
        ]
    )  # (J, C)
    t = world.times
    if p.modality == "fmri":
        # A voxel's BOLD response integrates its sources' activity over seconds: no time axis,
        # each source's blob responds with its amplitude x drive.
        kernels = np.ones((n_src, 1))
    else:
        kernels = np.exp(-((t[None, :] - latency[:, None]) ** 2) / (2 * tpl["width"][:, None] ** 2))  # (J, T)
    basis = (tpl["amp"][:, None, None] * patterns[:, :, None] * kernels[:, None, :]).reshape(n_src, -1)
    erp = p.erp_amp * (tpl["erp_sign"] @ basis).reshape(p.n_chans, p.n_times)
    alpha_pattern = _blob(layout, np.array([0.0, -0.9]) + rng.normal(0, 0.1, 2), 0.5)
    alpha_freq = float(p.alpha_freq + rng.normal(0.0, 0.7))
    return _Subject(
        basis=basis, weights=weights, erp=erp, gain=gain, alpha_pattern=alpha_pattern, alpha_freq=alpha_freq
    )


def build_world(params: SimulatorParams, seed: int = 0, null: bool = False) -> SimWorld:
    """Draw the latents of every image and set up the brains and encoders (lazily).

    Cheap (no epochs are generated): ``full`` takes well under a second.

    Parameters
    ----------
    params : SimulatorParams
    seed : int
        Root of every random stream.
    null : bool
        If True, aligned and base embeddings share generative weights (see :meth:`SimWorld.embeddings`).

    Returns
    -------
    SimWorld
    """
    check_type("seed", seed, int)
    check_range("seed", seed, low=0)
    p = params
    rng = _rng(seed, _S_LATENTS)
    n_concepts = p.n_train_concepts + p.n_test_concepts
    category = rng.integers(p.n_categories, size=n_concepts)
    cat_vec = rng.standard_normal((p.n_categories, p.d_semantic))
    concept_vec = math.sqrt(p.category_share) * cat_vec[category] + math.sqrt(
        1 - p.category_share
    ) * rng.standard_normal((n_concepts, p.d_semantic))
    proto_hue = rng.random(n_concepts)
    proto_shape = rng.integers(len(SHAPES), size=n_concepts)

    concept_index = np.concatenate(
        [
            np.repeat(np.arange(p.n_train_concepts), p.n_train_images),
            p.n_train_concepts + np.arange(p.n_test_concepts),
        ]
    )
    image_ids = [
        f"tr{c + 1:05d}_{i + 1:02d}" for c in range(p.n_train_concepts) for i in range(p.n_train_images)
    ]
    image_ids += [f"te{k + 1:05d}" for k in range(p.n_test_concepts)]
    concepts = [f"c{c + 1:05d}" for c in concept_index]
    splits = ["train"] * p.n_train_images_total + ["test"] * p.n_test_concepts

    n = p.n_images
    hue = (proto_hue[concept_index] + rng.vonmises(0.0, p.hue_kappa, n) / (2 * np.pi)) % 1.0
    keep = rng.random(n) < p.shape_coherence
    shape = np.where(keep, proto_shape[concept_index], rng.integers(len(SHAPES), size=n))
    latents = {
        "hue": hue,
        "saturation": rng.uniform(0.1, 1.0, n),
        "brightness": rng.uniform(0.2, 1.0, n),
        "shape": shape.astype(np.int64),
        "orientation": rng.uniform(0.0, np.pi, n),
        "size": rng.uniform(0.25, 0.9, n),
        "spatial_freq": np.exp2(rng.uniform(1.0, 4.0, n)),
    }
    semantic_raw = concept_vec[concept_index] + p.image_semantic_dev * rng.standard_normal((n, p.d_semantic))
    perceptual = _standardize_groups(perceptual_features(latents), _FACTOR_SLICES)
    semantic = _standardize_groups(semantic_raw, [(0, p.d_semantic)])

    layout = p.positions()
    if p.modality == "fmri":
        mix = _voxel_noise_mix(layout, p.noise_corr_length)
    else:
        d2 = ((layout[:, None] - layout[None]) ** 2).sum(-1)
        cov = np.exp(-d2 / (2 * p.noise_corr_length**2)) + 1e-3 * np.eye(len(layout))
        mix = np.linalg.cholesky(cov / (1 + 1e-3))  # rows have unit norm: unit variance per channel
    return SimWorld(
        params=p,
        seed=seed,
        null=null,
        image_ids=image_ids,
        concepts=concepts,
        splits=splits,
        concept_index=concept_index,
        category=category,
        latents=latents,
        perceptual=perceptual,
        semantic=semantic,
        _layout=layout,
        _noise_mix=mix,
    )


# --------------------------------------------------------------------------- writing
def _source(preset: str, params: SimulatorParams, seed: int, null: bool) -> dict[str, Any]:
    src = {
        "kind": "simulated",
        "simulator": SIMULATOR,
        "preset": preset,
        "params": params.to_json(),
        "seed": seed,
        "null": null,
    }
    return dict(json.loads(json.dumps(src)))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{key}: (absent) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{key}: {old[k]!r} -> (absent)")
            else:
                out += _diff(old[k], new[k], key)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _chunks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def simulate_dataset(
    out: Path | str,
    preset: str = "mini",
    *,
    seed: int = 0,
    null: bool = False,
    overrides: Mapping[str, Any] | None = None,
    replace: bool = False,
    progress: bool = True,
) -> Path:
    """Write a simulated Things-EEG2 dataset in the data contract (atomically, idempotently).

    Parameters
    ----------
    out : path
        Dataset root to create.
    preset : {"tiny", "mini", "full"}
        Named sizes (see :data:`PRESETS`).
    seed : int
        Root seed; the same preset, overrides and seed give byte-identical files.
    null : bool
        Aligned and base tables identical in distribution (for calibrating statistics).
    overrides : mapping, optional
        ``SimulatorParams`` field name -> value, applied on top of the preset.
    replace : bool
        Replace an existing dataset at ``out`` that was simulated with other settings.
    progress : bool
        Show a tqdm bar per subject.

    Returns
    -------
    Path
        ``out``. Contents: ``dataset.json``, ``images.parquet``, ``epochs/...`` (train and
        test, one row per image and repetition), ``embeddings/<backbone>__{simulated,none}.parquet``
        and ``simulator/latents.parquet``.

    Raises
    ------
    BrainalignError
        Unknown preset or parameter; ``out`` holds a dataset simulated with other settings
        (the message lists the differences) and ``replace`` is False; ``out`` exists and is
        not a brainalign dataset.
    """
    check_type("seed", seed, int)
    check_range("seed", seed, low=0)
    check_type("null", null, bool)
    params = make_params(preset, overrides)
    source = _source(preset, params, seed, null)
    out = Path(out)
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())["meta"]["source"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BrainalignError(
                f"{manifest} is unreadable ({e}); remove {out} or pass replace=True."
            ) from e
        if old == source:
            log.info("Simulated dataset %s is up to date (preset %s, seed %d).", out, preset, seed)
            return out
        if not replace:
            diff = _diff(old, source)
            shown = "; ".join(diff[:8]) + (f"; ... ({len(diff)} differences)" if len(diff) > 8 else "")
            raise BrainalignError(
                f"{out} holds a dataset simulated with other settings ({shown}). "
                "Use another path or pass replace=True (CLI: --replace)."
            )
    elif out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise BrainalignError(
                f"{out} exists and is not a brainalign dataset ({MANIFEST} is missing); refusing to "
                "write over it. Choose an empty or new path."
            )
        replace = True  # an empty directory: swap it for the new dataset

    t0 = time.perf_counter()
    world = build_world(params, seed, null)
    name = dataset_name(params)
    meta = DatasetMeta(
        name=name,
        modality=params.modality,
        ch_names=params.channel_names,
        sfreq=params.sfreq,
        tmin=params.tmin,
        n_times=params.n_times,
        subjects=world.subjects,
        source=source,
    )
    log.info("Simulating %s (preset %s, seed %d, null=%s) into %s", name, preset, seed, null, out)
    try:
        _write(out, meta, world, params, seed, null, replace=replace, progress=progress)
    except BrainalignError:
        # two simulations into one --out: the loser finds the winner's dataset at the rename
        if _source_of(out) == source:
            log.info("%s was written meanwhile by another process with the same settings; using it.", out)
            return out
        raise
    log.info("Simulated dataset written to %s in %.1f s", out, time.perf_counter() - t0)
    return out


def _source_of(out: Path) -> Any:
    try:
        return json.loads((out / MANIFEST).read_text())["meta"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(out: Path, meta: DatasetMeta, world: SimWorld, params: SimulatorParams, seed: int, null: bool, *,
           replace: bool, progress: bool) -> None:
    with DatasetWriter(out, meta, replace=replace) as w:
        w.write_catalog(world.image_ids, world.concepts, world.splits)
        _write_latents(w.tmp / LATENTS_FILE, world)
        for backbone in params.encoder_names:
            for alignment in ("simulated", "none"):
                vectors, weights = world.embeddings(backbone, alignment)
                w.write_embedding_table(
                    image_ids=world.image_ids,
                    vectors=vectors,
                    backbone=backbone,
                    alignment=alignment,
                    provenance={
                        "simulated": True,
                        "simulator": SIMULATOR,
                        "seed": seed,
                        "null": null,
                        "weights": weights,
                        "note": "simulated encoder, not a real model",
                    },
                )
        for si, sid in enumerate(world.subjects):
            n_rows = sum(len(world.rows(s)) for s in ("train", "test"))
            with tqdm(total=n_rows, desc=f"sub-{sid}", unit="img", disable=not progress) as bar:
                for split in ("train", "test"):
                    reps = world.n_reps(split)
                    per_chunk = max(1, _CHUNK_BYTES // (reps * params.n_chans * params.n_times * 4))
                    for rows in _chunks(world.rows(split), per_chunk):
                        x = world.trials(si, rows, reps)
                        ids = [world.image_ids[r] for r in rows for _ in range(reps)]
                        concepts = [world.concepts[r] for r in rows for _ in range(reps)]
                        w.write_epochs(sid, split, ids, concepts, np.tile(np.arange(reps), len(rows)), x)
                        bar.update(len(rows))


def dataset_name(params: SimulatorParams) -> str:
    """``DatasetMeta.name`` of a simulated dataset: ``things-eeg2-sim``, ``things-meg-sim`` or ``nsd-sim``."""
    return DATASET_NAMES[params.modality]


def _write_latents(path: Path, world: SimWorld) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: dict[str, pa.Array] = {"image_id": pa.array(world.image_ids, pa.string())}
    for name in LATENT_COLUMNS[1:]:
        v = world.latents[name]
        cols[name] = pa.array(v.astype(np.int16) if name == "shape" else v.astype(np.float64))
    pq.write_table(pa.table(cols), path)


def read_latents(root: Path | str) -> pa.Table:
    """The interpretable perceptual factors of a simulated dataset (``LATENT_COLUMNS``).

    ``hue`` in [0, 1) (fraction of the colour wheel), ``saturation`` in [0.1, 1],
    ``brightness`` in [0.2, 1], ``shape`` an index into :data:`SHAPES`, ``orientation`` in
    [0, pi) radians (axis of the shape and of its grating texture), ``size`` in [0.25, 0.9]
    (shape diameter / image side), ``spatial_freq`` in [2, 16] cycles per image (the texture).
    """
    path = Path(root) / LATENTS_FILE
    if not path.is_file():
        raise BrainalignError(f"{path} does not exist: {root} is not a simulated dataset.")
    return pq.read_table(path)


def world_from_dataset(root: Path | str) -> SimWorld:
    """Rebuild the ground truth of a dataset written by :func:`simulate_dataset`.

    Raises
    ------
    BrainalignError
        The dataset is not simulated, or by another simulator version.
    """
    man = Path(root) / MANIFEST
    if not man.is_file():
        raise BrainalignError(f"{root} is not a brainalign dataset ({MANIFEST} is missing).")
    src = json.loads(man.read_text())["meta"]["source"]
    if src.get("kind") != "simulated" or src.get("simulator") != SIMULATOR:
        raise BrainalignError(
            f"{root} was not written by {SIMULATOR} (source kind {src.get('kind')!r}, "
            f"simulator {src.get('simulator')!r})."
        )
    return build_world(SimulatorParams.from_json(src["params"]), int(src["seed"]), bool(src["null"]))
