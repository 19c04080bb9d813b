"""hfbatch ingest: files of any common format -> one memory-mapped Arrow dataset with stable ids.

The input is cut into units of work, one resumable shard each (see runner.Job): a file, a byte range of a
big uncompressed JSON Lines or text file, or a group of files with `--by file`. A unit is read as a stream
of blocks (hfbatch.io); each block is conformed (rename, rejects, ids, filter, dedup, limit) and appended
to its shard file as it comes, so memory stays flat whatever the input size. Publishing joins the shards
memory-mapped and saves them with `save_to_disk`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from hfbatch import log
from hfbatch.cli import SizeType, force_option, json_summary, output_option, text_column_option
from hfbatch.errors import InputError, JobFailed
from hfbatch.hashing import HASH_FILE
from hfbatch.runner import Job

FORMAT_CHOICES = ["auto", "csv", "tsv", "json", "jsonl", "parquet", "text"]
STREAMING_THRESHOLD = 256 << 20  # bytes of input (compressed files count 4x) above which --streaming is on


# ---- option parsing -------------------------------------------------------------------------------------

def parse_max_rejects(value: str) -> tuple[str, float]:
    """'100' (rows), '0.01' or '1%' (fraction of rows read)."""
    text = value.strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):  # nan compares false with everything: it would switch the limit off
        raise click.BadParameter(f"{value!r}: give a row count (100) or a fraction (0.01 or 1%); 100% accepts "
                                 f"any number of rejects", param_hint="--max-rejects")
    if number < 0:
        raise click.BadParameter(f"{value!r}: must not be negative", param_hint="--max-rejects")
    return ("fraction", number) if text.endswith("%") or number < 1 else ("count", number)


def parse_rename(values: tuple[str, ...]) -> dict[str, str]:
    mapping = {}
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise click.BadParameter(f"{value!r}: write --rename old=new", param_hint="--rename")
        mapping[old.strip()] = new.strip()
    return mapping


def parse_columns(values: tuple[str, ...]) -> list[str] | None:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return names or None


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
        return column.to_numpy().astype(np.int64, copy=False).view(np.uint64)
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
        return self.sources.setdefault(name, {"rows": 0, "rejects": 0, "read": 0, "filtered": 0, "duplicates": 0})

    def record(self) -> dict:
        kinds: dict[str, int] = {}
        for r in self.rejects:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        return {"rows_read": self.read, "filtered": self.filtered, "duplicates": self.duplicates,
                "position": {"end_row": self.end_row}, "sources": self.sources, "reject_kinds": kinds}


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
    for block in prefetch(blocks):
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


def prefetch(items: Iterator, depth: int = 1) -> Iterator:
    """`items`, produced `depth` ahead by a thread: reading and parsing block k+1 (pyarrow and file reads
    run outside the GIL) overlaps conforming and writing block k. Errors are raised here, in order."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    break
            else:
                put((done, None))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
            put((done, exc))
        finally:
            close = getattr(items, "close", None)
            if close:
                close()

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item, exc = slots.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        worker.join()


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
    mark(np.asarray(pc.is_null(text)), "missing_text", f"missing text in column {plan.text_column!r}")
    empty = pc.or_(pc.equal(pc.binary_length(text), 0), pc.utf8_is_space(text))  # (bytes: no scan)
    mark(np.asarray(pc.fill_null(empty, False)), "empty_text", f"empty text in column {plan.text_column!r}")
    if plan.id_source:
        ids = table.column(plan.id_source).cast(plan.schema.field("id").type)
        mark(np.asarray(pc.is_null(ids)), "missing_id", f"missing id in column {plan.id_source!r}")
        candidates = np.flatnonzero(~bad)
        fresh = state.ids.add_new(hash64(ids.take(pa.array(candidates))))
        duplicate = np.zeros(n, bool)
        duplicate[candidates[~fresh]] = True
        mark(duplicate, "duplicate_id", "duplicate id")
    if bad.any():
        rows = table.column("__row").to_numpy()
        for i, row in zip(np.flatnonzero(bad), table.filter(pa.array(bad)).drop_columns(["__row"]).to_pylist()):
            source = sources[i].as_py() if sources is not None else name
            kind, reason = reasons[i]
            if kind == "duplicate_id":
                reason = f"duplicate id {row.get(plan.id_source)!r}"
            tally.rejects.append(reject(source, rows[i], kind, reason, json.dumps(row, default=str,
                                                                                   ensure_ascii=False)))
            tally.source(source)["rejects"] += 1
        table = table.filter(pa.array(~bad))

    if plan.filter is not None:
        before = table
        table = table.filter(plan.filter)
        _tally_drop(tally, before, table, "filtered", plan.by_file, name)
    if plan.dedup and table.num_rows:
        before = table
        table = table.filter(pa.array(state.texts.add_new(hash64(table.column(plan.text_column)))))
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
        ids = pc.binary_join_element_wise(name, table.column("__row").cast(pa.string()), ":")
    columns = [_cast(ids, plan.schema.field("id"), unit)]
    for f in list(plan.schema)[1:]:
        columns.append(_cast(table.column(f.name), f, unit) if f.name in table.column_names
                       else pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=plan.schema)


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


