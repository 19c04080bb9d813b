"""hfbatch.dataset's pyarrow-only side of datasets' on-disk layout: `features_of` gives the features datasets
would, `save_table` writes the files `save_to_disk` writes, `SavedDataset` reads them back as datasets does,
and embed / classify / ingest, which use them, never import datasets; `arrow_array`, `arrow_strings`,
`arrow_binary`, `arrow_null` and `numpy_array` move columns between numpy and Arrow without importing pandas."""

from __future__ import annotations

import datetime
import json

import datasets
import numpy as np
import pyarrow as pa
import pytest

from hfbatch.dataset import (
    SavedDataset,
    arrow_array,
    arrow_binary,
    arrow_null,
    arrow_strings,
    features_of,
    numpy_array,
    save_table,
)
from hfbatch.errors import InputError
from hfbatch.io import read_saved_dataset


def _table(n: int = 2500) -> pa.Table:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    return pa.table({
        "id": pa.array([f"doc-{i}" for i in range(n)]),
        "n": pa.array(np.arange(n, dtype=np.int64)),
        "small": pa.array(np.arange(n, dtype=np.int32) % 7, pa.int8()),
        "ok": pa.array([i % 3 == 0 for i in range(n)]),
        "score": pa.array(rng.random(n), pa.float64()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8),
        "tokens": pa.array([list(range(i % 5)) for i in range(n)], pa.list_(pa.int32())),
        "top": pa.FixedSizeListArray.from_arrays(pa.array([f"l{i % 4}" for i in range(2 * n)]), 2),
        "span": pa.array([{"start": i, "label": "x"} for i in range(n)]),
        "big_text": pa.array(["é" * (i % 3) for i in range(n)], pa.large_string()),
    })


