"""hfbatch: batch jobs for Hugging Face-style NLP on whole corpora.

Every job is also a plain Python function, called as the command is::

    import hfbatch

    hfbatch.ingest(["a.jsonl"], output="ds")
    hfbatch.embed("ds", output="emb")
    hfbatch.index("emb", output="idx")
    hits = hfbatch.search("idx", ["a chess game"], k=3)   # hit dicts, as search's JSON lines

The inputs are positional, the options are the command's with underscores (`--shard-rows` -> `shard_rows=`),
and each returns the summary dict that the command's `--json` prints (less its `seconds`). The functions keep
the command's locks, resume and manifests; they raise hfbatch.errors types (InputError, JobFailed, Busy)
where the command would exit 2, 1 or 75.

`import hfbatch` stays cheap: a job's module (and torch, faiss, ...) is imported the first time its function
is looked up (PEP 562 module __getattr__).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# function name -> "module:attribute"; a new job is one line here (and one in cli.JOBS for its command).
API = {
    "ingest": "hfbatch.ingestion:ingest",
    "embed": "hfbatch.embedding:embed",
    "index": "hfbatch.indexing:make_index",
    "search": "hfbatch.retrieval:search",
    "evaluate": "hfbatch.retrieval:evaluate",
    "classify": "hfbatch.classification:classify",
    "tokenize": "hfbatch.tokenized:tokenize",
    "train": "hfbatch.training:train",
    "export": "hfbatch.exporting:export",
    "merge": "hfbatch.merging:merge",
    "run": "hfbatch.pipeline:run",
    "info": "hfbatch.output_info:info",
    "inspect": "hfbatch.inspection:inspect",
    "generate": "hfbatch.generation:generate",
    "train_tokenizer": "hfbatch.tokenizer_training:train_tokenizer",
}

__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'hfbatch' has no attribute {name!r}")
    module_name, attribute = API[name].split(":")
    function = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = function  # looked up once: later calls do not come through here
    return function


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
