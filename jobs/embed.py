"""hfbatch embed: a dataset's text -> an `id` + `embedding` dataset, with the model's own pooling."""

from __future__ import annotations

import click

from hfbatch import log
from hfbatch.batching import DEFAULT_BATCH_TOKENS, prefetch
from hfbatch.cli import (device_options, force_option, json_summary, model_option, output_option,
                         text_column_option, trust_remote_code_option)
from hfbatch.embedding import TextEmbedder, embeddings_features, embeddings_table
from hfbatch.runner import Job


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@output_option
@model_option
@text_column_option
@device_options
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Tokens per text (default: the model's own limit); longer texts are cut and counted.")
@click.option("--batch-tokens", type=click.IntRange(min=16), default=DEFAULT_BATCH_TOKENS, show_default=True,
              help="Tokens per batch, padding included (rows are sorted by length first).")
@click.option("--shard-rows", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Rows per resumable shard: a killed run redoes at most one shard.")
@trust_remote_code_option
@force_option
@json_summary("embed")
def embed(dataset, output, model, text_column, device, precision, backend, max_length, batch_tokens,
          shard_rows, trust_remote_code, force):
    """Embed the TEXT_COLUMN of DATASET (an `hfbatch ingest` output) into OUTPUT.

    OUTPUT has columns `id` and `embedding` (float32, L2-normalised when the model's
    sentence-transformers config says so), in DATASET's row order.

    \b
    Example:
        hfbatch embed out/dataset -o out/embeddings --precision fp32
    """
    from hfbatch.io import open_dataset, require_column
    from hfbatch.models import model_fingerprint, resolve_model_dir

    model_dir = resolve_model_dir(model)
    config = {"model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir),
              "text_column": text_column, "device": device, "precision": precision, "backend": backend,
              "max_length": max_length, "shard_rows": shard_rows}
    # batch_tokens changes speed, not results: it is left out of the config so it can be tuned on resume.

    with Job("embed", output, config=config, datasets=[dataset], force=force) as job:
        if job.up_to_date:  # decided from manifests alone: a no-op re-run never imports torch
            return job.summary()
        source, _ = open_dataset(dataset)
        require_column(source, text_column, dataset)
        n_shards = max(1, -(-len(source) // shard_rows))
        embedder = TextEmbedder(model_dir, backend=backend, device=device, precision=precision,
                                max_length=max_length, batch_tokens=batch_tokens,
                                trust_remote_code=trust_remote_code)
        pending = job.pending(n_shards)
        progress = log.Progress("embed", sum(_shard_len(len(source), shard_rows, i) for i in pending))

        def tokenize_shard(i):
            return embedder.tokenize(source[i * shard_rows:(i + 1) * shard_rows][text_column])

        for i, tokenized in prefetch(tokenize_shard, pending):  # the next shard tokenizes meanwhile
            vectors = embedder.run(tokenized, on_batch=progress.update)
            ids = source[i * shard_rows:(i + 1) * shard_rows]["id"]
            job.write_shard(i, embeddings_table(ids, vectors, embedder.dim), truncated=tokenized.truncated)
        progress.close()
        job.publish_dataset(n_shards, embeddings_features(source.features["id"], embedder.dim), extra={
            "source_dataset": str(job.inputs[0]["path"]), "text_column": text_column,
            "model": str(model_dir), "dim": embedder.dim, "max_length": embedder.max_length,
            **embedder.settings})
        truncated = job.manifest["counts"].get("truncated", 0)
        if truncated:
            log.warn("embed", "truncated", rows=truncated, max_length=embedder.max_length,
                     hint="raise --max-length if the model allows it")
        return job.summary()


def _shard_len(total, shard_rows, i):
    return max(0, min(shard_rows, total - i * shard_rows))
