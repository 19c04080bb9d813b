"""hfbatch merge: join the slices of a job run with --num-shards into one output, checking none is missing.
The work is hfbatch.merging.merge."""

from __future__ import annotations

import click

from hfbatch.cli import force_option, json_summary, output_option


@click.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@output_option
@force_option
@json_summary("merge")
def merge(parts, output, force):
    """Join PARTS (outputs of one job run with --num-shards N --shard-index 0..N-1) into OUTPUT.

    Every slice must be there exactly once, all made by the same job from the same inputs and options;
    rows keep the dataset's order.

    \b
    Example:
        hfbatch embed out/dataset -o out/emb-0 --num-shards 2 --shard-index 0   # on host A
        hfbatch embed out/dataset -o out/emb-1 --num-shards 2 --shard-index 1   # on host B
        hfbatch merge out/emb-0 out/emb-1 -o out/embeddings
    """
    from hfbatch.merging import merge as run_merge

    return run_merge(parts, output, force=force)
