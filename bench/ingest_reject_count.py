"""`ingest` of many small files with a count-type --max-rejects vs a fraction: the count is checked after
every unit, and must cost no more than the fraction (a running count, not a re-read of every shard record).

    python bench/ingest_reject_count.py --files 3000

Prints the CPU seconds of both runs and their ratio; before the running count, the count run re-read all
finished shard records after each unit (quadratic in the files).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from measure import wall_and_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3000, help="input files, one unit (shard) each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i in range(args.files):
            lines = [json.dumps({"text": f"file {i} row {r}"}) for r in range(3)] + ["{not json"]
            (corpus / f"{i:06d}.jsonl").write_text("\n".join(lines) + "\n")
        results = {}
        for label, limit in (("fraction 50%", "50%"), ("count", str(10 * args.files))):
            wall, cpu = wall_and_cpu(["ingest", corpus, "-o", Path(tmp) / label.replace(" ", "_"),
                                      "--max-rejects", limit])
            results[label] = cpu
            print(f"{label:>13}: {wall:7.1f} s wall, {cpu:7.1f} s CPU ({args.files} units, 1 reject each)")
        print(f"count / fraction CPU: {results['count'] / results['fraction 50%']:.2f}")


if __name__ == "__main__":
    main()
