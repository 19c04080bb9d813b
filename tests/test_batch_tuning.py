"""--batch-tokens auto: the budget measured once per model graph and machine, remembered in the model cache,
and what it decides (hfbatch.batch_tuning)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import invoke, manifest, write_jsonl

from hfbatch import batch_tuning
from hfbatch.batch_tuning import (
    CANDIDATES,
    PAD_MARGIN,
    PAD_MULTIPLE,
    TUNING_FILE,
    choose,
    choose_pad,
    measure,
    parse_batch_tokens,
    tuned_batch_tokens,
    tuned_pad_multiple,
)
from hfbatch.batching import DEFAULT_BATCH_TOKENS, padded_width
from hfbatch.errors import InputError


@pytest.mark.parametrize("given, expected", [("auto", "auto"), (" AUTO ", "auto"), (512, 512), ("512", 512),
                                             (16, 16), (np.int64(4096), 4096)])
def test_batch_tokens_is_auto_or_a_budget(given, expected):
    assert parse_batch_tokens(given) == expected


@pytest.mark.parametrize("given", [15, 0, -2048, "15", "abc", "", 1.5, 512.0, True, None, "512 tokens"])
def test_other_batch_tokens_are_refused_naming_the_option(given):
    with pytest.raises(InputError, match=r"^--batch-tokens must be 'auto' or a whole number of at least 16"):
        parse_batch_tokens(given)


def test_the_default_stays_unless_another_budget_is_clearly_faster():
    assert choose({512: 1.00, 1024: 0.95, 2048: 1.00}) == DEFAULT_BATCH_TOKENS  # 5% is noise on a shared VM
    assert choose({512: 1.00, 1024: 1.09, 2048: 1.10}) == DEFAULT_BATCH_TOKENS  # exactly the margin: not more
    assert choose({512: 0.50, 1024: 0.70, 2048: 1.00}) == 512  # the AMX case: the small budget, 2x
    assert choose({512: 0.90, 1024: 0.80, 2048: 1.00}) == 1024  # the fastest, when it wins by more
    assert choose({512: 2.0, 1024: 1.0}) == 1024  # no default among the candidates: the fastest


def test_measure_interleaves_the_rounds_and_keeps_each_budgets_fastest():
    """A fake model whose rounds cost what a table says, on a clock that advances by them."""
    cost = {(0, 512): 5.0, (0, 1024): 4.0, (0, 2048): 9.0,  # round 1: 2048 slowed by a neighbour
            (1, 512): 3.0, (1, 1024): 6.0, (1, 2048): 2.0}
    order, now = [], [0.0]

    def run_at(budget):
        order.append(budget)
        now[0] += cost[(len(order) - 1) // 3, budget]

    seconds = measure(run_at, rounds=2, clock=lambda: now[0])
    assert order == [512, 1024, 2048, 1024, 2048, 512]  # each round starts one candidate later
    assert seconds == {512: 3.0, 1024: 4.0, 2048: 2.0}


class FakeEngine(SimpleNamespace):
    """What tuned_batch_tokens reads of an OpenVINOEncoder."""


def fake_engine(tmp_path: Path, threads: int = 2) -> FakeEngine:
    entry = tmp_path / "entry"
    entry.mkdir(exist_ok=True)
    return FakeEngine(ir_path=entry / "model.xml", num_threads=threads, streams=threads, precision="bf16")


def test_the_budget_is_measured_once_per_machine_and_remembered_beside_the_ir(tmp_path):
    calls = []

    def measure_fn(run_at):
        calls.append(run_at)
        return {512: 0.5, 1024: 0.8, 2048: 1.0}

    engine = fake_engine(tmp_path)
    assert tuned_batch_tokens(engine, "RUN", measure_fn=measure_fn) == 512
    assert calls == ["RUN"]  # the probe ran the job's own way of running batches
    stored = json.loads((tmp_path / "entry" / TUNING_FILE).read_text())
    (key, entry), = stored.items()
    assert "threads=2|streams=2|bf16" in key and entry["batch_tokens"] == 512
    assert entry["probe_seconds"] == {"512": 0.5, "1024": 0.8, "2048": 1.0}

    def must_not_measure(run_at):
        raise AssertionError("measured again")

    assert tuned_batch_tokens(engine, "RUN", measure_fn=must_not_measure) == 512  # remembered
    assert tuned_batch_tokens(engine, "RUN", measure_fn=must_not_measure, measure_now=False) == 512

    # another thread count is another machine: measured and kept beside the first
    other = fake_engine(tmp_path, threads=1)
    assert tuned_batch_tokens(other, "RUN", measure_fn=lambda r: {512: 1.0, 1024: 1.0, 2048: 1.0}) == 2048
    assert sorted(e["batch_tokens"] for e in json.loads((tmp_path / "entry" / TUNING_FILE).read_text()).values()) \
        == [512, 2048]
    assert not list((tmp_path / "entry").glob(f".{TUNING_FILE}.tmp*"))  # written through a temp file, renamed


def test_without_measuring_an_unknown_machine_gets_the_default_and_nothing_is_written(tmp_path):
    engine = fake_engine(tmp_path)
    assert tuned_batch_tokens(engine, "RUN", measure_fn=lambda r: {512: 0.1, 2048: 1.0}, measure_now=False) \
        == DEFAULT_BATCH_TOKENS
    assert not (tmp_path / "entry" / TUNING_FILE).exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"k": {"batch_tokens": "512"}}',
                                     '{"k": {"batch_tokens": 4}}'])
def test_a_damaged_tuning_file_is_measured_again(tmp_path, content, monkeypatch):
    engine = fake_engine(tmp_path)
    monkeypatch.setattr(batch_tuning, "machine_key", lambda e: "k")
    (tmp_path / "entry" / TUNING_FILE).write_text(content)
    assert tuned_batch_tokens(engine, "RUN", measure_fn=lambda r: {512: 0.1, 1024: 0.5, 2048: 1.0}) == 512
    assert json.loads((tmp_path / "entry" / TUNING_FILE).read_text())["k"]["batch_tokens"] == 512


def test_probe_rows_make_equal_batches_at_every_candidate():
    rows = batch_tuning.probe_rows(30522, 512)
    lengths = {len(r) for r in rows.input_ids}
    assert lengths == {batch_tuning.PROBE_LENGTH}
    assert len(rows) * batch_tuning.PROBE_LENGTH == batch_tuning.PROBE_TOKENS
    ids = np.array(rows.input_ids)
    assert ids.min() >= 30522 // 4 and ids.max() < 30522  # no special tokens, all in the vocabulary
    for budget in CANDIDATES:  # a whole number of equal batches, and an even number for two streams
        per_batch = budget // batch_tuning.PROBE_LENGTH
        assert len(rows) % per_batch == 0 and (len(rows) // per_batch) % 2 == 0
    short = batch_tuning.probe_rows(100, 64)  # a model that takes 64 tokens gets rows of 64
    assert {len(r) for r in short.input_ids} == {64} and np.array(short.input_ids).max() < 100


def test_auto_measures_the_openvino_graph_once_and_changes_no_vector(tiny_model, tmp_path, monkeypatch):
    """The real probe on a tiny model's OpenVINO graph: it writes its measurements (the budget's, then the
    padding's) beside the IR, a second EncoderRun reads them, and the vectors equal those of the budget it
    chose given by hand (fp32: exact)."""
    from hfbatch.embedding import EncoderRun

    monkeypatch.setenv("HFBATCH_CACHE_DIR", str(tmp_path / "cache"))
    measured = []
    real_measure = batch_tuning.measure
    def counted(run_at, **kw):
        measured.append(kw.get("candidates", CANDIDATES))
        return real_measure(run_at, **kw)

    monkeypatch.setattr(batch_tuning, "measure", counted)
    auto = EncoderRun(tiny_model, backend="openvino", precision="fp32")
    assert measured == [CANDIDATES, (1, PAD_MULTIPLE)]
    stored = json.loads((auto.encoder.engine.ir_path.parent / TUNING_FILE).read_text())
    (entry,) = stored.values()
    assert set(entry["probe_seconds"]) == {str(b) for b in CANDIDATES}
    assert all(s > 0 for s in entry["probe_seconds"].values())
    assert auto.batch_tokens == entry["batch_tokens"] == auto.settings["batch_tokens"]
    assert auto.batch_tokens == choose({int(b): s for b, s in entry["probe_seconds"].items()})
    assert set(entry["pad_probe_seconds"]) == {"1", str(PAD_MULTIPLE)}
    assert auto.pad_multiple == entry["pad_multiple"] == auto.settings["pad_multiple"]
    assert auto.pad_multiple == choose_pad({int(m): s for m, s in entry["pad_probe_seconds"].items()})

    again = EncoderRun(tiny_model, backend="openvino", precision="fp32")
    assert len(measured) == 2 and (again.batch_tokens, again.pad_multiple) == (auto.batch_tokens, auto.pad_multiple)
    texts = [f"package {i} " + "data file tool " * (i % 23) for i in range(300)]
    given = EncoderRun(tiny_model, backend="openvino", precision="fp32", batch_tokens=auto.batch_tokens)
    assert np.array_equal(auto(texts), given(texts))
    small = EncoderRun(tiny_model, backend="openvino", precision="fp32", batch_tokens=64)
    assert small.settings["batch_tokens"] == 64 and len(measured) == 2  # a given budget measures nothing
    np.testing.assert_allclose(small(texts), given(texts), atol=1e-5)


def test_torch_and_search_queries_never_measure(tiny_model, tmp_path, monkeypatch):
    from hfbatch.embedding import EncoderRun

    monkeypatch.setenv("HFBATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(batch_tuning, "measure", lambda run_at: pytest.fail("measured"))
    assert EncoderRun(tiny_model, backend="torch").batch_tokens == DEFAULT_BATCH_TOKENS
    queries = EncoderRun(tiny_model, backend="openvino", tune=False)  # what search's query embedder passes
    assert queries.batch_tokens == DEFAULT_BATCH_TOKENS
    assert not (queries.encoder.engine.ir_path.parent / TUNING_FILE).exists()


def test_the_cli_records_the_budget_and_refuses_a_bad_one(tiny_model, tmp_path, runner, monkeypatch):
    monkeypatch.setenv("HFBATCH_CACHE_DIR", str(tmp_path / "cache"))
    measured = []
    real_measure = batch_tuning.measure
    monkeypatch.setattr(batch_tuning, "measure",
                        lambda run_at, **kw: measured.append(1) or real_measure(run_at, **kw))
    write_jsonl(tmp_path / "small.jsonl", [{"id": i, "text": f"chess game {i}"} for i in range(20)])
    invoke(runner, ["ingest", tmp_path / "small.jsonl", "-o", tmp_path / "small"])
    for bad in ("8", "lots"):
        result = invoke(runner, ["embed", tmp_path / "small", "-o", tmp_path / "emb", "--model", tiny_model,
                                 "--batch-tokens", bad], expect=2)
        assert "--batch-tokens" in result.output and "Traceback" not in result.output
        assert not (tmp_path / "emb").exists()
    with pytest.raises(InputError, match="--batch-tokens"):  # the Python API refuses it before any work
        __import__("hfbatch").embed(tmp_path / "small", tmp_path / "emb", model=tiny_model, batch_tokens=8)
    assert not (tmp_path / "emb").exists()
    invoke(runner, ["embed", tmp_path / "small", "-o", tmp_path / "emb", "--model", tiny_model, "--batch-tokens",
                    "300", "--backend", "openvino"])
    assert manifest(tmp_path / "emb")["batch_tokens"] == 300
    # 20 rows are too few to pay for the probe: the default, and nothing measured or remembered
    invoke(runner, ["embed", tmp_path / "small", "-o", tmp_path / "emb2", "--model", tiny_model,
                    "--backend", "openvino"])
    assert manifest(tmp_path / "emb2")["batch_tokens"] == DEFAULT_BATCH_TOKENS and measured == []
    assert manifest(tmp_path / "emb2")["pad_multiple"] == 1
    assert not list((tmp_path / "cache").rglob(TUNING_FILE))
    # a job of TUNE_MIN_ROWS rows measures, once, and records what it chose
    rows = [{"id": i, "text": f"chess game {i}"} for i in range(batch_tuning.TUNE_MIN_ROWS)]
    write_jsonl(tmp_path / "big.jsonl", rows)
    invoke(runner, ["ingest", tmp_path / "big.jsonl", "-o", tmp_path / "big"])
    invoke(runner, ["embed", tmp_path / "big", "-o", tmp_path / "emb3", "--model", tiny_model, "--backend", "openvino"])
    (tuning,) = (tmp_path / "cache").rglob(TUNING_FILE)
    (entry,) = json.loads(tuning.read_text()).values()
    # (the budget's probe, then the padding's)
    assert measured == [1, 1] and manifest(tmp_path / "emb3")["batch_tokens"] == entry["batch_tokens"]
    assert manifest(tmp_path / "emb3")["pad_multiple"] == entry["pad_multiple"]
    # and now that it is known, a small job uses it too
    invoke(runner, ["embed", tmp_path / "small", "-o", tmp_path / "emb4", "--model", tiny_model,
                    "--backend", "openvino"])
    assert measured == [1, 1] and manifest(tmp_path / "emb4")["batch_tokens"] == entry["batch_tokens"]
    assert manifest(tmp_path / "emb4")["pad_multiple"] == entry["pad_multiple"]


def test_a_pipeline_step_takes_batch_tokens_as_a_number_or_auto(tmp_path, tiny_model, runner):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document number {i}"} for i in range(20)])
    step = '[[step]]\njob = "embed"\ninputs = ["out/ds"]\noutput = "out/{name}"\noptions = {{ model = "{model}", ' \
           'batch-tokens = {value} }}\n'
    pipe = tmp_path / "p.toml"
    pipe.write_text('[[step]]\njob = "ingest"\ninputs = ["docs.jsonl"]\noutput = "out/ds"\n' +
                    step.format(name="a", model=tiny_model, value=300) +
                    step.format(name="b", model=tiny_model, value='"auto"'))
    invoke(runner, ["run", pipe])
    assert manifest(tmp_path / "out" / "a")["batch_tokens"] == 300
    assert manifest(tmp_path / "out" / "b")["batch_tokens"] in CANDIDATES
    pipe.write_text(step.format(name="c", model=tiny_model, value=8))
    result = invoke(runner, ["run", pipe], expect=2)
    assert "--batch-tokens" in result.output and not (tmp_path / "out" / "c").exists()


def test_a_cache_it_may_not_write_gets_the_default_and_no_error(tmp_path, monkeypatch):
    """A shared cache this user may only read: the lock file cannot be made (PermissionError, as filelock
    raises it there), so nothing is measured and the job runs at the default."""
    import filelock

    class ReadOnlyLock:
        def __init__(self, *args, **kwargs):
            pass

        def acquire(self):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(filelock, "FileLock", ReadOnlyLock)
    engine = fake_engine(tmp_path)
    assert tuned_batch_tokens(engine, "RUN", measure_fn=lambda r: pytest.fail("measured")) == DEFAULT_BATCH_TOKENS
    assert not (tmp_path / "entry" / TUNING_FILE).exists()


def test_padded_width_rounds_up_within_the_models_length():
    assert [padded_width(n, 16, 256) for n in (1, 16, 17, 120, 128, 250, 256)] == [16, 16, 32, 128, 128, 256, 256]
    assert padded_width(250, 16, 250) == 250  # never past max_length (positions beyond it have no embedding)
    assert padded_width(251, 16, 250) == 251  # nor below the longest row (tokens from a longer max_length)
    assert padded_width(120, 1, 256) == 120 and padded_width(5, 16) == 16


def test_run_batches_pads_to_the_multiple_and_keeps_the_budget_and_every_row():
    """Padding changes the widths, the budget's rows per batch and the plan's key, never a row's result
    (here a function of a row's own unmasked ids: equal to the bit)."""
    from hfbatch.batching import Tokenized, run_batches
    from hfbatch.parts import plan_key

    rng = np.random.default_rng(3)
    ids = [list(rng.integers(5, 90, size=n)) for n in rng.integers(1, 91, size=300)]
    tokenized = Tokenized(ids, None, 0)
    shapes = {}

    def forward(multiple):
        def run(batch):
            shapes.setdefault(multiple, []).append(batch["input_ids"].shape)
            mask = batch["attention_mask"]
            assert np.all(batch["input_ids"][mask == 0] == 0)
            return np.stack([(batch["input_ids"] * mask).sum(1), mask.sum(1)], axis=1).astype(np.float32)
        return run

    plain = run_batches(forward(1), tokenized, 0, 400)
    padded = run_batches(forward(16), tokenized, 0, 400, pad_multiple=16, max_width=90)
    assert np.array_equal(plain, padded)
    assert plain[:, 1].tolist() == [len(s) for s in ids] and plain[:, 0].tolist() == [sum(s) for s in ids]
    assert all(w % 16 == 0 or w == 90 for _, w in shapes[16]) and any(w % 16 for _, w in shapes[1])
    assert all(b * w <= 400 for b, w in shapes[16]) and sum(b for b, _ in shapes[16]) == len(ids)
    assert plan_key([[0, 1]], ids[:2], None, 1) == plan_key([[0, 1]], ids[:2])  # older parts keep their key
    assert plan_key([[0, 1]], ids[:2], None, 16) != plan_key([[0, 1]], ids[:2])


def test_padding_is_chosen_only_where_it_pays_and_remembered_beside_the_budget(tmp_path):
    assert choose_pad({1: 1.0, PAD_MULTIPLE: 0.9}) == PAD_MULTIPLE
    assert choose_pad({1: 1.0, PAD_MULTIPLE: 1 / (1 + PAD_MARGIN)}) == 1  # at the margin: unpadded
    assert choose_pad({1: 1.0, PAD_MULTIPLE: 1.07}) == 1  # what a CPU without the saw-tooth gives
    engine = fake_engine(tmp_path)
    path = engine.ir_path.parent / TUNING_FILE
    key = batch_tuning.machine_key(engine)
    # an entry written before padding was measured: the budget is kept, the padding measured and merged
    path.write_text(json.dumps({key: {"batch_tokens": 1024, "probe_seconds": {"1024": 0.5}}}))
    calls = []

    def fake_measure(run_with, candidates, rounds):
        calls.append((candidates, rounds))
        return {1: 1.0, PAD_MULTIPLE: 0.9}

    assert tuned_pad_multiple(engine, "RUN", measure_fn=fake_measure, measure_now=False) == 1
    assert calls == [] and "pad_multiple" not in json.loads(path.read_text())[key]
    assert tuned_pad_multiple(engine, "RUN", measure_fn=fake_measure) == PAD_MULTIPLE
    entry = json.loads(path.read_text())[key]
    assert calls == [((1, PAD_MULTIPLE), batch_tuning.PAD_ROUNDS)]
    assert entry["batch_tokens"] == 1024 and entry["pad_multiple"] == PAD_MULTIPLE
    assert entry["pad_probe_seconds"] == {"1": 1.0, str(PAD_MULTIPLE): 0.9}
    assert tuned_pad_multiple(engine, "RUN", measure_fn=lambda *a, **k: pytest.fail("measured")) == PAD_MULTIPLE
    assert tuned_batch_tokens(engine, "RUN", measure_fn=lambda *a, **k: pytest.fail("measured")) == 1024
    # a damaged value is measured again, not trusted, and the budget beside it is kept
    for damaged in (7, True, "16", 16.0):
        path.write_text(json.dumps({key: {**entry, "pad_multiple": damaged}}))
        assert tuned_pad_multiple(engine, "RUN", measure_fn=fake_measure) == PAD_MULTIPLE
        assert tuned_pad_multiple(engine, "RUN", measure_fn=lambda *a, **k: pytest.fail("again")) == PAD_MULTIPLE
        assert json.loads(path.read_text())[key]["batch_tokens"] == 1024
    assert len(calls) == 5


def test_pad_probe_rows_fit_the_model_and_the_budget():
    assert batch_tuning.pad_probe_length(256) == 120 and batch_tuning.pad_probe_length(128) == 120
    assert batch_tuning.pad_probe_length(64) == 56 and batch_tuning.pad_probe_length(15) is None
    tokenized, batches = batch_tuning.pad_probe_batches(100, 120, 2048, streams=2)
    assert [len(b) for b in batches] == [16] * 4  # 16 rows of 128 fill 2,048; two batches a stream
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(tokenized))) == list(range(64))
    assert all(len(row) == 120 and 25 <= min(row) and max(row) < 100 for row in tokenized.input_ids)


def test_padded_batches_give_the_same_vectors_and_logits_on_openvino(tiny_model, tiny_model_factory, tmp_path,
                                                                     monkeypatch):
    """What padding to 16 does to a real graph: the padded positions are masked, so fp32 outputs are the
    unpadded ones (to float32 rounding: the kernels' blocking moves with the width)."""
    from hfbatch.embedding import EncoderRun

    monkeypatch.setenv("HFBATCH_CACHE_DIR", str(tmp_path / "cache"))
    texts = [f"package {i} " + "data file tool " * (i % 23) for i in range(200)]
    classifier = tiny_model_factory("tiny-cls-3", pooling=None, num_labels=3)
    for model, task in ((tiny_model, "embed"), (classifier, "classify")):
        run = EncoderRun(model, task=task, backend="openvino", precision="fp32", batch_tokens=512)
        tokenized = run.tokenize(texts)
        run.pad_multiple = 1
        plain = run.run(tokenized)
        run.pad_multiple = PAD_MULTIPLE
        np.testing.assert_allclose(run.run(tokenized), plain, atol=2e-6, rtol=1e-5)
