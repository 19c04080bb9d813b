"""hfbatch index: every kind builds from an embeddings dataset, recall is measured and recorded."""

import json

import numpy as np
import pytest
from conftest import invoke


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """3,000 clustered 32-d unit vectors saved as an hfbatch embed output (via the real runner)."""

    from hfbatch.dataset import value_feature
    from hfbatch.embedding import embeddings_features, embeddings_table
    from hfbatch.runner import Job

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(60, 32))
    vectors = centres[rng.integers(0, 60, 3000)] + 0.6 * rng.normal(size=(3000, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    out = tmp_path_factory.mktemp("vec") / "emb"
    with Job("embed", out, config={"synthetic": True}) as job:
        job.shards.write_shard(0, embeddings_table(list(range(3000)), vectors, 32))
        job.publish_dataset(1, embeddings_features(value_feature("int64"), 32), extra={"dim": 32})
    return out, vectors


@pytest.mark.parametrize("args,kind", [(["--kind", "flat"], "flat"), (["--kind", "ivf"], "ivf"),
                                       (["--kind", "hnsw"], "hnsw"), (["--kind", "ivfpq"], "ivfpq"),
                                       (["--factory", "IVF16,SQ8"], "custom")])
def test_each_kind_reaches_the_target_recall_and_records_it(embeddings, tmp_path, runner, args, kind):
    from hfbatch.indexing import load_index

    path, vectors = embeddings
    invoke(runner, ["index", path, "-o", tmp_path / "idx", *args, "--target-recall", "0.9"])
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["kind"] == kind and manifest["count"] == 3000 and manifest["dim"] == 32
    assert manifest["recall_at_10"] >= 0.9 and manifest["qps"] > 0 and manifest["build_s"] >= 0
    # the recorded recall is real: re-measure on the database vectors themselves with the stored params
    from hfbatch.indexing import apply_search_params, exact_neighbors, recall_at_k

    index = load_index(tmp_path / "idx" / "index.faiss")
    apply_search_params(index, manifest["params"])
    queries = vectors[::30]
    _, truth = exact_neighbors(lambda a, b: vectors[a:b], 3000, queries, 10)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, truth, 10) >= 0.85


def test_bad_factory_string_is_a_clear_error(embeddings, tmp_path, runner):
    path, _ = embeddings
    result = invoke(runner, ["index", path, "-o", tmp_path / "idx", "--factory", "NoSuchIndex42"], expect=2)
    assert "NoSuchIndex42" in result.output and not (tmp_path / "idx").exists()


def test_memory_budget_is_parsed(embeddings, tmp_path, runner):
    path, _ = embeddings
    result = invoke(runner, ["index", path, "-o", tmp_path / "idx", "--memory-budget", "lots"], expect=2)
    assert "4GB" in result.output
