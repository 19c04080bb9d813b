"""embed --incremental: unchanged rows reused, new or changed rows computed, deleted rows dropped."""

import json

import numpy as np
import pytest
from conftest import invoke, sample_rows, write_jsonl


def table(path):
    import datasets

    return datasets.load_from_disk(str(path)).with_format("numpy")


@pytest.mark.parametrize("devices", [[], ["--devices", "cpu,cpu"]], ids=["one-process", "two-workers"])
def test_incremental_embed_equals_a_full_run_and_computes_only_changes(tmp_path, tiny_model, runner, devices):
    rows = sample_rows(120)
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    embed = ["--model", tiny_model, "--precision", "fp32", "--shard-rows", "50", *devices]
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", *embed])
    assert (tmp_path / "emb" / "content_hashes.parquet").exists()
    assert table(tmp_path / "emb").column_names == ["id", "embedding"]

    changed = [dict(r) for r in rows]
    for r in changed[10:13]:
        r["text"] = r["text"] + " (updated)"
    del changed[40:45]
    changed += [{"id": 10_000_000 + i, "package": "new", "section": "new", "text": f"brand new text {i}"}
                for i in range(4)]
    write_jsonl(src, changed)
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--force"])
    refused = invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", *embed], expect=2)
    assert "/ds changed" in refused.output
    result = invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", *embed, "--incremental", "--json"])
    summary = json.loads(result.stdout)
    assert summary["computed"] == 7 and summary["reused"] == len(changed) - 7

    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "full", *embed])
    got, want = table(tmp_path / "emb"), table(tmp_path / "full")
    assert list(got["id"]) == [r["id"] for r in changed] == list(want["id"])
    np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)


def test_incremental_refuses_changed_options(tmp_path, tiny_model, runner):
    src = write_jsonl(tmp_path / "docs.jsonl", sample_rows(10))
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", "--model", tiny_model])
    result = invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", "--model", tiny_model,
                             "--max-length", "16", "--incremental"], expect=2)
    assert "option max_length" in result.output and "--incremental updates an output only" in result.output


def test_slices_embedded_apart_merge_into_the_full_result(tmp_path, tiny_model, runner):
    src = write_jsonl(tmp_path / "docs.jsonl", sample_rows(53))
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    opts = ["--model", tiny_model, "--precision", "fp32"]
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "full", *opts])
    for i in range(3):
        invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / f"part{i}", *opts,
                        "--num-shards", "3", "--shard-index", str(i)])
    missing = invoke(runner, ["merge", tmp_path / "part0", tmp_path / "part2", "-o", tmp_path / "m"], expect=2)
    assert "slices [1] of 3 are missing" in missing.output and not (tmp_path / "m").exists()
    invoke(runner, ["merge", tmp_path / "part2", tmp_path / "part0", tmp_path / "part1", "-o", tmp_path / "m"])
    got, want = table(tmp_path / "m"), table(tmp_path / "full")
    assert list(got["id"]) == list(want["id"])
    np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)
    invoke(runner, ["index", tmp_path / "m", "-o", tmp_path / "idx"])  # a merged output is a normal input
    other = invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "odd", "--model", tiny_model,
                            "--num-shards", "3", "--shard-index", "1"])
    assert other.exit_code == 0
    bad = invoke(runner, ["merge", tmp_path / "part0", tmp_path / "odd", tmp_path / "part2", "-o", tmp_path / "m2"],
                 expect=2)
    assert "differ in their options precision" in bad.output


def test_incremental_reads_the_blake2b_hashes_of_older_embed_outputs(tmp_path, tiny_model, runner):
    import pyarrow.parquet as pq

    from hfbatch.hashing import LEGACY_SCHEME, text_hashes

    rows = sample_rows(30)
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    embed = ["--model", tiny_model, "--precision", "fp32"]
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", *embed])
    hash_file = tmp_path / "emb" / "content_hashes.parquet"  # as hfbatch 0.1.0 wrote it: blake2b, no scheme
    old = pq.read_table(hash_file)
    pq.write_table(old.set_column(1, "text_hash", [text_hashes([r["text"] for r in rows], LEGACY_SCHEME)])
                   .replace_schema_metadata(None), hash_file)
    rows[3]["text"] += " (updated)"
    write_jsonl(src, rows)
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--incremental"])
    result = invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", *embed, "--incremental", "--json"])
    assert json.loads(result.stdout)["computed"] == 1


def test_previous_vectors_are_taken_from_every_chunk_of_the_old_output(tmp_path):
    import datasets
    import pyarrow as pa

    from hfbatch.dataset import data_files
    from hfbatch.embedding import PreviousVectors
    from hfbatch.hashing import write_hash_file

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((10, 4)).astype(np.float32)
    ids = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "c"]  # "c" twice: its last row counts
    hashes = np.arange(100, 110)
    parts = [pa.table({"id": ids[lo:hi], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(vectors[lo:hi].reshape(-1)), 4)}) for lo, hi in [(0, 3), (3, 4), (4, 10)]]
    datasets.Dataset(pa.concat_tables(parts)).save_to_disk(str(tmp_path / "old"), num_shards=3)  # 3 files
    write_hash_file(tmp_path / "old", pa.array(ids), hashes)

    assert len(data_files(tmp_path / "old")) == 3
    previous = PreviousVectors(tmp_path / "old")  # reads each memory-mapped file's chunk (hfbatch.dataset)
    asked = ["i", "a", "zz", "c", "d", "b"]
    asked_hashes = [108, 100, 0, 109, 999, 101]  # "zz" is new, "d" changed
    old = previous.reusable(asked, asked_hashes)
    assert old.tolist() == [8, 0, -1, 9, -1, 1]
    got = previous.vectors(old)
    np.testing.assert_array_equal(got[[0, 1, 3, 5]], vectors[[8, 0, 9, 1]])
    assert not got[[2, 4]].any()
