"""hfbatch train --task causal-lm: a few steps on a tiny GPT-2, from scratch and fine-tuned; a loadable model
directory with its card; `hfbatch generate` using it; packing; resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from conftest import HFBATCH, hfbatch_killed_after_step, invoke, load, manifest, sample_rows, write_jsonl
from test_generate import make_tiny_gpt2, write_bpe_tokenizer

TINY = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}
FAST = ["--block-size", "32", "--batch-size", "16", "--epochs", "2", "--lr", "3e-3", "--device", "cpu",
        "--precision", "fp32"]


ROWS = 60  # of the sample: a few dozen steps per epoch


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("sample")
    invoke(CliRunner(), ["ingest", write_jsonl(root / "rows.jsonl", sample_rows(ROWS)), "-o", root / "ds"])
    return root / "ds"


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    write_bpe_tokenizer(directory, vocab_size=300)
    return directory


def test_packing_separates_texts_with_eos_and_cuts_full_blocks(tokenizer_dir):
    from transformers import AutoTokenizer

    from hfbatch.causal_lm import pack

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = ["a chess game", "library for parsing json files", "fonts"]
    stream = [t for text in texts for t in (*tok(text)["input_ids"], tok.eos_token_id)]
    blocks = pack(tok, texts, 4, tok.eos_token_id)
    assert blocks.shape == (len(stream) // 4, 4) and blocks.reshape(-1).tolist() == stream[:blocks.size]


def test_from_scratch_makes_a_model_with_a_card_that_generate_uses(tmp_path, runner, sample, tiny_config,
                                                                    tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "lm"
    result = invoke(runner, ["train", sample, "-o", out, "--task", "causal-lm", "--from-config", tiny_config,
                             "--tokenizer", tokenizer_dir, *FAST, "--json"])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    info = manifest(out)
    history = info["history"]
    assert [row["epoch"] for row in history] == [1, 2]  # a held-out perplexity per epoch
    assert history[1]["perplexity"] < history[0]["perplexity"] < 300  # it learns (300 tokens: uniform = 300)
    assert summary["perplexity"] == pytest.approx(min(r["perplexity"] for r in history), rel=1e-3)
    assert info["counts"]["eval_rows"] == 6 and info["counts"]["train_rows"] == 54
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert model.config.n_layer == 2 and model.config.vocab_size == len(tokenizer) == 300
    assert tokenizer.pad_token is None  # saved as given: the collator's pad token stayed in its own copy
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and f"perplexity of {summary['perplexity']:.2f}" in card
    assert json.loads((out / "metrics.json").read_text())["eval"]["perplexity"] == summary["perplexity"]

    replies = tmp_path / "replies"
    invoke(runner, ["generate", sample, "-o", replies, "--model", out, "--max-new-tokens", 8, "--do-sample"])
    rows = list(load(replies))
    assert len(rows) == ROWS and all(0 < r["generated_tokens"] <= 8 for r in rows)
    assert all(r["finish_reason"] in ("eos", "length") for r in rows)


def test_fine_tuning_a_base_model_beats_its_random_start(tmp_path, runner, sample):
    from transformers import AutoTokenizer

    base = make_tiny_gpt2(tmp_path / "base")  # random weights: perplexity about the vocabulary size
    out = tmp_path / "tuned"
    invoke(runner, ["train", sample, "-o", out, "--task", "causal-lm", "--base-model", base, *FAST, "--epochs", 1])
    info = manifest(out)
    assert info["config"]["base_model"] == str(base.resolve()) and info["task"] == "causal-lm"
    assert 1 < info["eval"]["perplexity"] < len(AutoTokenizer.from_pretrained(str(base))) / 2


def test_bad_causal_lm_options_are_one_error_line(tmp_path, runner, sample, tiny_config, tokenizer_dir):
    common = ["train", sample, "-o", tmp_path / "x", "--task", "causal-lm"]
    cases = [([], "exactly one of --base-model"),
             (["--from-config", tiny_config], "needs --tokenizer"),
             (["--from-config", "gpt2-huge", "--tokenizer", tokenizer_dir], "neither gpt2-tiny nor gpt2-small"),
             (["--from-config", tiny_config, "--tokenizer", tmp_path], "holds no tokenizer.json"),
             (["--from-config", tiny_config, "--tokenizer", tokenizer_dir, "--block-size", "100000"],
              "too little text"),
             (["--from-config", tiny_config, "--tokenizer", tokenizer_dir, "--text-column", "nope"],
              "no column 'nope'")]
    for extra, message in cases:
        result = invoke(runner, [*common, *extra], expect=2)
        assert message in result.output and result.output.count("Error:") == 1, result.output
        assert not (tmp_path / "x").exists()
    result = invoke(runner, ["train", sample, "-o", tmp_path / "x", "--from-config", tiny_config], expect=2)
    assert "--task classification needs --label-column" in result.output


@pytest.mark.slow
def test_a_killed_training_resumes_from_its_checkpoint(tmp_path, sample, tiny_config, tokenizer_dir):
    out = tmp_path / "lm"
    args = ["train", str(sample), "-o", str(out), "--task", "causal-lm", "--from-config", str(tiny_config),
            "--tokenizer", str(tokenizer_dir), *FAST, "--save-steps", "3", "--json"]
    checkpoints = out.parent / f".{out.name}.hfbatch-partial" / "checkpoints"
    killed = subprocess.run(hfbatch_killed_after_step(7) + args, capture_output=True, text=True, env=os.environ,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (checkpoints / "checkpoint-6" / "trainer_state.json").exists()
    assert not out.exists()
    done = subprocess.run([*HFBATCH, *args], capture_output=True, text=True, env=os.environ, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert manifest(out)["history"][-1]["epoch"] == 2 and summary["perplexity"] > 0
    assert "msg=resuming checkpoint=checkpoint-6" in done.stderr
