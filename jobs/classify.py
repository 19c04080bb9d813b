"""hfbatch classify: a dataset's text -> `id`, `label`, `score` (and the top K), with a classification model.

The command declares the options and hands them to the library function `hfbatch.classification.classify`, which
is the job (shards, probabilities, labels, publishing).
"""

from __future__ import annotations

import click

from hfbatch.classification import classify as run_classify
from hfbatch.cli import (
    batching_options,
    dataset_command,
    device_options,
    executor_options,
    force_option,
    json_summary,
    text_column_option,
    trust_remote_code_option,
)


@dataset_command
@click.option("--model", "model", required=True, metavar="DIR",
              help="Local sequence-classification model directory (e.g. made by `hfbatch train`).")
@text_column_option
@click.option("--text-pair-column", default=None,
              help="Column holding the second text of sentence pairs (NLI, paraphrase, reranking).")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Also write the K best labels and their scores (list columns top_labels, top_scores).")
@click.option("--multi-label", is_flag=True,
              help="Independent sigmoid scores per label instead of a softmax (the default when the model's "
                   "config says problem_type=multi_label_classification).")
@device_options
@executor_options
@batching_options
@trust_remote_code_option
@force_option
@json_summary("classify")
def classify(dataset, output, model, text_column, text_pair_column, top_k, multi_label, device, devices,
             precision, backend, max_length, batch_tokens, shard_rows, trust_remote_code, force, **execution):
    """Classify the TEXT_COLUMN of DATASET (an `hfbatch ingest` or `hfbatch tokenize` output) into OUTPUT.

    OUTPUT has columns `id`, `label` (from the model's id2label) and `score` (softmax probability, or
    sigmoid with --multi-label), in DATASET's row order; with --top-k also `top_labels` and `top_scores`.

    \b
    Example:
        hfbatch classify out/dataset -o out/labels --model out/section-model --top-k 3
    """
    return run_classify(dataset, output, model=model, text_column=text_column, text_pair_column=text_pair_column,
                        top_k=top_k, multi_label=multi_label, device=device, devices=devices, precision=precision,
                        backend=backend, max_length=max_length, batch_tokens=batch_tokens, shard_rows=shard_rows,
                        trust_remote_code=trust_remote_code, force=force, **execution)
