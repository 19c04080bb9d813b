"""embed --chunk-tokens/--chunk-overlap: windows on token boundaries, spans, and search/evaluate over chunks."""

import json
from itertools import pairwise

import numpy as np
import pytest
from conftest import SAMPLE, hits_of, invoke, load, manifest, sample_rows, write_jsonl

from hfbatch.runner import OutputPaths

N, M = 64, 16  # the tiny tokenizer spells most words out: 388 of sample.jsonl's 400 texts are split



@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    """sample.jsonl -> chunked tiny embeddings (N/M) -> a flat index; plus the unchunked embeddings."""
    from click.testing import CliRunner

    runner = CliRunner()
    out = tmp_path_factory.mktemp("chunking")
    invoke(runner, ["ingest", SAMPLE, "-o", out / "dataset"])
    invoke(runner, ["embed", out / "dataset", "-o", out / "chunks", "--model", tiny_model, "--precision", "fp32",
                    "--chunk-tokens", N, "--chunk-overlap", M, "--shard-rows", 150])
    invoke(runner, ["embed", out / "dataset", "-o", out / "plain", "--model", tiny_model, "--precision", "fp32"])
    invoke(runner, ["index", out / "chunks", "-o", out / "index", "--kind", "flat"])
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from hfbatch.models import load_tokenizer

    return load_tokenizer(tiny_model)


