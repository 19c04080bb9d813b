"""Bad rows never stop a job silently nor kill it without a trace: each goes to OUT/rejects.jsonl with
its source, row number, reason and raw text, is counted, and --max-rejects decides when the job fails."""

import gzip
import json

import pytest
from conftest import invoke, load, manifest

from hfbatch.runner import OutputPaths


def rejects_of(out):
    path = out / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []



def good(i):
    return json.dumps({"id": i, "text": f"good document {i}"})


def ingest(runner, tmp_path, name, data: bytes, *options, expect=0):
    src = tmp_path / name
    src.write_bytes(data)
    out = tmp_path / "ds"
    return invoke(runner, ["ingest", src, "-o", out, "--max-rejects", "100", *options], expect=expect), out


def test_every_jsonl_reject_reason_with_its_line_number(runner, tmp_path):
    lines = [good(1),                                   # 1
             '{"id": 2, "text": "unterminated',         # 2 malformed
             "",                                        # 3 blank: skipped, not a reject
             '["an", "array"]',                         # 4 not an object
             good(5),                                   # 5
             '{"id": 6, "text": "caf\xe9"}',            # 6 undecodable (latin-1 byte), patched below
             '{"id": 7}',                               # 7 missing text
             '{"id": 8, "text": null}',                 # 8 missing text
             '{"id": 9, "text": "   \\n "}',            # 9 empty text
             '{"id": 1, "text": "same id as line 1"}',  # 10 duplicate id
             '{"id": null, "text": "no id"}',           # 11 missing id
             '{"id": "twelve", "text": "id not a number"}',  # 12 wrong type
             '{"id": 13, "text": 13}',                  # 13 text not a string
             '{"id": 14, "text": "two"} {"id": 15, "text": "on one line"}',  # 14 several values
             good(16)]                                  # 16
    data = "\n".join(lines).encode().replace("caf\xe9".encode(), b"caf\xe9")
    _, out = ingest(runner, tmp_path, "mixed.jsonl", data)
    ds = load(out)
    assert ds["id"] == [1, 5, 16]
    rejects = rejects_of(out)
    assert [(r["row"], r["kind"]) for r in rejects] == [
        (2, "malformed_json"), (4, "not_an_object"), (6, "undecodable"), (7, "missing_text"), (8, "missing_text"),
        (9, "empty_text"), (10, "duplicate_id"), (11, "missing_id"), (12, "bad_value"), (13, "bad_value"),
        (14, "malformed_json")]
    for r in rejects:
        assert set(r) == {"source", "row", "kind", "reason", "raw"} and r["source"] == "mixed.jsonl" and r["reason"]
    by_row = {r["row"]: r for r in rejects}
    assert "unterminated" in by_row[2]["raw"] and "malformed JSON" in by_row[2]["reason"]
    assert "'text'" in by_row[7]["reason"] and "duplicate id 1" in by_row[10]["reason"]
    assert "same id as line 1" in by_row[10]["raw"]
    m = manifest(out)
    assert m["counts"] == {"rows_read": 14, "rejects": 11, "filtered": 0, "duplicates": 0}
    assert m["sources"]["mixed.jsonl"]["rejects"] == 11 and m["rows"] == 3
    assert m["rejects_by_kind"] == {"bad_value": 2, "duplicate_id": 1, "empty_text": 1, "malformed_json": 2,
                                    "missing_id": 1, "missing_text": 2, "not_an_object": 1, "undecodable": 1}


def test_csv_wrong_field_count_and_undecodable_keep_exact_row_numbers(runner, tmp_path):
    data = (b'name,text\n'
            b'a,first\n'
            b'b,"quoted, with a comma\nand a newline"\n'
            b'c,too,many,fields\n'
            b'd,fourth\n'
            b'e\n'
            b'f,caf\xe9 latin-1\n'
            b'g,seventh\n')
    _, out = ingest(runner, tmp_path, "t.csv", data)
    ds = load(out)
    # ids are the data record numbers: a bad record does not shift the ids of the ones after it
    assert ds["id"] == ["t.csv:1", "t.csv:2", "t.csv:4", "t.csv:7"]
    assert ds["text"][1] == "quoted, with a comma\nand a newline"
    assert [(r["row"], r["kind"]) for r in rejects_of(out)] == [
        (3, "wrong_field_count"), (5, "wrong_field_count"), (6, "undecodable")]
    first = rejects_of(out)[0]
    assert first["raw"] == "c,too,many,fields" and "expected 2 fields, got 4" in first["reason"]


