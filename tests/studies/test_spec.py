"""The study file (both kinds) and search spaces: every problem fails before compute, with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainalign import BrainalignError
from brainalign.config import TrainConfig
from brainalign.encoders import list_encoders
from brainalign.studies import STUDY_OWNED, load_searchspace, load_study
from brainalign.studies.spec import Resources

REPO = Path(__file__).resolve().parents[2]
SPACES = sorted((REPO / "searchspaces").glob("*.toml"))
STUDIES = sorted(p for p in (REPO / "jobs").glob("*.toml") if "[study]" in p.read_text())

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
    assert s.kind == "sweep" and s.name == "unit" and s.experiment == "unit"
    assert s.options.search_subject == "01" and s.final_seeds == (0, 1)
    assert [a.name for a in s.arms()] == ["nice__sim-clip__simulated", "nice__sim-clip__none"]
    flat = s.run_flat(s.arms()[1], subjects=("02",), seed=1, run_name="r")
    assert flat["data.image_table"] == "sim-clip:none" and flat["data.subjects"] == ("02",)
    assert flat["experiment"] == "unit" and flat["epochs"] == 4 and flat["batch_size"] == 16
    assert set(STUDY_OWNED) <= set(flat)
    assert s.resources == Resources()
    assert s.fingerprint() == load_study(tmp_path / "study.toml").fingerprint()
    # an explicit kind = "sweep" is the default: same study, same fingerprint (resume keeps working)
    explicit = load_study(_write(tmp_path, STUDY.replace("[study]\n", '[study]\nkind = "sweep"\n', 1)))
    assert explicit.fingerprint() == s.fingerprint()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (("trials = 2", "trails = 2"), r"Invalid key in .*\[study\]: 'trails'.*Did you mean 'trials'"),
        (("[resources]", "[resource]"), r"Invalid key in .*: 'resource'.*Did you mean 'resources'"),
        (("workers_per_trial = 1", "workers_per_trail = 1"), r"Did you mean 'workers_per_trial'"),
        (("batch_size = 16\n", "batch_sise = 16\n"), r"\[config\] key \(a TrainConfig key\) 'batch_sise'.*'batch_size'"),
        (('name = "unit"', 'name = "unit"\nkind = "sweeep"'), r"Invalid study kind 'sweeep'.*Did you mean 'sweep'"),
        (('name = "unit"', 'name = "unit"\nconfig_from_run = "x"'), r"Invalid key .*'config_from_run'"),
        (("batch_size = 16\n", "epochs = 3\n"), r"\[config\] 'epochs' is set by \[study\] max_epochs"),
        (("grace_period = 1", "grace_period = 9"), r"grace_period \(9\) must be <= max_epochs \(4\)"),
        (('subjects = ["01", "02"]', 'subjects = ["01", "01"]'), r"subjects has duplicates"),
        (('subjects = ["01", "02"]', 'subjects = ["01"]\nsearch_subject = "02"'),
         r"search_subject '02' is not one of the study subjects"),
        (('name = "nice"', 'name = "nise"'), r"Did you mean 'nice'"),
        (('aligned = "simulated"', 'aligned = "none"'), r"aligned and base must differ"),
        (("final_seeds = 2", "final_seeds = 0"), r"final_seeds must be in \[1, inf\), got 0"),
        (("final_seeds = 2", "final_seeds = [1, 1]"), r"final_seeds has duplicates"),
        (("workers_per_trial = 1", "trial_cpus = 0"), r"trial_cpus must be > 0 \(Ray refuses a 0-CPU trial\)"),
        (("workers_per_trial = 1", "custom_per_worker = 1"), r"custom_per_worker must be a table of Ray custom"),
        (("workers_per_trial = 1", "custom_per_worker = { CPU = 1 }"), r"names 'CPU', which Ray manages itself"),
        (("workers_per_trial = 1", "trial_custom = { gpu = 1 }"), r"trial_custom names 'gpu', which Ray manages"),
        (("workers_per_trial = 1", "custom_per_worker = { node_b = 1.5 }"), r"node_b = 1.5: Ray takes fractions"),
        (("workers_per_trial = 1", "trial_custom = { node_b = 0 }"), r"trial_custom.node_b must be in \(0"),
        (("workers_per_trial = 1", "custom_per_wroker = { a = 1 }"), r"Did you mean 'custom_per_worker'"),
        (('name = "unit"', 'name = "a b"'), r"\[study\] name 'a b' is not allowed.*plain name"),
        (("[config]\nbatch_size = 16", "[config]\nwarmup_epochs = 6"), r"\[config\] \(with max_epochs = 4\) is invalid: warmup_epochs must be in \[0, 3\]"),
    ],
)
def test_study_errors(tmp_path: Path, edit: tuple[str, str], match: str) -> None:
    assert edit[0] in STUDY
    with pytest.raises(BrainalignError, match=match):
        load_study(_write(tmp_path, STUDY.replace(*edit, 1)))


def test_custom_resources_parse_and_leave_the_fingerprint_alone(tmp_path: Path) -> None:
    """Placement (Ray custom resources) is read as given, reaches every run's RunSpec, and does
    not change the fingerprint: moving a study to other nodes keeps its saved state."""
    from brainalign.paths import Locations
    from brainalign.studies import make_plan
    from brainalign.studies.units import StudyContext

    plain = load_study(_write(tmp_path))
    pinned = load_study(_write(tmp_path, STUDY.replace(
        "workers_per_trial = 1", 'workers_per_trial = 1\ncustom_per_worker = { node_b = 1 }\ntrial_custom = { "node_b" = 0.01 }')))
    assert pinned.resources.custom_per_worker == {"node_b": 1.0} and pinned.resources.trial_custom == {"node_b": 0.01}
    assert pinned.fingerprint() == plain.fingerprint()
    ctx = StudyContext("run", Locations.current())
    plan = make_plan(pinned, "http://127.0.0.1:5000")
    search = plan.searches(ctx)[0]
    finals = plan.runs(ctx, {a.name: {} for a in pinned.arms()})
    assert search.trial_spec.custom_resources == {"node_b": 1.0}
    assert {tuple(u.spec.custom_resources.items()) for u in finals} == {(("node_b", 1.0),)}
    by_set = load_study(tmp_path / "study.toml", ["resources.custom_per_worker={gpu_a100 = 2}"])
    assert by_set.resources.custom_per_worker == {"gpu_a100": 2.0}


def test_gpus_per_worker_reaches_every_run_and_bad_shares_are_refused(tmp_path: Path) -> None:
    from brainalign.paths import Locations
    from brainalign.studies import make_plan
    from brainalign.studies.units import StudyContext

    plain = load_study(_write(tmp_path))
    quarter = load_study(tmp_path / "study.toml", ["resources.use_gpu=true", "resources.gpus_per_worker=0.25"])
    assert quarter.resources.gpus_per_worker == 0.25
    assert quarter.fingerprint() != plain.fingerprint()  # use_gpu is in it ...
    half = load_study(tmp_path / "study.toml", ["resources.use_gpu=true", "resources.gpus_per_worker=0.5"])
    assert half.fingerprint() == quarter.fingerprint()  # ... the GPU share is not: it changes no result
    ctx = StudyContext("run", Locations.current())
    finals = make_plan(quarter, "http://127.0.0.1:5000").runs(ctx, {a.name: {} for a in quarter.arms()})
    assert {(u.config.use_gpu, u.config.gpus_per_worker) for u in finals} == {(True, 0.25)}
    for bad, msg in (("0", "gpus_per_worker"), ("1.5", "fractions up to 1"), ("-1", "gpus_per_worker")):
        with pytest.raises(BrainalignError, match=msg):
            load_study(tmp_path / "study.toml", [f"resources.gpus_per_worker={bad}"])
    with pytest.raises(BrainalignError, match="gpus_per_worker"):
        TrainConfig.from_flat({"gpus_per_worker": 2.5}, strict_types=False)


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
    assert load_study(p).options.space("nice").path == str((tmp_path / "searchspaces" / "nice.toml").resolve())


@pytest.mark.parametrize(
    ("param", "match"),
    [
        ("lr = { float = [1e-3, 1e-5] }", r"'lr': low must be < high"),
        ("lr = { float = [0.0, 1e-3], log = true }", r"'lr': a log-scale range needs low > 0"),
        ("batch_size = { choice = [] }", r"'batch_size': choice must be a non-empty list"),
        ("batch_size = { choice = [1, 64] }", r"batch_size values must be >= 2"),
        ("lr = { float = [1e-5, 1e-3], lg = true }", r"Invalid key .*'lg'.*Did you mean 'log'"),
        ("lr = { uniform = [1e-5, 1e-3] }", r"Invalid key .*'uniform'"),
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
        ('encoder = "nice"\nmetrc = "val_top1"\n', r"Invalid key .*'metrc'.*Did you mean 'metric'"),
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
    from brainalign.studies import ensure_dataset

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
    from brainalign.studies import validate_data

    study = STUDY.replace('dataset = "data/sim-tiny"', f'dataset = "{tiny_dataset}"')
    s = load_study(_write(tmp_path, study))
    validate_data(s, {e: s.options.space(e) for e in s.encoders})
    with pytest.raises(BrainalignError, match=r"image table 'sim-clip:aligned' is not in dataset"):
        validate_data(load_study(_write(tmp_path, study.replace('aligned = "simulated"', 'aligned = "aligned"'))))
    with pytest.raises(BrainalignError, match=r"subjects \['03'\] are not in dataset"):
        validate_data(load_study(_write(tmp_path, study.replace('"01", "02"]', '"01", "03"]'))))
    with pytest.raises(BrainalignError, match=r"Dataset path .* does not exist"):
        validate_data(load_study(_write(tmp_path, STUDY.replace("data/sim-tiny", "data/nothing"))))
    too_short = study + '"arch.kernel_time" = 90\n'
    with pytest.raises(BrainalignError, match=r"encoder 'nice' cannot take the epochs .*17 channels x 100 samples.*kernel_time"):
        validate_data(load_study(_write(tmp_path, too_short)))
    # a searched arch bound the dataset cannot take fails as well
    space = SPACE + '"arch.kernel_time" = { int = [10, 90] }\n'
    s = load_study(_write(tmp_path, study, space=space))
    validate_data(s)  # without the spaces only [config] is built
    with pytest.raises(BrainalignError, match=r"with arch.kernel_time = 90 cannot take"):
        validate_data(s, {"nice": s.options.space("nice")})


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
    assert study.arms() and study.subjects and study.kind in ("sweep", "cross_subject", "calibrate")


XS = """
[study]
kind = "cross_subject"
name = "xs"
dataset = "data/sim-tiny"
subjects = ["01", "02"]
encoders = ["nice"]
pairs = [{ backbone = "sim-clip", aligned = "simulated" }]
max_epochs = 3
final_seeds = [7]
[config]
batch_size = 16
"""


def test_cross_subject_study_parses_with_the_same_format(tmp_path: Path) -> None:
    s = load_study(_write(tmp_path, XS))
    assert s.kind == "cross_subject" and s.options.config_from_run == "" and s.final_seeds == (7,)
    flat = s.run_flat(s.arms()[0], subjects=("01",), test_subjects=("02",), seed=7, run_name="r")
    assert flat["data.subjects"] == ("01",) and flat["data.test_subjects"] == ("02",) and flat["epochs"] == 3


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (('subjects = ["01", "02"]', 'subjects = ["01"]'), r"needs at least 2 subjects"),
        (('final_seeds = [7]', 'final_seeds = [7]\nconfig_from_run = "a"\nconfig_from_sweep = "b"'), r"not both"),
        (('final_seeds = [7]', 'final_seeds = [7]\ntrials = 2'), r"Invalid key .*'trials'"),
        (('encoders = ["nice"]', 'encoders = [{ name = "nice", searchspace = "s.toml" }]'),
         r"Invalid key .*encoders entry.*'searchspace'"),
        (("batch_size = 16", "seed = 3"), r"\[config\] 'seed' is set by \[study\] seed and final_seeds"),
        (("batch_size = 16", "num_workers = 2"), r"'num_workers' is set by \[resources\] workers_per_trial"),
    ],
)
def test_cross_subject_errors(tmp_path: Path, edit: tuple[str, str], match: str) -> None:
    assert edit[0] in XS
    with pytest.raises(BrainalignError, match=match):
        load_study(_write(tmp_path, XS.replace(*edit, 1)))


def test_set_overrides_edit_the_file_and_the_config(tmp_path: Path) -> None:
    path = _write(tmp_path)
    s = load_study(path, ["study.final_seeds=[3, 4]", "study.trials=3", "resources.cpus_per_worker=2",
                          "weight_decay=0.01", "config.data.normalize=none", "study.dataset=/abs/data"])
    assert s.final_seeds == (3, 4) and s.options.trials == 3 and s.resources.cpus_per_worker == 2.0
    assert s.overrides == {"weight_decay": 0.01, "data.normalize": "none"}
    assert s.dataset == "/abs/data"
    flat = s.run_flat(s.arms()[0], subjects=("01",), seed=0, run_name="r", inherited={"weight_decay": 0.5})
    assert flat["weight_decay"] == 0.01  # --set wins over an inherited config
    assert s.fingerprint() != load_study(path).fingerprint()  # a resumed study must get the same --set
    with pytest.raises(BrainalignError, match=r"--set key .*'wieght_decay'.*Did you mean 'weight_decay'"):
        load_study(path, ["wieght_decay=0.1"])
    with pytest.raises(BrainalignError, match=r"--set 'epochs' is set by \[study\] max_epochs"):
        load_study(path, ["epochs=3"])
    with pytest.raises(BrainalignError, match=r"would override what the search space .* searches"):
        load_study(path, ["lr=1e-3"])
    with pytest.raises(BrainalignError, match="must look like KEY=VALUE"):
        load_study(path, ["lr"])
    with pytest.raises(BrainalignError, match=r"Invalid key in .*\[study\]: 'trails'"):
        load_study(path, ["study.trails=3"])


def test_inherited_configs_never_carry_study_owned_or_machine_keys() -> None:
    from brainalign.studies.spec import INHERIT_NEVER, inheritable

    flat = {"lr": 1e-3, "seed": 9, "data.path": "/x", "torch_threads": 4, "data.embeddings_dir": "/e", "epochs": 99}
    assert inheritable(flat) == {"lr": 1e-3}
    assert {"seed", "data.path", "epochs", "torch_threads", "data.embeddings_dir"} <= INHERIT_NEVER


def test_kind_registry_refuses_duplicates_and_common_keys() -> None:
    from brainalign.studies import StudyKind, kind_info, list_kinds, register_kind

    assert {"sweep", "cross_subject"} <= set(list_kinds())
    sweep = kind_info("sweep")
    with pytest.raises(ValueError, match="registered twice"):
        register_kind(sweep)
    with pytest.raises(ValueError, match="redefines common"):
        register_kind(StudyKind("x-unit-test", ("subjects",), sweep.parse, sweep.plan))


def test_analyses_and_gallery_keys(tmp_path: Path) -> None:
    """``[study] explain`` / ``grids`` (issue 16) parse, are checked, and do not change the
    fingerprint (turning them on for a finished study adds the analyses, retrains nothing);
    ``[config.test] gallery`` is a study config key; [config] arch keys are the study encoder's."""
    base = load_study(_write(tmp_path))
    assert (base.explain, base.grids) == (False, 0)
    on = load_study(_write(tmp_path, STUDY.replace("final_seeds = 2", "final_seeds = 2\nexplain = true\ngrids = 3")))
    assert (on.explain, on.grids) == (True, 3) and on.fingerprint() == base.fingerprint()
    with pytest.raises(BrainalignError, match="explain"):
        load_study(_write(tmp_path, STUDY.replace("final_seeds = 2", "final_seeds = 2\nexplain = 1")))
    with pytest.raises(BrainalignError, match="grids"):
        load_study(_write(tmp_path, STUDY.replace("final_seeds = 2", "final_seeds = 2\ngrids = -1")))
    big = load_study(_write(tmp_path, STUDY + '[config.test]\ngallery = ["test", "test+train"]\n'))
    assert big.config["test.gallery"] == ["test", "test+train"] and big.fingerprint() != base.fingerprint()
    with pytest.raises(BrainalignError, match="test.gallery"):
        load_study(_write(tmp_path, STUDY + '[config.test]\ngallery = "train"\n'))
    mlp = STUDY.replace('name = "nice", searchspace = "space.toml"', 'name = "mlp", searchspace = "space.toml"')
    mlp_space = SPACE.replace('encoder = "nice"', 'encoder = "mlp"')
    assert load_study(_write(tmp_path, mlp + '"arch.width" = 64\n', mlp_space)).config["arch.width"] == 64


