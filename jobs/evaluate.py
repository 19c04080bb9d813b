"""hfbatch evaluate: retrieval quality of an index on queries with known relevant ids.
The work is hfbatch.retrieval.evaluate."""

from __future__ import annotations

import click

from hfbatch.cli import (
    json_summary,
    lexical_weight_option,
    mode_option,
    model_option,
    query_device_options,
    trust_remote_code_option,
)


def split_modes(ctx, param, value):
    return [name.strip() for name in value.split(",") if name.strip()] if value else None


@click.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--queries", "queries_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help='JSON Lines, one query per line: {"query": "...", "relevant": [id, ...]}.')
@click.option("--query-vectors", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE.npy",
              help='Query vectors (a .npy file, one row per query): each --queries line\'s `query` is then the '
                   'row number of its vector, {"query": 0, "relevant": [...]}. For indexes of vectors made '
                   'elsewhere (no model).')
@click.option("-k", "k", type=click.IntRange(min=1), default=100, show_default=True,
              help="Hits retrieved per query (metrics with a larger cutoff are left out).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="Override the tuned nprobe (IVF).")
@click.option("--ef", type=click.IntRange(min=1), default=None, help="Override the tuned efSearch (HNSW).")
@mode_option
@click.option("--modes", default=None, metavar="LIST", callback=split_modes,
              help="Comma-separated modes to compare, e.g. dense,lexical,hybrid: one row each (queries embedded "
                   "once).")
@lexical_weight_option
@model_option
@trust_remote_code_option
@query_device_options
@json_summary("evaluate")
def evaluate(index_dir, queries_file, query_vectors, k, nprobe, ef, mode, modes, lexical_weight, model,
             trust_remote_code, device, precision):
    """Measure recall@1/10/100, MRR@10 and nDCG@10 (binary relevance) of INDEX_DIR on --queries.

    All queries are embedded and searched in one batch with the index's tuned search parameters. Ids are
    compared as text, so 15 and "15" match; they are the index's own (what was indexed, whatever happened to
    the embeddings since). The queries are embedded on --device in --precision, as `hfbatch search` does.
    Over an index of chunks (`embed --chunk-tokens`), documents are
    ranked by their best chunk and relevance is by document id. An index with both parts is evaluated in
    hybrid mode unless --mode says otherwise (see `hfbatch search`); --modes prints one row per mode. Prints a
    table, or with --json one JSON object (with --modes, one summary per mode under "modes").

    \b
    Example:
        hfbatch evaluate out/index --queries data/qrels.jsonl
        hfbatch evaluate out/vector-index --query-vectors q.npy --queries qrels.jsonl
        hfbatch evaluate out/index --queries data/qrels.jsonl --modes dense,lexical,hybrid
    """
    from hfbatch import metrics
    from hfbatch.retrieval import evaluate as evaluate_index

    result = evaluate_index(index_dir, queries_file, query_vectors=query_vectors, k=k, nprobe=nprobe, ef=ef,
                            model=model, trust_remote_code=trust_remote_code, device=device, precision=precision,
                            mode=mode, modes=modes, lexical_weight=lexical_weight)
    if not click.get_current_context().params.get("as_json"):
        chunks = " (documents ranked by their best chunk)" if result["chunked"] else ""
        click.echo(f"{index_dir}: {result['queries']} queries, k={k}{chunks}")
        if "modes" in result:
            names = [name for name in metrics.STANDARD if name in result["modes"][0]]
            click.echo(f"  {'mode':<9}" + "".join(f"{name:>11}" for name in names))
            for row in result["modes"]:
                click.echo(f"  {row['mode']:<9}" + "".join(f"{row[name]:>11.4f}" for name in names))
        else:
            click.echo(f"  mode       {result['mode']}")
            for name in metrics.STANDARD:
                if name in result:
                    click.echo(f"  {name:<11}{result[name]:.4f}")
    return result

