"""Selection hygiene: one validation metric selects both a sweep's trials and every checkpoint,
the study file says which, and the report's family correction is a study option."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign import BrainalignError
from brainalign.studies import load_study

SPACE = """
encoder = "nice"
{metric}
[params]
lr = {{ float = [1e-5, 1e-3], log = true }}
"""

STUDY = """
[study]
name = "unit"
dataset = "data/sim-tiny"
subjects = ["01", "02"]
encoders = [{{ name = "nice", searchspace = "space.toml" }}]
pairs = [{{ backbone = "sim-clip", aligned = "simulated" }}]
trials = 2
max_epochs = 4
{study}
[config]
batch_size = 16
{config}
"""


def _load(tmp_path: Path, *, metric: str = "", study: str = "", config: str = "", sets: tuple[str, ...] = ()
          ) -> object:
    (tmp_path / "space.toml").write_text(SPACE.format(metric=metric))
    p = tmp_path / "study.toml"
    p.write_text(STUDY.format(study=study, config=config))
    return load_study(p, sets)


@pytest.mark.parametrize(("study_line", "space_metric"), [('select_metric = "val_loss"', "val_loss"),
                                                         ('select_metric = "val_top1"', "val_top1_best")])
def test_search_follows_the_study_selection_metric(tmp_path: Path, study_line: str, space_metric: str) -> None:
    s = _load(tmp_path, study=study_line)
    checkpoint = study_line.split('"')[1]
    assert s.select_metric == checkpoint and s.options.space("nice").metric == space_metric
    flat = s.run_flat(s.arms()[0], subjects=("01",), seed=0, run_name="r")
    assert flat["select_metric"] == checkpoint  # every run's checkpoint selects on the same metric


def test_unstated_selection_follows_the_search_space(tmp_path: Path) -> None:
    s = _load(tmp_path, metric='metric = "val_top1_best"')
    assert s.select_metric == "val_top1" and s.config["select_metric"] == "val_top1"
    s = _load(tmp_path, metric='metric = "val_loss"')
    assert s.select_metric == "val_loss"


def test_search_and_checkpoint_on_different_metrics_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BrainalignError, match="differs from the study's selection metric 'val_loss'"):
        _load(tmp_path, metric='metric = "val_top1_best"', study='select_metric = "val_loss"')
    with pytest.raises(BrainalignError, match="differs from the study's selection metric 'val_loss'"):
        _load(tmp_path, metric='metric = "val_top1_best"', config='select_metric = "val_loss"')
    with pytest.raises(BrainalignError, match="one validation metric"):
        _load(tmp_path, study='select_metric = "val_top1"', config='select_metric = "val_loss"')
    with pytest.raises(BrainalignError, match="one checkpoint metric"):
        _load(tmp_path, metric='metric = "val_top5"')
    with pytest.raises(BrainalignError, match="test_top1"):
        _load(tmp_path, study='select_metric = "test_top1"')


def test_set_selection_wins_over_config_and_moves_the_search(tmp_path: Path) -> None:
    s = _load(tmp_path, config='select_metric = "val_loss"', sets=("select_metric=val_top1",))
    assert s.select_metric == "val_top1" and s.options.space("nice").metric == "val_top1_best"
    assert "select_metric" not in s.overrides


def test_correction_is_a_study_option(tmp_path: Path) -> None:
    assert _load(tmp_path).correction == "holm"
    assert _load(tmp_path, study='correction = "bh"').correction == "bh"
    with pytest.raises(BrainalignError, match="correction"):
        _load(tmp_path, study='correction = "bonferroni"')
