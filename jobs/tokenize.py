"""hfbatch tokenize: a dataset's text -> the same rows plus their token ids, for embed / classify to reuse."""

from __future__ import annotations

import os

import click

from hfbatch import log
from hfbatch.batching import warn_truncated
from hfbatch.cli import (
    force_option,
    json_summary,
    max_length_option,
    model_option,
    output_option,
    text_column_option,
    trust_remote_code_option,
)
from hfbatch.errors import InputError
from hfbatch.runner import Job


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@output_option
@model_option
@text_column_option
@click.option("--text-pair-column", default=None,
              help="Column holding the second text of sentence pairs (for classify --text-pair-column).")
@max_length_option
@click.option("--offsets", is_flag=True, help="Also store offset_mapping (character span of every token).")
@click.option("--num-proc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes for Dataset.map (each tokenizes one part of every shard).")
@click.option("--shard-rows", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Rows per resumable shard: a killed run redoes at most one shard.")
@trust_remote_code_option
@force_option
@json_summary("tokenize")
def tokenize(dataset, output, model, text_column, text_pair_column, max_length, offsets, num_proc, shard_rows,
             trust_remote_code, force):
    """Tokenize the TEXT_COLUMN of DATASET (an `hfbatch ingest` output) into OUTPUT.

    OUTPUT keeps DATASET's rows and columns and adds `input_ids`, `attention_mask`, `token_type_ids` (when the
    tokenizer makes them), `truncated` and, with --offsets, `offset_mapping`. `hfbatch embed` and
    `hfbatch classify` given OUTPUT use these ids instead of tokenizing, and refuse them when their model's
    tokenizer or max_length differ.

    \b
    Example:
        hfbatch tokenize out/dataset -o out/tokens --num-proc 2
        hfbatch embed out/tokens -o out/embeddings
    """
    from hfbatch.models import model_fingerprint, resolve_model_dir

    model_dir = resolve_model_dir(model)
    # num_proc changes speed, not results: left out of the config, like embed's --batch-tokens
    config = {"model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir),
              "text_column": text_column, "text_pair_column": text_pair_column, "max_length": max_length,
              "offsets": offsets, "shard_rows": shard_rows}

    with Job("tokenize", output, config=config, datasets=[dataset], force=force) as job:
        if job.up_to_date:
            return job.summary()
        import datasets

        from hfbatch.io import open_dataset, require_text_column
        from hfbatch.tokenized import TokenizeBatch, cached_tokenizer, expected_tokenization, token_features

        source, _ = open_dataset(dataset)
        require_text_column(source, text_column, dataset)
        if text_pair_column:
            require_text_column(source, text_pair_column, dataset, option="--text-pair-column")
        taken = [c for c in source.column_names if c in ("input_ids", "attention_mask", "token_type_ids",
                                                          "offset_mapping", "truncated")]
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
        n_shards, pending, pending_rows = job.plan_rows(len(source), shard_rows)
        progress = log.Progress("tokenize", pending_rows)
        for i in pending:
            part = source.select(range(i * shard_rows, min((i + 1) * shard_rows, len(source))))
            cache = job.shard_file(i, ".map.arrow")
            mapped = part.map(function, batched=True, batch_size=1000, features=features,
                              num_proc=num_proc if num_proc > 1 and len(part) > 1 else None,
                              cache_file_name=str(cache), load_from_cache_file=False,
                              new_fingerprint=f"{job.fingerprint}-{i:05d}", desc="tokenize")
            # (map adds no column to no rows: an empty part is written in the output's schema)
            table = mapped.data.table if len(part) else features.arrow_schema.empty_table()
            rows = job.write_shard_stream(i, table.schema, table.to_batches(max_chunksize=10_000))
            truncated = int(table.column("truncated").to_numpy(zero_copy_only=False).sum())
            job.finish_shard(i, rows, truncated=truncated)
            del mapped, table
            for leftover in job.shard_dir.glob(f"{i:05d}.map*.arrow"):  # map's own files (one per worker)
                leftover.unlink()
            progress.update(rows)
        progress.close()
        info = {"model": str(model_dir), "model_fingerprint": config["model_fingerprint"],
                "tokenizer_fingerprint": wanted["tokenizer_fingerprint"], "max_length": wanted["max_length"],
                "text_column": text_column, "text_pair_column": text_pair_column,
                "columns": list(token_features(tokenizer, offsets))}
        job.publish_dataset(n_shards, features, reuse_shards=True, extra={
            "source_dataset": str(job.inputs[0]["path"]), "tokenized": info})
        warn_truncated(job, wanted["max_length"])
        return job.summary()
