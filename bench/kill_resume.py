#!/usr/bin/env python
"""Benchmark (issue 13): what a re-run costs after kills, now that model jobs commit progress inside a shard.

    .venv/bin/python bench/kill_resume.py [--n 3000 --n 20000] [--kills 2] [--no-shard-only] [--model DIR]

For each N: the first N documents of the shared Debian corpus are ingested, then embedded with the default
model (the bundled all-MiniLM-L6-v2 unless --model) and the default options (one 10,000-row shard at 3,000
docs), every command the real `hfbatch` as its own process:

  T           an uninterrupted `hfbatch embed` (wall seconds, interpreter start and model load included;
              the fastest of --t-runs runs, the one least disturbed by whatever else the machine runs)
  parts       from scratch: the same command SIGKILLed at T/2 of its run, KILLS times (each re-run killed
              at T/2 of its own run), then a final re-run to the end: its wall time as a fraction of T
              (a re-run that ends before T/2 is the final one: fewer kills landed, as the output says)
  shard-only  the same with part commits disabled (HFBATCH_PART_SECONDS=inf): what a kill cost before
              (a kill loses the whole shard being computed)

Each final output is checked to be identical to the uninterrupted one (ids, order, embedding bits). CPU
seconds (the child's own rusage) are printed beside wall seconds: on a shared machine they are the steadier
measure. A warm-up embed fills the converted-model cache first, so T does not include a one-off conversion.
The corpus is ../shared/corpora/debian-descriptions.jsonl.gz beside the repository unless --corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from debian_sections import CORPUS, read_corpus
from measure import Measured, hfbatch_command, run_hfbatch


def cpu_flags() -> str:
    """The CPU features that decide the default precision and backend (bf16 needs avx512_bf16 or amx)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return " ".join(sorted(f for f in ("avx512_bf16", "amx_bf16", "avx2") if f in text.split())) or "none"


def run_until(args: list, env: dict, kill_after: float | None = None) -> tuple[Measured, bool]:
    """`hfbatch ARGS --json` measured as `measure.run_measured` does (the child's own rusage), SIGKILLed
    `kill_after` seconds after it started unless it ended before: (the measurement, whether it was killed)."""
    cmd = hfbatch_command() + [str(a) for a in args] + ["--json"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        timer = threading.Timer(kill_after, proc.send_signal, [signal.SIGKILL]) if kill_after else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    killed = proc.returncode == -signal.SIGKILL
    if proc.returncode and not killed:
        raise SystemExit(f"hfbatch {' '.join(map(str, args))} failed ({proc.returncode}):\n{done.stderr[-3000:]}")
    return Measured(done, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024), killed


def identical(a: Path, b: Path) -> bool:
    import datasets

    x, y = datasets.load_from_disk(str(a)).data.table, datasets.load_from_disk(str(b)).data.table
    return x.schema == y.schema and all(x.column(c).combine_chunks().equals(y.column(c).combine_chunks())
                                        for c in x.column_names)


def bench(n: int, rows: list[dict], work: Path, model: list, kills: int, shard_only: bool,
          t_runs: int) -> list[dict]:
    base = work / f"n{n}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    with open(base / "docs.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:n])
    run_hfbatch(["ingest", base / "docs.jsonl", "-o", base / "ds"])
    env = dict(os.environ)
    # a warm-up on a 50-row slice: model conversions are cached before T is measured
    run_hfbatch(["embed", base / "ds", "-o", base / "warm", *model, "--num-shards", max(1, n // 50)], env)
    # T: the fastest of T_RUNS uninterrupted runs (on a shared machine, the least disturbed one)
    ref = min((run_hfbatch(["embed", base / "ds", "-o", base / "ref", *model, "--force", "--json"], env)
               for _ in range(t_runs)), key=lambda m: m.wall_s)
    t = ref.wall_s
    print(f"N={n}: uninterrupted T = {t:.1f} s wall, {ref.cpu_s:.1f} s CPU (fastest of {t_runs}); load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    results = []
    modes = [("parts", {})] + ([("shard-only", {"HFBATCH_PART_SECONDS": "inf"})] if shard_only else [])
    for mode, extra in modes:
        out = base / f"out-{mode}"
        args = ["embed", base / "ds", "-o", out, *model]
        kills_landed = 0
        while True:  # killed at T/2 of its own run, KILLS times; a run that ends before its kill is the last
            final, killed = run_until(args, {**env, **extra}, t / 2 if kills_landed < kills else None)
            if not killed:
                break
            kills_landed += 1
        summary = json.loads(final.done.stdout.strip().splitlines()[-1])
        result = {"n": n, "mode": mode, "T_s": round(t, 1), "final_s": round(final.wall_s, 1),
                  "fraction_of_T": round(final.wall_s / t, 2), "cpu_fraction": round(final.cpu_s / ref.cpu_s, 2),
                  "kills_landed": kills_landed, "rows_resumed": summary.get("rows_resumed"),
                  "rows_computed": summary.get("rows_computed"), "identical": identical(out, base / "ref")}
        results.append(result)
        print(f"  {mode:10s} final re-run after {kills_landed} kills at T/2: {final.wall_s:.1f} s = "
              f"{result['fraction_of_T']:.2f} T (CPU {result['cpu_fraction']:.2f}); resumed "
              f"{result['rows_resumed']} rows, computed {result['rows_computed']}; identical output: "
              f"{result['identical']}; load average {os.getloadavg()[0]:.1f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, action="append", help="documents (repeatable; default 3000 and 20000)")
    parser.add_argument("--kills", type=int, default=2, help="kills at T/2 before the final re-run (default 2)")
    parser.add_argument("--t-runs", type=int, default=2, help="uninterrupted runs; T is the fastest (default 2)")
    parser.add_argument("--no-shard-only", action="store_true", help="skip the run with part commits disabled")
    parser.add_argument("--model", default=None, help="model directory (default: the bundled MiniLM)")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    opts = parser.parse_args()
    print(f"CPU flags: {cpu_flags()}; cores: {len(os.sched_getaffinity(0))}; "
          f"load average: {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}", flush=True)
    rows = read_corpus(opts.corpus)
    model = ["--model", opts.model] if opts.model else []
    work = opts.work or Path(tempfile.mkdtemp(prefix="hfbatch-kill-"))
    started = time.monotonic()
    try:
        results = [r for n in opts.n or [3000, 20000]
                   for r in bench(n, rows, work, model, opts.kills, not opts.no_shard_only, opts.t_runs)]
    finally:
        if opts.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"results": results, "seconds": round(time.monotonic() - started)}))
    if not all(r["identical"] for r in results):
        raise SystemExit("a resumed output differs from the uninterrupted one")


if __name__ == "__main__":
    main()
