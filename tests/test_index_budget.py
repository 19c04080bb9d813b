"""--memory-budget: the index's memory is estimated before building, the best kind that fits is built, and a
budget nothing fits is refused with the budget that would work."""
import json
import re

import numpy as np
import pytest
from conftest import clustered_unit_vectors, invoke

N, DIM = 3000, 32


@pytest.fixture(scope="module")
def vectors_npy(tmp_path_factory):
    x = clustered_unit_vectors(N, DIM, clusters=60, spread=0.6)
    path = tmp_path_factory.mktemp("vec") / "v.npy"
    np.save(path, x)
    return path, x


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("factory,n", [("Flat", 5000), ("IVF64,Flat", 5000), ("HNSW16", 5000),
                                       ("IVF64,PQ16x4fs", 20000), ("IVF64,SQ8", 5000), ("PCA16,IVF32,SQ8", 5000),
                                       ("IVF64,PQ16x4fs,Refine(SQfp16)", 20000)])
def test_the_estimate_is_within_a_fifth_of_the_built_index(factory, n):
    import faiss

    from hfbatch.index_budget import index_bytes

    x = np.random.default_rng(1).standard_normal((n, DIM)).astype(np.float32)
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    actual = len(faiss.serialize_index(index))            # what it holds, as written out
    assert 0.8 * actual <= index_bytes(factory, n, DIM) <= 1.25 * actual, (actual, index_bytes(factory, n, DIM))


def test_a_budget_nothing_fits_is_refused_naming_the_budget_that_works(vectors_npy, tmp_path, runner):
    path, _ = vectors_npy
    result = invoke(runner, ["index", path, "-o", tmp_path / "idx", "--kind", "flat", "--memory-budget", "100KB"],
                    expect=2)
    line = result.output.strip()
    assert line.count("\n") == 0 and line.startswith("Error: --memory-budget 100KB") and "Traceback" not in line
    needed = re.search(r"give --memory-budget (\S+) or more", line).group(1)
    assert not (tmp_path / "idx").exists()
    # the budget it names is enough (flat: 3000 x 32 float32 = 375 KiB)
    invoke(runner, ["index", path, "-o", tmp_path / "idx", "--kind", "flat", "--memory-budget", needed])
    assert manifest(tmp_path / "idx")["factory"] == "Flat"
    assert manifest(tmp_path / "idx")["estimated_index_bytes"] == N * DIM * 4
    # auto: nothing at all fits 1 KB; the smallest index named is a compressed one, and its budget works
    result = invoke(runner, ["index", path, "-o", tmp_path / "auto", "--memory-budget", "1KB"], expect=2)
    smallest = re.search(r"the smallest, (\S+), needs", result.output).group(1)
    needed = re.search(r"give --memory-budget (\S+) or more", result.output).group(1)
    assert "PQ" in smallest
    invoke(runner, ["index", path, "-o", tmp_path / "auto", "--memory-budget", needed])
    assert manifest(tmp_path / "auto")["factory"] == smallest


def test_a_budget_below_flat_forces_a_compressed_kind(vectors_npy, tmp_path, runner):
    path, x = vectors_npy
    invoke(runner, ["index", path, "-o", tmp_path / "flat"])
    assert manifest(tmp_path / "flat")["kind"] == "flat"          # small n: exact, when it fits
    # 200 KB: flat vectors (384 KB) and an fp16 copy (192 KB + codes) do not fit; codes re-ranked from the .npy do
    invoke(runner, ["index", path, "-o", tmp_path / "small", "--memory-budget", "200KB", "--target-recall", "0.9"])
    small = manifest(tmp_path / "small")
    assert small["kind"] == "ivfpq" and small["factory"].endswith(",RDisk"), small["factory"]
    assert small["estimated_index_bytes"] <= 200_000 and small["recall_at_10"] >= 0.9
    assert small["memory_budget"] == "200KB" and small["memory_budget_bytes"] == 200_000
    assert small["rerank_source"]["path"] == str(path.resolve())


def test_the_budget_is_recorded_as_given_and_the_default_is_fixed(vectors_npy, tmp_path, runner):
    path, _ = vectors_npy
    invoke(runner, ["index", path, "-o", tmp_path / "idx"])
    recorded = manifest(tmp_path / "idx")
    assert recorded["config"]["memory_budget"] is None            # not given: the default, the same everywhere
    assert recorded["memory_budget"] == "4GiB" and recorded["memory_budget_bytes"] == 4 * 2**30
    invoke(runner, ["index", path, "-o", tmp_path / "given", "--memory-budget", "1.5GB"])
    given = manifest(tmp_path / "given")
    assert given["config"]["memory_budget"] == "1.5GB" and given["memory_budget_bytes"] == 1_500_000_000


def test_choose_index_prefers_the_copy_in_memory_then_the_disk_then_sq8():
    from hfbatch import indexing as hx

    roomy = hx.choose_index(1_000_000, 384, 4 * 2**30, row_access=True)
    assert roomy.factory.endswith("Refine(SQfp16)")
    tight = hx.choose_index(1_000_000, 384, 500 * 2**20, row_access=True)
    assert tight.factory.endswith(",RDisk")
    assert hx.choose_index(1_000_000, 384, 500 * 2**20, row_access=False).factory.endswith("Refine(SQ8)")
    ten_million = hx.choose_index(10_000_000, 384, 4 * 2**30, row_access=True)
    assert ten_million.factory == "IVF4096,PQ96x4fs,RDisk"           # fp16 copy (7.2 GiB) exceeds 4 GiB
