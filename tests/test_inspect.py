"""hfbatch inspect: what a model directory holds, without loading it; what is missing, by name."""

import json

import pytest
from conftest import invoke


def test_a_classifier_shows_head_labels_parameters_and_tokenizer(runner, tiny_model_factory):
    from transformers import AutoModelForSequenceClassification

    model = tiny_model_factory("inspect-cls", num_labels=3, pooling=None)
    info = json.loads(invoke(runner, ["inspect", model, "--json"]).stdout)
    assert info["architecture"] == "BertForSequenceClassification" and info["task_head"] == "sequence classification"
    assert info["labels"] == ["label_0", "label_1", "label_2"] and info["scores"] == "softmax"
    expected = AutoModelForSequenceClassification.from_pretrained(str(model)).num_parameters()
    assert info["parameters"]["count"] == expected and info["parameters"]["dtypes"] == ["F32"]
    assert info["tokenizer"]["fast"] and info["tokenizer"]["vocab_size"] > 0
    assert info["max_length"] == 128 and info["use_with"] == ["classify"]
    text = invoke(runner, ["inspect", model]).output
    assert "sequence classification, 3 labels" in text and "0 label_0, 1 label_1, 2 label_2" in text
    assert f"{expected:,}" in text


def test_an_encoder_shows_its_pooling_and_the_jobs_that_use_it(runner, tiny_model):
    info = json.loads(invoke(runner, ["inspect", tiny_model, "--json"]).stdout)
    assert info["task_head"].startswith("none") and "labels" not in info
    assert info["pooling"] == {"mode": "mean", "normalize": True, "source": "modules.json"}
    assert "embed" in info["use_with"]


def test_parameters_are_counted_from_the_headers_of_sharded_weights(runner, tmp_path, tiny_model_factory):
    from transformers import AutoModel

    model = tiny_model_factory("inspect-sharded", pooling=None)
    loaded = AutoModel.from_pretrained(str(model))
    (model / "model.safetensors").unlink()
    loaded.save_pretrained(str(model), max_shard_size="20KB")
    assert (model / "model.safetensors.index.json").exists()
    info = json.loads(invoke(runner, ["inspect", model, "--json"]).stdout)
    assert info["parameters"]["count"] == loaded.num_parameters() and len(info["parameters"]["files"]) > 1


@pytest.mark.parametrize("remove,named", [("config.json", "config.json"), ("model.safetensors", "weights"),
                                          ("tokenizer.json", "tokenizer files")])
def test_a_missing_part_is_named(runner, tmp_path, tiny_model_factory, remove, named):
    model = tiny_model_factory(f"inspect-missing-{remove}", pooling=None)
    (model / remove).unlink()
    if remove == "tokenizer.json":
        (model / "vocab.txt").unlink(missing_ok=True)
    result = invoke(runner, ["inspect", model], expect=2)
    assert named in result.output and "incomplete" in result.output and "Traceback" not in result.output


def test_a_missing_directory_is_one_line(runner, tmp_path):
    result = invoke(runner, ["inspect", tmp_path / "nope"], expect=2)
    assert "does not exist" in result.output
