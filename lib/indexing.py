"""FAISS indexes for hfbatch: choose, build, tune, save and load; and the `hfbatch index` job (make_index).

The FAISS part is numpy + faiss (pyarrow only for ArrowVectors). The vectors are
float32; they never have to fit in memory: everything reads through
`read_chunk(start, stop) -> float32 [stop - start, dim]`.

Metrics (IndexPlan.metric), from the model's own similarity function:
  ip   inner product: "dot", and "cosine" over unit vectors (UnitRows makes rows
       unit-length where the model did not); larger is closer
  l2   squared euclidean distance: "euclidean"; smaller is closer

Kinds, from exact to most compressed:
  flat   exact brute force ("Flat")                      small n
  ivf    inverted lists of raw vectors ("IVF{nlist},Flat")
  hnsw   graph ("HNSW32"), fast queries but slow to build
  ivfpq  inverted lists of 4-bit fast-scan PQ codes, re-ranked with a compact
         copy of the vectors ("IVF{nlist},PQ{m}x4fs,Refine(SQfp16)")   large n,
         or, where that copy does not fit the memory budget, re-ranked exactly
         from the vectors on disk ("IVF{nlist},PQ{m}x4fs,RDisk", hfbatch.index_rerank)
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hfbatch import log
from hfbatch.errors import InputError
from hfbatch.faiss_runtime import faiss  # (imported with its runtime settings: see there)
from hfbatch.index_budget import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_MEMORY_BUDGET_TEXT,
    RDISK,
    base_factory,
    build_overhead,
    first_that_fits,
    index_bytes,
    reranks_from_disk,
)
from hfbatch.index_rerank import DiskRerank, unwrap

ReadChunk = Callable[[int, int], np.ndarray]

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
CHUNK_ROWS = 65_536        # rows per add() call: ~100 MB of float32 at dim 384
FLAT_MAX_N = 100_000       # below this, exact search is fast enough and needs no training
TRAIN_PER_LIST = 40        # k-means wants >= 39 points per centroid (faiss warns below)
TRAIN_BLOCKS = 256         # the training sample is read as this many evenly spaced blocks
ID_BYTES = 8               # inverted lists store an int64 id per vector
SEARCH_BATCH = 256         # queries per index.search call in `hfbatch search` (search_batched)
MAX_LISTS = 4096           # IVF lists chosen for the largest n (see _nlist)
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
SIMILARITY_METRIC = {"cosine": "ip", "dot": "ip", "euclidean": "l2"}  # sentence-transformers' names
UNIT_TOLERANCE = 1e-4      # a row whose norm is this close to 1 is left as it is (bit for bit)


@dataclass
class IndexPlan:
    kind: str              # flat | ivf | hnsw | ivfpq | custom
    factory: str           # faiss.index_factory string
    metric: str = "ip"
    train_size: int = 0    # rows sampled for training (0: the index needs none)
    reasons: str = ""


# ----------------------------------------------------------------------------
# choosing


def _nlist(n: int) -> int:
    # ~sqrt(n) lists as a power of two (1M -> 1024, 200k -> 512, 10M -> 4096), fewer than autofaiss's
    # 4-16*sqrt(n): assigning every vector to a list (n x nlist x dim multiply-adds) is the build's main cost,
    # while fast-scan makes scanning longer lists cheap. Measured at 1M x 384 (recall@10 0.95): 1024, 1536
    # and 2048 lists give the same QPS, built in 14, 17 and 25 s. At 10M (2-core Xeon, faiss on SkylakeX
    # BLAS kernels), 4096 lists built in 283 s against 132 s for 1024, and searched at 15x exact search
    # against 9x (held-out recall 0.962 / 0.958). At most MAX_LISTS.
    return int(min(MAX_LISTS, max(16, 2 ** round(math.log2(math.sqrt(n))))))


def _code_bytes(m: int) -> int:
    return (m + 1) // 2       # 4-bit codes, packed in pairs (an odd m pads half a byte)


def _pq_m(dim: int, max_bytes: float) -> int:
    """Sub-quantizers for 4-bit codes: the largest divisor of dim whose codes fit
    max_bytes, an even one where there is one (fast-scan packs codes in pairs);
    0 if none fits."""
    fits = [m for m in range(1, dim + 1) if dim % m == 0 and _code_bytes(m) <= max_bytes]
    return max([m for m in fits if m % 2 == 0] or fits, default=0)


def _pq_m_near(dim: int, target: float) -> int:
    """The divisor of dim nearest to `target` sub-quantizers (by ratio): for a
    dim without a suitable even divisor (odd, or prime: then 1 or dim)."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: abs(math.log(m / target)))


def _train_size(n: int, nlist: int) -> int:
    # k-means wants >= 39 points per centroid (faiss warns below); more only
    # slows training. PQ codebooks (16 centroids each) need far fewer.
    return min(n, max(nlist * TRAIN_PER_LIST, 32_768))


def plan_for_kind(kind: str, n: int, dim: int, memory_budget_bytes: int | None = None,
                  metric: str = "ip", row_access: bool = False) -> IndexPlan:
    """The plan for an explicitly requested kind, sized for n vectors of dim: the best variant of that kind
    whose memory estimate fits the budget (InputError naming the budget needed where none does)."""
    plans = kind_plans(kind, n, dim, metric, row_access)
    return fit_budget(plans, n, dim, memory_budget_bytes, metric)[0]


