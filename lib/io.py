"""Reading every input format into Arrow tables, with row-level rejects; opening hfbatch datasets.

Readers are small generators (datatrove style): each yields `Block`s of rows from one source file, with the
rows it could not use. The ingest job decides ids, shards and publishing.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from .errors import InputError
from .runner import require_complete

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
           ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}
BLOCK_ROWS = 65_536


@dataclass
class Block:
    table: pa.Table
    first_row: int  # 1-based row (line) number of the table's first row in its source
    rejects: list[dict] = field(default_factory=list)


def expand_sources(sources: list[str]) -> list[Path]:
    """Files, globs and directories, in a stable (sorted) order; every source must match something."""
    paths: list[Path] = []
    for source in sources:
        if any(ch in source for ch in "*?["):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise InputError(f"{source}: the pattern matches no file")
            paths += [Path(m) for m in matches if Path(m).is_file()]
        elif Path(source).is_dir():
            found = sorted(p for p in Path(source).rglob("*") if p.is_file() and _known(p))
            if not found:
                raise InputError(f"{source}: the directory holds no file of a known format "
                                 f"({', '.join(sorted(set(FORMATS)))}, optionally compressed)")
            paths += found
        elif Path(source).is_file():
            paths.append(Path(source))
        else:
            raise InputError(f"{source}: no such file or directory")
    seen, unique = set(), []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _split_compression(path: Path) -> tuple[str, str | None]:
    name = path.name.lower()
    for ext, comp in COMPRESSIONS.items():
        if name.endswith(ext):
            return name[: -len(ext)], comp
    return name, None


def _known(path: Path) -> bool:
    base, _ = _split_compression(path)
    return Path(base).suffix in FORMATS


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    base, _ = _split_compression(path)
    suffix = Path(base).suffix
    if suffix not in FORMATS:
        raise InputError(f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
                         f"pass --format csv|tsv|json|jsonl|parquet|text")
    return FORMATS[suffix]


def open_binary(path: Path):
    """A binary stream of the file's decompressed bytes."""
    _, comp = _split_compression(path)
    if comp == "gzip":
        return gzip.open(path, "rb")
    if comp == "bz2":
        return bz2.open(path, "rb")
    if comp == "xz":
        return lzma.open(path, "rb")
    if comp == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _reject(path: Path, row: int, reason: str, raw) -> dict:
    snippet = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return {"source": str(path), "row": row, "reason": reason, "raw": snippet[:200]}


def read_jsonl(path: Path) -> Iterator[Block]:
    """JSON Lines, one object per line; a line that is not a JSON object becomes a reject."""
    with open_binary(path) as fh:
        rows, rejects, first, line_no = [], [], 1, 0
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                rejects.append(_reject(path, line_no, f"malformed JSON: {exc.__class__.__name__}: {exc}", raw))
                continue
            if not isinstance(obj, dict):
                rejects.append(_reject(path, line_no, "line is not a JSON object", raw))
                continue
            obj["__row"] = line_no
            rows.append(obj)
            if len(rows) >= BLOCK_ROWS:
                yield Block(pa.Table.from_pylist(rows), first, rejects)
                rows, rejects, first = [], [], line_no + 1
        if rows or rejects:
            yield Block(pa.Table.from_pylist(rows) if rows else pa.table({}), first, rejects)


def read_json(path: Path, field_name: str | None = None) -> Iterator[Block]:
    with open_binary(path) as fh:
        try:
            data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc}); for one object per line use --format jsonl")
    if isinstance(data, dict):
        key = field_name or ("data" if "data" in data else None)
        if key is None or not isinstance(data.get(key), list):
            raise InputError(f"{path}: a JSON object at the top; name the list of records with --field "
                             f"(keys: {', '.join(list(data)[:10])})")
        data = data[key]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of objects")
    rows, rejects = [], []
    for i, obj in enumerate(data, start=1):
        if isinstance(obj, dict):
            rows.append({**obj, "__row": i})
        else:
            rejects.append(_reject(path, i, "record is not a JSON object", json.dumps(obj)[:200]))
    for start in range(0, max(len(rows), 1), BLOCK_ROWS):
        part = rows[start:start + BLOCK_ROWS]
        yield Block(pa.Table.from_pylist(part) if part else pa.table({}), start + 1,
                    rejects if start == 0 else [])