SCHEMAS = [
    _table(3).schema,
    pa.schema([("a", pa.list_(pa.list_(pa.float32(), 2))), ("b", pa.float16()), ("c", pa.uint16()),
               ("d", pa.binary()), ("e", pa.null()), ("f", pa.struct([("g", pa.list_(pa.string()))]))]),
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_features_of_is_what_datasets_infers(schema):
    assert features_of(schema) == datasets.Features.from_arrow_schema(schema).to_dict()
    # a schema carrying datasets' own metadata: that is read, as datasets reads it
    features = datasets.Features({"a": datasets.ClassLabel(names=["x", "y"]), "b": datasets.Value("string")})
    assert features_of(features.arrow_schema) == features.to_dict()


def test_features_of_refuses_what_it_does_not_map():
    for kind in (pa.timestamp("s"), pa.dictionary(pa.int32(), pa.string()), pa.large_list(pa.int8())):
        with pytest.raises(TypeError, match="no datasets feature"):
            features_of(pa.schema([("x", kind)]))


def test_save_table_writes_what_save_to_disk_writes(tmp_path):
    table = _table()
    limit = table.nbytes // 3  # several data files
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    save_table(ours, table, "f00d", limit)
    datasets.Dataset(table).save_to_disk(str(theirs), max_shard_size=limit)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert len(list(ours.glob("*.arrow"))) == 4
    assert (ours / "dataset_info.json").read_text() == (theirs / "dataset_info.json").read_text()
    state_ours, state_theirs = (json.loads((d / "state.json").read_text()) for d in (ours, theirs))
    assert state_ours.pop("_fingerprint") == "f00d"
    state_theirs.pop("_fingerprint")
    assert state_ours == state_theirs
    for a, b in zip(sorted(ours.glob("*.arrow")), sorted(theirs.glob("*.arrow"))):
        read = [pa.ipc.open_stream(pa.memory_map(str(p))).read_all() for p in (a, b)]
        assert read[0].schema.metadata == read[1].schema.metadata
        assert read[0].equals(read[1])
    loaded = datasets.load_from_disk(str(ours))
    assert loaded.features == datasets.load_from_disk(str(theirs)).features
    assert loaded.data.table.equals(table)
    assert loaded[1234] == datasets.Dataset(table)[1234]


def test_save_table_with_no_rows_is_one_loadable_file(tmp_path):
    save_table(tmp_path, _table(5).slice(0, 0), "f", 1 << 20)
    assert [p.name for p in tmp_path.glob("*.arrow")] == ["data-00000-of-00001.arrow"]
    loaded = datasets.load_from_disk(str(tmp_path))
    assert len(loaded) == 0 and loaded.column_names == _table(1).column_names


def test_saved_dataset_reads_as_datasets_does(tmp_path):
    table = _table()
    datasets.Dataset(table).save_to_disk(str(tmp_path), max_shard_size=table.nbytes // 2)
    ours, theirs = SavedDataset.open(tmp_path), datasets.load_from_disk(str(tmp_path))
    assert len(ours) == len(theirs) == 2500 and ours.column_names == theirs.column_names
    assert ours.features == theirs.features.to_dict()
    for rows in (slice(0, 3), slice(1200, 1400), slice(2490, 3000), slice(7, 7)):
        assert ours[rows] == theirs[rows]
    assert ours.select(range(100, 200))[0:5] == theirs.select(range(100, 200))[0:5]
    assert ours.select([5, 2, 2400])[0:3] == theirs.select([5, 2, 2400])[0:3]
    narrowed = ours.select_columns(["id", "tokens"])
    assert narrowed.column_names == ["id", "tokens"] and list(narrowed.features) == ["id", "tokens"]
    assert narrowed[10:12] == theirs.select_columns(["id", "tokens"])[10:12]


def test_damaged_saved_dataset_is_refused_in_one_line(tmp_path):
    datasets.Dataset(_table(50)).save_to_disk(str(tmp_path / "ds"))
    path = tmp_path / "ds"
    (path / "dataset_info.json").write_text("{not json")
    with pytest.raises(InputError, match=r"is damaged \(JSONDecodeError.*re-run the `hfbatch ingest`"):
        read_saved_dataset(path, "dataset", "ingest")
    (path / "dataset_info.json").write_text(json.dumps({"features": {"id": {"dtype": "string", "_type": "Value"}}}))
    with pytest.raises(InputError, match="damaged .*dataset_info.json names columns"):
        read_saved_dataset(path)
    data = next(path.glob("*.arrow"))
    data.write_bytes(data.read_bytes()[:200])
    with pytest.raises(InputError, match="is damaged"):
        read_saved_dataset(path)
    data.unlink()
    with pytest.raises(InputError, match="is not a saved dataset"):
        read_saved_dataset(path)
    datasets.DatasetDict({"train": datasets.Dataset(_table(3))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="holds several splits"):
        read_saved_dataset(tmp_path / "dd")


def test_unmapped_column_type_is_saved_with_datasets(tmp_path):
    """A dict of features whose table holds a type features_of does not map still publishes (datasets
    saves it), with the same rows."""
    from hfbatch.runner import Job

    stamps = pa.array(np.arange(0, 5, dtype="datetime64[s]"))
    table = pa.table({"id": pa.array(["a", "b", "c", "d", "e"]), "when": stamps})
    with Job("test-publish", tmp_path / "out", config={}) as job:
        job.shards.write_shard(0, table)
        job.publish_dataset(1, {"id": {"dtype": "string", "_type": "Value"},
                                "when": {"dtype": "timestamp[s]", "_type": "Value"}})
    loaded = datasets.load_from_disk(str(tmp_path / "out"))
    assert loaded.data.table.select(["id", "when"]).equals(table)
    assert loaded.features["when"] == datasets.Value("timestamp[s]")


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "int8", "uint16"])
def test_arrow_array_and_numpy_array_are_views_of_the_same_numbers(dtype):
    values = (np.arange(24).reshape(6, 4) * 3 - 20).astype(dtype) if dtype[0] != "u" else \
        np.arange(24, dtype=dtype).reshape(6, 4)
    array = arrow_array(values)  # flattened
    assert array.type == pa.from_numpy_dtype(np.dtype(dtype)) and array.equals(pa.array(values.reshape(-1)))
    back = numpy_array(array)
    assert back.dtype == values.dtype and np.array_equal(back, values.reshape(-1))
    assert np.shares_memory(back, values)  # no copy either way
    assert numpy_array(arrow_array(values[:, 1])).tolist() == values[:, 1].tolist()  # a strided view is copied


def test_numpy_array_follows_offsets_chunks_and_fixed_size_lists():
    flat = pa.array(np.arange(40, dtype=np.float32))
    lists = pa.FixedSizeListArray.from_arrays(flat, 4)  # 10 rows of 4
    assert numpy_array(lists.slice(3, 2)).tolist() == list(range(12, 20))
    chunked = pa.chunked_array([flat.slice(5, 3), flat.slice(30, 2)])
    assert numpy_array(chunked).tolist() == [5, 6, 7, 30, 31]
    two_rows = pa.chunked_array([lists.slice(9, 1), lists.slice(0, 1)])
    assert numpy_array(two_rows).tolist() == [36, 37, 38, 39, 0, 1, 2, 3]
    ragged = pa.array([[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]], pa.large_list(pa.float64()))
    assert numpy_array(ragged.slice(1, 2)).tolist() == [3, 4, 5, 6]  # lists of any length, flattened
    empty = numpy_array(pa.chunked_array([], pa.int64()))
    assert empty.dtype == np.int64 and empty.shape == (0,)
    with pytest.raises(ValueError, match="no nulls"):
        numpy_array(pa.array([1.0, None]))
    with pytest.raises(TypeError, match="takes numbers"):
        numpy_array(pa.array(["a"]))
    with pytest.raises(TypeError, match="takes numbers or booleans"):
        arrow_array(np.array(["a"]))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100])