def kind_plans(kind: str, n: int, dim: int, metric: str = "ip", row_access: bool = False) -> list[IndexPlan]:
    """The variants of a kind, most accurate first (the budget picks the first that fits)."""
    if kind == "flat":
        return [IndexPlan("flat", "Flat", metric, reasons="exact search requested")]
    if kind == "hnsw":
        return [IndexPlan("hnsw", "HNSW32", metric,
                          reasons="graph index requested (no training; slow to build for large n)")]
    nlist = min(_nlist(n), max(1, n // TRAIN_PER_LIST))   # never more lists than we can train
    train = _train_size(n, nlist)
    if kind == "ivf":
        return [IndexPlan("ivf", f"IVF{nlist},Flat", metric, train_size=train, reasons=f"IVF requested; {nlist} lists")]
    if kind == "ivfpq":
        # dim/4 sub-quantizers (4 dims per 4-bit code, 48 bytes at dim 384):
        # on embeddings (a few hundred dims, lower intrinsic dimension) as
        # accurate after re-ranking as dim/2, at half the bytes to scan. Small
        # dims keep dim/2: 4 dims per code loses too much there, and the codes
        # are tiny anyway.
        # Re-ranking with fp16 vectors is as accurate as with float32 (its error
        # is far below the gap between neighbours) at half the memory. Where that
        # copy does not fit, the shortlist is re-ranked from the vectors on disk
        # (exact; needs a source whose rows can be read one by one), then with
        # SQ8 (slightly worse), then not at all, with codes as large as the budget
        # allows in the last case.
        # m must divide dim: a dim with no even divisor near the target (an odd
        # or prime one) takes the nearest odd divisor (faiss pads odd m).
        target_bytes = dim / 8 if dim >= 256 else dim / 4
        m = (_pq_m(dim, target_bytes) or _pq_m(dim, dim)) if dim % 2 == 0 else _pq_m_near(dim, 2 * target_bytes)
        codes = f"IVF{nlist},PQ{m}x4fs"
        head = f"{nlist} lists, {m}x4-bit fast-scan codes"
        plans = [IndexPlan("ivfpq", f"{codes},Refine(SQfp16)", metric, train, f"{head}, shortlist re-ranked with "
                                                                               f"SQfp16 vectors")]
        if row_access:
            plans.append(IndexPlan("ivfpq", codes + RDISK, metric, train,
                                   f"{head}, shortlist re-ranked exactly from the vectors on disk (a copy in "
                                   f"memory does not fit the budget)"))
        plans.append(IndexPlan("ivfpq", f"{codes},Refine(SQ8)", metric, train,
                               f"{head}, shortlist re-ranked with SQ8 vectors"))
        smaller = sorted({mm for mm in range(1, m + 1) if dim % mm == 0 and (mm % 2 == 0 or dim % 2)}, reverse=True)
        plans += [IndexPlan("ivfpq", f"IVF{nlist},PQ{mm}x4fs", metric, train,
                            f"{nlist} lists, {mm}x4-bit fast-scan codes, no re-ranking (budget too small; recall "
                            f"will be lower)") for mm in smaller]
        return plans
    raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")


def fit_budget(plans: list[IndexPlan], n: int, dim: int, budget: int | None, metric: str = "ip",
               budget_text: str | None = None) -> tuple[IndexPlan, int]:
    """(the first plan whose index fits `budget` bytes (None: any), its estimated bytes); InputError naming the
    smallest budget that works where none fits."""
    def estimate(plan):
        return index_bytes(plan.factory, n, dim, faiss_metric(plan.metric))

    if budget is None:
        return plans[0], estimate(plans[0])
    return first_that_fits(plans, estimate, budget, budget_text or f"{budget}", n, dim)


def plan_for_factory(factory: str, n: int, dim: int, metric: str = "ip") -> IndexPlan:
    """An expert's faiss.index_factory string, passed through as is."""
    needs_training = bool(re.search(r"IVF|IMI|PQ|SQ[48]|LSH|RQ|LSQ|PCA|OPQ|ITQ", factory))
    nlist = re.search(r"IVF(\d+)", factory)
    train = (_train_size(n, int(nlist.group(1)) if nlist else 0)) if needs_training else 0
    return IndexPlan("custom", factory, metric, train_size=train, reasons="factory string given")


def choose_index(n: int, dim: int, memory_budget_bytes: int | None = None,
                 target_recall: float = 0.95, metric: str = "ip", row_access: bool = False,
                 budget_text: str | None = None) -> IndexPlan:
    """Pick an index for n vectors of dim, like autofaiss but measured on this workload.

    - small n, or target_recall 1.0: exact Flat (nothing to train, recall 1.0);
    - otherwise IVF + 4-bit fast-scan PQ + fp16 re-ranking. Measured on 2 cores
      at recall@10 0.95 (bench/index_scale.py): at 200k x 384 it answers as
      fast as HNSW32 (~20x exact search) but builds in 3.5 s instead of 23 s
      and needs half the memory; IVF-Flat manages only ~1x there. At 1M it
      builds in ~15 s where HNSW needs ~100 s;
    - when the budget is smaller than that, the shortlist is re-ranked from the
      vectors on disk (`row_access`: they can be read row by row), then more
      coarsely, then not at all (see kind_plans); the first whose memory estimate
      (hfbatch.index_budget) fits wins, and none fitting is an InputError that
      names the budget needed.
    Otherwise target_recall does not change the structure: the search
    parameters are tuned for it afterwards (tune_search_params).
    """
    flat = kind_plans("flat", n, dim, metric)
    compressed = kind_plans("ivfpq", n, dim, metric, row_access)
    exact_is_best = n < FLAT_MAX_N or target_recall >= 1.0
    plan, _ = fit_budget(flat + compressed if exact_is_best else compressed, n, dim, memory_budget_bytes, metric,
                         budget_text)
    if plan.kind == "flat":
        plan.reasons = (f"n={n:,} < {FLAT_MAX_N:,}: exact search is fast enough" if n < FLAT_MAX_N
                        else "recall 1.0 asked for: exact search")
        return plan
    flat_bytes = n * dim * 4
    fits = memory_budget_bytes is None or flat_bytes <= memory_budget_bytes
    head = f"n={n:,}" if fits else f"flat vectors ({flat_bytes / 2**30:.2f} GiB) exceed the budget"
    plan.reasons = f"{head}: {plan.reasons}"
    return plan


# ----------------------------------------------------------------------------
# building


def use_all_cores() -> int:
    # faiss (OpenMP) otherwise may use fewer threads than the cores we are given
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    faiss.omp_set_num_threads(n)
    return n


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """x with every row scaled to unit length, so that inner product is cosine. Rows already within
    UNIT_TOLERANCE of it (a model with a Normalize module) are left bit for bit as they are; zero rows stay
    zero. Copies only when a row changes."""
    x = _f32(x)
    norms = np.linalg.norm(x, axis=1)
    off = np.flatnonzero((np.abs(norms - 1) > UNIT_TOLERANCE) & (norms > 0))
    if not len(off):
        return x
    x = x.copy()
    x[off] /= norms[off, None]
    return x


class UnitRows:
    """A read_chunk whose rows come out unit-length (normalize_rows): cosine similarity as inner product over
    vectors that a model without a Normalize module made. Keeps the reader's n and dim."""

    def __init__(self, read_chunk: ReadChunk):
        self.read_chunk = read_chunk
        self.n, self.dim = getattr(read_chunk, "n", None), getattr(read_chunk, "dim", None)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return normalize_rows(self.read_chunk(start, stop))

    def take(self, rows: np.ndarray) -> np.ndarray:
        return normalize_rows(read_rows(self.read_chunk, rows))


def faiss_metric(metric: str) -> int:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")
    return METRICS[metric]


def read_sample(read_chunk: ReadChunk, n: int, size: int, blocks: int = TRAIN_BLOCKS) -> np.ndarray:
    """`size` rows spread evenly over [0, n), read as `blocks` contiguous blocks.

    Blocks rather than single rows: each read_chunk call has a fixed cost, and a
    few hundred blocks spread over the corpus cover it as well as a stride does.
    """
    if size >= n:
        return _f32(read_chunk(0, n))
    blocks = max(1, min(blocks, size))
    per = size // blocks
    starts = np.linspace(0, n - per, blocks).astype(np.int64)
    parts = [read_chunk(int(s), int(s) + per) for s in starts]
    extra = size - per * blocks                       # remainder from the last rows
    if extra:
        parts.append(read_chunk(n - extra, n))
    return _f32(np.concatenate(parts))


def build_index(plan: IndexPlan, n: int, dim: int, read_chunk: ReadChunk,
                progress: Callable[[int], None] | None = None,
                chunk_rows: int = CHUNK_ROWS,
                on_chunk: Callable[[int, np.ndarray], None] | None = None) -> faiss.Index:
    """Train on a sample, then add all n rows chunk by chunk.

    Peak memory is the index itself plus one chunk plus the training sample:
    the vectors are never all in memory at once (except in a Flat index, which
    is the vectors). `progress(rows added so far)`; `on_chunk(start, rows)` sees
    every chunk once, so callers can derive things (row hashes) without a
    second read of the data.
    """
    index = train_index(plan, n, dim, read_chunk)
    add_rows(index, read_chunk, 0, n, progress, chunk_rows, on_chunk)
    return with_reranking(index, plan, read_chunk)


def train_index(plan: IndexPlan, n: int, dim: int, read_chunk: ReadChunk) -> faiss.Index:
    """The empty index of the plan, trained on a sample of the n rows (read as evenly spaced blocks)."""
    use_all_cores()
    index = faiss.index_factory(dim, base_factory(plan.factory), faiss_metric(plan.metric))
    if not index.is_trained:
        sample = read_sample(read_chunk, n, plan.train_size or min(n, 65_536))
        with blas_for_batches():
            index.train(sample)
        del sample
    return index


def add_rows(index: faiss.Index, read_chunk: ReadChunk, start: int, stop: int,
             progress: Callable[[int], None] | None = None, chunk_rows: int = CHUNK_ROWS,
             on_chunk: Callable[[int, np.ndarray], None] | None = None) -> None:
    """Add rows [start, stop) chunk by chunk, in order (ids are positions: a shard's are offset when merged)."""
    use_all_cores()
    with blas_for_batches():
        for lo in range(start, stop, chunk_rows):
            hi = min(stop, lo + chunk_rows)
            chunk = _f32(read_chunk(lo, hi))
            index.add(chunk)
            if on_chunk:
                on_chunk(lo, chunk)
            if progress:
                progress(hi)


def with_reranking(index: faiss.Index, plan: IndexPlan, read_chunk: ReadChunk):
    """An `,RDisk` plan's index as search uses it: its shortlist re-ranked from the vectors it was built from."""
    if not reranks_from_disk(plan.factory):
        return index
    from hfbatch.index_rerank import supports_row_reads

    if not supports_row_reads(read_chunk):
        raise InputError(f"{plan.factory}: re-ranking from disk needs vectors that can be read row by row "
                         f"(an embed output or a .npy file)")
    # a .npy file's `take` reads by pread (NpyVectors.take), so random rows add nothing to resident memory
    return DiskRerank(index, read_chunk, plan.metric, source="the vectors being indexed")


class blas_for_batches:
    """faiss switches brute-force search (the IVF quantizer's assignment of every added chunk, k-means) to
    BLAS only above a query count that this build sets high (128000 in the 1.15 wheel): a 65,536-row chunk
    would be scanned without it. Restored afterwards."""

    def __enter__(self):
        self.old = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 20

    def __exit__(self, *exc):
        faiss.cvar.distance_compute_blas_threshold = self.old


# ----------------------------------------------------------------------------
# ground truth and recall


def exact_neighbors(read_chunk: ReadChunk, n: int, queries: np.ndarray, k: int,
                    chunk_rows: int = CHUNK_ROWS, metric: str = "ip",
                    allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by `metric` over all n rows, or only the rows in `allowed` (sorted int64), one chunk
    in memory at a time: (distances, rows); row -1 where fewer than k rows exist."""
    use_all_cores()
    queries = _f32(queries)
    heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")   # larger IP, smaller L2 is closer
    # faiss.knn switches to BLAS only above a query count that this build sets
    # high (128000 in the 1.15 wheel): 200 queries ran at 1/10 of BLAS speed
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    try:
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            if allowed is None:
                rows, chunk = None, _f32(read_chunk(start, stop))
            else:
                lo, hi = np.searchsorted(allowed, [start, stop])
                if lo == hi:
                    continue
                rows = allowed[lo:hi] - start
                chunk = _f32(read_chunk(start, stop)[rows])
            D, I = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss_metric(metric))
            found = I if rows is None else rows[np.maximum(I, 0)]
            heap.add_result(D, np.where(I >= 0, found + start, -1))
    finally:
        faiss.cvar.distance_compute_blas_threshold = old
    heap.finalize()
    return heap.D, heap.I


def read_rows(read_chunk: ReadChunk, rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), dim]: the given rows, through the reader's own `take` where it has one (a Parquet
    reader decodes whole row groups), else one read_chunk call per row."""
    take = getattr(read_chunk, "take", None)
    if take is not None:
        return _f32(take(np.asarray(rows, dtype=np.int64)))
    return _f32(np.concatenate([read_chunk(int(i), int(i) + 1) for i in rows]))


def tuning_queries(read_chunk: ReadChunk, n: int, num: int = 1000, seed: int = 0,
                   index: faiss.Index | None = None, metric: str = "ip") -> np.ndarray:
    """Queries for tune_search_params on an HNSW index (where rows_stand_for_queries is false) that behave
    like unseen ones, made from database rows.

    A row used as is sits in the index: an HNSW search lands on its node, whose
    edges are its neighbours, so recall comes out optimistic (0.98 against 0.96
    on held-out queries). Each row is therefore moved away from itself, in a
    random direction, as far (in angle) as a typical row is from its nearest
    neighbour under `metric`, keeping its length (which matters to ip and l2
    over vectors that are not unit-length). On IVF this errs the safe way, by
    more as the corpus grows (1M: 0.954 against 0.961 held-out; 10M: 0.02 low):
    a random direction leaves the data's own, anisotropic spread.

    That typical distance is measured on 200 of the rows: exactly (a pass over
    all n rows), or, given the built `index` (whose ids are row numbers), by
    searching it with accurate settings, which takes milliseconds. An
    approximate index that misses a row's nearest neighbour reports a farther
    one, which moves the queries a little further out: the safe side again.
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(num, n), replace=False))
    x = read_rows(read_chunk, rows)
    lengths = np.linalg.norm(x, axis=1, keepdims=True)
    cos = _nearest_cosine(read_chunk, n, x, rows, index, metric)
    cos = float(np.clip(cos, 0.3, 0.95))                        # duplicates would make it 1
    x = x / np.maximum(lengths, 1e-30)
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    noise -= (noise * x).sum(1, keepdims=True) * x             # orthogonal, so cos(q, x) = cos
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return (x * cos + noise * math.sqrt(1 - cos * cos)) * lengths


def rows_stand_for_queries(index: faiss.Index | None, n: int, k: int) -> bool:
    """Whether database rows, each left out of its own results, can tune `index` in place of unseen queries.

    A row drawn from the corpus and searched against the other rows is distributed exactly as a new query
    from the same source would be, so on an IVF, PQ or flat index its recall predicts held-out recall (at
    10M, 1,000 rows read -0.007 to +0.006 off 1,000 held-out queries, about one standard error, where moved
    rows read 0.013-0.031 low and made the tuner probe more lists than needed). Not on HNSW: the search
    walks to the row's own node, whose edges are its neighbours (see tuning_queries)."""
    if n <= k:
        return False
    return index is None or not isinstance(list(index_layers(index))[-1], faiss.IndexHNSW)


def tuning_rows(n: int, num: int, seed: int = 0) -> np.ndarray:
    """`num` database rows spread at random over the corpus, sorted (reads stay sequential)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(num, n), replace=False))


def without_rows(I: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The first k ids of each result line that are not that line's own row (k + 1 were searched)."""
    keep = I != rows[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]   # kept ids first, in rank order
    return np.take_along_axis(I, order, axis=1)


def search_leaving_out(index: faiss.Index, queries: np.ndarray, k: int, params: dict, rows: np.ndarray | None,
                       repeat: int = 1) -> tuple[np.ndarray, float]:
    """timed_search with `params`; where `rows` are given (query i is database row rows[i]), k + 1 are searched
    and each row dropped from its own results. A re-ranking shortlist is then made one longer, so that it
    holds as many other rows as a new query's would: (k + 1) x factor = k x k_factor_rf + 1 (+ 0.25 so
    that faiss's truncation and DiskRerank's rounding both land there)."""
    if rows is None:
        apply_search_params(index, params)
        return timed_search(index, queries, k, repeat)
    if "k_factor_rf" in params:
        params = {**params, "k_factor_rf": (params["k_factor_rf"] * k + 1.25) / (k + 1)}
    apply_search_params(index, params)
    I, qps = timed_search(index, queries, k + 1, repeat)
    return without_rows(I, rows, k), qps


def _nearest_cosine(read_chunk: ReadChunk, n: int, x: np.ndarray, rows: np.ndarray,
                    index: faiss.Index | None, metric: str = "ip", probes: int = 200) -> float:
    """Median cosine between a row and its nearest other row under `metric`, over `probes` of the rows x
    (spread over the corpus: `rows` is sorted)."""
    pick = np.linspace(0, len(x) - 1, min(probes, len(x))).astype(np.int64)
    if index is None:
        _, I = exact_neighbors(read_chunk, n, x[pick], 3, metric=metric)
    else:
        apply_search_params(index, accurate_params(index))
        _, I = index.search(_f32(x[pick]), 3)
    others = np.where((I == rows[pick, None]) | (I < 0), np.iinfo(np.int64).max, np.arange(3)[None, :])
    first = I[np.arange(len(pick)), others.argmin(axis=1)]     # the best hit that is not the row itself
    found = others.min(axis=1) < 3
    if not found.any():
        return 0.5
    probe, near = x[pick][found], read_rows(read_chunk, first[found])
    cos = (probe * near).sum(1) / np.maximum(np.linalg.norm(probe, axis=1) * np.linalg.norm(near, axis=1), 1e-30)
    return float(np.median(cos))


def recall_at_k(found: np.ndarray, ground_truth_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the true top k that the index also returned in its top k."""
    return float(np.mean(recall_per_query(found, ground_truth_ids, k)))


def recall_per_query(found: np.ndarray, ground_truth_ids: np.ndarray, k: int = 10) -> np.ndarray:
    return np.array([len(np.intersect1d(f[:k], g[:k])) / k for f, g in zip(found, ground_truth_ids)])


def recall_lower_bound(found: np.ndarray, ground_truth_ids: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(recall@k, recall@k less TUNING_STANDARD_ERRORS standard errors of that mean over the queries). A tuner
    that stops at the first setting whose estimate reaches the target lands, half the time, below it on other
    queries; with 1,000 queries at recall 0.95 the standard error is about 0.004 (at 10M, one standard error
    of margin gave 0.9507 on the held-out queries: a pass by chance)."""
    per_query = recall_per_query(found, ground_truth_ids, k)
    mean = float(per_query.mean())
    return mean, mean - TUNING_STANDARD_ERRORS * float(per_query.std()) / math.sqrt(len(per_query))


# ----------------------------------------------------------------------------
# search-time parameters


def index_layers(index: faiss.Index):
    """The index and those it wraps, outermost first, each downcast: a Refine's base index, a PreTransform's
    or an IDMap's inner index. The one walk through faiss's wrappers that the knobs below need."""
    if isinstance(index, DiskRerank):
        yield index
        index = index.base
    idx = faiss.downcast_index(index)
    while True:
        yield idx
        if isinstance(idx, (faiss.IndexRefine, faiss.IndexRefineFlat)):
            idx = faiss.downcast_index(idx.base_index)
        elif isinstance(idx, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
            idx = faiss.downcast_index(idx.index)
        else:
            return


def _is_refine(idx) -> bool:
    return isinstance(idx, (faiss.IndexRefine, faiss.IndexRefineFlat, DiskRerank))


def search_param_grid(index: faiss.Index) -> dict[str, list[int]]:
    """The knobs this index has, each with its values from fast to accurate."""
    grid = {}
    for idx in index_layers(index):
        if _is_refine(idx):
            grid["k_factor_rf"] = [1, 2, 4, 8, 16, 32]
        elif isinstance(idx, faiss.IndexIVF):
            grid["nprobe"] = [p for p in (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 256,
                                          320, 384, 512, 768, 1024, 1536, 2048, 4096, 8192, 16384, 32768, 65536)
                              if p <= idx.nlist]
        elif isinstance(idx, faiss.IndexHNSW):
            grid["efSearch"] = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048]
    return grid


def search_params_with_selector(index: faiss.Index, sel, widen: int = 1) -> tuple[object, bool]:
    """faiss SearchParameters carrying the selector `sel` (filtered search), with the index's current nprobe /
    efSearch / k_factor times `widen` (capped). Returns (params, whether a larger widen would search more)."""
    *wrappers, leaf = index_layers(index)
    if isinstance(leaf, faiss.IndexHNSW):
        ef = min(leaf.hnsw.efSearch * widen, max(leaf.ntotal, 16))
        params, more = faiss.SearchParametersHNSW(sel=sel, efSearch=int(ef)), ef < leaf.ntotal
    elif isinstance(leaf, faiss.IndexIVF):
        nprobe = min(leaf.nprobe * widen, leaf.nlist)
        params, more = faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe)), nprobe < leaf.nlist
    else:
        params, more = faiss.SearchParameters(sel=sel), False
    for idx in reversed(wrappers):  # an IDMap passes its inner index's parameters on as they are
        if _is_refine(idx):
            k_factor = min(float(idx.k_factor) * widen, 256.0)
            params = faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=params)
            more = more or k_factor < 256.0
        elif isinstance(idx, faiss.IndexPreTransform):
            params = faiss.SearchParametersPreTransform(index_params=params)
    return params, more


def apply_search_params(index: faiss.Index, params: dict) -> None:
    """Set search-time parameters (nprobe, efSearch, k_factor_rf) on an index.

    Other keys (measured recall, qps) are ignored, so the dict that
    tune_search_params returns can be stored and applied as is after loading.
    """
    if "k_factor_rf" in params:  # set on the layer itself: faiss's ParameterSpace truncates it to an integer
        for idx in index_layers(index):
            if _is_refine(idx):
                idx.k_factor = float(params["k_factor_rf"])
    if isinstance(index, DiskRerank):
        index = index.base
    space = faiss.ParameterSpace()   # knows how to reach through Refine/PreTransform wrappers
    for name in ("nprobe", "efSearch"):
        if name in params:
            space.set_index_parameter(index, name, min(int(params[name]), _knob_ceiling(index, name)))


def _knob_ceiling(index: faiss.Index, name: str) -> int:
    """The largest nprobe / efSearch that can change a result: every list, every vector. A larger value (a user's
    --nprobe 2**31) would wrap faiss's C int negative, or size its buffers by it (queries x nprobe)."""
    if name == "nprobe":
        nlists = [idx.nlist for idx in index_layers(index) if isinstance(idx, faiss.IndexIVF)]
        return max(nlists, default=2**31 - 1)
    return max(int(index.ntotal), 1)


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, repeat: int = 1) -> tuple[np.ndarray, float]:
    """(ids, queries per second) for one batched search, best of `repeat` runs."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        _, I = index.search(_f32(queries), k)
        best = min(best, time.perf_counter() - t)
    return I, len(queries) / best


def search_batched(index, queries: np.ndarray, k: int, batch: int = SEARCH_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """index.search over `batch` queries at a time: a fast-scan IVF search builds lookup tables for all its
    queries at once (queries x nprobe x m x 16 floats: 1,000 queries at nprobe 192, PQ96 are 295 MB, and
    search RSS was 2.3 GB at 1M), while 256 queries a batch keep the cores as busy. A DiskRerank batches
    its queries itself (overlapping the next batch's search with this one's re-ranking)."""
    if len(queries) <= batch or isinstance(index, DiskRerank):
        return index.search(queries, k)
    parts = [index.search(queries[lo:lo + batch], k) for lo in range(0, len(queries), batch)]
    return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


def accurate_params(index: faiss.Index) -> dict:
    """Settings near the accurate end of each knob, still quick for a few hundred queries."""
    grid = search_param_grid(index)
    ivf = _coarse_ivf(index)
    wanted = {"k_factor_rf": 16, "efSearch": 256, "nprobe": max(16, ivf.nlist // 8 if ivf else 0)}
    return {name: max([v for v in grid[name] if v <= wanted[name]], default=grid[name][0]) for name in grid}


def _coarse_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF index itself or under a Refine: its quantizer sees the queries as they are (None otherwise,
    e.g. behind a PCA transform)."""
    for idx in index_layers(index):
        if isinstance(idx, faiss.IndexIVF):
            return idx
        if not _is_refine(idx):
            return None
    return None


