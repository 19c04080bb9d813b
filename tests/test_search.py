"""hfbatch search: query files (JSONL / CSV / text), -o as a dataset, --filter COLUMN=VALUE inside the search."""

import json

import numpy as np
import pytest
from conftest import SAMPLE, hits_of, invoke, load, sample_rows


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    """sample.jsonl (400 rows with a `section` column) -> tiny embeddings -> a flat and an IVF index."""
    from click.testing import CliRunner

    runner = CliRunner()
    out = tmp_path_factory.mktemp("search")
    invoke(runner, ["ingest", SAMPLE, "-o", out / "dataset"])
    invoke(runner, ["embed", out / "dataset", "-o", out / "emb", "--model", tiny_model, "--precision", "fp32"])
    invoke(runner, ["index", out / "emb", "-o", out / "flat", "--kind", "flat"])
    invoke(runner, ["index", out / "emb", "-o", out / "ivfpq", "--factory", "IVF8,PQ16x4fs,Refine(SQfp16)",
                    "--target-recall", "0.5"])
    return out



def section_of():
    return {r["id"]: r["section"] for r in sample_rows()}


def test_query_files_jsonl_csv_and_text_give_the_same_hits(built, runner, tmp_path):
    rows = sample_rows()
    texts = [rows[3]["text"], rows[40]["text"]]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"query": t, "relevant": [1]}) + "\n" for t in texts))
    import csv

    with open(tmp_path / "q.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query", "note"])
        writer.writerows([[t, "x"] for t in texts])
    (tmp_path / "q.txt").write_text(" ".join(texts[0].split()) + "\n" + " ".join(texts[1].split()) + "\n")
    jl = hits_of(invoke(runner, ["search", built / "flat", "--queries", tmp_path / "q.jsonl", "-k", "2"]))
    cs = hits_of(invoke(runner, ["search", built / "flat", "--queries", tmp_path / "q.csv", "-k", "2"]))
    tx = hits_of(invoke(runner, ["search", built / "flat", "--queries", tmp_path / "q.txt", "-k", "2"]))
    assert [h["id"] for h in jl] == [h["id"] for h in cs] and len(jl) == 4
    assert jl[0]["id"] == rows[3]["id"] and jl[2]["id"] == rows[40]["id"]
    assert [h["id"] for h in tx][::2] == [rows[3]["id"], rows[40]["id"]]


def test_csv_without_query_column_is_an_input_error(built, runner, tmp_path):
    (tmp_path / "q.csv").write_text("text,other\nhello,1\n")
    result = invoke(runner, ["search", built / "flat", "--queries", tmp_path / "q.csv"], expect=2)
    assert "query" in result.output and "text, other" in result.output and "Traceback" not in result.output


def test_queries_are_embedded_and_searched_in_one_batch(built, runner, monkeypatch):
    import hfbatch.indexing

    calls = []
    real_load = hfbatch.indexing.load_index

    def load_and_count(*args, **kwargs):
        index = real_load(*args, **kwargs)
        real = type(index).search

        def counting(self, x, k, *a, **kw):
            calls.append(len(x))
            return real(self, x, k, *a, **kw)

        monkeypatch.setattr(type(index), "search", counting)
        return index

    monkeypatch.setattr(hfbatch.indexing, "load_index", load_and_count)
    invoke(runner, ["search", built / "flat", "a", "b", "c", "-k", "3"])
    assert calls == [3]


@pytest.mark.parametrize("index_name", ["flat", "ivfpq"])
def test_filter_returns_k_hits_all_in_the_section(built, runner, index_name):
    sections = section_of()
    queries = ["a fast text editor", "network server", "chess game for two players"]
    result = invoke(runner, ["search", built / index_name, *queries, "-k", "5", "--filter", "section=games"])
    hits = hits_of(result)
    assert len(hits) == 5 * len(queries)                       # 8 games rows >= k: k hits each
    assert all(sections[h["id"]] == "games" for h in hits)
    # fewer matching rows than k: all of them, no padding
    hits = hits_of(invoke(runner, ["search", built / index_name, "x", "-k", "20", "--filter", "section=games"]))
    assert sorted(h["id"] for h in hits) == sorted(i for i, s in sections.items() if s == "games")


def test_filter_is_exact_on_a_flat_index_and_combines_or_and_and(built, runner):
    from hfbatch.indexing import ArrowVectors

    rows = sample_rows()
    sections = section_of()
    vectors = ArrowVectors(built / "emb")
    allowed = [i for i, r in enumerate(rows) if r["section"] in ("games", "editors")]
    query_text = rows[0]["text"]                              # a games row: its own top hit
    hits = hits_of(invoke(runner, ["search", built / "flat", query_text, "-k", "10", "--mode", "dense",
                                   "--filter", "section=games", "--filter", "section=editors"]))
    assert len(hits) == 10 and all(sections[h["id"]] in ("games", "editors") for h in hits)
    assert hits[0]["id"] == rows[0]["id"]
    # the 10 best allowed rows, by brute force on the stored embeddings
    q = vectors(0, 1)[0]
    scores = vectors(0, len(rows))[allowed] @ q
    expected = [rows[allowed[i]]["id"] for i in np.argsort(-scores)[:10]]
    assert [h["id"] for h in hits] == expected
    # different columns are AND-ed
    hits = hits_of(invoke(runner, ["search", built / "flat", "x", "-k", "5", "--filter", "section=games",
                                   "--filter", "package=3dchess"]))
    assert [h["id"] for h in hits] == [15]
    # numbers compare as text
    hits = hits_of(invoke(runner, ["search", built / "flat", "x", "-k", "5", "--filter", "id=15"]))
    assert [h["id"] for h in hits] == [15]


