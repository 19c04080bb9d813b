"""hfbatch evaluate: retrieval quality of an index on queries with known relevant ids."""

from __future__ import annotations

import time
from pathlib import Path

import click

from hfbatch import log
from hfbatch.cli import json_summary, model_option, query_device_options, trust_remote_code_option
from hfbatch.errors import InputError


@click.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--queries", "queries_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help='JSON Lines, one query per line: {"query": "...", "relevant": [id, ...]}.')
@click.option("-k", "k", type=click.IntRange(min=1), default=100, show_default=True,
              help="Hits retrieved per query (metrics with a larger cutoff are left out).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="Override the tuned nprobe (IVF).")
@click.option("--ef", type=click.IntRange(min=1), default=None, help="Override the tuned efSearch (HNSW).")
@model_option
@trust_remote_code_option
@query_device_options
@json_summary("evaluate")
def evaluate(index_dir, queries_file, k, nprobe, ef, model, trust_remote_code, device, precision):
    """Measure recall@1/10/100, MRR@10 and nDCG@10 (binary relevance) of INDEX_DIR on --queries.

    All queries are embedded and searched in one batch with the index's tuned search parameters. Ids are
    compared as text, so 15 and "15" match; they are the index's own (what was indexed, whatever happened to
    the embeddings since). The queries are embedded on --device in --precision, as `hfbatch search` does.
    Over an index of chunks (`embed --chunk-tokens`), documents are
    ranked by their best chunk and relevance is by document id. Prints a table, or with --json one JSON object.

    \b
    Example:
        hfbatch evaluate out/index --queries data/qrels.jsonl
    """
    from hfbatch import metrics
    from hfbatch.jobs.search import Searcher, read_query_records

    path = Path(queries_file)
    records = read_query_records(path)
    if not records:
        raise InputError(f"{path}: no queries")
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise InputError(f"{path}: evaluate needs JSON Lines with a `relevant` list per query")
    relevant = []
    for record in records:
        ids = record.get("relevant")
        if not isinstance(ids, list) or not ids:
            raise InputError(f"{path}:{record['line']}: expected a non-empty `relevant` list of ids")
        relevant.append({str(i) for i in ids})

    searcher = Searcher(index_dir, model=model, trust_remote_code=trust_remote_code, nprobe=nprobe, ef=ef,
                        device=device, precision=precision)
    started = time.monotonic()
    _, positions = searcher.search([r["query"] for r in records], k)
    search_s = time.monotonic() - started
    ranked = [[str(i) for i in searcher.rows.ids([p for p in row if p >= 0])] for row in positions]
    known = {str(i) for i in searcher.rows.all_ids()}
    unknown = sum(len(ids - known) for ids in relevant)
    if unknown:
        log.warn("evaluate", "unknown_relevant_ids", count=unknown,
                 hint="relevant ids that are not in the index count as misses")
    chosen = {name: spec for name, spec in metrics.STANDARD.items() if spec[1] <= k}
    scores = metrics.evaluate(zip(ranked, relevant), chosen)
    result = {"index": str(Path(index_dir)), "k": k, "unknown_relevant": unknown,
              "chunked": searcher.rows.chunked,  # ids ranked are documents, each at its best chunk
              "embed_and_search_s": round(search_s, 3),
              **{name: round(value, 4) if isinstance(value, float) else value for name, value in scores.items()}}
    if not click.get_current_context().params.get("as_json"):
        chunks = " (documents ranked by their best chunk)" if searcher.rows.chunked else ""
        click.echo(f"{index_dir}: {scores['queries']} queries, k={k}{chunks}")
        for name in chosen:
            click.echo(f"  {name:<11}{scores[name]:.4f}")
    return result