def tune_search_params(index: faiss.Index, queries: np.ndarray, gt: np.ndarray,
                       target_recall: float = 0.95, k: int = 10,
                       log: Callable[[str], None] | None = None, rows: np.ndarray | None = None) -> dict:
    """Fast parameters that reach target_recall@k on these queries (`rows`: the database row each query is,
    left out of its own results and of `gt`; see search_leaving_out).

    Recall rises with nprobe / efSearch and with the re-ranking factor
    (k_factor_rf). So, with a handful of searches:
      1. with the largest re-ranking factor, raise nprobe / efSearch until the
         target is reached (or recall stops improving). For an IVF index the
         climb starts where it can first succeed: a true neighbour can only be
         found if its list is probed, so the nprobe at which the probed lists
         hold target_recall of the true neighbours (known from the coarse
         quantizer alone, without a search) is a floor;
      2. at that nprobe and the next REFINE_STEPS_UP ones, lower the factor
         while the target still holds. A long shortlist is not cheap: re-ranked
         from disk (RDisk) at 10M, 320 candidates a query halved the QPS of 40
         (593 against 290 QPS at nprobe 256), so probing a little more with a
         short shortlist often wins.
    A setting reaches the target when its recall less two standard errors over
    the queries does (recall_lower_bound), so that other queries reach it too.
    Of the settings that reach it, the one with the highest QPS wins; if none
    does, the most accurate one seen.
    Returns the parameters plus "recall" and "qps" measured with them (QPS:
    best of 3 runs of the batch).
    """
    use_all_cores()
    grid = search_param_grid(index)
    factors = grid.get("k_factor_rf", [None])
    name = "nprobe" if "nprobe" in grid else "efSearch" if "efSearch" in grid else None
    tried = []

    def measure(factor, value, repeat=1):
        params = {key: v for key, v in (("k_factor_rf", factor), (name, value)) if v is not None}
        I, qps = search_leaving_out(index, queries, k, params, rows, repeat)
        recall, low = recall_lower_bound(I, gt, k)
        tried.append({**params, "recall": recall, "low": low, "qps": qps})
        if log:
            log(f"  {params} recall@{k}={recall:.4f} (lower bound {low:.4f}) qps={qps:,.0f}")
        return low >= target_recall

    values = grid[name] if name else [None]
    if name == "nprobe":
        values = values[_nprobe_floor(index, queries, gt, target_recall, values):]
    value, prev = None, None
    for value in values:                                          # 1. the smallest value that reaches it
        if measure(factors[-1], value):
            break
        if prev is not None and tried[-1]["recall"] - prev < 0.001:
            break              # plateau: the shortlist or the codes, not nprobe / efSearch, limit recall
        prev = tried[-1]["recall"]
    if tried[-1]["low"] >= target_recall and len(factors) > 1:
        at = values.index(value)
        for probe in values[at:at + 1 + REFINE_STEPS_UP]:         # 2. a shorter shortlist, while it holds
            for factor in reversed(factors[:-1]):
                if not measure(factor, probe):
                    break
    ok = [t for t in tried if t["low"] >= target_recall]
    best = max(ok, key=lambda t: t["qps"]) if ok else max(tried, key=lambda t: (t["recall"], t["qps"]))
    params = {key: v for key, v in best.items() if key not in ("recall", "low", "qps")}
    I, qps = search_leaving_out(index, queries, k, params, rows, repeat=3)  # a fresh figure for the winner
    apply_search_params(index, params)
    return {**params, "recall": recall_at_k(I, gt, k), "qps": qps}