def content_tokens(tokenizer, text, start, end):
    """Positions (by character offset) of the content tokens of `text` inside [start, end)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (s, e) in enumerate(encoded["offset_mapping"]) if s >= start and e <= end]



# ---- the windows ------------------------------------------------------------------------------------------

def test_spans_cover_every_text_and_windows_respect_size_and_overlap(built, tokenizer):
    chunks = load(built / "chunks")
    texts = {r["id"]: r["text"] for r in sample_rows()}
    by_doc = {}
    for row in chunks.select_columns(["doc_id", "chunk", "char_start", "char_end"]):
        by_doc.setdefault(row["doc_id"], []).append(row)
    assert set(by_doc) == set(texts)
    split = 0
    for doc_id, rows in by_doc.items():
        rows.sort(key=lambda r: r["chunk"])
        text = texts[doc_id]
        assert [r["chunk"] for r in rows] == list(range(len(rows)))
        # the union of the spans is the whole text, less leading/trailing whitespace
        covered = np.zeros(len(text), dtype=bool)
        for r in rows:
            covered[r["char_start"]:r["char_end"]] = True
        assert rows[0]["char_start"] == len(text) - len(text.lstrip())
        assert rows[-1]["char_end"] == len(text.rstrip())
        gaps = [text[i] for i in np.flatnonzero(~covered[rows[0]["char_start"]:rows[-1]["char_end"]])]
        assert all(c.isspace() for c in gaps), (doc_id, gaps)
        windows = [content_tokens(tokenizer, text, r["char_start"], r["char_end"]) for r in rows]
        assert all(0 < len(w) <= N for w in windows)
        for a, b in pairwise(windows):
            assert len(set(a) & set(b)) == M and b[0] == a[-1] - M + 1  # exactly M shared, contiguous
        split += len(rows) > 1
    assert split > 100  # the test means something: many documents were cut into several windows


def test_manifest_records_chunking_and_counts(built):
    m = manifest(built / "chunks")
    assert m["config"]["chunk_tokens"] == N and m["config"]["chunk_overlap"] == M
    assert m["chunking"] == {"chunk_tokens": N, "chunk_overlap": M}
    assert m["counts"]["documents"] == 400 and m["counts"]["chunks"] == m["rows"] == len(load(built / "chunks"))
    assert 0 < m["counts"]["split_documents"] < 400
    chunks = load(built / "chunks")
    assert chunks.features["id"].dtype == "string" and chunks[0]["id"] == f"{chunks[0]['doc_id']}#0"
    assert "chunk_tokens" not in manifest(built / "plain")["config"]


def test_a_short_text_is_one_chunk_over_the_whole_text(tmp_path, runner, tiny_model):
    rows = [{"id": "a", "text": "a chess game"}, {"id": "b", "text": "  json parser  "}]
    invoke(runner, ["ingest", write_jsonl(tmp_path / "d.jsonl", rows), "-o", tmp_path / "ds"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", "--model", tiny_model,
                    "--chunk-tokens", 8, "--chunk-overlap", 2])
    got = load(tmp_path / "emb").select_columns(["id", "doc_id", "chunk", "char_start", "char_end"]).to_list()
    assert [(r["id"], r["doc_id"], r["chunk"], r["char_start"], r["char_end"]) for r in got] == \
        [("a#0", "a", 0, 0, 12), ("b#0", "b", 0, 2, 13)]


def test_an_empty_text_still_gets_one_window(tokenizer):
    """ingest rejects empty texts, but a dataset from elsewhere may hold them: the row is kept, span [0, 0)."""
    from hfbatch.chunking import chunk_texts

    chunks = chunk_texts(tokenizer, ["", "a b"], 8, 2)
    assert (chunks.row, chunks.chunk, chunks.char_start, chunks.char_end) == ([0, 1], [0, 0], [0, 0], [0, 3])
    assert len(chunks.tokenized.input_ids[0]) == 2  # [CLS] [SEP]


def cosines(a, b):
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_a_chunk_embedding_is_the_embedding_of_its_window(built, tiny_model, tokenizer):
    """Every chunk's vector is the model's embedding of its token window ([CLS] window [SEP]); where the span
    text re-tokenizes to the same tokens (the window does not start inside a word), embedding the span text
    gives the same vector too."""
    from hfbatch.batching import Tokenized
    from hfbatch.embedding import EncoderRun

    chunks = load(built / "chunks")
    texts = {r["id"]: r["text"] for r in sample_rows()}
    embedder = EncoderRun(tiny_model, precision="fp32", backend="torch")
    picked = list(chunks.select(range(0, len(chunks), 5)))
    windows = []
    for r in picked:
        encoded = tokenizer(texts[r["doc_id"]], add_special_tokens=False, return_offsets_mapping=True)
        windows.append([t for t, (s, e) in zip(encoded["input_ids"], encoded["offset_mapping"])
                        if s >= r["char_start"] and e <= r["char_end"]])
    with_specials = [[tokenizer.cls_token_id, *w, tokenizer.sep_token_id] for w in windows]
    by_window = embedder.run(Tokenized(with_specials, None, 0))
    stored = [r["embedding"] for r in picked]
    assert cosines(by_window, stored).min() > 0.9999

    spans = [texts[r["doc_id"]][r["char_start"]:r["char_end"]] for r in picked]
    same = [i for i, (span, w) in enumerate(zip(spans, windows))
            if tokenizer(span, add_special_tokens=False)["input_ids"] == w]
    assert len(same) >= 20
    assert cosines(embedder([spans[i] for i in same]), [stored[i] for i in same]).min() > 0.9999


def test_a_single_window_document_matches_the_unchunked_embedding(built):
    """Documents of at most N tokens are one window: the same vector as embedding them unchunked."""
    chunks = load(built / "chunks")
    plain = {r["id"]: r["embedding"] for r in load(built / "plain")}
    counts = {}
    for doc_id in chunks["doc_id"]:
        counts[doc_id] = counts.get(doc_id, 0) + 1
    singles = [r for r in chunks if counts[r["doc_id"]] == 1]
    assert singles
    assert cosines([r["embedding"] for r in singles], [plain[r["doc_id"]] for r in singles]).min() > 0.9999


# ---- options, resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--chunk-tokens", 8, "--chunk-overlap", 8], "--chunk-overlap 8 must be smaller than --chunk-tokens 8"),
    (["--chunk-overlap", 4], "--chunk-overlap needs --chunk-tokens"),
    (["--chunk-tokens", 127], "--chunk-tokens 127 is more than the model takes: at most 126"),
    (["--chunk-tokens", 40, "--max-length", 32], "--chunk-tokens 40 is more than the model takes: at most 30"),
    (["--chunk-tokens", 8, "--incremental"], "--incremental cannot update a chunked output"),
])
def test_bad_chunk_options_exit_2_with_one_line(built, runner, tiny_model, tmp_path, args, message):
    result = invoke(runner, ["embed", built / "dataset", "-o", tmp_path / "emb", "--model", tiny_model, *args],
                    expect=2)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "emb").exists()


def test_chunk_options_are_part_of_the_config(built, runner, tiny_model):
    base = ["embed", built / "dataset", "-o", built / "chunks", "--model", tiny_model, "--precision", "fp32",
            "--shard-rows", 150]
    again = invoke(runner, [*base, "--chunk-tokens", N, "--chunk-overlap", M, "--json"])
    assert json.loads(again.stdout.strip().splitlines()[-1])["status"] == "up_to_date"
    changed = invoke(runner, [*base, "--chunk-tokens", N, "--chunk-overlap", M + 1], expect=2)
    assert "chunk_overlap" in changed.output and "--force" in changed.output
    unchunked = invoke(runner, [*base], expect=2)
    assert "chunk_tokens" in unchunked.output


def test_a_killed_chunked_run_resumes_from_its_finished_shards(built, runner, tiny_model, tmp_path, monkeypatch):
    from hfbatch.runner import ShardDir

    out = tmp_path / "emb"
    args = ["embed", built / "dataset", "-o", out, "--model", tiny_model, "--precision", "fp32",
            "--chunk-tokens", N, "--chunk-overlap", M, "--shard-rows", 150]
    real = ShardDir.write_shard_stream

    def dies_on_shard_2(self, index, *a, **kw):
        if index == 2:
            raise KeyboardInterrupt
        return real(self, index, *a, **kw)

    monkeypatch.setattr(ShardDir, "write_shard_stream", dies_on_shard_2)
    invoke(runner, args, expect=1)
    monkeypatch.setattr(ShardDir, "write_shard_stream", real)
    assert sorted(p.name for p in OutputPaths(tmp_path / "emb").shards.glob("*.json")) == ["00000.json", "00001.json"]
    invoke(runner, args)
    assert load(out)["id"] == load(built / "chunks")["id"]
    assert manifest(out)["counts"]["chunks"] == manifest(built / "chunks")["counts"]["chunks"]


# ---- index, search, evaluate over chunks ------------------------------------------------------------------

@pytest.fixture(scope="module")
def span_queries(built, tokenizer):
    """(doc_id, chunk, span text) of later chunks whose span text re-tokenizes to exactly the chunk's window,
    so the query's vector is the chunk's: that chunk must be its document's best."""
    texts = {r["id"]: r["text"] for r in sample_rows()}
    picked = []
    for r in load(built / "chunks").select_columns(["doc_id", "chunk", "char_start", "char_end"]):
        if r["chunk"] < 1 or len(picked) >= 12 or any(p[0] == r["doc_id"] for p in picked):
            continue
        text = texts[r["doc_id"]]
        span = text[r["char_start"]:r["char_end"]]
        if content_tokens(tokenizer, text, r["char_start"], r["char_end"]) and \
                r["char_start"] > 0 and text[r["char_start"] - 1].isspace():  # starts at a word boundary
            picked.append((r["doc_id"], r["chunk"], span))
    assert len(picked) == 12
    return picked



