"""ingest reads every format, compression, glob and directory into the same rows; unreadable files are
one clear error naming them."""

import bz2
import gzip
import hashlib
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import invoke, load, manifest

ROWS = [
    {"id": 1, "section": "games", "text": "A chess game, for two players."},
    {"id": 2, "section": "libs", "text": 'JSON "parser" library\nwith a second line'},
    {"id": 3, "section": "net", "text": "Überwachung des Netzwerks — monitor network traffic"},
    {"id": 4, "section": "games", "text": "Tabs\tand, commas"},
]
COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
            "zst": lambda b: zstandard.ZstdCompressor().compress(b)}



def jsonl_bytes(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def csv_bytes(rows, sep=","):
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=sep, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def as_rows(ds):
    return [dict(r) for r in ds]


WRITERS = {
    "jsonl": lambda rows: jsonl_bytes(rows),
    "json": lambda rows: json.dumps(rows).encode(),
    "csv": lambda rows: csv_bytes(rows),
    "tsv": lambda rows: csv_bytes(rows, "\t"),
}


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_every_tabular_format_gives_the_same_rows(runner, tmp_path, ext):
    src = tmp_path / f"docs.{ext}"
    if ext == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), src)
    else:
        write(src, WRITERS[ext](ROWS))
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    ds = load(tmp_path / "ds")
    assert ds.column_names == ["id", "section", "text"]
    assert as_rows(ds) == ROWS
    assert ds.features["id"].dtype == "int64"
    m = manifest(tmp_path / "ds")
    assert m["sources"] == {f"docs.{ext}": {"rows": 4, "rejects": 0, "read": 4, "filtered": 0, "duplicates": 0}}
    assert m["inputs"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert m["schema"] == {"id": "int64", "section": "string", "text": "string"}
    assert m["elapsed_s"] >= 0 and not (tmp_path / "ds" / "rejects.jsonl").exists()


@pytest.mark.parametrize("comp", sorted(COMPRESS))
@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_compressed_inputs(runner, tmp_path, ext, comp):
    src = write(tmp_path / f"docs.{ext}.{comp}", COMPRESS[comp](WRITERS[ext](ROWS)))
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    assert as_rows(load(tmp_path / "ds")) == ROWS


def test_compressed_parquet_and_text(runner, tmp_path):
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    write(tmp_path / "a.parquet.gz", gzip.compress(buf.getvalue().to_pybytes()))
    invoke(runner, ["ingest", tmp_path / "a.parquet.gz", "-o", tmp_path / "p"])
    assert as_rows(load(tmp_path / "p")) == ROWS
    write(tmp_path / "b.txt.zst", COMPRESS["zst"](b"first line\nsecond line\n"))
    invoke(runner, ["ingest", tmp_path / "b.txt.zst", "-o", tmp_path / "t"])
    assert load(tmp_path / "t")["text"] == ["first line", "second line"]


def test_json_object_with_field(runner, tmp_path):
    write(tmp_path / "d.json", json.dumps({"version": 2, "data": ROWS}).encode())
    invoke(runner, ["ingest", tmp_path / "d.json", "-o", tmp_path / "a"])
    assert as_rows(load(tmp_path / "a")) == ROWS
    write(tmp_path / "n.json", json.dumps({"meta": {}, "result": {"items": ROWS[:2]}}, indent=2).encode())
    invoke(runner, ["ingest", tmp_path / "n.json", "--field", "result.items", "-o", tmp_path / "b"])
    assert as_rows(load(tmp_path / "b")) == ROWS[:2]
    result = invoke(runner, ["ingest", tmp_path / "n.json", "-o", tmp_path / "c"], expect=2)
    assert "--field" in result.output and "meta" in result.output and "result" in result.output


def test_json_file_holding_json_lines_is_detected(runner, tmp_path):
    write(tmp_path / "lines.json", jsonl_bytes(ROWS))
    invoke(runner, ["ingest", tmp_path / "lines.json", "-o", tmp_path / "ds"])
    assert as_rows(load(tmp_path / "ds")) == ROWS


def test_text_one_document_per_line_with_stable_ids(runner, tmp_path):
    write(tmp_path / "notes.txt", b"alpha doc\r\n\nbeta doc\n   \ngamma doc")
    invoke(runner, ["ingest", tmp_path / "notes.txt", "-o", tmp_path / "ds"])
    ds = load(tmp_path / "ds")
    # blank lines are separators, not documents; ids are FILE:LINE, so they do not move when one changes
    assert as_rows(ds) == [{"id": "notes.txt:1", "text": "alpha doc"}, {"id": "notes.txt:3", "text": "beta doc"},
                           {"id": "notes.txt:5", "text": "gamma doc"}]


def test_text_one_document_per_file(runner, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    write(docs / "a.txt", b"first document\nwith two lines\n")
    write(docs / "sub" / "b.md", b"second document")
    write(docs / "c.txt.gz", gzip.compress(b"third, compressed"))
    write(docs / ".hidden.txt", b"not this one")
    invoke(runner, ["ingest", docs, "--by", "file", "-o", tmp_path / "ds"])
    ds = load(tmp_path / "ds")
    assert as_rows(ds) == [{"id": "a.txt", "text": "first document\nwith two lines\n"},
                           {"id": "c.txt.gz", "text": "third, compressed"},
                           {"id": "sub/b.md", "text": "second document"}]
    assert manifest(tmp_path / "ds")["sources"]["sub/b.md"]["rows"] == 1


def test_several_files_globs_and_directories(runner, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "more").mkdir(parents=True)
    write(corpus / "a.csv", csv_bytes([{"name": "x", "text": "first"}, {"name": "y", "text": "second"}]))
    write(corpus / "b.jsonl.gz", gzip.compress(jsonl_bytes([{"name": "z", "text": "third"}])))
    write(corpus / "more" / "c.jsonl", jsonl_bytes([{"name": "w", "text": "fourth"}]))
    write(corpus / "notes.md", b"not a known format: skipped in a directory")

    invoke(runner, ["ingest", str(corpus / "*.csv"), str(corpus / "*.jsonl.gz"), "-o", tmp_path / "glob"])
    assert load(tmp_path / "glob")["id"] == ["a.csv:1", "a.csv:2", "b.jsonl.gz:1"]

    invoke(runner, ["ingest", corpus, "-o", tmp_path / "dir"])
    ds = load(tmp_path / "dir")
    assert ds["id"] == ["a.csv:1", "a.csv:2", "b.jsonl.gz:1", "more/c.jsonl:1"]
    assert ds["text"] == ["first", "second", "third", "fourth"]
    assert set(manifest(tmp_path / "dir")["sources"]) == {"a.csv", "b.jsonl.gz", "more/c.jsonl"}

    invoke(runner, ["ingest", str(corpus / "**" / "*.jsonl"), "-o", tmp_path / "rec"])
    assert load(tmp_path / "rec")["text"] == ["fourth"]
    result = invoke(runner, ["ingest", str(corpus / "*.nope"), "-o", tmp_path / "none"], expect=2)
    assert "matches no file" in result.output


def test_later_source_lacking_a_column_of_the_first(runner, tmp_path):
    """The text and the ids cannot be made up: a later source without them is refused by name, and nothing
    is left behind. Another column is null in its rows, so a filter on it drops them."""
    first = write(tmp_path / "a.jsonl", jsonl_bytes([{"id": 1, "lang": "en", "text": "first"},
                                                      {"id": 2, "lang": "de", "text": "zweite"}]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "body.parquet")
    pq.write_table(pa.table({"id": [3, 4], "text": ["third", "fourth"]}), tmp_path / "nolang.parquet")
    write(tmp_path / "lines.txt", b"a line\n")
    for later, words in [("body.parquet", "no columns 'id' and 'text', which hold the rows' ids and the text "
                                          "in the first source (it has body)"),
                         ("lines.txt", "no column 'id', which holds the rows' ids")]:
        result = invoke(runner, ["ingest", first, tmp_path / later, "-o", tmp_path / "ds"], expect=2)
        line = result.output.strip().splitlines()[-1]
        assert line.startswith(f"Error: {tmp_path / later}: ") and words in line, line
        assert sorted(p.name for p in tmp_path.iterdir() if "ds" in p.name) == [".ds.hfbatch-lock"]

    invoke(runner, ["ingest", first, tmp_path / "nolang.parquet", "-o", tmp_path / "all"])
    assert load(tmp_path / "all")["lang"] == ["en", "de", None, None]
    invoke(runner, ["ingest", first, tmp_path / "nolang.parquet", "--filter", 'lang != "de"', "-o", tmp_path / "f"])
    assert load(tmp_path / "f")["id"] == [1]


def test_ambiguous_or_unknown_format_is_a_clear_error(runner, tmp_path):
    write(tmp_path / "data.dat", b"id,text\n1,hello\n")
    result = invoke(runner, ["ingest", tmp_path / "data.dat", "-o", tmp_path / "ds"], expect=2)
    assert "data.dat" in result.output and "--format" in result.output
    invoke(runner, ["ingest", tmp_path / "data.dat", "--format", "csv", "-o", tmp_path / "ds"])
    assert load(tmp_path / "ds")["text"] == ["hello"]
    write(tmp_path / "bare.gz", gzip.compress(b"x"))
    assert "--format" in invoke(runner, ["ingest", tmp_path / "bare.gz", "-o", tmp_path / "b"], expect=2).output


@pytest.mark.parametrize("name, data, fmt, words", [
    ("empty.jsonl", b"", None, "empty"),
    ("image.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), None, "binary"),
    ("utf16.txt", "hello world\n".encode("utf-16"), None, "UTF-16"),
    ("really-csv.jsonl", b"id,text\n1,hello\n2,world\n", None, "no row of the first block"),
    ("not.parquet", b"id,text\n1,hello\n", None, "not a Parquet file"),
    ("broken.json", b'[{"id": 1, "text": "a"},', None, "not valid JSON"),
    ("corrupt.jsonl.gz", b"this is not gzip data at all", None, "cannot read it"),
    ("gzipped-but-named.jsonl", gzip.compress(b'{"text": "x"}\n'), None, "gzip"),
])
def test_wholly_unreadable_file_is_one_error_naming_it(runner, tmp_path, name, data, fmt, words):
    src = write(tmp_path / name, data)
    result = invoke(runner, ["ingest", src, "-o", tmp_path / "ds"], expect=2)
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error:") and name in line and words in line, line
    assert "Traceback" not in result.output and not (tmp_path / "ds").exists()


def test_truncated_compressed_file_is_an_error_not_silently_short(runner, tmp_path):
    big = jsonl_bytes([{"id": i, "text": f"document number {i} " * 5} for i in range(20_000)])
    for comp in ("gz", "zst", "xz", "bz2"):
        packed = COMPRESS[comp](big)
        src = write(tmp_path / f"cut.jsonl.{comp}", packed[: len(packed) // 2])
        result = invoke(runner, ["ingest", src, "-o", tmp_path / f"ds-{comp}"], expect=2)
        assert f"cut.jsonl.{comp}" in result.output and "cannot read it" in result.output
        assert not (tmp_path / f"ds-{comp}").exists()
