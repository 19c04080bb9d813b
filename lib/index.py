"""FAISS index choice, build, tuning and persistence (provisional minimal version; see issue 8)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class IndexPlan:
    kind: str
    factory: str
    metric: str = "ip"
    train_size: int = 0
    reasons: str = ""
    params: dict = field(default_factory=dict)


def plan_for_kind(kind: str, n: int, dim: int) -> IndexPlan:
    nlist = max(1, min(4096, int(4 * np.sqrt(max(n, 1)))))
    if kind == "flat":
        return IndexPlan("flat", "Flat", reasons="exact search")
    if kind == "ivf":
        return IndexPlan("ivf", f"IVF{nlist},Flat", train_size=min(n, 64 * nlist))
    if kind == "hnsw":
        return IndexPlan("hnsw", "HNSW32,Flat")
    if kind == "ivfpq":
        m = max(1, dim // 4)
        while dim % m:
            m -= 1
        return IndexPlan("ivfpq", f"IVF{nlist},PQ{m}x4fs,RFlat", train_size=min(n, 64 * nlist))
    raise ValueError(kind)


def choose_index(n: int, dim: int, memory_budget_bytes: int | None = None, target_recall: float = 0.95
                 ) -> IndexPlan:
    return plan_for_kind("flat" if n < 100_000 else "ivf", n, dim)


def build_index(plan: IndexPlan, n: int, dim: int, read_chunk: Callable[[int, int], np.ndarray],
                progress: Callable[[int], None] | None = None, chunk_rows: int = 65_536):
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        step = max(1, n // max(plan.train_size, 1))
        index.train(np.ascontiguousarray(read_chunk(0, n)[::step]))
    for start in range(0, n, chunk_rows):
        block = read_chunk(start, min(n, start + chunk_rows))
        index.add(np.ascontiguousarray(block, dtype=np.float32))
        if progress:
            progress(len(block))
    return index


def apply_search_params(index, params: dict) -> None:
    import faiss

    for key, value in params.items():
        if key in ("nprobe", "efSearch", "k_factor"):
            faiss.ParameterSpace().set_index_parameter(index, key, value)


def save_index(index, path) -> None:
    import faiss

    tmp = f"{path}.tmp-{os.getpid()}"
    faiss.write_index(index, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_index(path, mmap: bool = False):
    import faiss

    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