def test_csv_value_of_the_wrong_type_rejects_its_row_only(runner, tmp_path):
    # the first block of the first source sets the types (id: int64); a later value that does not fit
    # rejects its row, it does not stop the reader
    (tmp_path / "a.csv").write_text("id,text\n1,one\n2,two\n")
    (tmp_path / "b.csv").write_text("id,text\n3,three\nx4,bad id\n5,\n6,six\n")
    invoke(runner, ["ingest", tmp_path / "a.csv", tmp_path / "b.csv", "-o", tmp_path / "ds", "--max-rejects", "2"])
    assert load(tmp_path / "ds")["id"] == [1, 2, 3, 6]
    rejects = rejects_of(tmp_path / "ds")
    assert [(r["source"], r["row"], r["kind"]) for r in rejects] == [("b.csv", 2, "bad_value"),
                                                                     ("b.csv", 3, "empty_text")]
    assert "'x4' is not int64" in rejects[0]["reason"]


def test_text_undecodable_line(runner, tmp_path):
    _, out = ingest(runner, tmp_path, "t.txt", b"fine line\nbad \xff\xfe line\nlast line\n")
    assert load(out)["id"] == ["t.txt:1", "t.txt:3"]
    [r] = rejects_of(out)
    assert (r["row"], r["kind"]) == (2, "undecodable") and "bad" in r["raw"]


def test_json_array_records(runner, tmp_path):
    records = [{"id": 1, "text": "one"}, 42, {"id": "x", "text": "bad id"}, {"id": 4, "text": ""},
               {"id": 5, "text": "five"}]
    _, out = ingest(runner, tmp_path, "a.json", json.dumps(records).encode())
    assert load(out)["id"] == [1, 5]
    assert [(r["row"], r["kind"]) for r in rejects_of(out)] == [(2, "not_an_object"), (3, "bad_value"),
                                                                 (4, "empty_text")]


def test_duplicate_ids_across_files_and_by_file_undecodable(runner, tmp_path):
    (tmp_path / "a.jsonl").write_text(good(1) + "\n" + good(2) + "\n")
    (tmp_path / "b.jsonl").write_text(good(2) + "\n" + good(3) + "\n")
    invoke(runner, ["ingest", tmp_path / "a.jsonl", tmp_path / "b.jsonl", "-o", tmp_path / "ds", "--max-rejects", "1"])
    assert load(tmp_path / "ds")["id"] == [1, 2, 3]
    [r] = rejects_of(tmp_path / "ds")
    assert (r["source"], r["row"], r["kind"]) == ("b.jsonl", 1, "duplicate_id")

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a document")
    (docs / "b.txt").write_bytes(b"\xff\xfe binary-ish")
    (docs / "c.txt").write_text("")
    invoke(runner, ["ingest", docs, "--by", "file", "-o", tmp_path / "files", "--max-rejects", "2"])
    assert load(tmp_path / "files")["id"] == ["a.txt"]
    assert [(r["source"], r["kind"]) for r in rejects_of(tmp_path / "files")] == [("b.txt", "undecodable"),
                                                                                   ("c.txt", "empty_text")]


def test_default_max_rejects_is_one_percent(runner, tmp_path):
    lines = [good(i) for i in range(1, 201)]
    lines[50] = "{not json"
    lines[150] = "{not json either"
    src = tmp_path / "a.jsonl.gz"
    src.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    invoke(runner, ["ingest", src, "-o", tmp_path / "ok"])  # 2 of 200 = 1%: accepted
    assert len(load(tmp_path / "ok")) == 198 and len(rejects_of(tmp_path / "ok")) == 2

    lines[100] = "[3]"
    src.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    result = invoke(runner, ["ingest", src, "-o", tmp_path / "bad"], expect=1)
    message = result.output.strip().splitlines()[-1]
    assert "3 of 200 rows were rejected" in message and "--max-rejects 1%" in message
    assert "malformed_json 2" in message and "a.jsonl.gz row 51" in message and "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()  # nothing half-written in place
    gathered = OutputPaths(tmp_path / "bad").partial / "rejects.jsonl"
    assert str(gathered) in message and len(gathered.read_text().splitlines()) == 3

    # raising the limit finishes from the shards already read
    result = invoke(runner, ["ingest", src, "-o", tmp_path / "bad", "--max-rejects", "3", "--json"])
    assert json.loads(result.stdout.splitlines()[-1])["rejects"] == 3 and len(load(tmp_path / "bad")) == 197


@pytest.mark.parametrize("limit, code", [("0", 1), ("2", 1), ("3", 0), ("0.02", 1), ("2%", 1), ("0.5", 0)])
def test_max_rejects_as_count_or_fraction(runner, tmp_path, limit, code):
    data = "\n".join([good(1), "{bad", good(3), "{bad", "{bad", good(6)] + [good(i) for i in range(7, 101)]) + "\n"
    src = tmp_path / "a.jsonl"
    src.write_text(data)
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--max-rejects", limit], expect=code)
    assert (tmp_path / "ds").exists() == (code == 0)


def test_max_rejects_must_be_a_number(runner, tmp_path):
    (tmp_path / "a.jsonl").write_text(good(1) + "\n")
    result = invoke(runner, ["ingest", tmp_path / "a.jsonl", "-o", tmp_path / "ds", "--max-rejects", "lots"],
                    expect=2)
    assert "--max-rejects" in result.output or "lots" in result.output
