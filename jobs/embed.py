"""hfbatch embed: a dataset's text -> an `id` + `embedding` dataset, with the model's own pooling."""

from __future__ import annotations

import click

from hfbatch import log
from hfbatch.batching import prefetch
from hfbatch.cli import (
    batching_options,
    device_options,
    force_option,
    json_summary,
    model_option,
    output_option,
    text_column_option,
    trust_remote_code_option,
)
from hfbatch.embedding import TextEmbedder, embeddings_features, embeddings_table
from hfbatch.hashing import HASH_FILE, SCHEME, read_hash_file, text_hashes, write_hash_file
from hfbatch.runner import Job


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@output_option
@model_option
@text_column_option
@device_options
@batching_options
@trust_remote_code_option
@force_option
@click.option("--incremental", is_flag=True,
              help="OUTPUT exists from an older DATASET: reuse the vectors of rows whose id and text are "
                   "unchanged, compute new or changed rows, drop deleted ones.")
@click.option("--num-shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the rows into this many slices (one per machine or cron host) ...")
@click.option("--shard-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="... and embed only this slice; `hfbatch merge` joins the slices' outputs.")
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=None, metavar="N",
              help="Split each text into windows of at most N tokens (on token boundaries) and embed every "
                   "window as its own row: long texts are covered whole instead of truncated.")
@click.option("--chunk-overlap", type=click.IntRange(min=0), default=None, metavar="M",
              help="Tokens shared by consecutive windows (below N; default 0).")
