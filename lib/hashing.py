"""Content hashes: how --incremental jobs tell that a row's text did not change.

An output keeps them in a Parquet side file beside its data (`id`, `text_hash`): `ingest` writes one for its
text column, `embed` for the texts it embedded. `embed --incremental` compares the hashes of its input rows
with those of its previous output, and takes its input's hashes from the ingest output's file when they
are of the same scheme and column, instead of hashing every text again.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

HASH_FILE = "content_hashes.parquet"
SCHEME = "xxh3_64"  # a frozen format (xxHash >= 0.8), ~4x faster than blake2b here: ingest hashes every row
LEGACY_SCHEME = "blake2b_64"  # what embed outputs of hfbatch 0.1.0 hold (their files name no scheme)


def text_hashes(texts, scheme: str = SCHEME) -> np.ndarray:
    """A signed 64-bit hash of each text's UTF-8 bytes. `texts`: a list of str, or an Arrow string array
    (hashed straight from its buffers, without making Python strings)."""
    digest = _digest(scheme)
    if isinstance(texts, list):
        return np.fromiter((digest(t.encode()) for t in texts), np.uint64, len(texts)).view(np.int64)
    import pyarrow as pa

    chunks = texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]
    parts = [np.fromiter((digest(v) for v in _utf8_values(c)), np.uint64, len(c)) for c in chunks]
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint64)).view(np.int64)


def _digest(scheme: str):
    if scheme == SCHEME:
        import xxhash

        return xxhash.xxh3_64_intdigest
    if scheme == LEGACY_SCHEME:
        import hashlib

        return lambda data: int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    raise ValueError(f"unknown content hash scheme {scheme!r}")


def _utf8_values(array):
    """Each value of a string array as a memoryview of its bytes (nulls as b'')."""
    import pyarrow as pa

    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise TypeError(f"content hashes are of text, not {array.type}")
    offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    _, offsets, data = array.buffers()
    ends = np.frombuffer(offsets, offset_type)[array.offset:array.offset + len(array) + 1].tolist()
    data = memoryview(data) if data is not None else memoryview(b"")
    return (data[start:end] for start, end in pairwise(ends))


@dataclass
class HashFile:
    ids: object           # Arrow array
    hashes: np.ndarray    # int64, one per id
    scheme: str
    text_column: str | None


def write_hash_file(directory: Path, ids, hashes: np.ndarray, text_column: str | None = None,
                    scheme: str = SCHEME) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .dataset import arrow_array

    metadata = {"scheme": scheme, **({"text_column": text_column} if text_column else {})}
    table = pa.table({"id": ids, "text_hash": arrow_array(np.asarray(hashes, np.int64))})
    pq.write_table(table.replace_schema_metadata(metadata), Path(directory) / HASH_FILE)


def read_hash_file(directory: Path, with_ids: bool = True) -> HashFile | None:
    """An output's content hashes, or None where it has none (made by an older hfbatch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .dataset import numpy_array

    path = Path(directory) / HASH_FILE
    if not path.exists():
        return None
    # (ParquetFile, not read_table: that imports pyarrow.dataset, seconds on a loaded machine)
    try:
        table = pq.ParquetFile(path).read(columns=["id", "text_hash"] if with_ids else ["text_hash"])
    except (pa.ArrowException, OSError, KeyError) as exc:
        from .errors import InputError

        raise InputError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0]}); re-run the job "
                         f"that made {directory} with --force")
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return HashFile(table.column("id") if with_ids else None,
                    numpy_array(table.column("text_hash")).astype(np.int64, copy=False),
                    metadata.get("scheme", LEGACY_SCHEME), metadata.get("text_column"))
