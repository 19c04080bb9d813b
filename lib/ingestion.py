"""Ingest: files of any common format -> one memory-mapped Arrow dataset with stable ids.

`ingest(sources, output, ...)` is the job, for Python callers and for the `hfbatch ingest` command alike: it
takes the command's options (with the same defaults) and returns the summary `--json` prints.

The input is cut into units of work, one resumable shard each (see runner.Job, and hfbatch.ingest_rows for
units, the plan and `conform`). A unit is read as a stream of blocks (hfbatch.io); each block is conformed
and appended to its shard file as it comes, so memory stays flat whatever the input size. With
`incremental`, the units of unchanged files are carried over instead (hfbatch.ingest_carry). Publishing
makes the shards the data files of a `save_to_disk` layout (hfbatch.dataset, with pyarrow alone: neither
datasets nor pandas is imported unless a column has a type only datasets maps), beside the rows' content
hashes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hfbatch import log
from hfbatch.errors import InputError, JobFailed
from hfbatch.ingest_carry import PreviousOutput, admit_carried, open_previous
from hfbatch.ingest_rows import (
    Plan,
    SeenHashes,
    State,
    Tally,
    Unit,
    hash64,
    make_plan,
    plan_units,
    schema_dict,
    unit_tables,
)
from hfbatch.runner import Job, sum_counts
from hfbatch.sizes import parse_size

FORMAT_CHOICES = ["auto", "csv", "tsv", "json", "jsonl", "parquet", "text"]
BY_CHOICES = ["line", "file"]
# Bytes of input (compressed files count 4x) above which --streaming is on: 0, every input streams. One parse
# of a whole file held ~3.9x the input in memory and was no faster (bench/ingest_memory.py: 0.79x the peer at
# 256 MB against 1.34x streamed; compressed files always streamed).
STREAMING_THRESHOLD = 0
MIN_SHARD_SIZE = 10**6


# ---- options --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RejectLimit:
    """--max-rejects: a row count (100) or a fraction of the rows read (0.01 or 1%)."""
    text: str      # as given, for messages and the manifest
    kind: str      # "count" or "fraction"
    number: float

    @classmethod
    def parse(cls, value) -> RejectLimit:
        text = str(value).strip()
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):  # nan compares false with everything: it would switch the limit off
            raise InputError(f"--max-rejects: {value!r}: give a row count (100) or a fraction (0.01 or 1%); 100% "
                             f"accepts any number of rejects")
        if number < 0:
            raise InputError(f"--max-rejects: {value!r}: must not be negative")
        return cls(str(value), "fraction" if text.endswith("%") or number < 1 else "count", number)

    def allowed(self, rows_read: int) -> float:
        return self.number if self.kind == "count" else self.number * rows_read


def parse_rename(values: Iterable[str]) -> dict[str, str]:
    """`--rename old=new` options as {old: new}."""
    mapping = {}
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise InputError(f"--rename: {value!r}: write --rename old=new")
        mapping[old.strip()] = new.strip()
    return mapping


def parse_columns(values: Iterable[str]) -> list[str] | None:
    """`--columns a,b --columns c` as [a, b, c]; None for none (all columns). A name given twice, or a
    --columns that names nothing, is refused."""
    values = list(values)
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if values and not names:
        raise InputError(f"--columns {','.join(values)!r} names no column: give names like id,text, or leave "
                         "the option out for all columns")
    check_unique_columns(names)
    return names or None


def check_unique_columns(names: Iterable[str]) -> None:
    """Refuse a column named twice: the output would have two columns of one name."""
    seen = set()
    for name in names:
        if name in seen:
            raise InputError(f"--columns: {name!r} is named twice; name each column once")
        seen.add(name)


def _check_options(fmt: str, by: str, limit, sample) -> None:
    """What Click checks for the command, checked for Python callers too."""
    for option, value, choices in (("--format", fmt, FORMAT_CHOICES), ("--by", by, BY_CHOICES)):
        if value not in choices:
            raise InputError(f"{option}: {value!r}: choose one of {', '.join(choices)}")
    for option, value in (("--limit", limit), ("--sample", sample)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(f"{option}: {value!r}: give a whole number of rows, 0 or more")


@dataclass
class Sources:
    """The files to read, with the names rows and rejects give them (relative to their common directory)."""
    paths: list[Path]
    names: list[str]
    formats: list[str]
    base: Path
    input_bytes: int  # compressed files count 4x

    @classmethod
    def find(cls, sources: list[str], fmt: str, by_file: bool, json_field) -> Sources:
        from hfbatch.io import detect_format, expand_sources, split_compression

        paths = expand_sources(sources, any_name=by_file or fmt != "auto")
        base = Path(os.path.commonpath([p.resolve().parent for p in paths]))
        names = [p.resolve().relative_to(base).as_posix() for p in paths]
        formats = ["text"] * len(paths) if by_file else [detect_format(p, fmt, json_field) for p in paths]
        input_bytes = sum(p.stat().st_size * (4 if split_compression(p)[1] else 1) for p in paths)
        return cls(paths, names, formats, base, input_bytes)


# ---- the job --------------------------------------------------------------------------------------------

def ingest(sources, output, *, fmt: str = "auto", by: str = "line", json_field: str | None = None,
           text_column: str = "text", id_column: str | None = None, columns: list[str] | None = None,
           rename: dict[str, str] | None = None, filter: str | None = None, dedup: bool = False,
           limit: int | None = None, sample: int | None = None, seed: int = 0, max_rejects="1%",
           streaming: bool | None = None, shard_size="128MB", force: bool = False,
           incremental: bool = False) -> dict:
    """Read `sources` (files, globs, directories) into an Arrow dataset at `output`; the options are those of
    `hfbatch ingest` (`filter` is --filter's expression, `json_field` is --field, `shard_size` a number of bytes
    or a size such as "128MB"). Returns the summary `hfbatch ingest --json` prints (less its `seconds`).

    Raises InputError for bad input or options, JobFailed when more rows than `max_rejects` are rejected (the
    rows read are kept, to resume from), Busy when another run is writing `output`."""
    sources = [os.fspath(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]
    if not sources:
        raise InputError("give at least one source (a file, glob or directory)")
    _check_options(fmt, by, limit, sample)
    reject_limit = RejectLimit.parse(max_rejects)
    shard_size = parse_size(shard_size, MIN_SHARD_SIZE, option="--shard-size")
    rename, columns = dict(rename or {}), list(columns) if columns else None
    by_file = by == "file"
    found = Sources.find(sources, fmt, by_file, json_field)
    if streaming is None:
        streaming = found.input_bytes > STREAMING_THRESHOLD
    # --max-rejects is not part of the config: it does not change the output, and raising it after a
    # failed run should finish that run from its shards, not start over.
    config = {"format": fmt, "by": by, "field": json_field, "text_column": text_column, "id_column": id_column,
              "columns": columns, "rename": rename, "filter": filter, "dedup": dedup,
              "limit": limit, "sample": sample, "seed": seed if sample is not None else None,
              "streaming": streaming, "shard_size": shard_size.text}

    with Job("ingest", output, config=config, files=found.paths, force=force, incremental=incremental) as job:
        if job.up_to_date:
            return {"job": "ingest", **job.summary()}
        plan = make_plan(found.paths[0], found.formats[0], json_field, text_column, id_column, columns, rename,
                         filter, dedup, limit, by_file)
        units = plan_units(found.paths, found.names, found.formats, by_file, streaming, shard_size)
        state = _resume_state(job, units, plan)
        previous = open_previous(job, plan, found.names, found.base,
                                 {"dedup": dedup, "limit": limit, "sample": sample}) if job.previous else None
        _write_units(job, units, plan, state, previous, json_field, streaming, reject_limit)
        records = _check_rejects(job, units, reject_limit, final=True)
        extra = {"text_column": text_column, "max_rejects": reject_limit.text, "input_bytes": found.input_bytes,
                 "shards_read": len(units), "source_base": str(found.base)}
        work = _publish(job, units, plan, records, extra, sample, seed, shard_size)
        return {"job": "ingest", **job.summary(), **work}


def _write_units(job: Job, units: list[Unit], plan: Plan, state: State, previous: PreviousOutput | None,
                 json_field, streaming: bool, reject_limit: RejectLimit) -> None:
    """Each pending unit into its shard, in order, through the one shard loop (hfbatch.executor): its fsync
    and completion record run in a thread while the next unit is read, and records are written in order, so
    after a kill the finished shards are always the first ones."""
    from hfbatch.executor import run_shards

    pending = job.shards.pending(len(units))
    work = _UnitWork(job, units, plan, state, previous, json_field, streaming, reject_limit, len(pending))
    with log.Progress("ingest", None) as progress:
        run_shards("ingest", job.shards, pending, lambda device: work, progress=progress)


class _UnitWork:
    """Ingest's work for the executor. Units are computed one after the other, in order (a byte range goes on
    counting lines where the one before it stopped; ids and texts seen before count for duplicates): carried
    over from the previous output where it can be, else read and conformed."""

    def __init__(self, job: Job, units: list[Unit], plan: Plan, state: State, previous: PreviousOutput | None,
                 json_field, streaming: bool, reject_limit: RejectLimit, pending: int):
        self.job, self.units, self.plan, self.state, self.previous = job, units, plan, state, previous
        self.json_field, self.streaming, self.reject_limit = json_field, streaming, reject_limit
        self.unrecorded = pending  # units of this run whose record is not written yet
        self.end_row: int | None = None  # where the unit computed last stopped counting lines
        self.unit_rejects: dict[int, int] = {}  # rejects of the units computed, until they are recorded
        # rejects of the recorded shards, kept up to date as they are recorded (re-reading every record
        # after each unit made a many-unit run quadratic)
        self.rejected = sum(_shard_record(job, i)["rejects"] for i in range(len(units)) if job.shards.is_done(i)) \
            if reject_limit.kind == "count" else 0

    def prepare(self, index):
        return None  # a unit depends on the ones before it: all of it is done in order, in compute

    def compute(self, index, prepared, on_rows, parts):
        from hfbatch.executor import Stream
        from hfbatch.ingest_carry import pa_table

        plan, unit = self.plan, self.units[index]
        first_row = 1 if unit.start == 0 else self.end_row if self.end_row is not None else \
            _first_row(self.job, index)
        carry = self.previous.carry(unit) if self.previous else None
        if carry is not None and admit_carried(carry, plan, self.state):
            rows = sum(t.num_rows for t in carry.tables)
            on_rows(rows)
            data = Stream(plan.schema, [pa_table(t, plan.schema) for t in carry.tables], link=carry.data_file)
            return data, lambda: self._record(index, unit, first_row, rows, carry.hashes, carry.rejects,
                                              dict(carry.record), carried=True)
        tally, hashes, written = Tally(), [], []
        tables = unit_tables(unit, plan, self.state, tally, first_row, self.json_field,
                             _block_bytes(unit, self.streaming)) \
            if plan.limit is None or self.state.kept < plan.limit else iter(())
        data = Stream(plan.schema, _hashed(_progress(tables, on_rows, written), plan.text_column, hashes))
        return data, lambda: self._record(index, unit, first_row, sum(written),
                                          np.concatenate(hashes) if hashes else np.zeros(0, np.int64),
                                          tally.rejects, tally.record(), carried=False)

    def _record(self, index, unit: Unit, first_row: int, rows: int, hashes, rejects: list, record: dict,
                carried: bool) -> dict:
        """The unit's shard record, once its rows are written; its content hashes are saved beside it."""
        record["unit"] = {"sources": list(unit.names), "start": unit.start, "end": unit.end,
                          "first_row": first_row, "carried": carried}
        self.end_row = record["position"]["end_row"]
        self.unit_rejects[index] = len(rejects)
        log.event("ingest", "unit_done", source=unit.names[0], shard=index, rows=rows, rejects=len(rejects),
                  carried=carried)
        return {**record, "rejects": rejects, "arrays": {".hashes.npy": hashes}}

    def recorded(self, index) -> None:
        """--max-rejects as a count, exceeded before the last unit: stop now."""
        self.unrecorded -= 1
        self.rejected += self.unit_rejects.pop(index)
        if self.unrecorded and self.reject_limit.kind == "count" and self.rejected > self.reject_limit.number:
            _check_rejects(self.job, self.units, self.reject_limit, final=False)


