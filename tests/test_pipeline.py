"""ingest -> embed -> index -> search, end to end, on a tiny random model and as real subprocesses."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, invoke, load, sample_rows


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    from click.testing import CliRunner

    runner = CliRunner()
    out = tmp_path_factory.mktemp("pipeline")
    invoke(runner, ["ingest", SAMPLE, "-o", out / "dataset"])
    invoke(runner, ["embed", out / "dataset", "-o", out / "emb", "--model", tiny_model, "--precision", "fp32",
                    "--shard-rows", "128"])
    invoke(runner, ["index", out / "emb", "-o", out / "index"])
    return out


def test_ingest_keeps_every_row_and_the_id_column(built):
    ds = load(built / "dataset")
    rows = sample_rows()
    assert len(ds) == len(rows)
    assert ds["id"] == [r["id"] for r in rows]
    assert ds["text"] == [r["text"] for r in rows]
    manifest = json.loads((built / "dataset" / "manifest.json").read_text())
    assert manifest["rows"] == len(rows) and manifest["inputs"][0]["sha256"]


def test_embeddings_are_normalised_float32_in_row_order(built, tiny_model):
    from transformers import AutoTokenizer

    emb = load(built / "emb")
    ds = load(built / "dataset")
    assert emb.column_names == ["id", "embedding"]
    assert emb.features["embedding"].length == 32
    assert emb["id"] == ds["id"]
    vectors = np.asarray(emb.with_format("numpy")["embedding"])
    assert vectors.dtype == np.float32 and vectors.shape == (len(ds), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # different token sequences (after truncation to the model's 128), different vectors
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    distinct = {tuple(ids) for ids in tokenizer(list(ds["text"]), truncation=True, max_length=128)["input_ids"]}
    assert len({v.round(5).tobytes() for v in vectors}) == len(distinct)


def test_search_returns_each_document_as_its_own_top_hit(built, runner):
    ds = load(built / "dataset")
    picks = [0, 17, 123, 399]
    queries = [ds[i]["text"] for i in picks]
    result = invoke(runner, ["search", built / "index", *queries, "-k", "3"])
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(hits) == 3 * len(picks)
    # hybrid, the default over an index with both parts: each hit also has both parts' scores
    assert set(hits[0]) == {"query", "rank", "id", "score", "text", "dense_score", "lexical_score"}
    for i, pick in enumerate(picks):
        top = hits[3 * i]
        assert top["rank"] == 1 and top["id"] == ds[pick]["id"] and top["text"] == ds[pick]["text"]
        assert top["score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["rank"] for h in hits[3 * i:3 * i + 3]] == [1, 2, 3]


def test_search_reads_queries_from_a_file(built, runner, tmp_path):
    ds = load(built / "dataset")
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"query": ds[5]["text"]}) + "\n")
    hits = [json.loads(x) for x in invoke(runner, ["search", built / "index", "--queries", qfile, "-k", "2"]
                                          ).stdout.splitlines()]
    assert hits[0]["id"] == ds[5]["id"] and len(hits) == 2


def test_index_manifest_describes_the_index(built):
    manifest = json.loads((built / "index" / "manifest.json").read_text())
    assert manifest["kind"] == "flat" and manifest["dim"] == 32 and manifest["count"] == 400
    assert manifest["metric"] == "ip" and Path(manifest["embeddings"]).name == "emb"
    assert Path(manifest["model"]).name == "tiny-mean"


def test_info_shows_manifest(built, runner):
    text = invoke(runner, ["info", built / "emb"]).output
    assert "embed output, 400 rows" in text
    data = json.loads(invoke(runner, ["info", built / "emb", "--json"]).stdout)
    assert data["job"] == "embed" and data["dim"] == 32


def hfbatch_exe():
    return shutil.which("hfbatch", path=str(Path(sys.executable).parent)) or shutil.which("hfbatch")


def test_real_subprocess_pipeline_with_json_summaries(tmp_path, tiny_model):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run(*args, code=0):
        proc = subprocess.run([hfbatch_exe(), *map(str, args)], capture_output=True, text=True, env=env)
        assert proc.returncode == code, proc.stderr
        assert "Traceback" not in proc.stderr
        return proc

    src = tmp_path / "docs.csv"
    src.write_text("name,text\na,first document about chess\nb,second one about networks\n"
                   "c,third about python parsers\n")
    summary = json.loads(run("ingest", src, "-o", tmp_path / "ds", "--json").stdout)
    assert summary["status"] == "ok" and summary["rows"] == 3 and summary["job"] == "ingest"
    ds = load(tmp_path / "ds")
    assert ds["id"] == ["docs.csv:1", "docs.csv:2", "docs.csv:3"]
    run("embed", tmp_path / "ds", "-o", tmp_path / "emb", "--model", tiny_model, "--json")
    run("index", tmp_path / "emb", "-o", tmp_path / "idx")
    hits = [json.loads(x) for x in run("search", tmp_path / "idx", "third about python parsers", "-k", "1"
                                       ).stdout.splitlines()]
    assert hits[0]["lexical_score"] > 0  # hybrid: its own words, so the best BM25 score, normalised to 1
    assert hits == [{"query": "third about python parsers", "rank": 1, "id": "docs.csv:3",
                     "score": pytest.approx(1.0, abs=1e-4), "text": "third about python parsers",
                     "dense_score": pytest.approx(1.0, abs=1e-4), "lexical_score": hits[0]["lexical_score"]}]
    bad = run("embed", tmp_path / "ds", "-o", tmp_path / "emb2", "--model", tiny_model, "--text-column", "body",
              "--json", code=2)
    assert "body" in bad.stderr and json.loads(bad.stdout)["status"] == "failed"
