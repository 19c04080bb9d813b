"""ingest --incremental: rows of unchanged files are carried over, changed and new files parsed, deleted
ones dropped; the result is always exactly that of a from-scratch ingest of the same inputs."""

import json

import pytest
from conftest import invoke, load, manifest, sample_rows, write_jsonl


def assert_same_output(got, want):
    """Rows, ids, order and values; rejects; content hashes; counts: all as a from-scratch run gives."""
    import pyarrow.parquet as pq

    got_rows, want_rows = load(got), load(want)
    assert got_rows.features == want_rows.features
    assert got_rows.to_dict() == want_rows.to_dict()
    assert pq.read_table(got / "content_hashes.parquet").equals(pq.read_table(want / "content_hashes.parquet"))
    rejects = [(p / "rejects.jsonl").read_text() if (p / "rejects.jsonl").exists() else None for p in (got, want)]
    assert rejects[0] == rejects[1]
    got_manifest, want_manifest = manifest(got), manifest(want)
    for key in ("counts", "sources", "rejects_by_kind", "schema"):
        assert got_manifest[key] == want_manifest[key], key


@pytest.fixture
def parsed(monkeypatch):
    """The source names the run parses (reads with hfbatch.io), in order."""
    import hfbatch.io

    names = []
    read_source, read_documents = hfbatch.io.read_source, hfbatch.io.read_documents

    def recording_source(path, *args, source=None, **kwargs):
        names.append(source)
        return read_source(path, *args, source=source, **kwargs)

    def recording_documents(paths, group_names, *args, **kwargs):
        names.extend(group_names)
        return read_documents(paths, group_names, *args, **kwargs)

    monkeypatch.setattr(hfbatch.io, "read_source", recording_source)
    monkeypatch.setattr(hfbatch.io, "read_documents", recording_documents)
    return names


def split_corpus(directory, parts, rows_each, drop_ids=True):
    directory.mkdir()
    rows = sample_rows()
    for i in range(parts):
        chunk = [{k: v for k, v in r.items() if not (drop_ids and k == "id")}
                 for r in rows[i * rows_each:(i + 1) * rows_each]]
        write_jsonl(directory / f"part{i}.jsonl", chunk)
    return directory


def change_row(path, row, suffix=" (updated)"):
    lines = path.read_text().splitlines()
    record = json.loads(lines[row])
    record["text"] += suffix
    lines[row] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def ingest_json(runner, args):
    return json.loads(invoke(runner, ["ingest", *args, "--json"]).stdout)


