"""The out-of-core build (vectors read chunk by chunk from a memory map, pages given back) and re-ranking
from disk (`,RDisk`: the shortlist re-scored exactly from the indexed vectors, their hashes checked)."""
import json
import os

import numpy as np
import pytest
from conftest import clustered_unit_vectors, hits_of, invoke

N, DIM, K = 4000, 32, 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    x = clustered_unit_vectors(N + 50, DIM, clusters=80, spread=0.7)
    root = tmp_path_factory.mktemp("ooc")
    np.save(root / "v.npy", x[:N])
    np.save(root / "q.npy", x[N:])
    return root, x[:N], x[N:]


def mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_reading_an_npy_file_chunk_by_chunk_does_not_keep_it_resident(tmp_path):
    from hfbatch.vectors import NpyVectors

    x = np.random.default_rng(0).standard_normal((200_000, 32)).astype(np.float32)    # 25 MB
    np.save(tmp_path / "big.npy", x)
    reader = NpyVectors(tmp_path / "big.npy")
    total = 0.0
    for start in range(0, len(x), 16_384):
        total += float(reader(start, min(len(x), start + 16_384)).sum(dtype=np.float64))
    assert total == pytest.approx(float(x.sum(dtype=np.float64)), rel=1e-6)
    assert mapped_rss_kb(tmp_path / "big.npy") < 2_000                 # not the 25,000 kB read


def test_scattered_rows_of_an_npy_file_are_not_kept_resident(tmp_path):
    """Tuning reads 1,000 rows spread over the file: each fault maps a whole cached folio (up to 2 MiB), which
    held 1.8 GB of a 15 GB file in the 10M build while take() indexed the map (it now reads by pread)."""
    from hfbatch.vectors import NpyVectors

    x = np.random.default_rng(0).standard_normal((200_000, 32)).astype(np.float32)    # 25 MB
    np.save(tmp_path / "big.npy", x)
    reader = NpyVectors(tmp_path / "big.npy")
    rows = np.random.default_rng(1).choice(len(x), 3_000, replace=False)
    assert np.array_equal(reader.take(rows), x[rows])
    assert mapped_rss_kb(tmp_path / "big.npy") < 2_000                 # 3,000 rows touch >= 12,000 kB of pages


def test_the_out_of_core_build_equals_one_built_in_memory(data):
    from hfbatch import indexing as hx
    from hfbatch.vectors import NpyVectors

    root, x, queries = data
    reader = NpyVectors(root / "v.npy")
    for kind in ("ivf", "ivfpq"):
        plan = hx.plan_for_kind(kind, N, DIM)
        chunked = hx.build_index(plan, N, DIM, reader, chunk_rows=333)     # many chunks from the memory map
        in_memory = hx.train_index(plan, N, DIM, lambda a, b: x[a:b])      # the same sample, all rows at once
        in_memory.add(x)
        for index in (chunked, in_memory):
            hx.apply_search_params(index, {"nprobe": 8, **({"k_factor_rf": 4} if kind == "ivfpq" else {})})
        D1, I1 = chunked.search(queries, K)
        D2, I2 = in_memory.search(queries, K)
        assert np.array_equal(I1, I2) and np.array_equal(D1, D2), kind


def test_reranking_from_disk_scores_exactly(data, tmp_path, runner):
    root, x, queries = data
    invoke(runner, ["index", root / "v.npy", "-o", tmp_path / "idx", "--factory", "IVF32,PQ8x4fs,RDisk",
                    "--target-recall", "0.95"])
    recorded = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert recorded["factory"] == "IVF32,PQ8x4fs,RDisk" and recorded["recall_at_10"] >= 0.95
    assert recorded["rerank_source"] == {"path": str((root / "v.npy").resolve()), "format": "npy",
                                         "vector_column": None, "unit": True}
    assert os.path.getsize(tmp_path / "idx" / "index.faiss") < x.nbytes / 3      # no copy of the vectors
    hits = hits_of(invoke(runner, ["search", tmp_path / "idx", "--query-vectors", root / "q.npy", "-k", K]))
    truth = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :K]
    found = {}
    for hit in hits:
        found.setdefault(hit["query"], []).append(hit)
        # the score is the exact inner product with the row, not its 4-bit PQ approximation
        assert hit["score"] == pytest.approx(float(queries[hit["query"]] @ x[hit["id"]]), abs=1e-5)
    recall = np.mean([len(set(h["id"] for h in found[q]) & set(truth[q])) / K for q in range(len(queries))])
    assert recall >= 0.9


