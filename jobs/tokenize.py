"""hfbatch tokenize: a dataset's text -> the same rows plus their token ids, for embed / classify to reuse.

The command declares the options and hands them to the library function `hfbatch.tokenized.tokenize`, which
is the job.
"""

from __future__ import annotations

import click

from hfbatch.cli import (
    dataset_command,
    executor_options,
    force_option,
    json_summary,
    max_length_option,
    model_option,
    text_column_option,
    trust_remote_code_option,
)
from hfbatch.tokenized import tokenize as run_tokenize


@dataset_command
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
@executor_options
@json_summary("tokenize")
def tokenize(dataset, output, model, text_column, text_pair_column, max_length, offsets, num_proc, shard_rows,
             trust_remote_code, force, **execution):
    """Tokenize the TEXT_COLUMN of DATASET (an `hfbatch ingest` output) into OUTPUT.

    OUTPUT keeps DATASET's rows and columns and adds `input_ids`, `attention_mask`, `token_type_ids` (when the
    tokenizer makes them), `truncated` and, with --offsets, `offset_mapping`. `hfbatch embed` and
    `hfbatch classify` given OUTPUT use these ids instead of tokenizing, and refuse them when their model's
    tokenizer or max_length differ.

    \b
    Example:
        hfbatch tokenize out/dataset -o out/tokens --num-proc 2
        hfbatch embed out/tokens -o out/embeddings
        hfbatch tokenize out/dataset -o out/tokens --executor ray --num-workers 4
    """
    return run_tokenize(dataset, output, model=model, text_column=text_column, text_pair_column=text_pair_column,
                        max_length=max_length, offsets=offsets, num_proc=num_proc, shard_rows=shard_rows,
                        trust_remote_code=trust_remote_code, force=force, **execution)
