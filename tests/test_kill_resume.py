"""A kill -9 inside a shard loses seconds, not the shard: model jobs commit a shard's finished batches as
parts (hfbatch.parts), and the re-run computes only the batches that were lost. The output stays identical
to an uninterrupted run: same rows, same order, same bits.

The kills are deterministic: HFBATCH_PART_SECONDS=0 commits a part after every batch, and
HFBATCH_TEST_KILL=POINT:K makes the job SIGKILL itself at its K-th part commit (no sleep-and-hope).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import HFBATCH, finished_shards, ingested_sample, load, sample_rows, write_jsonl

from hfbatch.runner import OutputPaths

ROWS, SHARD_ROWS, MAX_LENGTH, BATCH_TOKENS = 90, 40, 128, 256
PARTS_EVERY_BATCH = {"HFBATCH_PART_SECONDS": "0"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return ingested_sample(tmp_path_factory.mktemp("kill-resume"), ROWS)


@pytest.fixture(scope="module")
def classifier(tiny_model_factory):
    return tiny_model_factory("tiny-cls-kill", pooling=None, num_labels=3)


def hfbatch(args, env=None, expect=0):
    """`hfbatch ARGS --json` as its own process (so it can be killed -9): (the process, its summary)."""
    done = subprocess.run(HFBATCH + [str(a) for a in args] + ["--json"], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    assert done.returncode == expect, f"exit {done.returncode} != {expect}\n{done.stderr[-3000:]}"
    lines = done.stdout.strip().splitlines()
    return done, (json.loads(lines[-1]) if lines else None)


def killed_at(args, point: str, k: int, expect=-9, env=None):
    """Run ARGS with part commits after every batch, killed -9 at its k-th part commit."""
    done, _ = hfbatch(args, {**PARTS_EVERY_BATCH, "HFBATCH_TEST_KILL": f"{point}:{k}", **(env or {})}, expect)
    return done


def shards_dir(out: Path) -> Path:
    return OutputPaths(out).shards


def committed(out: Path) -> dict[int, list[dict]]:
    """The part records of OUT's unfinished shards, by shard."""
    found = {}
    for parts in sorted(shards_dir(out).glob("*.parts")):
        shard = int(parts.name.split(".")[0])
        if not (shards_dir(out) / f"{shard:05d}.json").exists():
            found[shard] = [json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))]
    return found


def rows_in_finished_shards(out: Path) -> int:
    return sum(json.loads(p.read_text())["rows"] for p in shards_dir(out).glob("*.json"))


def assert_identical(out: Path, ref: Path) -> None:
    """Same columns, rows, order and values, bit for bit."""
    got, want = load(out).data.table, load(ref).data.table
    assert got.schema == want.schema
    assert got.column("id").to_pylist() == want.column("id").to_pylist()
    for name in want.column_names:
        assert got.column(name).combine_chunks().equals(want.column(name).combine_chunks()), name
    assert not shards_dir(out).parent.exists()  # published: the parts went with the .partial


def batches_in_first_shard(model: Path, dataset: Path) -> int:
    """How many length-sorted batches shard 0 of the dataset makes (what the job computes one by one)."""
    import numpy as np
    from transformers import AutoTokenizer

    from hfbatch.batching import budget_batches, tokenize

    texts = load(dataset)["text"][:SHARD_ROWS]
    tokenized = tokenize(AutoTokenizer.from_pretrained(str(model)), texts, MAX_LENGTH)
    return len(budget_batches(np.array([len(ids) for ids in tokenized.input_ids]), BATCH_TOKENS))


def embed_args(dataset, out, model, *extra):
    return ["embed", dataset, "-o", out, "--model", model, "--precision", "fp32", "--shard-rows", SHARD_ROWS,
            "--max-length", MAX_LENGTH, "--batch-tokens", BATCH_TOKENS, *extra]


@pytest.fixture(scope="module")
def embed_ref(tmp_path_factory, dataset, tiny_model):
    ref = tmp_path_factory.mktemp("ref") / "emb"
    hfbatch(embed_args(dataset, ref, tiny_model))  # uninterrupted, default part interval
    return ref


