"""Tokenized datasets: the tokenize job (`tokenize`, behind `hfbatch tokenize`), what it stores, and how
embed / classify take their token ids from one instead of tokenizing again.

A tokenized dataset is the source dataset's rows and columns plus `input_ids`, `attention_mask` (all ones:
rows are stored unpadded), `token_type_ids` (when the tokenizer makes them), `truncated` (the row was cut
at max_length) and, on request, `offset_mapping`. Its manifest's `tokenized` entry says which tokenizer and
max_length made the ids; a job that would tokenize differently refuses it instead of computing wrong vectors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .batching import truncation_flags
from .errors import InputError

TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "offset_mapping", "truncated")

_TOKENIZERS: dict = {}  # per process; forked map workers inherit the parent's (never used in parallel)


def cached_tokenizer(model_dir, trust_remote_code: bool = False):
    from .models import load_tokenizer

    key = (str(model_dir), trust_remote_code)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(Path(model_dir), trust_remote_code)
    return _TOKENIZERS[key]


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids: normaliser, pre-tokeniser, vocabulary, special tokens and post-processor (the
    fast tokenizer's own serialisation), without the truncation/padding state that calls change. Two model
    directories with the same tokenizer (a classifier fine-tuned from an embedding model) share it."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def expected_tokenization(model_dir, max_length: int | None, trust_remote_code: bool = False) -> dict:
    """Tokenizer fingerprint and effective max_length for a model directory, without loading its weights."""
    from .models import load_tokenization

    tokenizer, _, max_length = load_tokenization(model_dir, max_length, trust_remote_code,
                                                 tokenizer=cached_tokenizer(model_dir, trust_remote_code))
    return {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "max_length": max_length}


def token_features(tokenizer, offsets: bool):
    import datasets

    features = {"input_ids": datasets.Sequence(datasets.Value("int32")),
                "attention_mask": datasets.Sequence(datasets.Value("int8"))}
    if "token_type_ids" in tokenizer.model_input_names:
        features["token_type_ids"] = datasets.Sequence(datasets.Value("int8"))
    if offsets:
        features["offset_mapping"] = datasets.Sequence(datasets.Sequence(datasets.Value("int32"), length=2))
    features["truncated"] = datasets.Value("bool")
    return features


class TokenizeBatch:
    """The `Dataset.map(batched=True)` function of `hfbatch tokenize`.

    Spawn-safe: it pickles as its settings only; each worker process loads (or, forked, inherits) the
    tokenizer itself. It never uses the tokenizer's own thread pool (TOKENIZERS_PARALLELISM=false is set
    before workers start), so a forked worker cannot deadlock on a pool its parent started.
    """

    def __init__(self, model_dir, max_length: int, text_column: str, text_pair_column: str | None = None,
                 offsets: bool = False, trust_remote_code: bool = False):
        self.model_dir, self.max_length = str(model_dir), max_length
        self.text_column, self.text_pair_column = text_column, text_pair_column
        self.offsets, self.trust_remote_code = offsets, trust_remote_code

    def __call__(self, batch: dict) -> dict:
        tokenizer = cached_tokenizer(self.model_dir, self.trust_remote_code)
        texts = batch[self.text_column]
        pairs = batch[self.text_pair_column] if self.text_pair_column else None
        with_types = "token_type_ids" in tokenizer.model_input_names
        encoded = tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=False,
                            return_attention_mask=True, return_token_type_ids=with_types,
                            return_offsets_mapping=self.offsets, return_overflowing_tokens=False)
        out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if with_types:
            out["token_type_ids"] = encoded["token_type_ids"]
        if self.offsets:
            out["offset_mapping"] = encoded["offset_mapping"]
        out["truncated"] = truncation_flags(tokenizer, texts, pairs, encoded["input_ids"], self.max_length)
        return out


# ---- using a tokenized dataset -------------------------------------------------------------------------

@dataclass
class TokenizedSource:
    """A tokenized input dataset as embed / classify see it."""

    path: str
    info: dict  # the manifest's `tokenized` entry

    @property
    def columns(self) -> list[str]:
        """The columns a job reads instead of the text (offsets are not needed to run a model)."""
        return [c for c in ("input_ids", "token_type_ids", "truncated") if c in self.info["columns"]]

    def check(self, job: str, model_dir, max_length: int | None, text_column: str,
              text_pair_column: str | None = None, trust_remote_code: bool = False) -> None:
        """Refuse (exit 2, one line) ids that this model and these options would not have made."""
        wanted = expected_tokenization(model_dir, max_length, trust_remote_code)
        info, fix = self.info, (f"re-run `hfbatch tokenize` with this model and options, or give {job} the "
                                f"untokenized dataset")
        if info.get("tokenizer_fingerprint") != wanted["tokenizer_fingerprint"]:
            raise InputError(f"{self.path} was tokenized with another tokenizer ({info.get('model')}, tokenizer "
                             f"{info.get('tokenizer_fingerprint')}) than {model_dir}'s "
                             f"({wanted['tokenizer_fingerprint']}); {fix}")
        if info.get("max_length") != wanted["max_length"]:
            raise InputError(f"{self.path} was tokenized with max_length {info.get('max_length')}, this {job} "
                             f"uses {wanted['max_length']}; {fix}")
        for option, ours, theirs in (("--text-column", text_column, info.get("text_column")),
                                     ("--text-pair-column", text_pair_column, info.get("text_pair_column"))):
            if ours != theirs:
                raise InputError(f"{self.path} was tokenized from {option} {theirs!r}, not {ours!r}; {fix}")

    @staticmethod
    def take(rows: dict, todo: list[int] | None = None):
        """The `Tokenized` of the batch `rows` (a dataset slice as a dict), or of its rows `todo`."""
        from .batching import Tokenized

        pick = (lambda values: values) if todo is None else (lambda values: [values[r] for r in todo])
        types = rows.get("token_type_ids")
        return Tokenized(pick(rows["input_ids"]), None if types is None else pick(types),
                         sum(pick(rows["truncated"])))


def tokenized_source(path, manifest: dict, dataset) -> TokenizedSource | None:
    """The tokenized view of an input dataset, or None when it holds text only."""
    info = (manifest or {}).get("tokenized")
    if not info:
        return None
    if not isinstance(info, dict):
        raise InputError(f"{path}/manifest.json: its `tokenized` entry is {info!r}, not what `hfbatch tokenize` "
                         f"writes; re-run `hfbatch tokenize` with --force")
    missing = [c for c in ("input_ids", "truncated") if c not in dataset.column_names]
    if missing:
        raise InputError(f"{path}: its manifest says it is tokenized, but it has no column "
                         f"{', '.join(missing)}; re-run `hfbatch tokenize`")
    return TokenizedSource(str(path), info)


def open_tokens(job: str, path, manifest: dict, dataset, model_dir, max_length: int | None, text_column: str,
                text_pair_column: str | None = None, trust_remote_code: bool = False):
    """`(dataset, tokens)` for a job's input: a text dataset comes back as it is with tokens None; a
    tokenized one is checked against the job's model and options (refused on any difference) and narrowed to
    the columns the job reads, so its rows' offsets are never converted to Python."""
    from . import log

    tokens = tokenized_source(path, manifest, dataset)
    if tokens is None:
        return dataset, None
    tokens.check(job, model_dir, max_length, text_column, text_pair_column, trust_remote_code)
    log.event(job, "using_tokens", dataset=path, max_length=tokens.info["max_length"],
              tokenizer=tokens.info["tokenizer_fingerprint"])
    keep = ["id", text_column] + ([text_pair_column] if text_pair_column else []) + tokens.columns
    return dataset.select_columns([c for c in dict.fromkeys(keep) if c in dataset.column_names]), tokens


