"""The model jobs as Python functions (hfbatch.embedding.embed, hfbatch.classification.classify), without the CLI:
the same summary as --json, the same outputs, the same no-op re-run and the same errors."""

from __future__ import annotations

import json

import pytest
from conftest import invoke, make_tiny_model, write_jsonl

import hfbatch.classification
import hfbatch.embedding
import hfbatch.ingestion
from hfbatch.errors import InputError
from hfbatch.io import open_dataset

TIMES = ("seconds", "job")  # added by --json around the library's summary


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-models")
    write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": f"document {i} about {'chess' if i % 2 else 'go'}"}
                                      for i in range(37)])
    hfbatch.ingestion.ingest([str(root / "docs.jsonl")], str(root / "ds"))
    return root / "ds"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-cls", num_labels=3, pooling=None)


def without_paths(summary: dict, output) -> dict:
    """The summary less --json's own keys and the values naming the output directory (different per run)."""
    return {k: v for k, v in summary.items() if k not in TIMES and str(output) not in str(v)}


def rows(path):
    return open_dataset(path)[0].to_dict()


def check_same_as_cli(runner, tmp_path, job, call, options: dict, cli_args: list):
    summary = call(str(tmp_path / "api"), **options)
    assert summary["rows_computed"] == 37
    result = invoke(runner, [job, dataset_of(options), "-o", tmp_path / "cli", *cli_args, "--json"])
    printed = json.loads(result.stdout)
    assert without_paths(summary, tmp_path / "api") == without_paths(printed, tmp_path / "cli")
    assert rows(tmp_path / "api") == rows(tmp_path / "cli")
    again = call(str(tmp_path / "api"), **options)
    assert again["status"] == "up_to_date" and summary["status"] == "ok"


def dataset_of(options):
    return options["_dataset"]


def test_embed_api_matches_cli(runner, tmp_path, dataset, tiny_model):
    def call(output, _dataset, **kw):
        return hfbatch.embedding.embed(str(_dataset), output, **kw)

    options = {"_dataset": dataset, "model": str(tiny_model), "precision": "fp32", "backend": "torch",
               "shard_rows": 10}
    check_same_as_cli(runner, tmp_path, "embed", call, options,
                      ["--model", tiny_model, "--precision", "fp32", "--backend", "torch", "--shard-rows", "10"])


def test_classify_api_matches_cli(runner, tmp_path, dataset, classifier):
    def call(output, _dataset, **kw):
        return hfbatch.classification.classify(str(_dataset), output, **kw)

    options = {"_dataset": dataset, "model": str(classifier), "top_k": 2, "precision": "fp32",
               "backend": "torch", "shard_rows": 10}
    check_same_as_cli(runner, tmp_path, "classify", call, options,
                      ["--model", classifier, "--top-k", "2", "--precision", "fp32", "--backend", "torch",
                       "--shard-rows", "10"])


def test_bad_options_raise_input_error(tmp_path, dataset, tiny_model, classifier):
    with pytest.raises(InputError, match="--shard-index"):
        hfbatch.embedding.embed(str(dataset), str(tmp_path / "e"), model=str(tiny_model), num_shards=2,
                                shard_index=2)
    with pytest.raises(InputError, match="--chunk-overlap needs --chunk-tokens"):
        hfbatch.embedding.embed(str(dataset), str(tmp_path / "e"), model=str(tiny_model), chunk_overlap=4)
    with pytest.raises(InputError, match="no sequence-classification head"):
        hfbatch.classification.classify(str(dataset), str(tmp_path / "c"), model=str(tiny_model))
    with pytest.raises(InputError, match="body"):
        hfbatch.classification.classify(str(dataset), str(tmp_path / "c"), model=str(classifier), text_column="body")
    assert not (tmp_path / "e").exists() and not (tmp_path / "c").exists()


def test_encoder_run_takes_a_str_model_dir(tiny_model):
    """The in-process engine (what search embeds queries with, and the benches use) takes the model directory
    as str as well as Path, with the same vectors."""
    texts = ["a chess game", "a text editor for the console", "x"]
    by_path = hfbatch.embedding.EncoderRun(tiny_model, backend="torch", precision="fp32")
    by_str = hfbatch.embedding.EncoderRun(str(tiny_model), backend="torch", precision="fp32")
    a, b = by_path.run(by_path.tokenize(texts)), by_str.run(by_str.tokenize(texts))
    assert a.shape == (3, 32)
    assert (a == b).all()