def test_booleans_go_both_ways_as_pa_array_and_to_numpy_do(n):
    values = np.random.default_rng(n).random(n) < 0.5
    made = arrow_array(values)
    made.validate(full=True)
    assert made.type == pa.bool_() and made.equals(pa.array(values))
    assert numpy_array(made).dtype == bool and numpy_array(made).tolist() == values.tolist()
    assert arrow_array(values.tolist(), bool).equals(made)  # a sequence, as the dtype given
    # Arrow's bits start at an offset in a slice, and chunks join
    assert numpy_array(made.slice(3, 5)).tolist() == values[3:8].tolist()
    chunked = pa.chunked_array([made.slice(1), made.slice(0, 2)], pa.bool_())
    assert numpy_array(chunked).tolist() == values[1:].tolist() + values[:2].tolist()
    with pytest.raises(ValueError, match="no nulls"):
        numpy_array(pa.array([True, None]))
    for empty in (pa.array([], pa.bool_()), pa.chunked_array([], pa.bool_()), made.slice(n)):
        assert numpy_array(empty).dtype == bool and numpy_array(empty).shape == (0,)


def test_arrow_binary_and_arrow_null_are_what_pa_array_and_pa_scalar_make():
    for items in ([b"x", b"", b"\xff\xfe", "é".encode(), b"a" * 1000], []):
        made = arrow_binary(items)
        assert made.type == pa.binary() and made.equals(pa.array(items, pa.binary()))
        made.validate(full=True)
    assert arrow_array([3], np.int64).to_pylist() == [3] and arrow_array([], np.int64).type == pa.int64()
    for kind in (pa.string(), pa.int64()):
        null = arrow_null(kind)
        assert null.type == kind and not null.is_valid and null.equals(pa.scalar(None, kind))


def test_arrow_strings_is_pa_array_of_the_strings():
    for strings in (["LABEL_0", "négatif", "", "正面", "a" * 1000], []):
        made = arrow_strings(strings)
        assert made.type == pa.string() and made.equals(pa.array(strings, pa.string()))
        made.validate(full=True)  # offsets and UTF-8 as Arrow checks them