def _publish(job: Job, units: list[Unit], plan: Plan, records: list[dict], extra: dict, sample: int | None,
             seed: int, shard_bytes: int) -> dict:
    """The finished shards as the output (the `sample` of their rows, when given), with their content hashes
    and, in the manifest, what --incremental needs to carry units over. Returns the rows carried and parsed."""
    features = output_features(plan.schema)
    work = _work_done(records)
    log.event("ingest", "rows_carried_and_parsed", **work)
    extra = {**extra, "sources": _per_source(records), "schema": schema_dict(plan.schema),
             "read_schema": schema_dict(plan.read_schema),
             "rejects_by_kind": dict(sorted(sum_counts(r.get("reject_kinds", {}) for r in records).items())),
             # what --incremental needs to carry units over: each unit's record, and what names are of
             "units": [{k: v for k, v in r.items() if k != "shard"} for r in records], "work": work}
    keep = None
    if sample is not None:
        extra["sampled_from"] = sum(r["rows"] for r in records)
        keep = _sample_indices(extra["sampled_from"], sample, seed)
    assembly = job.publisher.assemble_dataset(len(units), features, rows=keep, max_shard_size=int(shard_bytes),
                                              reuse_shards=True)
    _write_content_hashes(job, assembly.dir, len(units), plan, keep)
    job.publish(assembly, extra=extra)
    return work