@pytest.mark.parametrize("options", [[], ["--streaming", "--shard-size", "1MB"]], ids=["files", "byte-ranges"])
def test_add_change_delete_equals_a_full_run_and_parses_only_changed_files(runner, tmp_path, parsed, options):
    src = split_corpus(tmp_path / "src", parts=4, rows_each=100)
    with open(src / "part1.jsonl", "a") as fh:  # a reject, carried over with its file
        fh.write("{not json\n")
    if options:  # one file big enough to be cut into byte ranges (units of its own)
        big = [dict(r, text=r["text"] * 8) for r in sample_rows()]
        write_jsonl(src / "part0.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in big])
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", *options])

    change_row(src / "part2.jsonl", 5)
    (src / "part3.jsonl").unlink()
    write_jsonl(src / "part4.jsonl", [{"package": "new", "section": "new", "text": f"new doc {i}"} for i in range(7)])
    parsed.clear()
    summary = ingest_json(runner, [src, "-o", tmp_path / "ds", "--incremental", *options])

    assert sorted(set(parsed)) == ["part2.jsonl", "part4.jsonl"]  # part0 and part1 were not read again
    assert summary["carried_files"] == 2 and summary["parsed_files"] == 2
    assert summary["parsed_rows"] == 107 and summary["carried_rows"] == summary["rows"] - 107
    invoke(runner, ["ingest", src, "-o", tmp_path / "full", *options])
    assert_same_output(tmp_path / "ds", tmp_path / "full")
    assert manifest(tmp_path / "ds")["counts"]["rejects"] == 1

    again = ingest_json(runner, [src, "-o", tmp_path / "ds", "--incremental", *options])
    assert again["status"] == "up_to_date"


def test_a_carried_file_whose_id_now_repeats_an_earlier_one_is_parsed_again(runner, tmp_path, parsed):
    src = split_corpus(tmp_path / "src", parts=3, rows_each=50, drop_ids=False)
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--id-column", "id"])
    first_id_of_part2 = json.loads((src / "part2.jsonl").read_text().splitlines()[0])["id"]
    part0 = [json.loads(line) for line in (src / "part0.jsonl").read_text().splitlines()]
    part0[3]["id"] = first_id_of_part2  # part2 is unchanged, but its first row is now a duplicate id
    write_jsonl(src / "part0.jsonl", part0)
    parsed.clear()
    summary = ingest_json(runner, [src, "-o", tmp_path / "ds", "--id-column", "id", "--incremental"])

    assert parsed == ["part0.jsonl", "part2.jsonl"] and summary["carried_files"] == 1
    invoke(runner, ["ingest", src, "-o", tmp_path / "full", "--id-column", "id"])
    assert_same_output(tmp_path / "ds", tmp_path / "full")
    assert manifest(tmp_path / "ds")["rejects_by_kind"] == {"duplicate_id": 1}

    part0[3]["id"] = -1  # the duplicate is gone again: part2's row is kept, as a full run would
    write_jsonl(src / "part0.jsonl", part0)
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--id-column", "id", "--incremental"])
    invoke(runner, ["ingest", src, "-o", tmp_path / "full", "--id-column", "id", "--force"])
    assert_same_output(tmp_path / "ds", tmp_path / "full")
    assert manifest(tmp_path / "ds")["counts"]["rejects"] == 0


def test_by_file_documents_are_carried_over_when_regrouped(runner, tmp_path, parsed):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(8):  # 400 kB each: two documents to a 1MB group
        (docs / f"doc{i:02d}.txt").write_text(f"document {i} " + "x" * 400_000)
    by_file = ["--by", "file", "--shard-size", "1MB"]
    invoke(runner, ["ingest", docs, "-o", tmp_path / "ds", *by_file])
    (docs / "doc05.txt").write_text("document 5, changed " + "y" * 400_000)
    (docs / "doc03.txt").unlink()
    (docs / "doc06b.txt").write_text("a new document " + "z" * 400_000)
    parsed.clear()
    summary = ingest_json(runner, [docs, "-o", tmp_path / "ds", "--incremental", *by_file])

    # groups now [00 01] [02 04] [05 06] [06b 07]: the first as it was, the second put together from
    # two old groups, the others hold a changed or new document
    assert parsed == ["doc05.txt", "doc06.txt", "doc06b.txt", "doc07.txt"]
    assert summary["carried_files"] == 4 and summary["carried_rows"] == 4
    invoke(runner, ["ingest", docs, "-o", tmp_path / "full", *by_file])
    assert_same_output(tmp_path / "ds", tmp_path / "full")


@pytest.mark.parametrize("option", [["--dedup"], ["--limit", "1000"], ["--sample", "150"]])
def test_options_that_choose_rows_across_files_rebuild_in_full(runner, tmp_path, parsed, option):
    src = split_corpus(tmp_path / "src", parts=3, rows_each=80)
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", *option])
    change_row(src / "part1.jsonl", 0)
    parsed.clear()
    result = invoke(runner, ["ingest", src, "-o", tmp_path / "ds", *option, "--incremental", "--json"])

    assert "msg=full_rebuild" in result.stderr and "choose rows across all files" in result.stderr
    assert parsed == ["part0.jsonl", "part1.jsonl", "part2.jsonl"]
    assert json.loads(result.stdout)["carried_rows"] == 0
    invoke(runner, ["ingest", src, "-o", tmp_path / "full", *option])
    assert_same_output(tmp_path / "ds", tmp_path / "full")


def test_changed_options_are_refused_and_old_outputs_rebuilt(runner, tmp_path, parsed):
    src = split_corpus(tmp_path / "src", parts=2, rows_each=50)
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    change_row(src / "part1.jsonl", 0)
    result = invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--incremental", "--filter", "len(text) > 100"],
                    expect=2)
    assert "option filter: None -> 'len(text) > 100'" in result.output
    assert "--incremental updates an output only when its options are unchanged" in result.output
    assert "Traceback" not in result.output

    (tmp_path / "ds" / "content_hashes.parquet").unlink()  # as an output of an older hfbatch
    parsed.clear()
    result = invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--incremental"])
    assert "made by an older hfbatch" in result.stderr and parsed == ["part0.jsonl", "part1.jsonl"]
    invoke(runner, ["ingest", src, "-o", tmp_path / "full"])
    assert_same_output(tmp_path / "ds", tmp_path / "full")


def test_embed_incremental_after_ingest_incremental_computes_only_new_and_changed_rows(runner, tmp_path,
                                                                                       tiny_model, monkeypatch):
    src = split_corpus(tmp_path / "src", parts=3, rows_each=40)
    embed = ["--model", tiny_model, "--precision", "fp32", "--shard-rows", "50"]
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", *embed])
    change_row(src / "part1.jsonl", 7)
    write_jsonl(src / "part3.jsonl", [{"package": "new", "section": "new", "text": f"new doc {i}"} for i in range(3)])
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--incremental"])
    import hfbatch.embedding

    def no_hashing(*args):
        raise AssertionError("embed hashed texts that ingest had hashed already")

    monkeypatch.setattr(hfbatch.embedding, "text_hashes", no_hashing)  # the ingest output's hashes are used
    result = invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", *embed, "--incremental", "--json"])
    summary = json.loads(result.stdout)
    assert summary["computed"] == 4 and summary["reused"] == 119

    import numpy as np

    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "full", *embed])
    got, want = load(tmp_path / "emb").with_format("numpy"), load(tmp_path / "full").with_format("numpy")
    assert list(got["id"]) == list(want["id"])
    np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)
