"""FAISS indexes for hfbatch: choose, build, tune, save and load.

Pure library (numpy + faiss, pyarrow only for ArrowVectors). The vectors are
float32 and L2-normalised, so the metric is inner product (== cosine). They
never have to fit in memory: everything reads through
`read_chunk(start, stop) -> float32 [stop - start, dim]`.

Kinds, from exact to most compressed:
  flat   exact brute force ("Flat")                      small n
  ivf    inverted lists of raw vectors ("IVF{nlist},Flat")
  hnsw   graph ("HNSW32"), fast queries but slow to build
  ivfpq  inverted lists of 4-bit fast-scan PQ codes, re-ranked with a compact
         copy of the vectors ("IVF{nlist},PQ{m}x4fs,Refine(SQfp16)")   large n
"""
from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

# faiss ships its own OpenMP runtime, which by default spins at every barrier.
# On a shared 2-core machine a descheduled thread makes the others spin for its
# whole time slice: a 0.4 s build took 13-17 s. Passive waiting costs ~nothing
# on big batches. The setting is read once, when faiss loads its runtime, so it
# only takes effect if faiss is first imported here (an explicit
# OMP_WAIT_POLICY wins); it is restored afterwards so that it reaches no
# other library.
if "faiss" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import faiss
    del os.environ["OMP_WAIT_POLICY"]
else:
    import faiss

ReadChunk = Callable[[int, int], np.ndarray]

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
CHUNK_ROWS = 65_536        # rows per add() call: ~100 MB of float32 at dim 384
FLAT_MAX_N = 100_000       # below this, exact search is fast enough and needs no training
TRAIN_PER_LIST = 40        # k-means wants >= 39 points per centroid (faiss warns below)
TRAIN_BLOCKS = 256         # the training sample is read as this many evenly spaced blocks
ID_BYTES = 8               # inverted lists store an int64 id per vector


@dataclass
class IndexPlan:
    kind: str              # flat | ivf | hnsw | ivfpq | custom
    factory: str           # faiss.index_factory string
    metric: str = "ip"
    train_size: int = 0    # rows sampled for training (0: the index needs none)
    est_bytes: int = 0     # rough size of the finished index
    reasons: str = ""


# ----------------------------------------------------------------------------
# choosing


def _nlist(n: int) -> int:
    # ~sqrt(n) lists as a power of two (1M -> 1024, 200k -> 512), fewer than
    # autofaiss's 4-16*sqrt(n): assigning every vector to a list is the build's
    # main cost, while fast-scan makes scanning longer lists cheap. Measured at
    # 1M x 384 (recall@10 0.95): 1024, 1536 and 2048 lists give the same QPS,
    # built in 14, 17 and 25 s.
    return int(min(65_536, max(16, 2 ** round(math.log2(math.sqrt(n))))))


def _pq_m(dim: int, max_bytes: float) -> int:
    """Sub-quantizers for 4-bit codes (m/2 bytes): the largest even divisor of
    dim that fits max_bytes, 0 if none does. Fast-scan packs codes in pairs."""
    fits = [m for m in range(2, dim + 1, 2) if dim % m == 0 and m / 2 <= max_bytes]
    return max(fits, default=0)


def _train_size(n: int, nlist: int) -> int:
    # k-means wants >= 39 points per centroid (faiss warns below); more only
    # slows training. PQ codebooks (16 centroids each) need far fewer.
    return min(n, max(nlist * TRAIN_PER_LIST, 32_768))