def output_features(schema):
    """The output's features: in `to_dict()` form where hfbatch.dataset maps every column type, so the
    output is saved with pyarrow alone; else `datasets.Features` (timestamps, dictionaries, large lists)."""
    from hfbatch.dataset import features_of

    try:
        return features_of(schema)
    except TypeError:
        import datasets

        return datasets.Features.from_arrow_schema(schema)


def _block_bytes(unit: Unit, streaming: bool) -> int | None:
    """With --streaming, fixed-size blocks (flat memory); without, an uncompressed file in one parse."""
    from hfbatch.io import split_compression

    if streaming or split_compression(unit.paths[0])[1]:
        return None
    return unit.paths[0].stat().st_size + 1


def _progress(tables, on_rows, written: list) -> Iterator:
    """`tables`, their rows reported to `on_rows` and appended to `written` on the way."""
    for table in tables:
        on_rows(table.num_rows)
        written.append(table.num_rows)
        yield table


def _hashed(tables, text_column: str, into: list) -> Iterator:
    """`tables`, collecting the content hash of each row's text into `into` on the way."""
    from hfbatch.hashing import text_hashes

    for table in tables:
        into.append(text_hashes(table.column(text_column)))
        yield table


def _first_row(job: Job, index: int) -> int:
    """A byte range goes on counting lines where the previous range of its file stopped (on resume, from
    that range's record: units are done in order, so it has one)."""
    return _shard_record(job, index - 1)["position"]["end_row"]


