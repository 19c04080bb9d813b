"""Texts in, vectors out, and the embed job.

`EncoderRun` (tokenizer + encoder + token-budget batching) is shared by embed, search and classify. `embed` is
the job behind `hfbatch embed`: its shards (`EmbedShards`, run by hfbatch.executor.run_shards), row slices
for --num-shards, chunking, and the reuse of an older output's vectors with --incremental
(`PreviousVectors`, the text hash side file).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from . import log
from .batch_tuning import TUNE_MIN_ROWS, parse_batch_tokens
from .batching import DEFAULT_BATCH_TOKENS, warn_truncated
from .errors import InputError
from .hashing import HASH_FILE, SCHEME, read_hash_file, text_hashes, write_hash_file
from .runner import Job


class EncoderRun:
    """An encoder model run over token batches: tokenizer + encoder + token-budget batching. Texts in,
    embeddings out (embed, search), or with task="classify" the model's logits ([rows, num_labels]).
    """

    def __init__(self, model_dir, *, task="embed", backend="auto", device="auto", precision="auto",
                 max_length=None, batch_tokens="auto", trust_remote_code=False, tune=True):
        from .model_files import ConfigFile, TokenizerFile
        from .models import effective_max_length, load_tokenization, make_encoder

        model_dir = Path(model_dir)  # callers pass str or Path; the model-file readers join paths onto it
        # tokenizer.json and config.json read without transformers where they can be (the same ids), so
        # the OpenVINO path never imports torch
        tokenizer = TokenizerFile.load(model_dir, trust_remote_code)
        config = ConfigFile.load(model_dir, trust_remote_code)
        if tokenizer is not None and config is not None:
            self.tokenizer, self.max_length = tokenizer, effective_max_length(model_dir, tokenizer, config, max_length)
        else:
            self.tokenizer, config, self.max_length = load_tokenization(model_dir, max_length, trust_remote_code)
        self.config = config
        self.encoder, self.settings = make_encoder(model_dir, task=task, backend=backend, device=device,
                                                   precision=precision, trust_remote_code=trust_remote_code)
        self.batch_tokens = self._batch_tokens(batch_tokens, tune)
        self.pad_multiple = self._pad_multiple(batch_tokens, tune)
        self.settings["batch_tokens"] = self.batch_tokens
        self.settings["pad_multiple"] = self.pad_multiple
        self.dim = config.num_labels if task == "classify" else config.hidden_size

    def _batch_tokens(self, requested, tune: bool) -> int:
        """The budget given, or with "auto" the one measured for OpenVINO's graph on this CPU (remembered in
        its cache: hfbatch.batch_tuning; measured now only with `tune`, else the default until a job has) and
        the default elsewhere (torch, CUDA)."""
        from .batch_tuning import probe_rows, tuned_batch_tokens
        from .batching import run_batches

        budget = parse_batch_tokens(requested)
        if budget != "auto":
            return budget
        engine, vocab_size = self._tunable()
        if engine is None:
            return DEFAULT_BATCH_TOKENS
        rows = functools.cache(lambda: probe_rows(vocab_size, self.max_length))  # made only if it measures
        return tuned_batch_tokens(engine, lambda b: run_batches(self.encoder, rows(), self._pad_id, b),
                                  measure_now=tune)

    def _pad_multiple(self, requested, tune: bool) -> int:
        """The multiple of tokens each batch is padded to: the one remembered for OpenVINO's graph on this
        CPU (hfbatch.batch_tuning), measured now with `--batch-tokens auto` and `tune`, else 1 (torch, CUDA)."""
        from .batch_tuning import pad_probe_batches, pad_probe_length, tuned_pad_multiple
        from .batching import pad, padded_width

        engine, vocab_size = self._tunable()
        if engine is None:
            return 1
        length = pad_probe_length(self.max_length)
        # (made only if it measures)
        probe = functools.cache(lambda: pad_probe_batches(vocab_size, length, self.batch_tokens, engine.streams))

        def run_with(multiple):
            tokenized, batches = probe()
            width = functools.partial(padded_width, multiple=multiple, max_width=self.max_length)
            list(self.encoder.map(pad(tokenized, rows, self._pad_id, width) for rows in batches))

        measure = tune and parse_batch_tokens(requested) == "auto" and length is not None
        return tuned_pad_multiple(engine, run_with, measure_now=measure)

    def _tunable(self):
        """(OpenVINO engine, vocabulary size) where batching can be measured on this CPU, else (None, None):
        torch and CUDA, or a config without a vocabulary to make probe ids from."""
        engine = getattr(self.encoder, "engine", None)
        vocab_size = getattr(self.config, "vocab_size", None)
        if engine is None or not isinstance(vocab_size, int) or vocab_size < 2:
            return None, None
        return engine, vocab_size

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def tokenize(self, texts, pairs=None):
        """Unpadded ids; `pairs` (second texts) make BERT-style pairs with their token_type_ids."""
        from .batching import tokenize

        return tokenize(self.tokenizer, list(texts), self.max_length, None if pairs is None else list(pairs))

    def run(self, tokenized, on_batch=None, parts=None):
        """Model outputs of `tokenized`, in its order; `parts` (hfbatch.parts.ShardParts) keeps a shard's
        progress across kills."""
        import numpy as np

        from .batching import run_batches

        if len(tokenized) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return run_batches(self.encoder, tokenized, self._pad_id, self.batch_tokens, on_batch, parts,
                           self.pad_multiple, self.max_length)

    def __call__(self, texts):
        return self.run(self.tokenize(texts))


@dataclass(frozen=True)
class ModelRun:
    """The options of a job that runs a model over a dataset's shards (embed, classify): picklable, so
    --devices worker processes get them and build the same EncoderRun on their own device."""

    dataset: str
    text_column: str
    model_dir: str
    device: str
    precision: str
    backend: str
    max_length: int | None
    batch_tokens: int | str  # "auto": hfbatch.batch_tuning
    trust_remote_code: bool
    shard_rows: int

    def encoder_run(self, task: str = "embed", device: str | None = None, rows: int | None = None) -> EncoderRun:
        """The model on `device` (default: the job's --device), for `rows` rows: fewer than
        `TUNE_MIN_ROWS` use a remembered --batch-tokens auto budget but do not measure one."""
        from pathlib import Path

        return EncoderRun(Path(self.model_dir), task=task, backend=self.backend, device=device or self.device,
                            precision=self.precision, max_length=self.max_length, batch_tokens=self.batch_tokens,
                            trust_remote_code=self.trust_remote_code, tune=rows is None or rows >= TUNE_MIN_ROWS)


def embeddings_features(id_feature: dict, dim):
    """The output's features in `to_dict()` form (saved with pyarrow alone: see Publisher.assemble_dataset)."""
    from .dataset import list_feature, value_feature

    return {"id": id_feature, "embedding": list_feature(value_feature("float32"), dim)}


def embeddings_table(ids, vectors, dim, text_hashes=None):
    """`ids`: an Arrow column (the source's, as the jobs pass it) or a list."""
    import numpy as np
    import pyarrow as pa

    from .dataset import arrow_array, arrow_column

    flat = arrow_array(vectors.astype("float32", copy=False))
    columns = {"id": arrow_column(ids), "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
    if text_hashes is not None:
        columns["text_hash"] = arrow_array(np.asarray(text_hashes, dtype=np.int64))
    return pa.table(columns)


ST_CONFIG = "config_sentence_transformers.json"
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")  # sentence-transformers' similarity_fn_name values


def read_similarity(model_dir) -> str:
    """The similarity function the model's sentence-transformers config names (`similarity_fn_name`), or
    "cosine", sentence-transformers' own default, where the config has none."""
    import json
    from pathlib import Path

    path = Path(model_dir) / ST_CONFIG
    if not path.is_file():
        return "cosine"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})")
    name = config.get("similarity_fn_name") if isinstance(config, dict) else None
    name = {"dot_product": "dot"}.get(name, name)
    if name is not None and name not in SIMILARITIES:
        raise InputError(f"{path}: similarity_fn_name {name!r} is not one of {', '.join(SIMILARITIES)}")
    return name or "cosine"


