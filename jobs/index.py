"""hfbatch index: an embeddings dataset -> a FAISS index directory, tuned to a target recall."""

from __future__ import annotations

import time

import click

from hfbatch import log
from hfbatch.cli import force_option, json_summary, output_option
from hfbatch.errors import InputError
from hfbatch.runner import Job

INDEX_FILE = "index.faiss"
TUNING_QUERIES = 1000


def parse_bytes(value: str | None) -> int | None:
    """'4GB', '512MiB', '2.5G' or a plain number of bytes."""
    if value is None:
        return None
    text = value.strip().upper().replace("IB", "B")
    units = {"TB": 2**40, "GB": 2**30, "MB": 2**20, "KB": 2**10, "T": 2**40, "G": 2**30, "M": 2**20, "K": 2**10,
             "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            text, factor = text[: -len(unit)], scale
            break
    else:
        factor = 1
    try:
        return int(float(text) * factor)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a size like 4GB or 512MB", param_hint="--memory-budget")


def default_budget() -> int:
    """Half the memory available now: the index must fit beside the reader and the OS cache."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 * 2**30


@click.command()
@click.argument("embeddings", type=click.Path(exists=True, file_okay=False))
@output_option
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "hnsw", "ivfpq"]), default="auto",
              show_default=True, help="auto: exact Flat for small sets, IVF+PQ with re-ranking for large ones.")
@click.option("--factory", default=None, metavar="STRING",
              help="Any faiss.index_factory string (experts; overrides --kind), e.g. 'IVF1024,PQ96x4fs,RFlat'.")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Largest index to build, e.g. 4GB (default: half the available memory).")
@click.option("--target-recall", type=click.FloatRange(0.01, 1.0), default=0.95, show_default=True,
              help="recall@10 against exact search that nprobe/efSearch are tuned to reach.")
@force_option
@json_summary("index")
def index(embeddings, output, kind, factory, memory_budget, target_recall, force):
    """Build a FAISS index over EMBEDDINGS (an `hfbatch embed` output) in OUTPUT.

    Approximate indexes are tuned after the build: recall@10 is measured against exact search on held-out
    queries and nprobe/efSearch raised until --target-recall is reached; the manifest records the factory
    string, build time, search parameters, recall and QPS (`hfbatch info` shows them).

    \b
    Example:
        hfbatch index out/embeddings -o out/index --memory-budget 4GB
    """
    budget = parse_bytes(memory_budget)
    config = {"kind": kind, "factory": factory, "memory_budget": memory_budget, "target_recall": target_recall}
    with Job("index", output, config=config, datasets=[embeddings], force=force) as job:
        if job.up_to_date:
            return job.summary()
        from hfbatch import index as faiss_index
        from hfbatch.io import open_dataset, require_column

        dataset, emb_manifest = open_dataset(embeddings, "embeddings")
        require_column(dataset, "embedding", embeddings, option="hfbatch embed")
        del dataset  # vectors are read straight from the Arrow files below
        vectors = faiss_index.ArrowVectors(embeddings)
        n, dim = vectors.n, vectors.dim
        if n == 0:
            raise InputError(f"{embeddings}: no vectors to index")
        budget = budget or default_budget()
        if factory:
            plan = faiss_index.plan_for_factory(factory, n, dim)
        elif kind == "auto":
            plan = faiss_index.choose_index(n, dim, budget, target_recall)
        else:
            plan = faiss_index.plan_for_kind(kind, n, dim, budget)
        log.event("index", "plan", kind=plan.kind, factory=plan.factory, vectors=n, dim=dim, why=plan.reasons)
        started = time.monotonic()
        try:
            with log.Progress("index", n, unit="vectors") as progress:
                built = faiss_index.build_index(plan, n, dim, vectors, progress=progress.update)
        except RuntimeError as exc:  # faiss rejects a factory string or its training
            raise InputError(f"faiss could not build {plan.factory!r}: {str(exc).splitlines()[0]}")
        build_s = time.monotonic() - started
        search = tune(faiss_index, built, vectors, n, plan, target_recall)

        def fill(tmp):
            faiss_index.save_index(built, tmp / INDEX_FILE)

        job.publish_files(fill, rows=n, extra={
            "kind": plan.kind, "factory": plan.factory, "metric": plan.metric, "reasons": plan.reasons,
            "params": {k: v for k, v in search.items() if k not in ("recall", "qps")},
            "recall_at_10": round(search["recall"], 4), "qps": round(search["qps"], 1),
            "build_s": round(build_s, 3), "train_size": plan.train_size, "dim": dim, "count": n,
            "embeddings": str(job.inputs[0]["path"]), "source_dataset": emb_manifest.get("source_dataset"),
            "text_column": emb_manifest.get("text_column"), "model": emb_manifest.get("model"),
            "chunking": emb_manifest.get("chunking"),  # set: rows are windows of documents (embed --chunk-tokens)
            "embedding_settings": {k: emb_manifest.get(k)
                                   for k in ("precision", "backend", "device", "pooling", "max_length")}})
        log.event("index", "quality", recall_at_10=f"{search['recall']:.4f}", qps=f"{search['qps']:.0f}",
                  params={k: v for k, v in search.items() if k not in ("recall", "qps")})
        return {**job.summary(), "recall_at_10": round(search["recall"], 4), "factory": plan.factory}


def tune(faiss_index, built, vectors, n, plan, target_recall):
    """Measure recall@10 against exact search on held-out-like queries; tune approximate indexes."""
    queries = faiss_index.tuning_queries(vectors, n, num=min(TUNING_QUERIES, n))
    k = min(10, n)
    _, truth = faiss_index.exact_neighbors(vectors, n, queries, k)
    if plan.kind == "flat":
        found, qps = faiss_index.timed_search(built, queries, k)
        return {"recall": faiss_index.recall_at_k(found, truth, k), "qps": qps}
    return faiss_index.tune_search_params(built, queries, truth, target_recall, k)
