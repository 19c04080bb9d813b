"""OpenVINO keeps one batch in flight per stream: the same outputs, in order, and the encoder free again after
an abandoned or failed run."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("openvino")

import hfbatch.openvino_backend as ob  # noqa: E402
from hfbatch.batching import Tokenized, run_batches  # noqa: E402

RNG = np.random.default_rng(0)


def batches(n=9):
    """Batches of different sizes and lengths, with padding at the ends of some rows."""
    out = []
    for i in range(n):
        rows, length = 1 + i % 4, 3 + (5 * i) % 11
        ids = RNG.integers(5, 90, size=(rows, length)).astype(np.int64)
        ids[:, 0], mask = 2, np.ones_like(ids)
        if rows > 1:
            ids[-1, length // 2:], mask[-1, length // 2:] = 0, 0
        out.append((ids, mask))
    return out


@pytest.fixture(scope="module")
def embedder(tiny_model_factory):
    return tiny_model_factory("tiny-streams")


@pytest.fixture(scope="module")
def classifier(tiny_model_factory):
    return tiny_model_factory("tiny-streams-cls", pooling=None, num_labels=4)


@pytest.mark.parametrize("task,precision", [("embed", "fp32"), ("embed", "bf16"), ("classify", "fp32"),
                                            ("classify", "bf16")])
def test_run_many_gives_the_outputs_of_run_in_order(embedder, classifier, tmp_path, task, precision):
    enc = ob.OpenVINOEncoder(classifier if task == "classify" else embedder, task=task, precision=precision,
                             cache_dir=tmp_path, num_threads=2)
    assert enc.streams == 2 and enc.describe()["streams"] == 2  # THROUGHPUT: a stream per thread
    given = batches()
    one_by_one = [enc.run(*b) for b in given]
    pipelined = list(enc.run_many(iter(given)))
    assert len(pipelined) == len(given)
    for a, b, (ids, _) in zip(one_by_one, pipelined, given):
        assert b.shape[0] == ids.shape[0] and b.dtype == np.float32
        np.testing.assert_array_equal(a, b)  # the same bits, whichever stream ran it


def test_an_abandoned_run_many_leaves_the_encoder_usable(embedder, tmp_path):
    enc = ob.OpenVINOEncoder(embedder, precision="fp32", cache_dir=tmp_path, num_threads=2)
    given = batches(6)
    expected = [enc.run(*b) for b in given]
    outputs = enc.run_many(iter(given))
    np.testing.assert_array_equal(next(outputs), expected[0])  # two more in flight now
    outputs.close()
    done = []
    worker = threading.Thread(target=lambda: done.append(enc.run(*given[3])))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the lock was left held"
    np.testing.assert_array_equal(done[0], expected[3])
    assert all(np.array_equal(a, b) for a, b in zip(enc.run_many(given), expected))


class PipelinedDouble:
    """An encoder with `map`, as the OpenVINO one: it pulls a batch ahead before yielding."""

    def __init__(self):
        self.closed = False
        self.pulled_ahead = 0

    def __call__(self, batch):
        return batch["input_ids"].sum(axis=1, keepdims=True).astype(np.float32)

    def map(self, padded):
        padded = iter(padded)
        try:
            ahead = next(padded, None)
            for batch in padded:
                self.pulled_ahead += 1
                yield self(ahead)
                ahead = batch
            if ahead is not None:
                yield self(ahead)
        finally:
            self.closed = True


def tokenized(n=40):
    return Tokenized([list(range(1, 2 + (7 * i) % 13)) for i in range(n)], None, 0)


def test_run_batches_uses_map_with_the_same_result():
    double = PipelinedDouble()
    pipelined = run_batches(double, tokenized(), 0, batch_tokens=32)
    plain = run_batches(lambda batch: double(batch), tokenized(), 0, batch_tokens=32)
    assert double.pulled_ahead > 0 and double.closed
    np.testing.assert_array_equal(pipelined, plain)
    np.testing.assert_array_equal(plain[:, 0], [sum(range(1, 2 + (7 * i) % 13)) for i in range(40)])


def test_a_failed_commit_closes_the_pipeline():
    double = PipelinedDouble()

    def on_batch(rows):
        raise RuntimeError("commit failed")

    with pytest.raises(RuntimeError, match="commit failed"):
        run_batches(double, tokenized(), 0, batch_tokens=32, on_batch=on_batch)
    assert double.closed  # at once, not whenever the traceback is collected
