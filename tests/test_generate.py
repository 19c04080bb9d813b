"""hfbatch generate on a tiny random GPT-2 built here (a byte-level BPE tokenizer with no pad token, as GPT-2
ships): greedy output against transformers' own generate, pad handling, the seed rule, chit-chat prompts and
the history cut, stop strings, and a kill -9 with its resume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import HFBATCH, invoke, load, manifest, write_jsonl

EOS = "<|endoftext|>"
CORPUS = ["a fast text editor for the console", "library for parsing json files", "a chess game for two players",
          "network traffic monitor and analyser", "python bindings for the library", "tools to convert images",
          "the server of a small web framework", "documentation for the package", "fonts for the desktop"]
PROMPTS = ["a fast", "library for parsing json files and more text", "chess", "network traffic monitor for",
           "python", "tools to convert images between formats of many kinds", "the", "documentation for"]


def write_bpe_tokenizer(directory: Path, specials=(EOS,), vocab_size: int = 400, **named) -> None:
    """A byte-level BPE fast tokenizer trained on a few lines: EOS/BOS `<|endoftext|>`, no pad token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 5, vocab_size=vocab_size, min_frequency=1, special_tokens=list(specials),
                            show_progress=False)
    names = {"bos_token": EOS, "eos_token": EOS} if EOS in specials else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, model_max_length=64, **{**names, **named})
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(str(directory))


def make_tiny_gpt2(directory: Path, seed: int = 0, specials=(EOS,), **named) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    directory.mkdir(parents=True, exist_ok=True)
    write_bpe_tokenizer(directory, specials, **named)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, runner_module) -> Path:
    root = tmp_path_factory.mktemp("prompts")
    source = write_jsonl(root / "prompts.jsonl", [{"id": f"p{i}", "text": t} for i, t in enumerate(PROMPTS)])
    invoke(runner_module, ["ingest", source, "-o", root / "ds"])
    return root / "ds"


@pytest.fixture(scope="module")
def runner_module():
    from click.testing import CliRunner

    return CliRunner()


def rows(path) -> dict[str, dict]:
    return {row["id"]: row for row in load(path)}


def reference_greedy(model_dir: Path, texts: list[str], max_new_tokens: int, ids_too=False) -> list[tuple]:
    """transformers' generate, one prompt at a time (no padding at all): (text, generated tokens[, ids])."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        text = tokenizer.decode(generated, skip_special_tokens=True)
        out.append((text, len(generated), generated.tolist()) if ids_too else (text, len(generated)))
    return out


def test_greedy_equals_model_generate_one_prompt_at_a_time(tmp_path, runner, gpt2, prompts):
    out = tmp_path / "greedy"
    result = invoke(runner, ["generate", prompts, "-o", out, "--model", gpt2, "--max-new-tokens", 12,
                             "--batch-size", 3, "--device", "cpu", "--precision", "fp32", "--json"])
    got = rows(out)
    for i, (text, count) in enumerate(reference_greedy(gpt2, PROMPTS, 12)):
        row = got[f"p{i}"]
        assert (row["generation"], row["generated_tokens"]) == (text, count), PROMPTS[i]
        assert row["prompt"] == PROMPTS[i] and row["finish_reason"] == "length"
    assert [r["id"] for r in load(out)] == [f"p{i}" for i in range(len(PROMPTS))]  # the dataset's order
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == len(PROMPTS) and summary["generated_tokens"] == 12 * len(PROMPTS)
    assert manifest(out)["pad_token_added"] is False  # GPT-2 has no pad token: EOS pads, nothing is added


def test_a_row_stops_at_eos_as_generate_does(tmp_path, runner, tmp_path_factory, prompts):
    """The EOS of the model's generation config: here a token the model greedily emits after "chess" (the
    first that is not its first), so that row stops there with reason eos, as transformers' generate stops."""
    from transformers import AutoTokenizer, GenerationConfig

    model_dir = make_tiny_gpt2(tmp_path / "eos-model")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    _, _, ids = reference_greedy(model_dir, ["chess"], 12, ids_too=True)[0]
    stop_at = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])
    GenerationConfig(eos_token_id=ids[stop_at], bos_token_id=ids[stop_at]).save_pretrained(str(model_dir))
    out = tmp_path / "eos"
    invoke(runner, ["generate", prompts, "-o", out, "--model", model_dir, "--max-new-tokens", 12, "--device", "cpu",
                    "--precision", "fp32"])
    row = rows(out)["p2"]
    assert row["finish_reason"] == "eos" and row["generated_tokens"] == stop_at + 1
    assert row["generation"] == tokenizer.decode(ids[:stop_at + 1], skip_special_tokens=True)  # not special
    reference = reference_greedy(model_dir, PROMPTS, 12)
    assert [(r["generation"], r["generated_tokens"]) for r in load(out)] == reference


