"""Re-ranking from disk: a compressed index's shortlist re-scored exactly against the vectors it was built from.

An `IVF...,PQ...x4fs,RDisk` index (hfbatch's `,RDisk` suffix) keeps only the PQ codes in memory. Where
`Refine(SQfp16)` or `RFlat` would hold a second copy of every vector in RAM (7.7 / 15 GB at 10M x 384), the
shortlist of k x k_factor candidates is read from the embeddings themselves, a few kilobytes per query, and
scored exactly (float32): recall is that of RFlat.

The index directory stays self-contained: its manifest records which vectors it was built from (the
`rerank_source`: the embed output or the file), and rows.parquet the hash of every indexed row. Search opens
that source and refuses it when it is not what was indexed: a changed embed output (its manifest hash) or file
(size or mtime), or any candidate row whose vector hash is not the recorded one.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hfbatch.errors import InputError
from hfbatch.faiss_runtime import faiss

QUERY_BATCH = 256            # queries re-scored together: gathers [batch, k x k_factor, dim] float32


class DiskRerank:
    """A faiss-like index (search, ntotal, d, metric_type): `base` finds k x k_factor candidates, which are
    re-scored exactly from `vectors` (take(rows) -> float32). `hashes` (int64 per row, from rows.parquet) are
    checked against every row read, where given."""

    def __init__(self, base, vectors, metric: str = "ip", hashes: np.ndarray | None = None,
                 k_factor: float = 4.0, source: str = ""):
        self.base, self.vectors, self.metric, self.hashes = base, vectors, metric, hashes
        self.k_factor, self.source = float(k_factor), source

    @property
    def ntotal(self) -> int:
        return self.base.ntotal

    @property
    def d(self) -> int:
        return self.base.d

    @property
    def metric_type(self) -> int:
        return self.base.metric_type

    def search(self, x, k, params=None):
        k_factor, base_params = self.k_factor, None
        if isinstance(params, faiss.IndexRefineSearchParameters):    # filtered search (search_params_with_selector)
            k_factor, base_params = params.k_factor, params.base_index_params
        elif params is not None:
            base_params = params
        shortlist = int(min(self.ntotal, max(k, round(k * k_factor))))
        x = np.ascontiguousarray(x, dtype=np.float32)
        # batch by batch (a fast-scan search's lookup tables grow with its queries), the next batch's shortlist
        # searched (faiss, GIL released) while this one is re-scored (reads and numpy)
        from concurrent.futures import ThreadPoolExecutor

        D = np.empty((len(x), k), dtype=np.float32)
        I = np.empty((len(x), k), dtype=np.int64)
        with ThreadPoolExecutor(max_workers=1) as pool:
            def shortlist_of(lo):
                return pool.submit(self.base.search, x[lo:lo + QUERY_BATCH], shortlist, params=base_params)

            pending = shortlist_of(0)
            for lo in range(0, len(x), QUERY_BATCH):
                _, candidates = pending.result()
                if lo + QUERY_BATCH < len(x):
                    pending = shortlist_of(lo + QUERY_BATCH)
                D[lo:lo + QUERY_BATCH], I[lo:lo + QUERY_BATCH] = self.rescore(x[lo:lo + QUERY_BATCH], candidates, k)
        return D, I

    def rescore(self, x: np.ndarray, candidates: np.ndarray, k: int):
        """(scores, rows) [len(x), k]: the candidates' exact scores, best first; row -1 where there are fewer."""
        worst = -np.inf if self.metric == "ip" else np.inf
        D = np.full((len(x), k), worst, dtype=np.float32)
        I = np.full((len(x), k), -1, dtype=np.int64)
        for lo in range(0, len(x), QUERY_BATCH):
            cand = candidates[lo:lo + QUERY_BATCH]
            rows = np.unique(cand[cand >= 0])
            if not len(rows):
                continue
            vectors = self.read(rows)
            gathered = vectors[np.searchsorted(rows, np.maximum(cand, 0))]        # [batch, shortlist, dim]
            q = x[lo:lo + QUERY_BATCH]
            scores = np.einsum("bkd,bd->bk", gathered, q)
            if self.metric == "l2":
                scores = (gathered * gathered).sum(-1) - 2 * scores + (q * q).sum(-1, keepdims=True)
            scores = np.where(cand >= 0, scores, worst)
            order = np.argsort(-scores if self.metric == "ip" else scores, axis=1, kind="stable")[:, :k]
            D[lo:lo + len(q), :order.shape[1]] = np.take_along_axis(scores, order, axis=1)
            found = np.take_along_axis(cand, order, axis=1)
            I[lo:lo + len(q), :order.shape[1]] = np.where(np.isfinite(D[lo:lo + len(q), :order.shape[1]]), found, -1)
        return D, I

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of sorted unique rows, checked against the recorded hashes."""
        from hfbatch.indexing import read_rows, row_hashes

        vectors = read_rows(self.vectors, rows)
        if self.hashes is not None:
            bad = np.flatnonzero(row_hashes(vectors) != self.hashes[rows])
            if len(bad):
                raise InputError(f"{self.source}: row {int(rows[bad[0]]):,} is not the vector that was indexed "
                                 f"(its hash differs; {len(bad)} of {len(rows)} rows read): the vectors changed "
                                 f"since the index was built, so re-ranking would score other vectors; rebuild "
                                 f"the index")
        return vectors


def unwrap(index):
    """The faiss index to write to disk: a DiskRerank's base (the vectors stay where they are)."""
    return index.base if isinstance(index, DiskRerank) else index


