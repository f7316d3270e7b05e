"""Every ``searchspaces/*.toml`` (read by the real parser) names only TrainConfig keys or its
encoder's ``arch.<param>``, and every searched architecture value builds the encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign.config import TrainConfig
from brainalign.encoders import create_encoder, encoder_info, list_encoders
from brainalign.studies import load_searchspace

SPACES = Path(__file__).resolve().parents[2] / "searchspaces"
PATHS = sorted(SPACES.glob("*.toml"))


def test_every_encoder_has_a_space() -> None:
    spaced = {load_searchspace(p).encoder for p in PATHS}
    assert set(list_encoders()) <= spaced, f"no searchspace for {sorted(set(list_encoders()) - spaced)}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_space_values_are_valid_configs(path: Path) -> None:
    space = load_searchspace(path)  # checks keys, ranges and every bound against TrainConfig
    assert space.params and space.encoder == path.stem
    for p in space.params:
        for value in p.candidates():
            cfg = TrainConfig.from_flat({"encoder": space.encoder, p.name: value})
            if p.name.startswith("arch."):
                assert cfg.arch[p.name[5:]] == value


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_space_arch_values_build_the_encoder(path: Path) -> None:
    space = load_searchspace(path)
    fmri = encoder_info(space.encoder).modalities == ("fmri",)
    shape = dict(n_chans=4, n_times=1) if fmri else dict(n_chans=4, n_times=100)
    small = dict(width=8) if space.encoder == "mlp" else {}
    for p in space.params:
        if p.name.startswith("arch."):
            for value in p.candidates():
                create_encoder(space.encoder, embed_dim=8, n_subjects=2, **shape, **(small | {p.name[5:]: value}))