# ---- --incremental: units of unchanged files are carried over from the output being updated -------------

GLOBAL_OPTIONS = {"dedup": "--dedup", "limit": "--limit", "sample": "--sample"}


@dataclass
class Carry:
    """A unit's rows taken from the previous output instead of parsing its files again."""
    tables: list            # zero-copy slices of the previous output's memory-mapped data
    hashes: np.ndarray      # their content hashes
    rejects: list
    record: dict            # its shard record: counts, per-source counts, position
    data_file: Path | None = None  # a previous data file holding exactly these rows: hard-linked, not copied


class PreviousOutput:
    """The output an `ingest --incremental` run updates: its rows (memory-mapped), content hashes and
    rejects, and what each of its units read (the manifest's `units`), so that a unit whose files did
    not change can be carried over: same rows, ids, hashes, rejects and counts as parsing it again."""

    def __init__(self, path: Path, manifest: dict, unchanged: set[str]):
        from hfbatch.hashing import read_hash_file

        self.unchanged = unchanged
        self.table, self.data_files = _memory_mapped_rows(path)
        self.hashes = read_hash_file(path, with_ids=False).hashes
        self.rejects = _rejects_by_source(path)
        self.units: dict[tuple, tuple[int, dict]] = {}   # (sources, start, end) -> (first output row, record)
        self.files: dict[str, tuple[int, dict]] = {}     # whole-file source -> (first output row, its counts)
        row = 0
        for record in manifest["units"]:
            unit = record["unit"]
            self.units[(tuple(unit["sources"]), unit["start"], unit["end"])] = (row, record)
            if unit["start"] == 0 and unit["end"] is None:
                at = row
                for name in unit["sources"]:
                    counts = record["sources"].get(name, _no_counts())
                    self.files[name] = (at, counts)
                    at += counts["rows"]
            row += record["rows"]

    def carry(self, unit: Unit) -> Carry | None:
        """The unit's rows from the previous output, or None where it must be parsed: a file changed,
        or the unit is cut differently, or it rejected a duplicate id (whose first occurrence may be gone)."""
        if not all(name in self.unchanged for name in unit.names):
            return None
        same = self.units.get((unit.names, unit.start, unit.end))
        if same is not None:
            first, record = same
            ranges = [(first, record["rows"])]
            rejects = self._rejects(unit.names, record["unit"]["first_row"], record["position"]["end_row"])
            record = {k: v for k, v in record.items() if k not in ("shard", "rows", "rejects", "unit")}
        elif unit.start == 0 and unit.end is None and all(name in self.files for name in unit.names):
            ranges = [(self.files[name][0], self.files[name][1]["rows"]) for name in unit.names]
            rejects = self._rejects(unit.names)  # (--by file regrouped its files: put them back together)
            record = _record_of({name: self.files[name][1] for name in unit.names}, rejects)
        else:
            return None
        if "duplicate_id" in record["reject_kinds"]:
            return None
        tables = [self.table.slice(first, rows) for first, rows in ranges if rows]
        hashes = np.concatenate([self.hashes[first:first + rows] for first, rows in ranges] + [np.zeros(0, np.int64)])
        data_file = self.data_files.get(ranges[0]) if len(ranges) == 1 else None
        return Carry(tables, hashes, rejects, record, data_file)

    def _rejects(self, names, first_row: int = 1, end_row: int | None = None) -> list[dict]:
        return [r for name in names for r in self.rejects.get(name, [])
                if end_row is None or first_row <= r["row"] < end_row]