def _nprobe_floor(index: faiss.Index, queries: np.ndarray, gt: np.ndarray, target_recall: float,
                  values: list[int]) -> int:
    """Position in `values` of the smallest nprobe whose probed lists contain target_recall of the true
    neighbours `gt` (ids are rows): no search with fewer probes can reach the target. 0 where the coarse
    quantizer cannot be asked directly (e.g. behind a PCA transform)."""
    idx = _coarse_ivf(index)
    if idx is None:
        return 0
    list_of = _list_of_ids(idx)
    if (gt < 0).any() or gt.max() >= len(list_of):                   # fewer than k rows, or foreign ids
        return 0
    _, probed = idx.quantizer.search(_f32(queries), idx.nlist)         # every list, nearest first
    rank = np.empty_like(probed)
    np.put_along_axis(rank, probed, np.arange(idx.nlist)[None, :], axis=1)
    needed = np.take_along_axis(rank, list_of[gt], axis=1)             # probes needed per true neighbour
    reach = [np.mean(needed < p) for p in values]
    return next((i for i, r in enumerate(reach) if r >= target_recall), len(values) - 1)


def _list_of_ids(ivf: faiss.IndexIVF) -> np.ndarray:
    """list_of[id]: the inverted list holding id (-1: none)."""
    lists = ivf.invlists
    sizes = [lists.list_size(i) for i in range(ivf.nlist)]
    ids = np.concatenate([faiss.rev_swig_ptr(lists.get_ids(i), s).copy() if s else np.empty(0, np.int64)
                          for i, s in enumerate(sizes)])
    list_of = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
    list_of[ids] = np.repeat(np.arange(ivf.nlist), sizes)
    return list_of


