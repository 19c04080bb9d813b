"""Shared fixtures: tiny randomly initialised models saved to temp dirs, sample corpora, a CLI runner."""

from __future__ import annotations

import json
import os
import string
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "HFBATCH_CACHE_DIR" not in os.environ:  # converted models go to a per-run cache, not the user's
    import tempfile

    os.environ["HFBATCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="hfbatch-test-cache-")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample.jsonl"
SHARED_CORPUS = ROOT.parent / "shared" / "corpora" / "debian-descriptions.jsonl.gz"

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "of", "and", "to", "for", "is", "in", "this", "package", "library", "python", "game",
         "network", "data", "file", "tool", "text", "fast", "editor", "chess", "json", "parser", "server"]


def write_tokenizer(directory: Path, max_length: int = 128) -> None:
    """A real WordPiece fast tokenizer over letters, digits, punctuation and a few words: any ASCII text
    tokenizes without [UNK] storms, and the vocabulary stays tiny."""
    from transformers import BertTokenizer  # the fast (tokenizers) implementation in transformers 5

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(tiny_vocab())}, do_lower_case=True,
                              model_max_length=max_length)
    assert tokenizer.is_fast and tokenizer.tokenize("chess game!") == ["chess", "game", "!"]
    tokenizer.save_pretrained(str(directory))


def tiny_vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return list(dict.fromkeys(SPECIALS + WORDS + chars + ["##" + c for c in string.ascii_lowercase + string.digits]))


def tiny_config(**overrides):
    from transformers import BertConfig

    values = dict(vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, type_vocab_size=2)
    values.update(overrides)
    return BertConfig(**values)


def make_tiny_model(directory: Path, *, pooling: str | None = "mean", normalize: bool = True,
                    num_labels: int | None = None, seed: int = 0, **config) -> Path:
    """Save a tiny random BERT (safetensors) + tokenizer; with `pooling`, sentence-transformers module
    files like a real ST model directory (modules.json, 1_Pooling/config.json, 2_Normalize)."""
    import torch
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(**config)
    if num_labels:
        cfg.num_labels = num_labels
        cfg.id2label = {i: f"label_{i}" for i in range(num_labels)}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        model = BertForSequenceClassification(cfg)
    else:
        model = BertModel(cfg, add_pooling_layer=False)
    model.save_pretrained(str(directory), safe_serialization=True)
    write_tokenizer(directory, cfg.max_position_embeddings)
    if pooling:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (directory / "2_Normalize").mkdir(exist_ok=True)
        (directory / "modules.json").write_text(json.dumps(modules))
        (directory / "1_Pooling").mkdir(exist_ok=True)
        (directory / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": cfg.hidden_size,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False}))
        (directory / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": cfg.max_position_embeddings, "do_lower_case": False}))
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Mean pooling + Normalize, like all-MiniLM-L6-v2 but 32-d."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-mean")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    def make(name: str, **kwargs) -> Path:
        path = tmp_path_factory.mktemp("models") / name
        return make_tiny_model(path, **kwargs)
    return make


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


HFBATCH = [sys.executable, "-c", "from hfbatch.cli import main; main()"]  # the CLI as its own process


def hfbatch_killed_after_step(step: int) -> list[str]:
    """The CLI as its own process that SIGKILLs itself when Trainer finishes optimizer step `step` (after any
    checkpoint of the steps before it is written, before the next one). Waiting from outside for a checkpoint
    to appear raced a fast machine: the run finished, or rotated the checkpoint away, between two polls."""
    script = f"""
import os, signal, transformers
from hfbatch.cli import main

class KillAtStep(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)

init = transformers.Trainer.__init__
def init_with_kill(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.add_callback(KillAtStep())
transformers.Trainer.__init__ = init_with_kill
main()
"""
    return [sys.executable, "-c", script]


def manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


def hits_of(result):
    """A search command's JSON Lines output."""
    return [json.loads(line) for line in result.stdout.splitlines()]


def finished_shards(out: Path) -> int:
    """Shards of OUT's unfinished run that have their completion record."""
    from hfbatch.runner import OutputPaths

    shards = OutputPaths(out).shards
    return len(list(shards.glob("*.json"))) if shards.exists() else 0


def load(path):
    """An output dataset, memory-mapped, as a reader would open it."""
    import datasets

    return datasets.load_from_disk(str(path))


def invoke(runner: CliRunner, args: list[str], expect: int = 0):
    """Run `hfbatch ARGS` in-process; assert the exit code; return the result."""
    from hfbatch.cli import cli

    result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)
    if result.exit_code != expect:
        raise AssertionError(f"exit {result.exit_code} != {expect} for {args}\n"
                             f"output:\n{result.output}\nexception: {result.exception!r}")
    return result


def clustered_unit_vectors(n: int, dim: int, clusters: int, spread: float, seed: int = 0):
    """float32 unit vectors around `clusters` random centres (noise `spread` per coordinate): about as hard for
    an approximate index as text embeddings, and the same for the same arguments."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ingested_sample(directory: Path, rows: int) -> Path:
    """`hfbatch ingest` of `sample_rows(rows)` in `directory`: the dataset's path."""
    write_jsonl(directory / "rows.jsonl", sample_rows(rows))
    invoke(CliRunner(), ["ingest", directory / "rows.jsonl", "-o", directory / "ds"])
    return directory / "ds"


def python_succeeds(code: str, env: dict | None = None, timeout: float = 120) -> str:
    """Run `code` in a fresh interpreter (so sys.modules starts empty), with `env` added to the environment;
    its stdout, or fail with its stderr."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def modules_imported(code: str, modules: tuple[str, ...], cache: Path) -> dict[str, bool]:
    """Which of `modules` a fresh interpreter has imported after running `code` (CPU only, hfbatch's
    cache in `cache`)."""
    report = f"; import sys, json; print(json.dumps({{m: m in sys.modules for m in {modules!r}}}))"
    out = python_succeeds(code + report, {"HFBATCH_CACHE_DIR": str(cache), "CUDA_VISIBLE_DEVICES": ""}, 600)
    return json.loads(out.strip().splitlines()[-1])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample_rows(n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    return rows[:n] if n else rows
