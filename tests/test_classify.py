"""hfbatch classify equals transformers' text-classification pipeline on the same model (fp32), for single
texts, sentence pairs, top-k and multi-label; and refuses what it cannot classify, in one line."""

import json

import numpy as np
import pytest
from conftest import invoke, load, sample_rows, write_jsonl

N_LABELS = 3
N_ROWS = 150  # of the sample corpus: enough for every label to win somewhere, quick for the pipeline


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from conftest import make_tiny_model

    # initializer_range 0.5: a random head whose logits differ clearly from row to row, so that the test
    # compares real decisions, not near-ties of a uniform softmax
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-cls", num_labels=N_LABELS, pooling=None,
                           initializer_range=0.5, seed=11)


@pytest.fixture(scope="module")
def sample_ds(tmp_path_factory):
    from click.testing import CliRunner

    work = tmp_path_factory.mktemp("classify")
    invoke(CliRunner(), ["ingest", write_jsonl(work / "rows.jsonl", sample_rows(N_ROWS)), "-o", work / "ds"])
    return work / "ds"


def pipeline_scores(model_dir, inputs, **kwargs):
    """[rows, labels] scores from transformers.pipeline, columns in label-id order."""
    import torch
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(model_dir), device=-1, dtype=torch.float32)
    results = pipe(inputs, truncation=True, top_k=None, **kwargs)
    label2id = pipe.model.config.label2id
    scores = np.zeros((len(inputs), len(label2id)), dtype=np.float64)
    for r, result in enumerate(results):
        for item in result:
            scores[r, label2id[item["label"]]] = item["score"]
    return scores


def top_label_names(model_dir, scores):
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(str(model_dir)).id2label
    return [id2label[i] for i in scores.argmax(axis=1)]


def test_fp32_equals_the_pipeline_label_score_and_top_k(runner, tmp_path, classifier, sample_ds):
    invoke(runner, ["classify", sample_ds, "-o", tmp_path / "labels", "--model", classifier, "--precision", "fp32",
                    "--backend", "torch", "--top-k", "2", "--batch-tokens", "700", "--shard-rows", "60"])
    ours = load(tmp_path / "labels")
    assert ours.column_names == ["id", "label", "score", "top_labels", "top_scores"]
    theirs = pipeline_scores(classifier, [r["text"] for r in sample_rows(N_ROWS)])
    expected = top_label_names(classifier, theirs)
    assert list(ours["id"]) == [r["id"] for r in sample_rows(N_ROWS)]  # input order, across shards
    assert list(ours["label"]) == expected  # the same top label on every row
    assert len(set(expected)) == N_LABELS  # and the rows really disagree: not one label everywhere
    np.testing.assert_allclose(ours["score"], theirs.max(axis=1), atol=1e-4)
    order = np.argsort(-theirs, axis=1)[:, :2]
    np.testing.assert_allclose(np.asarray(ours["top_scores"]), np.take_along_axis(theirs, order, 1), atol=1e-4)
    assert [row[0] for row in ours["top_labels"]] == expected
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    assert manifest["labels"] == ["label_0", "label_1", "label_2"] and manifest["scores"] == "softmax"


def test_sentence_pairs_use_token_type_ids_like_the_pipeline(runner, tmp_path, classifier):
    rows = sample_rows(60)
    write_jsonl(tmp_path / "pairs.jsonl", [{"id": i, "text": a["text"][:150], "other": b["text"][:150]}
                                           for i, (a, b) in enumerate(zip(rows, rows[1:] + rows[:1]))])
    invoke(runner, ["ingest", tmp_path / "pairs.jsonl", "-o", tmp_path / "ds"])
    invoke(runner, ["classify", tmp_path / "ds", "-o", tmp_path / "labels", "--model", classifier,
                    "--text-pair-column", "other", "--precision", "fp32", "--backend", "torch"])
    ours = load(tmp_path / "labels")
    pairs = [{"text": r["text"], "text_pair": r["other"]} for r in load(tmp_path / "ds")]
    theirs = pipeline_scores(classifier, pairs)
    assert list(ours["label"]) == top_label_names(classifier, theirs)
    np.testing.assert_allclose(ours["score"], theirs.max(axis=1), atol=1e-4)
    # the second text is really read as segment B: swapping the two gives other scores
    swapped = pipeline_scores(classifier, [{"text": p["text_pair"], "text_pair": p["text"]} for p in pairs])
    assert np.abs(swapped - theirs).max() > 1e-3


def test_multi_label_scores_are_sigmoids_like_the_pipeline(runner, tmp_path, tiny_model_factory, sample_ds):
    model = tiny_model_factory("tiny-multi", num_labels=N_LABELS, pooling=None, initializer_range=0.5, seed=4,
                               problem_type="multi_label_classification")
    # the config's problem_type is enough: no --multi-label needed
    invoke(runner, ["classify", sample_ds, "-o", tmp_path / "labels", "--model", model, "--precision", "fp32",
                    "--top-k", "3"])
    ours = load(tmp_path / "labels")
    theirs = pipeline_scores(model, [r["text"] for r in sample_rows(N_ROWS)], function_to_apply="sigmoid")
    np.testing.assert_allclose(np.asarray(ours["top_scores"]), -np.sort(-theirs, axis=1), atol=1e-4)
    assert np.asarray(ours["top_scores"]).sum(axis=1).max() > 1.01  # not a softmax
    assert json.loads((tmp_path / "labels" / "manifest.json").read_text())["scores"] == "sigmoid"


def test_rerun_is_up_to_date_and_top_k_is_capped_at_the_label_count(runner, tmp_path, classifier, sample_ds):
    args = ["classify", sample_ds, "-o", tmp_path / "labels", "--model", classifier, "--top-k", "10", "--json"]
    first = json.loads(invoke(runner, args).stdout.splitlines()[-1])
    assert first["status"] == "ok" and first["rows"] == N_ROWS
    assert load(tmp_path / "labels").features["top_labels"].length == N_LABELS
    again = json.loads(invoke(runner, args).stdout.splitlines()[-1])
    assert again["status"] == "up_to_date"


def test_a_bare_encoder_is_refused_not_given_a_random_head(runner, tmp_path, tiny_model, sample_ds):
    result = invoke(runner, ["classify", sample_ds, "-o", tmp_path / "labels", "--model", tiny_model], expect=2)
    assert "no sequence-classification head" in result.output and "BertModel" in result.output
    assert "hfbatch train" in result.output and not (tmp_path / "labels").exists()


def test_missing_model_and_missing_pair_column_are_one_line_errors(runner, tmp_path, classifier, sample_ds):
    result = invoke(runner, ["classify", sample_ds, "-o", tmp_path / "labels"], expect=2)
    assert "--model" in result.output
    result = invoke(runner, ["classify", sample_ds, "-o", tmp_path / "labels", "--model", classifier,
                             "--text-pair-column", "hypothesis"], expect=2)
    assert "'hypothesis'" in result.output and "--text-pair-column" in result.output and "text" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "labels").exists()
