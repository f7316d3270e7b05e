"""The shared checks: finite ranges for every float key, plain names for every path component."""

from __future__ import annotations

import math

import pytest

from brainalign import BrainalignError, TrainConfig
from brainalign._checks import check_range


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_check_range_refuses_non_finite_values_whatever_the_bounds(value: float) -> None:
    with pytest.raises(BrainalignError, match=r"lr must be a finite number in \(0, inf\)"):
        check_range("lr", value, low=0.0, low_inclusive=False)
    with pytest.raises(BrainalignError, match="finite"):
        check_range("x", value)


@pytest.mark.parametrize("key", ["lr", "temperature", "weight_decay", "grad_clip", "min_lr", "cpus_per_worker",
                                 "data.val_fraction"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_every_float_config_key_refuses_inf_and_nan(key: str, value: str) -> None:
    with pytest.raises(BrainalignError, match=key.replace(".", r"\.")):
        TrainConfig.from_flat({key: value})


def test_check_range_refuses_non_numbers() -> None:
    with pytest.raises(BrainalignError, match="must be a number"):
        check_range("lr", "fast")  # type: ignore[arg-type]
    assert check_range("epochs", 3, low=1) == 3


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        (".", "current or the parent folder"),
        ("..", "current or the parent folder"),
        ("../../x", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        (".hidden", "starts with '.'"),
        ("-rf", "starts with '-'"),
        ("tab\there", "control character"),
        ("x" * 129, "129 characters"),
        ("a b", "holds ' '"),
        ("naïve", "holds 'ï'"),
    ],
)
def test_check_name_refuses_what_could_address_another_folder(name: str, why: str) -> None:
    from brainalign._checks import check_name

    with pytest.raises(BrainalignError, match="is not allowed") as e:
        check_name("study name", name)
    assert why in str(e.value) and "plain name" in str(e.value)


@pytest.mark.parametrize("name", ["mini", "mini-null", "cross-subject-mini", "nice__sim-clip__none", "v1.2", "01"])
def test_check_name_accepts_plain_names(name: str) -> None:
    from brainalign._checks import check_name

    assert check_name("study name", name) == name


@pytest.mark.parametrize(("key", "value"), [("experiment", ""), ("experiment", "../../x"), ("experiment", ".."),
                                            ("run_name", "a/b"), ("data.subjects", "../01")])
def test_names_in_the_config_are_plain(key: str, value: str) -> None:
    with pytest.raises(BrainalignError, match="not allowed"):
        TrainConfig.from_flat({key: value})
