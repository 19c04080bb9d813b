"""tantivy (what hfbatch uses, through hfbatch.lexical) against bm25s for the lexical part of an index.

    python bench/lexical_engines.py quality [--n 10000]         # BM25 quality on the first-sentence proxy task
    python bench/lexical_engines.py scale [--n 1000000]         # build time, peak RSS, size, search RSS
    python bench/lexical_engines.py hfbatch [--n 1000000] [--memory-budget 1GB]   # the same through hfbatch

quality: the proxy task of bench/debian_retrieval.py (documents = descriptions without their first sentence,
query = the first sentence), on its test queries; both engines with English stop words and Snowball stemming.

scale: the Debian corpus repeated (fresh ids) to --n documents. Each engine builds in its own process (its peak
RSS is that process's, from rusage), then a second process opens the index (tantivy memory-maps it; bm25s is
loaded with mmap=True) and runs 200 queries; its RSS is read from /proc/self/status after them.

hfbatch: the whole path, each step its own process measured by rusage (bench/measure.py): the repeated corpus
written as JSON Lines, `hfbatch ingest`, `hfbatch index DATASET --kind lexical --memory-budget B` (peak RSS
of the build), the index's size on disk, then `hfbatch search --mode lexical` with 200 queries (peak RSS of
the search process: Python, pyarrow, the index's ids and the pages of the index its queries touched).

Measured on a 2-core machine shared with other jobs (wall times are inflated by them; CPU seconds are not):
    quality, 10,000 docs, 4,046 test queries    recall@10  MRR@10
      tantivy (hfbatch.lexical)                    0.5702  0.4375
      bm25s (stopwords="en", PyStemmer english)    0.5639  0.4276
    scale, 1M docs (Debian x 16.5), library calls       tantivy    bm25s
      build wall s                                         85.4   1207.1
      build peak RSS MB                                     203     1596   (bm25s holds every token id)
      size on disk MB                                      53.7    237.9
      search RSS after 200 queries MB (mmap)                141      346
      queries/s (8-word queries, one thread)               44.2      2.1
    hfbatch, 1M docs: `index ds --kind lexical --memory-budget 1GB`
      wall 251.6 s (CPU 35.1 s), peak RSS 749 MB = 283 MB anonymous + 483 MB file-backed (the mapped dataset)
      lexical part 53.7 MB on disk (index dir 57.8 MB with rows.parquet)
      `search --mode lexical`, 200 queries: peak RSS 368 MB = 114 MB anonymous + 228 MB file-backed
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from debian_retrieval import CORPUS, proxy_task  # noqa: E402
from debian_sections import read_corpus  # noqa: E402


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def texts_of(corpus, n):
    rows = read_corpus(corpus)
    texts = [" ".join((r.get("text") or "").split()) for r in rows]
    return [texts[i % len(texts)] for i in range(n)]


def build(engine, texts, directory):
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    if engine == "tantivy":
        from hfbatch.lexical import build_lexical

        batch = 10_000
        build_lexical(directory, (texts[i:i + batch] for i in range(0, len(texts), batch)))
    else:
        import bm25s
        import Stemmer

        tokens = bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False)
        model = bm25s.BM25()
        model.index(tokens, show_progress=False)
        model.save(str(directory))


class Opened:
    def __init__(self, engine, directory, count):
        self.engine = engine
        if engine == "tantivy":
            from hfbatch.lexical import LexicalIndex, analyzer_record

            self.index = LexicalIndex(Path(directory), {**analyzer_record("english"), "docs": count})
        else:
            import bm25s
            import Stemmer

            self.model = bm25s.BM25.load(str(directory), mmap=True)
            self.stemmer = Stemmer.Stemmer("english")

    def search(self, queries, k):
        """positions [queries, k] (-1: none)."""
        import numpy as np

        if self.engine == "tantivy":
            return self.index.search(queries, k)[1]
        import bm25s

        tokens = bm25s.tokenize(queries, stopwords="en", stemmer=self.stemmer, show_progress=False)
        docs, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return np.where(scores > 0, docs, -1)


def quality(args):
    from hfbatch import metrics

    docs, _, test = proxy_task(read_corpus(args.corpus), args.n, args.seed)
    out = {}
    for engine in ("tantivy", "bm25s"):
        directory = Path(args.workdir) / f"quality-{engine}"
        build(engine, [d["text"] for d in docs], directory)
        found = Opened(engine, directory, len(docs)).search([q["query"] for q in test], 10)
        ranked = [[str(docs[p]["id"]) for p in row if p >= 0] for row in found]
        relevant = [{str(i) for i in q["relevant"]} for q in test]
        scores = metrics.evaluate(zip(ranked, relevant), {n: metrics.STANDARD[n] for n in ("recall@10", "mrr@10")})
        out[engine] = {name: round(value, 4) for name, value in scores.items() if name != "queries"}
        print(engine, out[engine], flush=True)
    print(json.dumps({"n_docs": len(docs), "test_queries": len(test), **out}))


def scale(args):
    out = {}
    for engine in ("tantivy", "bm25s"):
        directory = Path(args.workdir) / f"scale-{engine}"
        common = [sys.executable, __file__, "--n", str(args.n), "--corpus", args.corpus, "--workdir", args.workdir]
        built = json.loads(run([*common, "_build", "--engine", engine]))
        searched = json.loads(run([*common, "_search", "--engine", engine]))
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        out[engine] = {**built, **searched, "disk_mb": round(size / 2**20, 1)}
        print(engine, out[engine], flush=True)
    print(json.dumps({"n_docs": args.n, **out}))


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout.strip().splitlines()[-1]


def child_build(args):
    texts = texts_of(args.corpus, args.n)
    before = rss_mb()[0]
    started = time.monotonic()
    build(args.engine, texts, Path(args.workdir) / f"scale-{args.engine}")
    seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"build_s": round(seconds, 1), "build_peak_rss_mb": round(peak), "texts_rss_mb": round(before)}))


def child_search(args):
    rows = read_corpus(args.corpus)
    queries = [" ".join(r["text"].split()[:8]) for r in rows[::max(1, len(rows) // 200)]][:200]
    opened_at = rss_mb()[0]
    opened = Opened(args.engine, Path(args.workdir) / f"scale-{args.engine}", args.n)
    after_open = rss_mb()[0]
    started = time.monotonic()
    opened.search(queries, 10)
    seconds = time.monotonic() - started
    now, peak = rss_mb()
    print(json.dumps({"search_qps": round(len(queries) / seconds, 1), "rss_before_open_mb": round(opened_at),
                      "rss_after_open_mb": round(after_open), "search_rss_mb": round(now),
                      "search_peak_rss_mb": round(peak)}))


def run_sampled(args) -> dict:
    """`hfbatch ARGS` as its own process: wall seconds, CPU seconds and peak RSS (rusage), and the peaks of its
    anonymous and file-backed resident memory (sampled from /proc every 0.2 s): file-backed pages are the
    memory-mapped dataset and index, which the kernel can drop at any time; anonymous ones are the job's own."""
    import threading

    from measure import hfbatch_command

    proc = subprocess.Popen([*hfbatch_command(), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0}

    def sample():
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]))
            except (OSError, ValueError):
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    errors = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"hfbatch {' '.join(map(str, args))} failed:\n{errors[-3000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "peak_anon_mb": round(peaks["RssAnon"] / 1024),
            "peak_file_mb": round(peaks["RssFile"] / 1024)}


