"""`hfbatch index --incremental` against a full build (issue 6): 1% new rows on a 60k corpus.

    python bench/index_incremental.py                   # 60k x 384 synthetic, kinds auto (flat) and ivf
    python bench/index_incremental.py --n 200000 --kinds ivf

Makes N synthetic vectors (bench/index_scale.py's generator, as hard as text embeddings) and publishes them
as an `hfbatch embed`-like output, indexes them, then publishes the same rows plus --add-percent new ones
at the same path. Then, interleaved --repeat times so background load hits both alike:
  full         `hfbatch index EMB -o FULL --force`                         (a build from scratch)
  incremental  `hfbatch index EMB -o INC --incremental` on a fresh copy of the index of the old rows
each as its own process: wall seconds, CPU seconds (all threads; what load on a shared machine barely
changes) and the job's own elapsed_s from its manifest (after Python and hfbatch imports). Prints the
medians and the ratios incremental / full (target: <= 5%).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from measure import wall_and_cpu  # noqa: E402


def publish_embeddings(path: str, ids: np.ndarray, vectors: np.ndarray) -> None:
    import datasets

    from hfbatch.dataset import value_feature
    from hfbatch.embedding import embeddings_features, embeddings_table
    from hfbatch.runner import Job

    datasets.disable_progress_bars()
    with Job("embed", path, config={"benchmark": "index_incremental"}, force=True) as job:
        for shard, start in enumerate(range(0, len(ids), 20_000)):
            stop = min(len(ids), start + 20_000)
            job.shards.write_shard(shard, embeddings_table(ids[start:stop].tolist(), vectors[start:stop],
                                                           vectors.shape[1]))
        job.publish_dataset(-(-len(ids) // 20_000), embeddings_features(value_feature("int64"), vectors.shape[1]),
                            extra={"dim": vectors.shape[1]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=60_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--add-percent", type=float, default=1.0)
    p.add_argument("--kinds", default="auto,ivf", help="comma-separated --kind values")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/hfbatch-bench-incremental")
    args = p.parse_args()

    from index_scale import Synth

    added = int(args.n * args.add_percent / 100)
    gen = Synth(args.n + added, args.dim, seed=0)
    vectors = gen.rows(0, args.n + added)
    emb = os.path.join(args.workdir, "emb")
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    print(f"{args.n:,} x {args.dim} vectors, then {added:,} new ones ({args.add_percent}%); "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for kind in args.kinds.split(","):
        old_index, inc, full = (os.path.join(args.workdir, f"{name}-{kind}") for name in ("old", "inc", "full"))
        publish_embeddings(emb, np.arange(args.n), vectors[:args.n])
        wall_and_cpu(["index", emb, "-o", old_index, "--kind", kind])
        publish_embeddings(emb, np.arange(args.n + added), vectors)
        times = {"full": [], "incremental": []}
        for _ in range(args.repeat):
            wall, cpu = wall_and_cpu(["index", emb, "-o", full, "--kind", kind, "--force"])
            times["full"].append((wall, cpu, json.load(open(os.path.join(full, "manifest.json")))["elapsed_s"]))
            shutil.rmtree(inc, ignore_errors=True)
            shutil.copytree(old_index, inc)
            wall, cpu = wall_and_cpu(["index", emb, "-o", inc, "--kind", kind, "--incremental"])
            manifest = json.load(open(os.path.join(inc, "manifest.json")))
            assert manifest["update"] and manifest["update"]["added"] == added, manifest.get("update")
            times["incremental"].append((wall, cpu, manifest["elapsed_s"]))
        med = {mode: [statistics.median(t[i] for t in runs) for i in range(3)] for mode, runs in times.items()}
        ratios = [i / f for i, f in zip(med["incremental"], med["full"])]
        results[kind] = {"full": med["full"], "incremental": med["incremental"], "ratios": ratios,
                         "factory": manifest["factory"], "recall_at_10": manifest["recall_at_10"]}
        print(f"--kind {kind} ({manifest['factory']}), medians of {args.repeat}:")
        for mode in ("full", "incremental"):
            w, c, e = med[mode]
            print(f"  {mode:12} {w:7.2f} s wall  {c:7.2f} CPU-s  {e:7.2f} s in the job (manifest elapsed_s)")
        print(f"  incremental / full: {ratios[0]:.1%} wall, {ratios[1]:.1%} CPU, {ratios[2]:.1%} in the job; "
              f"recall@10 after the update {manifest['recall_at_10']:.4f}", flush=True)
    print(json.dumps({"n": args.n, "added": added, "load_avg": os.getloadavg(), **results}))


if __name__ == "__main__":
    main()
