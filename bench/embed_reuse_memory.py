#!/usr/bin/env python
"""What `embed --incremental` pays to reuse the vectors of a large old output, against loading them the way a
user would: the whole column copied into one numpy array (through pyarrow: `with_format("numpy")` is
~100x slower at 1M rows), in one run.

Builds a synthetic old output (--rows random vectors of --dim floats, with its content_hashes.parquet), then
in a fresh process each:
  hfbatch   PreviousVectors(old) + for every 10,000-row shard: reusable(ids, hashes) and vectors(rows)
  baseline  the whole embedding column as one numpy array, then the same rows by fancy indexing
and prints seconds, peak RSS (VmHWM: this process only) and the anonymous (private, not file-backed) memory
at the end. Memory-mapped pages count in RSS but belong to the page cache: they are shared between
processes and reclaimable, so the anonymous figure is what the job really holds.

    .venv/bin/python bench/embed_reuse_memory.py --rows 1000000 --dim 384
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD = 10_000


def build(path: Path, rows: int, dim: int) -> None:
    import datasets
    import numpy as np
    import pyarrow as pa

    from hfbatch.hashing import write_hash_file

    rng = np.random.default_rng(0)
    ids = pa.array(np.arange(rows, dtype=np.int64))
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    table = pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)})
    datasets.Dataset(table).save_to_disk(str(path), num_shards=max(1, rows // 250_000))
    write_hash_file(path, ids, rng.integers(0, 2**62, rows), scheme="xxh3_64")


def measure(which: str, path: Path) -> dict:
    import numpy as np

    from hfbatch.hashing import read_hash_file

    stored = read_hash_file(path)
    n = len(stored.hashes)
    start = time.perf_counter()
    checksum = 0.0
    if which == "hfbatch":
        from hfbatch.embedding import PreviousVectors

        previous = PreviousVectors(path)
        for lo in range(0, n, SHARD):
            ids = list(range(lo, min(n, lo + SHARD)))
            old = previous.reusable(ids, stored.hashes[lo:lo + len(ids)])
            checksum += float(previous.vectors(old)[:, 0].sum())
    else:
        import datasets

        column = datasets.load_from_disk(str(path)).data.table.column("embedding")
        everything = column.combine_chunks().flatten().to_numpy().reshape(len(column), -1)
        for lo in range(0, n, SHARD):
            checksum += float(everything[np.arange(lo, min(n, lo + SHARD))][:, 0].sum())
    seconds = time.perf_counter() - start
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith(("RssAnon", "RssFile", "VmHWM")))
    # VmHWM, not ru_maxrss: ru_maxrss keeps the peak of the parent this process was forked from
    return {"seconds": seconds, "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024,
            "anon_mb": int(status["RssAnon"].split()[0]) / 1024, "file_mb": int(status["RssFile"].split()[0]) / 1024,
            "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--only", choices=["hfbatch", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:  # child mode: one measurement in a fresh process
        print(json.dumps(measure(args.only, args.path)))
        return
    with tempfile.TemporaryDirectory(prefix="reuse-memory-") as tmp:
        path = Path(tmp) / "old"
        build(path, args.rows, args.dim)
        print(f"old output: {args.rows:,} x {args.dim} float32 = {args.rows * args.dim * 4 / 2**20:.0f} MB of vectors")
        results = {}
        for which in ("baseline", "hfbatch"):
            done = subprocess.run([sys.executable, __file__, "--only", which, "--path", str(path)],
                                  capture_output=True, text=True, check=True)
            results[which] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[which]
            print(f"  {which:8s} {r['seconds']:6.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
                  f"anonymous {r['anon_mb']:6.0f} MB  file-backed {r['file_mb']:6.0f} MB")
        assert abs(results["baseline"]["checksum"] - results["hfbatch"]["checksum"]) < 1e-3, "different vectors"
        print(f"same vectors; anonymous memory {results['hfbatch']['anon_mb'] / results['baseline']['anon_mb']:.2f}x "
              f"the baseline's, time {results['hfbatch']['seconds'] / results['baseline']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