@json_summary("embed")
def embed(dataset, output, model, text_column, device, precision, backend, max_length, batch_tokens,
          shard_rows, trust_remote_code, force, incremental, num_shards, shard_index, chunk_tokens, chunk_overlap):
    """Embed the TEXT_COLUMN of DATASET (an `hfbatch ingest` or `hfbatch tokenize` output) into OUTPUT.

    A tokenized DATASET's token ids are used as they are (no tokenizing here); it is refused when this model's
    tokenizer or max_length differ from the ones that made it.

    OUTPUT has columns `id` and `embedding` (float32, L2-normalised when the model's
    sentence-transformers config says so), in DATASET's row order.

    With --chunk-tokens, OUTPUT has one row per window instead: `id` ("<doc id>#<chunk>"), `doc_id`,
    `chunk`, `char_start`, `char_end` (the window's span of the text) and `embedding`; `hfbatch search`
    then returns documents (their best window).

    \b
    Example:
        hfbatch embed out/dataset -o out/embeddings --precision fp32
        hfbatch embed out/dataset -o out/chunks --chunk-tokens 128 --chunk-overlap 32
    """
    from hfbatch.io import open_dataset, require_column
    from hfbatch.models import model_fingerprint, resolve_model_dir
    from hfbatch.tokenized import open_tokens

    if shard_index >= num_shards:
        raise click.BadParameter(f"{shard_index} is not below --num-shards {num_shards}", param_hint="--shard-index")
    chunking = chunking_config(chunk_tokens, chunk_overlap, incremental)
    model_dir = resolve_model_dir(model)
    config = {"model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir),
              "text_column": text_column, "device": device, "precision": precision, "backend": backend,
              "max_length": max_length, "shard_rows": shard_rows}
    if num_shards > 1:
        config.update(num_shards=num_shards, shard_index=shard_index)
    if chunking:
        config.update(chunking)  # only when chunking: unchunked outputs keep their old config
    # batch_tokens changes speed, not results: it is left out of the config so it can be tuned on resume.

    with Job("embed", output, config=config, datasets=[dataset], force=force, incremental=incremental) as job:
        if job.up_to_date:  # decided from manifests alone: a no-op re-run never imports torch
            return job.summary()
        source, source_manifest = open_dataset(dataset)
        require_column(source, text_column, dataset)
        source, tokens = open_tokens("embed", dataset, source_manifest, source, model_dir, max_length, text_column,
                                     trust_remote_code=trust_remote_code)  # tokens: None for a text dataset
        total_rows = len(source)
        start, stop = slice_bounds(total_rows, num_shards, shard_index)
        if num_shards > 1:
            source = source.select(range(start, stop))
        n_shards = max(1, -(-len(source) // shard_rows))
        if chunking:  # refuse a window the model cannot take before loading its weights
            from hfbatch.chunking import check_chunk_options, model_content_limit

            check_chunk_options(chunk_tokens, chunking["chunk_overlap"],
                                model_content_limit(model_dir, max_length, trust_remote_code))
        embedder = TextEmbedder(model_dir, backend=backend, device=device, precision=precision,
                                max_length=max_length, batch_tokens=batch_tokens,
                                trust_remote_code=trust_remote_code)
        extra = {"source_dataset": str(job.inputs[0]["path"]), "text_column": text_column,
                 "model": str(model_dir), "dim": embedder.dim, "max_length": embedder.max_length,
                 "slice": {"index": shard_index, "count": num_shards, "start": start, "stop": stop},
                 **embedder.settings}
        if chunking:
            return embed_chunks(job, source, embedder, text_column, shard_rows, n_shards, chunking, extra)
        pending = job.pending(n_shards)
        progress = log.Progress("embed", sum(_shard_len(len(source), shard_rows, i) for i in pending))

        previous = PreviousVectors(job.output) if job.previous else None
        scheme = previous.scheme if previous else SCHEME  # compare hashes of the same kind
        given = given_hashes(dataset, text_column, scheme, total_rows, start, stop)

        def work_of(i):
            """(ids, hashes, rows to compute, their tokens) of shard i; the rest is reused from `previous`."""
            rows = source[i * shard_rows:(i + 1) * shard_rows]
            hashes = given[i * shard_rows:(i + 1) * shard_rows] if given is not None \
                else text_hashes(rows[text_column], scheme)
            todo = list(range(len(hashes))) if previous is None else \
                [r for r, (row_id, h) in enumerate(zip(rows["id"], hashes)) if not previous.has(row_id, h)]
            if tokens is not None:  # a `hfbatch tokenize` output: its ids, checked to be this model's
                return rows["id"], hashes, todo, tokens.take(rows, todo)
            return rows["id"], hashes, todo, embedder.tokenize([rows[text_column][r] for r in todo])

        for i, (ids, hashes, todo, tokenized) in prefetch(work_of, pending):  # next shard tokenizes meanwhile
            computed = embedder.run(tokenized, on_batch=progress.update)
            if previous is None:
                vectors = computed
            else:
                vectors = previous.vectors_for(ids)  # reused rows; the computed ones are filled in below
                vectors[todo] = computed
                progress.update(len(ids) - len(todo))
            job.write_shard(i, embeddings_table(ids, vectors, embedder.dim, hashes),
                            truncated=tokenized.truncated, computed=len(todo), reused=len(ids) - len(todo))
        progress.close()
        features = embeddings_features(source.features["id"], embedder.dim)
        job.publish_dataset(n_shards, features, fill=_write_hashes(scheme), extra=extra)
        truncated = job.manifest["counts"].get("truncated", 0)
        if truncated:
            log.warn("embed", "truncated", rows=truncated, max_length=embedder.max_length,
                     hint="raise --max-length if the model allows it")
        return job.summary()


def chunking_config(chunk_tokens, chunk_overlap, incremental) -> dict:
    """The chunk options as config entries ({} without --chunk-tokens); combinations that make no sense are
    refused here, before anything is loaded."""
    from hfbatch.chunking import check_chunk_options
    from hfbatch.errors import InputError

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


def embed_chunks(job, source, embedder, text_column, shard_rows, n_shards, chunking, extra):
    """The --chunk-tokens path: each shard of documents becomes a shard of window rows (see hfbatch.chunking)."""
    from hfbatch.chunking import chunk_features, chunk_texts, chunks_table

    features = chunk_features(source.features["id"], embedder.dim)
    pending = job.pending(n_shards)
    progress = log.Progress("embed", sum(_shard_len(len(source), shard_rows, i) for i in pending))

    def work_of(i):
        rows = source[i * shard_rows:(i + 1) * shard_rows]
        return rows["id"], chunk_texts(embedder.tokenizer, rows[text_column], chunking["chunk_tokens"],
                                       chunking["chunk_overlap"])

    for i, (ids, chunks) in prefetch(work_of, pending):  # the next shard is cut into windows meanwhile
        vectors = embedder.run(chunks.tokenized)
        split = sum(c == 1 for c in chunks.chunk)  # documents with a second window
        job.write_shard(i, chunks_table(ids, chunks, vectors, features), documents=len(ids), chunks=len(chunks),
                        split_documents=split)
        progress.update(len(ids))
    progress.close()
    # the shards are the output rows in its schema: they become its data files without another copy
    manifest = job.publish_dataset(n_shards, features, extra={**extra, "chunking": chunking}, reuse_shards=True)
    counts = manifest["counts"]
    log.event("embed", "chunked", documents=counts.get("documents", 0), chunks=counts.get("chunks", 0),
              split_documents=counts.get("split_documents", 0))
    return job.summary()


def slice_bounds(total, num_shards, shard_index):
    """Rows [start, stop) of slice `shard_index`: contiguous, so merged slices keep the dataset's order."""
    return total * shard_index // num_shards, total * (shard_index + 1) // num_shards


def _shard_len(total, shard_rows, i):
    return max(0, min(shard_rows, total - i * shard_rows))


def given_hashes(dataset, text_column, scheme, total, start, stop):
    """The content hashes of rows start..stop that `ingest` stored with DATASET, when they are of this
    scheme and column (then no text is hashed here); else None."""
    stored = read_hash_file(dataset, with_ids=False)
    if stored is None or stored.scheme != scheme or stored.text_column != text_column:
        return None
    if len(stored.hashes) != total:
        return None
    return stored.hashes[start:stop]


def _write_hashes(scheme):
    def fill(tmp, joined):
        """The published dataset keeps the contract (`id`, `embedding`); the shards' text hashes go to a
        Parquet side file for the next --incremental run."""
        table = joined.data.table
        write_hash_file(tmp, table.column("id"), table.column("text_hash").to_numpy(), scheme=scheme)
    return fill


class PreviousVectors:
    """The output being updated by --incremental: id -> (row, text hash), vectors memory-mapped."""

    def __init__(self, path):
        import datasets
        import numpy as np

        from hfbatch.errors import InputError

        stored = read_hash_file(path)
        if stored is None:
            raise InputError(f"{path} has no {HASH_FILE} (made by an older hfbatch): --incremental needs it; "
                             f"recompute once with --force")
        self.scheme = stored.scheme
        self.rows = {row_id: (row, h) for row, (row_id, h) in
                     enumerate(zip(stored.ids.to_pylist(), stored.hashes.tolist()))}
        column = datasets.load_from_disk(str(path)).data.table.column("embedding")
        self.dim = column.type.list_size
        self.vectors = np.asarray(column.combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                  dtype=np.float32).reshape(-1, self.dim)

    def has(self, row_id, text_hash) -> bool:
        found = self.rows.get(row_id)
        return found is not None and found[1] == text_hash

    def vectors_for(self, ids):
        import numpy as np

        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        for r, row_id in enumerate(ids):
            if row_id in self.rows:
                out[r] = self.vectors[self.rows[row_id][0]]
        return out