def _shard_record(job: Job, index: int) -> dict:
    return json.loads(job.shards.shard_file(index, ".json").read_text())


def _resume_state(job: Job, units: list[Unit], plan: Plan) -> State:
    """Ids and texts of finished shards still count for duplicates, and their rows for --limit."""
    import pyarrow as pa

    state = State(SeenHashes() if plan.id_source else None, SeenHashes() if plan.dedup else None)
    for index in range(len(units)):
        if not job.shards.is_done(index):
            continue
        with pa.memory_map(str(job.shards.shard_file(index))) as source:
            for batch in pa.ipc.open_stream(source):
                if state.ids is not None:
                    state.ids.add_new(hash64(batch.column("id")))
                if state.texts is not None:
                    state.texts.add_new(hash64(batch.column(plan.text_column)))
                state.kept += batch.num_rows
    return state


def _check_rejects(job: Job, units: list[Unit], reject_limit: RejectLimit, final: bool) -> list[dict]:
    """The records of the finished shards; JobFailed, with every reject gathered in one file, where more rows
    than --max-rejects were rejected."""
    n = len(units)
    records = [_shard_record(job, i) for i in range(n) if job.shards.is_done(i)]
    totals = sum_counts(records)
    read, rejected = totals.get("rows_read", 0), totals.get("rejects", 0)
    if rejected > reject_limit.allowed(read):
        kinds = sum_counts(r.get("reject_kinds", {}) for r in records)
        gathered = job.partial / "rejects.jsonl"
        with open(gathered, "wb") as out:
            for i in range(n):
                part = job.shards.shard_file(i, ".rejects.jsonl")
                if part.exists():
                    out.write(part.read_bytes())
        first = json.loads(gathered.read_text().splitlines()[0])
        raise JobFailed(f"{rejected} of {read}{'' if final else '+'} rows were rejected "
                        f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))}"
                        f"), more than --max-rejects {reject_limit.text}; first: {first['source']} row {first['row']}: "
                        f"{first['reason']}; all of them are in {gathered} (raise --max-rejects to accept "
                        f"them: the rows already read are kept)")
    return records


def _per_source(records: list[dict]) -> dict:
    """Each source's counts, summed over the units that read it."""
    names = dict.fromkeys(name for record in records for name in record.get("sources", {}))
    return {name: sum_counts(r["sources"][name] for r in records if name in r.get("sources", {})) for name in names}


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


def _write_content_hashes(job: Job, directory: Path, n_units: int, plan: Plan, keep: np.ndarray | None) -> None:
    """DIRECTORY/content_hashes.parquet: id and text hash of each row (of the rows `keep` when sampled)."""
    import pyarrow as pa

    from hfbatch.dataset import arrow_array, memory_mapped_table
    from hfbatch.hashing import write_hash_file

    ids = pa.chunked_array([chunk for i in range(n_units)
                            for chunk in memory_mapped_table(job.shards.shard_file(i)).column("id").chunks],
                           plan.schema.field("id").type)
    hashes = np.concatenate([np.load(job.shards.shard_file(i, ".hashes.npy")) for i in range(n_units)])
    if keep is not None:
        ids, hashes = ids.take(arrow_array(keep, np.int64)), hashes[keep]
    write_hash_file(directory, ids, hashes, text_column=plan.text_column)
