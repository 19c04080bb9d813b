"""Column handling (--columns, --rename, --filter, --dedup, --sample, --limit, --id-column), streaming in
byte-range shards (same result, resumable), and the manifest as `hfbatch info` shows it."""

import json

import pytest
from conftest import SAMPLE, invoke, load, manifest, sample_rows, write_jsonl

from hfbatch.runner import OutputPaths


@pytest.fixture
def docs(tmp_path):
    rows = [{"id": 1, "section": "games", "body": "A chess game for two players, with a board."},
            {"id": 2, "section": "libs", "body": "short"},
            {"id": 3, "section": "games", "body": "Tetris clone with colourful falling blocks."},
            {"id": 4, "section": "net", "body": "A chess game for two players, with a board."},
            {"id": 5, "section": None, "body": "Tools to monitor network traffic and hosts."}]
    return write_jsonl(tmp_path / "docs.jsonl", rows)


def test_rename_and_columns(runner, tmp_path, docs):
    invoke(runner, ["ingest", docs, "-o", tmp_path / "a", "--rename", "body=text"])
    assert load(tmp_path / "a").column_names == ["id", "section", "text"]
    invoke(runner, ["ingest", docs, "-o", tmp_path / "b", "--rename", "body=text", "--rename", "section=topic",
                    "--columns", "topic"])
    ds = load(tmp_path / "b")
    assert ds.column_names == ["id", "topic", "text"] and ds["topic"][0] == "games"
    invoke(runner, ["ingest", docs, "-o", tmp_path / "c", "--text-column", "body", "--columns", "body"])
    assert load(tmp_path / "c").column_names == ["id", "body"]


@pytest.mark.parametrize("args, words", [
    (["--columns", "body,nope"], ["--columns", "'nope'", "available: id, section, body"]),
    (["--rename", "nope=x"], ["--rename", "'nope'"]),
    (["--rename", "body"], ["old=new"]),
    (["--text-column", "section2"], ["'section2'", "available: id, section, body", "--text-column"]),
    (["--text-column", "id"], ["'id' holds int64, not text"]),
    (["--id-column", "nope"], ["'nope'", "--id-column"]),
])
def test_column_options_are_checked_before_reading(runner, tmp_path, docs, args, words):
    base = ["--text-column", "body"] if "--text-column" not in args else []
    result = invoke(runner, ["ingest", docs, "-o", tmp_path / "ds", *base, *args], expect=2)
    for word in words:
        assert word in result.output, result.output
    assert not (tmp_path / "ds").exists() and "Traceback" not in result.output


@pytest.mark.parametrize("expr, ids", [
    ("len(text) >= 20", [1, 3, 4, 5]),
    ('section == "games"', [1, 3]),
    ('section in ["libs", "net"] or section is None', [2, 4, 5]),
    ('not (section == "games") and len(text) > 5', [4]),  # a null section is neither == nor != "games"
    ('10 < len(text) <= 43 and contains(lower(text), "chess")', [1, 4]),
    ('startswith(text, "Tools") or matches(text, "^Tet")', [3, 5]),
    ("id * 2 >= 8", [4, 5]),
])
def test_filter_expressions(runner, tmp_path, docs, expr, ids):
    result = invoke(runner, ["ingest", docs, "-o", tmp_path / "ds", "--rename", "body=text", "--filter", expr,
                             "--json"])
    assert load(tmp_path / "ds")["id"] == ids
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["filtered"] == 5 - len(ids) and summary["rejects"] == 0


@pytest.mark.parametrize("expr, words", [
    ("len(text) >=", "invalid syntax"),
    ("lenn(text) > 3", "unknown function"),
    ("texts == 'a'", "no column 'texts'"),
    ("len(id) > 3", "utf8_length"),
    ("__import__('os').system('touch pwned')", "not supported"),
    ("__import__('os')", "unknown function"),
    ("text.upper() == 'A'", "write upper(value)"),
    ("[x for x in text]", "not supported"),
    ("section in other", "list of literals"),
])
def test_filter_is_parsed_never_evaluated(runner, tmp_path, docs, expr, words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(runner, ["ingest", docs, "-o", tmp_path / "ds", "--rename", "body=text", "--filter", expr],
                    expect=2)
    assert "--filter" in result.output and words in result.output, result.output
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "ds").exists()


