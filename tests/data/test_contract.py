import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brainalign import BrainalignError
from brainalign.data.contract import DatasetMeta, DatasetWriter, open_dataset, read_embedding_table
from brainalign.data.validate import validate_dataset
from brainalign.testing import write_toy_dataset


def _meta(**kw: object) -> DatasetMeta:
    base = dict(name="t", modality="eeg", ch_names=("A", "B"), sfreq=100.0, tmin=0.0, n_times=8,
                subjects=("01",), source={"kind": "simulated"})
    return DatasetMeta(**(base | kw))  # type: ignore[arg-type]


def test_toy_dataset_is_valid_and_readable(tmp_path: Path) -> None:
    root = write_toy_dataset(tmp_path / "toy", n_train_concepts=3, images_per_concept=2, n_test=4)
    assert validate_dataset(root) == []
    ds = open_dataset(root)
    ids, reps, x = ds.load_epochs("01", "train")
    assert x.shape == (12, 17, 100) and x.dtype == np.float32 and len(ids) == 12
    assert sorted(set(reps.tolist())) == [0, 1]
    # plain pyarrow reads the tensor type back, and the hive columns appear
    import pyarrow.dataset as pads

    t = pads.dataset(root / "epochs", format="parquet", partitioning="hive").to_table()
    assert {"dataset", "subject", "split", "image_id", "concept", "repetition", "epoch"} <= set(t.column_names)
    table = read_embedding_table(root / "embeddings" / "toy__simulated.parquet")
    assert table.vectors.shape == (10, 32) and table.table_id == "toy:simulated"


def test_same_inputs_same_bytes_and_fingerprint(tmp_path: Path) -> None:
    a = write_toy_dataset(tmp_path / "a", n_train_concepts=2, n_test=2, seed=3)
    b = write_toy_dataset(tmp_path / "b", n_train_concepts=2, n_test=2, seed=3)
    assert open_dataset(a).fingerprint == open_dataset(b).fingerprint
    for f in a.rglob("*.parquet"):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with pytest.raises(BrainalignError, match="NaN or Inf"):
        with DatasetWriter(root, _meta()) as w:
            w.write_catalog(["i1"], ["c"], ["train"])
            w.write_epochs("01", "train", ["i1"], ["c"], [0], np.full((1, 2, 8), np.nan, np.float32))
    assert not root.exists() and not list(tmp_path.iterdir())


def test_existing_dataset_is_not_replaced_by_accident(tmp_path: Path) -> None:
    root = write_toy_dataset(tmp_path / "toy", n_train_concepts=2, n_test=2)
    before = (root / "dataset.json").read_text()
    with pytest.raises(BrainalignError, match="already exists; refusing to overwrite"):
        with DatasetWriter(root, _meta()) as w:
            w.write_catalog(["i1"], ["c"], ["train"])
    assert (root / "dataset.json").read_text() == before


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: w.write_epochs("01", "train", ["i1"], ["c"], [0], np.zeros((1, 3, 8), np.float32)),
         r"shape \(n_rows, n_chans, n_times\) = \(1, 2, 8\), got \(1, 3, 8\)"),
        (lambda w: w.write_epochs("02", "train", ["i1"], ["c"], [0], np.zeros((1, 2, 8), np.float32)),
         "Invalid subject '02'"),
        (lambda w: w.write_epochs("01", "val", ["i1"], ["c"], [0], np.zeros((1, 2, 8), np.float32)),
         "Invalid split 'val'"),
        (lambda w: w.write_epochs("01", "train", ["i1", "i1"], ["c", "c"], [0, 0], np.zeros((2, 2, 8), np.float32)),
         r"duplicate epoch \(image_id, repetition\)"),
        (lambda w: w.write_catalog(["i1", "i1"], ["c", "c"], ["train", "train"]), "duplicate image_id"),
    ],
)
def test_writer_rejects_bad_input(tmp_path: Path, call: object, message: str) -> None:
    with pytest.raises(BrainalignError, match=message):
        with DatasetWriter(tmp_path / "ds", _meta()) as w:
            call(w)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"modality": "ecog"}, "Invalid modality 'ecog'"),
        ({"modality": "fmri"}, "n_times == 1"),
        ({"subjects": ("01", "01")}, "unique ids"),
        ({"source": {}}, "source must say"),
        ({"name": "a b"}, "not a valid name"),
    ],
)
def test_meta_rejects_bad_values(kw: dict, message: str) -> None:
    with pytest.raises(BrainalignError, match=message):
        _meta(**kw)


def test_open_dataset_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(BrainalignError, match="does not exist.*brainalign data simulate"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrainalignError, match="dataset.json is missing"):
        open_dataset(tmp_path / "empty")


# ----------------------------------------------------------------- validate: broken datasets
def _rewrite_epochs(path: Path, fn: object) -> None:
    t = pq.read_table(path)
    pq.write_table(fn(t), path)  # type: ignore[operator]


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return write_toy_dataset(tmp_path / "toy", n_train_concepts=3, images_per_concept=2, n_test=4,
                             subjects=("01",))