@pytest.mark.parametrize("k", [1, 2, 5])
def test_a_kill_inside_the_first_shard_loses_only_the_uncommitted_batches(tmp_path, dataset, tiny_model,
                                                                           embed_ref, k):
    out = tmp_path / "emb"
    args = embed_args(dataset, out, tiny_model)
    killed_at(args, "part", k)
    assert not out.exists() and finished_shards(out) == 0
    parts = committed(out)
    assert list(parts) == [0] and [p["part"] for p in parts[0]] == list(range(1, k + 1))
    kept = sum(p["rows"] for p in parts[0])
    assert 0 < kept < SHARD_ROWS

    _, summary = hfbatch(args)
    assert summary["rows_resumed"] == kept and summary["rows_computed"] == ROWS - kept
    assert_identical(out, embed_ref)


def test_a_kill_in_the_second_shard_keeps_the_first_and_its_parts_are_gone(tmp_path, dataset, tiny_model,
                                                                           embed_ref):
    out = tmp_path / "emb"
    args = embed_args(dataset, out, tiny_model)
    first = batches_in_first_shard(tiny_model, dataset)
    killed_at(args, "part", first)  # shard 0 commits after every batch but its last: this is shard 1's first
    assert finished_shards(out) == 1 and not (shards_dir(out) / "00000.parts").exists()
    parts = committed(out)
    assert list(parts) == [1] and len(parts[1]) == 1

    _, summary = hfbatch(args)
    assert summary["rows_resumed"] == parts[1][0]["rows"]
    assert summary["rows_computed"] == ROWS - SHARD_ROWS - parts[1][0]["rows"]
    assert_identical(out, embed_ref)


def test_two_kills_then_a_rerun_add_up_to_one_uninterrupted_run(tmp_path, dataset, tiny_model, embed_ref):
    out = tmp_path / "emb"
    args = embed_args(dataset, out, tiny_model)
    killed_at(args, "part", 2)
    killed_at(args, "part", 3)  # resumes the 2 parts, commits 3 more (numbered on), then dies
    parts = committed(out)[0]
    assert [p["part"] for p in parts] == [1, 2, 3, 4, 5]
    batches = [b for p in parts for b in p["batches"]]
    assert len(batches) == len(set(batches)) == 5  # no batch computed twice
    _, summary = hfbatch(args)
    kept = sum(p["rows"] for p in parts)
    assert summary["rows_resumed"] == kept and summary["rows_computed"] == ROWS - kept
    assert_identical(out, embed_ref)


def test_unrecorded_half_written_and_duplicate_parts_are_never_counted(tmp_path, dataset, tiny_model, embed_ref):
    out = tmp_path / "emb"
    args = embed_args(dataset, out, tiny_model)
    killed_at(args, "part-data", 3)  # part 3's data is written, its record is not
    parts_dir = shards_dir(out) / "00000.parts"
    assert (parts_dir / "00003.arrow").exists() and not (parts_dir / "00003.json").exists()
    recorded = committed(out)[0]
    assert [p["part"] for p in recorded] == [1, 2]
    (parts_dir / ".00004.arrow.tmp-99999").write_bytes(b"half a part")  # a commit killed while writing
    for suffix in (".arrow", ".json"):  # the same batches again, under another number
        shutil.copy(parts_dir / f"00001{suffix}", parts_dir / f"00009{suffix}")

    done, summary = hfbatch(args)
    kept = sum(p["rows"] for p in recorded)
    assert summary["rows_resumed"] == kept and summary["rows_computed"] == ROWS - kept
    assert "msg=discarding_part shard=0 part=00009.json" in done.stderr
    assert_identical(out, embed_ref)


def test_a_part_of_another_batch_plan_is_not_used(tmp_path, dataset, tiny_model):
    out, ref = tmp_path / "emb", tmp_path / "ref"
    killed_at(embed_args(dataset, out, tiny_model), "part", 2)
    # --batch-tokens changes speed, not the config: the resumed run makes other batches, so the parts go
    args = embed_args(dataset, out, tiny_model)
    args[args.index("--batch-tokens") + 1] = 512
    done, summary = hfbatch(args)
    assert summary["rows_resumed"] == 0 and summary["rows_computed"] == ROWS
    assert done.stderr.count("msg=discarding_part") == 2
    hfbatch([*args[:3], ref, *args[4:]])
    assert_identical(out, ref)


