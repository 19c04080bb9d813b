"""Vectors made outside hfbatch, for `hfbatch index` and for query vectors in `search` / `evaluate`.

An index can be built from
  - a Parquet file, or a directory of Parquet files (read in sorted order), with a vector column;
  - a dataset saved with `datasets.Dataset.save_to_disk` (hfbatch.dataset reads it);
  - a `.npy` file of a 2-D float16/float32/float64 array, with its ids in a separate file (or none: the ids
    are then the row numbers 0..n-1).
The vector column is a fixed-size list or a list of floats, every row the same length. Everything is read
memory-mapped (pyarrow memory_map, np.load mmap_mode="r"), never unpickled (allow_pickle=False), and checked
before anything is written: the column's type, ragged or null rows, NaN/inf values, the count and uniqueness
of the ids. Each problem is one InputError naming the file, column or row.

A reader is hfbatch.indexing's `read_chunk(start, stop) -> float32 [stop - start, dim]` with `n`, `dim` and
`take(rows)`, so the index code reads these exactly as it reads an embed output.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hfbatch.errors import InputError

PARQUET_SUFFIXES = (".parquet", ".pq")
NPY_DTYPES = ("float16", "float32", "float64")
CHECK_ROWS = 65_536  # rows per NaN/inf check: ~100 MB of float32 at dim 384


@dataclass
class ForeignVectors:
    """Opened and checked: the vectors, their ids (one per row, unique), and the files they came from."""

    path: Path
    format: str                     # parquet | dataset | npy
    reader: object                  # read_chunk with n, dim, take
    ids: object                     # pyarrow Array, len == reader.n
    files: list[Path] = field(default_factory=list)  # recorded (path + sha256) as the index's inputs


def is_foreign(path) -> bool:
    """Not an hfbatch output: a .npy or Parquet file, or a directory without hfbatch's manifest.json."""
    from hfbatch.runner import MANIFEST

    path = Path(path)
    return path.is_file() or (path.is_dir() and not (path / MANIFEST).exists())