def test_the_index_manifest_knows_it_holds_chunks(built):
    m = manifest(built / "index")
    assert m["chunking"] == {"chunk_tokens": N, "chunk_overlap": M} and m["count"] == manifest(built / "chunks")["rows"]


def test_search_returns_distinct_documents_at_their_best_chunk(built, runner, tiny_model, span_queries):
    from hfbatch.embedding import EncoderRun

    doc_id, chunk, span = span_queries[0]
    hits = hits_of(invoke(runner, ["search", built / "index", span, "-k", 10, "--show-span", "--mode", "dense"]))
    assert len(hits) == 10 and len({h["id"] for h in hits}) == 10
    texts = {r["id"]: r["text"] for r in sample_rows()}
    assert hits[0]["id"] == doc_id and hits[0]["chunk"] == chunk and hits[0]["span_text"] == span
    assert hits[0]["score"] > 0.9999
    for h in hits:
        assert h["text"] == texts[h["id"]] and h["span_text"] == h["text"][h["span"][0]:h["span"][1]]

    # the same ranking by brute force: every chunk scored, each document keeps its best
    chunks = load(built / "chunks")
    vectors = np.array(chunks["embedding"], dtype=np.float32)
    query = EncoderRun(tiny_model, precision="fp32")([span])[0]
    best = {}
    for row, score in enumerate(vectors @ query):
        d = chunks[row]["doc_id"]
        if d not in best or score > best[d][0]:
            best[d] = (score, chunks[row]["chunk"])
    expected = sorted(best.items(), key=lambda item: -item[1][0])[:10]
    assert [(h["id"], h["chunk"]) for h in hits] == [(d, c) for d, (_, c) in expected]
    assert np.allclose([h["score"] for h in hits], [s for _, (s, _) in expected], atol=1e-4)


def test_search_fetches_more_chunks_until_k_documents(built, runner, span_queries):
    """k=150 documents of ~5 chunks each are not all among the first 4*k chunks: the search widens."""
    hits = hits_of(invoke(runner, ["search", built / "index", span_queries[1][2], "-k", 150]))
    assert len(hits) == 150 and len({h["id"] for h in hits}) == 150
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    everything = hits_of(invoke(runner, ["search", built / "index", span_queries[1][2], "-k", 1000]))
    assert len(everything) == 400 and len({h["id"] for h in everything}) == 400


