"""`hfbatch index --shards N`: N sub-indexes over row ranges, each buildable on its own, merged into one.

The plan's index is trained once, on a sample of all rows, and written empty (trained.faiss). Each shard is
then built by `build_shard(trained file, vectors, start, stop, shard file)` alone: a local process now, a Ray
worker later, needs nothing else. The shards' inverted lists (or flat codes, or a Refine's vectors) are merged
into one index, shard by shard, with their row numbers offset to the shard's start: the same coarse
quantizer and codebooks put every vector in the list, with the code, that a one-piece build gives it, so the
merged index answers exactly as the one-piece build (ties aside). An HNSW graph cannot be merged and is
refused. Peak memory is the merged index plus one shard.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hfbatch.errors import InputError
from hfbatch.faiss_runtime import faiss


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """(start, stop) of each shard: n rows in `shards` contiguous ranges of near-equal size."""
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def check_shardable(plan, shards: int) -> None:
    if shards > 1 and "HNSW" in plan.factory and "IVF" not in plan.factory:
        raise InputError(f"--shards {shards}: {plan.factory} is an HNSW graph, which cannot be merged from "
                         f"shards; use --kind ivfpq, ivf or flat, or build it in one piece (--shards 1)")


def build_shard(trained_file: Path, read_chunk, start: int, stop: int, out: Path, on_chunk=None,
                progress=None) -> Path:
    """Rows [start, stop) added to a copy of the trained empty index in trained_file, written to `out`. Row
    start is the shard's id 0: merge_shards offsets the ids."""
    from hfbatch.indexing import add_rows, save_index

    index = faiss.read_index(str(trained_file))
    add_rows(index, lambda a, b: read_chunk(start + a, start + b), 0, stop - start,
             progress=progress and (lambda done: progress(start + done)),
             on_chunk=on_chunk and (lambda lo, chunk: on_chunk(start + lo, chunk)))
    save_index(index, out)
    return out


def merge_into(merged, shard, offset: int) -> None:
    """Append the shard's vectors to `merged`, its ids moved up by `offset` (a flat index keeps positions, so
    shards must come in row order)."""
    merged, shard = faiss.downcast_index(merged), faiss.downcast_index(shard)
    if isinstance(merged, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        merge_into(merged.base_index, shard.base_index, offset)
        merge_into(merged.refine_index, shard.refine_index, offset)
        merged.ntotal = merged.base_index.ntotal
        return
    if isinstance(merged, faiss.IndexFlatCodes):
        merged.merge_from(shard, 0)
    else:
        merged.merge_from(shard, offset)


def merge_shards(files: list[Path], starts: list[int]):
    merged = faiss.read_index(str(files[0]))
    for file, start in zip(files[1:], starts[1:]):
        shard = faiss.read_index(str(file))
        merge_into(merged, shard, start)
        del shard
        Path(file).unlink()
    return merged


def build_sharded(plan, n: int, dim: int, read_chunk, shards: int, workdir: Path, on_chunk=None, progress=None):
    """The plan's index over n rows, built as `shards` shards in workdir and merged (see the module docstring)."""
    from hfbatch.indexing import save_index, train_index, with_reranking

    check_shardable(plan, shards)
    trained = workdir / "trained.faiss"
    save_index(train_index(plan, n, dim, read_chunk), trained)
    ranges = shard_ranges(n, shards)
    files = [build_shard(trained, read_chunk, start, stop, workdir / f"shard-{i:04d}.faiss", on_chunk, progress)
             for i, (start, stop) in enumerate(ranges)]
    merged = merge_shards(files, [start for start, _ in ranges])
    if merged.ntotal != n:  # a bug, not an input problem
        raise RuntimeError(f"merged shards hold {merged.ntotal} vectors, expected {n}")
    return with_reranking(merged, plan, read_chunk)
