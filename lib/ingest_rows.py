"""How `hfbatch ingest` turns what it reads into output rows: units of work, the plan made before the first row
is read, and `conform` (rename, rejects, ids, filter, dedup, limit) applied to each block as it comes.

A unit is what one resumable shard reads: a file, a byte range of a big uncompressed JSON Lines or text file,
or a group of files with `--by file`. The readers of each format (hfbatch.io) give a unit's blocks; the
entry point and shard loop are in hfbatch.ingestion, the carry-over of unchanged files in hfbatch.ingest_carry.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hfbatch.batching import prefetch
from hfbatch.dataset import arrow_array, arrow_strings, numpy_array
from hfbatch.errors import InputError

# ---- units of work --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """What one shard reads: a file, bytes start..end of one, or (--by file) several files."""
    paths: tuple[Path, ...]
    names: tuple[str, ...]
    fmt: str
    start: int = 0
    end: int | None = None


def plan_units(paths, names, fmts, by_file: bool, streaming: bool, shard_bytes: int) -> list[Unit]:
    from hfbatch.io import split_compression, split_ranges

    units: list[Unit] = []
    if by_file:  # many small documents: group them, up to shard_bytes or 10,000 files a shard
        group, size = [], 0
        for path, name in zip(paths, names):
            if group and (size + path.stat().st_size > shard_bytes or len(group) >= 10_000):
                units.append(Unit(tuple(p for p, _ in group), tuple(n for _, n in group), "text"))
                group, size = [], 0
            group.append((path, name))
            size += path.stat().st_size
        if group:
            units.append(Unit(tuple(p for p, _ in group), tuple(n for _, n in group), "text"))
        return units
    for path, name, fmt in zip(paths, names, fmts):
        splittable = streaming and fmt in ("jsonl", "text") and split_compression(path)[1] is None
        if splittable and path.stat().st_size > shard_bytes:
            units += [Unit((path,), (name,), fmt, start, end) for start, end in split_ranges(path, shard_bytes)]
        else:
            units.append(Unit((path,), (name,), fmt))
    return units


# ---- ids and de-duplication -----------------------------------------------------------------------------

class SeenHashes:
    """A set of 64-bit hashes kept as sorted numpy runs (merged as they grow, like an LSM tree): 8 bytes a
    row, so checking 100 million ids or texts for repeats takes under 1 GB, and no Python loop."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def _seen(self, hashes: np.ndarray) -> np.ndarray:
        seen = np.zeros(len(hashes), bool)
        for run in self.runs:  # (never empty: add_new keeps no empty run)
            at = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            seen |= run[at] == hashes
        return seen

    def any_seen(self, hashes: np.ndarray) -> bool:
        return bool(self._seen(hashes).any())

    def add_new(self, hashes: np.ndarray) -> np.ndarray:
        """Adds the hashes; True where one is new (not seen before, nor earlier in `hashes`)."""
        order = np.argsort(hashes, kind="stable")  # stable: of equal hashes, the earliest row comes first
        ordered = hashes[order]
        first = np.ones(len(ordered), bool)
        first[1:] = ordered[1:] != ordered[:-1]
        first &= ~self._seen(ordered)
        fresh = np.empty(len(hashes), bool)
        fresh[order] = first
        if first.any():  # a block of nothing but repeats adds no run (an empty one has no last element)
            self.runs.append(ordered[first])
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            last = self.runs.pop()  # (a stable sort of two sorted runs is a linear merge)
            self.runs[-1] = np.sort(np.concatenate([self.runs[-1], last]), kind="stable")
        return fresh


def hash64(column) -> np.ndarray:
    """Integers are their own hash (exact); strings use Python's 64-bit hash (salted per process, which is
    fine: on resume the sets are rebuilt from the finished shards in the new process)."""
    import pyarrow as pa

    if pa.types.is_integer(column.type):
        return numpy_array(column).astype(np.int64, copy=False).view(np.uint64)
    return np.fromiter(map(hash, column.to_pylist()), np.int64, len(column)).view(np.uint64)


