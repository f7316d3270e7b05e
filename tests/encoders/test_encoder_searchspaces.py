"""Every ``searchspaces/*.toml`` names only TrainConfig keys or its encoder's ``arch.<param>``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from brainalign.config import TrainConfig
from brainalign.encoders import create_encoder, encoder_info, list_encoders

SPACES = Path(__file__).resolve().parents[2] / "searchspaces"
PATHS = sorted(SPACES.glob("*.toml"))


def _load(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _values(spec: dict[str, Any]) -> list[Any]:
    """Representative values of one [params] entry: each choice, or both ends of a range."""
    if "choice" in spec:
        return list(spec["choice"])
    kind = "int" if "int" in spec else "float"
    assert set(spec) <= {kind, "log"}, f"unknown spec keys {sorted(spec)}"
    low, high = spec[kind]
    assert low < high and (not spec.get("log") or low > 0)
    return [low, high]


def test_every_encoder_has_a_space() -> None:
    spaced = {_load(p).get("encoder") for p in PATHS}
    assert set(list_encoders()) <= spaced, f"no searchspace for {sorted(set(list_encoders()) - spaced)}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_space_keys_are_config_keys(path: Path) -> None:
    doc = _load(path)
    encoder = doc.get("encoder", TrainConfig().encoder)
    encoder_info(encoder)
    assert doc.get("mode") in {"min", "max"} and isinstance(doc.get("metric"), str)
    known = set(TrainConfig().to_flat())
    arch = set(encoder_info(encoder).arch_params())
    params = doc["params"]
    assert params, f"{path.name}: empty [params]"
    for key, spec in params.items():
        if key.startswith("arch."):
            assert key[5:] in arch, f"{path.name}: {key!r} is not a parameter of {encoder!r} ({sorted(arch)})"
        else:
            assert key in known, f"{path.name}: {key!r} is not a TrainConfig key"
        for value in _values(spec):  # each value must make a valid config
            cfg = TrainConfig.from_flat({"encoder": encoder, key: value})
            if key.startswith("arch."):
                assert cfg.arch[key[5:]] == value


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_space_arch_values_build_the_encoder(path: Path) -> None:
    doc = _load(path)
    encoder = doc.get("encoder", TrainConfig().encoder)
    shape = (
        dict(n_chans=4, n_times=1)
        if encoder_info(encoder).modalities == ("fmri",)
        else dict(n_chans=4, n_times=100)
    )
    small = dict(width=8) if encoder == "mlp" else {}
    for key, spec in doc["params"].items():
        if key.startswith("arch."):
            for value in _values(spec):
                create_encoder(encoder, embed_dim=8, n_subjects=2, **shape, **(small | {key[5:]: value}))
