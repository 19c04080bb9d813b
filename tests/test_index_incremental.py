"""index --incremental: deleted and changed rows leave the index, new and changed ones enter it, in place for
flat and ivf (rebuilt for hnsw), and searches answer as from a rebuilt index."""

import json

import numpy as np
import pytest
from conftest import invoke, sample_rows, write_jsonl

DIM = 32


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, seed):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(60, DIM))       # the same clusters in every version
    return unit(centres[rng.integers(0, 60, n)] + 0.6 * rng.normal(size=(n, DIM)))


def publish_embeddings(path, ids, vectors):
    """An `hfbatch embed`-like output at path (replaced if there), through the real runner."""

    from hfbatch.dataset import value_feature
    from hfbatch.embedding import embeddings_features, embeddings_table
    from hfbatch.runner import Job

    with Job("embed", path, config={"synthetic": True}, force=True) as job:
        job.shards.write_shard(0, embeddings_table(list(ids), vectors, DIM))
        job.publish_dataset(1, embeddings_features(value_feature("int64"), DIM), extra={"dim": DIM})


def edited(ids, vectors, seed=1):
    """The corpus after an edit: 50 rows deleted from the middle, 30 changed, 60 new ones at the end."""
    rng = np.random.default_rng(seed)
    keep = np.ones(len(ids), dtype=bool)
    keep[1000:1050] = False
    ids, vectors = ids[keep], vectors[keep].copy()
    changed = rng.choice(len(ids), 30, replace=False)
    vectors[changed] = clustered(30, seed + 10)
    new_ids = np.arange(10_000, 10_060)
    return np.concatenate([ids, new_ids]), np.concatenate([vectors, clustered(60, seed + 20)])


def search(index_dir, queries, k=10):
    from hfbatch.indexing import apply_search_params, load_index

    manifest = json.loads((index_dir / "manifest.json").read_text())
    index = load_index(index_dir / "index.faiss")
    apply_search_params(index, manifest["params"])
    return index.search(queries, k), manifest


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_update_in_place_answers_like_a_rebuild(tmp_path, runner, kind):
    from hfbatch.indexing import exact_neighbors, recall_at_k

    ids, vectors = np.arange(3000), clustered(3000, seed=0)
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    publish_embeddings(emb, ids, vectors)
    invoke(runner, ["index", emb, "-o", idx, "--kind", kind])

    ids2, vectors2 = edited(ids, vectors)
    publish_embeddings(emb, ids2, vectors2)
    refused = invoke(runner, ["index", emb, "-o", idx, "--kind", kind], expect=2)
    assert "--incremental" in refused.output
    result = invoke(runner, ["index", emb, "-o", idx, "--kind", kind, "--incremental", "--json"])
    summary = json.loads(result.stdout)
    assert summary["updated_in_place"] and (summary["kept"], summary["removed"], summary["added"]) == (2920, 80, 90)
    invoke(runner, ["index", emb, "-o", tmp_path / "full", "--kind", kind])

    queries = clustered(200, seed=7)         # held out: drawn like the corpus, in neither index
    (D, I), manifest = search(idx, queries)
    (D_full, I_full), _ = search(tmp_path / "full", queries)
    assert manifest["count"] == len(ids2) and manifest["update"]["added"] == 90
    if kind == "flat":                       # exact either way: the same rows, the same scores
        assert np.array_equal(I, I_full)
        np.testing.assert_allclose(D, D_full, atol=1e-5)
    else:
        _, truth = exact_neighbors(lambda a, b: vectors2[a:b], len(vectors2), queries, 10)
        assert recall_at_k(I, truth, 10) >= 0.9 and manifest["recall_at_10"] >= 0.9
    # an index position is a row of the new embeddings, whose id is the document's
    np.testing.assert_allclose(D[:, 0], (queries * vectors2[I[:, 0]]).sum(1), atol=1e-5)

    # a second update (the ids in the index are now renumbered rows) keeps working
    publish_embeddings(emb, ids2[100:], vectors2[100:])
    invoke(runner, ["index", emb, "-o", idx, "--kind", kind, "--incremental"])
    (D, I), manifest = search(idx, queries)
    assert manifest["count"] == len(ids2) - 100
    np.testing.assert_allclose(D[:, 0], (queries * vectors2[100:][I[:, 0]]).sum(1), atol=1e-5)


def test_hnsw_is_rebuilt_and_says_so(tmp_path, runner):
    ids, vectors = np.arange(3000), clustered(3000, seed=0)
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    publish_embeddings(emb, ids, vectors)
    invoke(runner, ["index", emb, "-o", idx, "--kind", "hnsw"])
    publish_embeddings(emb, *edited(ids, vectors))
    result = invoke(runner, ["index", emb, "-o", idx, "--kind", "hnsw", "--incremental", "--json"])
    assert "msg=rebuilding" in result.stderr and "HNSW graph cannot remove vectors" in result.stderr
    assert not json.loads(result.stdout)["updated_in_place"]
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["count"] == 3010 and manifest["update"] is None and manifest["recall_at_10"] >= 0.9


def test_ivf_is_retrained_once_the_corpus_more_than_doubled(tmp_path, runner):
    ids, vectors = np.arange(2000), clustered(2000, seed=0)
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    publish_embeddings(emb, ids, vectors)
    invoke(runner, ["index", emb, "-o", idx, "--kind", "ivf"])
    publish_embeddings(emb, np.arange(3000), np.concatenate([vectors, clustered(1000, seed=3)]))
    invoke(runner, ["index", emb, "-o", idx, "--kind", "ivf", "--incremental"])
    assert json.loads((idx / "manifest.json").read_text())["added_since_training"] == 1000
    publish_embeddings(emb, np.arange(4100), np.concatenate([vectors, clustered(2100, seed=3)]))
    result = invoke(runner, ["index", emb, "-o", idx, "--kind", "ivf", "--incremental"])
    assert "msg=rebuilding" in result.stderr and "need training on the current rows" in result.stderr
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["trained_on"] == 4100 and manifest["added_since_training"] == 0


def test_search_finds_new_and_changed_documents_after_incremental_runs(tmp_path, tiny_model, runner):
    """The whole path a user takes: ingest -> embed --incremental -> index --incremental -> search, whose hits
    (ids and texts) equal those from indexes built from scratch."""
    rows = sample_rows(120)
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    embed = ["--model", tiny_model, "--precision", "fp32", "--shard-rows", "50"]
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", *embed])
    invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "idx", "--kind", "flat"])

    changed = [dict(r) for r in rows]
    changed[7]["text"] = "chess game engine for two players"
    del changed[30:40]
    changed.append({"id": 99_999, "package": "jsonp", "section": "new", "text": "library for parsing json files"})
    write_jsonl(src, changed)
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--force"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", *embed, "--incremental"])
    invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "idx", "--kind", "flat", "--incremental"])
    invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "full", "--kind", "flat"])

    queries = ["chess game engine for two players", "library for parsing json files", "network tool"]
    hits = {}
    for name in ("idx", "full"):
        out = invoke(runner, ["search", tmp_path / name, *queries, "-k", "5", "--model", tiny_model]).stdout
        hits[name] = [json.loads(line) for line in out.splitlines()]
    strip = lambda hs: [(h["query"], h["rank"], h["id"], h["text"], round(h["score"], 4)) for h in hs]
    assert strip(hits["idx"]) == strip(hits["full"])
    top = {h["query"]: h for h in hits["idx"] if h["rank"] == 1}
    assert top[queries[0]]["id"] == changed[7]["id"] and top[queries[1]]["id"] == 99_999
