"""No config key is silently ignored (issue 11, class 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign import BrainalignError
from brainalign.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_keys_next_to_a_config_table_are_an_error(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('epochs = 1\n[config]\nencoder = "nice"\n')
    with pytest.raises(BrainalignError, match=r"\['epochs'\] stand next to the \[config\] table and would be ignored"):
        load_config(p)
    p.write_text('[config]\nepochs = 1\n[resources]\nnum_cpus = 4\n')
    with pytest.raises(BrainalignError, match=r"\['resources'\] stand next to the \[config\] table"):
        load_config(p)
    p.write_text("[config]\nepochs = 1\n[config.data]\nval_fraction = 0.2\n")
    cfg = load_config(p)
    assert cfg.epochs == 1 and cfg.data.val_fraction == 0.2
    p.write_text("epochs = 2\n[data]\nval_fraction = 0.2\n")  # the whole file as the config: fine
    assert load_config(p).epochs == 2


@pytest.mark.parametrize("study", ["jobs/mini_study.toml", "jobs/cross_subject_mini.toml"])
def test_a_study_file_is_not_a_train_config(study: str, capsys: pytest.CaptureFixture[str]) -> None:
    from brainalign.cli import main

    assert main(["train", "--config", str(REPO / study), "--print-config"]) == 2
    assert "is a study file (it has a [study] table), not a train config" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["01,01", "01,02,01"])
def test_duplicate_subjects_are_an_error(value: str) -> None:
    with pytest.raises(BrainalignError, match=r"data.subjects lists \['01'\] more than once"):
        load_config(None, {"data.subjects": value})
    with pytest.raises(BrainalignError, match=r"data.test_subjects lists \['01'\] more than once"):
        load_config(None, {"data.test_subjects": value})
