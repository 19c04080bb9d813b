"""Datasets on disk as `datasets.Dataset.save_to_disk` lays them out, and the one module that knows that layout:
`state.json` lists the data files (Arrow IPC streams) in row order, `dataset_info.json` holds the features.

  - `is_saved_dataset(path)`, `data_files(path)`: whether a directory is one, and its data files in row order;
  - `memory_mapped_tables(path)`: each data file's rows as an Arrow table over the memory-mapped file
    (zero-copy: nothing is read until it is used);
  - `ArrowVectors(path, column)`: a vector column (a fixed-size list, or lists of floats all of one length)
    read as float32 matrix rows by row range or row numbers, copying only those rows;
  - `read_rows`, `take_rows`: the walks over consecutive blocks (by row range, by row numbers) that every
    vector reader shares (hfbatch.vectors' Parquet reader too);
  - `save_around(directory, features, files, fingerprint)`: a saved dataset whose data files are existing Arrow
    files (hard links), so a job publishes its shards without copying them;
  - `save_table(directory, table, fingerprint, max_shard_bytes)`: an Arrow table saved as `save_to_disk` saves
    it, and `SavedDataset.open(path)`: one read back, both with pyarrow alone. embed and classify only read
    columns and write Arrow tables, and `import datasets` (pandas, fsspec, huggingface_hub) is about a second
    of every run, so they never import it; `datasets.load_from_disk` reads what they write (tests check that
    the files are the ones `save_to_disk` writes);
  - `arrow_array`, `arrow_strings`, `numpy_array`: numbers and strings between numpy and Arrow without
    `pa.array` or `to_numpy`, which import pandas on their first call (0.25-0.35 s of a run).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

STATE_FILE = "state.json"
INFO_FILE = "dataset_info.json"


# pyarrow's pa.array, pa.scalar (and so a compute function given a Python value) and Array.to_numpy ask pandas
# whether their argument is one of its types, which imports pandas on the first call: 0.26 s of a 6 s classify
# run, measured, with the model's streams idle meanwhile, and about a tenth of an ingest of 600,000 rows.
# embed, classify and ingest need pandas for nothing else, so they move their columns with these instead.

def arrow_array(values, dtype=None) -> pa.Array:
    """A numpy array (or a sequence, as `dtype`) of a fixed-width number type or of booleans, flattened, as
    an Arrow array: over the same memory for numbers, bit-packed for booleans."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=dtype).reshape(-1)
    if values.dtype.kind == "b":
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    if values.dtype.kind not in "iuf":
        raise TypeError(f"arrow_array takes numbers or booleans, not {values.dtype}")
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _variable_width(kind, items: list[bytes]) -> pa.Array:
    """`items` as an Arrow array of `kind` (large_binary or large_string): 64-bit offsets and their bytes."""
    import pyarrow as pa

    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in items], out=offsets[1:])
    return pa.Array.from_buffers(kind, len(items), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(items))])


def arrow_binary(items: list[bytes]) -> pa.Array:
    """Python bytes as an Arrow binary array."""
    import pyarrow as pa

    return _variable_width(pa.large_binary(), items).cast(pa.binary())


def arrow_strings(strings: list[str]) -> pa.Array:
    """Python strings as an Arrow string array."""
    import pyarrow as pa

    return _variable_width(pa.large_string(), [s.encode("utf-8") for s in strings]).cast(pa.string())


def arrow_null(kind) -> pa.Scalar:
    """A null of Arrow type `kind`, as a compute function's argument."""
    import pyarrow as pa

    return pa.nulls(1, kind)[0]


