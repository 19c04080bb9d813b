"""hfbatch ingest: files of any common format -> one memory-mapped Arrow dataset with stable ids.

The command declares the options and hands them to the library function `hfbatch.ingestion.ingest`, which is
the job (planning, reading, conforming, carrying over, publishing).
"""

from __future__ import annotations

import click

from hfbatch.cli import SizeType, force_option, json_summary, output_option, text_column_option
from hfbatch.ingestion import (
    BY_CHOICES,
    FORMAT_CHOICES,
    MIN_SHARD_SIZE,
    parse_columns,
    parse_rename,
)
from hfbatch.ingestion import ingest as run_ingest


@click.command()
@click.argument("sources", nargs=-1, required=True)
@output_option
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="auto", show_default=True,
              help="Input format; auto reads it from the extension (.gz/.bz2/.xz/.zst allowed).")
@click.option("--by", type=click.Choice(BY_CHOICES), default="line", show_default=True,
              help="Text: one document per line, or one per file (id = the file's name).")
@click.option("--field", "json_field", default=None,
              help="JSON: the key of the list of records (dotted for nested; default `data`).")
@text_column_option
@click.option("--id-column", default=None,
              help="Column holding a unique row id. Default: the column `id` if present, else "
                   "SOURCE:ROW (file name and 1-based line/record number).")
@click.option("--columns", "columns", multiple=True, metavar="A,B,...",
              help="Keep only these columns (after --rename); `id` and the text column are always kept.")
@click.option("--rename", "rename", multiple=True, metavar="OLD=NEW", help="Rename a column (repeatable).")
@click.option("--filter", "filter_text", default=None, metavar="EXPR",
              help='Keep rows where EXPR holds, e.g. \'len(text) >= 50 and section in ["games", "libs"]\'. '
                   "Comparisons, and/or/not, in [...], is None, + - * /, numbers and quoted strings; functions "
                   "len, lower, upper, strip, startswith, endswith, contains, matches (regex), col(\"odd name\"). "
                   "Parsed, never evaluated as Python.")
@click.option("--dedup", is_flag=True, help="Drop rows whose text is exactly that of an earlier row.")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Stop after N rows (kept ones).")
@click.option("--sample", type=click.IntRange(min=0), default=None,
              help="Keep a random sample of N rows (in their original order; the same for the same --seed).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --sample.")
@click.option("--max-rejects", default="1%", show_default=True,
              help="Fail when more rows than this are rejected: a count (100) or a fraction (0.01, 1%); 100% "
                   "accepts any number.")
@click.option("--streaming/--no-streaming", default=None,
              help="Read in blocks and write shards as they fill, so memory does not grow with the input. "
                   "On by default; --no-streaming parses each uncompressed file in one go (it holds several "
                   "times the file in memory, and was measured no faster).")
@click.option("--shard-size", type=SizeType(minimum=MIN_SHARD_SIZE), default="128MB", show_default=True,
              help="Size of the output's shard files, and of the byte ranges a big file is cut into (at least "
                   "1MB; MB = 10^6 bytes, MiB = 2^20).")
@force_option
@click.option("--incremental", is_flag=True,
              help="OUTPUT exists from other versions of SOURCES: carry the rows of unchanged files over "
                   "(not parsed again), parse new and changed files, drop files no longer given. The "
                   "result is that of a full run; with --dedup, --limit or --sample it is one.")
@json_summary("ingest")
def ingest(sources, output, fmt, by, json_field, text_column, id_column, columns, rename, filter_text, dedup,
           limit, sample, seed, max_rejects, streaming, shard_size, force, incremental):
    """Read SOURCES (files, globs, directories) into an Arrow dataset at OUTPUT.

    CSV, TSV, JSON, JSON Lines, Parquet and plain text, each possibly gzip/bz2/xz/zstd-compressed. Rows that
    cannot be used (malformed lines, wrong field counts, undecodable bytes, values of the wrong type,
    missing or empty text, missing or duplicate ids) go to OUTPUT/rejects.jsonl with their source, row
    number and reason; the job fails if there are more than --max-rejects of them.

    \b
    Example:
        hfbatch ingest 'corpus/*.jsonl.gz' -o out/dataset --text-column text
        hfbatch ingest docs.csv -o out/ds --filter 'len(text) >= 50' --dedup --sample 1000
    """
    return run_ingest(list(sources), output, fmt=fmt, by=by, json_field=json_field, text_column=text_column,
                      id_column=id_column, columns=parse_columns(columns), rename=parse_rename(rename),
                      filter=filter_text, dedup=dedup, limit=limit, sample=sample, seed=seed,
                      max_rejects=max_rejects, streaming=streaming, shard_size=shard_size, force=force,
                      incremental=incremental)
