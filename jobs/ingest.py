"""hfbatch ingest: files of any common format -> one memory-mapped Arrow dataset with stable ids."""

from __future__ import annotations

import os
from pathlib import Path

import click

from hfbatch import log
from hfbatch.cli import force_option, json_summary, output_option, text_column_option
from hfbatch.errors import InputError, JobFailed
from hfbatch.runner import Job

FORMAT_CHOICES = ["auto", "csv", "tsv", "json", "jsonl", "parquet", "text"]


def parse_max_rejects(value: str) -> tuple[str, float]:
    """'100' (rows), '0.01' or '1%' (fraction of rows read)."""
    text = value.strip()
    try:
        if text.endswith("%"):
            return "fraction", float(text[:-1]) / 100
        number = float(text)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a row count (100) or a fraction (0.01 or 1%)")
    return ("fraction", number) if number < 1 else ("count", number)


@click.command()
@click.argument("sources", nargs=-1, required=True)
@output_option
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="auto", show_default=True,
              help="Input format; auto reads it from the extension (.gz/.bz2/.xz/.zst allowed).")
@click.option("--id-column", default=None,
              help="Column holding a unique row id. Default: the column `id` if present, else "
                   "SOURCE:ROW (file name and 1-based row/line number).")
@text_column_option
@click.option("--field", "json_field", default=None, help="JSON: the key of the list of records.")
@click.option("--max-rejects", default="1%", show_default=True,
              help="Fail when more rows than this are rejected: a count (100) or a fraction (0.01, 1%).")
@force_option
@json_summary("ingest")
def ingest(sources, output, fmt, id_column, text_column, json_field, max_rejects, force):
    """Read SOURCES (files, globs, directories) into an Arrow dataset at OUTPUT.

    Rows that cannot be used (malformed lines, wrong field counts, undecodable bytes, missing or empty
    text, duplicate ids) go to OUTPUT/rejects.jsonl with their source and row number.

    \b
    Example:
        hfbatch ingest 'corpus/*.jsonl.gz' -o out/dataset --text-column text
    """
    from hfbatch.io import expand_sources, read_source

    limit_kind, limit = parse_max_rejects(max_rejects)
    paths = expand_sources(list(sources))
    base = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    names = [p.resolve().relative_to(base).as_posix() for p in paths]
    config = {"format": fmt, "id_column": id_column, "text_column": text_column, "field": json_field,
              "max_rejects": max_rejects}

    with Job("ingest", output, config=config, files=paths, force=force) as job:
        if job.up_to_date:  # decided from manifests and file stats: no dataset library needed
            return job.summary()
        import datasets
        import pyarrow as pa

        schema = _output_schema(read_source(paths[0], fmt, json_field), paths[0], id_column, text_column)
        seen_ids = _ids_of_finished_shards(job, len(paths))
        progress = log.Progress("ingest", None)
        for index in job.pending(len(paths)):
            path, name = paths[index], names[index]
            table_parts, rejects, rows_read = [], [], 0
            for block in read_source(path, fmt, json_field):
                rejects += block.rejects
                rows_read += block.table.num_rows + len(block.rejects)
                if block.table.num_rows:
                    kept, dropped = _conform(block.table, schema, path, name, id_column, text_column, seen_ids)
                    table_parts.append(kept)
                    rejects += dropped
                progress.update(block.table.num_rows + len(block.rejects))
            good = sum(t.num_rows for t in table_parts)
            if good == 0 and rejects:
                raise InputError(f"{path}: no row could be read (first problem, row {rejects[0]['row']}: "
                                 f"{rejects[0]['reason']}); is it really {fmt if fmt != 'auto' else 'that format'}?")
            table = pa.concat_tables(table_parts) if table_parts else schema.empty_table()
            job.write_shard(index, table, rejects, rows_read=rows_read)
            log.event("ingest", "source_done", source=name, rows=good, rejects=len(rejects))
        progress.close()

        records = job.shard_records(len(paths))
        rows_read = sum(r["rows_read"] for r in records)
        n_rejects = sum(r["rejects"] for r in records)
        allowed = limit if limit_kind == "count" else limit * rows_read
        if n_rejects > allowed:
            raise JobFailed(f"{n_rejects} of {rows_read} rows were rejected, more than --max-rejects "
                            f"{max_rejects}; the reasons are in {job.shard_dir}/*.rejects.jsonl "
                            f"(raise --max-rejects to accept them)")
        features = datasets.Features.from_arrow_schema(schema)
        per_source = {names[i]: {"rows": r["rows"], "rejects": r["rejects"]} for i, r in enumerate(records)}
        job.publish_dataset(len(paths), features, extra={"sources": per_source, "text_column": text_column})
        return job.summary()


