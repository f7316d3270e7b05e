"""Study and search-space validation: every problem fails before compute, with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign import BrainalignError
from brainalign.encoders import list_encoders
from brainalign.sweep import load_searchspace, load_study
from brainalign.sweep.study import Resources

REPO = Path(__file__).resolve().parents[2]
SPACES = sorted((REPO / "searchspaces").glob("*.toml"))
STUDIES = sorted((REPO / "jobs").glob("*study*.toml"))

SPACE = """
encoder = "nice"
metric = "val_top1_best"
mode = "max"
[params]
lr = { float = [1e-5, 1e-3], log = true }
batch_size = { choice = [32, 64] }
"""

STUDY = """
[study]
name = "unit"
dataset = "data/sim-tiny"
subjects = ["01", "02"]
encoders = [{ name = "nice", searchspace = "space.toml" }]
pairs = [{ backbone = "sim-clip", aligned = "simulated" }]
trials = 2
max_epochs = 4
grace_period = 1
final_seeds = 2
[resources]
workers_per_trial = 1
[config]
batch_size = 16
"""


def _write(tmp_path: Path, study: str = STUDY, space: str = SPACE) -> Path:
    (tmp_path / "space.toml").write_text(space)
    p = tmp_path / "study.toml"
    p.write_text(study)
    return p


def test_valid_study_parses(tmp_path: Path) -> None:
    s = load_study(_write(tmp_path))
    assert s.name == "unit" and s.search_subject == "01" and s.final_seeds == (0, 1)
    assert [a.name for a in s.arms()] == ["nice__sim-clip__simulated", "nice__sim-clip__none"]
    assert s.n_runs() == {"searches": 2, "trials": 4, "finals": 8}
    flat = s.base_flat(s.arms()[1], "02", 1)
    assert flat["data.image_table"] == "sim-clip:none" and flat["data.subjects"] == ("02",)
    assert flat["experiment"] == "unit" and flat["epochs"] == 4 and flat["batch_size"] == 16
    assert s.resources == Resources()
    assert s.fingerprint() == load_study(tmp_path / "study.toml").fingerprint()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (("trials = 2", "trails = 2"), r"unknown key 'trails'.*Did you mean 'trials'"),
        (("[resources]", "[resource]"), r"unknown key 'resource'.*Did you mean 'resources'"),
        (("workers_per_trial = 1", "workers_per_trail = 1"), r"Did you mean 'workers_per_trial'"),
        (("batch_size = 16\n", "batch_sise = 16\n"), r"\[config\] 'batch_sise' is not a TrainConfig key.*'batch_size'"),
        (("batch_size = 16\n", "epochs = 3\n"), r"\[config\] 'epochs' is set by \[study\] max_epochs"),
        (("grace_period = 1", "grace_period = 9"), r"grace_period \(9\) must be <= max_epochs \(4\)"),
        (('subjects = ["01", "02"]', 'subjects = ["01", "01"]'), r"subjects has duplicates"),
        (('subjects = ["01", "02"]', 'subjects = ["01"]\nsearch_subject = "02"'),
         r"search_subject '02' is not one of the study subjects"),
        (('name = "nice"', 'name = "nise"'), r"Did you mean 'nice'"),
        (('aligned = "simulated"', 'aligned = "none"'), r"aligned and base must differ"),
        (("final_seeds = 2", "final_seeds = 0"), r"final_seeds must be >= 1"),
        (("final_seeds = 2", "final_seeds = [1, 1]"), r"final_seeds has duplicates"),
        (("workers_per_trial = 1", "trial_cpus = 0"), r"trial_cpus must be > 0 \(Ray refuses a 0-CPU trial\)"),
        (('name = "unit"', 'name = "a b"'), r"\[study\] name 'a b' is not allowed.*plain name"),
        (("[config]\nbatch_size = 16", "[config]\nwarmup_epochs = 6"), r"\[config\] \(with max_epochs = 4\) is invalid: warmup_epochs must be in \[0, 3\]"),
    ],
)
def test_study_errors(tmp_path: Path, edit: tuple[str, str], match: str) -> None:
    assert edit[0] in STUDY
    with pytest.raises(BrainalignError, match=match):
        load_study(_write(tmp_path, STUDY.replace(*edit, 1)))


def test_missing_study_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(BrainalignError, match="does not exist"):
        load_study(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[study\n")
    with pytest.raises(BrainalignError, match="not valid TOML"):
        load_study(tmp_path / "bad.toml")


def test_missing_searchspace_lists_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    study = STUDY.replace('encoders = [{ name = "nice", searchspace = "space.toml" }]', 'encoders = ["nice"]')
    p = tmp_path / "jobs" / "s.toml"
    p.parent.mkdir()
    p.write_text(study)
    with pytest.raises(BrainalignError, match=r"no search space for encoder 'nice'.*searchspaces/nice.toml"):
        load_study(p)
    (tmp_path / "searchspaces").mkdir()
    (tmp_path / "searchspaces" / "nice.toml").write_text(SPACE)
    assert load_study(p).encoders[0].space.path == str((tmp_path / "searchspaces" / "nice.toml").resolve())


@pytest.mark.parametrize(
    ("param", "match"),
    [
        ("lr = { float = [1e-3, 1e-5] }", r"'lr': low must be < high"),
        ("lr = { float = [0.0, 1e-3], log = true }", r"'lr': a log-scale range needs low > 0"),
        ("batch_size = { choice = [] }", r"'batch_size': choice must be a non-empty list"),
        ("batch_size = { choice = [1, 64] }", r"batch_size values must be >= 2"),
        ("lr = { float = [1e-5, 1e-3], lg = true }", r"unknown key 'lg'.*Did you mean 'log'"),
        ("lr = { uniform = [1e-5, 1e-3] }", r"unknown key 'uniform'"),
        ("lr = [1e-5, 1e-3]", r"'lr' must be a table"),
        ("temprature = { float = [0.02, 0.2] }", r"'temprature' is not a TrainConfig key.*Did you mean 'temperature'"),
        ('"arch.drop_prb" = { float = [0.1, 0.5] }', r"not an architecture option of encoder 'nice'.*'drop_prob'"),
        ("epochs = { int = [1, 5] }", r"'epochs' cannot be searched; it is set by \[study\] max_epochs"),
        ("seed = { int = [1, 5] }", r"'seed' cannot be searched"),
        ("lr = { float = [-1.0, 1e-3] }", r"lr = -1.0 is not a valid value: lr must be in \(0"),
        ("batch_size = { float = [16, 64] }", r"batch_size = 16.0 is not a valid value: batch_size must be int"),
        ("patience = { int = [1.5, 4] }", r"int bounds must be integers"),
        ("lr = { float = [1e-5, 1e-3], log = true, step = 1e-5 }", r"'step' cannot be combined with log"),
        ('data.normalize = { choice = ["none", "l2"] }', r"data.normalize = 'l2' is not a valid value"),
    ],
)
def test_searchspace_errors(tmp_path: Path, param: str, match: str) -> None:
    space = SPACE.split("[params]")[0] + "[params]\n" + param + "\n"
    with pytest.raises(BrainalignError, match=match):
        load_study(_write(tmp_path, space=space))


@pytest.mark.parametrize(
    ("head", "match"),
    [
        ('encoder = "nice"\nmetric = "test_top1"\n', r"metric 'test_top1' is not a validation metric.*never used"),
        ('encoder = "nice"\nmetric = "val_loss"\nmode = "max"\n', r"'val_loss' is selected with mode 'min'"),
        ('encoder = "nise"\n', r"Did you mean 'nice'"),
        ('encoder = "nice"\nmetrc = "val_top1"\n', r"unknown key 'metrc'.*Did you mean 'metric'"),
        ('metric = "val_top1"\n', r"missing required key 'encoder'"),
    ],
)
def test_searchspace_header_errors(tmp_path: Path, head: str, match: str) -> None:
    space = head + "[params]\nlr = { float = [1e-5, 1e-3], log = true }\n"
    with pytest.raises(BrainalignError, match=match):
        load_study(_write(tmp_path, space=space))


def test_searchspace_for_other_encoder_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "space.toml"
    p.write_text(SPACE)
    with pytest.raises(BrainalignError, match="is for encoder 'nice', but the study uses it for 'eegnet'"):
        load_searchspace(p, "eegnet")


def test_nested_arch_table_is_flattened(tmp_path: Path) -> None:
    p = tmp_path / "space.toml"
    p.write_text(SPACE + "[params.arch]\ndrop_prob = { float = [0.1, 0.5] }\n")
    names = [q.name for q in load_searchspace(p).params]
    assert names == ["lr", "batch_size", "arch.drop_prob"]


def test_simulated_dataset_contents_are_checked_before_simulating(tmp_path: Path) -> None:
    from brainalign.sweep import ensure_dataset

    bad = STUDY.replace('dataset = "data/sim-tiny"', 'dataset = "data/sim-tiny"\nsimulate = { preset = "tiny" }')
    s = load_study(_write(tmp_path, bad.replace('backbone = "sim-clip"', 'backbone = "sim-clipp"')))
    with pytest.raises(BrainalignError, match=r"image table 'sim-clipp:simulated' is not in the simulated.*sim-clip"):
        ensure_dataset(s)
    s = load_study(_write(tmp_path, bad.replace('subjects = ["01", "02"]', 'subjects = ["01", "07"]')))
    with pytest.raises(BrainalignError, match=r"subjects \['07'\] are not in the simulated"):
        ensure_dataset(s)
    with pytest.raises(BrainalignError, match="Invalid simulator preset 'tinny'"):
        load_study(_write(tmp_path, bad.replace('preset = "tiny"', 'preset = "tinny"')))
    assert not (tmp_path / "data").exists()


def test_validate_data_checks_tables_and_subjects(tmp_path: Path, tiny_dataset: Path) -> None:
    from brainalign.sweep import validate_data

    study = STUDY.replace('dataset = "data/sim-tiny"', f'dataset = "{tiny_dataset}"')
    validate_data(load_study(_write(tmp_path, study)))
    with pytest.raises(BrainalignError, match=r"image table 'sim-clip:aligned' is not in dataset"):
        validate_data(load_study(_write(tmp_path, study.replace('aligned = "simulated"', 'aligned = "aligned"'))))
    with pytest.raises(BrainalignError, match=r"subjects \['03'\] are not in dataset"):
        validate_data(load_study(_write(tmp_path, study.replace('"01", "02"]', '"01", "03"]'))))
    with pytest.raises(BrainalignError, match=r"Dataset path .* does not exist"):
        validate_data(load_study(_write(tmp_path, STUDY.replace("data/sim-tiny", "data/nothing"))))
    too_short = study + '"arch.kernel_time" = 90\n'
    with pytest.raises(BrainalignError, match=r"encoder 'nice' cannot take the epochs .*17 channels x 100 samples.*kernel_time"):
        validate_data(load_study(_write(tmp_path, too_short)))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_searchspace_validates(path: Path) -> None:
    import tomllib

    encoder = tomllib.loads(path.read_text()).get("encoder")
    if encoder not in list_encoders():
        pytest.skip(f"encoder {encoder!r} is not registered yet")
    space = load_searchspace(path)
    assert space.encoder == path.stem and space.metric.startswith("val_")


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_job_study_validates(path: Path) -> None:
    study = load_study(path)
    assert study.arms() and study.subjects


def test_cli_check_validates_and_prints_the_plan(tmp_path: Path, tiny_dataset: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from brainalign.cli import main

    path = _write(tmp_path, STUDY.replace('dataset = "data/sim-tiny"', f'dataset = "{tiny_dataset}"'))
    assert main(["sweep", "--study", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "2 searches of 2 trials" in out and "8 finals (2 subjects x 2 seeds per arm)" in out
    assert "check out" in out
    bad = _write(tmp_path, STUDY.replace("trials = 2", "trails = 2"))
    assert main(["sweep", "--study", str(bad), "--check"]) == 2
    assert "Did you mean 'trials'" in capsys.readouterr().err


def test_concurrency_from_cluster_resources() -> None:
    from brainalign.sweep.search import max_concurrent_trials

    assert max_concurrent_trials(Resources(), {"CPU": 4.0}) == 2
    assert max_concurrent_trials(Resources(trial_cpus=1.0), {"CPU": 4.0}) == 1
    assert max_concurrent_trials(Resources(workers_per_trial=2), {"CPU": 16.0}) == 7
    assert max_concurrent_trials(Resources(use_gpu=True), {"CPU": 16.0, "GPU": 2.0}) == 2
    with pytest.raises(BrainalignError, match="one free CPU for Ray Data"):
        max_concurrent_trials(Resources(), {"CPU": 2.0})
    with pytest.raises(BrainalignError, match="use_gpu needs 1 GPU"):
        max_concurrent_trials(Resources(use_gpu=True), {"CPU": 4.0})