def open_previous(job: Job, plan: Plan, names: list[str], base: Path, options: dict) -> PreviousOutput | None:
    """The output to update, or None (with the reason logged) where only a full rebuild gives the rows a
    from-scratch run would: options that choose rows across files, an output from an older hfbatch, or
    column types that changed with the first file."""
    manifest = job.previous
    given = [GLOBAL_OPTIONS[k] for k, v in options.items() if v not in (None, False)]
    reason = None
    if given:
        reason = f"{', '.join(given)} choose rows across all files, so every file is read again"
    elif "units" not in manifest or not (job.output / HASH_FILE).exists():
        reason = f"{job.output} was made by an older hfbatch (no units or {HASH_FILE} to carry rows over from)"
    elif manifest.get("read_schema") != _schema_dict(plan.read_schema) \
            or manifest.get("schema") != _schema_dict(plan.schema):
        reason = "the columns or their types, read from the first file, changed"
    elif manifest.get("source_base") != str(base):
        reason = f"the sources' common directory changed to {base} (source names, and ids made from them, change)"
    if reason:
        log.event("ingest", "full_rebuild", reason=reason)
        return None
    old = {i["path"]: i.get("sha256") for i in manifest.get("inputs", [])}
    unchanged = {name for name, new in zip(names, job.inputs) if old.get(new["path"]) == new["sha256"]}
    import pyarrow as pa

    try:
        return PreviousOutput(job.output, manifest, unchanged)
    except (ValueError, KeyError, TypeError, OSError, pa.ArrowException) as exc:  # (JSONDecodeError: a ValueError)
        raise InputError(f"{job.output}, the output --incremental updates, is damaged ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}); rebuild it with --force")


def admit_carried(carry: Carry, plan: Plan, state: State) -> bool:
    """Counts a carried unit's ids as seen, as parsing it would; False where one of them is now the
    duplicate of an id read before it (a changed or new file took it): then the unit must be parsed."""
    if state.ids is not None and carry.tables:
        import pyarrow as pa

        ids = hash64(pa.chunked_array([c for t in carry.tables for c in t.column("id").chunks],
                                      plan.schema.field("id").type))
        if state.ids.any_seen(ids):
            return False
        state.ids.add_new(ids)
    state.kept += sum(t.num_rows for t in carry.tables)
    return True


def write_carried(job: Job, index: int, carry: Carry, plan: Plan) -> int:
    """A carried unit's shard: the previous data file itself where it holds exactly the unit's rows (a
    hard link: nothing is copied, and the output's files are never changed in place), else a copy of
    its memory-mapped slices."""
    if carry.data_file is not None:
        shard = job.shard_file(index)
        shard.unlink(missing_ok=True)  # (left by a killed attempt at this shard)
        try:
            os.link(carry.data_file, shard)
            return sum(t.num_rows for t in carry.tables)
        except OSError:  # no hard links here (another filesystem): copy
            pass
    return job.write_shard_stream(index, plan.schema, [pa_table(t, plan.schema) for t in carry.tables])


def _memory_mapped_rows(path: Path):
    """A saved dataset's rows as one Arrow table over its memory-mapped data files (nothing is read), and
    its data files by the rows they hold: {(first row, rows): file}."""
    import pyarrow as pa

    state = json.loads((path / "state.json").read_text())
    files = [path / f["filename"] for f in state["_data_files"]]
    tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
    by_rows, first = {}, 0
    for file, table in zip(files, tables):
        by_rows[(first, table.num_rows)] = file
        first += table.num_rows
    return pa.concat_tables(t.replace_schema_metadata(None) for t in tables), by_rows