def numpy_array(array) -> np.ndarray:
    """A null-free Arrow array or chunked array of a fixed-width number type, or of lists of one (fixed-size
    or not: flattened), as numpy: a read-only view of its memory where it is one chunk, else one copy.
    Booleans come as a numpy bool array (a copy: Arrow packs them in bits)."""
    import pyarrow as pa

    chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    if pa.types.is_boolean(array.type):
        return np.concatenate([_numpy_bools(c) for c in chunks]) if chunks else np.zeros(0, bool)
    lists = pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type) or \
        pa.types.is_large_list(array.type)
    value_type = array.type.value_type if lists else array.type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
        raise TypeError(f"numpy_array takes numbers, not {array.type}")
    dtype = np.dtype(value_type.to_pandas_dtype())  # (a numpy dtype: pandas is not imported)
    parts = []
    for chunk in chunks:
        values = chunk.flatten() if chunk.type != value_type else chunk  # (flatten respects the offset)
        if chunk.null_count or values.null_count:
            raise ValueError(f"numpy_array takes no nulls ({array.type})")
        parts.append(np.frombuffer(values.buffers()[1], dtype=dtype, count=len(values),
                                   offset=values.offset * dtype.itemsize))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _numpy_bools(chunk) -> np.ndarray:
    if chunk.null_count:
        raise ValueError("numpy_array takes no nulls (bool)")
    if not len(chunk):  # (an empty array may have no data buffer)
        return np.zeros(0, bool)
    bits = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)
    return np.unpackbits(bits, bitorder="little", count=chunk.offset + len(chunk))[chunk.offset:].astype(bool)


def arrow_column(values):
    """A column for pa.table: an Arrow array as it is (the jobs' ids), a Python list through pa.array."""
    import pyarrow as pa

    return values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)


WRITER_BATCH_ROWS = 1000  # datasets' DEFAULT_MAX_BATCH_SIZE: the record batches save_to_disk writes


def is_saved_dataset(path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def data_files(path) -> list[Path]:
    """The data files of a `save_to_disk` dataset, in row order. A damaged state.json raises ValueError
    (JSONDecodeError), KeyError or TypeError; a missing one FileNotFoundError."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    return [path / entry["filename"] for entry in state["_data_files"]]


def memory_mapped_table(file):
    """The rows of one Arrow stream file (a data file, a job's shard) as a table over the memory-mapped file:
    zero-copy, nothing is read until it is used."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(file))).read_all()


def memory_mapped_tables(path) -> list[tuple[Path, object]]:
    """Each data file of a `save_to_disk` dataset, in row order, with its rows (`memory_mapped_table`)."""
    return [(file, memory_mapped_table(file)) for file in data_files(path)]


def save_around(directory: Path, features: dict, files: list[Path], fingerprint: str) -> None:
    """Make `directory` a saved dataset of `features` (in `to_dict()` form) whose data files are `files`
    (hard-linked, in order). Raises OSError where hard links cannot be made."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [data_file_name(i, len(files)) for i in range(len(files))]
    for file, name in zip(files, names):
        os.link(file, directory / name)
    write_metadata(directory, features, names, fingerprint)


def data_file_name(index: int, count: int) -> str:
    return f"data-{index:05d}-of-{count:05d}.arrow"


def write_metadata(directory: Path, features: dict, names: list[str], fingerprint: str) -> None:
    """save_to_disk's state.json and dataset_info.json, key for key, for data files `names` of `features`."""
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": fingerprint,
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    # (datasets sorts the first level only: nested features keep their order)
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2))


def value_feature(dtype: str) -> dict:
    """`datasets.Value(dtype)` in its `to_dict()` form."""
    return {"dtype": dtype, "_type": "Value"}


def list_feature(feature: dict, length: int | None = None) -> dict:
    """`datasets.List(feature, length)` (what `Sequence` is now) in its `to_dict()` form."""
    return {"feature": feature, **({"length": length} if length is not None else {}), "_type": "List"}


def _value_dtypes() -> dict:
    import pyarrow as pa

    kinds = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
             "float32", "float64", "string", "large_string", "binary", "large_binary", "null"]
    return {getattr(pa, {"bool": "bool_"}.get(k, k))(): k for k in kinds}


def features_of(schema) -> dict:
    """The features of an Arrow schema in datasets' `to_dict()` form (what datasets.Features.from_arrow_schema
    gives, checked by the tests): those in the schema's own datasets metadata, else those of its types.
    TypeError for a type this does not map (timestamps, dictionaries): the caller saves with datasets."""
    import pyarrow as pa

    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        stored = json.loads(meta).get("info", {}).get("features") or {}
        if set(stored) >= set(schema.names):
            return {name: stored[name] for name in schema.names}
    dtypes = _value_dtypes()

    def feature(kind):
        if kind in dtypes:
            return value_feature(dtypes[kind])
        if pa.types.is_fixed_size_list(kind):
            return list_feature(feature(kind.value_type), kind.list_size)
        if pa.types.is_list(kind):
            return list_feature(feature(kind.value_type))
        if pa.types.is_struct(kind):
            return {kind.field(i).name: feature(kind.field(i).type) for i in range(kind.num_fields)}
        raise TypeError(f"no datasets feature mapped here for Arrow type {kind}")
    return {field.name: feature(field.type) for field in schema}