def embed(dataset, output, *, model=None, text_column="text", device="auto", devices=None, precision="auto",
          backend="auto", max_length=None, batch_tokens="auto", shard_rows=10_000,
          trust_remote_code=False, force=False, incremental=False, num_shards=1, shard_index=0, chunk_tokens=None,
          chunk_overlap=None, executor="local", ray_address=None, num_workers=None, gpus_per_worker=None,
          max_retries=None) -> dict:
    """The embed job (`hfbatch embed`): DATASET's text column -> OUTPUT's `id` + `embedding` dataset. Takes
    the command's options (`devices` a list such as ["cuda:0", "cuda:1"]; `executor` "local" or "ray", with
    the Ray executor's options) and returns the summary that --json prints."""
    from .devices import check_devices, devices_kind
    from .executor import run_job_shards
    from .io import open_arrow_dataset, require_text_column
    from .models import model_fingerprint, resolve_model_dir
    from .ray_executor import executor_for

    executor = executor_for(executor, device, devices, ray_address, num_workers, gpus_per_worker,
                            max_retries)  # None: this machine
    if shard_index >= num_shards:
        raise InputError(f"--shard-index: {shard_index} is not below --num-shards {num_shards}")
    batch_tokens = parse_batch_tokens(batch_tokens)
    chunking = chunking_config(chunk_tokens, chunk_overlap, incremental)
    model_dir = resolve_model_dir(model)
    similarity = read_similarity(model_dir)  # a broken config is refused before any work
    config = {"model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir),
              "text_column": text_column, "device": device, "precision": precision, "backend": backend,
              "max_length": max_length, "shard_rows": shard_rows}
    if devices:
        check_devices(devices, device)
        config["devices"] = devices_kind(devices)  # only when given: single-device outputs keep their config
    if num_shards > 1:
        config.update(num_shards=num_shards, shard_index=shard_index)
    if chunking:
        config.update(chunking)  # only when chunking: unchunked outputs keep their old config
    # batch_tokens changes speed, not results: it is left out of the config so it can be tuned on resume.

    with Job("embed", output, config=config, datasets=[dataset], force=force, incremental=incremental,
             reads=[model_dir]) as job:
        if job.up_to_date:  # decided from manifests alone: a no-op re-run never imports torch
            return job.summary()
        source, _ = open_arrow_dataset(dataset)
        require_text_column(source, text_column, dataset)
        start, stop = slice_bounds(len(source), num_shards, shard_index)
        plan = EmbedPlan(dataset=str(dataset), text_column=text_column, model_dir=str(model_dir), device=device,
                         precision=precision, backend=backend, max_length=max_length, batch_tokens=batch_tokens,
                         trust_remote_code=trust_remote_code, shard_rows=shard_rows, num_shards=num_shards,
                         shard_index=shard_index, chunking=chunking,
                         previous_output=str(job.output) if job.previous else None)
        n_shards, done = run_job_shards(job, stop - start, shard_rows, functools.partial(EmbedShards, plan), devices,
                                        executor=executor, device=device, inputs=[dataset])
        info = done.info
        extra = {"source_dataset": str(job.inputs[0]["path"]), "text_column": text_column,
                 "model": str(model_dir), **info,
                 # how `hfbatch index` compares these vectors (pooling.normalize says whether they are unit-length)
                 "similarity": similarity}
        if chunking:
            from .chunking import chunk_features

            # the shards are the output rows in its schema: they become its data files without another copy
            manifest = job.publish_dataset(n_shards, chunk_features(source.features["id"], info["dim"]),
                                           extra={**extra, "chunking": chunking}, reuse_shards=True)
            counts = manifest["counts"]
            log.event("embed", "chunked", documents=counts.get("documents", 0), chunks=counts.get("chunks", 0),
                      split_documents=counts.get("split_documents", 0))
            return {**job.summary(), **done.summary()}
        assembly = job.publisher.assemble_dataset(n_shards, embeddings_features(source.features["id"], info["dim"]))
        _write_hashes(assembly, info["hash_scheme"])
        job.publish(assembly, extra={k: v for k, v in extra.items() if k != "hash_scheme"})
        warn_truncated(job, info["max_length"])
        return {**job.summary(), **done.summary()}


