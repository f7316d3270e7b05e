from pathlib import Path

import pytest

from brainalign import BrainalignError, TrainConfig, load_config
from brainalign.config import parse_overrides


def test_defaults_round_trip_through_flat_keys() -> None:
    cfg = TrainConfig()
    assert TrainConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.to_flat()["data.subjects"] == ("01",)


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(BrainalignError, match="Did you mean 'temperature'"):
        TrainConfig.from_flat({"temprature": 0.1})
    with pytest.raises(BrainalignError, match="Did you mean 'data.subjects'"):
        TrainConfig.from_flat({"data.subject": "01"})


def test_unknown_value_suggests_closest() -> None:
    with pytest.raises(BrainalignError, match="Did you mean 'nice'"):
        TrainConfig.from_flat({"encoder": "nise"})
    with pytest.raises(BrainalignError, match="Did you mean 'average'"):
        TrainConfig.from_flat({"data.train_trials": "averag"})


def test_unknown_arch_option_names_the_encoder() -> None:
    with pytest.raises(BrainalignError, match="architecture option for encoder 'nice'.*drop_prob"):
        TrainConfig.from_flat({"arch.drop_prb": 0.2})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": -1.0}, r"lr must be in \(0"),
        ({"temperature": 0.0}, r"temperature must be in \(0"),
        ({"batch_size": 1}, "batch_size must be >= 2"),
        ({"epochs": 5, "warmup_epochs": 5}, r"warmup_epochs must be in \[0, 4\]"),
        ({"lr": 1e-4, "min_lr": 1e-3}, r"min_lr must be in \[0, 0.0001\]"),
        ({"data.val_fraction": 0.9}, r"data.val_fraction must be in \(0, 0.5\]"),
        ({"data.image_table": "sim-clip"}, "backbone:alignment"),
        ({"data.subjects": []}, "at least one training subject"),
        ({"select_metric": "test_top1"}, "Invalid select_metric"),
    ],
)
def test_impossible_configs_fail_with_message(overrides: dict, message: str) -> None:
    with pytest.raises(BrainalignError, match=message):
        TrainConfig.from_flat(overrides)


def test_cli_strings_are_typed() -> None:
    cfg = TrainConfig.from_flat(parse_overrides(["lr=1e-3", "epochs=7", "learn_temperature=true",
                                                 "data.subjects=01,02"]))
    assert cfg.lr == 1e-3 and cfg.epochs == 7 and cfg.learn_temperature is True
    assert cfg.data.subjects == ("01", "02")
    with pytest.raises(BrainalignError, match="epochs must be int"):
        TrainConfig.from_flat({"epochs": "seven"})
    with pytest.raises(BrainalignError, match="key=value"):
        parse_overrides(["lr"])


def test_wrong_types_from_files_are_rejected() -> None:
    with pytest.raises(BrainalignError, match="use_gpu must be bool, got 'maybe'"):
        TrainConfig.from_flat({"use_gpu": "maybe"})
    with pytest.raises(BrainalignError, match="batch_size must be int, got bool"):
        TrainConfig.from_flat({"batch_size": True})


def test_toml_config_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[config]\nepochs = 3\n[config.data]\nsubjects = ["02"]\n[config.arch]\ndrop_prob = 0.25\n')
    cfg = load_config(p, {"lr": "5e-4"})
    assert (cfg.epochs, cfg.data.subjects, cfg.lr, cfg.arch["drop_prob"]) == (3, ("02",), 5e-4, 0.25)
    with pytest.raises(BrainalignError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("epochs = [")
    with pytest.raises(BrainalignError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_config_hash_changes_with_content() -> None:
    assert TrainConfig().config_hash() == TrainConfig().config_hash()
    assert TrainConfig().config_hash() != TrainConfig.from_flat({"lr": 1e-3}).config_hash()


def test_train_mini_job_config_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "train_mini.toml")
    assert cfg.encoder == "nice" and cfg.data.image_table.endswith(":simulated")


def test_test_gallery_section() -> None:
    assert TrainConfig().test.galleries == ("test",)
    cfg = TrainConfig.from_flat({"test.gallery": "test+train"})
    assert cfg.test.galleries == ("test", "test+train") and cfg.to_flat()["test.gallery"] == ("test+train",)
    assert TrainConfig.from_flat({"test.gallery": ["test+train", "test"]}).test.galleries == ("test", "test+train")
    assert TrainConfig.from_flat(cfg.to_flat()) == cfg
    with pytest.raises(BrainalignError, match="Did you mean 'test\\+train'"):
        TrainConfig.from_flat({"test.gallery": "train"})
    with pytest.raises(BrainalignError, match="lists a gallery twice"):
        TrainConfig.from_flat({"test.gallery": "test,test"})
    with pytest.raises(BrainalignError, match="Did you mean 'test.gallery'"):
        TrainConfig.from_flat({"test.galery": "test"})