def _rejects_by_source(path: Path) -> dict[str, list[dict]]:
    by_source: dict[str, list[dict]] = {}
    rejects = path / "rejects.jsonl"
    if rejects.exists():
        with open(rejects, encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                by_source.setdefault(r["source"], []).append(r)
    return by_source


def _no_counts() -> dict:
    return {"rows": 0, "rejects": 0, "read": 0, "filtered": 0, "duplicates": 0}


def _record_of(sources: dict[str, dict], rejects: list[dict]) -> dict:
    """The shard record of a unit made of whole files, from their per-source counts."""
    kinds: dict[str, int] = {}
    for r in rejects:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    totals = _sum_dicts(sources.values())
    return {"rows_read": totals.get("read", 0), "filtered": totals.get("filtered", 0),
            "duplicates": totals.get("duplicates", 0), "position": {"end_row": 1}, "sources": sources,
            "reject_kinds": kinds}


def _schema_dict(schema) -> dict:
    return {f.name: str(f.type) for f in schema}


def _hashed(tables, text_column: str, into: list) -> Iterator:
    """`tables`, collecting the content hash of each row's text into `into` on the way."""
    from hfbatch.hashing import text_hashes

    for table in tables:
        into.append(text_hashes(table.column(text_column)))
        yield table


def _finish_shard(job: Job, index: int, rows: int, hashes: np.ndarray, rejects: list, record: dict) -> None:
    """The shard's content hashes, then its data synced and its record: a recorded shard has its hashes."""
    with open(job.shard_file(index, ".hashes.npy"), "wb") as fh:
        np.save(fh, hashes)
        fh.flush()
        os.fsync(fh.fileno())
    job.finish_shard(index, rows, rejects, **record)


def _content_hash_writer(job: Job, n_units: int, plan: Plan, keep: np.ndarray | None):
    """Writes OUTPUT/content_hashes.parquet (id, text hash per row, of the rows `keep` when sampled)."""
    def write(tmp: Path) -> None:
        import pyarrow as pa

        from hfbatch.hashing import write_hash_file

        ids = pa.chunked_array([chunk for i in range(n_units) for chunk in
                                pa.ipc.open_stream(pa.memory_map(str(job.shard_file(i)))).read_all()
                                .column("id").chunks], plan.schema.field("id").type)
        hashes = np.concatenate([np.load(job.shard_file(i, ".hashes.npy")) for i in range(n_units)])
        if keep is not None:
            ids, hashes = ids.take(pa.array(keep)), hashes[keep]
        write_hash_file(tmp, ids, hashes, text_column=plan.text_column)
    return write


# ---- the command ----------------------------------------------------------------------------------------

@click.command()
@click.argument("sources", nargs=-1, required=True)
@output_option
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="auto", show_default=True,
              help="Input format; auto reads it from the extension (.gz/.bz2/.xz/.zst allowed).")
@click.option("--by", type=click.Choice(["line", "file"]), default="line", show_default=True,
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
                   f"Default: on when the inputs exceed {STREAMING_THRESHOLD >> 20} MB.")