# ---- the plan: every decision made before the first row is read -----------------------------------------

@dataclass
class Plan:
    read_schema: object      # the columns to read, with their types, by their names in the sources
    rename: dict
    schema: object           # the output's: `id` first
    text_column: str
    id_source: str | None    # output column holding the ids, or None: SOURCE:ROW (SOURCE with --by file)
    filter: object = None
    dedup: bool = False
    limit: int | None = None
    by_file: bool = False
    as_strings: list = field(default_factory=list)  # output columns read as another text type: cast first


def make_plan(first: Path, fmt: str, json_field, text_column, id_column, columns, rename, filter_text,
              dedup, limit, by_file) -> Plan:
    import pyarrow as pa

    from hfbatch.expr import compile_filter
    from hfbatch.io import check_readable, sniff_schema

    if not by_file:
        check_readable(first, fmt)
    raw = sniff_schema(first, "text" if by_file else fmt, json_field)
    if raw is None or not raw.names:
        raise InputError(f"{first}: no row of the first block could be read as {fmt}; is it really {fmt}?")
    repeated = sorted({name for name in raw.names if raw.names.count(name) > 1})
    if repeated:
        raise InputError(f"{first}: more than one column is named {', '.join(map(repr, repeated))}; give each "
                         f"column its own name in the file")
    unknown = [old for old in rename if old not in raw.names]
    if unknown:
        raise InputError(f"--rename: no column {', '.join(map(repr, unknown))}; available: {', '.join(raw.names)}")
    # Text as polars and Arrow writers also store it (large_string, string_view, dictionary<string>) is read
    # as plain strings: the output's and the filter's type, and what datasets can save.
    text_like = {rename.get(f.name, f.name) for f in raw if _is_text_like(f.type) and f.type != pa.string()}
    renamed = pa.schema([f.with_name(rename.get(f.name, f.name)) for f in raw])
    renamed = pa.schema([f.with_type(pa.string()) if f.name in text_like else f for f in renamed])
    if len(set(renamed.names)) != len(renamed.names):
        raise InputError(f"--rename gives two columns the same name: {', '.join(renamed.names)}")
    available = ", ".join(renamed.names)
    if text_column not in renamed.names:
        raise InputError(f"{first}: no column {text_column!r}; available: {available} (choose one with --text-column)")
    if not pa.types.is_string(renamed.field(text_column).type):
        raise InputError(f"{first}: column {text_column!r} holds {renamed.field(text_column).type}, not text "
                         f"(choose another with --text-column)")
    if id_column is not None and id_column not in renamed.names:
        raise InputError(f"{first}: no column {id_column!r} for --id-column; available: {available}")
    if id_column not in (None, "id") and "id" in renamed.names:
        raise InputError(f"--id-column {id_column}: the sources also have a column 'id'; "
                         f"rename it (--rename id=other_name) or drop the option")
    id_source = None if by_file else (id_column or ("id" if "id" in renamed.names else None))
    if id_source is not None and id_source == text_column:
        raise InputError(f"--text-column {text_column}: that column holds the rows' ids; choose another text column, "
                         f"or rename it (--rename {text_column}=other_name)")
    missing = [c for c in columns or [] if c not in renamed.names]
    if missing:
        raise InputError(f"--columns: no column {', '.join(map(repr, missing))}; available: {available}")

    id_type = renamed.field(id_source).type if id_source else pa.string()
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_floating(id_type)
            or pa.types.is_null(id_type)):  # (null: no id in the first block; its rows are rejected)
        raise InputError(f"{first}: column {id_source!r} holds {id_type}; ids must be numbers or strings "
                         f"(choose another with --id-column, or rename it: --rename {id_source}=other_name)")
    id_field = pa.field("id", pa.int64() if pa.types.is_integer(id_type) else pa.string())
    keep = [c for c in (columns or renamed.names) if c not in ("id", id_source)]
    keep += [text_column] if text_column not in keep else []  # the text is always kept
    schema = pa.schema([id_field] + [renamed.field(c) for c in keep])
    for column in keep:
        if not _storable(renamed.field(column).type):
            raise InputError(f"{first}: column {column!r} holds {renamed.field(column).type}, which a dataset cannot "
                             f"store (maps and unions have no datasets type); leave it out with --columns")

    expression, used = None, set()
    if filter_text:
        expression, used = compile_filter(filter_text, renamed)
    needed = set(keep) | used | {text_column} | ({id_source} if id_source else set())
    read_schema = pa.schema([f for f in raw if rename.get(f.name, f.name) in needed])
    return Plan(read_schema, rename, schema, text_column, id_source, expression, dedup, limit, by_file,
                sorted(text_like & needed))