@dataclass(frozen=True)
class EmbedPlan(ModelRun):
    """An embed run's options, for each process computing its shards."""

    num_shards: int
    shard_index: int
    chunking: dict  # {} without --chunk-tokens
    previous_output: str | None  # the output that --incremental updates


class EmbedShards:
    """One process's embed work (see hfbatch.executor): the dataset slice, the model on `device`, and with
    --incremental the vectors being reused."""

    def __init__(self, plan: EmbedPlan, device: str | None = None):
        from pathlib import Path

        from .io import open_arrow_dataset
        from .tokenized import open_tokens

        self.plan = plan
        model_dir = Path(plan.model_dir)
        source, source_manifest = open_arrow_dataset(plan.dataset)  # its text column was checked by the command
        source, self.tokens = open_tokens("embed", plan.dataset, source_manifest, source, model_dir, plan.max_length,
                                          plan.text_column, trust_remote_code=plan.trust_remote_code)  # None: text
        total_rows = len(source)
        start, stop = slice_bounds(total_rows, plan.num_shards, plan.shard_index)
        self.source = source.select(range(start, stop)) if plan.num_shards > 1 else source
        if plan.chunking:  # refuse a window the model cannot take before loading its weights
            from .chunking import check_chunk_options, model_content_limit

            check_chunk_options(plan.chunking["chunk_tokens"], plan.chunking["chunk_overlap"],
                                model_content_limit(model_dir, plan.max_length, plan.trust_remote_code))
        self.encoder = plan.encoder_run("embed", device, rows=stop - start)
        if plan.chunking:
            from .chunking import chunk_features

            self.chunk_features = chunk_features(self.source.features["id"], self.encoder.dim)
        self.previous = PreviousVectors(plan.previous_output) if plan.previous_output else None
        self.scheme = self.previous.scheme if self.previous else SCHEME  # compare hashes of the same kind
        self.given = None if plan.chunking else \
            given_hashes(plan.dataset, plan.text_column, self.scheme, total_rows, start, stop)
        self.info = {"dim": self.encoder.dim, "max_length": self.encoder.max_length,
                     "slice": {"index": plan.shard_index, "count": plan.num_shards, "start": start, "stop": stop},
                     **self.encoder.settings}
        if not plan.chunking:
            self.info["hash_scheme"] = self.scheme

    def _rows(self, i):
        rows_per_shard = self.plan.shard_rows
        return self.source[i * rows_per_shard:(i + 1) * rows_per_shard]

    def prepare(self, i):
        """Shard i's ids and tokens; without chunking also its text hashes and the rows to compute (the rest
        is reused from the output being updated)."""
        import numpy as np

        rows, column = self._rows(i), self.plan.text_column
        if self.plan.chunking:
            from .chunking import chunk_texts

            return rows["id"], chunk_texts(self.encoder.tokenizer, rows[column], self.plan.chunking["chunk_tokens"],
                                           self.plan.chunking["chunk_overlap"])
        lo = i * self.plan.shard_rows
        hashes = self.given[lo:lo + len(rows["id"])] if self.given is not None \
            else text_hashes(rows[column], self.scheme)
        old_rows = None if self.previous is None else self.previous.reusable(rows["id"], hashes)
        todo = list(range(len(hashes))) if old_rows is None else np.flatnonzero(old_rows < 0).tolist()
        if self.tokens is not None:  # a `hfbatch tokenize` output: its ids, checked to be this model's
            tokenized = self.tokens.take(rows, todo)
        else:
            tokenized = self.encoder.tokenize([rows[column][r] for r in todo])
        return self.source.data.column("id").slice(lo, len(hashes)), hashes, old_rows, todo, tokenized

    def compute(self, i, prepared, on_rows, parts=None):
        if self.plan.chunking:
            from .chunking import chunks_table

            ids, chunks = prepared
            vectors = self.encoder.run(chunks.tokenized, parts=parts)
            on_rows(len(ids))
            split = sum(c == 1 for c in chunks.chunk)  # documents with a second window
            return chunks_table(ids, chunks, vectors, self.chunk_features), {
                "documents": len(ids), "chunks": len(chunks), "split_documents": split}
        ids, hashes, old_rows, todo, tokenized = prepared
        computed = self.encoder.run(tokenized, on_batch=on_rows, parts=parts)
        if old_rows is None:
            vectors = computed
        else:
            vectors = self.previous.vectors(old_rows)  # reused rows; the computed ones are filled in below
            vectors[todo] = computed
            on_rows(len(ids) - len(todo))
        return embeddings_table(ids, vectors, self.encoder.dim, hashes), {
            "truncated": tokenized.truncated, "computed": len(todo), "reused": len(ids) - len(todo)}