def through_hfbatch(args):
    from measure import run_hfbatch

    w = Path(args.workdir)
    docs = w / f"docs-{args.n}.jsonl"
    if not docs.exists():
        rows = read_corpus(args.corpus)
        with open(docs, "w") as f:
            for i in range(args.n):
                row = rows[i % len(rows)]
                f.write(json.dumps({"id": i, "section": row.get("section"), "text": row.get("text")}) + "\n")
    out = {"n_docs": args.n, "memory_budget": args.memory_budget}
    if not (w / f"ds-{args.n}" / "manifest.json").exists():
        out["ingest_s"] = round(run_hfbatch(["ingest", docs, "-o", w / f"ds-{args.n}"]).wall_s, 1)
    built = run_sampled(["index", w / f"ds-{args.n}", "-o", w / f"lex-{args.n}", "--kind", "lexical",
                         "--memory-budget", args.memory_budget, "--force", "--json"])
    manifest = json.loads((w / f"lex-{args.n}" / "manifest.json").read_text())
    out.update(index={**built}, lexical_build_s=manifest["lexical"]["build_s"],
               lexical_mb=round(manifest["lexical"]["bytes"] / 2**20, 1),
               index_dir_mb=round(sum(p.stat().st_size for p in (w / f"lex-{args.n}").rglob("*") if p.is_file())
                                  / 2**20, 1))
    rows = read_corpus(args.corpus)
    queries = w / "queries.txt"
    queries.write_text("".join(" ".join(r["text"].split()[:6]) + "\n" for r in rows[::len(rows) // 200][:200]))
    out["search"] = run_sampled(["search", w / f"lex-{args.n}", "--queries", queries, "--mode", "lexical", "-k",
                                 "10"])
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quality", "scale", "hfbatch", "_build", "_search"])
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="tantivy")
    p.add_argument("--corpus", default=os.environ.get("HFBATCH_DEBIAN_CORPUS", CORPUS))
    p.add_argument("--workdir", default="/tmp/hfbatch-lexical")
    p.add_argument("--memory-budget", default="1GB", help="hfbatch: the index job's --memory-budget")
    args = p.parse_args()
    args.n = args.n or (10_000 if args.what == "quality" else 1_000_000)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    {"quality": quality, "scale": scale, "hfbatch": through_hfbatch, "_build": child_build,
     "_search": child_search}[args.what](args)


if __name__ == "__main__":
    main()
