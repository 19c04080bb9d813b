"""The one shard loop (hfbatch.executor), the on-disk dataset module (hfbatch.dataset) and the structured change
records of hfbatch.runner, tested through their own interfaces (the jobs' tests cover them end to end)."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from hfbatch.dataset import ArrowVectors, data_files, is_saved_dataset
from hfbatch.executor import Stream, run_shards
from hfbatch.runner import Change, ShardDir, describe_changes


class CountingWork:
    """Shard i holds rows [10 i, 10 i + 10) as a stream; its record counts them, its values go beside it."""

    def __init__(self):
        self.computed, self.recorded_order = [], []

    def prepare(self, i):
        return np.arange(10 * i, 10 * i + 10)

    def compute(self, i, prepared, on_rows, parts):
        self.computed.append(i)
        batches = (pa.record_batch({"x": prepared[k:k + 5]}) for k in (0, 5))

        def counts():  # called once the stream is written
            on_rows(len(prepared))
            return {"doubled": int(prepared.sum()) * 2, "arrays": {".values.npy": prepared * 3}}
        return Stream(pa.schema({"x": pa.int64()}), batches), counts

    def recorded(self, i):
        self.recorded_order.append(i)


def test_the_loop_computes_only_pending_shards_and_records_them_in_order(tmp_path):
    shards = ShardDir(tmp_path)
    shards.write_shard(1, pa.table({"x": pa.array(np.arange(10, 20))}), doubled=-1)  # done by an earlier run
    work = CountingWork()
    done = run_shards("test", shards, shards.pending(4), lambda device: work, progress=None)
    assert work.computed == [0, 2, 3] and work.recorded_order == [0, 2, 3]
    assert shards.pending(4) == [] and done.rows_computed == 0 and done.info == {}
    for i in (0, 2, 3):
        record = json.loads(shards.shard_file(i, ".json").read_text())
        assert record["rows"] == 10 and record["doubled"] == 2 * sum(range(10 * i, 10 * i + 10))
        with pa.memory_map(str(shards.shard_file(i))) as source:
            assert pa.ipc.open_stream(source).read_all().column("x").to_pylist() == list(range(10 * i, 10 * i + 10))
        assert np.array_equal(np.load(shards.shard_file(i, ".values.npy")), np.arange(10 * i, 10 * i + 10) * 3)
    assert json.loads(shards.shard_file(1, ".json").read_text())["doubled"] == -1  # kept, not recomputed


def test_a_stream_with_a_link_hard_links_the_existing_file(tmp_path):
    source = tmp_path / "old.arrow"
    table = pa.table({"x": pa.array([1, 2, 3])})
    with pa.OSFile(str(source), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    (tmp_path / "shards").mkdir()
    shards = ShardDir(tmp_path / "shards")

    class Linked:
        def prepare(self, i):
            return None

        def compute(self, i, prepared, on_rows, parts):
            return Stream(table.schema, [table], link=source), {}

    run_shards("test", shards, [0], lambda device: Linked())
    assert os.stat(shards.shard_file(0)).st_ino == os.stat(source).st_ino
    assert json.loads(shards.shard_file(0, ".json").read_text())["rows"] == 3


def test_a_failing_recorded_hook_stops_the_loop_before_the_next_record(tmp_path):
    class Stop(Exception):
        pass

    class StopsAfterFirst(CountingWork):
        def recorded(self, i):
            raise Stop

    shards = ShardDir(tmp_path)
    with pytest.raises(Stop):
        run_shards("test", shards, [0, 1, 2], lambda device: StopsAfterFirst())
    assert shards.pending(3) == [1, 2]  # shard 1 was written, never recorded: a re-run computes it again


def test_dataset_module_lists_files_and_reads_vectors_by_range_and_by_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    x = np.random.default_rng(3).standard_normal((1000, 4)).astype(np.float32)
    features = datasets.Features({"id": datasets.Value("int64"),
                                  "embedding": datasets.Sequence(datasets.Value("float32"), length=4)})
    datasets.Dataset.from_dict({"id": np.arange(1000), "embedding": x}, features=features) \
        .save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert is_saved_dataset(tmp_path / "ds") and not is_saved_dataset(tmp_path)
    assert [f.name for f in data_files(tmp_path / "ds")] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    read = ArrowVectors(tmp_path / "ds")
    rows = np.array([999, 0, 500, 333, 334, 0])
    assert np.array_equal(read.take(rows), x[rows])
    assert np.array_equal(read(300, 700), x[300:700])
    assert read.take(np.zeros(0, np.int64)).shape == (0, 4)


def test_changes_are_structured_records_with_the_old_messages():
    manifest = {"job": "embed", "config": {"model": "a", "shard_rows": 10},
                "inputs": [{"kind": "hfbatch", "path": "/ds", "manifest_sha256": "1"},
                           {"kind": "hfbatch", "path": "/gone", "manifest_sha256": "2"}]}
    changes = describe_changes(manifest, "embed", {"model": "b", "shard_rows": 10},
                               [{"kind": "hfbatch", "path": "/ds", "manifest_sha256": "9"},
                                {"kind": "hfbatch", "path": "/new", "manifest_sha256": "3"}])
    assert [(c.kind, c.name) for c in changes] == [("option", "model"), ("input", "/ds"), ("input", "/gone"),
                                                   ("input", "/new")]
    assert [str(c) for c in changes] == ["option model: 'a' -> 'b'", "input /ds changed",
                                         "input /gone is no longer given", "input /new is new"]
    assert str(Change("job", "job", "ingest", "embed")) == "it was made by `hfbatch ingest`, not `embed`"