def test_pad_token_is_eos_when_missing_and_new_only_without_eos(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfbatch.generation import ensure_pad_token

    with_eos = make_tiny_gpt2(tmp_path / "with-eos")
    tokenizer, model = AutoTokenizer.from_pretrained(str(with_eos)), AutoModelForCausalLM.from_pretrained(str(with_eos))
    rows_before = model.get_input_embeddings().weight.shape[0]
    assert ensure_pad_token(tokenizer, model) is False
    assert tokenizer.pad_token == EOS and model.get_input_embeddings().weight.shape[0] == rows_before

    without = make_tiny_gpt2(tmp_path / "no-eos", specials=("<unk>",), unk_token="<unk>")
    tokenizer, model = AutoTokenizer.from_pretrained(str(without)), AutoModelForCausalLM.from_pretrained(str(without))
    assert tokenizer.eos_token is None
    rows_before = model.get_input_embeddings().weight.shape[0]
    assert ensure_pad_token(tokenizer, model) is True
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == rows_before
    assert model.get_input_embeddings().weight.shape[0] == rows_before + 1


def test_a_tokenizer_without_pad_or_eos_still_generates_in_batches(tmp_path, runner, prompts):
    model_dir = make_tiny_gpt2(tmp_path / "no-eos", specials=("<unk>",), unk_token="<unk>")
    out = tmp_path / "out"
    invoke(runner, ["generate", prompts, "-o", out, "--model", model_dir, "--max-new-tokens", 5, "--batch-size", 4,
                    "--device", "cpu", "--precision", "fp32"])
    assert manifest(out)["pad_token_added"] is True
    assert [r["generated_tokens"] for r in load(out)] == [5] * len(PROMPTS)
    # the model directory is the user's: nothing was written back into it
    assert "[PAD]" not in (model_dir / "tokenizer.json").read_text()


SAMPLING = ["--do-sample", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--repetition-penalty", "1.3",
            "--max-new-tokens", "10", "--device", "cpu", "--precision", "fp32"]


def sampled(runner, dataset, out, model, *extra) -> dict[str, str]:
    invoke(runner, ["generate", dataset, "-o", out, "--model", model, *SAMPLING, *extra])
    return {row["id"]: row["generation"] for row in load(out)}


def test_a_rows_sample_depends_on_seed_id_and_options_not_on_batches_or_order(tmp_path, runner, gpt2, prompts):
    one_by_one = sampled(runner, prompts, tmp_path / "b1", gpt2, "--batch-size", "1", "--seed", "7")
    batched = sampled(runner, prompts, tmp_path / "b3", gpt2, "--batch-size", "3", "--seed", "7")
    assert batched == one_by_one
    # the same rows in another order, so in other batches with other neighbours
    reordered = write_jsonl(tmp_path / "reversed.jsonl",
                            [{"id": f"p{i}", "text": t} for i, t in reversed(list(enumerate(PROMPTS)))])
    invoke(runner, ["ingest", reordered, "-o", tmp_path / "reversed-ds"])
    assert sampled(runner, tmp_path / "reversed-ds", tmp_path / "rev", gpt2, "--batch-size", "5",
                   "--seed", "7") == one_by_one
    other_seed = sampled(runner, prompts, tmp_path / "s8", gpt2, "--seed", "8")
    assert sum(other_seed[k] != one_by_one[k] for k in one_by_one) >= len(PROMPTS) - 1
    # sampling really samples: greedy gives other text
    invoke(runner, ["generate", prompts, "-o", tmp_path / "greedy", "--model", gpt2, "--max-new-tokens", 10])
    greedy = {row["id"]: row["generation"] for row in load(tmp_path / "greedy")}
    assert sum(greedy[k] != one_by_one[k] for k in one_by_one) >= len(PROMPTS) - 1


def test_num_return_sequences_gives_lists_of_different_samples(tmp_path, runner, gpt2, prompts):
    out = tmp_path / "three"
    invoke(runner, ["generate", prompts, "-o", out, "--model", gpt2, *SAMPLING, "--num-return-sequences", 3])
    for row in load(out):
        assert len(row["generation"]) == 3 and len(set(row["generation"])) == 3
        assert row["finish_reason"] == ["length"] * 3 and row["generated_tokens"] == [10] * 3
    # the first of three is not the single sample: the options (and so the seeds) differ, as documented
    single = sampled(runner, prompts, tmp_path / "one", gpt2)
    assert any(single[row["id"]] != row["generation"][0] for row in load(out))


def test_stop_strings_cut_the_text_and_end_the_row(tmp_path, runner, gpt2, prompts):
    base = tmp_path / "base"
    invoke(runner, ["generate", prompts, "-o", base, "--model", gpt2, "--max-new-tokens", 16])
    full = rows(base)["p0"]["generation"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop.strip()) >= 2
    out = tmp_path / "stopped"
    invoke(runner, ["generate", prompts, "-o", out, "--model", gpt2, "--max-new-tokens", 16, "--stop", stop,
                    "--stop", "no-such-text-here"])
    row = rows(out)["p0"]
    assert row["generation"] == full[:full.find(stop)]
    assert row["finish_reason"] == "stop" and row["generated_tokens"] < 16
    for key, other in rows(out).items():  # the other rows: stopped where their own text has it, or unchanged
        before = rows(base)[key]["generation"]
        if stop in before:
            assert other["generation"] == before[:before.find(stop)] and other["finish_reason"] == "stop"
        else:
            assert other["generation"] == before and other["finish_reason"] == "length"


# ---- dialogue prompts -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chit_chat(tmp_path_factory) -> Path:
    """A GPT-2 whose tokenizer has [CLS] and [SEP], as the GPT-2 chit-chat models' (BERT) tokenizers do."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("models") / "chit-chat", specials=(EOS, "[CLS]", "[SEP]"),
                          cls_token="[CLS]", sep_token="[SEP]")


def test_chit_chat_prompt_is_cls_then_turns_each_followed_by_sep(chit_chat):
    from transformers import AutoTokenizer

    from hfbatch.generation import PromptBuilder

    tok = AutoTokenizer.from_pretrained(str(chit_chat))
    ids = {t: tok(t, add_special_tokens=False)["input_ids"] for t in ("hello", "a chess game", "library for json")}
    cls, sep = tok.cls_token_id, tok.sep_token_id
    builder = PromptBuilder(tok, context=64, max_new_tokens=8, max_history_turns=None)
    prompt = builder.from_history(["hello", "a chess game", "library for json"], row=0, column="turns")
    assert prompt.ids == [cls, *ids["hello"], sep, *ids["a chess game"], sep, *ids["library for json"], sep]
    assert prompt.text == "[CLS]hello[SEP]a chess game[SEP]library for json[SEP]" and not prompt.truncated
    last_two = PromptBuilder(tok, 64, 8, max_history_turns=2).from_history(
        ["hello", "a chess game", "library for json"], row=0, column="turns")
    assert last_two.ids == [cls, *ids["a chess game"], sep, *ids["library for json"], sep] and last_two.truncated
    # a context with room for [CLS] + the last turn only: the older turns are cut, oldest first
    room = 1 + len(ids["library for json"]) + 1
    cut = PromptBuilder(tok, context=room + 8, max_new_tokens=8, max_history_turns=None).from_history(
        ["hello", "a chess game", "library for json"], row=0, column="turns")
    assert cut.ids == [cls, *ids["library for json"], sep] and cut.truncated
    # even the last turn does not fit: its end is kept after [CLS]
    tight = PromptBuilder(tok, context=4 + 8, max_new_tokens=8, max_history_turns=None).from_history(
        ["library for json"], row=0, column="turns")
    assert len(tight.ids) == 4 and tight.ids[0] == cls and tight.ids[1:] == ([*ids["library for json"], sep])[-3:]


def test_generate_from_a_chat_history_column_stops_at_sep(tmp_path, runner, chit_chat):
    from transformers import AutoTokenizer

    from hfbatch.generation import CausalLM

    tok = AutoTokenizer.from_pretrained(str(chit_chat))
    assert CausalLM(chit_chat, device="cpu", precision="fp32").stop_ids == {tok.eos_token_id, tok.sep_token_id}
    source = write_jsonl(tmp_path / "dialogues.jsonl", [
        {"id": "d0", "text": "x", "turns": ["hello", "a chess game", "library for json"]},
        {"id": "d1", "text": "y", "turns": ["fonts for the desktop"]}])
    invoke(runner, ["ingest", source, "-o", tmp_path / "ds"])
    out = tmp_path / "replies"
    invoke(runner, ["generate", tmp_path / "ds", "-o", out, "--model", chit_chat, "--chat-history-column", "turns",
                    "--max-history-turns", 2, "--max-new-tokens", 6])
    got = rows(out)
    assert got["d0"]["prompt"] == "[CLS]a chess game[SEP]library for json[SEP]"
    assert got["d1"]["prompt"] == "[CLS]fonts for the desktop[SEP]"
    assert got["d0"]["prompt_tokens"] == len(tok(got["d0"]["prompt"], add_special_tokens=False)["input_ids"])
    assert manifest(out)["counts"]["truncated_prompts"] == 1  # d0 lost its first turn


def test_bad_generate_options_are_one_error_line(tmp_path, runner, gpt2, prompts):
    cases = [(["--chat-history-column", "text"], "not a list of turns"),
             (["--prompt-column", "nope"], "no column 'nope'"),
             (["--num-return-sequences", "2"], "needs --do-sample"),
             (["--max-new-tokens", "64"], "leaves no room for a prompt"),
             (["--max-history-turns", "2"], "needs --chat-history-column")]
    for extra, message in cases:
        out = tmp_path / "out"
        result = invoke(runner, ["generate", prompts, "-o", out, "--model", gpt2, *extra], expect=2)
        assert f"{message}" in result.output and result.output.count("Error:") == 1, result.output
        assert not out.exists()


# ---- kill and resume ----------------------------------------------------------------------------------------

def hfbatch(args, env=None, expect=0):
    done = subprocess.run(HFBATCH + [str(a) for a in args] + ["--json"], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    assert done.returncode == expect, f"exit {done.returncode} != {expect}\n{done.stderr[-3000:]}"
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def test_a_killed_run_resumes_with_identical_samples(tmp_path, gpt2, prompts):
    args = ["generate", prompts, "--model", gpt2, *SAMPLING, "--batch-size", 2, "--seed", 3]
    reference = hfbatch([*args, "-o", tmp_path / "ref"])
    assert reference["rows_computed"] == len(PROMPTS)
    out = tmp_path / "out"
    hfbatch([*args, "-o", out], {"HFBATCH_PART_SECONDS": "0", "HFBATCH_TEST_KILL": "part:2"}, expect=-9)
    assert not out.exists()
    resumed = hfbatch([*args, "-o", out], {"HFBATCH_PART_SECONDS": "0"})
    assert resumed["rows_resumed"] == 4 and resumed["rows_computed"] == len(PROMPTS) - 4  # 2 batches of 2 kept
    assert list(load(out)) == list(load(tmp_path / "ref"))


@pytest.mark.slow
def test_samples_do_not_depend_on_devices_or_shards(tmp_path, gpt2, prompts):
    args = ["generate", prompts, "--model", gpt2, *SAMPLING, "--seed", 5]
    hfbatch([*args, "-o", tmp_path / "one"])
    two = hfbatch([*args, "-o", tmp_path / "two", "--devices", "cpu,cpu", "--shard-rows", 3, "--batch-size", 2])
    assert two["rows"] == len(PROMPTS)
    assert manifest(tmp_path / "two")["devices"][0]["device"] == "cpu"
    assert list(load(tmp_path / "two")) == list(load(tmp_path / "one"))