def test_dedup_by_exact_text_across_files(runner, tmp_path, docs):
    other = write_jsonl(tmp_path / "more.jsonl", [{"id": 6, "section": "x", "body": "short"},
                                                  {"id": 7, "section": "x", "body": "short "}])
    result = invoke(runner, ["ingest", docs, other, "-o", tmp_path / "ds", "--rename", "body=text", "--dedup",
                             "--json"])
    assert load(tmp_path / "ds")["id"] == [1, 2, 3, 5, 7]  # exact: "short " is not "short"
    m = manifest(tmp_path / "ds")
    assert m["counts"]["duplicates"] == 2 and m["counts"]["rejects"] == 0
    assert m["sources"]["docs.jsonl"]["duplicates"] == 1 and m["sources"]["more.jsonl"]["duplicates"] == 1
    assert json.loads(result.stdout.splitlines()[-1])["duplicates"] == 2


def test_sample_is_deterministic_and_keeps_order(runner, tmp_path):
    def sample(seed, out):
        invoke(runner, ["ingest", SAMPLE, "-o", tmp_path / out, "--sample", "50", "--seed", seed])
        return load(tmp_path / out)["id"]

    first, again, other = sample("1", "a"), sample("1", "b"), sample("2", "c")
    order = [r["id"] for r in sample_rows()]
    assert len(first) == 50 and first == again and first != other
    assert set(first) <= set(order) and first == sorted(first, key=order.index)
    assert manifest(tmp_path / "a")["sampled_from"] == 400 and manifest(tmp_path / "a")["rows"] == 50


def test_limit_and_id_column(runner, tmp_path):
    invoke(runner, ["ingest", SAMPLE, "-o", tmp_path / "a", "--limit", "7"])
    assert load(tmp_path / "a")["id"] == [r["id"] for r in sample_rows(7)]
    invoke(runner, ["ingest", SAMPLE, "-o", tmp_path / "b", "--rename", "id=number", "--id-column", "package",
                    "--limit", "3"])
    ds = load(tmp_path / "b")
    assert ds["id"] == [r["package"] for r in sample_rows(3)] and ds["number"] == [r["id"] for r in sample_rows(3)]
    result = invoke(runner, ["ingest", SAMPLE, "-o", tmp_path / "c", "--id-column", "package"], expect=2)
    assert "rename it" in result.output


def big_corpus(path, n=9000):
    """About 3.5 MB of JSON Lines without an id column, with blank lines and a few bad lines spread out."""
    rows = sample_rows()
    lines = []
    for i in range(n):
        r = rows[i % len(rows)]
        lines.append(json.dumps({"package": r["package"], "text": f"{i}: {r['text']}"}))
    for at in (10, 4000, 8500):
        lines[at] = "{broken line " + str(at)
    for at in (20, 5000):
        lines[at] = ""
    path.write_text("\n".join(lines) + "\n")
    return path