def test_text_format_shows_the_matching_span(built, runner, span_queries):
    doc_id, chunk, span = span_queries[2]
    out = invoke(runner, ["search", built / "index", span, "-k", 2, "--format", "text"]).stdout
    first = next(line for line in out.splitlines() if line.startswith("   1. "))  # the query may span lines
    assert f"[{doc_id}]  #{chunk} [" in first and " ".join(span.split())[:60] in first


def test_search_filter_and_output_dataset_over_chunks(built, runner, span_queries, tmp_path):
    sections = {r["id"]: r["section"] for r in sample_rows()}
    hits = hits_of(invoke(runner, ["search", built / "index", span_queries[3][2], "-k", 8,
                                   "--filter", "section=games"]))
    assert len(hits) == 8 and {sections[h["id"]] for h in hits} == {"games"} and len({h["id"] for h in hits}) == 8
    invoke(runner, ["search", built / "index", span_queries[3][2], "-k", 5, "-o", tmp_path / "hits",
                    "--show-span"])
    table = load(tmp_path / "hits")
    # hybrid, the default: both parts' scores too
    assert table.column_names == ["query_index", "query", "rank", "id", "score", "text", "dense_score",
                                  "lexical_score", "chunk", "char_start", "char_end", "span_text"]
    assert table[0]["id"] == span_queries[3][0] and table[0]["span_text"] == span_queries[3][2]


def test_evaluate_over_chunks_counts_documents(built, runner, span_queries, tmp_path):
    queries = write_jsonl(tmp_path / "q.jsonl", [{"query": span, "relevant": [doc_id]}
                                                 for doc_id, _, span in span_queries])
    result = json.loads(invoke(runner, ["evaluate", built / "index", "--queries", queries, "-k", 10, "--json"])
                        .stdout.strip().splitlines()[-1])
    assert result["queries"] == 12 and result["unknown_relevant"] == 0 and result["chunked"] is True
    assert result["recall@1"] == 1.0 and result["mrr@10"] == 1.0


def test_best_chunk_per_document_widens_while_too_few_documents():
    from hfbatch.retrieval import best_chunk_per_document

    doc_codes = np.repeat(np.arange(5), 10)  # 5 documents of 10 chunks; the best chunks all in document 0 ...
    order = np.argsort(np.arange(50) % 10 * 5 + np.arange(50) // 10)  # ... then every document's chunk 1, ...
    fetched = []

    def search_rows(vectors, n):
        fetched.append(n)
        return np.tile(-np.arange(n, dtype=np.float32), (len(vectors), 1)), np.tile(order[:n], (len(vectors), 1))

    scores, positions = best_chunk_per_document(search_rows, np.zeros((2, 4), np.float32), 3, doc_codes, 50)
    assert fetched == [12]  # 4 chunks per document wanted: enough here
    assert positions.tolist() == [[0, 10, 20]] * 2 and scores[0].tolist() == [0.0, -1.0, -2.0]

    order = np.arange(50)  # now the 10 chunks of document 0 come first, then document 1's, ...
    fetched.clear()
    scores, positions = best_chunk_per_document(search_rows, np.zeros((1, 4), np.float32), 3, doc_codes, 50)
    assert fetched == [12, 48] and positions.tolist() == [[0, 10, 20]]
    fetched.clear()
    _, positions = best_chunk_per_document(search_rows, np.zeros((1, 4), np.float32), 9, doc_codes, 50)
    assert fetched == [20, 50] and positions.tolist() == [[0, 10, 20, 30, 40]]  # k capped at 5 documents


def test_chunked_slices_merge_into_the_whole(built, runner, tiny_model, tmp_path):
    args = ["--model", tiny_model, "--precision", "fp32", "--chunk-tokens", N, "--chunk-overlap", M,
            "--num-shards", 2]
    for i in (0, 1):
        invoke(runner, ["embed", built / "dataset", "-o", tmp_path / f"part{i}", *args, "--shard-index", i])
    invoke(runner, ["merge", tmp_path / "part0", tmp_path / "part1", "-o", tmp_path / "merged"])
    merged, whole = load(tmp_path / "merged"), load(built / "chunks")
    assert merged["id"] == whole["id"] and merged["char_end"] == whole["char_end"]
    assert manifest(tmp_path / "merged")["chunking"] == {"chunk_tokens": N, "chunk_overlap": M}