def _storable(kind) -> bool:
    """Whether datasets has a type for it (it has none for maps or unions, at any depth)."""
    import pyarrow as pa

    if pa.types.is_map(kind) or pa.types.is_union(kind):
        return False
    return all(_storable(kind.field(i).type) for i in range(kind.num_fields))


def _is_text_like(kind) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


# ---- one unit -------------------------------------------------------------------------------------------

@dataclass
class Tally:
    """What a unit did; becomes its shard's completion record."""
    rows: int = 0
    read: int = 0
    filtered: int = 0
    duplicates: int = 0
    rejects: list = field(default_factory=list)
    end_row: int = 1
    sources: dict = field(default_factory=dict)

    def source(self, name: str) -> dict:
        return self.sources.setdefault(name, no_counts())

    def record(self) -> dict:
        return {"rows_read": self.read, "filtered": self.filtered, "duplicates": self.duplicates,
                "position": {"end_row": self.end_row}, "sources": self.sources,
                "reject_kinds": reject_kinds(self.rejects)}


@dataclass
class State:
    """Carried across units: ids and texts seen (duplicates), rows kept so far (--limit)."""
    ids: SeenHashes | None
    texts: SeenHashes | None
    kept: int = 0


def unit_tables(unit: Unit, plan: Plan, state: State, tally: Tally, first_row: int, json_field,
                block_bytes: int) -> Iterator:
    """The unit's conformed tables, as they are read (what `write_shard_stream` writes)."""
    from hfbatch.io import check_readable, read_documents, read_source

    if plan.by_file:
        blocks = read_documents(list(unit.paths), list(unit.names))
    else:
        if unit.start == 0:
            check_readable(unit.paths[0], unit.fmt)
        blocks = read_source(unit.paths[0], unit.fmt, plan.read_schema, source=unit.names[0], start=unit.start,
                             end=unit.end, first_row=first_row, json_field=json_field, block_bytes=block_bytes)
    first_block = unit.start == 0 and not plan.by_file
    for block in read_ahead(blocks):
        tally.end_row = block.end_row
        if first_block and block.rejects and block.table.num_rows == 0:
            r = block.rejects[0]
            raise InputError(f"{unit.paths[0]}: no row of the first block could be read as {unit.fmt} (row "
                             f"{r['row']}: {r['reason']}); is it really {unit.fmt}?")
        first_block = first_block and block.table.num_rows == 0 and not block.rejects
        tally.read += len(block.rejects)
        for r in block.rejects:
            tally.source(r["source"])["rejects"] += 1
            tally.source(r["source"])["read"] += 1
        known = len(tally.rejects)
        table = conform(block.table, unit, plan, state, tally)
        order = {name: i for i, name in enumerate(unit.names)}  # rejects in file order, whatever found them
        tally.rejects[known:] = sorted(block.rejects + tally.rejects[known:],
                                       key=lambda r: (order.get(r["source"], 0), r["row"]))
        if table.num_rows:
            yield table
        if plan.limit is not None and state.kept >= plan.limit:
            return


