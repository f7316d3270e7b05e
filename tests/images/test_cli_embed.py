"""``brainalign embed`` through the CLI: simulate -> render -> embed -> train, and user errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brainalign.cli import main
from brainalign.data.contract import open_dataset, read_catalog, read_embedding_table

pytestmark = pytest.mark.integration


def test_render_then_embed_into_the_dataset(
    ray_session: object,
    tiny_weights: Path,
    tiny_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    render = tmp_path / "rendered"
    out = tmp_path / "embeddings"  # not the session dataset's own folder: other tests read it
    rc = main(
        [
            "embed",
            "--render-simulated",
            str(tiny_dataset),
            "--render-dir",
            str(render),
            "--encoders",
            "tiny-clip:none",
            "--weights",
            str(tiny_weights),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert f"catalog: {render / 'images.parquet'}" in text and "wrote       tiny-clip:none" in text
    ds = open_dataset(tiny_dataset)
    table = read_embedding_table(out / "tiny-clip__none.parquet")
    vectors = table.lookup(ds.image_ids(), where="for the simulated dataset")
    assert vectors.shape == (len(ds.image_ids()), 32) and np.isfinite(vectors).all()
    # the rendered catalog is a normal catalog: a second run over it is a no-op
    rc = main(
        [
            "embed",
            "--catalog",
            str(render),
            "--encoders",
            "tiny-clip",
            "--weights",
            str(tiny_weights),
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and "up to date  tiny-clip:none" in capsys.readouterr().out
    assert read_catalog(render / "images.parquet").num_rows == len(ds.image_ids())
    # ... and the table a real encoder code path wrote trains a brain encoder (simulate -> embed -> train)
    from mlflow.tracking import MlflowClient

    from brainalign import TrainConfig, paths
    from brainalign.config import DataConfig
    from brainalign.train.runner import run_training

    data = DataConfig(path=str(tiny_dataset), subjects=("01",), image_table="tiny-clip:none",
                      embeddings_dir=str(out))
    res = run_training(TrainConfig(data=data, epochs=1, batch_size=32, seed=3, experiment="embed-train"))
    assert res.test["test_n_way"] == 20 and 0.0 <= res.test["test_top5"] <= 1.0
    tags = MlflowClient(paths.mlflow_tracking_uri()).get_run(res.run_id).data.tags
    assert (tags["backbone"], tags["alignment"]) == ("tiny-clip", "none")


def test_render_only(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "embed",
                "--render-simulated",
                str(tiny_dataset),
                "--out",
                str(tmp_path / "r"),
                "--render-size",
                "16",
            ]
        )
        == 0
    )
    assert f"catalog: {tmp_path / 'r' / 'images.parquet'}" in capsys.readouterr().out


def test_user_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["embed", "--catalog", str(tmp_path), "--encoders", "dreamsim_clip_vitb3", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "Did you mean 'dreamsim_clip_vitb32" in capsys.readouterr().err
    assert (
        main(
            [
                "embed",
                "--catalog",
                str(tmp_path),
                "--encoders",
                "dreamsim_ensemble",
                "--out",
                str(tmp_path),
                "--weights",
                str(tmp_path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "dreamsim/ensemble_lora/adapter_config.json" in err and "Expected layout" in err
    assert main(["embed", "--encoders", "efficientnet_lite0"]) == 2
    assert "--catalog" in capsys.readouterr().err
