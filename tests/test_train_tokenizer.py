"""hfbatch train-tokenizer: the three algorithms from scratch, retraining a base, the vocabulary size asked
for, round trips, loading with AutoTokenizer, and the fertility report."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE, invoke, manifest, sample_rows, write_tokenizer

ROUND_TRIP = "A fast text editor for the console, with plugins: 3 modes."


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("sample") / "ds"
    invoke(CliRunner(), ["ingest", SAMPLE, "-o", out])
    return out


def trained(runner, sample, out, *options):
    from transformers import AutoTokenizer

    result = invoke(runner, ["train-tokenizer", sample, "-o", out, *options, "--json"])
    return AutoTokenizer.from_pretrained(str(out)), json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("algorithm, vocab_size, decoded", [
    ("bpe", 600, ROUND_TRIP),  # byte-level: every text comes back exactly
    ("wordpiece", 500, "a fast text editor for the console, with plugins : 3 modes."),  # lower-cased, BERT's split
    ("unigram", 500, ROUND_TRIP),
])
def test_each_algorithm_makes_a_loadable_tokenizer_of_the_size_asked(tmp_path, runner, sample, algorithm, vocab_size,
                                                                     decoded):
    tokenizer, summary = trained(runner, sample, tmp_path / algorithm, "--algorithm", algorithm, "--vocab-size",
                                 vocab_size, "--min-frequency", 1)
    assert tokenizer.is_fast and len(tokenizer) == vocab_size == summary["vocab_size"]
    ids = tokenizer(ROUND_TRIP, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == decoded
    info = manifest(tmp_path / algorithm)
    assert info["algorithm"] == algorithm and info["vocab_size"] == vocab_size
    assert info["fertility"]["reference"]["tokenizer"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["fertility"]["heldout_rows"] == 20 and summary["heldout_rows"] == 20  # every 20th of 400 rows
    assert summary["training_rows"] == 380
    assert 1.0 < summary["tokens_per_word"] < 5.0


def test_algorithm_defaults_special_tokens_and_unknowns(tmp_path, runner, sample):
    bpe, bpe_summary = trained(runner, sample, tmp_path / "bpe", "--vocab-size", 400)
    assert manifest(tmp_path / "bpe")["algorithm"] == "bpe"  # the default
    assert bpe.eos_token == bpe.bos_token == "<|endoftext|>" and bpe.pad_token is None  # as GPT-2 ships
    assert bpe_summary["unknown_share"] == 0.0  # byte-level: nothing is unknown
    wordpiece, _ = trained(runner, sample, tmp_path / "wp", "--algorithm", "wordpiece", "--vocab-size", 400)
    encoded = wordpiece("chess game")["input_ids"]
    assert (encoded[0], encoded[-1]) == (wordpiece.cls_token_id, wordpiece.sep_token_id)
    assert wordpiece.decode(wordpiece("日本")["input_ids"], skip_special_tokens=False) == "[CLS] [UNK] [UNK] [SEP]"
    custom, _ = trained(runner, sample, tmp_path / "custom", "--vocab-size", 400, "--special-tokens",
                        "<|endoftext|>,<|user|>,<|bot|>")
    assert custom.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|bot|>"]) == [0, 1, 2]
    assert custom.tokenize("<|user|>hi<|bot|>")[0] == "<|user|>"


def test_retraining_a_base_keeps_its_pipeline_and_special_tokens(tmp_path, runner, sample):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    write_tokenizer(base)  # a BERT WordPiece tokenizer (lower-cases, [CLS] ... [SEP])
    tokenizer, summary = trained(runner, sample, tmp_path / "new", "--base", base, "--vocab-size", 300)
    original = AutoTokenizer.from_pretrained(str(base))
    assert len(tokenizer) == 300 != len(original)
    assert tokenizer.tokenize("CHESS") == tokenizer.tokenize("chess")  # the base's lower-casing normaliser
    encoded = tokenizer("chess game")["input_ids"]
    assert tokenizer.convert_ids_to_tokens([encoded[0], encoded[-1]]) == ["[CLS]", "[SEP]"]
    assert {tokenizer.pad_token, tokenizer.unk_token, tokenizer.mask_token} == {"[PAD]", "[UNK]", "[MASK]"}
    # learned from the corpus: a frequent word of it is one token now, and was several before
    assert len(tokenizer.tokenize("package")) == 1 and len(original.tokenize("packages")) > 1
    info = manifest(tmp_path / "new")
    assert info["algorithm"] == "wordpiece" and info["fertility"]["reference"]["tokenizer"] == str(base.resolve())
    assert summary["reference_tokens_per_word"] > summary["tokens_per_word"]  # the tiny base splits far more


def test_bad_options_are_one_error_line(tmp_path, runner, sample):
    base = tmp_path / "base"
    write_tokenizer(base)
    result = invoke(runner, ["train-tokenizer", sample, "-o", tmp_path / "a", "--base", base, "--algorithm", "bpe"],
                    expect=2)
    assert "the --base tokenizer is wordpiece" in result.output and not (tmp_path / "a").exists()
    result = invoke(runner, ["train-tokenizer", sample, "-o", tmp_path / "b", "--base", tmp_path], expect=2)
    assert "has no tokenizer.json" in result.output
    result = invoke(runner, ["train-tokenizer", sample, "-o", tmp_path / "c", "--text-column", "nope"], expect=2)
    assert "no column 'nope'" in result.output and not (tmp_path / "c").exists()


def test_an_unchanged_rerun_is_up_to_date(tmp_path, runner, sample):
    _, first = trained(runner, sample, tmp_path / "t", "--vocab-size", 300)
    _, again = trained(runner, sample, tmp_path / "t", "--vocab-size", 300)
    assert again["status"] == "up_to_date" and again["tokens_per_word"] == first["tokens_per_word"]
    assert len(sample_rows()) == 400
