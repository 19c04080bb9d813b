"""Benchmark: `hfbatch ingest` against `datasets.load_dataset("json") + save_to_disk` on 10x the Debian corpus.

    .venv/bin/python bench/ingest_memory.py [--repeat 10] [--runs 3] [--workdir DIR]

Generates the corpus (the shared Debian descriptions repeated REPEAT times, with fresh ids) as JSON Lines in
a temporary directory, then runs each side RUNS times as a subprocess, alternating, and reads each run's
peak RSS from the kernel (os.wait4's rusage of that child). The machine is shared and noisy, so only the
two sides of the same session are compared, on their median run (best runs and CPU seconds shown too). Then:
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


def make_corpus(path: Path, repeat: int) -> int:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    n = 0
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(repeat):
            for row in rows:
                out.write(json.dumps({**row, "id": n}, ensure_ascii=False) + "\n")
                n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="copies of the corpus (default 10)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each side, alternating (default 5)")
    parser.add_argument("--workdir", default=None, help="where to put the corpus and outputs (default: a temp dir)")
    args = parser.parse_args()
    if not CORPUS.exists():
        sys.exit(f"{CORPUS} not found")

    work = Path(tempfile.mkdtemp(prefix="hfbatch-bench-", dir=args.workdir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "HF_DATASETS_CACHE": str(work / "hf-cache"), "PYTHONUNBUFFERED": "1"}
    try:
        big = work / "corpus.jsonl"
        rows = make_corpus(big, args.repeat)
        print(f"corpus: {rows:,} rows, {big.stat().st_size / 1e6:.1f} MB of JSON Lines "
              f"({args.repeat} x {CORPUS.name}, fresh ids) in {work}")

        ours_cmd = lambda out: [sys.executable, "-c", HFBATCH, "ingest", str(big), "-o", str(out), "--json"]
        peer_cmd = lambda out: [sys.executable, "-c", PEER, str(big), str(work / "peer-cache"), str(out)]
        results = {"hfbatch": [], "datasets": []}
        for i in range(args.runs):
            sides = [("hfbatch", ours_cmd), ("datasets", peer_cmd)]
            for name, cmd in (sides if i % 2 == 0 else sides[::-1]):
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(work / "peer-cache", ignore_errors=True)
                r = measured(cmd(out), env)
                if name == "hfbatch":
                    assert json.loads(r["out"].splitlines()[-1])["rows"] == rows, r["out"]
                else:
                    assert int(r["out"].split()[-1]) == rows, r["out"]
                r["rows_s"] = rows / r["wall"]
                results[name].append(r)
                print(f"  run {i + 1} {name:<8}: {r['wall']:6.2f} s wall, {r['cpu']:6.2f} s CPU, "
                      f"{r['rows_s']:>9,.0f} rows/s, peak RSS {r['rss_mb']:6.0f} MB")
            shutil.rmtree(work / "out-datasets", ignore_errors=True)
        shutil.rmtree(work / "peer-cache", ignore_errors=True)

        median = {name: statistics.median(r["rows_s"] for r in runs) for name, runs in results.items()}
        best = {name: max(r["rows_s"] for r in runs) for name, runs in results.items()}
        cpu = {name: statistics.median(r["cpu"] for r in runs) for name, runs in results.items()}
        peak = {name: max(r["rss_mb"] for r in runs) for name, runs in results.items()}
        ratio = median["hfbatch"] / median["datasets"]
        paired = [a["rows_s"] / b["rows_s"] for a, b in zip(results["hfbatch"], results["datasets"])]
        print(f"median of {args.runs}: hfbatch {median['hfbatch']:,.0f} rows/s, datasets {median['datasets']:,.0f} "
              f"rows/s, ratio {ratio:.2f}x  (best: {best['hfbatch']:,.0f} vs {best['datasets']:,.0f}, "
              f"{best['hfbatch'] / best['datasets']:.2f}x; CPU seconds {cpu['hfbatch']:.2f} vs {cpu['datasets']:.2f}, "
              f"{cpu['datasets'] / cpu['hfbatch']:.2f}x; per-round ratios {' '.join(f'{x:.2f}' for x in paired)})")
        print(f"peak RSS: hfbatch {peak['hfbatch']:.0f} MB (limit {RSS_LIMIT_MB}), datasets {peak['datasets']:.0f} MB")

        it = measured([sys.executable, "-c", ITERATE, str(work / "out-hfbatch")], env)
        n, chars = map(int, it["out"].split())
        print(f"iterate: {n:,} rows ({chars / 1e6:.0f} M characters) in {it['wall']:.1f} s, "
              f"peak RSS {it['rss_mb']:.0f} MB (limit {ITERATE_LIMIT_MB})")
        shutil.rmtree(work / "out-hfbatch", ignore_errors=True)

        round_trip = check_round_trip(work, env)
        checks = {"peak RSS < 1 GB": peak["hfbatch"] < RSS_LIMIT_MB,
                  "rows/s >= datasets": ratio >= 1.0,
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
