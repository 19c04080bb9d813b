"""How much memory an index takes, before it is built; and the best index that fits a memory budget.

The estimate is made as autofaiss's `estimated_index_size_in_bytes` does (bytes per vector times n, plus the
fixed parts), but from faiss's own objects instead of by parsing the factory string: `faiss.index_factory`
makes the empty, untrained index (milliseconds, no data), and each layer is asked its code size, so any
factory string faiss accepts can be estimated. What the estimate counts, per layer:
  - vectors stored as codes (Flat, SQ, PQ, the storage of HNSW): n x code_size
  - inverted lists: n x (code_size + 8-byte id), fast-scan codes padded to blocks of 32 per list, plus the
    coarse quantizer (nlist centroids, estimated as an index of its own)
  - HNSW links: ~2M int32 per vector at level 0 and a few more above (M per vector, 1/M of them)
  - Refine: the base index plus the re-ranking vectors; `,RDisk` (re-ranking from the vectors on disk)
    adds nothing in memory
  - PCA/OPQ transforms: the matrix, and the inner index at its reduced dimension.

The budget (`--memory-budget`, default DEFAULT_MEMORY_BUDGET whatever the machine has) is compared with
this estimate of the index: the build adds a training sample and one batch of vectors (BUILD_OVERHEAD says
how much), which the estimate reports beside it.
"""
from __future__ import annotations

import math

from hfbatch.errors import InputError
from hfbatch.faiss_runtime import faiss

DEFAULT_MEMORY_BUDGET = 4 * 2**30           # the same on every machine: one config gives one index
DEFAULT_MEMORY_BUDGET_TEXT = "4GiB"
ID_BYTES = 8
FAST_SCAN_BLOCK = 32                        # fast-scan lists hold codes in blocks of 32 vectors
RDISK = ",RDisk"                            # hfbatch's suffix: re-rank from the vectors on disk


def base_factory(factory: str) -> str:
    """The faiss factory string without hfbatch's `,RDisk` suffix."""
    return factory[:-len(RDISK)] if factory.endswith(RDISK) else factory


def reranks_from_disk(factory: str) -> bool:
    return factory.endswith(RDISK)


def index_bytes(factory: str, n: int, dim: int, metric: int = faiss.METRIC_INNER_PRODUCT) -> int:
    """Estimated memory of `factory` holding n vectors of dim (see the module docstring). A factory string
    faiss rejects raises RuntimeError (faiss's own message)."""
    index = faiss.index_factory(dim, base_factory(factory), metric)
    return _layer_bytes(index, n)


def _layer_bytes(index, n: int) -> int:
    idx = faiss.downcast_index(index)
    if isinstance(idx, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        return _layer_bytes(idx.base_index, n) + _layer_bytes(idx.refine_index, n)
    if isinstance(idx, faiss.IndexPreTransform):
        transforms = sum(faiss.downcast_VectorTransform(idx.chain.at(i)).d_in *
                         faiss.downcast_VectorTransform(idx.chain.at(i)).d_out * 4 for i in range(idx.chain.size()))
        return transforms + _layer_bytes(idx.index, n)
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return n * ID_BYTES * (2 if isinstance(idx, faiss.IndexIDMap2) else 1) + _layer_bytes(idx.index, n)
    if isinstance(idx, faiss.IndexHNSW):
        m = idx.hnsw.nb_neighbors(1)                       # M; level 0 has 2M
        links = n * (2 * m + m / max(m - 1, 1)) * 4 * 1.05   # level 0, the upper levels, and vector slack
        return int(links) + n * 16 + _layer_bytes(idx.storage, n)   # + levels and offsets
    if isinstance(idx, faiss.IndexIVF):
        per_list = math.ceil(n / max(idx.nlist, 1))
        if hasattr(idx, "bbs"):                            # fast-scan: each list rounded up to whole blocks
            stored = idx.nlist * math.ceil(per_list / idx.bbs) * idx.bbs
            lists = int(stored * idx.code_size) + n * ID_BYTES
        else:
            lists = n * (idx.code_size + ID_BYTES)
        return lists + idx.nlist * 32 + _layer_bytes(idx.quantizer, idx.nlist)   # + per-list vectors' headers
    code_size = getattr(idx, "code_size", None)
    if code_size is None:
        try:
            code_size = idx.sa_code_size()
        except RuntimeError:
            code_size = idx.d * 4                          # unknown layout: as much as the raw vectors
    return n * int(code_size)


def build_overhead(train_size: int, dim: int, chunk_rows: int, n: int) -> int:
    """What a build holds beside the index: its training sample, one batch of vectors, and per row its id and
    vector hash (rows.parquet)."""
    return (train_size + chunk_rows) * dim * 4 + n * 2 * ID_BYTES


def human(size: float) -> str:
    """A byte count for messages, in the binary units --memory-budget reads back (rounded up)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{math.ceil(size / scale * 10) / 10:g}{unit}"
    return f"{int(size)}B"


def first_that_fits(plans: list, estimate, budget: int, budget_text: str, n: int, dim: int):
    """The first plan whose estimate fits the budget; else an InputError naming the smallest budget that works.

    `plans` are in order of preference (best search first); `estimate(plan)` its bytes."""
    sized = [(plan, estimate(plan)) for plan in plans]
    for plan, size in sized:
        if size <= budget:
            return plan, size
    plan, size = min(sized, key=lambda item: item[1])
    raise InputError(f"--memory-budget {budget_text}: no index over {n:,} vectors of dim {dim} fits in "
                     f"{human(budget)}; the smallest, {plan.factory}, needs about {human(size)}: give "
                     f"--memory-budget {human(size)} or more")