def _problems(root: Path, **kw: bool) -> str:
    return "\n".join(map(str, validate_dataset(root, **kw)))


def test_validate_reports_nan(toy: Path) -> None:
    f = next((toy / "epochs").rglob("split=train/part-00000.parquet"))

    def poison(t: pa.Table) -> pa.Table:
        x = t.column("epoch").combine_chunks().to_numpy_ndarray().copy()
        x[1, 0, 0] = np.nan
        return t.set_column(3, "epoch", pa.FixedShapeTensorArray.from_numpy_ndarray(x))

    _rewrite_epochs(f, poison)
    out = _problems(toy)
    assert "1 epoch(s) contain NaN or Inf" in out and "differs from the manifest" in out


def test_validate_reports_duplicates_unknown_ids_and_overlap(toy: Path) -> None:
    f = next((toy / "epochs").rglob("split=train/part-00000.parquet"))

    def mangle(t: pa.Table) -> pa.Table:
        ids = t.column("image_id").to_pylist()
        ids[1] = ids[0]  # duplicate (image, rep) once reps match
        reps = t.column("repetition").to_pylist()
        reps[1] = reps[0]
        ids[2] = "ghost"
        ids[3] = "te000"  # a test image among training epochs
        return t.set_column(0, "image_id", pa.array(ids)).set_column(2, "repetition", pa.array(reps, pa.int16()))

    _rewrite_epochs(f, mangle)
    out = _problems(toy, check_hashes=False)
    assert "duplicate (image_id, repetition) rows" in out
    assert "image_id not in images.parquet, e.g. ['ghost']" in out
    assert "another split" in out and "te000" in out
    assert "have no embedding" in out and "ghost" in out


def test_validate_reports_wrong_shape(toy: Path) -> None:
    f = next((toy / "epochs").rglob("split=test/part-00000.parquet"))

    def reshape(t: pa.Table) -> pa.Table:
        x = t.column("epoch").combine_chunks().to_numpy_ndarray()[:, :, :50].copy()
        return t.set_column(3, "epoch", pa.FixedShapeTensorArray.from_numpy_ndarray(x))

    _rewrite_epochs(f, reshape)
    assert "epoch tensor is float(17, 50), expected float32(17, 100)" in _problems(toy, check_hashes=False)


def _float64(t: pa.Table) -> pa.Table:
    x = t.column("epoch").combine_chunks().to_numpy_ndarray().astype(np.float64)
    return t.set_column(3, "epoch", pa.FixedShapeTensorArray.from_numpy_ndarray(x))


def _flat_list(t: pa.Table) -> pa.Table:
    x = t.column("epoch").combine_chunks().to_numpy_ndarray()
    return t.set_column(3, "epoch", pa.array(list(x.reshape(len(x), -1)), pa.list_(pa.float32())))


def _wrong_concept(t: pa.Table) -> pa.Table:
    concepts = t.column("concept").to_pylist()
    concepts[0] = "not-its-concept"
    return t.set_column(1, "concept", pa.array(concepts))


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_float64, "epoch tensor is double(17, 100), expected float32(17, 100)"),
        (_flat_list, "expected fixed_shape_tensor<float>(17, 100)"),
        (lambda t: t.drop_columns(["repetition"]), "missing columns ['repetition']"),
        (_wrong_concept, "1 row(s) name a concept other than the catalog's"),
    ],
    ids=["float64", "plain-list", "missing-column", "wrong-concept"],
)
def test_validate_reports_bad_epoch_columns(toy: Path, fn: object, message: str) -> None:
    f = next((toy / "epochs").rglob("split=train/part-00000.parquet"))
    _rewrite_epochs(f, fn)
    assert message in _problems(toy, check_hashes=False)


def test_validate_reports_test_concept_in_training(toy: Path) -> None:
    cat = pq.read_table(toy / "images.parquet")
    concepts = cat.column("concept").to_pylist()
    concepts[0] = "t000"  # a training image of a test concept
    pq.write_table(cat.set_column(1, "concept", pa.array(concepts)), toy / "images.parquet")
    assert "test concept(s) also in training, e.g. ['t000']" in _problems(toy, check_hashes=False)


def test_validate_reports_missing_table_rows_and_files(toy: Path) -> None:
    (toy / "embeddings" / "toy__none.parquet").unlink()
    (toy / "embeddings" / "toy__simulated.parquet").unlink()
    next((toy / "epochs").rglob("split=test/part-00000.parquet")).unlink()
    out = _problems(toy)
    assert "no embedding tables" in out and "listed in the manifest but missing" in out and "no epoch files" in out


def test_validate_cli_exit_codes(toy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from brainalign.cli import main

    assert main(["data", "validate", str(toy)]) == 0
    man = json.loads((toy / "dataset.json").read_text())
    man["fingerprint"] = "0" * 16
    (toy / "dataset.json").write_text(json.dumps(man))
    assert main(["data", "validate", str(toy)]) == 1
    assert "fingerprint does not match" in capsys.readouterr().out