# ----------------------------------------------------------------------------
# incremental updates: ids are row numbers of the embeddings the index was built from


_HASH_MULTIPLIERS = np.random.default_rng(20240608).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def row_hashes(x: np.ndarray, block: int = 8192) -> np.ndarray:
    """A 64-bit hash of each row's float32 bytes: how an update tells changed vectors from unchanged ones.

    A random linear hash mod 2**64 (odd multipliers): two different rows collide with probability ~2**-32,
    and 1M x 384 rows hash in ~1 s of numpy, where a per-row blake2b call takes several."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1] > len(_HASH_MULTIPLIERS):
        raise ValueError(f"row_hashes supports up to {len(_HASH_MULTIPLIERS)} dimensions")
    mult = _HASH_MULTIPLIERS[:x.shape[1]]
    out = np.empty(len(x), dtype=np.uint64)
    for start in range(0, len(x), block):                  # bounded temporaries (8 bytes per value)
        words = x[start:start + block].view(np.uint32).astype(np.uint64)
        out[start:start + block] = (words * mult).sum(axis=1, dtype=np.uint64)   # wraps mod 2**64
    return out.view(np.int64)


def match_rows(old_ids, old_hashes: np.ndarray, new_ids, new_hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair the rows of an updated embeddings dataset with the indexed ones by id and vector hash.

    old_ids / new_ids: Arrow arrays (ints or strings), unique. Returns (relabel, added): relabel[old row] is
    the kept row's new row number, or -1 where it was deleted or changed; added are the new row numbers of
    new or changed rows, ascending."""
    import pyarrow.compute as pc

    old_row = pc.index_in(new_ids, value_set=old_ids).fill_null(-1).to_numpy(zero_copy_only=False)
    old_row = old_row.astype(np.int64)
    kept = old_row >= 0
    kept[kept] = old_hashes[old_row[kept]] == new_hashes[kept]
    relabel = np.full(len(old_hashes), -1, dtype=np.int64)
    relabel[old_row[kept]] = np.flatnonzero(kept)
    return relabel, np.flatnonzero(~kept)


def update_blocker(index: faiss.Index) -> str | None:
    """Why this index cannot have vectors removed and added in place (None: it can)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap2):
        idx = faiss.downcast_index(idx.index)
    if isinstance(idx, faiss.IndexFlat):
        return None
    if isinstance(idx, faiss.IndexIVF) and \
            isinstance(faiss.downcast_InvertedLists(idx.invlists), faiss.ArrayInvertedLists):
        return None
    if isinstance(idx, faiss.IndexHNSW):
        return "an HNSW graph cannot remove vectors"
    if isinstance(idx, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        return "the re-ranking vectors of a Refine index cannot be removed"
    return f"{type(idx).__name__} cannot remove vectors in place"


def update_in_place(index: faiss.Index, relabel: np.ndarray, added: np.ndarray,
                    read_chunk: ReadChunk, chunk_rows: int = CHUNK_ROWS) -> faiss.Index:
    """Bring an index whose ids are old row numbers up to date with new rows (see match_rows):
    drop the ids that map to -1, renumber the kept ones, add the `added` rows under their row numbers.
    Returns the updated index: a plain Flat one comes back wrapped in IndexIDMap2 (Flat keeps positions,
    not ids). The ids stay row numbers of the new data, so readers need no id table."""
    use_all_cores()
    if update_blocker(index):
        raise ValueError(update_blocker(index))
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        index = _flat_with_ids(faiss.downcast_index(index))
    dropped = np.flatnonzero(relabel < 0)
    if len(dropped):
        removed = index.remove_ids(faiss.IDSelectorBatch(dropped.astype(np.int64)))
        if removed != len(dropped):
            raise RuntimeError(f"removed {removed} of {len(dropped)} vectors: the ids are not row numbers")
    kept = np.flatnonzero(relabel >= 0)
    if not np.array_equal(relabel[kept], kept):                 # rows moved: renumber what stays
        _renumber(index, relabel)
    for start, stop in _runs(added, chunk_rows):
        index.add_with_ids(_f32(read_chunk(int(start), int(stop))), np.arange(start, stop, dtype=np.int64))
    return index


def _flat_with_ids(flat: faiss.IndexFlat) -> faiss.IndexIDMap2:
    # faiss wraps only empty indexes, so the vectors are copied over: briefly twice a Flat index's memory,
    # once (the next update finds the wrapper)
    wrapped = faiss.IndexIDMap2(faiss.IndexFlat(flat.d, flat.metric_type))
    vectors = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
    for start in range(0, flat.ntotal, CHUNK_ROWS):
        stop = min(flat.ntotal, start + CHUNK_ROWS)
        wrapped.add_with_ids(vectors[start:stop], np.arange(start, stop, dtype=np.int64))
    return wrapped


def _renumber(index: faiss.Index, relabel: np.ndarray) -> None:
    """Replace every stored id i by relabel[i] (all stored ids are kept ones)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap2):
        faiss.copy_array_to_vector(relabel[faiss.vector_to_array(idx.id_map)], idx.id_map)
        idx.construct_rev_map()
        return
    lists = faiss.downcast_InvertedLists(idx.invlists)
    for list_no in range(lists.nlist):
        size = lists.list_size(list_no)
        if size:
            ids = relabel[faiss.rev_swig_ptr(lists.get_ids(list_no), size)]
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * lists.code_size).copy()
            lists.update_entries(list_no, 0, size, faiss.swig_ptr(ids), faiss.swig_ptr(codes))


def _runs(rows: np.ndarray, max_len: int):
    """(start, stop) of each run of consecutive row numbers, split at max_len: few reads for few calls."""
    if not len(rows):
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        for start in range(int(run[0]), int(run[-1]) + 1, max_len):
            yield start, min(int(run[-1]) + 1, start + max_len)


# ----------------------------------------------------------------------------
# persistence


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write atomically: a reader sees the old file or the complete new one, never half."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"            # same directory, so os.replace is a rename
    try:
        faiss.write_index(unwrap(index), tmp)    # re-ranking from disk: the vectors stay where they are
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)                          # data on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)                             # and the rename itself survives a crash
    finally:
        os.close(dfd)