def open_vectors(path, *, vector_column: str = "embedding", id_column: str | None = None,
                 ids_file=None, check_values: bool = True) -> ForeignVectors:
    """Open and check vectors made elsewhere (see the module docstring). `id_column` None: `id` where the
    table has one, else row numbers. `ids_file`: the ids of a .npy file's rows (text, .npy or .parquet).
    `check_values` False: the NaN/inf pass over every vector is left to the caller (check_vector_values)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".npy":
        if id_column is not None:
            raise InputError(f"--id-column: {path} is a .npy file, which has no columns; give its ids with --ids")
        reader = NpyVectors(path)
        ids = read_ids(Path(ids_file)) if ids_file else _row_numbers(reader.n)
        found = ForeignVectors(path, "npy", reader, ids, [path] + ([Path(ids_file)] if ids_file else []))
    else:
        if ids_file:
            raise InputError(f"--ids is for .npy inputs; the ids of {path} come from its column (--id-column)")
        fmt, files = table_files(path)
        reader = ParquetVectors(files, vector_column) if fmt == "parquet" else dataset_reader(path, files,
                                                                                            vector_column)
        ids = table_ids(files, fmt, id_column, reader.n)
        from hfbatch.dataset import STATE_FILE

        found = ForeignVectors(path, fmt, reader, ids, files + ([] if fmt == "parquet" else [path / STATE_FILE]))
    check_ids(found.ids, reader.n, ids_file or path, "ids" if ids_file else id_column or "row numbers")
    if check_values:
        check_vector_values(found, vector_column)
    return found


def check_vector_values(found: ForeignVectors, vector_column: str, copy_dir: Path | None = None) -> None:
    """Every vector finite: one pass over them. `copy_dir`: Parquet vectors are decoded once, as they are
    checked, into an unnamed file there (DecodedVectors), which found.reader then reads."""
    reader, column = found.reader, vector_column if found.format != "npy" else None
    copying = found.format == "parquet" and copy_dir is not None and reader.n > 0
    copy_to = DecodedVectors.room_in(copy_dir, reader) if copying else None
    if copy_to is None:
        check_finite(reader, found.path, column)
        return
    from hfbatch import log

    started = time.monotonic()
    try:
        with contextlib.ExitStack() as on_error:
            on_error.callback(close_quietly, copy_to)  # a refused input's copy is freed at once
            copy = check_finite(reader, found.path, column, copy_to)
            if copy is not None:
                on_error.pop_all()
    finally:
        reader.forget()
    if copy is None:  # given up on (the disk filled up): each pass decodes
        return
    found.reader = copy
    log.event("index", "decoded_once", rows=reader.n, seconds=f"{time.monotonic() - started:.1f}")


def close_quietly(file) -> None:
    """Close a copy given up on: its buffer may still hold bytes that the full disk refuses again (the file
    descriptor is closed all the same)."""
    with contextlib.suppress(OSError):
        file.close()


def table_files(path: Path) -> tuple[str, list[Path]]:
    """("parquet" | "dataset", its data files in order)."""
    if path.is_file():
        if path.suffix.lower() in PARQUET_SUFFIXES:
            return "parquet", [path]
        raise InputError(f"{path}: not a Parquet (.parquet) or .npy file, a directory of Parquet files, a saved "
                         f"dataset or an `hfbatch embed` output")
    from hfbatch.dataset import STATE_FILE, data_files, is_saved_dataset

    if is_saved_dataset(path):
        try:
            return "dataset", data_files(path)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path / STATE_FILE} is not a datasets {STATE_FILE} ({exc}); save the dataset with "
                             f"save_to_disk")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in PARQUET_SUFFIXES and p.is_file()
                   and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise InputError(f"{path}: no Parquet files, no saved dataset (state.json) and no hfbatch manifest.json; "
                         f"give a Parquet file or directory, a save_to_disk dataset, a .npy file or an "
                         f"`hfbatch embed` output")
    return "parquet", files


def dataset_reader(path: Path, files: list[Path], column: str):
    from hfbatch.dataset import ArrowVectors

    schema = _arrow_schema(files[0])
    _check_column(schema, column, path)
    try:
        return ArrowVectors(path, column=column)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: {exc}; the vector column must hold one list of floats per row, all of one "
                         f"length")


def _arrow_schema(file: Path):
    import pyarrow as pa

    try:
        with pa.memory_map(str(file)) as source:
            return pa.ipc.open_stream(source).schema
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{file}: not a readable Arrow file ({exc})")


def _check_column(schema, column: str, path) -> None:
    """The vector column exists and is a (fixed-size) list of floats."""
    import pyarrow as pa

    if column not in schema.names:
        raise InputError(f"{path}: no vector column {column!r}; columns: {', '.join(schema.names)} (choose one "
                         f"with --vector-column)")
    kind = schema.field(column).type
    is_list = pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not is_list or not pa.types.is_floating(kind.value_type):
        raise InputError(f"{path}: column {column!r} is {kind}, not a list of floats (one vector per row)")


class ParquetVectors:
    """read_chunk over the vector column of Parquet files, memory-mapped, decoded one row group at a time.

    The last decoded row group is kept, so sequential reads and sorted `take`s decode each group once; memory
    is one row group (write big files with row groups of ~64k rows). After each decode the mapped pages are
    given back (madvise DONTNEED; they stay in the OS page cache), as hfbatch.dataset.ArrowVectors does, so a
    1.5 GB file does not add 1.5 GB to the process's resident memory.

    Reading in order, the next READ_AHEAD groups are decoded by threads meanwhile (pyarrow and numpy let go of
    the GIL), where they are smaller than READ_AHEAD_BYTES together: decoding is the cost of a Parquet pass
    (1M x 384 floats in 64k-row groups: 4.9 s serial, 3.3 s with two groups in flight, 2-core Xeon)."""

    READ_AHEAD = 2
    READ_AHEAD_BYTES = 256 * 2**20

    def __init__(self, files: list[Path], column: str):
        import mmap

        import pyarrow as pa
        import pyarrow.parquet as pq

        self.column, self.files = column, files
        self._parquet, self._maps, groups = [], [], []
        self._dontneed = getattr(mmap, "MADV_DONTNEED", None)
        for i, file in enumerate(files):
            try:
                with open(file, "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                parquet = pq.ParquetFile(pa.BufferReader(pa.py_buffer(mapped)))
            except (OSError, ValueError, pa.ArrowException) as exc:  # ValueError: an empty file cannot be mapped
                raise InputError(f"{file}: not a readable Parquet file ({exc})")
            self._maps.append(mapped)
            _check_column(parquet.schema_arrow, column, file)
            self._parquet.append(parquet)
            groups += [(i, g, parquet.metadata.row_group(g).num_rows) for g in range(parquet.num_row_groups)]
        self._groups = [(i, g) for i, g, rows in groups if rows]
        self._starts = np.cumsum([0] + [rows for _, _, rows in groups if rows])
        self.n = int(self._starts[-1])
        kind = self._parquet[0].schema_arrow.field(column).type
        self.dim = kind.list_size if pa.types.is_fixed_size_list(kind) else None
        if self.dim is None and self.n:
            self.dim = int(self._decode_raw(0).value_lengths()[0].as_py() or 0)
        self._cached = (None, None)
        self._ahead, self._pool, self._handles = {}, None, {}

    def forget(self) -> None:
        """Drop the decoded groups (the one kept, those read ahead) and hand the memory their decoding took back
        to the OS: pyarrow's allocator keeps freed pages (1M x 384 floats: ~600 MB after a pass), which would
        otherwise stay in the process's resident memory through the build."""
        import pyarrow as pa

        self._drop_ahead()
        self._cached = (None, None)
        pa.default_memory_pool().release_unused()

    def _drop_ahead(self) -> None:
        """Forget the groups read ahead; a decode under way is let finish, so no two threads share a handle."""
        from concurrent.futures import wait

        wait([f for f in self._ahead.values() if not f.cancel()])
        self._ahead = {}

    def _decode_raw(self, group: int, parquet=None):
        import pyarrow as pa

        i, g = self._groups[group]
        try:
            return (parquet or self._parquet)[i].read_row_group(g, columns=[self.column]).column(0).combine_chunks()
        except (OSError, pa.ArrowException) as exc:  # a damaged page: pyarrow's IOError or a decode error
            raise damaged(self.files[i], f"row group {g} (rows {int(self._starts[group]):,} on)", exc)

    def _release(self, group: int) -> None:
        if self._dontneed is not None:
            self._maps[self._groups[group][0]].madvise(self._dontneed)

    def _decode(self, group: int) -> np.ndarray:
        if self._cached[0] == group:
            return self._cached[1]
        ahead = self._ahead.pop(group, None)
        vectors = ahead.result() if ahead is not None else self._decode_group(group)
        in_order = self._cached[0] == group - 1
        if not in_order:  # a jump: what was read ahead is not wanted
            self._drop_ahead()
        self._cached = (group, vectors)
        if in_order:
            self._read_ahead(group)
        return vectors

    def _read_ahead(self, group: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        wanted = range(group + 1, min(len(self._groups), group + 1 + self.READ_AHEAD))
        if sum(int(self._starts[g + 1] - self._starts[g]) for g in wanted) * self.dim * 4 > self.READ_AHEAD_BYTES:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.READ_AHEAD, thread_name_prefix="parquet-read-ahead")
        for g in wanted:
            if g not in self._ahead:
                self._ahead[g] = self._pool.submit(self._decode_group, g, self._handle(g))

    def _handle(self, group: int):
        """Each group read ahead gets ParquetFile objects of its own (pyarrow's readers are not shared between
        threads), over the same maps."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        slot = group % self.READ_AHEAD
        if slot not in self._handles:
            self._handles[slot] = [pq.ParquetFile(pa.BufferReader(pa.py_buffer(m))) for m in self._maps]
        return self._handles[slot]

    def _decode_group(self, group: int, parquet=None) -> np.ndarray:
        import pyarrow as pa

        column = self._decode_raw(group, parquet)
        file, first = self.files[self._groups[group][0]], int(self._starts[group])
        if column.null_count:
            row = first + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{file}: row {row} of column {self.column!r} has no vector (null)")
        if not pa.types.is_fixed_size_list(column.type):
            lengths = column.value_lengths().to_numpy(zero_copy_only=False)
            off = np.flatnonzero(lengths != self.dim)
            if len(off):
                raise InputError(f"{file}: row {first + int(off[0])} of column {self.column!r} has "
                                 f"{lengths[off[0]]} values, row 0 has {self.dim}: every vector must have "
                                 f"the same length")
        values = column.flatten().to_numpy(zero_copy_only=False)  # a null value inside a list: NaN
        vectors = np.array(values, dtype=np.float32).reshape(-1, self.dim)  # a copy: the map's pages can go
        del column, values
        self._release(group)
        return vectors

    def __len__(self) -> int:
        return self.n

    def __call__(self, start: int, stop: int) -> np.ndarray:
        from hfbatch.dataset import read_rows

        return read_rows(self._starts, lambda group, lo, hi: self._decode(group)[lo:hi], start, stop, self.dim)

    def take(self, rows) -> np.ndarray:
        """Rows in any order, each row group decoded once."""
        from hfbatch.dataset import take_rows

        return take_rows(self._starts, lambda group, lo, hi: self._decode(group)[lo:hi], rows, self.dim)


class NpyVectors:
    """read_chunk over a .npy file of a 2-D float array, memory-mapped (no pickles)."""

    def __init__(self, path: Path):
        self.path, self.array, self._rows = Path(path), load_npy(path), None
        if self.array.ndim != 2 or self.array.dtype.name not in NPY_DTYPES:
            raise InputError(f"{path}: holds a {self.array.dtype} array of shape {self.array.shape}; expected a "
                             f"2-D array (one vector per row) of {', '.join(NPY_DTYPES)}")
        self.n, self.dim = self.array.shape

    def __len__(self) -> int:
        return self.n

    def __call__(self, start: int, stop: int) -> np.ndarray:
        out = np.array(self.array[start:stop], dtype=np.float32, order="C")
        self._release(start, stop)
        return out

    def take(self, rows) -> np.ndarray:
        """Rows in any order, read with pread (hfbatch.index_rerank.NpyRows), not through the map: the kernel
        maps a whole cached folio (up to 2 MiB) on a fault, so indexing the map with 1,000 scattered rows of a
        15 GB file took the process's resident memory 1.8 GB up (the 10M build's peak: 3.0 GB, not 1.5)."""
        from hfbatch.index_rerank import NpyRows

        if self._rows is None:
            self._rows = NpyRows(self.path, self.array)
        return self._rows.take(rows)

    def _release(self, start: int, stop: int) -> None:
        """Drop the mapped pages of rows [start, stop) from this process (they stay in the OS page cache):
        one pass over a 15 GB file would otherwise count 15 GB in its resident memory."""
        import mmap

        mm = getattr(self.array, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED") or stop <= start:
            return
        row_bytes = self.array.strides[0]
        lo = self.array.offset + start * row_bytes
        hi = min(len(mm), self.array.offset + stop * row_bytes)
        lo -= lo % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class DecodedVectors(NpyVectors):
    """Parquet vectors decoded once into an unnamed file beside the output: an index build reads its vectors four
    more times after checking them (the training sample, adding, the tuning rows, their exact neighbours), and
    decoding 1M x 384 floats from Parquet costs ~4 s a pass where the copy is memory-mapped. The file has no
    name (O_TMPFILE, or unlinked at once where the file system lacks it), so it is gone with the process,
    however it ends: a kill leaves nothing behind (on NFS, the client's `.nfs*` placeholder lasts until the
    file is closed). It is read through /proc/self/fd (Linux); elsewhere, or where the copy would leave less
    than SPARE_BYTES free, no copy is made and each pass decodes."""

    SPARE_BYTES = 2**30

    def __init__(self, file):
        self.file = file  # written and flushed; kept open: closing it frees the space
        super().__init__(Path(f"/proc/self/fd/{file.fileno()}"))

    @classmethod
    def room_in(cls, directory: Path, reader):
        """An unnamed binary file in `directory` (or its nearest existing parent) for reader's rows as float32,
        or None (with a warning) where there is no room or no /proc/self/fd to read it through."""
        import shutil
        import tempfile

        from hfbatch import log

        directory = next(p for p in (Path(directory), *Path(directory).parents) if p.is_dir())
        need = reader.n * reader.dim * 4
        try:
            free = shutil.disk_usage(directory).free
            if free < need + cls.SPARE_BYTES:
                reason = (f"{need / 2**30:.1f} GiB of decoded vectors would leave less than "
                          f"{cls.SPARE_BYTES / 2**30:.0f} GiB free in {directory}")
            elif not os.path.isdir("/proc/self/fd"):
                reason = "no /proc/self/fd to read an unnamed file through"
            else:
                return tempfile.TemporaryFile(dir=directory, prefix=".hfbatch-decoded-")
        except OSError as exc:  # e.g. a directory we may not write to: the job itself says what is wrong there
            reason = f"cannot write in {directory} ({exc.strerror or exc})"
        log.warn("index", "not_decoded_once", reason=reason, hint="each pass over the vectors decodes them again")
        return None


def damaged(file, part: str, exc: Exception) -> InputError:
    """The one line for a part of a file pyarrow cannot read (a damaged page)."""
    return InputError(f"{file}: {part} cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                      f"; the file is damaged: write it again")


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy file without pickled objects ({exc})")


def read_query_vectors(path, dim: int, option: str = "--query-vectors") -> np.ndarray:
    """A .npy file of query vectors, one row per query, checked against the index's dimension."""
    path = Path(path)
    reader = NpyVectors(path)
    if reader.dim != dim:
        raise InputError(f"{option} {path}: the vectors have {reader.dim} dimensions, the index {dim}")
    if not reader.n:
        raise InputError(f"{option} {path}: no query vectors")
    check_finite(reader, path, None)
    return reader(0, reader.n)