def save_table(directory: Path, table, fingerprint: str, max_shard_bytes: int) -> None:
    """`table` saved in `directory` as `datasets.Dataset.save_to_disk` saves it: contiguous data files of at
    most about `max_shard_bytes` (one for no rows), each an Arrow stream whose schema carries the features,
    then state.json and dataset_info.json. TypeError (before anything is written) for a column type that
    `features_of` does not map."""
    import pyarrow as pa

    features = features_of(table.schema)
    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    count = max(1, min(table.num_rows, table.nbytes // max_shard_bytes + 1))  # as save_to_disk counts them
    names = [data_file_name(i, count) for i in range(count)]
    for i, name in enumerate(names):
        lo, hi = table.num_rows * i // count, table.num_rows * (i + 1) // count
        with pa.OSFile(str(Path(directory) / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in table.slice(lo, hi - lo).to_batches(max_chunksize=WRITER_BATCH_ROWS):
                writer.write_batch(batch)
    write_metadata(Path(directory), features, names, fingerprint)


class SavedDataset:
    """A saved dataset read with pyarrow alone: the part of `datasets.Dataset` that embed and classify use.
    `data` is the Arrow table over the memory-mapped data files (zero-copy), `features` its features in
    `to_dict()` form, and `dataset[a:b]` rows a..b as {column: Python list}, as datasets formats them."""

    def __init__(self, data, features: dict):
        self.data, self.features = data, features

    @classmethod
    def open(cls, path) -> SavedDataset:
        """FileNotFoundError without state.json or a data file; ValueError, KeyError, TypeError or an
        ArrowException where one is damaged; IndexError for no data file (as datasets.load_from_disk)."""
        import pyarrow as pa

        tables = [table for _, table in memory_mapped_tables(path)]
        info = json.loads((Path(path) / INFO_FILE).read_text())
        if not tables:
            raise IndexError("state.json lists no data file")
        data = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        features = info["features"]
        if not isinstance(features, dict) or set(features) != set(data.schema.names):
            raise ValueError(f"{INFO_FILE} names columns {list(features or [])}, the data files hold "
                             f"{data.schema.names}")
        return cls(data, {name: features[name] for name in data.schema.names})

    @property
    def column_names(self) -> list[str]:
        return self.data.schema.names

    def __len__(self) -> int:
        return self.data.num_rows

    def __getitem__(self, rows: slice) -> dict:
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise ValueError("SavedDataset takes contiguous rows only")
        part = self.data.slice(start, max(0, stop - start))
        return {name: part.column(name).to_pylist() for name in self.column_names}

    def select(self, rows) -> SavedDataset:
        """These rows (a range is a zero-copy slice)."""
        if isinstance(rows, range) and rows.step == 1:
            return SavedDataset(self.data.slice(rows.start, len(rows)), self.features)
        return SavedDataset(self.data.take(list(rows)), self.features)

    def select_columns(self, columns: list[str]) -> SavedDataset:
        return SavedDataset(self.data.select(columns), {c: self.features[c] for c in columns})


def read_rows(starts: np.ndarray, block: Callable[[int, int, int], np.ndarray], start: int, stop: int,
              dim: int, copied: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Rows [start, stop) of a vector column stored in consecutive blocks (block j holds rows
    starts[j]..starts[j+1]) as one float32 [stop - start, dim] array: `block(j, lo, hi)` gives rows lo..hi of
    block j, which are copied (and cast) once; `copied(j, rows)` follows each copy."""
    out = np.empty((stop - start, dim), dtype=np.float32)
    j = int(np.searchsorted(starts, start, side="right")) - 1
    pos = start
    while pos < stop:
        lo, hi = int(starts[j]), int(starts[j + 1])
        part = block(j, pos - lo, min(stop, hi) - lo)
        out[pos - start:pos - start + len(part)] = part
        if copied is not None:
            copied(j, part)
        pos += len(part)
        j += 1
    return out


def take_rows(starts: np.ndarray, block: Callable[[int, int, int], np.ndarray], rows, dim: int,
              copied: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Rows in any order (row numbers) of a vector column stored in blocks as for `read_rows`, as one float32
    [len(rows), dim] array; each block is read once."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), dim), dtype=np.float32)
    blocks = np.searchsorted(starts, rows, side="right") - 1
    for j in np.unique(blocks):
        where = np.flatnonzero(blocks == j)
        part = block(int(j), 0, int(starts[j + 1] - starts[j]))
        out[where] = part[rows[where] - starts[j]]
        if copied is not None:
            copied(int(j), part)
    return out


class ArrowVectors:
    """Zero-copy reader of the vector column of a dataset saved with `datasets.Dataset.save_to_disk` (or of a
    directory of Arrow stream files), usable as hfbatch.indexing's read_chunk.

    The column may be a fixed-size list (`Sequence(Value("float32"), length=d)`) or a plain list whose rows
    all have d values. The files are memory-mapped; each call copies just its rows out of the flat values
    buffer, then drops the mapped pages it touched from this process (madvise DONTNEED: they stay in the OS
    page cache), so reading a 1.5 GB column does not add 1.5 GB to the process's resident memory.
    """

    def __init__(self, path: str | os.PathLike, column: str = "embedding"):
        import mmap

        import pyarrow as pa
        import pyarrow.compute as pc

        path = Path(path)
        files = data_files(path) if is_saved_dataset(path) else sorted(path.glob("*.arrow"))
        if not files:
            raise FileNotFoundError(f"no .arrow files in {path}")
        self._dontneed = getattr(mmap, "MADV_DONTNEED", None)
        self._page = mmap.PAGESIZE
        self._maps, self._chunks, starts, self.dim = [], [], [0], None
        for file in files:
            with open(file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            base = pa.py_buffer(mm)
            self._maps.append((mm, base.address))
            table = pa.ipc.open_stream(base).read_all()      # zero-copy over the map
            kind = table.schema.field(column).type
            if self.dim is None and pa.types.is_fixed_size_list(kind):
                self.dim = kind.list_size  # (also where there are no rows)
            for chunk in table.column(column).chunks:
                if pa.types.is_fixed_size_list(chunk.type):
                    dims = {chunk.type.list_size}
                elif pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
                    lengths = pc.min_max(chunk.value_lengths())
                    dims = {lengths["min"].as_py(), lengths["max"].as_py()} - {None}
                else:
                    raise TypeError(f"column {column!r} is {chunk.type}, expected a list of floats")
                if chunk.null_count or len(dims) > 1 or (self.dim and dims != {self.dim}):
                    raise ValueError(f"{file}: column {column!r} has nulls or rows of different lengths")
                self.dim = self.dim or dims.pop()
                self._chunks.append((chunk, len(self._maps) - 1))
                starts.append(starts[-1] + len(chunk))
            if self._dontneed is not None:
                # reading the stream's batch headers faults in much of the file
                # (measured: 244 of 368 MB); give those pages back right away
                mm.madvise(self._dontneed)
        self.n = starts[-1]
        self._starts = np.array(starts)

    def __len__(self) -> int:
        return self.n

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return read_rows(self._starts, self._block, start, stop, self.dim, self._release)

    def take(self, rows) -> np.ndarray:
        """Rows in any order (row numbers), each data file's chunk read once."""
        return take_rows(self._starts, self._block, rows, self.dim, self._release)

    def _block(self, j: int, lo: int, hi: int) -> np.ndarray:
        return numpy_array(self._chunks[j][0].slice(lo, hi - lo)).reshape(-1, self.dim)  # (no copy)

    def _release(self, j: int, src: np.ndarray) -> None:
        if self._dontneed is None or not src.size:
            return
        mm, base = self._maps[self._chunks[j][1]]
        lo = src.ctypes.data - base
        hi = lo + src.nbytes
        lo -= lo % self._page                                     # madvise wants page alignment
        mm.madvise(self._dontneed, lo, min(len(mm), hi) - lo)