def chunking_config(chunk_tokens, chunk_overlap, incremental) -> dict:
    """The chunk options as config entries ({} without --chunk-tokens); combinations that make no sense are
    refused here, before anything is loaded."""
    from .chunking import check_chunk_options

    if chunk_tokens is None:
        if chunk_overlap is not None:
            raise InputError("--chunk-overlap needs --chunk-tokens")
        return {}
    if incremental:
        raise InputError("--incremental cannot update a chunked output (--chunk-tokens); "
                         "recompute it with --force instead")
    chunk_overlap = chunk_overlap or 0
    check_chunk_options(chunk_tokens, chunk_overlap)
    return {"chunk_tokens": chunk_tokens, "chunk_overlap": chunk_overlap}


def slice_bounds(total, num_shards, shard_index):
    """Rows [start, stop) of slice `shard_index`: contiguous, so merged slices keep the dataset's order."""
    return total * shard_index // num_shards, total * (shard_index + 1) // num_shards


def given_hashes(dataset, text_column, scheme, total, start, stop):
    """The content hashes of rows start..stop that `ingest` stored with DATASET, when they are of this
    scheme and column (then no text is hashed here); else None."""
    stored = read_hash_file(dataset, with_ids=False)
    if stored is None or stored.scheme != scheme or stored.text_column != text_column:
        return None
    if len(stored.hashes) != total:
        return None
    return stored.hashes[start:stop]


