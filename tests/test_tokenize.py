"""hfbatch tokenize: the tokenizer's own ids as Arrow columns (the same for any --num-proc, no hang with
workers), and embed / classify on a tokenized dataset equal them on text, or refuse ids their model would
not make. Also: embed counts the rows that --max-length cut."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SAMPLE, invoke, load, manifest, sample_rows

MAX_LENGTH = 64  # the tiny tokenizer splits most words into letters: most sample rows are longer



@pytest.fixture(scope="module")
def sample_ds(tmp_path_factory):
    from click.testing import CliRunner

    path = tmp_path_factory.mktemp("tokenize") / "ds"
    invoke(CliRunner(), ["ingest", SAMPLE, "-o", path])
    return path


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, sample_ds, tiny_model):
    """The sample tokenized at MAX_LENGTH, with offsets, in 3 shards, with one process."""
    from click.testing import CliRunner

    path = tmp_path_factory.mktemp("tokenize") / "tokens-1"
    invoke(CliRunner(), ["tokenize", sample_ds, "-o", path, "--model", tiny_model, "--max-length", MAX_LENGTH,
                         "--offsets", "--shard-rows", 150, "--num-proc", 1])
    return path


def expected_encoding(model_dir, texts, max_length):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    full = tokenizer(texts)["input_ids"]
    return encoded, [len(row) > max_length for row in full]


def test_num_proc_1_and_2_store_the_tokenizers_own_output(runner, tmp_path, sample_ds, tokens, tiny_model):
    invoke(runner, ["tokenize", sample_ds, "-o", tmp_path / "tokens-2", "--model", tiny_model, "--max-length",
                    MAX_LENGTH, "--offsets", "--shard-rows", 150, "--num-proc", 2])
    one, two = load(tokens), load(tmp_path / "tokens-2")
    columns = ["input_ids", "attention_mask", "token_type_ids", "offset_mapping", "truncated"]
    assert one.column_names == ["id", "package", "section", "text"] + columns
    assert one.data.table.equals(two.data.table)  # identical Arrow columns, rows in the same order

    texts = [r["text"] for r in sample_rows()]
    encoded, truncated = expected_encoding(tiny_model, texts, MAX_LENGTH)
    assert list(one["text"]) == texts
    for column in ("input_ids", "attention_mask", "token_type_ids"):
        assert list(one[column]) == encoded[column], column
    assert list(one["offset_mapping"]) == [[list(span) for span in row] for row in encoded["offset_mapping"]]
    assert list(one["truncated"]) == truncated and 0 < sum(truncated) < len(texts)

    info = manifest(tokens)
    assert info["counts"]["truncated"] == sum(truncated)
    assert info["tokenized"]["max_length"] == MAX_LENGTH and info["tokenized"]["columns"] == columns
    assert info["tokenized"]["model_fingerprint"] == info["config"]["model_fingerprint"]
    # num_proc is speed only: the other run's output is up to date for this one
    again = invoke(runner, ["tokenize", sample_ds, "-o", tokens, "--model", tiny_model, "--max-length",
                            MAX_LENGTH, "--offsets", "--shard-rows", 150, "--num-proc", 2, "--json"])
    assert json.loads(again.stdout.strip().splitlines()[-1])["status"] == "up_to_date"


@pytest.mark.parametrize("start_method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_num_proc_2_does_not_hang(tmp_path, sample_ds, tokens, tiny_model, start_method):
    """The whole command in its own process, under a timeout: a deadlocked worker fails the test instead
    of hanging it. TOKENIZERS_PARALLELISM=true is what a user may have exported; the job must override it."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    code = (f"import sys, multiprocess; multiprocess.set_start_method({start_method!r}, force=True); "
            f"from hfbatch.cli import main; main()")
    args = [sys.executable, "-c", code, "tokenize", str(sample_ds), "-o", str(tmp_path / "out"), "--model",
            str(tiny_model), "--max-length", str(MAX_LENGTH), "--offsets", "--shard-rows", "150", "--num-proc", "2"]
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hfbatch tokenize --num-proc 2 ({start_method}) hung for 240 s")
    assert done.returncode == 0, done.stderr
    assert load(tmp_path / "out").data.table.equals(load(tokens).data.table)


def embeddings(path):
    return np.asarray(load(path).with_format("numpy")["embedding"])