def read_csv(path: Path, delimiter: str) -> Iterator[Block]:
    import pyarrow.csv as pcsv

    rejects: list[dict] = []

    def on_invalid(row):  # wrong field count: keep going, remember it
        rejects.append(_reject(path, row.number or -1, f"expected {row.expected_columns} fields, got "
                                                       f"{row.actual_columns}", row.text))
        return "skip"

    try:
        reader = pcsv.open_csv(open_binary(path), parse_options=pcsv.ParseOptions(
            delimiter=delimiter, invalid_row_handler=on_invalid, newlines_in_values=True),
            read_options=pcsv.ReadOptions(block_size=1 << 24),
            convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: cannot read as {'TSV' if delimiter == chr(9) else 'CSV'}: {exc}")
    row = 1
    for batch in reader:
        table = pa.Table.from_batches([batch])
        table = table.append_column("__row", pa.array(range(row, row + table.num_rows), pa.int64()))
        yield Block(table, row, rejects[:])
        rejects.clear()
        row += table.num_rows
    if rejects:
        yield Block(pa.table({}), row, rejects)


def read_parquet(path: Path) -> Iterator[Block]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(open_binary(path) if _split_compression(path)[1] else path)
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: not a Parquet file ({exc})")
    row = 1
    for batch in parquet.iter_batches(batch_size=BLOCK_ROWS):
        table = pa.Table.from_batches([batch])
        table = table.append_column("__row", pa.array(range(row, row + table.num_rows), pa.int64()))
        yield Block(table, row)
        row += table.num_rows


def read_text(path: Path) -> Iterator[Block]:
    """Plain text, one document per line; undecodable lines are rejects."""
    with open_binary(path) as fh:
        texts, numbers, rejects, first = [], [], [], 1
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                rejects.append(_reject(path, line_no, f"undecodable bytes: {exc}", raw))
                continue
            texts.append(text)
            numbers.append(line_no)
            if len(texts) >= BLOCK_ROWS:
                yield Block(pa.table({"text": texts, "__row": numbers}), first, rejects)
                texts, numbers, rejects, first = [], [], [], line_no + 1
        if texts or rejects:
            yield Block(pa.table({"text": texts, "__row": numbers}), first, rejects)


def read_source(path: Path, fmt: str, json_field: str | None = None) -> Iterator[Block]:
    fmt = detect_format(path, fmt)
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: the file is empty")
    try:
        if fmt == "jsonl":
            yield from read_jsonl(path)
        elif fmt == "json":
            yield from read_json(path, json_field)
        elif fmt in ("csv", "tsv"):
            yield from read_csv(path, "," if fmt == "csv" else "\t")
        elif fmt == "parquet":
            yield from read_parquet(path)
        elif fmt == "text":
            yield from read_text(path)
        else:
            raise InputError(f"{path}: unknown format {fmt!r}")
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise InputError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc}); is it really {fmt}?")


# ---- hfbatch datasets ----------------------------------------------------------------------------------

def open_dataset(path, what: str = "dataset"):
    """A finished hfbatch dataset, memory-mapped (refused without a manifest)."""
    import datasets

    manifest = require_complete(Path(path), what)
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise InputError(f"{what} {path} is not a saved dataset ({exc})")
    if not isinstance(dataset, datasets.Dataset):
        raise InputError(f"{what} {path} holds several splits; give one split's directory")
    return dataset, manifest


def require_column(dataset, column: str, path, option: str = "--text-column") -> None:
    if column not in dataset.column_names:
        raise InputError(f"{path}: no column {column!r}; available: {', '.join(dataset.column_names)} "
                         f"(choose one with {option})")