def test_filter_on_unknown_column_lists_the_columns(built, runner):
    result = invoke(runner, ["search", built / "flat", "x", "--filter", "colour=red"], expect=2)
    assert "colour" in result.output and "section" in result.output and "package" in result.output
    assert "Traceback" not in result.output
    result = invoke(runner, ["search", built / "flat", "x", "--filter", "section"], expect=2)
    assert "COLUMN=VALUE" in result.output


def test_output_writes_a_dataset_with_a_manifest(built, runner, tmp_path):
    out = tmp_path / "hits"
    result = invoke(runner, ["search", built / "flat", "chess game", "json parser", "-k", "4", "-o", out,
                             "--filter", "section=games"])
    assert result.stdout == ""
    ds = load(out)
    # hybrid (the default over an index with both parts): each hit also says what each part scored it
    assert len(ds) == 8 and ds.column_names == ["query_index", "query", "rank", "id", "score", "text",
                                                "dense_score", "lexical_score"]
    assert ds["rank"] == [1, 2, 3, 4] * 2 and ds["query_index"] == [0] * 4 + [1] * 4
    assert all(section_of()[i] == "games" for i in ds["id"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"] == "search" and manifest["rows"] == 8 and manifest["filtered_rows"] == 8
    # same inputs and options: up to date; other options: refused without --force
    invoke(runner, ["search", built / "flat", "chess game", "json parser", "-k", "4", "-o", out,
                    "--filter", "section=games"])
    invoke(runner, ["search", built / "flat", "chess game", "-k", "4", "-o", out], expect=2)
    invoke(runner, ["search", built / "flat", "chess game", "-k", "4", "-o", out, "--force"])
    assert len(load(out)) == 4


# ---- filtered_search on its own: approximate indexes, selective filters ---------------------------------

@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 16))
    x = centres[rng.integers(0, 40, 4000)] + 0.5 * rng.normal(size=(4000, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("factory,knob", [("IVF32,Flat", ("nprobe", 1)), ("HNSW16", ("efSearch", 16)),
                                          ("IVF32,PQ8x4fs,Refine(Flat)", ("nprobe", 1)), ("Flat", None)])
def test_filtered_search_finds_k_allowed_rows_even_when_they_are_rare(vectors, factory, knob):
    import faiss

    from hfbatch.indexing import apply_search_params
    from hfbatch.retrieval import filtered_search

    index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    if knob:
        apply_search_params(index, dict([knob]))
    allowed = np.arange(5, 4000, 97, dtype=np.int64)            # 42 scattered rows, ~1%
    queries = vectors[:20] + 0.1
    _, I = filtered_search(index, queries, 10, allowed, exact_reader=lambda: (lambda a, b: vectors[a:b]))
    assert (I >= 0).all() and np.isin(I, allowed).all()
    exact = np.argsort(-(queries @ vectors[allowed].T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(allowed[e])) / 10 for a, e in zip(I, exact)])
    assert recall >= 0.8
    if factory == "Flat":
        assert recall == 1.0


def test_filtered_search_falls_back_to_exact_search_when_the_index_cannot_find_enough(vectors):
    import faiss

    from hfbatch.retrieval import filtered_search

    index = faiss.index_factory(16, "HNSW4", faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    index.hnsw.efSearch = 1
    allowed = np.array([3, 1500, 3999], dtype=np.int64)
    D, I = filtered_search(index, vectors[:4], 3, allowed, exact_reader=lambda: (lambda a, b: vectors[a:b]))
    assert all(sorted(row) == [3, 1500, 3999] for row in I.tolist())
    np.testing.assert_allclose(D[0], np.sort(vectors[allowed] @ vectors[0])[::-1], rtol=1e-5)


def test_an_nprobe_past_faiss_int_range_means_every_list(built, runner):
    """faiss keeps nprobe in a C int: 2**31 wrapped negative and failed inside faiss ("internal error"). Any
    nprobe at or above nlist probes every list, so 2**31 and 2**63 give the hits of nprobe = nlist (8)."""
    def hits(nprobe):
        out = invoke(runner, ["search", built / "ivfpq", "chess game", "-k", "5", "--mode", "dense",
                              "--nprobe", nprobe]).stdout
        return [json.loads(line)["id"] for line in out.splitlines()]

    every_list = hits(8)
    assert len(every_list) == 5
    assert hits(2**31) == every_list and hits(2**63) == every_list
