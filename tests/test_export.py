"""hfbatch export: JSON Lines / CSV / TSV / Parquet, atomically; the ingested corpus round-trips."""

import gzip
import json

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, invoke, load, sample_rows

from hfbatch.runner import OutputPaths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("export") / "ds"
    invoke(CliRunner(), ["ingest", SAMPLE, "-o", out])
    return out


def test_jsonl_export_gives_the_same_rows_in_the_same_order(runner, tmp_path, dataset):
    result = invoke(runner, ["export", dataset, "-o", tmp_path / "out.jsonl", "--json"])
    exported = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert exported == sample_rows()  # same rows, order, ids (ints stay ints), unicode and newlines intact
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["rows"] == 400 and summary["format"] == "jsonl" and summary["status"] == "ok"


@pytest.mark.parametrize("name", ["out.jsonl.gz", "out.csv", "out.tsv.zst", "out.parquet", "out.json", "out.csv.xz"])
def test_every_format_round_trips_through_ingest(runner, tmp_path, dataset, name):
    invoke(runner, ["export", dataset, "-o", tmp_path / name])
    invoke(runner, ["ingest", tmp_path / name, "-o", tmp_path / "again"])
    original, again = load(dataset), load(tmp_path / "again")
    assert again.column_names == original.column_names
    assert again.features == original.features
    assert again["id"] == original["id"] and again["text"] == original["text"]
    assert again["section"] == original["section"]


def test_format_option_and_columns(runner, tmp_path, dataset):
    invoke(runner, ["export", dataset, "-o", tmp_path / "data.out", "--format", "parquet", "--columns", "id,text"])
    table = pq.read_table(tmp_path / "data.out")
    assert table.column_names == ["id", "text"] and table.num_rows == 400
    assert table.column("id").to_pylist() == [r["id"] for r in sample_rows()]
    invoke(runner, ["export", dataset, "-o", tmp_path / "x.gz", "--format", "csv"])
    assert gzip.decompress((tmp_path / "x.gz").read_bytes()).startswith(b"id,package,section,text\n")


@pytest.mark.parametrize("args, words", [
    (["-o", "out.xlsx"], "cannot tell the format"),
    (["-o", "out.parquet.gz"], "Parquet compresses its own columns"),
    (["-o", "out.jsonl", "--columns", "id,nope"], "no column 'nope'"),
    (["-o", "missing-dir/out.jsonl"], "does not exist"),
])
def test_export_errors_are_one_line(runner, tmp_path, dataset, args, words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(runner, ["export", dataset, *args], expect=2)
    assert words in result.output and "Traceback" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == []


def test_export_refuses_an_incomplete_dataset(runner, tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    result = invoke(runner, ["export", half, "-o", tmp_path / "out.jsonl"], expect=2)
    assert "no manifest.json" in result.output and not (tmp_path / "out.jsonl").exists()


def test_export_is_atomic(runner, tmp_path, dataset, monkeypatch):
    target = tmp_path / "out.jsonl"
    target.write_text("previous export\n")
    OutputPaths(target).tmp(999999).write_text("left by a killed export")

    import hfbatch.exporting as export_job

    def fail_half_way(ds, fh, fmt):
        fh.write(b'{"id": 1}\n')
        raise OSError("disk full")

    monkeypatch.setattr(export_job, "write_dataset", fail_half_way)
    result = invoke(runner, ["export", dataset, "-o", target, "--force"], expect=1)
    assert "disk full" in result.output and "unchanged" in result.output
    assert target.read_text() == "previous export\n"  # the old file, untouched
    assert sorted(tmp_path.iterdir()) == [OutputPaths(target).lock, target]  # no temp file left

    monkeypatch.undo()
    invoke(runner, ["export", dataset, "-o", target, "--force"])  # the "previous export" was written by hand
    assert len(target.read_text().splitlines()) == 400


def test_export_replaces_only_its_own_file_unless_forced(runner, tmp_path, dataset):
    users = tmp_path / "labels.jsonl"
    users.write_text("the user's own labels\n")
    result = invoke(runner, ["export", dataset, "-o", users], expect=2)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(users) in errors[0] and "--force" in errors[0]
    assert "Traceback" not in result.output and users.read_text() == "the user's own labels\n"

    ours = tmp_path / "out.jsonl"
    invoke(runner, ["export", dataset, "-o", ours])
    invoke(runner, ["export", dataset, "-o", ours, "--columns", "id"])  # a re-export replaces its own file
    assert json.loads(ours.read_text().splitlines()[0]).keys() == {"id"}

    ours.write_text("edited by the user since\n")  # no longer the file the export wrote
    invoke(runner, ["export", dataset, "-o", ours], expect=2)
    assert ours.read_text() == "edited by the user since\n"

    link = tmp_path / "link.jsonl"
    link.symlink_to(users)
    invoke(runner, ["export", dataset, "-o", link, "--force"], expect=2)  # never written through
    assert users.read_text() == "the user's own labels\n"

    invoke(runner, ["export", dataset, "-o", users, "--force"])
    assert len(users.read_text().splitlines()) == 400
