"""Benchmark: `hfbatch ingest` against `datasets.load_dataset("json") + save_to_disk` on 10x the Debian corpus.

    .venv/bin/python bench/ingest_memory.py [--repeat 10] [--runs 5] [--workdir DIR]

Generates two corpora of the same rows (the shared Debian descriptions repeated REPEAT times, with fresh ids)
as JSON Lines: all four columns (275 MB, above the auto-streaming threshold) and id/section/text only
(256 MB, below it in hfbatch <= 0.1 where the threshold was 256 MiB). For each it runs, as subprocesses, in
RUNS interleaved rounds (each round in another order): `hfbatch ingest` as a user runs it, `hfbatch ingest`
with the other streaming mode forced, and `load_dataset("json") + save_to_disk`; each run's peak RSS is read
from the kernel (os.wait4's rusage of that child). The machine is shared and noisy, so only sides of the same
round are compared: per-round ratios with their median, min and max, CPU-second ratios beside them. Then:
  - opens the ingested dataset in a fresh process and iterates every row (peak RSS must stay < 500 MB),
  - ingests the real corpus, exports it to JSON Lines and checks it gives the source rows back, in order.
Exit status 0 when every check holds: peak RSS < 1 GB, rows/s >= the peer's, iterate RSS < 500 MB, round trip.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from measure import run_measured

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpora" / "debian-descriptions.jsonl.gz"
RSS_LIMIT_MB, ITERATE_LIMIT_MB = 1024, 500

HFBATCH = "import sys; from hfbatch.cli import main; sys.argv[0] = 'hfbatch'; main()"
PEER = """
import sys, datasets
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[2])
ds.save_to_disk(sys.argv[3])
print(len(ds))
"""
ITERATE = """
import sys, datasets
ds = datasets.load_from_disk(sys.argv[1])
n = chars = 0
for n, row in enumerate(ds, start=1):
    chars += len(row["text"])
    assert row["id"] == n - 1, (n, row["id"])
