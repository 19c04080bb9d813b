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
    files (hard links), so a job publishes its shards without copying them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

STATE_FILE = "state.json"


def is_saved_dataset(path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def data_files(path) -> list[Path]:
    """The data files of a `save_to_disk` dataset, in row order. A damaged state.json raises ValueError
    (JSONDecodeError), KeyError or TypeError; a missing one FileNotFoundError."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    return [path / entry["filename"] for entry in state["_data_files"]]


def memory_mapped_tables(path) -> list[tuple[Path, object]]:
    """Each data file of a `save_to_disk` dataset, in row order, with its rows as an Arrow table over the
    memory-mapped file: zero-copy, nothing is read until it is used."""
    import pyarrow as pa

    return [(file, pa.ipc.open_stream(pa.memory_map(str(file))).read_all()) for file in data_files(path)]


def save_around(directory: Path, features, files: list[Path], fingerprint: str) -> None:
    """Make `directory` a saved dataset of `features` whose data files are `files` (hard-linked, in order):
    datasets' own metadata files around them. Raises OSError where hard links cannot be made."""
    import datasets

    directory = Path(directory)
    datasets.Dataset.from_dict({k: [] for k in features}, features=features).save_to_disk(str(directory))
    state = json.loads((directory / STATE_FILE).read_text())
    for old in state["_data_files"]:
        (directory / old["filename"]).unlink()
    names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
    for file, name in zip(files, names):
        os.link(file, directory / name)
    state.update(_data_files=[{"filename": n} for n in names], _fingerprint=fingerprint)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


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
        values = self._chunks[j][0].slice(lo, hi - lo).flatten()  # respects the slice offset; no copy
        return values.to_numpy(zero_copy_only=True).reshape(-1, self.dim)

    def _release(self, j: int, src: np.ndarray) -> None:
        if self._dontneed is None or not src.size:
            return
        mm, base = self._maps[self._chunks[j][1]]
        lo = src.ctypes.data - base
        hi = lo + src.nbytes
        lo -= lo % self._page                                     # madvise wants page alignment
        mm.madvise(self._dontneed, lo, min(len(mm), hi) - lo)
