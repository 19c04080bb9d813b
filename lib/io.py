"""Reading every input format into Arrow tables, with row-level rejects; opening hfbatch datasets.

A source is read as a stream of `Block`s by small generators (datatrove style). Line-based text (JSON
Lines, plain text) is read in byte blocks cut at line ends, and pyarrow parses a whole block in one call;
only a block pyarrow refuses is looked at line by line, to reject the bad lines and keep the others. CSV
goes through pyarrow's streaming reader, Parquet through its batch reader. Every reader is given the
column types to use (`sniff_schema`, from the first block of the first source), so all blocks and files
agree and a value of the wrong type rejects its row instead of failing the job.

Row numbers (`__row`, and `row` in rejects) are 1-based: the line number for JSON Lines and text (blank
lines count), the data record number for CSV/TSV (the header and blank lines do not), the record index
for JSON arrays and Parquet.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import io
import json
import lzma
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .dataset import arrow_array, arrow_binary, arrow_null, arrow_strings
from .errors import InputError
from .runner import read_manifest, require_complete

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
           ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}
FORMAT_NAMES = ["csv", "tsv", "json", "jsonl", "parquet", "text"]
BLOCK_BYTES = 16 << 20  # bytes parsed per pyarrow call: large enough to be fast, small enough for flat RSS
BLOCK_ROWS = 65_536     # rows per block for record-oriented formats (Parquet, JSON arrays)
SNIFF_BYTES = 8192
MAGIC = {b"\x1f\x8b": "gzip (.gz)", b"\x28\xb5\x2f\xfd": "zstd (.zst)", b"\xfd7zXZ": "xz (.xz)",
         b"PAR1": "Parquet (.parquet)"}


@dataclass
class Block:
    table: pa.Table  # the usable rows, with `__row`
    rejects: list[dict] = field(default_factory=list)
    end_row: int = 0  # the row number just after this block: where the next byte range goes on counting


def reject(source, row: int, kind: str, reason: str, raw) -> dict:
    """One line of rejects.jsonl: where the row was, why it was refused, and its first 200 characters."""
    snippet = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return {"source": str(source), "row": int(row), "kind": kind, "reason": reason, "raw": snippet[:200]}


# ---- sources and formats --------------------------------------------------------------------------------

def expand_sources(sources: list[str], any_name: bool = False) -> list[Path]:
    """Files, globs and directories, in a stable (sorted) order; every source must match something.
    A directory contributes its files of known formats (with `any_name`: all its files but hidden ones)."""
    paths: list[Path] = []
    for source in sources:
        if any(ch in source for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(source, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise InputError(f"{source}: the pattern matches no file")
            paths += matches
        elif Path(source).is_dir():
            if _is_hfbatch_output(Path(source)):  # its files are hfbatch's own, not a corpus
                raise InputError(f"{source} is an hfbatch output, not a directory of source files; give it to "
                                 f"embed, classify or tokenize as it is, or write it out with `hfbatch export`")
            found = sorted(p for p in Path(source).rglob("*") if p.is_file() and not _hidden(p, Path(source))
                           and (any_name or _known(p)))
            if not found:
                raise InputError(f"{source}: the directory holds no file of a known format "
                                 f"({', '.join(sorted(FORMATS))}, optionally {', '.join(COMPRESSIONS)})")
            paths += found
        elif Path(source).is_file():
            paths.append(Path(source))
        else:
            raise InputError(f"{source}: no such file or directory")
    return list({p.resolve(): p for p in paths}.values())  # first occurrence wins, order kept


def _is_hfbatch_output(directory: Path) -> bool:
    try:
        return read_manifest(directory) is not None
    except InputError:  # a manifest.json of the user's own, in a corpus
        return False


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def split_compression(path: Path) -> tuple[str, str | None]:
    name = path.name.lower()
    for ext, comp in COMPRESSIONS.items():
        if name.endswith(ext):
            return name[: -len(ext)], comp
    return name, None


def _known(path: Path) -> bool:
    return Path(split_compression(path)[0]).suffix in FORMATS


def detect_format(path: Path, fmt: str = "auto", json_field: str | None = None) -> str:
    """The format from the extension. A `.json` file holding one object per line is JSON Lines (as in
    `datasets`); anything else the extension does not tell is an error asking for --format."""
    if fmt != "auto":
        return fmt
    base, _ = split_compression(path)
    suffix = Path(base).suffix
    if suffix not in FORMATS:
        raise InputError(f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
                         f"pass --format {'|'.join(FORMAT_NAMES)}")
    if FORMATS[suffix] == "json" and json_field is None:
        with reading(path, "json"), open_binary(path) as fh:
            first = fh.readline(1 << 20).strip()
            more = fh.read(4096).strip()
        obj = _json_object(first) if first.startswith(b"{") else None
        # several one-line objects, or a single one that holds no list of records
        if obj is not None and (more or not any(isinstance(v, list) for v in obj.values())):
            return "jsonl"
    return FORMATS[suffix]


def _json_object(line: bytes) -> dict | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _is_json_object(line: bytes) -> bool:
    return _json_object(line) is not None


def open_binary(path: Path):
    """A binary stream of the file's decompressed bytes. These decompressors all raise on a truncated
    file (pyarrow's gzip and the zstandard package would silently return what they got)."""
    _, comp = split_compression(path)
    if comp == "gzip":
        return gzip.open(path, "rb")
    if comp == "bz2":
        return bz2.open(path, "rb")
    if comp == "xz":
        return lzma.open(path, "rb")
    if comp == "zstd":  # (buffered: pyarrow's stream has no readline)
        return io.BufferedReader(pa.input_stream(str(path), compression="zstd"), 1 << 20)
    return open(path, "rb")


@contextlib.contextmanager
def reading(path: Path, fmt: str):
    """Errors from the file itself (corrupt or truncated compression, I/O) as one clear InputError."""
    try:
        yield
    except (OSError, EOFError, lzma.LZMAError) as exc:
        comp = split_compression(path)[1]
        raise InputError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc}); is it really {fmt}"
                         f"{' (' + comp + ')' if comp else ''}?")


