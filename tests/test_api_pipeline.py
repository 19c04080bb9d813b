"""The Python API (`import hfbatch`): ingest -> embed -> index -> search in this one process, with the CLI's
results, locks, resume and errors; and `import hfbatch` itself stays cheap."""

from __future__ import annotations

import inspect
import json

import pytest
from conftest import invoke, load, python_succeeds, write_jsonl

import hfbatch
from hfbatch.errors import Busy, InputError
from hfbatch.runner import OutputLock

QUERIES = ["a chess game", "network traffic tools"]
TOPICS = ["chess game", "network tool", "fast text editor", "json parser library"]
FAST = {"precision": "fp32", "backend": "torch", "shard_rows": 10}  # 37 rows: four shards
FAST_ARGS = ["--precision", "fp32", "--backend", "torch", "--shard-rows", "10"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-pipeline")
    return write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": f"document {i}: a {TOPICS[i % 4]}",
                                              "topic": TOPICS[i % 4]} for i in range(37)])


@pytest.fixture(scope="module")
def api_outputs(corpus, tiny_model):
    """The whole pipeline through the API, as the issue's example writes it."""
    root = corpus.parent / "api"
    summaries = {
        "ingest": hfbatch.ingest([str(corpus)], output=str(root / "ds")),
        "embed": hfbatch.embed(str(root / "ds"), output=str(root / "emb"), model=str(tiny_model), **FAST),
        "index": hfbatch.index(str(root / "emb"), output=str(root / "idx")),
    }
    hits = hfbatch.search(str(root / "idx"), QUERIES, k=3)
    return root, summaries, hits


def scrubbed(summary: dict, root) -> dict:
    """A summary less what differs between two runs: the time taken and the paths under each run's root."""
    return {k: v for k, v in summary.items() if k != "seconds" and str(root) not in str(v)}


def test_ingest_embed_index_search_in_one_process_equal_the_cli(runner, corpus, tiny_model, api_outputs):
    root, summaries, hits = api_outputs
    cli = corpus.parent / "cli"
    printed = {
        "ingest": invoke(runner, ["ingest", corpus, "-o", cli / "ds", "--json"]),
        "embed": invoke(runner, ["embed", cli / "ds", "-o", cli / "emb", "--model", tiny_model, *FAST_ARGS,
                                 "--json"]),
        "index": invoke(runner, ["index", cli / "emb", "-o", cli / "idx", "--json"]),
    }
    for job, result in printed.items():
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summaries[job]["status"] == "ok" and summary["status"] == "ok"
        assert scrubbed(summaries[job], root) == scrubbed(summary, cli), job
    for name in ("ds", "emb"):
        assert load(root / name).to_dict() == load(cli / name).to_dict()
    assert summaries["embed"]["rows"] == 37

    cli_hits = [json.loads(line) for line in
                invoke(runner, ["search", cli / "idx", *QUERIES, "-k", "3"]).stdout.splitlines()]
    assert list(hits) == cli_hits  # the hit dicts are search's JSON lines
    assert list(hfbatch.search(str(root / "idx"), QUERIES[0], k=3)) == cli_hits[:3]  # a str is one query
    filtered = hfbatch.search(str(root / "idx"), QUERIES[1], k=4, filters={"topic": "chess game"})
    assert list(filtered) == [json.loads(line) for line in invoke(runner, [
        "search", cli / "idx", QUERIES[1], "-k", "4", "--filter", "topic=chess game"]).stdout.splitlines()]
    assert len(filtered) == 4 and all(int(hit["id"][1:]) % 4 == 0 for hit in filtered)
    assert [hit["query"] for hit in hits] == [QUERIES[0]] * 3 + [QUERIES[1]] * 3
    assert all(hit["text"].startswith("document ") and hit["id"].startswith("d") for hit in hits)


def test_a_second_call_is_a_no_op_with_the_same_manifest(api_outputs, tiny_model):
    root, _, _ = api_outputs
    before = {name: (root / name / "manifest.json").read_bytes() for name in ("ds", "emb", "idx")}
    again = [hfbatch.ingest([str(root.parent / "docs.jsonl")], output=str(root / "ds")),
             hfbatch.embed(str(root / "ds"), output=str(root / "emb"), model=str(tiny_model), **FAST),
             hfbatch.index(str(root / "emb"), output=str(root / "idx"))]
    assert [summary["status"] for summary in again] == ["up_to_date"] * 3
    assert {name: (root / name / "manifest.json").read_bytes() for name in before} == before


