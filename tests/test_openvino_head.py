"""A classifier under bf16 keeps its head in f32: the graph is cut at its last LayerNorm into two models."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")

import hfbatch.openvino_backend as ob  # noqa: E402

IDS = np.array([[2, 7, 8, 9, 3, 0, 0], [2, 10, 3, 0, 0, 0, 0], [2, 11, 12, 13, 14, 15, 3]], dtype=np.int64)
MASK = (IDS > 0).astype(np.int64)


@pytest.fixture(scope="module")
def classifier(tiny_model_factory):
    return tiny_model_factory("tiny-cls-head", pooling=None, num_labels=5)


def test_split_is_the_same_function(classifier, tmp_path):
    """Both halves in f32 give the whole graph's logits."""
    xml, _ = ob.get_ir(classifier, task="classify", cache_dir=tmp_path)
    split = ob.split_head(xml)
    assert split is not None
    body, head, head_inputs = split
    feed = {"input_ids": IDS, "attention_mask": MASK, "token_type_ids": np.zeros_like(IDS)}
    feed = {k: v for k, v in feed.items() if k in ob.read_meta(xml)["inputs"]}
    expected = ob.infer_f32(str(xml), feed)
    hidden = ob.infer_f32(body, feed)
    assert hidden.shape[:2] == (3, 1)  # [B, 1, H]: the first token's normalised hidden state
    logits = ob.infer_f32(head, {ob.HEAD_INPUT: hidden, **{n: feed[n] for n in head_inputs}})
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not ob.cpu_has_bf16(), reason="the CPU has no native bf16: everything runs in f32")
def test_bf16_classifier_runs_its_head_in_f32(classifier, tmp_path):
    enc = ob.OpenVINOEncoder(classifier, task="classify", precision="bf16", cache_dir=tmp_path)
    assert enc._head is not None

    def precisions(compiled):
        infos = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
        return {i["runtimePrecision"].astype(str) for i in infos if i["layerType"].astype(str) == "FullyConnected"}

    assert precisions(enc._head) == {"f32"}  # pooler and classifier
    assert precisions(enc.compiled) == {"bf16"}  # the encoder itself still runs in bf16
    exact = ob.OpenVINOEncoder(classifier, task="classify", precision="fp32", cache_dir=tmp_path)
    assert enc.run(IDS, MASK).shape == exact.run(IDS, MASK).shape == (3, 5)
    assert enc.dim == 5