def check_readable(path: Path, fmt: str) -> None:
    """Refuse at once a file that cannot be `fmt`: empty, or binary where text is expected."""
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: the file is empty")
    if fmt == "parquet":
        return
    with reading(path, fmt), open_binary(path) as fh:
        head = fh.read(SNIFF_BYTES)
    if not head:
        raise InputError(f"{path}: the file is empty once decompressed")
    if b"\0" in head:
        kind = next((name for magic, name in MAGIC.items() if head.startswith(magic)), None)
        hint = f"it is {kind} data; name it accordingly or pass --format" if kind else \
            "it looks like binary data (or UTF-16 text; convert it to UTF-8)"
        raise InputError(f"{path}: not {fmt} text: {hint}")


def split_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """Byte ranges of about `size` bytes, each starting at a line start: one shard each, so a huge file
    resumes in pieces and no piece has to fit in memory."""
    total = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as fh:
        while cuts[-1] + size < total:
            fh.seek(cuts[-1] + size)
            fh.readline()
            if fh.tell() >= total:
                break
            cuts.append(fh.tell())
    return list(zip(cuts, cuts[1:] + [total]))


# ---- byte blocks ----------------------------------------------------------------------------------------

def line_blocks(stream, block_bytes: int = BLOCK_BYTES, limit: int | None = None) -> Iterator[bytes]:
    """Blocks of whole lines, each ending with b"\\n", about `block_bytes` each; at most `limit` bytes
    (a byte range ends at a line start, so completing the last line with readline() stays inside it)."""
    left = limit
    while left is None or left > 0:
        data = stream.read(block_bytes if left is None else min(block_bytes, left))
        if not data:
            return
        if data[-1] != 10:
            data += stream.readline() or b""
        if left is not None:
            left -= len(data)
        yield data if data[-1] == 10 else data + b"\n"  # (the file's last line may have no newline)