def tokenize(dataset, output, *, model=None, text_column="text", text_pair_column=None, max_length=None,
             offsets=False, num_proc=1, shard_rows=50_000, trust_remote_code=False, force=False, executor="local",
             ray_address=None, num_workers=None, gpus_per_worker=None, max_retries=None) -> dict:
    """The tokenize job (`hfbatch tokenize`): DATASET's rows plus their token ids, at OUTPUT. Takes the
    command's options (`executor` "local" or "ray", with the Ray executor's options) and returns the summary
    that --json prints."""
    import functools
    import os

    from .batching import warn_truncated
    from .executor import run_job_shards
    from .models import model_fingerprint, resolve_model_dir
    from .ray_executor import executor_for
    from .runner import Job

    executor = executor_for(executor, "cpu", None, ray_address, num_workers, gpus_per_worker, max_retries)
    model_dir = resolve_model_dir(model)
    # num_proc changes speed, not results: left out of the config, like embed's --batch-tokens
    config = {"model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir),
              "text_column": text_column, "text_pair_column": text_pair_column, "max_length": max_length,
              "offsets": offsets, "shard_rows": shard_rows}

    with Job("tokenize", output, config=config, datasets=[dataset], force=force, reads=[model_dir]) as job:
        if job.up_to_date:
            return job.summary()
        import datasets

        from .io import open_dataset, require_text_column

        source, _ = open_dataset(dataset)
        require_text_column(source, text_column, dataset)
        if text_pair_column:
            require_text_column(source, text_pair_column, dataset, option="--text-pair-column")
        taken = [c for c in source.column_names if c in TOKEN_COLUMNS]
        if taken:
            raise InputError(f"{dataset} already has column(s) {', '.join(taken)} (is it tokenized already?); "
                             f"tokenize the dataset that `hfbatch ingest` made")
        if num_proc > 1:
            # Workers must not start the tokenizer's own thread pool (a forked pool deadlocks), and N
            # processes each running a pool would only oversubscribe the cores.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        wanted = expected_tokenization(model_dir, max_length, trust_remote_code)
        tokenizer = cached_tokenizer(model_dir, trust_remote_code)
        features = datasets.Features({**source.features, **token_features(tokenizer, offsets)})
        function = TokenizeBatch(model_dir, wanted["max_length"], text_column, text_pair_column, offsets,
                                 trust_remote_code)
        plan = TokenizePlan(str(dataset), str(job.shards.shard_dir), job.fingerprint, function, features,
                            shard_rows, num_proc)
        n_shards, done = run_job_shards(job, len(source), shard_rows, functools.partial(TokenizeShards, plan),
                                        executor=executor, device="cpu", inputs=[dataset])
        info = {"model": str(model_dir), "model_fingerprint": config["model_fingerprint"],
                "tokenizer_fingerprint": wanted["tokenizer_fingerprint"], "max_length": wanted["max_length"],
                "text_column": text_column, "text_pair_column": text_pair_column,
                "columns": list(token_features(tokenizer, offsets))}
        job.publish_dataset(n_shards, features, reuse_shards=True, extra={
            "source_dataset": str(job.inputs[0]["path"]), "tokenized": info, **done.info})  # (Ray: its workers)
        warn_truncated(job, wanted["max_length"])
        return job.summary()