@pytest.mark.skipif(not ob.cpu_has_bf16(), reason="the CPU has no native bf16: everything runs in f32")
@pytest.mark.parametrize("rows", [3, 17])
def test_the_f32_head_runs_on_padded_rows_and_gives_each_row_its_own_logits(classifier, tmp_path, rows):
    """The head sees batches padded to a multiple of HEAD_ROWS (few shapes for the plugin to set up), and
    every real row's logits are those of the head run on the unpadded batch."""
    enc = ob.OpenVINOEncoder(classifier, task="classify", precision="bf16", cache_dir=tmp_path)
    ids, mask = np.resize(IDS, (rows, IDS.shape[1])), np.resize(MASK, (rows, IDS.shape[1]))
    logits = enc.run(ids, mask)
    assert enc._head_request.get_input_tensor(0).shape[0] == -(-rows // ob.HEAD_ROWS) * ob.HEAD_ROWS
    hidden = np.array(enc.compiled.create_infer_request().infer(enc._inputs(ids, mask))[0])
    unpadded = np.array(enc._head.create_infer_request().infer({ob.HEAD_INPUT: hidden})[0])
    assert logits.shape == (rows, 5)
    np.testing.assert_allclose(logits, unpadded, rtol=1e-6, atol=1e-7)
    # and the same rows in another batch size give the same logits
    np.testing.assert_allclose(enc.run(ids[:2], mask[:2]), logits[:2], rtol=1e-6, atol=1e-7)


def test_classifier_last_layer_computes_the_first_token_only(classifier, tmp_path):
    """The cached graph's last layer runs on the first token, and gives the whole graph's logits."""
    xml, _ = ob.get_ir(classifier, task="classify", cache_dir=tmp_path)
    assert ob.read_meta(xml)["last_layer"] == "first token"
    whole = ob.convert(classifier, task="classify")  # every token through every layer
    feed = {"input_ids": IDS, "attention_mask": MASK, "token_type_ids": np.zeros_like(IDS)}
    expected = ob.infer_f32(whole, feed)
    narrowed = ob.infer_f32(str(xml), feed)
    np.testing.assert_allclose(narrowed, expected, rtol=1e-5, atol=1e-6)


def test_only_a_head_reading_the_first_token_narrows_the_last_layer(tiny_model):
    """CLS pooling reads the first token only: the narrowed graph is the same function. The same graph
    pooling the second token instead has the same structure, but the narrowed one is another function, and
    same_function says so. Mean pooling also reads the mask after the last attention: not narrowed at all."""
    import openvino.opset13 as ops

    cls = ob.convert(tiny_model, task="embed", pooling="cls", normalize=True)
    inputs = [p.get_friendly_name() for p in cls.get_parameters()]
    assert ob.same_function(cls, ob.first_token_last_layer(cls), inputs)
    second = cls.clone()
    gather = next(n for n in reversed(second.get_ordered_ops()) if n.get_type_name() == "Gather")
    gather.input(1).replace_source_output(ops.constant(np.array(1, dtype=np.int64)).output(0))
    candidate = ob.first_token_last_layer(second)
    assert candidate is not None and ob.same_function(second, second.clone(), inputs)
    assert not ob.same_function(second, candidate, inputs)
    assert ob.first_token_last_layer(ob.convert(tiny_model, task="embed", pooling="mean")) is None


def test_a_graph_without_attention_is_not_narrowed():
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter(ov.PartialShape([-1, -1, 4]), ov.Type.f32, name="x")
    assert ob.first_token_last_layer(ov.Model([ops.result(ops.relu(x))], [x], "plain")) is None


def test_an_error_while_narrowing_keeps_the_whole_graph(classifier, tmp_path, monkeypatch):
    """Narrowing is only a speed-up: an OpenVINO error in it converts the model all the same, unnarrowed."""
    def broken(model):
        raise RuntimeError("shape inference failed (test)")
    monkeypatch.setattr(ob, "first_token_last_layer", broken)
    xml, hit = ob.get_ir(classifier, task="classify", cache_dir=tmp_path)
    assert not hit and ob.read_meta(xml)["last_layer"] == "all tokens"
    logits = ob.OpenVINOEncoder(classifier, task="classify", precision="fp32", cache_dir=tmp_path).run(IDS, MASK)
    assert logits.shape == (3, 5) and np.isfinite(logits).all()


def _tiny_classifier(kind: str, directory):
    import torch
    import transformers

    sizes = dict(vocab_size=120, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, num_labels=3, num_hidden_layers=2)
    configs = {
        "roberta": lambda: transformers.RobertaConfig(pad_token_id=1, **sizes),
        "distilbert": lambda: transformers.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4,
                                                            hidden_dim=64, max_position_embeddings=64, num_labels=3),
        "deberta-v2": lambda: transformers.DebertaV2Config(**sizes),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(configs[kind]()).eval()
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("kind, last_layer", [("roberta", "first token"), ("distilbert", "first token"),
                                              ("deberta-v2", "all tokens")])
def test_other_architectures_narrow_where_their_head_reads_the_first_token(kind, last_layer, tmp_path):
    """RoBERTa's and DistilBERT's heads read the first token: narrowed. DeBERTa-v2 has no fused attention
    op to narrow: whole. Either way the logits are torch's."""
    import torch

    model = _tiny_classifier(kind, tmp_path / kind)
    xml, _ = ob.get_ir(tmp_path / kind, task="classify", cache_dir=tmp_path / "cache")
    assert ob.read_meta(xml)["last_layer"] == last_layer
    got = ob.OpenVINOEncoder(tmp_path / kind, task="classify", precision="fp32", cache_dir=tmp_path / "cache").run(
        IDS, MASK)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
