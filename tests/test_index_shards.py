"""--shards N: sub-indexes over row ranges, trained once, each built on its own, merged into one index that
answers as the one-piece build does."""
import json

import numpy as np
import pytest
from conftest import clustered_unit_vectors, invoke

N, DIM, K = 3000, 32, 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    x = clustered_unit_vectors(N + 40, DIM, clusters=60, spread=0.6)
    root = tmp_path_factory.mktemp("shards")
    np.save(root / "v.npy", x[:N])
    return root, x[:N], x[N:]


def opened(index_dir):
    from hfbatch.index_rerank import attach
    from hfbatch.indexing import load_index

    manifest = json.loads((index_dir / "manifest.json").read_text())
    return attach(load_index(index_dir / "index.faiss"), index_dir, manifest), manifest


@pytest.mark.parametrize("args", [["--kind", "flat"], ["--kind", "ivf"], ["--kind", "ivfpq"],
                                  ["--factory", "IVF16,PQ8x4fs,RDisk"]])
def test_a_sharded_build_answers_as_the_one_piece_build(data, tmp_path, runner, args):
    from hfbatch.indexing import apply_search_params

    root, x, queries = data
    invoke(runner, ["index", root / "v.npy", "-o", tmp_path / "one", *args, "--target-recall", "0.9"])
    invoke(runner, ["index", root / "v.npy", "-o", tmp_path / "four", *args, "--shards", "4",
                    "--target-recall", "0.9"])
    one, one_manifest = opened(tmp_path / "one")
    four, four_manifest = opened(tmp_path / "four")
    assert four_manifest["config"]["shards"] == 4 and four_manifest["count"] == N == four.ntotal
    for index in (one, four):                    # the same search parameters on both
        apply_search_params(index, one_manifest["params"])
    D1, I1 = one.search(queries, K)
    D4, I4 = four.search(queries, K)
    assert np.array_equal(I1, I4) and np.allclose(D1, D4, atol=1e-6)
    assert not [p.name for p in tmp_path.iterdir() if "shards" in p.name]       # no shard files left behind


def test_each_shard_builds_on_its_own_from_the_trained_index(data, tmp_path):
    import faiss

    from hfbatch import indexing as hx
    from hfbatch.index_shards import build_shard, merge_shards, shard_ranges

    _, x, queries = data
    plan = hx.plan_for_kind("ivf", N, DIM)
    hx.save_index(hx.train_index(plan, N, DIM, lambda a, b: x[a:b]), tmp_path / "trained.faiss")
    ranges = shard_ranges(N, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == N and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # built in reverse order, as separate workers might finish: only the merge needs them in row order
    files = {i: build_shard(tmp_path / "trained.faiss", lambda a, b: x[a:b], start, stop, tmp_path / f"s{i}.faiss")
             for i, (start, stop) in reversed(list(enumerate(ranges)))}
    merged = merge_shards([files[i] for i in range(3)], [start for start, _ in ranges])
    whole = faiss.read_index(str(tmp_path / "trained.faiss"))
    whole.add(x)
    for index in (merged, whole):
        hx.apply_search_params(index, {"nprobe": 4})
    assert np.array_equal(merged.search(queries, K)[1], whole.search(queries, K)[1])


def test_an_hnsw_index_cannot_be_sharded(data, tmp_path, runner):
    root, _, _ = data
    result = invoke(runner, ["index", root / "v.npy", "-o", tmp_path / "idx", "--kind", "hnsw", "--shards", "2"],
                    expect=2)
    assert "--shards 2" in result.output and "HNSW" in result.output and not (tmp_path / "idx").exists()