def load_index(path: str | os.PathLike, mmap: bool = False) -> faiss.Index:
    """Read an index, or with mmap=True map it: pages are then read on demand
    and shared through the page cache (1M-vector ivfpq: 79 MB resident instead
    of 830 MB). Needs IO_FLAG_MMAP_IFC (faiss >= 1.10; the older IO_FLAG_MMAP
    still reads most index types into memory). The mapped index is read-only.
    A file replaced by save_index meanwhile stays valid: the map holds the old one.
    """
    path = os.fspath(path)
    flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) if mmap else 0
    return faiss.read_index(path, flags)


def maps_in_place(factory: str | None) -> bool:
    """Whether memory-mapping an index of this factory string saves memory. faiss copies fast-scan IVF lists
    (`IVF...,PQ..x4fs`) out of the map into its own blocks whatever the flags, so mapping such an index holds
    it twice, once mapped and once copied: at 10M × 384, IVF1024,PQ96x4fs,RDisk was 1,122 MB resident mapped
    against 589 MB read. A refine stage's codes (`Refine(...)`, `RFlat`) and flat or HNSW storage are
    mapped in place (1M, IVF1024,PQ96x4fs,Refine(SQfp16): 161 MB mapped, 841 MB read)."""
    if not factory:
        return True
    parts = factory.replace(" ", "").split(",")
    fast_scan = any(p.startswith("IVF") for p in parts) and any(p.endswith(("fs", "fsr")) for p in parts)
    refined = any(p.startswith(("Refine(", "RFlat")) for p in parts)
    return not fast_scan or refined


# ----------------------------------------------------------------------------
# reading vectors from a datasets/Arrow directory


from hfbatch.dataset import ArrowVectors  # noqa: E402,F401  (its home; imported from here too)

# ----------------------------------------------------------------------------
# the `hfbatch index` job: an embed output, or vectors made elsewhere (hfbatch.vectors), -> an index directory

INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"  # faiss id -> the row's id (and chunk), for search; its vector hash, for --incremental
CHUNK_COLUMNS = ("doc_id", "chunk", "char_start", "char_end")  # embed --chunk-tokens: which window a row is
EMBEDDINGS_KEY = "embeddings_manifest_sha256"  # manifest keys: the versions of the inputs that were indexed
SOURCE_KEY = "source_manifest_sha256"
SIMILARITY_METRICS = tuple(SIMILARITY_METRIC)
FOREIGN_SIMILARITY = {"cosine": "cosine", "dot": "dot", "l2": "euclidean"}  # --metric -> the similarity recorded
TUNING_QUERIES = 1000     # the recall estimate's standard error is then ~0.004 (0.007 with 300)
TUNING_STANDARD_ERRORS = 2  # a setting reaches the target when recall less this many standard errors does
REFINE_STEPS_UP = 2        # tune_search_params: nprobe steps above the first that reaches the target
FLAT_QPS_QUERIES = 100     # a Flat index's recall is 1 by construction; the batch only checks it and times QPS


@dataclass
class IndexInput:
    """What an index is built from: vectors (read_chunk; unit rows for cosine), the rows' ids (and chunk
    columns) for rows.parquet, and what the manifest records about where they came from."""

    path: Path
    reader: ReadChunk
    row_table: object          # pyarrow Table
    similarity: str
    record: dict               # manifest keys: embeddings / vectors, model, source dataset, ...


def make_index(vectors, output, *, kind: str = "auto", factory: str | None = None, memory_budget=None,
               target_recall: float = 0.95, force: bool = False,
               incremental: bool = False, vector_column: str | None = None, id_column: str | None = None,
               ids=None, metric: str | None = None, lexical: bool = True, language: str = "english",
               text_column: str | None = None, shards: int = 1) -> dict:
    """`hfbatch index`: build (or with `incremental`, update) a tuned FAISS index over `vectors` in `output`.

    `vectors` is an `hfbatch embed` output, or vectors made elsewhere (hfbatch.vectors: a Parquet file or
    directory, a save_to_disk dataset, a .npy file with `ids`), whose model is unknown: `metric` (cosine, dot,
    l2; default cosine) says how they compare. `memory_budget` is a size as --memory-budget takes it ("4GB",
    "4GiB", or bytes), recorded as written (default: DEFAULT_MEMORY_BUDGET, the same on every machine).
    `shards` > 1 builds the index as that many shards over row ranges, merged (hfbatch.index_shards). Returns
    the summary dict that --json prints.

    Beside the FAISS index, `lexical` (default) builds a BM25 index over the rows' text (hfbatch.lexical), in
    `language` (stop words, stemming); kind "lexical" builds that alone, over any dataset (no embeddings)."""
    from hfbatch.lexical import analyzer_record, make_lexical_index
    from hfbatch.runner import Job, require_complete
    from hfbatch.sizes import parse_size
    from hfbatch.vectors import is_foreign

    path = Path(vectors)
    budget = memory_budget and parse_size(memory_budget, option="--memory-budget")
    if lexical:
        analyzer_record(language)  # a bad --language is refused first
    if kind == "lexical":
        given = [name for name, value in (("--factory", factory), ("--vector-column", vector_column),
                                          ("--id-column", id_column), ("--ids", ids), ("--metric", metric),
                                          ("--shards", shards if shards > 1 else None))
                 if value is not None] + (["--no-lexical"] if not lexical else [])
        if given:
            raise InputError(f"{given[0]} does not apply to --kind lexical (an index of the rows' text only)")
        return make_lexical_index(path, output, language=language, memory_budget=budget and budget.text,
                                  budget_bytes=budget and int(budget), force=force, incremental=incremental,
                                  text_column=text_column)
    if text_column is not None:
        raise InputError("--text-column applies to --kind lexical; embeddings index the text they were made from")
    config = {"kind": kind, "factory": factory, "memory_budget": budget and budget.text,
              "target_recall": target_recall}
    if not lexical:  # recorded only when not the default, so that older indexes' configs still match
        config["lexical"] = False
    if language != "english":
        config["language"] = language
    if shards > 1:  # only then: configs of one-piece indexes stay as they were
        config["shards"] = shards
    source = None
    if is_foreign(path):
        source, found = open_foreign(path, vector_column, id_column, ids, metric)  # checked before the job
        config["vectors"] = {"format": found.format, "vector_column": vector_column, "id_column": id_column,
                             "metric": metric or "cosine"}
        files, datasets = found.files, []
    else:
        given = [name for name, value in (("--vector-column", vector_column), ("--id-column", id_column),
                                          ("--ids", ids), ("--metric", metric)) if value is not None]
        if given:
            raise InputError(f"{given[0]}: {path} is an hfbatch output, whose vectors, ids and similarity are its "
                             f"own; {given[0]} is for vectors made elsewhere")
        similarity = embeddings_similarity(require_complete(path, "embeddings"), path)  # refused first
        files, datasets = [], [path]
    job = Job("index", output, config=config, files=files, datasets=datasets, force=force, incremental=incremental)
    # the values of vectors made elsewhere are checked (one pass over them) before the job writes anything, unless
    # the output already holds them: a no-op re-run reads none of them
    if source is not None and not job.looks_up_to_date():
        source, found = check_foreign(source, found, vector_column, job.output.parent), None
    with job:
        if job.up_to_date:
            return job.summary()
        if source is None:
            source = open_embeddings(path, similarity, job.inputs[0])
        elif found is not None:  # up to date a moment ago, changed since
            source = check_foreign(source, found, vector_column, job.output.parent)
        given = Budget(int(budget) if budget else DEFAULT_MEMORY_BUDGET,
                       budget.text if budget else DEFAULT_MEMORY_BUDGET_TEXT, given=bool(budget))
        text = {"language": language, "budget_bytes": given.bytes} \
            if lexical and source.record.get("model") else None  # vectors made elsewhere have no text
        return build_and_publish(job, source, kind, factory, given, target_recall, shards, text)


def open_foreign(path: Path, vector_column, id_column, ids, metric):
    """(IndexInput, ForeignVectors) for vectors made elsewhere: opened, nothing written; all checked but the
    values of the vectors (check_foreign)."""
    import pyarrow as pa

    from hfbatch.vectors import open_vectors

    metric = metric or "cosine"
    if metric not in FOREIGN_SIMILARITY:
        raise InputError(f"--metric {metric!r}: expected one of {', '.join(FOREIGN_SIMILARITY)}")
    found = open_vectors(path, vector_column=vector_column or "embedding", id_column=id_column, ids_file=ids,
                         check_values=False)
    similarity = FOREIGN_SIMILARITY[metric]
    record = {"vectors": str(path.resolve()), "vectors_format": found.format, "model": None,
              "embeddings": None, "source_dataset": None, "vector_column": vector_column}
    return IndexInput(path, unit_rows_for(similarity, found.reader), pa.table({"id": found.ids}), similarity,
                      record), found


