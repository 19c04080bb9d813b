"""Cron safety: one writer per output, no-op re-runs, refused changes, --force, resume after SIGKILL."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HFBATCH, SAMPLE, finished_shards, invoke, sample_rows, write_jsonl

from hfbatch.runner import OutputPaths


def run(args, code=0, **kw):
    proc = subprocess.run(HFBATCH + [str(a) for a in args], capture_output=True, text=True, **kw)
    assert proc.returncode == code, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def rows_of(path):
    import datasets

    return datasets.load_from_disk(str(path)).to_dict()


def test_second_writer_gets_exit_75_naming_the_holder(tmp_path):
    out = tmp_path / "ds"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from hfbatch.runner import OutputLock;"
        f"OutputLock(Path({str(out)!r})).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        proc = run(["ingest", SAMPLE, "-o", out], code=75)
        assert time.monotonic() - started < 30  # immediately, not after waiting for the holder
        assert f"pid {holder.pid}" in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    run(["ingest", SAMPLE, "-o", out])  # the lock died with its holder (no stale lock after a kill)
    assert (out / "manifest.json").exists()


def test_rerun_is_a_noop_that_says_so_and_imports_no_torch(tmp_path, tiny_model, runner):
    invoke(runner, ["ingest", SAMPLE, "-o", tmp_path / "ds"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", "--model", tiny_model])
    before = (tmp_path / "emb" / "manifest.json").read_text()
    probe = ("import sys; from hfbatch.cli import cli;"
             f"cli.main(['embed', {str(tmp_path / 'ds')!r}, '-o', {str(tmp_path / 'emb')!r}, '--model', "
             f"{str(tiny_model)!r}, '--json'], standalone_mode=False);"
             "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout.splitlines()[0])
    assert summary["status"] == "up_to_date" and summary["rows"] == 400
    assert proc.stdout.splitlines()[1] == "no torch"
    assert "up_to_date" in proc.stderr
    assert (tmp_path / "emb" / "manifest.json").read_text() == before


def test_changed_input_or_option_is_refused_naming_it_then_force_recomputes(tmp_path, runner):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    write_jsonl(src, [{"text": f"doc {i}"} for i in range(6)])
    result = invoke(runner, ["ingest", src, "-o", tmp_path / "ds"], expect=2)
    assert f"input {src.resolve()} changed" in result.output and "--force" in result.output
    assert len(rows_of(tmp_path / "ds")["text"]) == 5  # untouched
    result = invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--dedup"], expect=2)
    assert "option dedup: False -> True" in result.output
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--force"])
    assert len(rows_of(tmp_path / "ds")["text"]) == 6


def test_rebuilt_upstream_output_counts_as_a_changed_input(tmp_path, tiny_model, runner):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", "--model", tiny_model])
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds", "--force"])
    result = invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", "--model", tiny_model], expect=2)
    assert "/ds changed" in result.output


def test_output_that_is_not_ours_is_not_overwritten(tmp_path, runner):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    result = invoke(runner, ["ingest", src, "-o", tmp_path / "mine"], expect=2)
    assert "not an hfbatch output" in result.output
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


# ---- kill -9 at random points, re-run, compare with an uninterrupted run ---------------------------------

def kill_and_resume(args, out: Path, reference: dict, seed: int, kills: int, duration: float, check_values):
    """SIGKILL the job, re-run it to the end and compare with the uninterrupted run; after each kill no half
    output may be visible. Kills alternate between the moment a few more shards have finished (so resuming
    is exercised however fast the machine is) and a random moment (start-up, mid-shard, publishing).
    Returns how many kills left finished shards to resume from."""
    rng = random.Random(seed)
    resumed_with_shards = 0
    for attempt in range(kills):
        proc = subprocess.Popen(HFBATCH + [str(a) for a in args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if attempt % 2 == 0:
            target = finished_shards(out) + rng.randint(1, 4)
            deadline = time.monotonic() + 120
            while proc.poll() is None and finished_shards(out) < target and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.02))
        else:
            time.sleep(rng.uniform(0.2, duration))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # a reader sees a complete output or none
            assert (out / "manifest.json").exists()
            check_values(rows_of(out), reference)
            break
        if finished_shards(out):
            resumed_with_shards += 1
    run(args)
    check_values(rows_of(out), reference)
    return resumed_with_shards


def same_rows(got, want):
    assert list(got) == list(want)
    for column in want:
        if column == "embedding":
            np.testing.assert_allclose(np.asarray(got[column]), np.asarray(want[column]), atol=1e-5)
        else:
            assert got[column] == want[column], column


@pytest.mark.slow
def test_ingest_embed_index_survive_sigkill(tmp_path, tiny_model):
    rows = sample_rows()
    src = tmp_path / "src"
    src.mkdir()
    for part in range(16):  # one resumable shard per file
        write_jsonl(src / f"part-{part:02d}.jsonl", rows[part * 25:(part + 1) * 25])
    ref = tmp_path / "ref"
    started = time.monotonic()
    run(["ingest", src, "-o", ref / "ds"])
    ingest_s = time.monotonic() - started
    started = time.monotonic()
    run(["embed", ref / "ds", "-o", ref / "emb", "--model", tiny_model, "--shard-rows", "25",
         "--precision", "fp32"])
    embed_s = time.monotonic() - started
    run(["index", ref / "emb", "-o", ref / "idx", "--kind", "flat"])
    ref_ds, ref_emb = rows_of(ref / "ds"), rows_of(ref / "emb")
    assert len(ref_ds["id"]) == 400 and len(set(ref_ds["id"])) == 400

    work = tmp_path / "work"
    resumed = kill_and_resume(["ingest", src, "-o", work / "ds"], work / "ds", ref_ds, 1, 4, ingest_s, same_rows)
    resumed += kill_and_resume(["embed", work / "ds", "-o", work / "emb", "--model", tiny_model,
                                "--shard-rows", "25", "--precision", "fp32"], work / "emb", ref_emb, 2, 5,
                               embed_s, same_rows)
    assert resumed >= 1, "no kill landed after a finished shard: the test did not exercise resume"

    def same_search(_, __):
        a = run(["search", ref / "idx", "chess game", "-k", "5"]).stdout
        b = run(["search", work / "idx", "chess game", "-k", "5"]).stdout
        assert a == b

    index_args = ["index", work / "emb", "-o", work / "idx", "--kind", "flat"]
    rng = random.Random(3)
    for _ in range(3):
        proc = subprocess.Popen(HFBATCH + [str(a) for a in index_args], stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (work / "idx").exists() or (work / "idx" / "manifest.json").exists()
    run(index_args)
    same_search(None, None)
    assert not OutputPaths(work / "idx").temps(), "a killed run's temp dir was left behind after the re-run"