def test_streaming_in_byte_ranges_gives_the_same_dataset(runner, tmp_path):
    src = big_corpus(tmp_path / "big.jsonl")
    common = ["--max-rejects", "10", "--json"]
    streamed = json.loads(invoke(runner, ["ingest", src, "-o", tmp_path / "s", "--streaming", "--shard-size", "1MB",
                                          *common]).stdout.splitlines()[-1])
    whole = json.loads(invoke(runner, ["ingest", src, "-o", tmp_path / "w", "--no-streaming", *common]
                              ).stdout.splitlines()[-1])
    s, w = load(tmp_path / "s"), load(tmp_path / "w")
    assert manifest(tmp_path / "s")["shards_read"] == 4 and manifest(tmp_path / "w")["shards_read"] == 1
    assert len(list((tmp_path / "s").glob("data-*.arrow"))) == 4
    assert s["id"] == w["id"] and s["text"] == w["text"] and len(s) == 9000 - 5
    assert s["id"][:3] == ["big.jsonl:1", "big.jsonl:2", "big.jsonl:3"] and s["id"][-1] == "big.jsonl:9000"
    assert "big.jsonl:4001" not in s["id"] and "big.jsonl:4002" in s["id"]
    rejects = [json.loads(x) for x in (tmp_path / "s" / "rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [11, 4001, 8501]  # line numbers carry over from range to range
    assert streamed["rows"] == whole["rows"] == 8995 and streamed["rejects"] == whole["rejects"] == 3


def test_resume_redoes_only_unfinished_ranges(runner, tmp_path):
    src = big_corpus(tmp_path / "big.jsonl")
    with src.open("a") as fh:  # a duplicate of a row in the first range, in the last one
        fh.write(json.dumps({"id": "dup", "package": "x", "text": "x"}) + "\n")
    args = ["ingest", src, "-o", tmp_path / "ds", "--streaming", "--shard-size", "1MB", "--dedup"]
    invoke(runner, args + ["--max-rejects", "0"], expect=1)  # fails at the end: every shard is done
    shards = OutputPaths(tmp_path / "ds").shards
    assert len(list(shards.glob("*.json"))) == 4
    for record in sorted(shards.glob("0000[23].json")):  # as if killed during shard 2
        record.unlink()
    (shards / "00002.arrow").write_bytes(b"half-written")
    result = invoke(runner, args + ["--max-rejects", "10"])
    assert "resuming" in result.output and "shards_done=2" in result.output
    invoke(runner, ["ingest", src, "-o", tmp_path / "clean", "--streaming", "--shard-size", "1MB", "--dedup",
                    "--max-rejects", "10"])
    resumed, clean = load(tmp_path / "ds"), load(tmp_path / "clean")
    assert resumed["id"] == clean["id"] and resumed["text"] == clean["text"]
    assert manifest(tmp_path / "ds")["counts"] == manifest(tmp_path / "clean")["counts"]


def test_limit_across_shards(runner, tmp_path):
    src = big_corpus(tmp_path / "big.jsonl")
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--streaming", "--shard-size", "1MB", "--limit", "3000",
                    "--max-rejects", "10"])
    ds = load(tmp_path / "ds")
    assert len(ds) == 3000 and ds["id"][-1] == "big.jsonl:3002"


def test_manifest_info_and_up_to_date(runner, tmp_path, docs):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 9, "body": ""}\n{oops\n{"id": 10, "body": "fine text here"}\n')
    out = tmp_path / "ds"
    invoke(runner, ["ingest", docs, bad, "-o", out, "--text-column", "body", "--max-rejects", "5"])
    m = manifest(out)
    assert m["sources"]["bad.jsonl"] == {"rows": 1, "rejects": 2, "read": 3, "filtered": 0, "duplicates": 0}
    assert m["rejects_by_kind"] == {"empty_text": 1, "malformed_json": 1}
    assert [i["path"] for i in m["inputs"]] == [str(docs), str(bad)] and all(i["sha256"] for i in m["inputs"])

    text = invoke(runner, ["info", out]).output
    assert "ingest output, 6 rows" in text and "rejects: " in text and "empty_text" in text
    assert "bad.jsonl" in text and "2 rejected" in text and "body (string)" in text and "sha256" in text
    assert json.loads(invoke(runner, ["info", out, "--json"]).stdout) == m

    again = invoke(runner, ["ingest", docs, bad, "-o", out, "--text-column", "body", "--max-rejects", "5", "--json"])
    assert json.loads(again.stdout.splitlines()[-1])["status"] == "up_to_date"
    changed = invoke(runner, ["ingest", docs, bad, "-o", out, "--text-column", "body", "--dedup"], expect=2)
    assert "--force" in changed.output and "dedup" in changed.output


def test_a_shard_too_big_for_shard_size_is_split_by_save_to_disk(runner, tmp_path):
    # CSV is not cut into byte ranges (quoted values may hold newlines): its one shard is copied and split
    import csv

    rows = sample_rows()
    src = tmp_path / "big.csv"
    with src.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        writer.writerows([i, rows[i % 400]["text"]] for i in range(8000))
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--streaming", "--shard-size", "1MB"])
    ds = load(tmp_path / "ds")
    assert ds["id"] == list(range(8000)) and len(list((tmp_path / "ds").glob("data-*.arrow"))) >= 3