def check_foreign(source: IndexInput, found, vector_column, copy_dir: Path) -> IndexInput:
    """The source with its vectors' values checked (NaN/inf: one pass); Parquet vectors are decoded once as they
    are checked, into an unnamed file in `copy_dir` (hfbatch.vectors.DecodedVectors), which it then reads."""
    from hfbatch.vectors import check_vector_values

    check_vector_values(found, vector_column or "embedding", copy_dir)
    return dataclasses.replace(source, reader=unit_rows_for(source.similarity, found.reader))


def unit_rows_for(similarity: str, reader):
    # cosine is inner product over unit vectors; a model may not normalise
    return UnitRows(reader) if similarity == "cosine" else reader


def open_embeddings(embeddings: Path, similarity: str, input_record: dict) -> IndexInput:
    """An `hfbatch embed` output: its vectors (read straight from its Arrow files) and ids."""
    from hfbatch.io import open_dataset, require_column

    dataset, emb_manifest = open_dataset(embeddings, "embeddings")
    require_column(dataset, "embedding", embeddings, option="hfbatch embed")
    require_column(dataset, "id", embeddings, option="hfbatch embed")  # search names its hits by id
    row_table = dataset.data.table.select([c for c in ("id", *CHUNK_COLUMNS) if c in dataset.column_names])
    del dataset
    reader = unit_rows_for(similarity, ArrowVectors(embeddings))
    record = {
        "embeddings": str(input_record["path"]), "source_dataset": emb_manifest.get("source_dataset"),
        # which versions were indexed: search trusts their rows only while they are still these
        EMBEDDINGS_KEY: input_record["manifest_sha256"], SOURCE_KEY: source_manifest_hash(emb_manifest),
        "text_column": emb_manifest.get("text_column"), "model": emb_manifest.get("model"),
        "chunking": emb_manifest.get("chunking"),  # set: rows are windows of documents (embed --chunk-tokens)
        "embedding_settings": {k: emb_manifest.get(k)
                               for k in ("precision", "backend", "device", "pooling", "max_length")}}
    return IndexInput(embeddings, reader, row_table, similarity, record)


@dataclass
class Budget:
    """--memory-budget: its value, its text as given (or the default's), and whether it was given."""

    bytes: int
    text: str
    given: bool = True


def build_and_publish(job, source: IndexInput, kind, factory, budget: Budget, target_recall, shards=1,
                      lexical=None) -> dict:
    """Plan, build (or update in place), tune and publish the index; the job's summary dict. `lexical`
    ({language, budget_bytes}): also the lexical part (hfbatch.lexical), always built anew from the text."""
    from hfbatch.index_rerank import source_record, supports_row_reads

    vectors, similarity = source.reader, source.similarity
    ids = source.row_table.column("id").combine_chunks()
    n, dim = vectors.n, vectors.dim
    if n == 0:
        raise InputError(f"{source.path}: no vectors to index")
    metric = SIMILARITY_METRIC[similarity]
    plan, est = make_plan(n, dim, kind, factory, budget, target_recall, metric, row_access=supports_row_reads(vectors))
    overhead = build_overhead(plan.train_size, dim, CHUNK_ROWS, n)
    log.event("index", "plan", kind=plan.kind, factory=plan.factory, vectors=n, dim=dim, why=plan.reasons,
              similarity=similarity, estimated_index_mb=f"{est / 2**20:.0f}",
              estimated_build_mb=f"{(est + overhead) / 2**20:.0f}", budget=budget.text)
    budget_record = {"memory_budget": budget.text, "memory_budget_bytes": budget.bytes,
                     "estimated_index_bytes": est, "estimated_build_bytes": est + overhead, "shards": shards}
    if reranks_from_disk(plan.factory):
        budget_record["rerank_source"] = source_record(source.path, source.record.get("vectors_format"),
                                                       source.record.get("vector_column"),
                                                       unit=similarity == "cosine")

    phases, update = {}, None
    if job.previous is not None:
        update = update_previous(job, plan, similarity, vectors, ids, phases)
    if update is None:
        built, hashes = build_new(plan, vectors, phases, shards, job.output)
        lineage = {"trained_on": n if plan.train_size else None, "added_since_training": 0}
        keep, counts = None, None
    else:
        built, hashes, lineage, counts = update
        keep = job.previous.get("params")
        # the index keeps its structure (e.g. its number of IVF lists) until it is rebuilt
        plan = dataclasses.replace(plan, factory=job.previous["factory"], reasons=job.previous["reasons"],
                                   train_size=job.previous.get("train_size", plan.train_size))
    search = measure_quality(built, vectors, plan, target_recall, phases, keep=keep)

    params = {k: v for k, v in search.items() if k not in ("recall", "qps")}
    extra = {"kind": plan.kind, "factory": plan.factory, "metric": plan.metric, "similarity": similarity,
             "reasons": plan.reasons, "params": params, "recall_at_10": round(search["recall"], 4),
             "qps": round(search["qps"], 1), "train_size": plan.train_size, "dim": dim, "count": n, **lineage,
             "update": counts, **source.record, **budget_record}

    assembly = job.publisher.assemble_files(rows=n, counts=counts)
    started = time.monotonic()
    save_index(built, assembly.dir / INDEX_FILE)
    write_rows_file(assembly.dir / ROWS_FILE, source.row_table, hashes)
    phases["save_s"] = time.monotonic() - started
    if lexical:
        extra["lexical"] = lexical_part(assembly.dir, source, lexical)
    job.publish(assembly, extra={**extra, **{k: round(v, 3) for k, v in phases.items()}})
    log.event("index", "quality", recall_at_10=f"{search['recall']:.4f}", qps=f"{search['qps']:.0f}",
              params=params, **{k: f"{v:.1f}" for k, v in phases.items()})
    return {**job.summary(), "recall_at_10": round(search["recall"], 4), "factory": plan.factory,
            "updated_in_place": update is not None, "lexical": bool(extra.get("lexical"))}


def lexical_part(tmp, source: IndexInput, settings: dict) -> dict | None:
    """The lexical part beside the FAISS index, or None (with a warning) where the rows' text is not at hand.
    Always a full build: BM25's statistics (document frequencies, mean length) depend on every row, so an
    updated part would differ from a new one; building it costs a fraction of embedding the same text."""
    from hfbatch.lexical import add_lexical_part, indexed_source

    source_path, why = indexed_source(source.record)
    if source_path is None:
        log.warn("index", "no_lexical_part", reason=why, hint="search will be dense only")
        return None
    return add_lexical_part(tmp, source_path, source.record.get("text_column") or "text", source.row_table,
                            bool(source.record.get("chunking")), language=settings["language"],
                            budget_bytes=settings["budget_bytes"])


def make_plan(n, dim, kind, factory, budget: Budget, target_recall, metric="ip",
              row_access=False) -> tuple[IndexPlan, int]:
    """(The plan, its estimated index bytes): the factory string or kind asked for, or the auto choice, that
    fits the budget; an InputError that names the budget needed where none fits."""
    if factory:
        plan = plan_for_factory(factory, n, dim, metric)
        if reranks_from_disk(factory) and not row_access:
            raise InputError(f"--factory {factory}: re-ranking from disk ({RDISK[1:]}) needs vectors that can be "
                             f"read row by row: an embed output, a saved dataset or a .npy file")
        plans = [plan]
    elif kind == "auto":
        plan = choose_index(n, dim, budget.bytes, target_recall, metric, row_access, budget.text)
        plans = [plan]
    else:
        plans = kind_plans(kind, n, dim, metric, row_access)
    try:
        return fit_budget(plans, n, dim, budget.bytes, metric, budget.text)
    except RuntimeError as exc:  # faiss rejects the factory string
        raise InputError(f"--factory {factory!r}: faiss cannot make it ({one_line(exc)})")


def embeddings_similarity(emb_manifest, embeddings):
    """How the model compares its vectors: as `hfbatch embed` recorded it, else as the model directory's
    sentence-transformers config says (outputs of an older embed, or merged ones), else cosine."""
    from hfbatch.embedding import read_similarity

    similarity = emb_manifest.get("similarity")
    model = emb_manifest.get("model")
    if similarity is None and model and Path(model).is_dir():
        similarity = read_similarity(model)
    similarity = similarity or "cosine"
    if similarity not in SIMILARITY_METRICS:
        raise InputError(f"{embeddings}: the model compares vectors by {similarity!r} similarity; hfbatch index "
                         f"supports {', '.join(SIMILARITY_METRICS)}")
    return similarity