def _line_ends(data, scratch: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of the newlines in `data`. The comparison goes into a reused scratch buffer: a fresh 16 MB
    array per block costs more in page faults than the scan itself."""
    if scratch is None or len(scratch) < len(data):
        scratch = np.empty(len(data) + (1 << 20), bool)
    view = scratch[:len(data)]
    np.equal(np.frombuffer(data, np.uint8), 10, out=view)
    return np.flatnonzero(view), scratch


def _line_rows(data, ends: np.ndarray, first_row: int, n_rows: int) -> pa.Array | None:
    """Line numbers of the `n_rows` rows pyarrow parsed from `data` (it skips blank lines); None when the
    rows are not one per non-blank line (several objects on a line), so the block is checked by hand.
    Blank lines are looked for even when the totals agree: one blank line and one line holding two objects
    would otherwise shift every number after them."""
    starts = np.concatenate([[0], ends[:-1] + 1])
    blank = np.zeros(len(ends), bool)
    for i in np.flatnonzero(ends - starts <= 16):  # only short lines can be blank: no Python loop over all
        blank[i] = not data[starts[i]:ends[i]].strip()
    if len(ends) - blank.sum() != n_rows:
        return None
    if not blank.any():
        return arrow_array(np.arange(first_row, first_row + len(ends), dtype=np.int64))
    return arrow_array(first_row + np.flatnonzero(~blank), np.int64)


def _utf8_ok(table: pa.Table) -> bool:
    """pyarrow's JSON and CSV (check_utf8=False) readers do not check UTF-8; this does, for the block."""
    try:
        for column in table.columns:
            if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
                column.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def bisect_parse(items: list, rows: list[int], parse: Callable[[list], pa.Table], source,
                 rejects: list[dict], raw: Callable = lambda item: item) -> Iterator[pa.Table]:
    """Parse `items` together; where that fails, halves, down to single items, which are rejected with
    the parser's message. Only as many parses as bad items times log(n)."""
    if not items:
        return
    try:
        table = parse(items)
        if table.num_rows != len(items):
            raise pa.ArrowInvalid("several JSON values on one line")
        if not _utf8_ok(table):
            raise pa.ArrowInvalid("undecodable bytes (not UTF-8)")
        yield table.append_column("__row", arrow_array(rows, np.int64))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        if len(items) == 1:
            message = str(exc).replace("JSON parse error: ", "").split(" in row ")[0]
            kind = "undecodable" if "UTF-8" in message else \
                "bad_value" if ("changed from" in message or "convert" in message or "Expected" in message) \
                else "malformed_json"
            rejects.append(reject(source, rows[0], kind, message, raw(items[0])))
            return
        mid = len(items) // 2
        yield from bisect_parse(items[:mid], rows[:mid], parse, source, rejects, raw)
        yield from bisect_parse(items[mid:], rows[mid:], parse, source, rejects, raw)


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    full = schema.append(pa.field("__row", pa.int64()))
    return pa.concat_tables(tables) if tables else full.empty_table()


# ---- schemas --------------------------------------------------------------------------------------------

def _settle_type(t: pa.DataType) -> pa.DataType:
    """Types to read every later block with: a column with no value yet (null) becomes text, and text that
    pyarrow took for a date or timestamp stays text, so it round-trips exactly as written."""
    if pa.types.is_null(t) or pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_settle_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_settle_type(f.type)) for f in t])
    if pa.types.is_binary(t):  # CSV text with invalid UTF-8: still text, the bad rows are rejected
        return pa.string()
    return t


def settle(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(_settle_type(f.type)) for f in schema if f.name != "__row"])


def _unify(tables: list[pa.Table]) -> pa.Schema | None:
    if not tables:
        return None
    try:
        return pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return tables[0].schema


