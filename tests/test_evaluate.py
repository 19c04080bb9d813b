"""Retrieval metrics on a hand-checked toy example, and `hfbatch evaluate` end to end on a tiny model."""

import json

import pytest
from conftest import invoke


def test_metrics_on_a_hand_checked_example():
    from hfbatch.metrics import evaluate, mrr_at_k, ndcg_at_k, recall_at_k

    ranked, relevant = ["a", "b", "c", "d", "e"], {"b", "d", "z"}   # hits at ranks 2 and 4; z never found
    assert recall_at_k(ranked, relevant, 1) == 0.0
    assert recall_at_k(ranked, relevant, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, relevant, 10) == pytest.approx(2 / 3)
    assert mrr_at_k(ranked, relevant, 1) == 0.0
    assert mrr_at_k(ranked, relevant, 10) == 0.5                      # first hit at rank 2
    # DCG@5 = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068 = 1.06161
    # IDCG@5 (3 relevant at ranks 1-3) = 1 + 0.63093 + 0.5 = 2.13093
    assert ndcg_at_k(ranked, relevant, 5) == pytest.approx(1.06161 / 2.13093, abs=1e-5)   # 0.49819
    # DCG@3 = 1/log2(3) (only b); IDCG@3 is the same 2.13093
    assert ndcg_at_k(ranked, relevant, 3) == pytest.approx(0.63093 / 2.13093, abs=1e-5)
    assert ndcg_at_k(["x", "y"], {"x"}, 10) == 1.0

    scores = evaluate([(ranked, relevant), (["x", "y"], {"x"}), (["q"], set())])   # the last: no relevant ids
    assert scores["queries"] == 2
    assert scores["recall@1"] == pytest.approx((0 + 1) / 2)
    assert scores["recall@10"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["recall@100"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["mrr@10"] == pytest.approx((0.5 + 1) / 2)
    assert scores["ndcg@10"] == pytest.approx((0.49819 + 1) / 2, abs=1e-5)


def test_mrr_beyond_the_cutoff_is_zero_and_ndcg_ignores_duplicates():
    from hfbatch.metrics import mrr_at_k, ndcg_at_k

    assert mrr_at_k(list("abcdefghijk"), {"k"}, 10) == 0.0          # rank 11
    assert ndcg_at_k(["a", "a"], {"a", "b"}, 2) == pytest.approx(1 / (1 + 1 / 1.5849625), abs=1e-6)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_model):
    from click.testing import CliRunner

    runner = CliRunner()
    out = tmp_path_factory.mktemp("evaluate")
    (out / "docs.csv").write_text("name,text\na,first document about chess\nb,second one about networks\n"
                                  "c,third about python parsers\n")
    invoke(runner, ["ingest", out / "docs.csv", "-o", out / "ds"])
    invoke(runner, ["embed", out / "ds", "-o", out / "emb", "--model", tiny_model, "--precision", "fp32"])
    invoke(runner, ["index", out / "emb", "-o", out / "idx"])
    return out


def test_evaluate_reports_the_metrics_as_a_table_and_as_json(small_index, runner, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in [
        {"query": "first document about chess", "relevant": ["docs.csv:1"]},
        {"query": "second one about networks", "relevant": ["docs.csv:2"]},
        {"query": "third about python parsers", "relevant": ["docs.csv:3"]},
        {"query": "something else", "relevant": ["no-such-id"]}]))         # never found: 0 everywhere
    data = json.loads(invoke(runner, ["evaluate", small_index / "idx", "--queries", queries, "--json"]).stdout)
    assert data["job"] == "evaluate" and data["status"] == "ok" and data["queries"] == 4
    assert data["unknown_relevant"] == 1 and data["k"] == 100
    for name in ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"):
        assert data[name] == pytest.approx(0.75)
    table = invoke(runner, ["evaluate", small_index / "idx", "--queries", queries, "-k", "10"]).stdout
    assert "recall@10" in table and "0.7500" in table and "recall@100" not in table


def test_evaluate_needs_relevant_ids(small_index, runner, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query": "chess"}) + "\n")
    result = invoke(runner, ["evaluate", small_index / "idx", "--queries", queries], expect=2)
    assert "relevant" in result.output and "q.jsonl:1" in result.output and "Traceback" not in result.output
