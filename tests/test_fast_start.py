"""What a whole `hfbatch embed` process pays before its first batch: no torch import on the OpenVINO path,
the tokenizer read by the `tokenizers` library (the same ids as transformers'), OpenVINO's compiled-model
cache kept inside hfbatch's own cache entry, and weight digests remembered between runs."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("openvino")

import hfbatch.model_files as model_files  # noqa: E402
import hfbatch.openvino_backend as ob  # noqa: E402
from hfbatch.batching import tokenize  # noqa: E402
from hfbatch.model_files import ConfigFile, TokenizerFile  # noqa: E402
from hfbatch.models import load_tokenizer  # noqa: E402

TEXTS = ["The Debian package manager", "", "a library for tools " * 40, "café naïve ÀÉÎ 東京", "tool"]


def test_tokenizer_file_gives_transformers_ids(tiny_model):
    hf, light = load_tokenizer(tiny_model), TokenizerFile.load(tiny_model)
    assert light is not None and light.pad_token_id == hf.pad_token_id
    assert light.model_max_length == hf.model_max_length
    for max_length in (128, 8):
        a, b = tokenize(hf, TEXTS, max_length), tokenize(light, TEXTS, max_length)
        assert a.input_ids == b.input_ids and a.truncated == b.truncated
        pa, pb = tokenize(hf, TEXTS, max_length, TEXTS[::-1]), tokenize(light, TEXTS, max_length, TEXTS[::-1])
        assert pa.input_ids == pb.input_ids and pa.token_type_ids == pb.token_type_ids
    # what it does not answer itself goes to transformers' tokenizer
    assert light.num_special_tokens_to_add(pair=False) == hf.num_special_tokens_to_add(pair=False)


def test_tokenizer_file_split_over_threads_keeps_ids_order_and_cut_rows(tiny_model, monkeypatch):
    """A large call runs on several threads (3 here, whatever this machine has): the same ids, in the same
    order, as transformers' tokenizer in one call, and the rows it says it cut are those truncation cut."""
    from hfbatch.batching import truncation_flags

    monkeypatch.setattr(ob, "available_cpus", lambda: 3)
    # 64 rows a thread instead of 256, so 301 rows make three threads: the pairs of 800-character rows cut
    # at 16 tokens cost the tokenizer ~0.5 ms a row, in transformers' call as in this one
    monkeypatch.setattr(model_files, "ROWS_PER_TOKENIZER_THREAD", 64)
    hf, light = load_tokenizer(tiny_model), TokenizerFile.load(tiny_model)
    texts = [f"{TEXTS[i % len(TEXTS)]} row {i} " + "word " * (i % 23) for i in range(301)]  # not a multiple of 3
    calls = []
    real_encode = light.backend_tokenizer.encode_batch_fast
    kept = ("enable_truncation", "no_truncation", "encode_batch")
    monkeypatch.setattr(light, "backend_tokenizer", SimpleNamespace(
        **{name: getattr(light.backend_tokenizer, name) for name in kept},
        encode_batch_fast=lambda inputs, **kw: calls.append(len(inputs)) or real_encode(inputs, **kw)))
    pairs = texts[::-1]
    for max_length in (16, 64):
        ids = hf(texts, truncation=True, max_length=max_length)["input_ids"]
        encoded = light(texts, truncation=True, max_length=max_length)
        assert encoded["input_ids"] == ids and calls[-3:] == [101, 101, 99]  # three threads' parts
        assert encoded["truncated"] == truncation_flags(hf, texts, None, ids, max_length)
        assert 0 < sum(encoded["truncated"]) < len(texts)
        a, b = tokenize(hf, texts, max_length, pairs), tokenize(light, texts, max_length, pairs)
        assert (a.input_ids, a.token_type_ids, a.truncated) == (b.input_ids, b.token_type_ids, b.truncated)
    assert "truncated" not in light(texts, truncation=False)