def sniff_schema(path: Path, fmt: str, json_field: str | None = None) -> pa.Schema | None:
    """The columns and types of a source, from its first block; None when it has no row at all."""
    if fmt == "text":
        return pa.schema([("text", pa.string())])
    if fmt == "parquet":
        return _parquet_file(path).schema_arrow
    if fmt == "json":
        records = _json_records(path, json_field)[:1000]
        good = []
        for record in (r for r in records if isinstance(r, dict)):
            try:
                good.append(pa.Table.from_pylist([record]))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass
        schema = _unify(good) if isinstance(records, list) else None
        return settle(schema) if schema else None
    if fmt in ("csv", "tsv"):
        return _sniff_csv(path, fmt)
    with reading(path, fmt), open_binary(path) as fh:
        data = next(line_blocks(fh, min(BLOCK_BYTES, 4 << 20)), b"")
    if fmt == "jsonl":
        import pyarrow.json as pj

        try:
            schema = pj.read_json(pa.BufferReader(data)).schema
        except pa.ArrowInvalid:  # a bad line in the first block: unify what the first good lines say
            lines = [line for line in data.split(b"\n")[:1000] if line.strip() and _is_json_object(line)]
            tables = []
            for line in lines:
                try:
                    tables.append(pj.read_json(pa.BufferReader(line),  # (a line longer than a default block)
                                               read_options=pj.ReadOptions(block_size=len(line) + 1)))
                except pa.ArrowInvalid:
                    pass
            schema = _unify(tables)
        return settle(schema) if schema is not None else None
    raise InputError(f"{path}: unknown format {fmt!r}")


def _sniff_csv(path: Path, fmt: str) -> pa.Schema:
    """pyarrow's type inference on the first block (its streaming reader cuts blocks between records,
    which a cut at a line end would not: quoted values may hold newlines), then settled."""
    import pyarrow.csv as pcsv

    try:
        with reading(path, fmt), open_binary(path) as fh:
            reader = pcsv.open_csv(fh, read_options=pcsv.ReadOptions(block_size=1 << 20),
                                   parse_options=_csv_parse_options(fmt, lambda row: "skip"),
                                   convert_options=pcsv.ConvertOptions(check_utf8=False))
            return settle(reader.schema)
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: cannot read as {fmt.upper()}: {exc}")


# ---- readers --------------------------------------------------------------------------------------------

def read_source(path: Path, fmt: str, schema: pa.Schema, *, source=None, start: int = 0, end: int | None = None,
                first_row: int = 1, json_field: str | None = None, block_bytes: int | None = None) -> Iterator[Block]:
    """Blocks of `path` (bytes `start`..`end` of an uncompressed line-based file, whose first line is row
    `first_row`), with the columns of `schema`, about `block_bytes` each. Errors reading the file itself
    are one clear InputError."""
    source = source or path
    block_bytes = block_bytes or BLOCK_BYTES
    with reading(path, fmt):
        if fmt in ("jsonl", "text"):
            with open_binary(path) as fh:
                if start:
                    fh.seek(start)
                blocks = line_blocks(fh, block_bytes, limit=None if end is None else end - start)
                if fmt == "jsonl":
                    yield from read_jsonl(blocks, source, schema, first_row)
                else:
                    yield from read_text(blocks, source, first_row)
        elif fmt in ("csv", "tsv"):
            with open_binary(path) as fh:
                yield from read_csv(fh, source, schema, fmt, block_bytes)
        elif fmt == "parquet":
            yield from read_parquet(path, schema)
        elif fmt == "json":
            yield from read_json(path, source, schema, json_field)
        else:
            raise InputError(f"{path}: unknown format {fmt!r}")