@dataclass(frozen=True)
class TokenizePlan:
    """What a tokenize worker needs, by value (it is sent to Ray actors): the dataset and the shard directory
    by path, the job's fingerprint (map's cache fingerprints), the batch function and the output's features."""

    dataset: str
    shard_dir: str
    fingerprint: str
    function: TokenizeBatch
    features: object
    shard_rows: int
    num_proc: int


class TokenizeShards:
    """The tokenize job's work for hfbatch.executor: shard i's rows through `Dataset.map` (its cache file in the
    shard directory), streamed into the shard. Made from a TokenizePlan in whichever process runs it."""

    info: dict = {}

    def __init__(self, plan: TokenizePlan, device=None):
        from .io import open_dataset
        from .runner import ShardDir

        self.source, _ = open_dataset(plan.dataset)
        self.shards = ShardDir(Path(plan.shard_dir))
        self.function, self.features, self.fingerprint = plan.function, plan.features, plan.fingerprint
        self.shard_rows, self.num_proc = plan.shard_rows, plan.num_proc

    def prepare(self, i):
        return None  # map runs its own workers: nothing to do a shard ahead

    def compute(self, i, prepared, on_rows, parts):
        from .executor import Stream

        shards = self.shards
        part = self.source.select(range(i * self.shard_rows, min((i + 1) * self.shard_rows, len(self.source))))
        mapped = part.map(self.function, batched=True, batch_size=1000, features=self.features,
                          num_proc=self.num_proc if self.num_proc > 1 and len(part) > 1 else None,
                          cache_file_name=str(shards.shard_file(i, ".map.arrow")), load_from_cache_file=False,
                          new_fingerprint=f"{self.fingerprint}-{i:05d}", desc="tokenize")
        # (map adds no column to no rows: an empty part is written in the output's schema)
        table = mapped.data.table if len(part) else self.features.arrow_schema.empty_table()
        truncated = int(table.column("truncated").to_numpy(zero_copy_only=False).sum())

        def counts():  # once the shard is written: map's own files go (one per worker)
            for leftover in shards.shard_dir.glob(f"{i:05d}.map*.arrow"):
                leftover.unlink()
            on_rows(table.num_rows)
            return {"truncated": truncated}
        return Stream(table.schema, table.to_batches(max_chunksize=10_000)), counts