def test_tokenizer_file_declines_what_needs_transformers(tiny_model, tmp_path):
    assert TokenizerFile.load(tiny_model, trust_remote_code=True) is None
    other = tmp_path / "m"
    other.mkdir()
    (other / "tokenizer.json").write_bytes((tiny_model / "tokenizer.json").read_bytes())
    (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LayoutLMv2Tokenizer"}))
    assert TokenizerFile.load(other) is None
    (other / "tokenizer_config.json").write_text("[1, 2]")  # transformers' loader names the broken file
    assert TokenizerFile.load(other) is None


def test_config_file_as_autoconfig(tiny_model, tiny_model_factory):
    from hfbatch.models import load_config

    for model in (tiny_model, tiny_model_factory("tiny-cls-4", pooling=None, num_labels=4)):
        light, full = ConfigFile.load(model), load_config(model)
        for name in ("hidden_size", "max_position_embeddings", "num_labels", "id2label"):
            assert getattr(light, name) == getattr(full, name), name
    assert ConfigFile.load(tiny_model, trust_remote_code=True) is None


@pytest.fixture
def tiny_dataset(tmp_path):
    from conftest import sample_rows, write_jsonl

    from hfbatch.ingestion import ingest

    ingest([write_jsonl(tmp_path / "rows.jsonl", sample_rows(40))], tmp_path / "ds")
    return tmp_path / "ds"


def _embed_in_child(dataset, out, model, cache):
    from conftest import modules_imported

    code = (f"from hfbatch.embedding import embed; "
            f"embed({str(dataset)!r}, {str(out)!r}, model={str(model)!r}, device='auto', force=True)")
    return modules_imported(code, ("torch", "transformers"), cache)


@pytest.mark.slow
def test_openvino_embed_process_never_imports_torch(tiny_model, tiny_dataset, tmp_path):
    cache = tmp_path / "cache"
    first = _embed_in_child(tiny_dataset, tmp_path / "e1", tiny_model, cache)
    assert first["torch"]  # converting the model needs torch, once
    second = _embed_in_child(tiny_dataset, tmp_path / "e2", tiny_model, cache)
    assert second == {"torch": False, "transformers": False}
    import datasets

    a, b = (np.asarray(datasets.load_from_disk(str(tmp_path / e)).with_format("numpy")["embedding"])
            for e in ("e1", "e2"))
    np.testing.assert_array_equal(a, b)


def test_compiled_cache_lives_in_the_entry(tiny_model, tmp_path):
    cache = tmp_path / "ov"
    enc = ob.OpenVINOEncoder(tiny_model, pooling="mean", precision="fp32", cache_dir=cache)
    entry = enc.ir_path.parent
    assert enc.config["CACHE_DIR"] == str(entry / ob.COMPILED)
    assert (entry / ob.COMPILED).is_dir() and any((entry / ob.COMPILED).iterdir())  # the blob OpenVINO wrote
    # hfbatch writes only inside the cache folder it made
    assert {p.name for p in cache.iterdir() if not p.name.startswith(".")} == {entry.name, ob.DIGESTS}
    again = ob.OpenVINOEncoder(tiny_model, pooling="mean", precision="fp32", cache_dir=cache)
    ids = np.array([[2, 7, 8, 3, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 0]], dtype=np.int64)
    np.testing.assert_array_equal(enc.run(ids, mask), again.run(ids, mask))


def test_no_compiled_cache_in_a_read_only_entry(tiny_model, tmp_path, monkeypatch):
    xml, _ = ob.get_ir(tiny_model, pooling="mean", cache_dir=tmp_path / "ov")
    assert ob.compiled_cache_dir(xml) == xml.parent / ob.COMPILED
    monkeypatch.setattr(ob.os, "access", lambda path, mode: False)
    assert ob.compiled_cache_dir(xml) is None


def test_weight_digests_remembered_and_invalidated(tiny_model, tmp_path, monkeypatch):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    cache = tmp_path / "ov"
    monkeypatch.setattr(ob, "_file_digest_memo", {})
    key = ob.cache_key(model, pooling="mean", cache_dir=cache)
    stored = json.loads((cache / ob.DIGESTS).read_text())
    assert any(k.startswith(str((model / "model.safetensors").resolve())) for k in stored)
    monkeypatch.setattr(ob, "_file_digest_memo", {})  # a new process: the digests come from the file
    hashed = []
    real_sha = ob.hashlib.sha256
    monkeypatch.setattr(ob.hashlib, "sha256", lambda *a: hashed.append(1) or real_sha(*a))
    assert ob.cache_key(model, pooling="mean", cache_dir=cache) == key
    assert len(hashed) == 1  # the key itself; no weight file hashed again
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one bit changed, mtime set back: ctime still moves
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ob.cache_key(model, pooling="mean", cache_dir=cache) != key