def test_the_helpers_do_not_import_pandas(tmp_path):
    """pa.array and to_numpy import pandas on their first call (about 0.3 s of a run); these do not."""
    from conftest import modules_imported

    code = ("import numpy as np, pyarrow as pa, pyarrow.compute as pc; "
            "from hfbatch.dataset import arrow_array, arrow_binary, arrow_null, arrow_strings, numpy_array; "
            "a = arrow_array(np.ones((3, 2), np.float32)); numpy_array(pa.FixedSizeListArray.from_arrays(a, 2)); "
            "t = pa.table({'label': arrow_strings(['x', 'y', 'z']), 'score': arrow_array(np.zeros(3))}); "
            "t.filter(arrow_array(np.array([True, False, True]))); arrow_binary([b'x']); "
            "numpy_array(pc.is_null(pc.if_else(arrow_array([True]), arrow_null(pa.string()), arrow_strings(['']))))")
    assert modules_imported(code, ("pandas",), tmp_path) == {"pandas": False}
    # (and the check can fail: pa.array does import it)
    assert modules_imported("import pyarrow as pa; pa.array([1.0])", ("pandas",), tmp_path) == {"pandas": True}


def _ingest_inputs(tmp_path) -> list[tuple[str, dict]]:
    """(source, ingest options) for each reader and the options that reject, deduplicate and sample."""
    import pyarrow.parquet as pq
    from conftest import sample_rows, write_jsonl

    rows = sample_rows(60)
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    with open(jsonl, "a") as f:  # a bad line, an empty text and a repeated id: three rejects
        again = json.dumps({"id": rows[0]["id"], "text": "again"})
        f.write('{"id": 1, "text": \n{"id": 990, "text": ""}\n' + again + "\n")
    csv = tmp_path / "rows.csv"
    csv.write_bytes(b"id,text,n\n1,hello,3\n2,,4\n3,x,notanumber\n4,\xff bad,5\n5,fine,\n")
    text = tmp_path / "lines.txt"
    text.write_bytes(b"one\n\n  \nt\xffwo\nthree\n")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, row in enumerate(rows[:5]):
        (docs / f"{i}.txt").write_text(row["text"])
    lenient = {"max_rejects": 10}
    return [(str(jsonl), lenient), (str(jsonl), {**lenient, "dedup": True, "sample": 20}), (str(csv), lenient),
            (str(text), lenient), (str(parquet), {}), (str(docs), {"by": "file"})]


def test_ingest_never_imports_datasets_or_pandas(tmp_path, monkeypatch):
    """ingest reads with pyarrow and saves with hfbatch.dataset: `import datasets` (about 0.6 s) and pandas
    (0.2-0.3 s) were a fifth of a 600,000-row run. What it saves is what saving with datasets saves."""
    from conftest import modules_imported

    import hfbatch.ingestion
    from hfbatch.ingestion import ingest

    inputs = _ingest_inputs(tmp_path)
    calls = "; ".join(f"hfbatch.ingest({src!r}, {str(tmp_path / f'ours{i}')!r}, **{opts!r})"
                      for i, (src, opts) in enumerate(inputs))
    assert modules_imported(f"import hfbatch; {calls}", ("datasets", "pandas"), tmp_path / "cache") == \
        {"datasets": False, "pandas": False}

    # the same runs with the features datasets infers, and saving through it where hfbatch would not need to
    monkeypatch.setattr(hfbatch.ingestion, "output_features", datasets.Features.from_arrow_schema)
    for i, (src, opts) in enumerate(inputs):
        ingest(src, tmp_path / f"theirs{i}", **opts)
        ours, theirs = (tmp_path / f"{side}{i}" for side in ("ours", "theirs"))
        a, b = datasets.load_from_disk(str(ours)), datasets.load_from_disk(str(theirs))
        assert a.features == b.features and a.data.table.equals(b.data.table) and len(a) > 0, src
        names = sorted(p.name for p in ours.iterdir())
        assert names == sorted(p.name for p in theirs.iterdir()), src
        for name in set(names) & {"rejects.jsonl", "content_hashes.parquet", "dataset_info.json"}:
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), (src, name)
        states = [json.loads((d / "state.json").read_text()) for d in (ours, theirs)]
        for state in states:  # (datasets fingerprints a selection its own way)
            state.pop("_fingerprint")
        assert states[0] == states[1], src
    assert len(datasets.load_from_disk(str(tmp_path / "ours0"))) == 60
    assert len((tmp_path / "ours0" / "rejects.jsonl").read_text().splitlines()) == 3


