"""OpenVINO backend on a tiny random BERT: exactness against torch, padding invariance, the IR cache."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("openvino")
transformers = pytest.importorskip("transformers")

import hfbatch.openvino_backend as ob  # noqa: E402
from hfbatch.openvino_backend import OpenVINOEncoder, cache_key, cpu_has_bf16, get_ir  # noqa: E402

WORDS = [f"w{i}" for i in range(200)] + ["debian", "package", "library", "tool", "the", "a", "for", "of"]


def _write_tiny_model(d, *, classify: bool = False) -> None:
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=3)
    model = (BertForSequenceClassification if classify else BertModel)(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(d)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-bert")
    _write_tiny_model(d)
    return d


@pytest.fixture(scope="module")
def cls_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-bert-cls")
    _write_tiny_model(d, classify=True)
    return d


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ov-cache")


def _batch(model_dir, texts, pad_to=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    kw = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": True}
    b = tok(texts, truncation=True, return_tensors="np", **kw)
    return b["input_ids"].astype(np.int64), b["attention_mask"].astype(np.int64), b["token_type_ids"].astype(np.int64)


TEXTS = ["debian package", "a tool for the library of w1 w2 w3 w4 w5 w6 w7", "w9", "the w10 w11 w12 package tool"]


def _torch_pooled(model_dir, ids, mask, pooling, normalize):
    from transformers import AutoModel

    m = AutoModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        h = m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    mk = torch.from_numpy(mask).unsqueeze(-1).float()
    if pooling == "mean":
        e = (h * mk).sum(1) / mk.sum(1).clamp(min=1e-9)
    elif pooling == "cls":
        e = h[:, 0]
    elif pooling == "max":
        e = h.masked_fill(mk == 0, -1e9).max(1).values
    else:
        e = h
    if normalize:
        e = torch.nn.functional.normalize(e, p=2, dim=-1)
    return e.numpy()


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", True)])
def test_fp32_matches_torch(model_dir, cache_dir, pooling, normalize):
    ids, mask, tt = _batch(model_dir, TEXTS)
    enc = OpenVINOEncoder(model_dir, pooling=pooling, normalize=normalize, precision="fp32", cache_dir=cache_dir)
    out = enc.run(ids, mask, tt)
    ref = _torch_pooled(model_dir, ids, mask, pooling, normalize)
    assert out.dtype == np.float32 and out.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert _cos(out, ref).min() >= 0.99999
    assert enc.dim == 32


def test_no_pooling_returns_last_hidden_state(model_dir, cache_dir):
    ids, mask, tt = _batch(model_dir, TEXTS)
    enc = OpenVINOEncoder(model_dir, pooling=None, precision="fp32", cache_dir=cache_dir)
    out = enc.run(ids, mask)  # token_type_ids omitted: zeros
    ref = _torch_pooled(model_dir, ids, mask, None, False)
    assert out.shape == ref.shape == (len(TEXTS), ids.shape[1], 32)
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=1e-4)


def test_padding_invariance(model_dir, cache_dir):
    enc = OpenVINOEncoder(model_dir, pooling="mean", normalize=True, precision="fp32", cache_dir=cache_dir)
    alone = enc.run(*_batch(model_dir, TEXTS[:1]))  # no padding at all
    tight = enc.run(*_batch(model_dir, TEXTS))  # padded to the longest row
    wide = enc.run(*_batch(model_dir, TEXTS, pad_to=40))  # lots of padding
    np.testing.assert_allclose(tight[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(wide, tight, atol=1e-5)
    # a row does not depend on its neighbours
    np.testing.assert_allclose(enc.run(*_batch(model_dir, TEXTS[::-1]))[::-1], tight, atol=1e-5)


def test_cache_hit_converts_nothing(model_dir, tmp_path, monkeypatch):
    cd = tmp_path / "cache"
    before = ob.conversions
    first = OpenVINOEncoder(model_dir, pooling="mean", normalize=True, precision="fp32", cache_dir=cd)
    assert not first.cache_hit and ob.conversions == before + 1
    second = OpenVINOEncoder(model_dir, pooling="mean", normalize=True, precision="fp32", cache_dir=cd)
    assert second.cache_hit and ob.conversions == before + 1
    assert second.ir_path == first.ir_path
    # the entry is complete and nothing temporary is left beside it
    entries = [p for p in cd.iterdir() if p.is_dir() and not p.name.startswith(".")]  # (and file-digests.json)
    assert [p.name for p in entries] == [first.ir_path.parent.name]
    # the IR, and the compiled blobs OpenVINO caches beside it (CACHE_DIR)
    assert sorted(p.name for p in entries[0].iterdir()) == ["compiled", "meta.json", "model.bin", "model.xml"]
    assert not [p for p in cd.iterdir() if ".tmp-" in p.name]
    # other graph options are another entry
    assert cache_key(model_dir, pooling="mean", normalize=True) != cache_key(model_dir, pooling="cls")
    ids, mask, tt = _batch(model_dir, TEXTS)
    np.testing.assert_array_equal(first.run(ids, mask, tt), second.run(ids, mask, tt))


def test_cache_key_follows_weights(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    _write_tiny_model(d)
    k1 = cache_key(d, pooling="mean")
    (d / "config.json").write_text((d / "config.json").read_text().replace('"hidden_act"', '"hidden_act" ', 1))
    assert cache_key(d, pooling="mean") != k1


def test_env_cache_dir_and_concurrent_writers(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HFBATCH_CACHE_DIR", str(tmp_path / "root"))
    assert ob.default_cache_dir() == tmp_path / "root" / "openvino"
    results, errors = [], []

    def load():
        try:
            results.append(get_ir(model_dir, pooling="max"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({p for p, _ in results}) == 1
    assert sorted(hit for _, hit in results) == [False, True, True]  # converted once
    assert results[0][0].is_relative_to(tmp_path / "root" / "openvino")


def test_broken_entry_is_rebuilt(model_dir, cache_dir):
    xml, _ = get_ir(model_dir, pooling="cls", cache_dir=cache_dir)
    (xml.parent / "meta.json").unlink()  # e.g. a hand-deleted file
    xml2, hit = get_ir(model_dir, pooling="cls", cache_dir=cache_dir)
    assert not hit and xml2 == xml and (xml.parent / "meta.json").is_file()
    assert get_ir(model_dir, pooling="cls", cache_dir=cache_dir) == (xml, True)


def test_classification_logits_match_torch(cls_model_dir, cache_dir):
    from transformers import AutoModelForSequenceClassification

    ids, mask, tt = _batch(cls_model_dir, TEXTS)
    enc = OpenVINOEncoder(cls_model_dir, task="classify", precision="fp32", cache_dir=cache_dir)
    assert enc.pooling is None
    out = enc.run(ids, mask, tt)
    m = AutoModelForSequenceClassification.from_pretrained(str(cls_model_dir)).eval()
    with torch.no_grad():
        ref = m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                token_type_ids=torch.from_numpy(tt)).logits.numpy()
    assert out.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_precision_and_options(model_dir, cache_dir):
    assert isinstance(cpu_has_bf16(), bool)
    enc = OpenVINOEncoder(model_dir, pooling="mean", normalize=True, precision="bf16", cache_dir=cache_dir,
                          num_threads=1)
    assert enc.precision == ("bf16" if cpu_has_bf16() else "fp32")
    assert enc.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    ids, mask, tt = _batch(model_dir, TEXTS)
    ref = _torch_pooled(model_dir, ids, mask, "mean", True)
    assert _cos(enc.run(ids, mask, tt), ref).min() >= 0.999
    for bad in (dict(pooling="avg"), dict(task="generate"), dict(precision="int8"),
                dict(pooling=None, normalize=True), dict(task="classify", pooling="cls")):
        with pytest.raises(ValueError):
            OpenVINOEncoder(model_dir, cache_dir=cache_dir, **bad)


def test_usable_beside_torch_threads(model_dir, cache_dir):
    """torch has run its own thread pool in this process; OpenVINO must still run (not hang) from a thread."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.ones(256, 256) @ torch.ones(256, 256)
    enc = OpenVINOEncoder(model_dir, pooling="mean", normalize=True, precision="fp32", cache_dir=cache_dir)
    out = []
    t = threading.Thread(target=lambda: out.append(enc.run(*_batch(model_dir, TEXTS))))
    t.start()
    t.join(timeout=60)
    assert not t.is_alive() and out[0].shape == (len(TEXTS), 32)
