"""`hfbatch ingest --incremental`: the units of unchanged files are carried over from the output being updated
(its memory-mapped rows, content hashes and rejects) instead of being parsed again, with the same rows, ids,
hashes, rejects and counts as parsing them would give."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hfbatch import log
from hfbatch.errors import InputError
from hfbatch.hashing import HASH_FILE
from hfbatch.ingest_rows import Plan, State, Unit, hash64, no_counts, reject_kinds, schema_dict
from hfbatch.runner import Job, sum_counts

GLOBAL_OPTIONS = {"dedup": "--dedup", "limit": "--limit", "sample": "--sample"}


@dataclass
class Carry:
    """A unit's rows taken from the previous output instead of parsing its files again."""
    tables: list            # zero-copy slices of the previous output's memory-mapped data
    hashes: np.ndarray      # their content hashes
    rejects: list
    record: dict            # its shard record: counts, per-source counts, position
    data_file: Path | None = None  # a previous data file holding exactly these rows: hard-linked, not copied
    # (hfbatch.executor.Stream's link: nothing is copied, and the output's files are never changed in place)


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
                    counts = record["sources"].get(name, no_counts())
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
    elif manifest.get("read_schema") != schema_dict(plan.read_schema) \
            or manifest.get("schema") != schema_dict(plan.schema):
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


def _memory_mapped_rows(path: Path):
    """A saved dataset's rows as one Arrow table over its memory-mapped data files (nothing is read), and
    its data files by the rows they hold: {(first row, rows): file}."""
    import pyarrow as pa

    from hfbatch.dataset import memory_mapped_tables

    files = memory_mapped_tables(path)
    by_rows, first = {}, 0
    for file, table in files:
        by_rows[(first, table.num_rows)] = file
        first += table.num_rows
    return pa.concat_tables(t.replace_schema_metadata(None) for _, t in files), by_rows


def _rejects_by_source(path: Path) -> dict[str, list[dict]]:
    by_source: dict[str, list[dict]] = {}
    rejects = path / "rejects.jsonl"
    if rejects.exists():
        with open(rejects, encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                by_source.setdefault(r["source"], []).append(r)
    return by_source


def _record_of(sources: dict[str, dict], rejects: list[dict]) -> dict:
    """The shard record of a unit made of whole files, from their per-source counts."""
    totals = sum_counts(sources.values())
    return {"rows_read": totals.get("read", 0), "filtered": totals.get("filtered", 0),
            "duplicates": totals.get("duplicates", 0), "position": {"end_row": 1}, "sources": sources,
            "reject_kinds": reject_kinds(rejects)}


def pa_table(table, schema):
    """A carried slice in this run's schema (the same types, checked; metadata dropped)."""
    import pyarrow as pa

    return pa.Table.from_arrays(table.columns, schema=schema)