def _output_schema(blocks, path, id_column, text_column):
    """The output's columns: the first block's, plus `id` first (sources must agree on them)."""
    import pyarrow as pa

    first = next((b.table for b in blocks if b.table.num_rows), None)
    if first is None:
        raise InputError(f"{path}: no row could be read")
    columns = [c for c in first.column_names if c != "__row"]
    if text_column not in columns:
        raise InputError(f"{path}: no column {text_column!r}; available: {', '.join(columns)} "
                         f"(choose one with --text-column)")
    if id_column is not None and id_column not in columns:
        raise InputError(f"{path}: no column {id_column!r} for --id-column; available: {', '.join(columns)}")
    id_source = id_column or ("id" if "id" in columns else None)
    id_type = first.schema.field(id_source).type if id_source else pa.string()
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        id_type = pa.string()
    fields = [pa.field("id", pa.int64() if pa.types.is_integer(id_type) else pa.string())]
    fields += [first.schema.field(c) for c in columns if c != "id"]
    fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in fields]
    return pa.schema(fields)


def _conform(table, schema, path, name, id_column, text_column, seen_ids):
    """Ids, text checks and the shared schema for one block: (kept rows, rejects)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = table.column("__row").to_pylist()
    if id_column or "id" in table.column_names:
        ids = table.column(id_column or "id").to_pylist()
    else:
        ids = [f"{name}:{r}" for r in rows]
    texts = table.column(text_column).to_pylist() if text_column in table.column_names else [None] * len(rows)
    keep, rejects = [], []
    for i, (row, row_id, text) in enumerate(zip(rows, ids, texts)):
        reason = None
        if row_id is None:
            reason = f"missing id in column {id_column or 'id'!r}"
        elif not isinstance(text, str):
            reason = f"missing text in column {text_column!r}" if text is None else \
                f"text column {text_column!r} is not a string"
        elif not text.strip():
            reason = f"empty text in column {text_column!r}"
        elif row_id in seen_ids:
            reason = f"duplicate id {row_id!r}"
        if reason:
            rejects.append({"source": str(path), "row": row, "reason": reason,
                            "raw": str(table.slice(i, 1).to_pylist()[0])[:200]})
        else:
            seen_ids.add(row_id)
            keep.append(i)
    table = table.take(pa.array(keep, pa.int64()))
    ids = [ids[i] for i in keep]
    columns = []
    for field in schema:
        if field.name == "id":
            try:
                columns.append(pa.array(ids, field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                columns.append(pa.array([str(i) for i in ids], pa.string()))
        elif field.name in table.column_names:
            try:
                columns.append(pc.cast(table.column(field.name), field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InputError(f"{path}: column {field.name!r} does not match the type in the first source "
                                 f"({field.type}): {exc}")
        else:
            columns.append(pa.nulls(len(keep), field.type))
    return pa.Table.from_arrays(columns, schema=schema), rejects


def _ids_of_finished_shards(job, n_shards) -> set:
    """On resume, ids from finished sources still count for duplicate detection."""
    import datasets

    seen = set()
    for i in range(n_shards):
        if job.is_done(i):
            seen.update(datasets.Dataset.from_file(str(job.shard_file(i)))["id"])
    return seen
