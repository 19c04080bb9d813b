#!/usr/bin/env python
"""Peak RSS of the real `hfbatch embed` process against corpus size: shards are streamed to disk, so the peak
should follow --shard-rows, not the number of documents.

For each N: `hfbatch ingest CORPUS --limit N` (not measured), then `hfbatch embed` as a child process whose
peak resident set is read from its own rusage (bench/measure.py).

    .venv/bin/python bench/embed_memory.py --n 2000,10000 [--shard-rows 10000] [--workdir DIR]

Prints N, shards, wall seconds, docs/s and peak RSS per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_vs_st import CORPUS  # noqa: E402
from measure import run_hfbatch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="2000,10000", help="corpus sizes (first N docs of --corpus)")
    ap.add_argument("--corpus", default=CORPUS)
    ap.add_argument("--shard-rows", type=int, default=None, help="embed --shard-rows (default: embed's own)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workdir", default="/tmp/hfbatch-embed-memory")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(x) for x in args.n.split(",")):
        ds = work / f"ds-{n}"
        run_hfbatch(["ingest", args.corpus, "-o", ds, "--limit", n])
        embed = ["embed", ds, "-o", work / f"emb-{n}", "--precision", args.precision, "--force", "--json"]
        if args.shard_rows:
            embed += ["--shard-rows", args.shard_rows]
        measured = run_hfbatch(embed)
        wall, peak = measured.wall_s, measured.peak_rss_mb
        manifest = json.loads((work / f"emb-{n}" / "manifest.json").read_text())
        shards = -(-n // manifest["config"]["shard_rows"])
        results.append({"n": n, "shards": shards, "shard_rows": manifest["config"]["shard_rows"], "wall_s": wall,
                        "docs_per_s": n / wall, "peak_rss_mb": peak})
        print(f"n={n} shards={shards} (shard_rows {manifest['config']['shard_rows']}) wall={wall:.0f}s "
              f"docs/s={n / wall:.1f} peak_rss={peak:.0f} MB load_avg={os.getloadavg()[0]:.1f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