print(n, chars)
"""


def measured(args: list[str], env: dict) -> dict:
    """Run a child and read its own rusage (peak RSS of that child alone, not the max over all children)."""
    run = run_measured(args, env)
    if run.done.returncode != 0:
        sys.exit(f"failed ({run.done.returncode}): {' '.join(args[:4])} ...\n{run.done.stderr[-2000:]}")
    return {"wall": run.wall_s, "cpu": run.cpu_s, "rss_mb": run.peak_rss_mb, "out": run.done.stdout}


def make_corpus(path: Path, repeat: int, columns: list[str] | None = None) -> int:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    n = 0
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(repeat):
            for row in rows:
                row = {**row, "id": n}
                out.write(json.dumps({k: row[k] for k in columns} if columns else row, ensure_ascii=False) + "\n")
                n += 1
    return n


# Two files of the same rows, on either side of hfbatch's auto-streaming threshold (in bytes): all four columns,
# and id/section/text only.
INPUTS = {"all columns": None, "id/section/text": ["id", "section", "text"]}


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}, min {min(values):.2f}, max {max(values):.2f}"


def compare(work: Path, big: Path, rows: int, runs: int, env: dict) -> dict:
    """hfbatch as a user runs it (auto streaming), hfbatch with the other streaming mode forced, and the
    peer, RUNS interleaved rounds (each round in another order); per side the rows/s of each run."""
    from hfbatch.ingestion import STREAMING_THRESHOLD

    auto_streams = big.stat().st_size > STREAMING_THRESHOLD
    other = "--no-streaming" if auto_streams else "--streaming"
    sides = {f"hfbatch (auto: {'streaming' if auto_streams else 'one parse'})": [],
             f"hfbatch {other}": [], "datasets": []}
    cmds = {name: (lambda out, extra=extra: [sys.executable, "-c", HFBATCH, "ingest", str(big), "-o", str(out),
                                             "--json", *extra])
            for name, extra in zip(list(sides)[:2], ([], [other]))}
    cmds["datasets"] = lambda out: [sys.executable, "-c", PEER, str(big), str(work / "peer-cache"), str(out)]
    names = list(sides)
    for i in range(runs):
        for name in names[i % 3:] + names[:i % 3]:
            out = work / "out-side"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "peer-cache", ignore_errors=True)
            r = measured(cmds[name](out), env)
            got = json.loads(r["out"].splitlines()[-1])["rows"] if name != "datasets" else int(r["out"].split()[-1])
            assert got == rows, r["out"]
            r["rows_s"] = rows / r["wall"]
            sides[name].append(r)
            print(f"  round {i + 1} {name:<32}: {r['wall']:6.2f} s wall, {r['cpu']:6.2f} s CPU, "
                  f"{r['rows_s']:>9,.0f} rows/s, peak RSS {r['rss_mb']:6.0f} MB", flush=True)
    shutil.rmtree(work / "out-side", ignore_errors=True)
    shutil.rmtree(work / "peer-cache", ignore_errors=True)
    peer = sides["datasets"]
    for name in names[:2]:
        ratios = [a["rows_s"] / b["rows_s"] for a, b in zip(sides[name], peer)]
        cpu = [b["cpu"] / a["cpu"] for a, b in zip(sides[name], peer)]
        print(f"  {name} / datasets, per round: {' '.join(f'{x:.2f}' for x in ratios)} ({spread(ratios)}); "
              f"CPU-seconds ratio {spread(cpu)}; peak RSS {max(r['rss_mb'] for r in sides[name]):.0f} MB vs "
              f"{max(r['rss_mb'] for r in peer):.0f} MB")
    return sides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="copies of the corpus (default 10)")
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds per input (default 5)")
    parser.add_argument("--workdir", default=None, help="where to put the corpus and outputs (default: a temp dir)")
    args = parser.parse_args()
    if not CORPUS.exists():
        sys.exit(f"{CORPUS} not found")
    from hfbatch.ingestion import STREAMING_THRESHOLD

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)  # a new folder is fine: the run's dir goes in it
    work = Path(tempfile.mkdtemp(prefix="hfbatch-bench-", dir=args.workdir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "HF_DATASETS_CACHE": str(work / "hf-cache"), "PYTHONUNBUFFERED": "1"}
    try:
        results = {}
        for label, columns in INPUTS.items():
            big = work / "corpus.jsonl"
            rows = make_corpus(big, args.repeat, columns)
            size = big.stat().st_size
            print(f"input {label}: {rows:,} rows, {size:,} bytes = {size / 2**20:.1f} MiB of JSON Lines "
                  f"({args.repeat} x {CORPUS.name}, fresh ids); auto-streaming threshold "
                  f"{STREAMING_THRESHOLD / 2**20:.0f} MiB: {'above' if size > STREAMING_THRESHOLD else 'below'}",
                  flush=True)
            results[label] = compare(work, big, rows, args.runs, env)
        last = results[label]
        ours = next(iter(last.values()))
        peer = last["datasets"]
        ratio = statistics.median(r["rows_s"] for r in ours) / statistics.median(r["rows_s"] for r in peer)
        peak = {"hfbatch": max(r["rss_mb"] for r in ours), "datasets": max(r["rss_mb"] for r in peer)}
        # the last input's output, kept for the iterate check
        measured([sys.executable, "-c", HFBATCH, "ingest", str(big), "-o", str(work / "out-hfbatch")], env)

        it = measured([sys.executable, "-c", ITERATE, str(work / "out-hfbatch")], env)
        n, chars = map(int, it["out"].split())
        print(f"iterate: {n:,} rows ({chars / 1e6:.0f} M characters) in {it['wall']:.1f} s, "
              f"peak RSS {it['rss_mb']:.0f} MB (limit {ITERATE_LIMIT_MB})")
        shutil.rmtree(work / "out-hfbatch", ignore_errors=True)

        round_trip = check_round_trip(work, env)
        checks = {"peak RSS < 1 GB": peak["hfbatch"] < RSS_LIMIT_MB,
                  "rows/s >= datasets (median, last input)": ratio >= 1.0,
                  "iterate RSS < 500 MB": it["rss_mb"] < ITERATE_LIMIT_MB and n == rows,
                  "round trip": round_trip}
        for name, ok in checks.items():
            print(f"  {'ok  ' if ok else 'FAIL'} {name}")
        print("PASS" if all(checks.values()) else "FAIL")
        return 0 if all(checks.values()) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_round_trip(work: Path, env: dict) -> bool:
    """The real corpus: ingest the .jsonl.gz, export to JSON Lines: the same rows, same order, same ids."""
    ds, exported = work / "debian", work / "debian.jsonl"
    start = time.perf_counter()
    measured([sys.executable, "-c", HFBATCH, "ingest", str(CORPUS), "-o", str(ds)], env)
    measured([sys.executable, "-c", HFBATCH, "export", str(ds), "-o", str(exported)], env)
    with gzip.open(CORPUS, "rt", encoding="utf-8") as a, open(exported, encoding="utf-8") as b:
        source, back = [json.loads(x) for x in a], [json.loads(x) for x in b]
    same = source == back
    first_diff = next((i for i, (x, y) in enumerate(zip(source, back)) if x != y), None)
    print(f"round trip: {len(source):,} rows ingested from {CORPUS.name} and exported to JSON Lines in "
          f"{time.perf_counter() - start:.1f} s: {'identical' if same else f'DIFFERENT (first at row {first_diff})'}")
    return same


if __name__ == "__main__":
    sys.exit(main())