def _est_bytes(kind: str, n: int, dim: int, m: int = 0, refine: str = "") -> int:
    if kind == "flat":
        return n * dim * 4
    if kind == "ivf":
        return n * (dim * 4 + ID_BYTES)
    if kind == "hnsw":
        return n * (dim * 4 + 32 * 2 * 4)           # vectors + ~2M int32 links
    refine_bytes = {"": 0, "SQ8": dim, "SQfp16": dim * 2, "Flat": dim * 4}[refine]
    return n * (m // 2 + ID_BYTES + refine_bytes)


def plan_for_kind(kind: str, n: int, dim: int, memory_budget_bytes: int | None = None) -> IndexPlan:
    """The plan for an explicitly requested kind, sized for n vectors of dim."""
    if kind == "flat":
        return IndexPlan("flat", "Flat", est_bytes=_est_bytes("flat", n, dim),
                         reasons="exact search requested")
    if kind == "hnsw":
        return IndexPlan("hnsw", "HNSW32", est_bytes=_est_bytes("hnsw", n, dim),
                         reasons="graph index requested (no training; slow to build for large n)")
    nlist = min(_nlist(n), max(1, n // TRAIN_PER_LIST))   # never more lists than we can train
    train = _train_size(n, nlist)
    if kind == "ivf":
        return IndexPlan("ivf", f"IVF{nlist},Flat", train_size=train,
                         est_bytes=_est_bytes("ivf", n, dim), reasons=f"IVF requested; {nlist} lists")
    if kind == "ivfpq":
        # dim/4 sub-quantizers (4 dims per 4-bit code, 48 bytes at dim 384):
        # on embeddings (a few hundred dims, lower intrinsic dimension) as
        # accurate after re-ranking as dim/2, at half the bytes to scan. Small
        # dims keep dim/2: 4 dims per code loses too much there, and the codes
        # are tiny anyway.
        # Re-ranking with fp16 vectors is as accurate as with float32 (its error
        # is far below the gap between neighbours) at half the memory; SQ8
        # (slightly worse) and then no re-ranking are the fallbacks for tight
        # budgets, with codes as large as the budget allows in the last case.
        if dim % 2:
            raise ValueError("4-bit fast-scan PQ needs an even dimension")
        m = _pq_m(dim, dim / 8 if dim >= 256 else dim / 4) or _pq_m(dim, dim)
        budget = memory_budget_bytes or float("inf")
        for refine in ("SQfp16", "SQ8", ""):
            if _est_bytes("ivfpq", n, dim, m, refine) <= budget:
                break
        else:
            m = _pq_m(dim, budget / max(n, 1) - ID_BYTES) or 2     # smallest codes if nothing fits
        factory = f"IVF{nlist},PQ{m}x4fs" + (f",Refine({refine})" if refine else "")
        why = f"{nlist} lists, {m}x4-bit fast-scan codes" + (
            f", shortlist re-ranked with {refine} vectors" if refine
            else ", no re-ranking (budget too small; recall will be lower)")
        return IndexPlan("ivfpq", factory, train_size=train,
                         est_bytes=_est_bytes("ivfpq", n, dim, m, refine), reasons=why)
    raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")


def plan_for_factory(factory: str, n: int, dim: int) -> IndexPlan:
    """An expert's faiss.index_factory string, passed through as is."""
    needs_training = bool(re.search(r"IVF|IMI|PQ|SQ[48]|LSH|RQ|LSQ|PCA|OPQ|ITQ", factory))
    nlist = re.search(r"IVF(\d+)", factory)
    train = (_train_size(n, int(nlist.group(1)) if nlist else 0)) if needs_training else 0
    return IndexPlan("custom", factory, train_size=train, reasons="factory string given")


def choose_index(n: int, dim: int, memory_budget_bytes: int | None = None,
                 target_recall: float = 0.95) -> IndexPlan:
    """Pick an index for n vectors of dim, like autofaiss but measured on this workload.

    - small n, or target_recall 1.0: exact Flat (nothing to train, recall 1.0);
    - otherwise IVF + 4-bit fast-scan PQ + fp16 re-ranking. Measured on 2 cores
      at recall@10 0.95 (bench/index_scale.py): at 200k x 384 it answers as
      fast as HNSW32 (~20x exact search) but builds in 3.5 s instead of 23 s
      and needs half the memory; IVF-Flat manages only ~1x there. At 1M it
      builds in ~15 s where HNSW needs ~100 s;
    - when the budget is smaller than even that, re-ranking gets coarser and
      then goes (see plan_for_kind).
    Otherwise target_recall does not change the structure: the search
    parameters are tuned for it afterwards (tune_search_params).
    """
    flat_bytes = _est_bytes("flat", n, dim)
    fits = memory_budget_bytes is None or flat_bytes <= memory_budget_bytes
    if fits and (n < FLAT_MAX_N or target_recall >= 1.0):
        plan = plan_for_kind("flat", n, dim)
        plan.reasons = (f"n={n:,} < {FLAT_MAX_N:,}: exact search is fast enough" if n < FLAT_MAX_N
                        else "recall 1.0 asked for: exact search")
        return plan
    plan = plan_for_kind("ivfpq", n, dim, memory_budget_bytes)
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
                chunk_rows: int = CHUNK_ROWS) -> faiss.Index:
    """Train on a sample, then add all n rows chunk by chunk.

    Peak memory is the index itself plus one chunk plus the training sample:
    the vectors are never all in memory at once (except in a Flat index, which
    is the vectors).
    """
    use_all_cores()
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = read_sample(read_chunk, n, plan.train_size or min(n, 65_536))
        index.train(sample)
        del sample
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        index.add(_f32(read_chunk(start, stop)))
        if progress:
            progress(stop)
    return index


# ----------------------------------------------------------------------------
# ground truth and recall


def exact_neighbors(read_chunk: ReadChunk, n: int, queries: np.ndarray, k: int,
                    chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product over all n rows, one chunk in memory at a time."""
    use_all_cores()
    queries = _f32(queries)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)   # keep_max: larger IP is closer
    # faiss.knn switches to BLAS only above a query count that this build sets
    # high (128000 in the 1.15 wheel): 200 queries ran at 1/10 of BLAS speed
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    try:
        for start in range(0, n, chunk_rows):
            chunk = _f32(read_chunk(start, min(n, start + chunk_rows)))
            D, I = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(D, np.where(I >= 0, I + start, -1))
    finally:
        faiss.cvar.distance_compute_blas_threshold = old
    heap.finalize()
    return heap.D, heap.I


def tuning_queries(read_chunk: ReadChunk, n: int, num: int = 1000, seed: int = 0) -> np.ndarray:
    """Queries for tune_search_params that behave like unseen ones, made from database rows.

    A row used as is sits in the index: an HNSW search lands on its node, whose
    edges are its neighbours, so recall comes out optimistic (0.98 against 0.96
    on held-out queries). Each row is therefore moved away from itself, in a
    random direction, as far as a typical row is from its nearest neighbour.
    On IVF this errs slightly the safe way (0.954 against 0.961 held-out).
    """
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n, size=min(num, n), replace=False))
    x = np.concatenate([read_chunk(int(i), int(i) + 1) for i in ids]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    D, _ = exact_neighbors(read_chunk, n, x[:200], 2)          # [:, 0] is the row itself
    cos = float(np.clip(np.median(D[:, 1]), 0.3, 0.95))        # duplicates would make it 1
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    noise -= (noise * x).sum(1, keepdims=True) * x             # orthogonal, so cos(q, x) = cos
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return x * cos + noise * math.sqrt(1 - cos * cos)


def recall_at_k(found: np.ndarray, ground_truth_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the true top k that the index also returned in its top k."""
    hits = sum(len(np.intersect1d(f[:k], g[:k])) for f, g in zip(found, ground_truth_ids))
    return hits / (len(found) * k)


def measure_recall(index: faiss.Index, queries: np.ndarray, ground_truth_ids: np.ndarray, k: int = 10) -> float:
    return recall_at_k(index.search(_f32(queries), k)[1], ground_truth_ids, k)


# ----------------------------------------------------------------------------
# search-time parameters


def search_param_grid(index: faiss.Index) -> dict[str, list[int]]:
    """The knobs this index has, each with its values from fast to accurate."""
    grid = {}
    idx = faiss.downcast_index(index)
    if isinstance(idx, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        grid["k_factor_rf"] = [1, 2, 4, 8, 16, 32]
        idx = faiss.downcast_index(idx.base_index)
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        grid["nprobe"] = [p for p in (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 256,
                                      320, 384, 512, 768, 1024, 1536, 2048, 4096, 8192, 16384, 32768, 65536)
                          if p <= ivf.nlist]
    elif isinstance(idx, faiss.IndexHNSW):
        grid["efSearch"] = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048]
    return grid


def apply_search_params(index: faiss.Index, params: dict) -> None:
    """Set search-time parameters (nprobe, efSearch, k_factor_rf) on an index.

    Other keys (measured recall, qps) are ignored, so the dict that
    tune_search_params returns can be stored and applied as is after loading.
    """
    space = faiss.ParameterSpace()   # knows how to reach through Refine/PreTransform wrappers
    for name in ("nprobe", "efSearch", "k_factor_rf"):
        if name in params:
            space.set_index_parameter(index, name, params[name])


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, repeat: int = 1) -> tuple[np.ndarray, float]:
    """(ids, queries per second) for one batched search, best of `repeat` runs."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        _, I = index.search(_f32(queries), k)
        best = min(best, time.perf_counter() - t)
    return I, len(queries) / best


def tune_search_params(index: faiss.Index, queries: np.ndarray, gt: np.ndarray,
                       target_recall: float = 0.95, k: int = 10,
                       log: Callable[[str], None] | None = None) -> dict:
    """Fastest parameters that reach target_recall@k on these queries.

    For each re-ranking factor (if the index has one), raise nprobe / efSearch
    until the target is reached; of the settings that reach it, keep the one
    with the highest QPS. If none does, return the most accurate one seen.
    Returns the parameters plus "recall" and "qps" measured with them.
    """
    use_all_cores()
    grid = search_param_grid(index)
    outer = grid.get("k_factor_rf", [None])
    name = "nprobe" if "nprobe" in grid else "efSearch" if "efSearch" in grid else None
    tried, limit = [], None
    for kf in outer:
        values = grid[name] if name else [None]
        if limit is not None:
            values = [v for v in values if v < limit]    # equal or larger: slower than what we have
        prev, reached = None, False
        for value in values:
            params = {key: v for key, v in (("k_factor_rf", kf), (name, value)) if v is not None}
            apply_search_params(index, params)
            I, qps = timed_search(index, queries, k)
            recall = recall_at_k(I, gt, k)
            tried.append({**params, "recall": recall, "qps": qps})
            if log:
                log(f"  {params} recall@{k}={recall:.4f} qps={qps:,.0f}")
            if recall >= target_recall:
                reached, limit = True, value
                break
            if prev is not None and recall - prev < 0.001:
                break          # plateau: the shortlist (k_factor), not nprobe, limits recall
            prev = recall
        if limit is not None and not reached:
            break              # a larger k_factor will not be faster either
    ok = [t for t in tried if t["recall"] >= target_recall]
    best = max(ok, key=lambda t: t["qps"]) if ok else max(tried, key=lambda t: (t["recall"], t["qps"]))
    apply_search_params(index, best)
    return dict(best)


# ----------------------------------------------------------------------------
# persistence


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write atomically: a reader sees the old file or the complete new one, never half."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"            # same directory, so os.replace is a rename
    try:
        faiss.write_index(index, tmp)
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


# ----------------------------------------------------------------------------
# reading vectors from a datasets/Arrow directory


class ArrowVectors:
    """Zero-copy reader of the embedding column of a dataset saved with
    `datasets.Dataset.save_to_disk` (Arrow IPC stream files), usable as read_chunk.

    The column may be a fixed-size list (`Sequence(Value("float32"), length=d)`)
    or a plain list whose rows all have d values. The files are memory-mapped;
    each call copies just its rows out of the flat values buffer, then drops
    the mapped pages it touched from this process (madvise DONTNEED: they stay
    in the OS page cache), so reading a 1.5 GB column does not add 1.5 GB to
    the process's resident memory.
    """

    def __init__(self, path: str | os.PathLike, column: str = "embedding"):
        import glob
        import json
        import mmap
        import pyarrow as pa
        import pyarrow.compute as pc

        path = os.fspath(path)
        state = os.path.join(path, "state.json")
        if os.path.exists(state):
            with open(state) as f:
                files = [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]
        else:
            files = sorted(glob.glob(os.path.join(path, "*.arrow")))
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
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            chunk, m = self._chunks[i]
            lo, hi = pos - self._starts[i], min(stop, self._starts[i + 1]) - self._starts[i]
            values = chunk.slice(lo, hi - lo).flatten()           # respects the slice offset; no copy
            src = values.to_numpy(zero_copy_only=True).reshape(-1, self.dim)
            out[pos - start: pos - start + len(src)] = src        # the one copy (and cast, if not float32)
            self._release(m, src)
            pos += len(src)
            i += 1
        return out

    def _release(self, m: int, src: np.ndarray) -> None:
        if self._dontneed is None or not src.size:
            return
        mm, base = self._maps[m]
        lo = src.ctypes.data - base
        hi = lo + src.nbytes
        lo -= lo % self._page                                     # madvise wants page alignment
        mm.madvise(self._dontneed, lo, min(len(mm), hi) - lo)
