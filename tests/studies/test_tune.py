"""The Tune side that runs without a cluster: concurrency from resources, the Optuna space."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign import BrainalignError
from brainalign.studies import load_searchspace
from brainalign.studies.spec import Resources

SPACES = Path(__file__).resolve().parents[2] / "searchspaces"


def test_concurrency_from_cluster_resources() -> None:
    from brainalign.studies._tune import max_concurrent_trials

    assert max_concurrent_trials(Resources(), {"CPU": 4.0}) == 2
    assert max_concurrent_trials(Resources(trial_cpus=1.0), {"CPU": 4.0}) == 1
    assert max_concurrent_trials(Resources(workers_per_trial=2), {"CPU": 16.0}) == 7
    assert max_concurrent_trials(Resources(use_gpu=True), {"CPU": 16.0, "GPU": 2.0}) == 2
    with pytest.raises(BrainalignError, match="one free CPU for Ray Data"):
        max_concurrent_trials(Resources(), {"CPU": 2.0})
    with pytest.raises(BrainalignError, match="use_gpu needs 1 GPU"):
        max_concurrent_trials(Resources(use_gpu=True), {"CPU": 4.0})


def test_custom_resources_bound_concurrency_and_pin_the_trial() -> None:
    from brainalign.studies._tune import custom_per_trial, max_concurrent_trials, trial_resources

    pinned = Resources(workers_per_trial=2, custom_per_worker={"node_b": 1.0}, trial_custom={"node_b": 0.01})
    assert custom_per_trial(pinned) == {"node_b": 2.01}
    assert max_concurrent_trials(pinned, {"CPU": 64.0, "node_b": 5.0}) == 2  # 5 // 2.01, not 63 // 2.01
    assert max_concurrent_trials(Resources(custom_per_worker={"x": 1.0}), {"CPU": 64.0, "x": 1.0}) == 1
    with pytest.raises(BrainalignError, match=r"one trial needs 2.01 of the custom resource 'node_b'.*Ray has 0"):
        max_concurrent_trials(pinned, {"CPU": 64.0})
    assert trial_resources(pinned) == {"cpu": 0.01, "custom_resources": {"node_b": 0.01}}
    assert trial_resources(Resources()) == {"cpu": 0.01}


def test_fractional_gpus_pack_trials_on_one_gpu() -> None:
    from brainalign.studies._tune import max_concurrent_trials

    quarter = Resources(use_gpu=True, gpus_per_worker=0.25)
    assert max_concurrent_trials(quarter, {"CPU": 16.0, "GPU": 1.0}) == 4  # four small NICE trials share the GPU
    assert max_concurrent_trials(Resources(use_gpu=True), {"CPU": 16.0, "GPU": 1.0}) == 1
    assert max_concurrent_trials(Resources(use_gpu=True, workers_per_trial=2, gpus_per_worker=0.5),
                                 {"CPU": 16.0, "GPU": 2.0}) == 2
    with pytest.raises(BrainalignError, match=r"needs 0.5 GPU\(s\) per trial.*Ray has 0"):
        max_concurrent_trials(Resources(use_gpu=True, gpus_per_worker=0.5), {"CPU": 16.0})


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.toml")), ids=lambda p: p.stem)
def test_define_by_run_samples_inside_every_space(path: Path) -> None:
    """Optuna (real, seeded) samples each space through the define-by-run function Tune gets."""
    import optuna

    from brainalign.studies._tune import DefineByRun

    space = load_searchspace(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        DefineByRun(space.params)(trial)
        for p in space.params:
            v = trial.params[p.name]
            assert v in p.choices if p.kind == "choice" else p.low <= v <= p.high, (p.name, v)
        study.tell(trial, 0.0)
