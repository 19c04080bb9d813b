"""hfbatch train: a complete, loadable model directory with its card; classify reads it; a SIGKILLed run
resumes from its last checkpoint; the split and the metrics are what they claim."""

import json
import random
import signal
import subprocess

import numpy as np
import pytest
from conftest import HFBATCH, WORDS, hfbatch_killed_after_step, invoke, write_jsonl

from hfbatch.runner import OutputPaths

TOPICS = {"games": ["chess", "game"], "net": ["network", "server"], "code": ["python", "library", "json", "parser"]}
TRAIN_ARGS = ["--label-column", "topic", "--batch-size", "8", "--lr", "3e-3", "--max-length", "32"]


def topic_rows(n=90, seed=0):
    """Short texts whose label is told by a few keywords among filler words: learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        words = [rng.choice(TOPICS[label]) for _ in range(4)] + [rng.choice(WORDS[:10]) for _ in range(6)]
        rng.shuffle(words)
        rows.append({"id": i, "text": " ".join(words), "topic": label})
    return rows


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    from click.testing import CliRunner

    work = tmp_path_factory.mktemp("train")
    invoke(CliRunner(), ["ingest", write_jsonl(work / "rows.jsonl", topic_rows()), "-o", work / "ds"])
    return work / "ds"


@pytest.fixture(scope="module")
def base_model(tiny_model):
    return tiny_model  # an ST-style encoder, like MiniLM


@pytest.fixture(scope="module")
def trained(tmp_path_factory, labelled, base_model):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("trained") / "topic-model"
    result = invoke(CliRunner(), ["train", labelled, "-o", out, "--base-model", base_model, "--epochs", "4",
                                  "--save-steps", "5", "--json", *TRAIN_ARGS])
    return out, json.loads(result.stdout.splitlines()[-1])


def test_model_directory_is_complete_and_loadable(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, summary = trained
    assert summary["status"] == "ok" and summary["train_rows"] == 81 and summary["eval_rows"] == 9
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json",
            "README.md", "manifest.json"} <= names
    assert not any(name.endswith(".bin") for name in names)
    assert not OutputPaths(out).partial.exists()  # checkpoints are gone once published
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "code", "1": "games", "2": "net"}
    assert config["label2id"] == {"code": 0, "games": 1, "net": 2}
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert model.config.num_labels == 3 and AutoTokenizer.from_pretrained(str(out)).model_max_length == 32
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3, 4]
    assert set(metrics["per_label"]) == {"code", "games", "net"}
    assert metrics["eval"]["accuracy"] == max(row["accuracy"] for row in metrics["history"]
                                              if row["macro_f1"] == max(r["macro_f1"] for r in metrics["history"]))


def test_model_card_has_every_section(trained):
    out, summary = trained
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification\n")
    for section in ("## Intended uses", "## Limitations", "## Training data", "## Training procedure",
                    "## Evaluation results"):
        assert section in card
    assert "| games | 27 | 3 | 33.3% |" in card  # the label distribution, train and eval
    assert "| learning rate | 0.003" in card and "| max length | 32 tokens |" in card
    assert f"accuracy {summary['accuracy']:.4f}" in card


def test_classify_and_inspect_read_the_trained_model(trained, labelled, tmp_path, runner):
    import datasets

    out, _ = trained
    invoke(runner, ["classify", labelled, "-o", tmp_path / "labels", "--model", out, "--precision", "fp32"])
    predicted = datasets.load_from_disk(str(tmp_path / "labels"))
    truth = datasets.load_from_disk(str(labelled))["topic"]
    accuracy = np.mean([a == b for a, b in zip(predicted["label"], truth)])
    assert accuracy >= 0.6, accuracy  # it learned the keywords (chance: 0.33)
    text = invoke(runner, ["inspect", out]).output
    assert "BertForSequenceClassification" in text and "0 code, 1 games, 2 net" in text
    assert "hfbatch classify" in text and "eval:" in text


def test_a_rerun_is_a_noop_and_a_changed_option_is_refused(trained, labelled, base_model, runner):
    out, summary = trained
    args = ["train", labelled, "-o", out, "--base-model", base_model, "--epochs", "4", "--json", *TRAIN_ARGS]
    again = json.loads(invoke(runner, args).stdout.splitlines()[-1])
    assert again["status"] == "up_to_date" and again["accuracy"] == summary["accuracy"]
    result = invoke(runner, [*args[:-len(TRAIN_ARGS)], *TRAIN_ARGS[:-1], "64"], expect=2)
    assert "max_length: 32 -> 64" in result.output and "--force" in result.output


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(tmp_path, labelled, base_model):
    out = tmp_path / "model"
    args = ["train", str(labelled), "-o", str(out), "--base-model", str(base_model), "--epochs", "3",
            "--save-steps", "2", *TRAIN_ARGS]
    checkpoints = OutputPaths(out).partial / "checkpoints"
    # killed in epoch 2 (11 steps an epoch), after step 15: checkpoint-14 is the last one written
    killed = subprocess.run(hfbatch_killed_after_step(15) + args, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (checkpoints / "checkpoint-14" / "trainer_state.json").exists()
    assert not out.exists()  # nothing half-published
    done = subprocess.run(HFBATCH + args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "msg=resuming checkpoint=checkpoint-14" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 14
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]  # the epochs before the kill are kept
    assert metrics["history"][-1]["step"] == 33  # 81 rows / 8 per batch = 11 steps an epoch
    assert not checkpoints.exists()


def test_labels_that_cannot_be_trained_are_refused(runner, tmp_path, base_model):
    rows = [{"text": f"text {i}", "kind": "a" if i else "b", "same": "x"} for i in range(6)]
    invoke(runner, ["ingest", write_jsonl(tmp_path / "rows.jsonl", rows), "-o", tmp_path / "ds"])
    common = ["train", tmp_path / "ds", "-o", tmp_path / "m", "--base-model", base_model]
    result = invoke(runner, [*common, "--label-column", "topic"], expect=2)
    assert "'topic'" in result.output and "kind" in result.output and "--label-column" in result.output
    assert "at least 2" in invoke(runner, [*common, "--label-column", "same"], expect=2).output
    assert "'b'" in invoke(runner, [*common, "--label-column", "kind"], expect=2).output
    assert not (tmp_path / "m").exists()


# ---- the pieces ----------------------------------------------------------------------------------------

def test_stratified_split_keeps_each_labels_share():
    from hfbatch.training import stratified_split

    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    train, evals = stratified_split(labels, 0.1, seed=1)
    assert sorted(np.concatenate([train, evals]).tolist()) == list(range(100))
    assert np.bincount(labels[evals]).tolist() == [5, 3, 2]
    again, _ = stratified_split(labels, 0.1, seed=1)
    assert (again == train).all() and not (stratified_split(labels, 0.1, seed=2)[0] == train).all()
    tiny_train, tiny_eval = stratified_split(np.array([0, 0, 1, 1, 1]), 0.1, seed=0)
    assert len(tiny_eval) == 2 and set(np.array([0, 0, 1, 1, 1])[tiny_train]) == {0, 1}


def test_metrics_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from hfbatch.training import classification_metrics

    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    ours = classification_metrics(predictions, labels, 5)
    assert ours["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, predictions))
    assert ours["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(labels, predictions, average="macro"))


def test_a_checkpoint_cut_mid_save_is_skipped(tmp_path):
    from hfbatch.training import last_complete_checkpoint

    for step, complete in ((10, True), (20, True), (30, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-20"
    assert not (tmp_path / "checkpoint-30").exists()
    assert last_complete_checkpoint(tmp_path / "none") is None
