"""hfbatch embed: a dataset's text -> an `id` + `embedding` dataset, with the model's own pooling.

The command declares the options and hands them to the library function `hfbatch.embedding.embed`, which is
the job (shards, slices, chunking, vector reuse, publishing).
"""

from __future__ import annotations

import click

from hfbatch.cli import (
    batching_options,
    dataset_command,
    device_options,
    executor_options,
    force_option,
    json_summary,
    model_option,
    text_column_option,
    trust_remote_code_option,
)
from hfbatch.embedding import embed as run_embed


@dataset_command
@model_option
@text_column_option
@device_options
@executor_options
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
def embed(dataset, output, model, text_column, device, devices, precision, backend, max_length, batch_tokens,
          shard_rows, trust_remote_code, force, incremental, num_shards, shard_index, chunk_tokens, chunk_overlap,
          **execution):
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
    return run_embed(dataset, output, model=model, text_column=text_column, device=device, devices=devices,
                     precision=precision, backend=backend, max_length=max_length, batch_tokens=batch_tokens,
                     shard_rows=shard_rows, trust_remote_code=trust_remote_code, force=force, incremental=incremental,
                     num_shards=num_shards, shard_index=shard_index, chunk_tokens=chunk_tokens,
                     chunk_overlap=chunk_overlap, **execution)
