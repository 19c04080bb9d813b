"""hfbatch search: queries -> ranked hits from an index, as JSON Lines on stdout or a dataset (-o).
The work is hfbatch.retrieval.search."""

from __future__ import annotations

import json

import click

from hfbatch.cli import (
    force_option,
    lexical_weight_option,
    mode_option,
    model_option,
    query_device_options,
    trust_remote_code_option,
)


def parse_filter(ctx, param, values):
    from hfbatch.retrieval import parse_filters

    return parse_filters(values)


@click.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", nargs=-1)
@click.option("--queries", "queries_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File of queries: JSON Lines with a `query` or `text` field (.jsonl), CSV with a `query` "
                   "column (.csv), else one query per line. All are searched in one batch.")
@click.option("--query-vectors", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE.npy",
              help="Query vectors instead of texts: a .npy file, one row per query (an index of vectors made "
                   "elsewhere has no model, so it takes only these). Hits name the query by its row number.")
@click.option("--query-ids", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="Names of the --query-vectors rows (as `hfbatch index --ids` takes them), for the hits' "
                   "`query`.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Hits per query.")
@click.option("--filter", "filters", multiple=True, callback=parse_filter, metavar="COLUMN=VALUE",
              help="Only rows of the source dataset whose COLUMN equals VALUE (repeatable: values of one column "
                   "are OR-ed, different columns AND-ed). Applied inside the index search, so k hits still come "
                   "back when at least k rows match.")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), default=None,
              help="Write the hits as a dataset (query_index, query, rank, id, score, text) with a manifest, "
                   "published atomically, instead of printing them.")
@click.option("--format", "out_format", type=click.Choice(["jsonl", "text"]), default="jsonl", show_default=True,
              help="jsonl: one object per hit (for tools); text: a ranked list for people.")
@click.option("--show-span", is_flag=True,
              help="Index over chunks (embed --chunk-tokens): add the best chunk's text (`span_text`) to each "
                   "hit. The text format always shows it.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="Override the tuned nprobe (IVF).")
@click.option("--ef", type=click.IntRange(min=1), default=None, help="Override the tuned efSearch (HNSW).")
@mode_option
@lexical_weight_option
@model_option
@trust_remote_code_option
@query_device_options
@force_option
def search(index_dir, queries, queries_file, query_vectors, query_ids, k, filters, output, out_format, show_span,
           nprobe, ef, mode, lexical_weight, model, trust_remote_code, device, precision, force):
    """Search INDEX_DIR (an `hfbatch index` output) for QUERIES.

    Prints one JSON object per hit: {"query", "rank", "id", "score", "text"}, or with -o writes them as a
    dataset. The queries are embedded with the index's own model unless --model is given, on --device in
    --precision (chosen here, not inherited from the embeddings: an index embedded on a GPU in fp16 is
    searched on a CPU host in fp32). In dense mode `score` is the model's similarity: cosine, dot product, or
    minus the euclidean distance, as the index manifest's `similarity` says.

    An index built with its lexical part (the default of `hfbatch index`) is searched in hybrid mode: the 100
    best rows by the model and the 100 best by BM25 are fused as (1 - w) * dense score + w * BM25 / the
    query's best BM25, w = --lexical-weight; a row one part did not return takes that part's lowest returned
    score (0 for BM25 when fewer rows share a term). Hits then also carry `dense_score` and `lexical_score`
    (null: not returned by that part). --mode lexical ranks by BM25 alone (no model needed), --mode dense by
    the model alone. Filters and chunked indexes work in every mode.

    Ids come from the index itself. `text` is looked up (by id) in the source dataset only while it is the
    version that was indexed; if it changed since, hits come without text and a warning says what to re-run.
    An index of vectors made elsewhere has no text: its hits have ids and scores.

    Over an index of chunks (`hfbatch embed --chunk-tokens`), hits are documents: `id` is the document's id,
    `score` its best chunk's, and `chunk` and `span` ([start, end) in characters of `text`) say which chunk.

    \b
    Example:
        hfbatch search out/index "python web framework" "3d game" -k 5
        hfbatch search out/index --queries q.jsonl --filter section=games -o out/hits
        hfbatch search out/vector-index --query-vectors queries.npy -k 10
        hfbatch search out/index "libxml2 bindings" --mode lexical
    """
    from hfbatch.retrieval import search as search_index

    hits = search_index(index_dir, queries, queries_file=queries_file, query_vectors=query_vectors,
                        query_ids=query_ids, k=k, filters=filters, output=output, show_span=show_span,
                        nprobe=nprobe, ef=ef, model=model, trust_remote_code=trust_remote_code, device=device,
                        precision=precision, force=force, mode=mode, lexical_weight=lexical_weight)
    if output is None:
        print_hits(hits, out_format)


def print_hits(hits, out_format):
    """jsonl: the hit dicts as they are; text: each query, then its hits ranked, with the best chunk's text."""
    if out_format == "jsonl":
        for hit in hits:
            click.echo(json.dumps(hit, ensure_ascii=False))
        return
    for query, query_hits in zip(hits.queries, hits.by_query):
        click.echo(f"\n{query}")
        for hit in query_hits:
            text, where = hit["text"], ""
            if "span" in hit:
                start, end = hit["span"]
                text, where = text and text[start:end], f"  #{hit['chunk']} [{start}:{end}]"
            snippet = " ".join((text or "").split())
            click.echo(f"  {hit['rank']:>2}. {hit['score']:.3f}  [{hit['id']}]{where}  {snippet[:100]}")