def read_ahead(items: Iterable) -> Iterator:
    """`items`, each produced in a thread while the one before is used: reading and parsing block k+1 (pyarrow
    and file reads run outside the GIL) overlaps conforming and writing block k. Errors are raised here, in
    order; the source is closed when the reader stops early."""
    items = iter(items)
    done = object()
    try:
        with contextlib.closing(prefetch(lambda _: next(items, done), itertools.repeat(None))) as ahead:
            for _, item in ahead:
                if item is done:
                    return
                yield item
    finally:
        close = getattr(items, "close", None)
        if close:
            close()


def conform(table, unit: Unit, plan: Plan, state: State, tally: Tally):
    """One block's good rows, in the output schema: rejects (text, ids), filter, dedup, limit."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from hfbatch.io import reject

    n = table.num_rows
    name = unit.names[0]
    sources = table.column("__source") if plan.by_file else None
    table = table.rename_columns([plan.rename.get(c, c) for c in table.column_names])
    for column in plan.as_strings:
        if column in table.column_names:
            table = table.set_column(table.column_names.index(column), column,
                                     table.column(column).cast(pa.string()))
    table = _fill_missing_columns(table, unit, plan)
    for source, count in _count_by(sources, name, n):
        tally.source(source)["read"] += count
    tally.read += n
    if n == 0:
        return plan.schema.empty_table()

    bad = np.zeros(n, bool)
    reasons: dict[int, tuple[str, str]] = {}

    def mark(mask, kind, reason):
        for i in np.flatnonzero(mask & ~bad):
            reasons[i] = (kind, reason)
        bad[:] |= mask

    text = table.column(plan.text_column)
    mark(numpy_array(pc.is_null(text)), "missing_text", f"missing text in column {plan.text_column!r}")
    # (the length in bytes: no scan; Arrow scalars, as a Python one would import pandas: hfbatch.dataset)
    empty = pc.or_(pc.equal(pc.binary_length(text), arrow_array([0], np.int32)[0]), pc.utf8_is_space(text))
    mark(numpy_array(pc.fill_null(empty, arrow_array([False])[0])), "empty_text",
         f"empty text in column {plan.text_column!r}")
    if plan.id_source:
        ids = table.column(plan.id_source).cast(plan.schema.field("id").type)
        mark(numpy_array(pc.is_null(ids)), "missing_id", f"missing id in column {plan.id_source!r}")
        candidates = np.flatnonzero(~bad)
        fresh = state.ids.add_new(hash64(ids.take(arrow_array(candidates))))
        duplicate = np.zeros(n, bool)
        duplicate[candidates[~fresh]] = True
        mark(duplicate, "duplicate_id", "duplicate id")
    if bad.any():
        rows = numpy_array(table.column("__row"))
        for i, row in zip(np.flatnonzero(bad), table.filter(arrow_array(bad)).drop_columns(["__row"]).to_pylist()):
            source = sources[i].as_py() if sources is not None else name
            kind, reason = reasons[i]
            if kind == "duplicate_id":
                reason = f"duplicate id {row.get(plan.id_source)!r}"
            tally.rejects.append(reject(source, rows[i], kind, reason, json.dumps(row, default=str,
                                                                                   ensure_ascii=False)))
            tally.source(source)["rejects"] += 1
        table = table.filter(arrow_array(~bad))

    if plan.filter is not None:
        before = table
        table = table.filter(plan.filter)
        _tally_drop(tally, before, table, "filtered", plan.by_file, name)
    if plan.dedup and table.num_rows:
        before = table
        table = table.filter(arrow_array(state.texts.add_new(hash64(table.column(plan.text_column)))))
        _tally_drop(tally, before, table, "duplicates", plan.by_file, name)
    if plan.limit is not None and state.kept + table.num_rows > plan.limit:
        table = table.slice(0, max(plan.limit - state.kept, 0))
    state.kept += table.num_rows

    out_sources = table.column("__source") if plan.by_file else None
    for source, count in _count_by(out_sources, name, table.num_rows):
        tally.source(source)["rows"] += count
    tally.rows += table.num_rows
    if plan.id_source:
        ids = table.column(plan.id_source)
    elif plan.by_file:
        ids = table.column("__source")
    else:  # SOURCE:ROW, stable across runs (unlike a counter, it does not move when a row before is bad)
        prefix, colon = arrow_strings([name, ":"])
        ids = pc.binary_join_element_wise(prefix, table.column("__row").cast(pa.string()), colon)
    columns = [_cast(ids, plan.schema.field("id"), unit)]
    for f in list(plan.schema)[1:]:
        columns.append(_cast(table.column(f.name), f, unit) if f.name in table.column_names
                       else pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=plan.schema)


def _fill_missing_columns(table, unit: Unit, plan: Plan):
    """A later source (a Parquet file, plain text) may lack columns the first one has. The text and the ids
    cannot be made up: the source is refused by name. Any other column is null in its rows, as a CSV's or
    a JSON object's missing field is, so a filter on it sees null."""
    import pyarrow as pa

    original = {new: old for old, new in plan.rename.items()}
    wanted = [f.with_name(plan.rename.get(f.name, f.name)) for f in plan.read_schema]
    missing = [f for f in wanted if f.name not in table.column_names]
    required = [f.name for f in missing if f.name in (plan.text_column, plan.id_source)]
    if required:
        from hfbatch.io import sniff_schema

        roles = " and ".join("the text" if c == plan.text_column else "the rows' ids" for c in required)
        names = " and ".join(repr(original.get(c, c)) for c in required)
        column, hold = ("columns", "hold") if len(required) > 1 else ("column", "holds")
        if unit.fmt == "text":
            has = "plain text has only lines"
        else:
            own = sniff_schema(unit.paths[0], unit.fmt, None)
            has = "it has " + (", ".join(own.names) if own is not None and own.names else "no column")
        raise InputError(f"{unit.paths[0]}: no {column} {names}, which {hold} {roles} in the first source ({has}); "
                         f"give every source that column, or ingest this one into a dataset of its own")
    for f in missing:
        table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