def supports_row_reads(reader) -> bool:
    """Whether rows can be read one by one cheaply (memory-mapped .npy or Arrow files), as re-ranking from
    disk needs; a Parquet file decodes a whole row group per row (its copy decoded for the build, DecodedVectors,
    is gone with the process: search cannot re-rank from it)."""
    from hfbatch.vectors import DecodedVectors, NpyVectors

    inner = getattr(reader, "read_chunk", reader)             # UnitRows wraps a reader
    return (isinstance(inner, NpyVectors) and not isinstance(inner, DecodedVectors)) \
        or type(inner).__name__ == "ArrowVectors"


class NpyRows:
    """Rows of a float .npy file read with pread (no memory map: a search's resident memory stays what it
    reads, not every page it ever touched). Sorted rows that are adjacent are read in one call."""

    def __init__(self, path: Path, mapped: np.ndarray | None = None):
        """`mapped`: the file's checked memory map where the caller has one (NpyVectors), for its header."""
        from hfbatch.vectors import NpyVectors

        if mapped is None:
            mapped = NpyVectors(path).array
        self.n, self.dim, self.dtype, self.offset = mapped.shape[0], mapped.shape[1], mapped.dtype, mapped.offset
        self.row_bytes = self.dim * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return self.take(np.arange(start, stop))

    def take(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        if len(rows):
            # each run of adjacent rows read straight into `out` (preadv: no bytes object, no per-run array)
            starts = np.flatnonzero(np.diff(rows) != 1) + 1
            bounds = [0, *starts.tolist(), len(rows)]
            buffer, row_bytes = memoryview(out).cast("B"), self.row_bytes
            for lo, hi, first in zip(bounds[:-1], bounds[1:], rows[bounds[:-1]].tolist()):
                got = os.preadv(self.fd, [buffer[lo * row_bytes:hi * row_bytes]], self.offset + first * row_bytes)
                if got != (hi - lo) * row_bytes:
                    raise InputError(f"row {first:,} is beyond the end of the vectors file ({self.n:,} rows): "
                                     f"it is truncated; rebuild the index")
        return out.astype(np.float32, copy=False)


def source_record(source_path: Path, fmt: str | None, vector_column: str | None, unit: bool) -> dict:
    """What the manifest records for re-ranking: where the vectors are and how to read them."""
    return {"path": str(Path(source_path).resolve()), "format": fmt or "embeddings",
            "vector_column": vector_column, "unit": unit}


def open_source(index_dir: Path, manifest: dict):
    """The vectors the index re-ranks from, as its manifest records them: a reader with `take`, after checking
    that the source is the version that was indexed. A clear InputError otherwise."""
    from hfbatch.indexing import ArrowVectors, UnitRows

    record = manifest.get("rerank_source") or {}
    path = Path(record.get("path") or "")
    hint = f"rebuild it: hfbatch index {path} -o {index_dir} --force"
    if not record or not path.exists():
        raise InputError(f"{index_dir} re-ranks from the vectors it was built from, {path or '(not recorded)'}, "
                         f"which no longer exist; {hint}")
    problem = source_changed(manifest, record)
    if problem:
        raise InputError(f"{path} {problem} since {index_dir} was built: re-ranking would score other vectors "
                         f"than the indexed ones; {hint}")
    if record["format"] == "npy":
        reader = NpyRows(path)
    elif record["format"] in ("embeddings", "dataset"):   # an embed output, or a save_to_disk dataset
        reader = ArrowVectors(path, column=record.get("vector_column") or "embedding")
    else:
        raise InputError(f"{index_dir}: re-ranking from {record['format']} vectors is not supported; {hint}")
    return UnitRows(reader) if record.get("unit") else reader


def source_changed(manifest: dict, record: dict) -> str | None:
    """Why the recorded source is not the indexed version (None: it is)."""
    from hfbatch.indexing import EMBEDDINGS_KEY
    from hfbatch.retrieval import _file_changed, current_manifest_hash

    if record["format"] == "embeddings":
        if current_manifest_hash(record["path"]) != manifest.get(EMBEDDINGS_KEY):
            return "changed (its manifest hash is not the recorded one)"
        return None
    for entry in manifest.get("inputs", []):  # the vectors' files (and ids), as the index job recorded them
        if entry.get("kind") == "file" and _file_changed(entry):
            return f"changed ({entry['path']}: its size or modification time is not the recorded one)"
    return None


def attach(index, index_dir: Path, manifest: dict):
    """The index as search uses it: wrapped in DiskRerank where its factory re-ranks from disk."""
    import pyarrow.parquet as pq

    from hfbatch.index_budget import reranks_from_disk
    from hfbatch.indexing import ROWS_FILE

    if not reranks_from_disk(manifest.get("factory") or ""):
        return index
    vectors = open_source(index_dir, manifest)
    hashes = pq.read_table(index_dir / ROWS_FILE, columns=["vector_hash"]).column(0).to_numpy()
    return DiskRerank(index, vectors, manifest.get("metric") or "ip", hashes=hashes,
                      source=manifest["rerank_source"]["path"])