# ---- ids ----------------------------------------------------------------------------------------------------

def _row_numbers(n: int):
    import pyarrow as pa

    return pa.array(np.arange(n, dtype=np.int64))


def read_ids(path: Path, option: str = "--ids"):
    """Ids from a file: .npy (1-D, numbers or strings), .parquet (its one column, or `id`), else UTF-8 text
    with one id per line (strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = load_npy(path)
        if array.ndim != 1 or array.dtype.kind not in "iuU":
            raise InputError(f"{option} {path}: holds a {array.dtype} array of shape {array.shape}; expected a 1-D "
                             f"array of integers or strings")
        return pa.array(np.asarray(array))
    if suffix in PARQUET_SUFFIXES:
        try:
            table = pq.read_table(str(path), memory_map=True)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{option} {path}: not a readable Parquet file ({exc})")
        if table.num_columns != 1 and "id" not in table.column_names:
            raise InputError(f"{option} {path}: expected one column (or one named `id`); it has "
                             f"{', '.join(table.column_names)}")
        return table.column("id" if "id" in table.column_names else 0).combine_chunks()
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{option} {path}: not UTF-8 text ({exc}); give one id per line")
    empty = next((number for number, line in enumerate(lines, start=1) if not line.strip()), None)
    if empty:
        raise InputError(f"{option} {path}:{empty}: empty line; give one id per line")
    return pa.array([line.strip() for line in lines], pa.string())


def table_ids(files: list[Path], fmt: str, id_column: str | None, n: int):
    """The id column of a table input: `id_column`, or `id` when the table has one, else row numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(str(files[0])) if fmt == "parquet" else _arrow_schema(files[0])
    column = id_column or ("id" if "id" in schema.names else None)
    if column is None:
        return _row_numbers(n)
    if column not in schema.names:
        raise InputError(f"--id-column: {files[0]} has no column {column!r}; columns: {', '.join(schema.names)}")
    parts = []
    for file in files:
        try:
            if fmt == "parquet":
                parts.append(pq.read_table(str(file), columns=[column], memory_map=True).column(0))
            else:
                with pa.memory_map(str(file)) as source:
                    parts.append(pa.ipc.open_stream(source).read_all().column(column))
        except (OSError, pa.ArrowException) as exc:  # a damaged page
            raise damaged(file, f"id column {column!r}", exc)
    ids = pa.chunked_array([c for part in parts for c in part.chunks], parts[0].type).combine_chunks()
    if not (pa.types.is_integer(ids.type) or pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise InputError(f"{files[0]}: id column {column!r} is {ids.type}; ids must be integers or strings "
                         f"(choose another with --id-column)")
    return ids


def check_ids(ids, n: int, where, what: str) -> None:
    """One id per vector, none missing, none twice."""
    import pyarrow.compute as pc

    if len(ids) != n:
        raise InputError(f"{where}: {len(ids):,} ids ({what}) for {n:,} vectors; give exactly one id per vector")
    if ids.null_count:
        row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{where}: row {row} has no id ({what})")
    if _strictly_increasing(ids):  # unique without a hash table (counting 10M ids held ~2 GB)
        return
    if pc.count_distinct(ids).as_py() != n:
        counts = pc.value_counts(ids)
        twice = counts.filter(pc.greater(counts.field("counts"), 1))[0]
        raise InputError(f"{where}: id {twice['values'].as_py()!r} appears {twice['counts'].as_py()} times "
                         f"({what}); ids must be unique")


def _strictly_increasing(ids, block: int = 1 << 20) -> bool:
    """Integer ids in strictly increasing order (row numbers, sorted ids): unique. Checked a block at a time."""
    import pyarrow as pa

    if not pa.types.is_integer(ids.type) or len(ids) < 2:
        return len(ids) < 2
    for start in range(0, len(ids) - 1, block):
        values = np.asarray(ids.slice(start, block + 1))
        if not (np.diff(values) > 0).all():
            return False
    return True


def check_finite(reader, path, column: str | None, copy_to=None):
    """Every value a finite number: one pass over the vectors, a chunk at a time. `copy_to` (an open binary
    file, or None): the checked rows are also written there, and a DecodedVectors over it is returned; None
    where writing it failed (a warning; the check goes on: only the copy is given up)."""
    where = f" of column {column!r}" if column else ""

    def write(data) -> None:
        nonlocal copy_to
        if copy_to is None:
            return
        try:
            data(copy_to)
        except OSError as exc:  # the disk filled up meanwhile
            from hfbatch import log

            log.warn("index", "not_decoded_once", reason=f"writing the decoded copy failed ({exc.strerror or exc})",
                     hint="each pass over the vectors decodes them again")
            close_quietly(copy_to)
            copy_to = None

    write(lambda f: np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                             "shape": (reader.n, reader.dim)}))
    for start in range(0, reader.n, CHECK_ROWS):
        chunk = reader(start, min(reader.n, start + CHECK_ROWS))
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            raise InputError(f"{path}: row {start + int(np.flatnonzero(bad)[0])}{where} holds NaN or infinite "
                             f"values; every vector must be finite")
        write(lambda f, chunk=chunk: f.write(memoryview(np.ascontiguousarray(chunk, dtype=np.float32))))
    write(lambda f: f.flush())
    return None if copy_to is None else DecodedVectors(copy_to)
