"""`hfbatch embed --incremental` (and the index after it) against full runs (issue 6): 1% new documents.

    python bench/embed_incremental.py --model tiny            # a tiny random 32-d BERT (fast, like the tests)
    python bench/embed_incremental.py --model bundled --docs 2000   # the bundled all-MiniLM-L6-v2

Takes the first --docs documents of the shared Debian corpus, ingests and embeds them, then adds the next 1%
and measures, interleaved --repeat times: `embed --force` (full) against `embed --incremental` on a copy of
the old output, then `index --force` against `index --incremental` on the new embeddings. Each is its own
process; wall and CPU seconds, medians, ratios.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys

from measure import wall_and_cpu  # bench/ is on sys.path: these scripts run as `python bench/NAME.py`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(os.path.dirname(ROOT), "shared", "corpora", "debian-descriptions.jsonl.gz")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=6000)
    p.add_argument("--add-percent", type=float, default=1.0)
    p.add_argument("--model", default="tiny", help="tiny, bundled, or a model directory")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/hfbatch-bench-embed-incremental")
    args = p.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    w = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    model = []
    if args.model == "tiny":
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import make_tiny_model
        model = ["--model", make_tiny_model(__import__("pathlib").Path(w("tiny-model")))]
    elif args.model != "bundled":
        model = ["--model", args.model]
    added = int(args.docs * args.add_percent / 100)
    with gzip.open(CORPUS, "rt") as f:
        rows = [next(f) for _ in range(args.docs + added)]
    with open(w("docs.jsonl"), "w") as f:
        f.writelines(rows[:args.docs])
    wall_and_cpu(["ingest", w("docs.jsonl"), "-o", w("ds")])
    wall_and_cpu(["embed", w("ds"), "-o", w("emb-old"), *model])
    wall_and_cpu(["index", w("emb-old"), "-o", w("idx-old")])
    with open(w("docs.jsonl"), "w") as f:
        f.writelines(rows)
    wall_and_cpu(["ingest", w("docs.jsonl"), "-o", w("ds"), "--force"])
    print(f"{args.docs:,} docs + {added} new, model {args.model}, load {os.getloadavg()[0]:.1f}", flush=True)

    times = {k: [] for k in ("embed full", "embed incremental", "index full", "index incremental")}
    for _ in range(args.repeat):
        times["embed full"].append(wall_and_cpu(["embed", w("ds"), "-o", w("emb-full"), *model, "--force"]))
        shutil.rmtree(w("emb"), ignore_errors=True)
        shutil.copytree(w("emb-old"), w("emb"))
        times["embed incremental"].append(wall_and_cpu(["embed", w("ds"), "-o", w("emb"), *model, "--incremental"]))
        times["index full"].append(wall_and_cpu(["index", w("emb"), "-o", w("idx-full"), "--force"]))
        shutil.rmtree(w("idx"), ignore_errors=True)
        shutil.copytree(w("idx-old"), w("idx"))
        # idx-old names emb-old as its input; another input path is just another input change to --incremental
        times["index incremental"].append(wall_and_cpu(["index", w("emb"), "-o", w("idx"), "--incremental"]))
    computed = json.load(open(w("emb/manifest.json")))["counts"]
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    for k, (wall, cpu) in med.items():
        print(f"  {k:18} {wall:7.2f} s wall  {cpu:7.2f} CPU-s")
    for stage in ("embed", "index"):
        f, i = med[f"{stage} full"], med[f"{stage} incremental"]
        print(f"  {stage}: incremental / full {i[0] / f[0]:.1%} wall, {i[1] / f[1]:.1%} CPU")
    full = [a + b for a, b in zip(med["embed full"], med["index full"])]
    inc = [a + b for a, b in zip(med["embed incremental"], med["index incremental"])]
    print(f"  embed + index: incremental / full {inc[0] / full[0]:.1%} wall, {inc[1] / full[1]:.1%} CPU; "
          f"embed counts {computed}")
    print(json.dumps({"docs": args.docs, "added": added, "model": args.model, "medians": med,
                      "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