def source_manifest_hash(emb_manifest, depth=2):
    """The manifest hash of the dataset the embeddings were made from, as their job recorded it when it read
    that dataset (merged embeddings: as their parts recorded it); None where it cannot be told."""
    from hfbatch.runner import read_manifest

    source = emb_manifest.get("source_dataset")
    inputs = [i for i in emb_manifest.get("inputs", []) if isinstance(i, dict)]
    for record in inputs:
        if source and record.get("path") == source and record.get("manifest_sha256"):
            return record["manifest_sha256"]
    if depth and emb_manifest.get("merged_from") and source:
        found = {source_manifest_hash(read_manifest(Path(i["path"])) or {}, depth - 1) for i in inputs}
        if len(found) == 1:
            return found.pop()
    return None


def build_new(plan, vectors, phases, shards=1, output=None):
    """A new index over all rows (with shards > 1: built as shards beside `output`, merged), and the rows'
    vector hashes (taken as the build reads them)."""
    import tempfile

    from hfbatch.index_shards import build_sharded

    n, dim = vectors.n, vectors.dim
    hashes = np.empty(n, dtype=np.int64)

    def hash_chunk(start, chunk):
        hashes[start:start + len(chunk)] = row_hashes(chunk)

    started = time.monotonic()
    try:
        with log.Progress("index", n, unit="vectors") as progress:
            advance = lambda done: progress.update(done - progress.done)  # noqa: E731
            if shards > 1:
                parent = Path(output).resolve().parent
                with tempfile.TemporaryDirectory(prefix=f".{Path(output).name}.shards-", dir=parent) as work:
                    built = build_sharded(plan, n, dim, vectors, shards, Path(work), hash_chunk, advance)
            else:
                built = build_index(plan, n, dim, vectors, on_chunk=hash_chunk, progress=advance)
    except RuntimeError as exc:  # faiss rejects a factory string or its training
        raise InputError(f"faiss could not build {plan.factory!r}: {one_line(exc)}")
    phases["build_s"] = time.monotonic() - started
    return built, hashes


def measure_quality(built, vectors, plan, target_recall, phases, keep=None):
    """recall@10 against exact search on held-out-like queries, and QPS; approximate indexes are tuned.

    The queries are TUNING_QUERIES database rows, each left out of its own results (rows_stand_for_queries;
    moved rows on HNSW, tuning_queries); their exact neighbours take one BLAS pass over the vectors. `keep`
    (an updated index's previous parameters) is tried first and kept if it still reaches the target."""
    started = time.monotonic()
    n = vectors.n
    k = min(10, n)
    exact = plan.kind == "flat"
    # faiss searches a Flat index query by query (BLAS only from 128k queries in this build): a batch scan
    # of the vectors (exact_neighbors) finds the probes' neighbours faster there, and one small batch
    # times it
    if rows_stand_for_queries(None if exact else built, n, k):
        rows = tuning_rows(n, FLAT_QPS_QUERIES if exact else TUNING_QUERIES)
        queries = read_rows(vectors, rows)
        _, truth = exact_neighbors(vectors, n, queries, k + 1, metric=plan.metric)
        truth = without_rows(truth, rows, k)
    else:
        rows, queries = None, tuning_queries(vectors, n, num=min(TUNING_QUERIES, n), index=None if exact else built,
                                             metric=plan.metric)
        _, truth = exact_neighbors(vectors, n, queries, k, metric=plan.metric)
    phases["gt_s"] = time.monotonic() - started
    started = time.monotonic()
    try:
        if keep is not None or exact:
            batch = FLAT_QPS_QUERIES if exact else len(queries)
            found, qps = search_leaving_out(built, queries[:batch], k, keep or {},
                                            None if rows is None else rows[:batch], repeat=1 if exact else 3)
            apply_search_params(built, keep or {})
            recall, low = recall_lower_bound(found, truth[:batch], k)
            result = {**(keep or {}), "recall": recall, "qps": qps}
            if exact or low >= target_recall:
                return result
            log.event("index", "retuning", reason=f"recall@10 {recall:.4f} (less two standard errors "
                                                  f"{low:.4f}) with the previous parameters is below "
                                                  f"{target_recall}")
        return tune_search_params(built, queries, truth, target_recall, k, rows=rows)
    finally:
        phases["tune_s"] = time.monotonic() - started


# ---- --incremental ------------------------------------------------------------------------------------

def update_previous(job, plan, similarity, vectors, ids, phases):
    """Update the index in OUTPUT to the new vectors in place: (index, hashes, lineage, counts), or None,
    with a log line saying why, where it must be rebuilt instead."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    previous, n = job.previous, vectors.n

    def rebuild(reason):  # says why, and returns None: the caller builds a new index
        log.event("index", "rebuilding", reason=reason)

    if previous.get("kind") != plan.kind:
        return rebuild(f"{n:,} rows call for a {plan.kind} index, the existing one is {previous.get('kind')}")
    if previous.get("dim") != vectors.dim:
        return rebuild(f"the vectors have {vectors.dim} dimensions, the index {previous.get('dim')}")
    if (previous.get("similarity") or "cosine", previous.get("metric")) != (similarity, plan.metric):
        return rebuild(f"the vectors are compared by {similarity} similarity, the index by "
                       f"{previous.get('similarity') or 'cosine'}")
    if pc.count_distinct(ids).as_py() != len(ids):
        return rebuild("the embeddings' ids are not unique, so rows cannot be matched")
    rows_file = job.output / ROWS_FILE
    if not rows_file.exists():
        return rebuild(f"{rows_file} is missing (made by an older hfbatch)")
    started = time.monotonic()
    try:
        old = load_index(job.output / INDEX_FILE)
        old_rows = pq.read_table(rows_file)
    except (RuntimeError, OSError, pa.ArrowException) as exc:  # damaged: nothing there can be reused
        return rebuild(f"the existing index cannot be read ({one_line(exc)})")
    if "id" not in old_rows.column_names or "vector_hash" not in old_rows.column_names \
            or old_rows.num_rows != old.ntotal:
        return rebuild(f"{rows_file} does not describe the index's rows")
    blocker = update_blocker(old)
    if blocker:
        return rebuild(f"{blocker} ({plan.kind})")
    hashes = np.empty(n, dtype=np.int64)
    for start in range(0, n, CHUNK_ROWS):
        stop = min(n, start + CHUNK_ROWS)
        hashes[start:stop] = row_hashes(vectors(start, stop))
    relabel, added = match_rows(old_rows.column("id").combine_chunks(),
                                old_rows.column("vector_hash").to_numpy(), ids, hashes)
    lineage = {"trained_on": previous.get("trained_on"),
               "added_since_training": (previous.get("added_since_training") or 0) + len(added)}
    if lineage["trained_on"] and lineage["added_since_training"] > lineage["trained_on"]:
        return rebuild(f"{lineage['added_since_training']:,} rows were added since the IVF lists were trained "
                       f"on {lineage['trained_on']:,}: they need training on the current rows")
    counts = {"kept": int((relabel >= 0).sum()), "removed": int((relabel < 0).sum()), "added": len(added)}
    updated = update_in_place(old, relabel, added, vectors)
    if updated.ntotal != n:  # a bug, not an input problem
        raise RuntimeError(f"updated index holds {updated.ntotal} vectors, expected {n}")
    phases["build_s"] = time.monotonic() - started
    log.event("index", "updated_in_place", **counts, seconds=f"{phases['build_s']:.2f}")
    return updated, hashes, lineage, counts


def write_rows_file(path, row_table, hashes):
    """Row r of the index (faiss id r) is row r of the vectors it was built from: its `id` (and over
    chunks `doc_id`, `chunk`, `char_start`, `char_end`), which search names hits by, and its vector hash, for
    the next --incremental run to match rows against. The index carries them itself (Parquet), because the
    embeddings may be replaced while the index stays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(row_table.append_column("vector_hash", pa.array(hashes, pa.int64())), path)


def one_line(exc):
    """An exception's message in one line: faiss's last `Error: ...` part, without its C++ location."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    return text.rpartition("Error: ")[2] or text
