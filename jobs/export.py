"""hfbatch export: an hfbatch dataset -> one JSON Lines, CSV/TSV or Parquet file, written atomically.
The work is hfbatch.exporting.export."""

from __future__ import annotations

import click

from hfbatch.cli import columns_option, force_option, json_summary


@click.command()
@click.argument("dataset", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="File to write, atomically. An existing file is replaced only if an earlier export "
                   "wrote it (or with --force).")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "csv", "tsv", "parquet"]), default="auto",
              show_default=True, help="auto = from the extension (.jsonl/.json, .csv, .tsv, .parquet; "
                                      ".gz/.bz2/.xz/.zst compress it).")
@columns_option("Export only these columns.")
@force_option("Replace OUTPUT even if it is a file that hfbatch export did not write.")
@json_summary("export")
def export(dataset, output, fmt, columns, force):
    """Write the hfbatch dataset DATASET to one file, OUTPUT: JSON Lines, CSV/TSV or Parquet.

    Rows keep their order and ids, so `hfbatch ingest` of the exported file gives the same dataset.

    \b
    Example:
        hfbatch export out/dataset -o corpus.jsonl.gz
        hfbatch export out/dataset -o corpus.parquet --columns id,text
    """
    from hfbatch.exporting import export as run_export

    return run_export(dataset, output, fmt=fmt, columns=columns, force=force)