def test_size_candidates_of_a_study_with_encoder_arch_keys() -> None:
    """The pre-compute size checks read a study's fixed keys without checking its arch.* keys
    against the default encoder (jobs/fmri_study.toml sets the MLP's arch.width)."""
    from brainalign.studies.data import _candidates

    s = load_study(REPO / "jobs" / "fmri_study.toml")
    assert s.config["arch.width"] == 512
    assert _candidates(s, {}, "batch_size") == [128] and _candidates(s, {}, "data.normalize") == ["none"]


def test_pack_and_parallel_searches_parse_and_stay_out_of_the_fingerprint(tmp_path: Path) -> None:
    """``[resources] pack`` and ``[study] parallel_searches`` (issue 15) change how runs are
    dispatched, never a result: a study resumed with other values keeps its fingerprint; a bad
    pack is refused before compute, naming the choices."""
    base = load_study(_write(tmp_path))
    assert base.resources.pack == "subject" and base.parallel_searches is True
    other = load_study(_write(tmp_path, STUDY.replace("workers_per_trial = 1", 'workers_per_trial = 1\npack = "arm"')
                              .replace("final_seeds = 2", "final_seeds = 2\nparallel_searches = false")))
    assert other.resources.pack == "arm" and other.parallel_searches is False
    assert other.fingerprint() == base.fingerprint()
    assert load_study(_write(tmp_path), ['resources.pack="arm"']).resources.pack == "arm"
    with pytest.raises(BrainalignError, match=r"\[resources\] pack = 'arms' is not a way to pack.*Did you mean 'arm'"):
        load_study(_write(tmp_path, STUDY.replace("workers_per_trial = 1", 'workers_per_trial = 1\npack = "arms"')))
    with pytest.raises(BrainalignError, match=r"pack must be str"):
        load_study(_write(tmp_path, STUDY.replace("workers_per_trial = 1", "workers_per_trial = 1\npack = 1")))
    with pytest.raises(BrainalignError, match=r"parallel_searches must be bool"):
        load_study(_write(tmp_path, STUDY.replace("final_seeds = 2", 'final_seeds = 2\nparallel_searches = "yes"')))