def read_jsonl(blocks: Iterator[bytes], source, schema: pa.Schema, first_row: int = 1) -> Iterator[Block]:
    import pyarrow.json as pj

    fast = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")

    def parse(lines: list[bytes]) -> pa.Table:  # one block for the whole buffer: no line can straddle two
        data = b"\n".join(lines)
        return pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(block_size=len(data) + 1),
                            parse_options=fast)

    row, scratch = first_row, None
    for data in blocks:
        ends, scratch = _line_ends(data, scratch)
        n_lines = len(ends)
        try:
            table = pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(block_size=1 << 20),
                                 parse_options=fast)
            rows = _line_rows(data, ends, row, table.num_rows)
        except pa.ArrowInvalid:
            table, rows = None, None
        if rows is not None and _utf8_ok(table):
            yield Block(table.append_column("__row", rows), [], row + n_lines)
        else:
            yield _jsonl_by_line(data, row, source, schema, parse)
        row += n_lines


def _jsonl_by_line(data: bytes, first_row: int, source, schema, parse) -> Block:
    """The slow path, for a block pyarrow refused: say what is wrong with each bad line, keep the rest."""
    good, rows, rejects = [], [], []
    for i, line in enumerate(data.split(b"\n")[:-1]):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as exc:
            rejects.append(reject(source, first_row + i, "undecodable", f"undecodable bytes: {exc}", line))
        except ValueError as exc:
            rejects.append(reject(source, first_row + i, "malformed_json", f"malformed JSON: {exc}", line))
        else:
            if isinstance(obj, dict):
                good.append(line)
                rows.append(first_row + i)
            else:
                rejects.append(reject(source, first_row + i, "not_an_object",
                                      f"a JSON {type(obj).__name__}, not an object", line))
    tables = list(bisect_parse(good, rows, parse, source, rejects))
    rejects.sort(key=lambda r: r["row"])
    return Block(_concat(tables, schema), rejects, first_row + data.count(b"\n"))


def read_text(blocks: Iterator[bytes], source, first_row: int = 1) -> Iterator[Block]:
    """Plain text, one document per line; blank lines separate nothing and are skipped."""
    row = first_row
    for data in blocks:
        lines = data.split(b"\n")[:-1]
        keep = np.fromiter((bool(line.strip()) for line in lines), bool, len(lines))
        numbers = np.arange(row, row + len(lines), dtype=np.int64)[keep]
        lines = [line.rstrip(b"\r") for line, k in zip(lines, keep) if k]
        rejects = []
        try:
            texts = arrow_binary(lines).cast(pa.string())  # the cast checks UTF-8 for all at once
        except pa.ArrowInvalid:
            ok = []
            for i, line in enumerate(lines):
                try:
                    line.decode("utf-8")
                    ok.append(i)
                except UnicodeDecodeError as exc:
                    rejects.append(reject(source, numbers[i], "undecodable", f"undecodable bytes: {exc}", line))
            texts = arrow_binary([lines[i] for i in ok]).cast(pa.string())
            numbers = numbers[np.array(ok, np.int64)]
        row += len(keep)
        yield Block(pa.table({"text": texts, "__row": arrow_array(numbers, np.int64)}), rejects, row)


def read_documents(paths: list[Path], names: list[str], block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """One document per file (`--by file`): its whole text, named by the file, in blocks of about
    `block_bytes`; an unreadable or undecodable file is a rejected row, not the end of the job."""
    texts, sources, rejects, size = [], [], [], 0
    for path, name in zip(paths, names):
        try:
            with open_binary(path) as fh:
                raw = fh.read()
        except (OSError, EOFError, lzma.LZMAError) as exc:
            rejects.append(reject(name, 1, "unreadable", f"cannot read it: {exc}", b""))
            continue
        try:
            texts.append(raw.decode("utf-8"))
            sources.append(name)
            size += len(raw)
        except UnicodeDecodeError as exc:
            rejects.append(reject(name, 1, "undecodable", f"undecodable bytes: {exc}", raw[:200]))
        if size >= block_bytes:
            yield _documents_block(texts, sources, rejects)
            texts, sources, rejects, size = [], [], [], 0
    if texts or rejects:
        yield _documents_block(texts, sources, rejects)


def _documents_block(texts: list[str], sources: list[str], rejects: list[dict]) -> Block:
    table = pa.table({"text": arrow_strings(texts), "__source": arrow_strings(sources),
                      "__row": arrow_array(np.ones(len(texts), np.int64))})
    return Block(table, rejects, 2)


def _csv_parse_options(fmt: str, on_invalid):
    import pyarrow.csv as pcsv

    return pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True,
                             invalid_row_handler=on_invalid)


