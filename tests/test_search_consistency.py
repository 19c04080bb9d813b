"""Search answers from what was indexed: ids and spans are the index's own, text comes only from the dataset
version that was indexed, the query encoder picks its own device and precision, the metric is the model's
similarity, and damaged index files or query files are one clear error."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import hits_of, invoke, load, manifest, sample_rows, write_jsonl

ROWS = 60
PICKS = [0, 7, 21, 33, 50]  # documents searched for by their own text


def distinct_rows():
    """ROWS sample documents with distinct texts (duplicates would make "its own top hit" ambiguous)."""
    rows, seen = [], set()
    for row in sample_rows():
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
        if len(rows) == ROWS:
            return rows
    raise AssertionError("the sample has too few distinct texts")


def build(runner, out, model, rows, *extra_embed):
    """ingest -> embed (fp32) -> index (flat), all under out."""
    write_jsonl(out / "corpus.jsonl", rows)
    invoke(runner, ["ingest", out / "corpus.jsonl", "-o", out / "dataset"])
    invoke(runner, ["embed", out / "dataset", "-o", out / "emb", "--model", model, "--precision", "fp32",
                    *extra_embed])
    invoke(runner, ["index", out / "emb", "-o", out / "index", "--kind", "flat"])


def top_hits(runner, index, queries, *args):
    """The rank-1 hit of each query, and the result (for its stderr)."""
    result = invoke(runner, ["search", index, *queries, "-k", "3", *args])
    hits = hits_of(result)
    return [h for h in hits if h["rank"] == 1], result


def warnings(result):
    return [line for line in result.stderr.splitlines() if "WARNING" in line]


@pytest.fixture
def indexed(tmp_path, runner, tiny_model):
    rows = distinct_rows()
    build(runner, tmp_path, tiny_model, rows)
    queries = [rows[i]["text"] for i in PICKS]
    tops, result = top_hits(runner, tmp_path / "index", queries)
    # the baseline: each document is its own top hit, with its own text, and nothing is outdated
    assert [h["id"] for h in tops] == [rows[i]["id"] for i in PICKS]
    assert [h["text"] for h in tops] == queries and not warnings(result)
    return tmp_path, rows, queries


def test_a_corpus_changed_under_the_index_gives_the_indexed_ids_and_no_other_rows_text(indexed, runner,
                                                                                      tiny_model):
    out, rows, queries = indexed
    changed = [dict(r) for r in rows[::-1]]                       # reordered ...
    changed[5] = {**changed[5], "text": "a completely different text about chess engines"}   # ... one changed
    del changed[12]                                               # ... one deleted
    write_jsonl(out / "corpus.jsonl", changed)
    invoke(runner, ["ingest", out / "corpus.jsonl", "-o", out / "dataset", "--force"])
    invoke(runner, ["embed", out / "dataset", "-o", out / "emb", "--model", tiny_model, "--precision", "fp32",
                    "--incremental"])                             # and no re-index

    result = invoke(runner, ["search", out / "index", *queries, "-k", "3"])
    hits = hits_of(result)
    indexed_ids = {r["id"] for r in rows}
    assert [h["id"] for h in hits if h["rank"] == 1] == [rows[i]["id"] for i in PICKS]
    assert all(h["id"] in indexed_ids for h in hits)
    assert all(h["text"] is None for h in hits)                   # never another row's (or version's) text
    [warning] = warnings(result)                                  # one line: what changed, what to re-run
    assert "text_withheld" in warning and str(out / "dataset") in warning
    rerun = f"hfbatch index {out / 'emb'} -o {out / 'index'} --kind flat --incremental"
    assert rerun in warning
    qrels = write_jsonl(out / "q.jsonl", [{"query": rows[i]["text"], "relevant": [rows[i]["id"]]} for i in PICKS])
    result = invoke(runner, ["evaluate", out / "index", "--queries", qrels, "--json"])   # ranks the indexed ids
    assert json.loads(result.stdout.splitlines()[-1])["recall@1"] == 1.0

    # re-indexing as the warning says brings the text back, from the current version
    invoke(runner, rerun.split()[1:])
    tops, result = top_hits(runner, out / "index", queries)
    assert [h["id"] for h in tops] == [rows[i]["id"] for i in PICKS] and [h["text"] for h in tops] == queries
    assert not warnings(result)


def test_filter_refuses_a_dataset_that_changed_under_the_index(indexed, runner):
    out, rows, queries = indexed
    write_jsonl(out / "corpus.jsonl", rows[::-1])
    invoke(runner, ["ingest", out / "corpus.jsonl", "-o", out / "dataset", "--force"])
    result = invoke(runner, ["search", out / "index", queries[0], "--filter", "section=games"], expect=2)
    assert_one_error(result, str(out / "dataset"))


def test_embeddings_replaced_under_the_index_keep_the_indexed_ids_and_their_text(indexed, runner, tiny_model):
    out, rows, queries = indexed
    write_jsonl(out / "other.jsonl", rows[::-1])                  # the same dataset, untouched; other embeddings
    invoke(runner, ["ingest", out / "other.jsonl", "-o", out / "other"])
    invoke(runner, ["embed", out / "other", "-o", out / "emb", "--model", tiny_model, "--precision", "fp32",
                    "--force"])
    tops, result = top_hits(runner, out / "index", queries)
    assert [h["id"] for h in tops] == [rows[i]["id"] for i in PICKS]
    assert [h["text"] for h in tops] == queries                  # text by id, from the indexed dataset
    [warning] = warnings(result)
    assert "index_outdated" in warning and f"hfbatch index {out / 'emb'} -o {out / 'index'} --kind flat" in warning


def test_chunk_spans_come_from_the_index_not_from_replaced_embeddings(tmp_path, runner, tiny_model):
    rows = distinct_rows()
    build(runner, tmp_path, tiny_model, rows, "--chunk-tokens", "16")
    queries = [rows[i]["text"][:40] for i in PICKS]
    before = hits_of(invoke(runner, ["search", tmp_path / "index", *queries, "-k", "3"]))
    invoke(runner, ["embed", tmp_path / "dataset", "-o", tmp_path / "emb", "--model", tiny_model,
                    "--precision", "fp32", "--chunk-tokens", "8", "--force"])    # other windows, other rows
    after = hits_of(invoke(runner, ["search", tmp_path / "index", *queries, "-k", "3"]))
    assert [(h["id"], h["chunk"], h["span"], h["text"]) for h in after] == \
        [(h["id"], h["chunk"], h["span"], h["text"]) for h in before]


# ---- the query encoder's device and precision ------------------------------------------------------------

def test_an_index_embedded_in_fp16_on_cuda_is_searchable_on_a_cpu(tmp_path, runner, tiny_model):
    rows = distinct_rows()
    write_jsonl(tmp_path / "corpus.jsonl", rows)
    invoke(runner, ["ingest", tmp_path / "corpus.jsonl", "-o", tmp_path / "dataset"])
    invoke(runner, ["embed", tmp_path / "dataset", "-o", tmp_path / "emb", "--model", tiny_model,
                    "--precision", "fp32"])
    emb_manifest = manifest(tmp_path / "emb")                     # as a GPU without bf16 would have made it
    emb_manifest.update(precision="fp16", device="cuda", backend="torch")
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps(emb_manifest))
    invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "index"])
    assert manifest(tmp_path / "index")["embedding_settings"]["precision"] == "fp16"

    queries = [rows[i]["text"] for i in PICKS]
    for args in ([], ["--device", "cpu"], ["--device", "cpu", "--precision", "bf16"]):
        tops, _ = top_hits(runner, tmp_path / "index", queries, *args)
        assert [h["id"] for h in tops] == [rows[i]["id"] for i in PICKS], args
    qrels = write_jsonl(tmp_path / "q.jsonl", [{"query": rows[i]["text"], "relevant": [rows[i]["id"]]}
                                                for i in PICKS])
    result = invoke(runner, ["evaluate", tmp_path / "index", "--queries", qrels, "--device", "cpu", "--json"])
    assert json.loads(result.stdout.splitlines()[-1])["recall@1"] == 1.0


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_query_vectors_match_fp32_ones_within_the_models_tolerance(tmp_path, runner, tiny_model, precision):
    from hfbatch.retrieval import Searcher

    rows = distinct_rows()
    build(runner, tmp_path, tiny_model, rows)
    queries = [r["text"] for r in rows[:20]]
    exact = Searcher(tmp_path / "index", device="cpu", precision="fp32").embed(queries)
    other = Searcher(tmp_path / "index", device="cpu", precision=precision).embed(queries)
    cosine = (exact * other).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(other, axis=1))
    assert cosine.min() >= 0.999


# ---- the metric is the model's similarity ----------------------------------------------------------------

@pytest.mark.parametrize("similarity,metric", [(None, "ip"), ("cosine", "ip"), ("dot", "ip"), ("euclidean", "l2")])
def test_the_index_answers_as_brute_force_under_the_models_similarity(tmp_path, runner, tiny_model_factory,
                                                                     similarity, metric):
    from hfbatch.embedding import EncoderRun

    model = tiny_model_factory(f"plain-{similarity}", normalize=False, seed=3)
    if similarity:
        (model / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": similarity}))
    rows = distinct_rows()
    build(runner, tmp_path, model, rows)
    index_manifest = manifest(tmp_path / "index")
    assert (index_manifest["similarity"], index_manifest["metric"]) == (similarity or "cosine", metric)

    vectors = np.asarray(load(tmp_path / "emb").with_format("numpy")["embedding"])
    assert np.abs(np.linalg.norm(vectors, axis=1) - 1).max() > 0.01   # no Normalize module: not unit-length
    queries = ["a chess game", "python library for json", "fast network server", "text editor"]
    q = EncoderRun(model, precision="fp32", backend="torch")(queries)
    if (similarity or "cosine") == "cosine":
        truth = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (vectors / np.linalg.norm(vectors, axis=1,
                                                                                         keepdims=True)).T
    elif similarity == "dot":
        truth = q @ vectors.T
    else:
        truth = -np.linalg.norm(q[:, None, :] - vectors[None, :, :], axis=2)
    hits = hits_of(invoke(runner, ["search", tmp_path / "index", *queries, "-k", "1", "--mode", "dense"]))
    ids = [r["id"] for r in rows]
    assert [h["id"] for h in hits] == [ids[i] for i in truth.argmax(axis=1)]
    np.testing.assert_allclose([h["score"] for h in hits], truth.max(axis=1), rtol=1e-3, atol=1e-3)


# ---- --kind ivfpq on any dimension -----------------------------------------------------------------------

def synthetic_embeddings(path, n, dim, seed=0):

    from hfbatch.dataset import value_feature
    from hfbatch.embedding import embeddings_features, embeddings_table
    from hfbatch.runner import Job

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    vectors = centres[rng.integers(0, 40, n)] + 0.6 * rng.normal(size=(n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    with Job("embed", path, config={"synthetic": True}, force=True) as job:
        job.shards.write_shard(0, embeddings_table(list(range(n)), vectors, dim))
        job.publish_dataset(1, embeddings_features(value_feature("int64"), dim), extra={"dim": dim})
    return vectors


@pytest.mark.parametrize("dim,codes", [(33, "PQ11x4fs"), (31, "PQ31x4fs")])   # odd; prime: 1 dim per code
def test_ivfpq_picks_sub_quantizers_that_divide_any_dimension(tmp_path, runner, dim, codes):
    synthetic_embeddings(tmp_path / "emb", 2000, dim)
    invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "index", "--kind", "ivfpq", "--target-recall", "0.9"])
    index_manifest = manifest(tmp_path / "index")
    assert codes in index_manifest["factory"] and index_manifest["recall_at_10"] >= 0.9


def test_incremental_over_a_damaged_index_rebuilds_it(tmp_path, runner):
    synthetic_embeddings(tmp_path / "emb", 500, 16)
    invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "index", "--kind", "flat"])
    (tmp_path / "index" / "index.faiss").write_bytes(b"\x00garbage" * 100)
    synthetic_embeddings(tmp_path / "emb", 520, 16, seed=1)
    result = invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "index", "--kind", "flat", "--incremental"])
    assert "rebuilding" in result.stderr and manifest(tmp_path / "index")["count"] == 520


# ---- bad inputs: one clear error, exit 2, nothing written ------------------------------------------------

def assert_one_error(result, names):
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert names in errors[0], errors[0]
    assert "Traceback" not in result.output and "internal error" not in result.output


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_model):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("small")
    build(CliRunner(), out, tiny_model, distinct_rows()[:20])
    return out


def garbage(path):
    path.write_bytes(b"\xff\xfe not a file of this kind \x00" * 64)


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "index.faiss missing": ("index.faiss", lambda p: p.unlink()),
    "index.faiss garbage": ("index.faiss", garbage),
    "index.faiss truncated": ("index.faiss", truncated),
    "rows.parquet missing": ("rows.parquet", lambda p: p.unlink()),
    "rows.parquet garbage": ("rows.parquet", garbage),
    "rows.parquet truncated": ("rows.parquet", truncated),
}


@pytest.mark.parametrize("job", ["search", "search -o", "evaluate"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_index_is_one_error_naming_the_file(small_index, tmp_path, runner, job, damage):
    index = tmp_path / "index"
    shutil.copytree(small_index / "index", index)
    name, spoil = DAMAGE[damage]
    spoil(index / name)
    qrels = write_jsonl(tmp_path / "q.jsonl", [{"query": "chess", "relevant": [1]}])
    args = {"search": ["search", index, "chess"],
            "search -o": ["search", index, "chess", "-o", tmp_path / "hits"],
            "evaluate": ["evaluate", index, "--queries", qrels]}[job]
    result = invoke(runner, args, expect=2)
    assert_one_error(result, str(index / name))
    assert not list(tmp_path.glob("hits*"))                       # nothing written, not even a .partial


@pytest.mark.parametrize("how", ["utf8", "offsets"])
def test_a_source_dataset_damaged_in_place_is_one_error_when_its_text_is_read(small_index, tmp_path, runner, how):
    """Search validates only what it reads of the source dataset (a filter's column, the hits' rows): a
    same-size data file whose text bytes changed gave UnicodeDecodeError or a crash."""
    from test_bad_inputs import damage_in_place

    root = tmp_path / "copy"
    shutil.copytree(small_index, root, symlinks=True)
    index = root / "index"
    source = Path(manifest(index)["source_dataset"])
    assert source == small_index / "dataset"
    relocated = {**manifest(index), "source_dataset": str(root / "dataset")}
    (index / "manifest.json").write_text(json.dumps(relocated))
    hits_before = hits_of(invoke(runner, ["search", index, "chess", "-k", "20"]))
    assert all(h["text"] for h in hits_before)
    damage_in_place(root / "dataset", how)
    result = invoke(runner, ["search", index, "chess", "-k", "20"], expect=2)
    assert_one_error(result, f"dataset {root / 'dataset'} is damaged")


@pytest.mark.parametrize("job", ["search", "evaluate"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_a_queries_file_that_is_not_utf8_is_one_error_naming_it(small_index, tmp_path, runner, job, suffix):
    queries = tmp_path / f"q{suffix}"
    text = {".txt": "chess\ncaf\xe9\n", ".csv": "query\nchess\ncaf\xe9\n",
            ".jsonl": '{"query": "chess", "relevant": [1]}\n{"query": "caf\xe9", "relevant": [1]}\n'}[suffix]
    queries.write_bytes(text.encode("latin-1"))                  # é as one byte: not UTF-8
    result = invoke(runner, [job, small_index / "index", "--queries", queries], expect=2)
    assert_one_error(result, str(queries))
    assert "UTF-8" in result.output


@pytest.mark.parametrize("job", ["search", "evaluate"])
@pytest.mark.parametrize("option", [["--nprobe", "4"], ["--ef", "32"]])
def test_a_search_knob_the_index_lacks_is_one_error_naming_the_option(small_index, tmp_path, runner, job, option):
    qrels = write_jsonl(tmp_path / "q.jsonl", [{"query": "chess", "relevant": [1]}])
    args = ["search", small_index / "index", "chess"] if job == "search" else \
        ["evaluate", small_index / "index", "--queries", qrels]
    result = invoke(runner, [*args, *option], expect=2)               # a flat index has neither knob
    assert_one_error(result, option[0])


def test_a_csv_queries_file_with_a_byte_order_mark_is_read(small_index, tmp_path, runner):
    queries = tmp_path / "q.csv"
    queries.write_bytes("query\nchess game\n".encode("utf-8-sig"))       # as spreadsheets save CSV
    hits = hits_of(invoke(runner, ["search", small_index / "index", "--queries", queries, "-k", "2"]))
    assert [h["query"] for h in hits] == ["chess game"] * 2