def test_a_fast_scan_index_is_read_and_refine_codes_are_mapped(data, tmp_path):
    from hfbatch import indexing as hx
    from hfbatch.retrieval import Searcher

    root, x, queries = data
    hx.make_index(root / "v.npy", tmp_path / "idx", factory="IVF32,PQ8x4fs,RDisk", target_recall=0.9)
    searcher = Searcher(tmp_path / "idx")
    scores, rows = searcher.search_embedded(queries, K)
    maps = open("/proc/self/maps").read()
    # fast-scan lists are copied out of a map whatever the flags: the file is read, not held twice
    assert str(tmp_path / "idx" / "index.faiss") not in maps
    assert np.allclose(scores, np.take_along_axis(queries @ x.T, rows, axis=1), atol=1e-5)
    hx.make_index(root / "v.npy", tmp_path / "refined", factory="IVF32,PQ8x4fs,Refine(SQfp16)", target_recall=0.9)
    refined = Searcher(tmp_path / "refined")
    refined.search_embedded(queries, K)
    assert str(tmp_path / "refined" / "index.faiss") in open("/proc/self/maps").read()  # IO_FLAG_MMAP_IFC


def test_a_changed_source_is_refused_for_reranking(data, tmp_path, runner):
    root, x, queries = data
    source = tmp_path / "v.npy"
    np.save(source, x)
    invoke(runner, ["index", source, "-o", tmp_path / "idx", "--factory", "IVF32,PQ8x4fs,RDisk",
                    "--target-recall", "0.9"])
    args = ["search", tmp_path / "idx", "--query-vectors", root / "q.npy", "-k", K]
    invoke(runner, args)
    # same size and modification time, other vectors: caught by the rows' hashes
    stat = source.stat()
    changed = x.copy()
    changed[:, :] = changed[::-1]
    np.save(source, changed)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = invoke(runner, args, expect=2)
    assert "not the vector that was indexed" in result.output and result.output.count("Error:") == 1
    # a newer file: refused when the index is opened
    np.save(source, changed)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    result = invoke(runner, args, expect=2)
    assert "changed" in result.output and "--force" in result.output and "Traceback" not in result.output


def test_many_queries_are_reranked_batch_by_batch_with_the_same_results(data, tmp_path):
    """Over QUERY_BATCH queries, the next batch's shortlist is searched while this one is re-scored: the hits
    are those of searching each batch on its own."""
    from hfbatch import index_rerank
    from hfbatch import indexing as hx
    from hfbatch.retrieval import Searcher

    root, x, _ = data
    hx.make_index(root / "v.npy", tmp_path / "idx", factory="IVF32,PQ8x4fs,RDisk", target_recall=0.9)
    index = Searcher(tmp_path / "idx").index
    assert isinstance(index, index_rerank.DiskRerank)
    queries = np.ascontiguousarray(x[::3][:2 * index_rerank.QUERY_BATCH + 37] + 0.01, dtype=np.float32)
    D, I = index.search(queries, K)
    parts = [index.search(queries[lo:lo + 100], K) for lo in range(0, len(queries), 100)]
    assert np.array_equal(I, np.concatenate([i for _, i in parts]))
    assert np.array_equal(D, np.concatenate([d for d, _ in parts]))
    assert np.allclose(D, np.take_along_axis(queries @ x.T, I, axis=1), atol=1e-5)