def read_csv(stream, source, schema: pa.Schema, fmt: str = "csv", block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """CSV/TSV through pyarrow's streaming reader. Every column is read as text and cast here to the
    sniffed type, so a bad value in row 900,000 rejects that row instead of stopping the reader.
    Single-threaded, because only then does pyarrow tell the record number of a row with the wrong
    number of fields (needed to number the good rows around it exactly)."""
    import pyarrow.csv as pcsv

    bad_records: list[int] = []  # data record numbers of rows with the wrong field count, not yet passed
    rejects: list[dict] = []

    def on_invalid(row):
        number = (row.number or 0) - 1  # pyarrow counts the header as record 1
        bad_records.append(number)
        rejects.append(reject(source, number, "wrong_field_count", f"expected {row.expected_columns} fields, "
                                                                     f"got {row.actual_columns}", row.text))
        return "skip"

    try:
        read_options = pcsv.ReadOptions(use_threads=False, block_size=min(block_bytes, 1 << 30))
        reader = pcsv.open_csv(stream, read_options=read_options,
                               parse_options=_csv_parse_options(fmt, on_invalid),
                               convert_options=pcsv.ConvertOptions(
                                   check_utf8=False, strings_can_be_null=False,
                                   column_types={f.name: pa.string() for f in schema},
                                   include_columns=schema.names, include_missing_columns=True))
    except pa.ArrowInvalid as exc:
        raise InputError(f"{source}: cannot read as {fmt.upper()}: {exc}")
    next_record = 1
    for batch in reader:
        n = batch.num_rows
        pending = np.array(sorted(b for b in bad_records if b >= next_record), np.int64)
        candidates = np.arange(next_record, next_record + n + len(pending), dtype=np.int64)
        rows = candidates[~np.isin(candidates, pending)][:n]
        next_record = int(rows[-1]) + 1 if n else next_record
        bad_records[:] = [b for b in bad_records if b >= next_record]
        table, cast_rejects = _cast_columns(pa.Table.from_batches([batch]), schema, rows, source)
        yield Block(table, sorted(rejects + cast_rejects, key=lambda r: r["row"]), next_record)
        rejects.clear()
    if rejects:
        yield Block(_concat([], schema), rejects, next_record)


def _cast_columns(table: pa.Table, schema: pa.Schema, rows: np.ndarray, source) -> tuple[pa.Table, list[dict]]:
    """Text columns (CSV) to the schema's types; a row whose value does not convert, or whose bytes are
    not UTF-8, is rejected. The whole-column cast is the fast path; per-value checks only where it fails."""
    import pyarrow.compute as pc

    bad = np.zeros(table.num_rows, bool)
    reasons: dict[int, tuple[str, str]] = {}
    columns = []
    for f in schema:
        col = table.column(f.name)
        if pa.types.is_string(f.type):
            try:
                col.validate(full=True)
            except pa.ArrowInvalid:
                undecodable = np.zeros(table.num_rows, bool)
                for i, value in enumerate(col.cast(pa.binary()).to_pylist()):
                    try:
                        value is None or value.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        undecodable[i] = True
                        reasons.setdefault(i, ("undecodable", f"column {f.name!r}: undecodable bytes: {exc}"))
                bad |= undecodable  # (and null the value, or showing the rejected row would fail too)
                col = pc.if_else(arrow_array(undecodable), arrow_null(pa.string()), col)
            columns.append(col)
            continue
        col = pc.if_else(pc.equal(col, arrow_strings([""])[0]), arrow_null(pa.string()), col)  # empty field: no value
        try:
            columns.append(col.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = col.to_pylist()
            for i, value in enumerate(values):
                try:
                    pa.array([value], pa.string()).cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    bad[i] = True
                    values[i] = None
                    reasons.setdefault(i, ("bad_value", f"column {f.name!r}: {value!r} is not {f.type}"))
            columns.append(pa.array(values, pa.string()).cast(f.type))
    table = pa.Table.from_arrays(columns, schema=schema).append_column("__row", arrow_array(rows, np.int64))
    if not bad.any():
        return table, []
    rejected = table.filter(arrow_array(bad)).to_pylist()
    rejects = [reject(source, r["__row"], *reasons[i], json.dumps({k: v for k, v in r.items() if k != "__row"},
                                                                   default=str))
               for i, r in zip(np.flatnonzero(bad), rejected)]
    return table.filter(arrow_array(~bad)), rejects


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    with reading(path, "parquet"):
        if split_compression(path)[1]:  # a compressed Parquet file must be decompressed to seek in it
            with open_binary(path) as fh:
                data = pa.BufferReader(fh.read())
    try:
        return pq.ParquetFile(data if split_compression(path)[1] else path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: not a Parquet file ({exc})")


def read_parquet(path: Path, schema: pa.Schema) -> Iterator[Block]:
    parquet = _parquet_file(path)
    present = [n for n in schema.names if n in parquet.schema_arrow.names]
    row = 1
    for batch in parquet.iter_batches(batch_size=BLOCK_ROWS, columns=present):
        table = pa.Table.from_batches([batch])
        table = table.append_column("__row", arrow_array(np.arange(row, row + table.num_rows, dtype=np.int64)))
        row += table.num_rows
        yield Block(table, [], row)


def _json_records(path: Path, json_field: str | None) -> list:
    """A JSON document's records: the array itself, or the list under `--field` (dotted) or `data`.
    The document is read whole (JSON has no record boundaries to stream by): use JSON Lines for big data."""
    try:
        with reading(path, "json"), open_binary(path) as fh:
            data = json.load(fh)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 JSON ({exc})")
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); for one object per line use --format jsonl")
    if isinstance(data, dict):
        key = json_field or ("data" if "data" in data else None)
        if key is None:
            raise InputError(f"{path}: an object at the top, not an array; name the list of records with "
                             f"--field (its keys: {', '.join(list(data)[:10])})")
        for part in key.split("."):
            if not isinstance(data, dict) or part not in data:
                raise InputError(f"{path}: no key {key!r} (--field)")
            data = data[part]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected an array of records{' at ' + repr(json_field) if json_field else ''}")
    return data


def read_json(path: Path, source, schema: pa.Schema, json_field: str | None) -> Iterator[Block]:
    records = _json_records(path, json_field)

    def parse(items: list) -> pa.Table:
        return pa.Table.from_pylist(items, schema=schema)

    for start in range(0, len(records), BLOCK_ROWS):
        part, rejects, good, rows = records[start:start + BLOCK_ROWS], [], [], []
        for i, record in enumerate(part, start=start + 1):
            if isinstance(record, dict):
                good.append(record)
                rows.append(i)
            else:
                rejects.append(reject(source, i, "not_an_object", f"a JSON {type(record).__name__}, not an "
                                      f"object", json.dumps(record)))
        tables = list(bisect_parse(good, rows, parse, source, rejects, raw=json.dumps))
        yield Block(_concat(tables, schema), sorted(rejects, key=lambda r: r["row"]), start + len(part) + 1)


# ---- hfbatch datasets -----------------------------------------------------------------------------------

def open_dataset(path, what: str = "dataset", validate: bool = True):
    """A finished hfbatch dataset, memory-mapped (refused without a manifest). `validate=False` is for a
    reader that touches a few rows and validates those (search's hits): see `_load_refusing`."""

    manifest = require_complete(Path(path), what)
    return load_saved_dataset(path, what, manifest["job"], validate), manifest


def open_arrow_dataset(path, what: str = "dataset"):
    """`open_dataset` read with pyarrow alone (a hfbatch.dataset.SavedDataset), for jobs that only read its
    columns (embed, classify): they never import datasets, about a second of every run."""
    manifest = require_complete(Path(path), what)
    return read_saved_dataset(path, what, manifest["job"]), manifest


def load_saved_dataset(path, what: str = "dataset", job: str | None = None, validate: bool = True):
    """`datasets.load_from_disk`, memory-mapped; a damaged one is refused with what to re-run."""
    import datasets

    return _load_refusing(lambda: datasets.load_from_disk(str(path)), path, what, job, validate)


def read_saved_dataset(path, what: str = "dataset", job: str | None = None):
    """`load_saved_dataset` with pyarrow alone: a hfbatch.dataset.SavedDataset over the memory-mapped files."""
    from .dataset import SavedDataset

    return _load_refusing(lambda: SavedDataset.open(path), path, what, job)


def _load_refusing(load: Callable, path, what: str, job: str | None, validate: bool = True):
    """`load()` of the saved dataset at `path`, or one line saying why it cannot be: several splits (a
    DatasetDict, which datasets.load_from_disk knows as it does: its dataset_dict.json, where there is no
    dataset's state.json and dataset_info.json), missing or damaged files.

    A data file damaged in place (same size, bytes changed) opens, and its memory-mapped offsets then point
    anywhere: reading the text raised SystemError or UnicodeDecodeError, and export died of a segfault. So
    the data is validated in full (offsets in bounds, UTF-8) before a job reads it: ~5 GB/s here, against
    jobs that read every row anyway."""
    from .dataset import INFO_FILE, STATE_FILE

    folder = Path(path)
    if (folder / "dataset_dict.json").is_file() and not all((folder / f).is_file() for f in (STATE_FILE, INFO_FILE)):
        raise InputError(f"{what} {path} holds several splits; give one split's directory")
    try:
        dataset = load()
        if validate:
            table = dataset.data
            getattr(table, "table", table).validate(full=True)  # (datasets wraps the pyarrow table)
        return dataset
    except FileNotFoundError as exc:
        raise InputError(f"{what} {path} is not a saved dataset ({exc})")
    except (ValueError, KeyError, IndexError, TypeError, OSError, pa.ArrowException) as exc:
        # a damaged state.json / dataset_info.json (JSONDecodeError is a ValueError) or .arrow file; an
        # IndexError: no data file (how datasets saved no rows, before hfbatch saved those as one empty file)
        raise damaged(what, path, job, exc)


def damaged(what: str, path, job: str | None, exc: Exception) -> InputError:
    """The one line for a saved dataset whose files are damaged: which, why, and what to re-run."""
    return InputError(f"{what} {path} is damaged ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}); "
                      f"re-run the {f'`hfbatch {job}`' if job else 'job'} that made it, with --force")


def require_column(dataset, column: str, path, option: str = "--text-column") -> None:
    if column not in dataset.column_names:
        raise InputError(f"{path}: no column {column!r}; available: {', '.join(dataset.column_names)} "
                         f"(choose one with {option})")


def require_text_column(dataset, column: str, path, option: str = "--text-column") -> None:
    """A column a model reads: text in every row. A missing value is refused, not skipped, because the
    output has one row per input row, in its order (ingest already rejects rows without text)."""
    require_column(dataset, column, path, option)
    kind = dataset.data.schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"{path}: column {column!r} holds {kind}, not text (choose another with {option})")
    nulls = dataset.data.column(column).null_count
    if nulls:
        first = dataset.data.column(column).is_null().index(True).as_py()
        raise InputError(f"{path}: column {column!r} has {nulls} missing value(s), the first in row {first + 1}; "
                         f"re-run `hfbatch ingest --text-column {column}` (it rejects rows without text) or "
                         f"choose another column with {option}")