def _cast(values, field, unit: Unit):
    """A block's column in the output's type. JSON Lines and CSV are read in the first file's types, but a
    Parquet file keeps its own, which may not convert."""
    import pyarrow as pa

    try:
        return values.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"{unit.paths[0]}: column {field.name!r} holds {values.type}, which does not convert to "
                         f"the first file's {field.type} ({str(exc).splitlines()[0]}); make the files agree, or "
                         f"leave the column out with --columns")


def _count_by(sources, name: str, n: int):
    if sources is None:
        return [(name, n)] if n else []
    values, counts = np.unique(np.asarray(sources.to_pylist(), object), return_counts=True)
    return list(zip(values.tolist(), counts.tolist()))


def _tally_drop(tally: Tally, before, after, key: str, by_file: bool, name: str) -> None:
    dropped = before.num_rows - after.num_rows
    setattr(tally, key, getattr(tally, key) + dropped)
    if dropped and by_file:
        kept = {}
        for source, count in _count_by(after.column("__source"), name, after.num_rows):
            kept[source] = count
        for source, count in _count_by(before.column("__source"), name, before.num_rows):
            tally.source(source)[key] += count - kept.get(source, 0)
    elif dropped:
        tally.source(name)[key] += dropped




def no_counts() -> dict:
    """A source's counts before it is read (a Tally's, and a carried unit's for a file it has no rows of)."""
    return {"rows": 0, "rejects": 0, "read": 0, "filtered": 0, "duplicates": 0}


def reject_kinds(rejects: list[dict]) -> dict[str, int]:
    """How many rejects there are of each kind, in the order the kinds first occur."""
    return dict(Counter(r["kind"] for r in rejects))


def schema_dict(schema) -> dict:
    return {f.name: str(f.type) for f in schema}
