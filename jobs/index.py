"""hfbatch index: an embeddings dataset, or vectors made elsewhere, -> a FAISS index directory, tuned to a
target recall. The work is hfbatch.indexing.make_index."""

from __future__ import annotations

import click

from hfbatch.cli import Number, SizeType, force_option, json_summary, output_option
from hfbatch.lexical import DEFAULT_LANGUAGE, LANGUAGES


@click.command()
@click.argument("embeddings", type=click.Path(exists=True))
@output_option
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "hnsw", "ivfpq", "lexical"]), default="auto",
              show_default=True, help="auto: exact Flat for small sets, IVF+PQ with re-ranking for large ones. "
                                      "lexical: only the lexical (BM25) part, over any dataset with `id` and "
                                      "text: no embeddings needed.")
@click.option("--factory", default=None, metavar="STRING",
              help="Any faiss.index_factory string (experts; overrides --kind), e.g. 'IVF1024,PQ96x4fs,RFlat'; "
                   "hfbatch's suffix ',RDisk' re-ranks the shortlist exactly from the vectors on disk.")
@click.option("--memory-budget", type=SizeType(), default=None, metavar="SIZE",
              help="Largest index to build, e.g. 4GB (10^9 bytes) or 4GiB (2^30) [default: 4GiB]. Its memory is "
                   "estimated before building; the best kind that fits is chosen (re-ranking from the vectors on "
                   "disk when a copy in memory does not fit), and none fitting is refused with the budget needed.")
@click.option("--shards", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="Build the index as N shards over row ranges (each trained on the same sample, buildable on "
                   "its own), merged into one: answers as a one-piece build does. Not for hnsw.")
@click.option("--target-recall", type=Number(0.01, 1.0), default=0.95, show_default=True,
              help="recall@10 against exact search that nprobe/efSearch are tuned to reach.")
@force_option
@click.option("--incremental", is_flag=True,
              help="OUTPUT exists from older EMBEDDINGS: remove the vectors of deleted or changed rows and add "
                   "new or changed ones in place (flat, ivf); other kinds, or a corpus that more than doubled "
                   "since the lists were trained, are rebuilt.")
@click.option("--vector-column", default=None, metavar="NAME",
              help="Vectors made elsewhere (Parquet, saved dataset): the column of vectors [default: embedding].")
@click.option("--id-column", default=None, metavar="NAME",
              help="Vectors made elsewhere (Parquet, saved dataset): the column of ids [default: id where the "
                   "table has one, else row numbers 0..n-1].")
@click.option("--ids", "ids_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A .npy input's ids: a text file with one id per line, or a .npy / .parquet of ids "
                   "[default: row numbers 0..n-1].")
@click.option("--metric", type=click.Choice(["cosine", "dot", "l2"]), default=None,
              help="Vectors made elsewhere: how they compare (no model says it) [default: cosine].")
@click.option("--lexical/--no-lexical", default=True, show_default=True,
              help="Also build the lexical (BM25) part over the rows' text, from the dataset the embeddings were "
                   "made from, for `search --mode hybrid|lexical`.")
@click.option("--language", type=click.Choice(LANGUAGES), default=DEFAULT_LANGUAGE, show_default=True,
              help="The lexical part's stop words and stemmer (Snowball); none: lowercase words only.")
@click.option("--text-column", default=None, metavar="NAME",
              help="--kind lexical over a dataset: its column of text [default: text].")
@json_summary("index")
def index(embeddings, output, kind, factory, memory_budget, shards, target_recall, force, incremental,
          vector_column, id_column, ids_file, metric, lexical, language, text_column):
    """Build a FAISS index over EMBEDDINGS in OUTPUT, and beside it a lexical (BM25) one over their text.

    EMBEDDINGS is an `hfbatch embed` output, or vectors made elsewhere: a Parquet file or directory of Parquet
    files, or a `datasets` save_to_disk directory, with a column of vectors (--vector-column) and of ids
    (--id-column); or a .npy file (2-D float16/32/64) with its ids in --ids. Their model is unknown, so the
    index records none: search it with --query-vectors. Input files are recorded by sha256: a re-run on
    unchanged files does nothing, a changed file needs --force or --incremental.

    Approximate indexes are tuned after the build: recall@10 is measured against exact search on 1,000 of the
    rows, each left out of its own results (on hnsw: moved a little away from itself), so that they behave as
    new queries from the same corpus would; the fastest nprobe/efSearch/shortlist whose recall less two
    standard errors reaches --target-recall is kept. The manifest records the factory string, build time,
    search parameters, recall and QPS (`hfbatch info` shows them).

    The lexical part (tantivy, memory-mapped when searched) indexes the text of each row (over chunks, the
    chunk's text) from the source dataset, while it is the version that was embedded; it is built anew on
    every run, --incremental too, within an eighth of --memory-budget. With --kind lexical, EMBEDDINGS may
    be any dataset (e.g. an `hfbatch ingest` output): only the lexical part is built.

    \b
    Example:
        hfbatch index out/embeddings -o out/index --memory-budget 4GB
        hfbatch index out/embeddings -o out/index --incremental   # after re-embedding a changed corpus
        hfbatch index vectors.parquet -o out/index --vector-column vec --metric dot
        hfbatch index vectors.npy --ids ids.txt -o out/index
        hfbatch index out/dataset -o out/lexical-index --kind lexical --language german
        hfbatch index vectors.npy -o out/index --factory 'IVF2048,PQ96x4fs,RDisk' --shards 4
    """
    from hfbatch.indexing import make_index

    return make_index(embeddings, output, kind=kind, factory=factory, memory_budget=memory_budget,
                      target_recall=target_recall, force=force, incremental=incremental, vector_column=vector_column,
                      id_column=id_column, ids=ids_file, metric=metric, lexical=lexical, language=language,
                      text_column=text_column, shards=shards)