def test_ingest_saves_types_hfbatch_does_not_map_with_datasets(tmp_path):
    """Timestamps and large lists have no mapping in hfbatch.dataset: ingest takes datasets' features for
    them, and the output loads with the types of the source."""
    import pyarrow.parquet as pq

    from hfbatch.ingestion import ingest

    table = pa.table({"id": [1, 2], "text": ["a", "b"], "when": pa.array([0, 86400], pa.timestamp("s")),
                      "many": pa.array([[1], [2, 3]], pa.large_list(pa.int64()))})
    pq.write_table(table, tmp_path / "t.parquet")
    ingest(str(tmp_path / "t.parquet"), tmp_path / "out")
    out = datasets.load_from_disk(str(tmp_path / "out"))
    assert out.features == datasets.Features.from_arrow_schema(pq.read_schema(tmp_path / "t.parquet"))
    assert out["when"][1] == datetime.datetime(1970, 1, 2) and out["many"] == [[1], [2, 3]]


@pytest.mark.slow
def test_embed_and_classify_never_import_datasets_or_pandas(tiny_model, tiny_model_factory, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from conftest import modules_imported, sample_rows, write_jsonl

    import hfbatch.dataset
    from hfbatch.classification import classify
    from hfbatch.embedding import embed
    from hfbatch.ingestion import ingest

    ingest([write_jsonl(tmp_path / "rows.jsonl", sample_rows(40))], tmp_path / "ds")
    classifier = tiny_model_factory("tiny-cls-3", pooling=None, num_labels=3)
    ds, cache = str(tmp_path / "ds"), tmp_path / "cache"
    for name, run in (("embed", f"hfbatch.embed({ds!r}, {str(tmp_path / 'e')!r}, model={str(tiny_model)!r})"),
                      ("classify", f"hfbatch.classify({ds!r}, {str(tmp_path / 'c')!r}, "
                                   f"model={str(classifier)!r}, top_k=2)")):
        assert modules_imported(f"import hfbatch; {run}", ("datasets", "pandas"), cache) == \
            {"datasets": False, "pandas": False}, name

    # the same jobs saving through datasets (what they did before): the same features and rows
    def refuse(*args):
        raise TypeError("no datasets feature mapped here (test)")
    monkeypatch.setattr(hfbatch.dataset, "save_table", refuse)
    monkeypatch.setenv("HFBATCH_CACHE_DIR", str(cache))
    embed(tmp_path / "ds", tmp_path / "e2", model=tiny_model)
    classify(tmp_path / "ds", tmp_path / "c2", model=classifier, top_k=2)
    for ours, theirs in (("e", "e2"), ("c", "c2")):
        a, b = (datasets.load_from_disk(str(tmp_path / x)) for x in (ours, theirs))
        assert a.features == b.features and len(a) == len(b) == 40
        assert a.data.table.equals(b.data.table)
        assert json.loads((tmp_path / ours / "manifest.json").read_text())["features"] == a.features.to_dict()
    assert datasets.load_from_disk(str(tmp_path / "e")).features["embedding"] == \
        datasets.Sequence(datasets.Value("float32"), length=32)
    top = datasets.load_from_disk(str(tmp_path / "c")).features
    assert top["top_labels"] == datasets.Sequence(datasets.Value("string"), length=2)
    assert top["id"] == datasets.load_from_disk(ds).features["id"]