@click.option("--shard-size", type=SizeType(minimum=10**6), default="128MB", show_default=True,
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
    from hfbatch.io import detect_format, expand_sources, split_compression

    limit_kind, reject_limit = parse_max_rejects(max_rejects)
    shard_bytes = int(shard_size)
    rename_map = parse_rename(rename)
    column_list = parse_columns(columns)
    by_file = by == "file"
    paths = expand_sources(list(sources), any_name=by_file or fmt != "auto")
    base = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    names = [p.resolve().relative_to(base).as_posix() for p in paths]
    fmts = ["text"] * len(paths) if by_file else [detect_format(p, fmt, json_field) for p in paths]
    input_bytes = sum(p.stat().st_size * (4 if split_compression(p)[1] else 1) for p in paths)
    if streaming is None:
        streaming = input_bytes > STREAMING_THRESHOLD
    # --max-rejects is not part of the config: it does not change the output, and raising it after a
    # failed run should finish that run from its shards, not start over.
    config = {"format": fmt, "by": by, "field": json_field, "text_column": text_column, "id_column": id_column,
              "columns": column_list, "rename": rename_map, "filter": filter_text, "dedup": dedup,
              "limit": limit, "sample": sample, "seed": seed if sample is not None else None,
              "streaming": streaming, "shard_size": shard_size.text}

    # `datasets` takes a second of CPU to import and is only needed to publish: import it in a thread,
    # alongside hashing and parsing (hashlib and pyarrow let go of the GIL). Everything this thread needs
    # is imported first, so the two never wait on each other's import locks.
    _import_readers(fmts)
    importer = threading.Thread(target=importlib.import_module, args=("datasets",))
    importer.start()
    with contextlib.ExitStack() as stack:
        stack.callback(importer.join)
        job = stack.enter_context(Job("ingest", output, config=config, files=paths, force=force,
                                      incremental=incremental))
        if job.up_to_date:
            return job.summary()
        plan = make_plan(paths[0], fmts[0], json_field, text_column, id_column, column_list, rename_map,
                         filter_text, dedup, limit, by_file)
        units = plan_units(paths, names, fmts, by_file, streaming, shard_bytes)
        state = _resume_state(job, units, plan)
        previous = open_previous(job, plan, names, base, {"dedup": dedup, "limit": limit, "sample": sample}) \
            if job.previous else None
        # A shard's fsync and completion record run in a thread while the next shard is read; records
        # are still written in order (each waits for the one before), so after a kill the finished
        # shards are always the first ones.
        with log.Progress("ingest", None) as progress, ThreadPoolExecutor(1) as recorder:
            recording, recording_rejects, end_row = None, 0, 1
            # rejects of the recorded shards, kept up to date as they are recorded (re-reading every record
            # after each unit made a many-unit run quadratic)
            rejected = sum(_shard_record(job, i)["rejects"] for i in range(len(units)) if job.is_done(i)) \
                if limit_kind == "count" else 0
            for index in job.pending(len(units)):
                unit = units[index]
                first_row = 1 if unit.start == 0 else end_row if recording else _first_row(job, index)
                carry = previous.carry(unit) if previous else None
                if carry is not None and admit_carried(carry, plan, state):
                    rows = write_carried(job, index, carry, plan)
                    progress.update(rows)
                    hashes, rejects, record = carry.hashes, carry.rejects, carry.record
                else:
                    carry, tally, parts = None, Tally(), []
                    tables = unit_tables(unit, plan, state, tally, first_row, json_field,
                                         _block_bytes(unit, streaming)) \
                        if plan.limit is None or state.kept < plan.limit else iter(())
                    rows = job.write_shard_stream(index, plan.schema,
                                                  _hashed(_progress(tables, progress), plan.text_column, parts))
                    hashes = np.concatenate(parts) if parts else np.zeros(0, np.int64)
                    rejects, record = tally.rejects, tally.record()
                record["unit"] = {"sources": list(unit.names), "start": unit.start, "end": unit.end,
                                  "first_row": first_row, "carried": carry is not None}
                if recording:
                    recording.result()
                    rejected += recording_rejects
                    if limit_kind == "count" and rejected > reject_limit:  # known to be exceeded early: stop now
                        _check_rejects(job, units, limit_kind, reject_limit, max_rejects, final=False)
                recording = recorder.submit(_finish_shard, job, index, rows, hashes, rejects, record)
                recording_rejects = len(rejects)
                end_row = record["position"]["end_row"]
                log.event("ingest", "unit_done", source=unit.names[0], shard=index, rows=rows,
                          rejects=len(rejects), carried=carry is not None)
            if recording:
                recording.result()

        records = _check_rejects(job, units, limit_kind, reject_limit, max_rejects, final=True)
        importer.join()
        import datasets

        features = datasets.Features.from_arrow_schema(plan.schema)
        work = _work_done(records)
        log.event("ingest", "rows_carried_and_parsed", **work)
        extra = {"text_column": text_column, "sources": _per_source(records),
                 "schema": _schema_dict(plan.schema), "read_schema": _schema_dict(plan.read_schema),
                 "rejects_by_kind": _sum_dicts(r.get("reject_kinds", {}) for r in records),
                 "max_rejects": max_rejects, "input_bytes": input_bytes, "shards_read": len(units),
                 # what --incremental needs to carry units over: each unit's record, and what names are of
                 "units": [{k: v for k, v in r.items() if k != "shard"} for r in records],
                 "source_base": str(base), "work": work}
        prepare, keep = None, None
        if sample is not None:
            extra["sampled_from"] = sum(r["rows"] for r in records)
            keep = _sample_indices(extra["sampled_from"], sample, seed)
            prepare = (lambda dataset: dataset.select(keep)) if keep is not None else None
        job.publish_dataset(len(units), features, extra=extra, max_shard_size=shard_bytes, prepare=prepare,
                            reuse_shards=True, side_files=_content_hash_writer(job, len(units), plan, keep))
        return {**job.summary(), **work}


def _import_readers(fmts: list[str]) -> None:
    import pyarrow.compute  # noqa: F401
    import pyarrow.csv  # noqa: F401
    import pyarrow.json  # noqa: F401

    import hfbatch.expr  # noqa: F401
    if "parquet" in fmts:
        import pyarrow.parquet  # noqa: F401


def _block_bytes(unit: Unit, streaming: bool) -> int | None:
    """With --streaming, fixed-size blocks (flat memory); without, an uncompressed file in one parse."""
    from hfbatch.io import split_compression

    if streaming or split_compression(unit.paths[0])[1]:
        return None
    return unit.paths[0].stat().st_size + 1


def _progress(tables, progress) -> Iterator:
    for table in tables:
        progress.update(table.num_rows)
        yield table


def _first_row(job: Job, index: int) -> int:
    """A byte range goes on counting lines where the previous range of its file stopped (on resume, from
    that range's record: units are done in order, so it has one)."""
    return _shard_record(job, index - 1)["position"]["end_row"]


def _shard_record(job: Job, index: int) -> dict:
    return json.loads(job.shard_file(index, ".json").read_text())


def _resume_state(job: Job, units: list[Unit], plan: Plan) -> State:
    """Ids and texts of finished shards still count for duplicates, and their rows for --limit."""
    import pyarrow as pa

    state = State(SeenHashes() if plan.id_source else None, SeenHashes() if plan.dedup else None)
    for index in range(len(units)):
        if not job.is_done(index):
            continue
        with pa.memory_map(str(job.shard_file(index))) as source:
            for batch in pa.ipc.open_stream(source):
                if state.ids is not None:
                    state.ids.add_new(hash64(batch.column("id")))
                if state.texts is not None:
                    state.texts.add_new(hash64(batch.column(plan.text_column)))
                state.kept += batch.num_rows
    return state


def _check_rejects(job: Job, units, kind: str, limit: float, option: str, final: bool) -> list[dict]:
    n = len(units)
    records = [_shard_record(job, i) for i in range(n) if job.is_done(i)]
    read = sum(r["rows_read"] for r in records)
    rejected = sum(r["rejects"] for r in records)
    allowed = limit if kind == "count" else limit * read
    if rejected > allowed:
        kinds = _sum_dicts(r.get("reject_kinds", {}) for r in records)
        gathered = job.partial / "rejects.jsonl"
        with open(gathered, "wb") as out:
            for i in range(n):
                part = job.shard_file(i, ".rejects.jsonl")
                if part.exists():
                    out.write(part.read_bytes())
        first = json.loads(gathered.read_text().splitlines()[0])
        raise JobFailed(f"{rejected} of {read}{'' if final else '+'} rows were rejected "
                        f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))}), "
                        f"more than --max-rejects {option}; first: {first['source']} row {first['row']}: "
                        f"{first['reason']}; all of them are in {gathered} (raise --max-rejects to accept "
                        f"them: the rows already read are kept)")
    return records


def _sum_dicts(dicts) -> dict:
    total: dict = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def _per_source(records: list[dict]) -> dict:
    sources: dict[str, dict] = {}
    for record in records:
        for name, counts in record.get("sources", {}).items():
            into = sources.setdefault(name, {})
            for k, v in counts.items():
                into[k] = into.get(k, 0) + v
    return sources


def _sample_indices(total: int, n: int, seed: int) -> np.ndarray | None:
    """The rows --sample keeps, in their order; None when it keeps them all."""
    if n >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


def _work_done(records: list[dict]) -> dict:
    """Rows and files carried over from the previous output vs parsed, for the log and the summary."""
    work = {"carried_rows": 0, "parsed_rows": 0}
    files: dict[str, set] = {"carried": set(), "parsed": set()}
    for r in records:
        how = "carried" if r["unit"]["carried"] else "parsed"
        work[f"{how}_rows"] += r["rows"]
        files[how].update(r["unit"]["sources"])
    return {**work, "carried_files": len(files["carried"]), "parsed_files": len(files["parsed"])}


def pa_table(table, schema):
    """A carried slice in this run's schema (the same types, checked; metadata dropped)."""
    import pyarrow as pa

    return pa.Table.from_arrays(table.columns, schema=schema)