def test_an_interrupted_embed_resumes_to_the_rows_of_an_uninterrupted_one(api_outputs, tiny_model, tmp_path,
                                                                         monkeypatch):
    root, _, _ = api_outputs
    import hfbatch.embedding

    encoded = []
    encode = hfbatch.embedding.EncoderRun.run

    def interrupted_on_the_third_shard(self, *args, **kwargs):
        encoded.append(1)
        if len(encoded) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C (or an Airflow task killed) would stop it
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(hfbatch.embedding.EncoderRun, "run", interrupted_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        hfbatch.embed(str(root / "ds"), output=str(tmp_path / "emb"), model=str(tiny_model), **FAST)
    assert not (tmp_path / "emb").exists()

    encoded.clear()
    summary = hfbatch.embed(str(root / "ds"), output=str(tmp_path / "emb"), model=str(tiny_model), **FAST)
    assert summary["status"] == "ok" and len(encoded) == 2  # the two shards finished before are not redone
    assert load(tmp_path / "emb").to_dict() == load(root / "emb").to_dict()


def test_a_held_lock_is_busy_through_the_api_and_exit_75_through_the_cli(api_outputs, tiny_model, tmp_path, runner):
    root, _, _ = api_outputs
    lock = OutputLock(tmp_path / "emb")
    lock.acquire()
    try:
        with pytest.raises(Busy, match="being written by another hfbatch run") as raised:
            hfbatch.embed(str(root / "ds"), output=str(tmp_path / "emb"), model=str(tiny_model), **FAST)
        assert raised.value.exit_code == 75
        result = invoke(runner, ["embed", root / "ds", "-o", tmp_path / "emb", "--model", tiny_model, *FAST_ARGS],
                        expect=75)
        assert result.output.strip().splitlines()[-1] == f"Error: {raised.value.message}"
        assert not (tmp_path / "emb").exists()
    finally:
        lock.release()
    assert hfbatch.embed(str(root / "ds"), output=str(tmp_path / "emb"), model=str(tiny_model),
                         **FAST)["rows"] == 37


@pytest.mark.parametrize("call, words", [
    (lambda root, model: hfbatch.embed(str(root / "ds"), output=str(root / "x"), model=str(model),
                                       text_column="body"), ["'body'", "--text-column"]),
    (lambda root, model: hfbatch.index(str(root / "ds"), output=str(root / "x"), memory_budget="lots"),
     ["--memory-budget", "'lots'"]),
    (lambda root, model: hfbatch.search(str(root / "idx"), []), ["QUERY"]),
    (lambda root, model: hfbatch.ingest([str(root / "missing.jsonl")], output=str(root / "x")), ["missing.jsonl"]),
])
def test_bad_input_raises_input_error_with_one_line(api_outputs, tiny_model, call, words):
    root, _, _ = api_outputs
    with pytest.raises(InputError) as raised:
        call(root, tiny_model)
    message = raised.value.message
    assert "\n" not in message and raised.value.exit_code == 2
    for word in words:
        assert word in message, message
    assert not (root / "x").exists()


def test_import_hfbatch_imports_no_torch_and_gives_the_real_functions():
    code = ("import sys, inspect, hfbatch\n"
            "assert 'torch' not in sys.modules and 'faiss' not in sys.modules, 'imported at import hfbatch'\n"
            "assert set(hfbatch.__all__) <= set(dir(hfbatch))\n"
            "hfbatch.info, hfbatch.inspect, hfbatch.run, hfbatch.train\n"
            "assert 'torch' not in sys.modules, 'a light job imported torch'\n"
            "print(sorted(inspect.signature(hfbatch.search).parameters)[:3], hfbatch.search.__module__)")
    assert python_succeeds(code).split() == ["['device',", "'ef',", "'filters']", "hfbatch.retrieval"]


def test_the_api_functions_are_the_library_functions_with_the_commands_options():
    import hfbatch.indexing
    import hfbatch.retrieval

    assert hfbatch.index is hfbatch.indexing.make_index and hfbatch.search is hfbatch.retrieval.search
    for name in hfbatch.__all__[1:]:
        parameters = inspect.signature(getattr(hfbatch, name)).parameters
        assert getattr(hfbatch, name).__doc__, name
        if name not in ("search", "evaluate", "info", "inspect", "run"):  # (they write no output directory
            assert "output" in parameters, name                          # unless asked to)
    with pytest.raises(AttributeError, match="no attribute 'generat'"):
        hfbatch.generat  # noqa: B018
