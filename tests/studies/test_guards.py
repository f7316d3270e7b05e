"""A study never selects a diverged trial, never deletes what it did not create, and checks sizes (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign import BrainalignError
from brainalign.studies import load_study
from brainalign.studies._tune import TrialSummary

SPACE = """
encoder = "nice"
metric = "val_top1_best"
mode = "max"
[params]
lr = { float = [1e-5, 1e-3], log = true }
batch_size = { choice = [16, 32] }
"""

STUDY = """
[study]
name = "NAME"
dataset = "DATASET"
subjects = ["01", "02"]
encoders = [{ name = "nice", searchspace = "space.toml" }]
pairs = [{ backbone = "sim-clip", aligned = "simulated" }]
trials = 2
max_epochs = 2
grace_period = 1
final_seeds = 1
[config]
batch_size = 16
"""


def _study(tmp_path: Path, dataset: Path, name: str = "guards", space: str = SPACE) -> Path:
    (tmp_path / "space.toml").write_text(space)
    p = tmp_path / "study.toml"
    p.write_text(STUDY.replace("NAME", name).replace("DATASET", str(dataset)))
    return p


def test_an_errored_trial_is_never_the_best_whatever_it_reported() -> None:
    from brainalign.studies._tune import select_best

    diverged = TrialSummary("t1", {"lr": 1e9}, value=1.0, epochs=1,
                            error="NonFiniteError: training diverged: the loss is nan at epoch 1")
    fine = TrialSummary("t2", {"lr": 1e-4}, value=0.2, epochs=2)
    nan = TrialSummary("t3", {"lr": 1e-3}, value=float("nan"), epochs=2)
    assert select_best([diverged, fine, nan], "val_top1_best", "max").trial_id == "t2"
    low_loss = TrialSummary("t4", {}, value=-1.0, epochs=1, error="NonFiniteError")
    assert select_best([low_loss, fine], "val_loss", "min").trial_id == "t2"
    with pytest.raises(BrainalignError, match=r"no trial finished with a finite val_top1_best.*1 failed.*diverged"):
        select_best([diverged, nan], "val_top1_best", "max", "s")


def test_a_tie_goes_to_the_trial_proposed_first_whatever_the_result_order() -> None:
    """Tune lists results in the order of its random trial ids: a tie (top-1 on n validation
    images moves in steps of 1/n) must not pick the best config by chance."""
    from brainalign.studies._tune import _proposal, select_best

    first = TrialSummary("f00d", {"lr": 1e-4}, value=0.25, epochs=2, order=0)
    second = TrialSummary("0bad", {"lr": 1e-3}, value=0.25, epochs=2, order=1)
    worse = TrialSummary("0000", {"lr": 1e-2}, value=0.10, epochs=1, order=2)
    for trials in ([first, second, worse], [worse, second, first]):
        assert select_best(trials, "val_top1_best", "max").trial_id == "f00d"
    assert select_best([second, first], "val_loss", "min").trial_id == "f00d"
    assert select_best([second, worse], "val_loss", "min").trial_id == "0000"
    assert _proposal("3_lr=0.001,temperature=0.05", 7) == 2 and _proposal("", 7) == 7


@pytest.mark.parametrize("name", [".", "..", "../x", "", ".hidden"])
def test_a_study_name_that_could_address_another_folder_is_refused(
    tmp_path: Path, tiny_dataset: Path, name: str
) -> None:
    with pytest.raises(BrainalignError, match=r"\[study\] name (.* is not allowed|must not be empty)"):
        load_study(_study(tmp_path, tiny_dataset, name=name))


def test_fresh_never_removes_a_folder_brainalign_did_not_create(tmp_path: Path, tiny_dataset: Path) -> None:
    from brainalign.studies import run_study

    study = load_study(_study(tmp_path, tiny_dataset))
    foreign = tmp_path / "ray_results" / "guards"  # $BRAINALIGN_HOME is tmp_path (tests/conftest.py)
    foreign.mkdir(parents=True)
    (foreign / "someone-elses-experiment.pkl").write_text("precious")
    for mode in ("fresh", "auto"):
        with pytest.raises(BrainalignError, match=r"refusing to (remove|write into) .*no brainalign marker"):
            run_study(study, mode=mode)
        assert (foreign / "someone-elses-experiment.pkl").read_text() == "precious"


def test_study_check_refuses_a_batch_choice_larger_than_the_smallest_train_set(
    tmp_path: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from brainalign.cli import main

    path = _study(tmp_path, tiny_dataset, space=SPACE.replace("choice = [16, 32]", "choice = [16, 256]"))
    assert main(["study", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "batch_size 256 (the global batch: 256 rows per worker and step) is larger than the training rows " \
        "(at most 108" in err, err
    assert "largest batch_size of the study and its search spaces is 256" in err
    path = _study(tmp_path, tiny_dataset)
    assert main(["study", "check", str(path)]) == 0


def test_a_report_is_never_written_into_a_folder_that_is_not_a_report(tmp_path: Path) -> None:
    from brainalign.studies.report import build_report, write_report

    out = tmp_path / "reports" / "s"
    out.mkdir(parents=True)
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(BrainalignError, match="refusing to write into"):
        write_report(build_report([], title="t", protocol="", subjects=(), expected=0), out)
    assert (out / "thesis.tex").read_text() == "precious"