def summary(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_embed_from_tokens_equals_embed_from_text(runner, tmp_path, sample_ds, tokens, tiny_model, backend):
    common = ["--model", tiny_model, "--max-length", MAX_LENGTH, "--precision", "fp32", "--backend", backend,
              "--shard-rows", 120, "--batch-tokens", 500, "--json"]
    from_text = summary(invoke(runner, ["embed", sample_ds, "-o", tmp_path / "text", *common]))
    from_tokens = summary(invoke(runner, ["embed", tokens, "-o", tmp_path / "tokens", *common]))
    np.testing.assert_allclose(embeddings(tmp_path / "tokens"), embeddings(tmp_path / "text"), atol=1e-6,
                               rtol=1e-6)
    assert list(load(tmp_path / "tokens")["id"]) == [r["id"] for r in sample_rows()]
    assert from_tokens["truncated"] == from_text["truncated"] == manifest(tokens)["counts"]["truncated"]


def test_classify_with_the_same_tokenizer_uses_the_tokens(runner, tmp_path, sample_ds, tokens, tiny_model_factory):
    """Another model with the same tokenizer (a classifier fine-tuned from the embedding model) may reuse them."""
    classifier = tiny_model_factory("tiny-cls-tok", num_labels=3, pooling=None, initializer_range=0.5, seed=7)
    common = ["--model", classifier, "--max-length", MAX_LENGTH, "--precision", "fp32", "--backend", "torch",
              "--top-k", 2]
    invoke(runner, ["classify", sample_ds, "-o", tmp_path / "text", *common])
    invoke(runner, ["classify", tokens, "-o", tmp_path / "tokens", *common])
    a, b = load(tmp_path / "text"), load(tmp_path / "tokens")
    assert list(a["label"]) == list(b["label"])
    np.testing.assert_allclose(np.asarray(b["top_scores"]), np.asarray(a["top_scores"]), atol=1e-6)


def test_other_tokenizer_or_max_length_is_refused(runner, tmp_path, tokens, tiny_model, tiny_model_factory):
    from conftest import tiny_vocab
    from transformers import BertTokenizer

    other = tiny_model_factory("tiny-cased", seed=1)
    BertTokenizer(vocab={w: i for i, w in enumerate(tiny_vocab())}, do_lower_case=False,
                  model_max_length=128).save_pretrained(str(other))  # same vocabulary, but cased
    result = invoke(runner, ["embed", tokens, "-o", tmp_path / "a", "--model", other, "--max-length", MAX_LENGTH],
                    expect=2)
    assert "another tokenizer" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    # the right model, but its default max_length (128), not the tokens' MAX_LENGTH
    result = invoke(runner, ["embed", tokens, "-o", tmp_path / "b", "--model", tiny_model], expect=2)
    assert f"max_length {MAX_LENGTH}" in result.output and "128" in result.output
    result = invoke(runner, ["embed", tokens, "-o", tmp_path / "c", "--model", tiny_model, "--max-length",
                             MAX_LENGTH, "--text-column", "package"], expect=2)
    assert "--text-column 'text'" in result.output
    # tokenizing a tokenized dataset again is refused too
    invoke(runner, ["tokenize", tokens, "-o", tmp_path / "d", "--model", tiny_model], expect=2)


def test_embed_reports_rows_cut_by_max_length(runner, tmp_path, sample_ds, tiny_model):
    texts = [r["text"] for r in sample_rows()]
    _, truncated = expected_encoding(tiny_model, texts, MAX_LENGTH)
    result = invoke(runner, ["embed", sample_ds, "-o", tmp_path / "emb", "--model", tiny_model, "--max-length",
                             MAX_LENGTH, "--backend", "torch", "--shard-rows", 150, "--json"])
    assert summary(result)["truncated"] == sum(truncated) > 0
    assert manifest(tmp_path / "emb")["counts"]["truncated"] == sum(truncated)
    assert f"msg=truncated rows={sum(truncated)} max_length={MAX_LENGTH}" in result.stderr
    # the model's own limit by default (128): fewer rows are cut, and the manifest says which limit
    result = invoke(runner, ["embed", sample_ds, "-o", tmp_path / "emb128", "--model", tiny_model, "--backend",
                             "torch", "--json"])
    assert manifest(tmp_path / "emb128")["max_length"] == 128
    assert summary(result)["truncated"] == sum(expected_encoding(tiny_model, texts, 128)[1]) < sum(truncated)
