"""`hfbatch embed --executor ray` against `--executor local` on the shared Debian corpus (issue 18).

    python bench/embed_ray.py                         # the bundled all-MiniLM-L6-v2, first 10,000 documents
    python bench/embed_ray.py --docs 0 --model tiny   # the whole corpus, a tiny random 32-d BERT

Ingests the first --docs documents (0: all 60,558), embeds them once unmeasured (the OpenVINO conversion is
cached then), then embeds them again, each run its own process:
  - local: `--executor local`;
  - ray-1, ray-2: `--executor ray --num-workers 1|2`, joining a Ray head started beforehand with
    `ray start --head --num-cpus CORES` (so Ray's own start-up is not counted; it is measured apart);
  - ray-1-on-demand: `--executor ray --num-workers 1` with no cluster: the job starts a local Ray and stops it;
  - and the executor's own cost per shard: a claim and a report to its ShardQueue actor.
--repeat rounds of the four, interleaved (medians). Prints docs/s and each Ray run's overhead against local,
and checks that every output has the local ids, in order, and its vectors (max abs difference). On a machine
with few cores the workers share them: Ray adds overhead there and cannot add speed; what scales on a
cluster is the number of nodes/GPUs (see README).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from measure import run_hfbatch  # bench/ is on sys.path: these scripts run as `python bench/NAME.py`

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpora" / "debian-descriptions.jsonl.gz"


def ray_cli() -> str:
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        raise SystemExit(f"Ray is not installed in {sys.prefix}: pip install 'hfbatch[ray]'")
    return str(ray)


def start_head(cores: int, env: dict) -> tuple[subprocess.Popen, str]:
    """A Ray head node of this benchmark's own (`ray start --head --block`), and its address."""
    import re
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen([ray_cli(), "start", "--head", "--block", f"--port={port}", f"--num-cpus={cores}",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    said = []
    for line in head.stdout:
        said.append(line)
        found = re.search(r"ray start --address='([^']+)'", line)
        if found:
            threading_drain(head)
            return head, found.group(1)
    raise SystemExit(f"ray start --head failed:\n{''.join(said)[-2000:]}")


def threading_drain(proc: subprocess.Popen) -> None:
    """Keep reading the head's output, so it never blocks on a full pipe."""
    import threading

    threading.Thread(target=proc.stdout.read, daemon=True).start()


def shard_round_trip_ms(address: str, env: dict, shards: int = 200) -> float:
    """What the Ray executor's bookkeeping costs per shard: a worker's claim and its finished-shard report
    to the ShardQueue actor (two actor calls), timed from a process of its own joined to the head."""
    code = f"""
import os, time, ray
from hfbatch.ray_executor import ShardQueue
ray.init(address={address!r}, logging_level="error")
queue = ray.remote(ShardQueue).options(num_cpus=0).remote(list(range({shards})))
ray.get(queue.poll.remote())
start = time.perf_counter()
while (shard := ray.get(queue.claim.remote("w"))) is not None:
    ray.get(queue.report.remote(1, ("w", shard, 1, 0)))
print((time.perf_counter() - start) / {shards} * 1000)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"timing the shard round trip failed:\n{done.stderr[-2000:]}")
    return round(float(done.stdout.strip().splitlines()[-1]), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=10_000, help="first N documents of the corpus (0: all)")
    p.add_argument("--model", default="bundled", help="bundled, tiny, or a model directory")
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs the Ray head offers")
    p.add_argument("--repeat", type=int, default=2, help="rounds of the four runs, interleaved (medians)")
    p.add_argument("--workdir", default="/tmp/hfbatch-bench-embed-ray")
    args = p.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = []
    if args.model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_tiny_model

        model = ["--model", make_tiny_model(work / "tiny-model")]
    elif args.model != "bundled":
        model = ["--model", args.model]
    with gzip.open(CORPUS, "rt") as f, open(work / "docs.jsonl", "w") as out:
        for n, line in enumerate(f):
            if args.docs and n >= args.docs:
                break
            out.write(line)
    run_hfbatch(["ingest", work / "docs.jsonl", "-o", work / "ds"])
    docs = json.loads((work / "ds" / "manifest.json").read_text())["rows"]
    common = ["embed", work / "ds", *model, "--shard-rows", args.shard_rows, "--json"]
    # the on-demand runs must not find a cluster through the environment; the head and its drivers agree on
    # authentication (ray start and ray.init decide it differently when ~/.ray/auth_token exists)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}

    results = {}
    ray = ["--executor", "ray", "--num-workers"]
    runs = [("local", [], False), ("ray-1", [*ray, "1"], True), ("ray-2", [*ray, "2"], True),
            ("ray-1-on-demand", [*ray, "1"], False)]  # (name, options, joins the head)

    def embed(name, extra, joins, address):
        joined = ["--ray-address", address] if joins else []
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        measured = run_hfbatch([*common, "-o", out, *extra, *joined], env)
        summary = json.loads(measured.done.stdout.strip().splitlines()[-1])
        r = results.setdefault(name, {"wall_s": [], "workers": summary.get("workers")})
        r["wall_s"].append(round(measured.wall_s, 2))
        print(f"{name:16s} {measured.wall_s:8.1f} s {docs / measured.wall_s:9.1f} docs/s", flush=True)

    # unmeasured: the first run converts the model for OpenVINO (cached), which no measured run should pay
    run_hfbatch([*common, "-o", work / "warm-up"], env)
    head, address = start_head(args.cores, env)
    try:
        for _ in range(args.repeat):  # interleaved, so a busy spell on a shared machine hits every variant
            for name, extra, joins in runs:
                embed(name, extra, joins, address)
        per_shard_ms = shard_round_trip_ms(address, env)
    finally:
        head.terminate()  # `ray start --block` stops the processes it started (never `ray stop`: it ends every Ray)
        head.wait(timeout=120)
    for r in results.values():
        r["median_wall_s"] = statistics.median(r["wall_s"])
        r["docs_per_s"] = round(docs / r["median_wall_s"], 1)

    import datasets
    import numpy as np

    local = datasets.load_from_disk(str(work / "local"))
    local_vectors = np.asarray(local["embedding"])
    for name in results:
        other = datasets.load_from_disk(str(work / name))
        results[name]["same_ids_in_order"] = other["id"] == local["id"]
        results[name]["max_abs_diff"] = float(np.abs(np.asarray(other["embedding"]) - local_vectors).max())
    base = results["local"]["median_wall_s"]
    for r in results.values():
        r["overhead_vs_local"] = f"{(r['median_wall_s'] - base) / base:+.1%}"
    print(json.dumps({"docs": docs, "shard_rows": args.shard_rows, "cores": os.cpu_count(), "model": args.model,
                      "ray_calls_per_shard_ms": per_shard_ms, "results": results}, indent=2))
    if not all(r["same_ids_in_order"] and r["max_abs_diff"] <= 1e-5 for r in results.values()):
        raise SystemExit("an output differs from the local one")


if __name__ == "__main__":
    main()
