"""`hfbatch.ingestion.ingest(...)` called from Python, in this process (no CliRunner): the same output and summary
as `hfbatch ingest --json`, the same up-to-date check, resume and lock, and hfbatch's own exceptions."""

import json

import pytest
from conftest import invoke, load, write_jsonl

from hfbatch.errors import Busy, InputError, JobFailed
from hfbatch.ingestion import ingest
from hfbatch.runner import OutputLock, OutputPaths


@pytest.fixture
def sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "body": "A chess game for two players.", "section": "games"},
                                           {"id": 2, "body": "A chess game for two players.", "section": "games"},
                                           {"id": 3, "body": "", "section": "libs"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": 4, "body": "Tools to monitor network traffic.", "section": "net"},
                                           {"id": 5, "body": "A fast text editor.", "section": "editors"}])
    return [a, b]


def test_the_summary_is_what_json_prints_and_a_second_call_is_up_to_date(tmp_path, runner, sources):
    options = {"rename": {"body": "text"}, "columns": ["section"], "dedup": True, "max_rejects": "50%",
               "filter": 'section != "net"', "shard_size": "1MB"}
    summary = ingest(sources, output=tmp_path / "api", **options)

    printed = invoke(runner, ["ingest", *sources, "-o", tmp_path / "cli", "--rename", "body=text", "--columns",
                              "section", "--dedup", "--max-rejects", "50%", "--filter", 'section != "net"',
                              "--shard-size", "1MB", "--json"]).stdout
    expected = json.loads(printed.strip().splitlines()[-1])
    del expected["seconds"]
    expected["output"] = str((tmp_path / "api").resolve())
    assert summary == expected
    assert summary["status"] == "ok" and summary["rows"] == 2 and summary["rejects"] == 1
    assert summary["duplicates"] == 1 and summary["filtered"] == 1 and summary["parsed_files"] == 2
    assert load(tmp_path / "api")["id"] == load(tmp_path / "cli")["id"] == [1, 5]
    assert load(tmp_path / "api").column_names == ["id", "section", "text"]

    again = ingest([str(p) for p in sources], output=str(tmp_path / "api"), **options)
    assert again["status"] == "up_to_date" and again["rows"] == 2 and again["job"] == "ingest"


@pytest.mark.parametrize("options, words", [
    ({}, ["no column 'text'", "--text-column"]),
    ({"text_column": "body", "max_rejects": "lots"}, ["--max-rejects", "'lots'"]),
    ({"text_column": "body", "fmt": "xml"}, ["--format", "'xml'", "jsonl"]),
    ({"text_column": "body", "by": "page"}, ["--by", "'page'"]),
    ({"text_column": "body", "limit": -1}, ["--limit", "-1"]),
    ({"text_column": "body", "shard_size": "1KB"}, ["--shard-size", "at least 1,000,000 bytes"]),
    ({"text_column": "body", "columns": ["nope"]}, ["--columns", "'nope'"]),
])
def test_bad_input_raises_input_error_and_writes_nothing(tmp_path, sources, options, words):
    with pytest.raises(InputError) as raised:
        ingest(sources, output=tmp_path / "out", **options)
    for word in words:
        assert word in raised.value.message, raised.value.message
    assert raised.value.exit_code == 2
    paths = OutputPaths(tmp_path / "out")  # (the lock file stays, as after any run: removing it would race)
    assert not (tmp_path / "out").exists() and not paths.partial.exists() and paths.temps() == []


def test_a_missing_source_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        ingest([tmp_path / "nope.jsonl"], output=tmp_path / "out")


def test_a_held_lock_raises_busy(tmp_path, sources):
    lock = OutputLock(tmp_path / "out")
    lock.acquire()
    try:
        with pytest.raises(Busy, match="being written by another hfbatch run") as raised:
            ingest(sources, output=tmp_path / "out", text_column="body", max_rejects="100%")
        assert raised.value.exit_code == 75 and not (tmp_path / "out").exists()
    finally:
        lock.release()
    assert ingest(sources, output=tmp_path / "out", text_column="body", max_rejects="100%")["rows"] == 4


def test_too_many_rejects_fail_and_a_second_call_resumes_from_the_shards(tmp_path, sources, monkeypatch):
    import hfbatch.ingestion

    with pytest.raises(JobFailed, match="1 of 5 rows were rejected") as raised:
        ingest(sources, output=tmp_path / "out", text_column="body", max_rejects="0")
    assert raised.value.exit_code == 1 and not (tmp_path / "out").exists()

    read = []
    unit_tables = hfbatch.ingestion.unit_tables
    monkeypatch.setattr(hfbatch.ingestion, "unit_tables",
                        lambda unit, *args, **kwargs: read.append(unit) or unit_tables(unit, *args, **kwargs))
    summary = ingest(sources, output=tmp_path / "out", text_column="body", max_rejects="1")
    assert read == []  # both files' shards were finished by the failed call: nothing is read again
    assert summary["status"] == "ok" and summary["rows"] == 4 and summary["rejects"] == 1
    assert load(tmp_path / "out")["id"] == [1, 2, 4, 5]
    ingest(sources, output=tmp_path / "fresh", text_column="body", max_rejects="1")
    assert len(read) == 2  # (a run with nothing to resume reads both files, through the function watched)