def _write_hashes(assembly, scheme) -> None:
    """The published dataset keeps the contract (`id`, `embedding`); the shards' text hashes go to a Parquet
    side file for the next --incremental run."""
    import numpy as np

    from .dataset import numpy_array

    table = assembly.joined  # (no rows: joined from no shard, without the shards' text_hash)
    hashes = numpy_array(table.column("text_hash")) if "text_hash" in table.column_names else np.zeros(0, np.int64)
    write_hash_file(assembly.dir, table.column("id"), hashes, scheme=scheme)


class PreviousVectors:
    """The output being updated by --incremental: id -> its row and text hash (one hash table, built once),
    vectors taken from the memory-mapped output by row, so reusing 1M old vectors does not copy them all
    into memory (and each --devices worker maps the same pages)."""

    def __init__(self, path):
        import numpy as np
        import pandas as pd

        from .dataset import ArrowVectors
        from .io import read_saved_dataset

        stored = read_hash_file(path)
        if stored is None:
            raise InputError(f"{path} has no {HASH_FILE} (made by an older hfbatch): --incremental needs it; "
                             f"recompute once with --force")
        self.scheme = stored.scheme
        self.hashes = np.asarray(stored.hashes, dtype=np.int64)
        rows = pd.Series(np.arange(len(self.hashes)), index=stored.ids.to_pandas())
        self.rows = rows[~rows.index.duplicated(keep="last")]  # a repeated id: its last row, as a dict would
        read_saved_dataset(path, "the output --incremental updates", "embed")  # refused, in one line, if damaged
        # read by row from zero-copy views of the memory-mapped chunks (pyarrow's ChunkedArray.take would
        # first concatenate them: a copy of every old vector per call)
        self.reader = ArrowVectors(path)
        self.dim = self.reader.dim

    def reusable(self, ids, hashes):
        """For each row: the old output's row holding its vector when the id is there with the same text
        hash, else -1."""
        import numpy as np

        found = self.rows.index.get_indexer(ids)
        old = np.where(found >= 0, self.rows.to_numpy()[np.maximum(found, 0)], -1)
        same = (old >= 0) & (self.hashes[np.maximum(old, 0)] == np.asarray(hashes, dtype=np.int64))
        return np.where(same, old, -1)

    def vectors(self, old_rows):
        """[len(old_rows), dim] float32 from the old output; zeros where old_rows is -1."""
        import numpy as np

        out = np.zeros((len(old_rows), self.dim), dtype=np.float32)
        found = old_rows >= 0
        out[found] = self.reader.take(old_rows[found])
        return out
