"""Packing tested runs (unit level): how units group into packs, how a worker takes its share."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from brainalign import BrainalignError
from brainalign.config import DataConfig, TrainConfig
from brainalign.studies.spec import Arm
from brainalign.studies.units import RunUnit, unit_key
from brainalign.train.spec import RunSpec


def _units() -> list[RunUnit]:
    base = TrainConfig(data=DataConfig(path="/data/x", subjects=("01",)))
    arms = [Arm(encoder="nice", backbone="sim-clip", alignment=a, aligned=a != "none")
            for a in ("simulated", "none")]
    out = []
    for arm in arms:
        for sub in ("01", "02"):
            for seed in (0, 1, 2):
                out.append(RunUnit(key=unit_key(arm, sub, seed), arm=arm, subject=sub, seed=seed,
                                   config=replace(base, seed=seed), spec=RunSpec(role="final")))
    return out


def test_packs_are_an_arms_seeds_on_one_subject_in_order() -> None:
    from brainalign.studies._tune import pack_units

    units = _units()
    packs = pack_units(units)
    assert len(packs) == 4
    assert sorted(u.key for p in packs.values() for u in p) == sorted(u.key for u in units)
    for key, pack in packs.items():
        assert [u.seed for u in pack] == [0, 1, 2]
        assert {(u.arm.name, u.subject) for u in pack} == {(pack[0].arm.name, pack[0].subject)}
        assert key == f"{pack[0].arm.name}/sub-{pack[0].subject}"
    # the packs depend on the units only: a resumed study finds the same keys
    assert list(pack_units(list(units))) == list(packs)


def test_worker_shares_are_equal_disjoint_and_cover_the_split() -> None:
    from brainalign.train.ray_worker import worker_share

    x = np.arange(11 * 2 * 3, dtype=np.float32).reshape(11, 2, 3)
    ii = np.arange(11, dtype=np.int32)
    ss = np.zeros(11, dtype=np.int32)
    one = worker_share((x, ii, ss), 0, 1)
    assert np.array_equal(one[0].numpy(), x) and one[1].dtype == one[2].dtype
    shares = [worker_share((x, ii, ss), r, 3) for r in range(3)]
    assert [len(s[1]) for s in shares] == [3, 3, 3]  # 11 // 3 rows each: same number of steps
    rows = sorted(int(i) for s in shares for i in s[1])
    assert rows == list(range(9))
    for s in shares:
        assert np.array_equal(s[0].numpy(), x[s[1].numpy()])
        assert s[0].is_contiguous()


def test_packs_by_arm_hold_all_its_subjects_and_seeds_in_order() -> None:
    from brainalign.studies._tune import pack_units, units_experiment

    units = _units()
    packs = pack_units(units, "arm")
    assert list(packs) == [units[0].arm.name, units[-1].arm.name]
    for key, pack in packs.items():
        assert [(u.subject, u.seed) for u in pack] == [(s, k) for s in ("01", "02") for k in (0, 1, 2)]
        assert {u.arm.name for u in pack} == {key}
    assert [u.key for p in packs.values() for u in p] == [u.key for u in units]
    # each packing has its own Tune experiment: a restored grid keeps the pack keys it started with
    assert units_experiment("subject") == "runs" and units_experiment("arm") != "runs"
    with pytest.raises(BrainalignError, match=r"Invalid \[resources\] pack 'seed'"):
        pack_units(units, "seed")
