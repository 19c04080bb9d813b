"""The export job (`hfbatch export`): an hfbatch dataset -> one JSON Lines, CSV/TSV or Parquet file, written
atomically.

The file is written beside its destination under a temporary name, fsynced, then renamed over it: a
reader (or a cron job killed half-way) sees the old file or the new one, never a part. An existing file is
replaced only when it is the one an earlier export wrote (its size, mtime and inode, recorded beside it in
hfbatch's own `.NAME.hfbatch-export.json`), or with --force: hfbatch never overwrites a user's file unasked.
The writing is datasets' own (`to_json`, `to_csv`, `to_parquet`), through a compressor when the name asks for one.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from pathlib import Path

from .errors import InputError, JobFailed
from .io import open_dataset, split_compression
from .runner import OutputLock, OutputPaths, refuse_output_inside_inputs, write_json_atomic

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}


def export_format(path: Path, fmt: str) -> tuple[str, str | None]:
    """(format, compression) from --format or the file name, e.g. out.jsonl.gz -> (jsonl, gzip)."""
    base, compression = split_compression(path)
    if fmt == "auto":
        suffix = Path(base).suffix
        if suffix not in FORMATS:
            raise InputError(f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
                             f"name it .jsonl, .csv, .tsv or .parquet (optionally .gz/.bz2/.xz/.zst) "
                             f"or pass --format")
        fmt = FORMATS[suffix]
    if fmt == "parquet" and compression:
        raise InputError(f"{path}: Parquet compresses its own columns; drop the {compression} extension")
    return fmt, compression


def _compressed(fh, compression: str | None):
    if compression == "gzip":
        return gzip.GzipFile(fileobj=fh, mode="wb")
    if compression == "bz2":
        return bz2.BZ2File(fh, "wb")
    if compression == "xz":
        return lzma.LZMAFile(fh, "wb")
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().stream_writer(fh, closefd=False)
    return None


def write_dataset(dataset, fh, fmt: str) -> None:
    if fmt == "jsonl":  # 15 digits: pandas' default of 10 would round floats
        dataset.to_json(fh, lines=True, force_ascii=False, double_precision=15)
    elif fmt in ("csv", "tsv"):
        dataset.to_csv(fh, index=False, sep="\t" if fmt == "tsv" else ",")
    else:
        dataset.to_parquet(fh)


def file_identity(path: Path) -> dict:
    """What tells the file an export wrote from one that replaced it since: any rewrite changes one of these."""
    stat = os.lstat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "device": stat.st_dev}


def refuse_foreign_file(path: Path, record: Path, force: bool) -> None:
    """Refuse (one line) to replace anything at `path` but the file an earlier export wrote, unless --force."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isfile(path):
        raise InputError(f"--output {path} is {'a symbolic link' if os.path.islink(path) else 'not a regular file'}; "
                         f"hfbatch export writes a new file: choose another --output")
    try:
        recorded = json.loads(record.read_text()) if not record.is_symlink() else None
    except (OSError, ValueError):
        recorded = None
    if recorded == file_identity(path) or force:
        return
    raise InputError(f"--output {path} exists and hfbatch export did not write it (or it changed since); "
                     f"choose another --output, or pass --force to replace it")


FORMAT_CHOICES = ["auto", "jsonl", "csv", "tsv", "parquet"]


def export(dataset, output, *, fmt: str = "auto", columns: list[str] | None = None, force: bool = False) -> dict:
    """`hfbatch export`: write the hfbatch dataset `dataset` to the one file `output` (JSON Lines, CSV/TSV or
    Parquet, from `fmt` or the file name), atomically; only these `columns` when given. Returns the summary
    (output, rows, format, compression, bytes)."""
    if fmt not in FORMAT_CHOICES:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMAT_CHOICES)}")
    path = Path(output).parent.resolve() / Path(output).name  # a symlink at OUTPUT is refused, never followed
    fmt, compression = export_format(path, fmt)
    ds = selected_columns(dataset, columns or [])
    if not path.parent.is_dir():
        raise InputError(f"{path.parent} does not exist")
    source = Path(dataset).resolve()
    if path == source:
        raise InputError(f"--output {path} is the dataset it exports: choose a file outside it")
    refuse_output_inside_inputs(path, [source])  # (export is not a Job: the one check it shares with them)
    paths = OutputPaths(path)
    lock = OutputLock(path)
    lock.acquire()
    try:
        remove_stale_temps(paths)  # a killed export's; we hold the lock
        refuse_foreign_file(path, paths.export_record, force)
        write_atomically(ds, path, paths, fmt, compression)
    finally:
        lock.release()
    return {"job": "export", "status": "ok", "output": str(path), "rows": len(ds), "format": fmt,
            "compression": compression, "bytes": path.stat().st_size}


def selected_columns(dataset, wanted: list[str]):
    from .ingestion import check_unique_columns

    check_unique_columns(wanted)
    ds, _ = open_dataset(dataset)
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise InputError(f"{dataset}: no column {', '.join(map(repr, missing))}; available: "
                         f"{', '.join(ds.column_names)}")
    return ds.select_columns(wanted) if wanted else ds


def remove_stale_temps(paths: OutputPaths) -> None:
    for stale in paths.temps():
        if not os.path.isfile(stale) or os.path.islink(stale):
            raise InputError(f"{stale} is not a file left by hfbatch export; move it away and re-run")
        stale.unlink()


def write_atomically(ds, path: Path, paths: OutputPaths, fmt: str, compression: str | None) -> None:
    """Temp file beside `path`, fsync, rename over it, then record what was written (for the next export)."""
    tmp = paths.tmp()
    try:
        with open(tmp, "wb") as raw:
            stream = _compressed(raw, compression)
            write_dataset(ds, stream or raw, fmt)
            if stream is not None:
                stream.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        write_json_atomic(paths.export_record, file_identity(path))  # fsyncs the directory too
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise JobFailed(f"{path}: cannot write it ({exc}); the previous file, if any, is unchanged")
        raise