@pytest.mark.parametrize("variant", ["chunked", "classify", "incremental"])
def test_other_model_jobs_resume_their_parts(tmp_path, dataset, tiny_model, classifier, variant):
    ref, out = tmp_path / "ref", tmp_path / "out"
    if variant == "chunked":
        def args(o):
            return embed_args(dataset, o, tiny_model, "--chunk-tokens", 24, "--chunk-overlap", 4)
    elif variant == "classify":
        def args(o):
            return ["classify", dataset, "-o", o, "--model", classifier, "--precision", "fp32", "--top-k", 2,
                    "--shard-rows", SHARD_ROWS, "--batch-tokens", BATCH_TOKENS]
    else:  # --incremental computes only new and changed rows: those are the ones whose batches are parts
        src = write_jsonl(tmp_path / "rows.jsonl", sample_rows(ROWS // 3))
        hfbatch(["ingest", src, "-o", tmp_path / "ds"])
        hfbatch(embed_args(tmp_path / "ds", ref, tiny_model))
        write_jsonl(src, sample_rows(ROWS))
        hfbatch(["ingest", src, "-o", tmp_path / "ds", "--force"])
        shutil.copytree(ref, out)  # the same output to update, twice

        def args(o):
            return embed_args(tmp_path / "ds", o, tiny_model, "--incremental")
    hfbatch(args(ref))
    killed_at(args(out), "part", 2)
    kept = sum(p["rows"] for p in committed(out)[0])
    _, summary = hfbatch(args(out))
    assert summary["rows_resumed"] == kept > 0
    if variant == "incremental":
        assert summary["reused"] == ROWS // 3 and summary["rows_computed"] == ROWS - ROWS // 3 - kept
    assert_identical(out, ref)


@pytest.mark.slow
def test_workers_resume_the_parts_any_worker_committed(tmp_path, dataset, tiny_model):
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = embed_args(dataset, out, tiny_model, "--devices", "cpu,cpu")
    hfbatch([*args[:3], ref, *args[4:]])
    # every worker kills itself at its 2nd part commit; the job says a worker died
    done = killed_at(args, "part", 2, expect=1)
    assert "the worker on cpu died (exit code -9)" in done.stderr and "Traceback" not in done.stderr
    parts = committed(out)  # whatever the other worker managed before it was stopped, all of it on disk
    assert parts and all(len(records) >= 1 for records in parts.values())
    kept = sum(p["rows"] for records in parts.values() for p in records)
    finished = rows_in_finished_shards(out)

    _, summary = hfbatch(args)
    assert summary["rows_resumed"] == kept and summary["rows_computed"] == ROWS - finished - kept
    assert_identical(out, ref)


def test_a_bad_part_interval_is_one_error_line(tmp_path, dataset, tiny_model):
    out = tmp_path / "emb"
    done, _ = hfbatch(embed_args(dataset, out, tiny_model), {"HFBATCH_PART_SECONDS": "soon"}, expect=2)
    assert "Error: HFBATCH_PART_SECONDS='soon' is not a number of seconds" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_commits_are_spaced_by_what_they_cost(tmp_path, monkeypatch):
    """About a second of model work between parts, longer where a commit is slow (at most ~2% of the model
    time goes to committing), never above the bound a kill may lose."""
    from hfbatch.parts import PART_OVERHEAD, PART_SECONDS, PART_SECONDS_MAX, ShardParts

    monkeypatch.delenv("HFBATCH_PART_SECONDS", raising=False)
    parts = ShardParts(tmp_path / "00000.parts", 0)
    assert parts.interval() == PART_SECONDS == 1.0
    parts._commit_s = 0.1  # a slow filesystem's fsyncs
    assert parts.interval() == pytest.approx(0.1 / PART_OVERHEAD) == pytest.approx(5.0)
    parts._commit_s = 10.0
    assert parts.interval() == PART_SECONDS_MAX == 30.0
    monkeypatch.setenv("HFBATCH_PART_SECONDS", "0")
    assert ShardParts(tmp_path / "00000.parts", 0).interval() == 0
