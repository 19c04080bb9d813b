"""Retrieval quality on Debian package descriptions, dense, lexical and hybrid, through the real hfbatch commands.

    python bench/debian_retrieval.py                      # 10,000 random packages, bundled MiniLM
    python bench/debian_retrieval.py --n 2000 --keep-first-sentence
    python bench/debian_retrieval.py --chunk-tokens 128 --chunk-overlap 32   # embed --chunk-tokens: documents
                                                                             # are ranked by their best window
    python bench/debian_retrieval.py --reuse              # the same outputs again (only the evaluation reruns)

The proxy task (proxy_task): each sampled package's description is split into its first sentence and the
rest. The first sentence is the query; the document indexed for the package is the rest of its description
(with --keep-first-sentence, the whole description: an easier, near-duplicate task). Packages whose
descriptions share the same first sentence (0ad-data, 0ad-data-common, ...) cannot be told apart by it,
so such a sentence is asked once and all of them count as relevant. The distinct queries are shuffled and
halved: hybrid's lexical weight is chosen on the dev half (sweep_weights: best recall@10 + MRR@10), and the
three modes are reported on the test half, at that weight (`hfbatch evaluate --modes dense,lexical,hybrid`).

Then: hfbatch ingest -> embed -> index (with its lexical part) -> evaluate --json, each as its own process,
timed. The corpus (/work/shared/corpora/debian-descriptions.jsonl.gz) is read, never copied into the
repository.

Measured (bundled MiniLM, max 256 tokens, seed 0, flat index, tantivy BM25 with English stop words and
stemming; 10,000 documents, 4,045 dev and 4,046 test queries):
    dev, hybrid by lexical weight    0.0    0.1    0.2    0.3    0.4    0.5    0.6    0.8    1.0
      recall@10                    0.617  0.645  0.660  0.656  0.642  0.625  0.608  0.581  0.555
      MRR@10                       0.478  0.510  0.524  0.518  0.501  0.480  0.462  0.433  0.412
    test, weight 0.2 (chosen)      recall@1  recall@10  MRR@10  nDCG@10
      dense                          0.3847     0.6289  0.4923   0.5201
      lexical                        0.3369     0.5702  0.4375   0.4652
      hybrid                         0.4315     0.6742  0.5406   0.5681
Earlier (5,000 docs, dense only, all queries):
    5,000 docs without the first sentence   recall@10  MRR@10   index rows
      no chunking                           0.6744     0.5412   5,000
      --chunk-tokens 128 --chunk-overlap 32 0.6733     0.5406   5,716
      --chunk-tokens 64 --chunk-overlap 16  0.6635     0.5307   8,107
    2,000 docs, --keep-first-sentence
      no chunking                           0.9980     0.9944   2,000
      --chunk-tokens 64 --chunk-overlap 16  0.9980     0.9930   3,752
Chunking does not help here: these descriptions are short enough for the model, and a window sees less
of the package than the whole description does.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re

from debian_sections import read_corpus
from measure import run_hfbatch

CORPUS = "/work/shared/corpora/debian-descriptions.jsonl.gz"
SENTENCE = re.compile(r"^(.+?[.!?])(?:\s+|$)(.*)$", re.DOTALL)


def split_first_sentence(text: str) -> tuple[str, str]:
    flat = " ".join(text.split())
    m = SENTENCE.match(flat)
    if not m:
        return flat, ""
    return m.group(1), m.group(2)


def proxy_task(rows, n: int, seed: int = 0, keep_first_sentence: bool = False):
    """(documents, dev queries, test queries) of the first-sentence task over `n` sampled packages.

    A query is a first sentence with every package it begins as relevant; the distinct queries are shuffled
    (seed) and split in halves: the lexical weight is chosen on dev, figures are reported on test."""
    docs, groups = [], {}
    for row in rows:
        first, rest = split_first_sentence(row.get("text") or "")
        body = " ".join((row.get("text") or "").split()) if keep_first_sentence else rest
        if len(first) >= 15 and len(body) >= 20:
            docs.append({"id": row["id"], "package": row["package"], "section": row.get("section"),
                         "text": body, "first": first})
    random.Random(seed).shuffle(docs)
    docs = sorted(docs[:n], key=lambda d: d["id"])
    for d in docs:
        groups.setdefault(d["first"], []).append(d["id"])
    queries = [{"query": first, "relevant": ids} for first, ids in groups.items()]
    random.Random(seed + 1).shuffle(queries)
    half = len(queries) // 2
    return docs, queries[:half], queries[half:]


def hfbatch(*args) -> tuple[str, float]:
    """(stdout, wall seconds) of `hfbatch ARGS`; a failure ends the benchmark."""
    measured = run_hfbatch(args)
    return measured.done.stdout, measured.wall_s


WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def sweep_weights(index_dir, queries, weights=WEIGHTS) -> dict:
    """recall@10 and MRR@10 of hybrid search at each lexical weight on `queries` (in this process: the queries
    are embedded and both parts searched once per weight, through hfbatch.retrieval's Searcher)."""
    from hfbatch.retrieval import Searcher, ranked_metrics

    searcher = Searcher(index_dir, mode="hybrid", device="cpu")
    texts = [q["query"] for q in queries]
    relevant = [{str(i) for i in q["relevant"]} for q in queries]
    vectors = searcher.embed(texts)
    out = {}
    for weight in weights:
        searcher.lexical_weight = weight
        _, positions = searcher.search(texts, 10, vectors=vectors)
        found = ranked_metrics(searcher, positions, relevant, 10)
        out[weight] = {"recall@10": found["recall@10"], "mrr@10": found["mrr@10"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--n", type=int, default=10_000, help="packages sampled (at random, --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/hfbatch-debian")
    p.add_argument("--keep-first-sentence", action="store_true",
                   help="index whole descriptions (the query is then part of its document)")
    p.add_argument("--model", default=None, help="hfbatch embed --model (default: the bundled MiniLM)")
    p.add_argument("--embed-args", default="", help="extra arguments for hfbatch embed, e.g. '--device cuda'")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="hfbatch embed --chunk-tokens N: index overlapping windows, rank documents by their best")
    p.add_argument("--chunk-overlap", type=int, default=0, help="hfbatch embed --chunk-overlap M")
    p.add_argument("--reuse", action="store_true", help="keep the dataset, embeddings and index of an earlier run")
    args = p.parse_args()

    docs, dev, test = proxy_task(read_corpus(args.corpus), args.n, args.seed, args.keep_first_sentence)
    w = args.workdir
    os.makedirs(w, exist_ok=True)
    write_jsonl(f"{w}/docs.jsonl", ({k: d[k] for k in ("id", "package", "section", "text")} for d in docs))
    write_jsonl(f"{w}/dev.jsonl", dev)
    write_jsonl(f"{w}/test.jsonl", test)
    kept = 'whole descriptions' if args.keep_first_sentence else 'descriptions without their first sentence'
    print(f"{len(docs):,} documents ({kept}); distinct first-sentence queries: {len(dev):,} dev, "
          f"{len(test):,} test", flush=True)

    model = ["--model", args.model] if args.model else []
    chunking, suffix = [], ""
    if args.chunk_tokens:
        chunking = ["--chunk-tokens", args.chunk_tokens, "--chunk-overlap", args.chunk_overlap]
        suffix = f"-chunks{args.chunk_tokens}-{args.chunk_overlap}"  # runs with other windows keep their outputs
    force = [] if args.reuse else ["--force"]
    times = {}
    _, times["ingest"] = hfbatch("ingest", f"{w}/docs.jsonl", "-o", f"{w}/ds", *force)
    _, times["embed"] = hfbatch("embed", f"{w}/ds", "-o", f"{w}/emb{suffix}", *force, *model, *chunking,
                                *args.embed_args.split())
    _, times["index"] = hfbatch("index", f"{w}/emb{suffix}", "-o", f"{w}/idx{suffix}", *force)
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()), flush=True)

    sweep = sweep_weights(f"{w}/idx{suffix}", dev)
    print("dev queries, hybrid by lexical weight (0: dense ranking over the fused candidates, 1: lexical):")
    for weight, found in sweep.items():
        print(f"  {weight:.1f}  recall@10 {found['recall@10']:.4f}  MRR@10 {found['mrr@10']:.4f}")
    chosen = max(sweep, key=lambda weight: (sweep[weight]["mrr@10"] + sweep[weight]["recall@10"], -weight))
    print(f"chosen on dev (best recall@10 + MRR@10): {chosen}", flush=True)

    out, times["evaluate"] = hfbatch("evaluate", f"{w}/idx{suffix}", "--queries", f"{w}/test.jsonl", "--json",
                                     "-k", "10", "--modes", "dense,lexical,hybrid", "--lexical-weight", chosen)
    result = json.loads(out)
    print(f"test queries ({result['queries']:,}), lexical weight {chosen}:")
    print(f"  {'mode':<8} {'recall@1':>9} {'recall@10':>10} {'MRR@10':>8} {'nDCG@10':>8}")
    for row in result["modes"]:
        print(f"  {row['mode']:<8} {row['recall@1']:>9.4f} {row['recall@10']:>10.4f} {row['mrr@10']:>8.4f} "
              f"{row['ndcg@10']:>8.4f}")
    print(json.dumps({"n_docs": len(docs), "dev_queries": len(dev), "test_queries": len(test),
                      "keep_first_sentence": args.keep_first_sentence, "chunk_tokens": args.chunk_tokens,
                      "chunk_overlap": args.chunk_overlap if chunking else None, "step_seconds": times,
                      "dev_sweep": sweep, "lexical_weight": chosen,
                      "test": {row["mode"]: row for row in result["modes"]}}))


if __name__ == "__main__":
    main()
