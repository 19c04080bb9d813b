"""hfbatch index: an embeddings dataset -> a FAISS index directory, tuned to a target recall."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from hfbatch import log
from hfbatch.cli import SizeType, force_option, json_summary, output_option
from hfbatch.errors import InputError
from hfbatch.runner import Job

SIMILARITY_METRICS = ("cosine", "dot", "euclidean")  # lib/index.py SIMILARITY_METRIC, without importing faiss
INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"  # faiss id -> the row's id (and chunk), for search; its vector hash, for --incremental
CHUNK_COLUMNS = ("doc_id", "chunk", "char_start", "char_end")  # embed --chunk-tokens: which window a row is
EMBEDDINGS_KEY = "embeddings_manifest_sha256"  # manifest keys: the versions of the inputs that were indexed
SOURCE_KEY = "source_manifest_sha256"
TUNING_QUERIES = 300
FLAT_QPS_QUERIES = 100     # a Flat index's recall is 1 by construction; the batch only checks it and times QPS


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
@click.option("--memory-budget", type=SizeType(), default=None, metavar="SIZE",
              help="Largest index to build, e.g. 4GB (10^9 bytes) or 4GiB (2^30) (default: half the available "
                   "memory).")
@click.option("--target-recall", type=click.FloatRange(0.01, 1.0), default=0.95, show_default=True,
              help="recall@10 against exact search that nprobe/efSearch are tuned to reach.")
@force_option
@click.option("--incremental", is_flag=True,
              help="OUTPUT exists from older EMBEDDINGS: remove the vectors of deleted or changed rows and add "
                   "new or changed ones in place (flat, ivf); other kinds, or a corpus that more than doubled "
                   "since the lists were trained, are rebuilt.")
@json_summary("index")
def index(embeddings, output, kind, factory, memory_budget, target_recall, force, incremental):
    """Build a FAISS index over EMBEDDINGS (an `hfbatch embed` output) in OUTPUT.

    Approximate indexes are tuned after the build: recall@10 is measured against exact search on held-out
    queries and nprobe/efSearch raised until --target-recall is reached; the manifest records the factory
    string, build time, search parameters, recall and QPS (`hfbatch info` shows them).

    \b
    Example:
        hfbatch index out/embeddings -o out/index --memory-budget 4GB
        hfbatch index out/embeddings -o out/index --incremental   # after re-embedding a changed corpus
    """
    from hfbatch.runner import require_complete

    budget = memory_budget and int(memory_budget)
    similarity = embeddings_similarity(require_complete(Path(embeddings), "embeddings"), embeddings)  # refused first
    config = {"kind": kind, "factory": factory, "memory_budget": memory_budget and memory_budget.text,
              "target_recall": target_recall}
    with Job("index", output, config=config, datasets=[embeddings], force=force, incremental=incremental) as job:
        if job.up_to_date:
            return job.summary()
        from hfbatch import index as faiss_index
        from hfbatch.io import open_dataset, require_column

        dataset, emb_manifest = open_dataset(embeddings, "embeddings")
        require_column(dataset, "embedding", embeddings, option="hfbatch embed")
        require_column(dataset, "id", embeddings, option="hfbatch embed")  # search names its hits by id
        row_table = dataset.data.table.select([c for c in ("id", *CHUNK_COLUMNS) if c in dataset.column_names])
        ids = row_table.column("id").combine_chunks()
        del dataset  # vectors are read straight from the Arrow files below
        vectors = faiss_index.ArrowVectors(embeddings)
        if similarity == "cosine":  # cosine is inner product over unit vectors; a model may not normalise
            vectors = faiss_index.UnitRows(vectors)
        n, dim = vectors.n, vectors.dim
        if n == 0:
            raise InputError(f"{embeddings}: no vectors to index")
        metric = faiss_index.SIMILARITY_METRIC[similarity]
        plan = make_plan(faiss_index, n, dim, kind, factory, budget or default_budget(), target_recall, metric)
        log.event("index", "plan", kind=plan.kind, factory=plan.factory, vectors=n, dim=dim, why=plan.reasons,
                  similarity=similarity)

        phases, update = {}, None
        if job.previous is not None:
            update = update_previous(faiss_index, job, plan, similarity, vectors, ids, phases)
        if update is None:
            built, hashes = build(faiss_index, plan, vectors, phases)
            lineage = {"trained_on": n if plan.train_size else None, "added_since_training": 0}
            keep, counts = None, None
        else:
            built, hashes, lineage, counts = update
            keep = job.previous.get("params")
            # the index keeps its structure (e.g. its number of IVF lists) until it is rebuilt
            plan = dataclasses.replace(plan, factory=job.previous["factory"], reasons=job.previous["reasons"],
                                       train_size=job.previous.get("train_size", plan.train_size))
        search = measure_quality(faiss_index, built, vectors, plan, target_recall, phases, keep=keep)

        params = {k: v for k, v in search.items() if k not in ("recall", "qps")}
        extra = {
            "kind": plan.kind, "factory": plan.factory, "metric": plan.metric, "similarity": similarity,
            "reasons": plan.reasons,
            "params": params, "recall_at_10": round(search["recall"], 4), "qps": round(search["qps"], 1),
            "train_size": plan.train_size, "dim": dim, "count": n, **lineage,
            "update": counts,
            "embeddings": str(job.inputs[0]["path"]), "source_dataset": emb_manifest.get("source_dataset"),
            # which versions were indexed: search trusts their rows only while they are still these
            EMBEDDINGS_KEY: job.inputs[0]["manifest_sha256"], SOURCE_KEY: source_manifest_hash(emb_manifest),
            "text_column": emb_manifest.get("text_column"), "model": emb_manifest.get("model"),
            "chunking": emb_manifest.get("chunking"),  # set: rows are windows of documents (embed --chunk-tokens)
            "embedding_settings": {k: emb_manifest.get(k)
                                   for k in ("precision", "backend", "device", "pooling", "max_length")}}

        def fill(tmp):
            started = time.monotonic()
            faiss_index.save_index(built, tmp / INDEX_FILE)
            write_rows_file(tmp / ROWS_FILE, row_table, hashes)
            phases["save_s"] = time.monotonic() - started
            extra.update({k: round(v, 3) for k, v in phases.items()})  # the manifest is written after fill

        job.publish_files(fill, rows=n, extra=extra, counts=counts)
        log.event("index", "quality", recall_at_10=f"{search['recall']:.4f}", qps=f"{search['qps']:.0f}",
                  params=params, **{k: f"{v:.1f}" for k, v in phases.items()})
        return {**job.summary(), "recall_at_10": round(search["recall"], 4), "factory": plan.factory,
                "updated_in_place": update is not None}


def make_plan(faiss_index, n, dim, kind, factory, budget, target_recall, metric="ip"):
    if factory:
        return faiss_index.plan_for_factory(factory, n, dim, metric)
    if kind == "auto":
        return faiss_index.choose_index(n, dim, budget, target_recall, metric)
    return faiss_index.plan_for_kind(kind, n, dim, budget, metric)


def embeddings_similarity(emb_manifest, embeddings):
    """How the model compares its vectors: as `hfbatch embed` recorded it, else as the model directory's
    sentence-transformers config says (outputs of an older embed, or merged ones), else cosine."""
    from hfbatch.embedding import read_similarity

    similarity = emb_manifest.get("similarity")
    model = emb_manifest.get("model")
    if similarity is None and model and Path(model).is_dir():
        similarity = read_similarity(model)
    similarity = similarity or "cosine"
    if similarity not in SIMILARITY_METRICS:
        raise InputError(f"{embeddings}: the model compares vectors by {similarity!r} similarity; hfbatch index "
                         f"supports {', '.join(SIMILARITY_METRICS)}")
    return similarity


def source_manifest_hash(emb_manifest, depth=2):
    """The manifest hash of the dataset the embeddings were made from, as their job recorded it when it read
    that dataset (merged embeddings: as their parts recorded it); None where it cannot be told."""
    from hfbatch.runner import read_manifest

    source = emb_manifest.get("source_dataset")
    inputs = [i for i in emb_manifest.get("inputs", []) if isinstance(i, dict)]
    for record in inputs:
        if source and record.get("path") == source and record.get("manifest_sha256"):
            return record["manifest_sha256"]
    if depth and emb_manifest.get("merged_from") and source:
        found = {source_manifest_hash(read_manifest(Path(i["path"])) or {}, depth - 1) for i in inputs}
        if len(found) == 1:
            return found.pop()
    return None


def build(faiss_index, plan, vectors, phases):
    """A new index over all rows, and the rows' vector hashes (taken as the build reads them)."""
    import numpy as np

    n, dim = vectors.n, vectors.dim
    hashes = np.empty(n, dtype=np.int64)

    def hash_chunk(start, chunk):
        hashes[start:start + len(chunk)] = faiss_index.row_hashes(chunk)

    started = time.monotonic()
    try:
        with log.Progress("index", n, unit="vectors") as progress:
            built = faiss_index.build_index(plan, n, dim, vectors, on_chunk=hash_chunk,
                                            progress=lambda done: progress.update(done - progress.done))
    except RuntimeError as exc:  # faiss rejects a factory string or its training
        raise InputError(f"faiss could not build {plan.factory!r}: {one_line(exc)}")
    phases["build_s"] = time.monotonic() - started
    return built, hashes


def measure_quality(faiss_index, built, vectors, plan, target_recall, phases, keep=None):
    """recall@10 against exact search on held-out-like queries, and QPS; approximate indexes are tuned.

    A few hundred queries bound the recall estimate to about +-0.005 and their exact neighbours take one
    BLAS pass over the vectors. `keep` (an updated index's previous parameters) is tried first and kept
    if it still reaches the target."""
    started = time.monotonic()
    n = vectors.n
    k = min(10, n)
    exact = plan.kind == "flat"
    # faiss searches a Flat index query by query (BLAS only from 128k queries in this build): a batch scan
    # of the vectors (exact_neighbors) finds the probes' neighbours faster there, and one small batch
    # times it
    queries = faiss_index.tuning_queries(vectors, n, num=min(TUNING_QUERIES, n), index=None if exact else built,
                                         metric=plan.metric)
    _, truth = faiss_index.exact_neighbors(vectors, n, queries, k, metric=plan.metric)
    phases["gt_s"] = time.monotonic() - started
    started = time.monotonic()
    try:
        if keep is not None or exact:
            faiss_index.apply_search_params(built, keep or {})
            batch = FLAT_QPS_QUERIES if exact else len(queries)
            found, qps = faiss_index.timed_search(built, queries[:batch], k, repeat=1 if exact else 3)
            truth = truth[:batch]
            result = {**(keep or {}), "recall": faiss_index.recall_at_k(found, truth, k), "qps": qps}
            if exact or result["recall"] >= target_recall:
                return result
            log.event("index", "retuning", reason=f"recall@10 {result['recall']:.4f} with the previous "
                                                  f"parameters is below {target_recall}")
        return faiss_index.tune_search_params(built, queries, truth, target_recall, k)
    finally:
        phases["tune_s"] = time.monotonic() - started


# ---- --incremental ------------------------------------------------------------------------------------

def update_previous(faiss_index, job, plan, similarity, vectors, ids, phases):
    """Update the index in OUTPUT to the new embeddings in place: (index, hashes, lineage, counts), or None,
    with a log line saying why, where it must be rebuilt instead."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    previous, n = job.previous, vectors.n

    def rebuild(reason):  # says why, and returns None: the caller builds a new index
        log.event("index", "rebuilding", reason=reason)

    if previous.get("kind") != plan.kind:
        return rebuild(f"{n:,} rows call for a {plan.kind} index, the existing one is {previous.get('kind')}")
    if previous.get("dim") != vectors.dim:
        return rebuild(f"the vectors have {vectors.dim} dimensions, the index {previous.get('dim')}")
    if (previous.get("similarity") or "cosine", previous.get("metric")) != (similarity, plan.metric):
        return rebuild(f"the vectors are compared by {similarity} similarity, the index by "
                       f"{previous.get('similarity') or 'cosine'}")
    if pc.count_distinct(ids).as_py() != len(ids):
        return rebuild("the embeddings' ids are not unique, so rows cannot be matched")
    rows_file = job.output / ROWS_FILE
    if not rows_file.exists():
        return rebuild(f"{rows_file} is missing (made by an older hfbatch)")
    started = time.monotonic()
    try:
        old = faiss_index.load_index(job.output / INDEX_FILE)
        old_rows = pq.read_table(rows_file)
    except (RuntimeError, OSError, pa.ArrowException) as exc:  # damaged: nothing there can be reused
        return rebuild(f"the existing index cannot be read ({one_line(exc)})")
    if "id" not in old_rows.column_names or "vector_hash" not in old_rows.column_names \
            or old_rows.num_rows != old.ntotal:
        return rebuild(f"{rows_file} does not describe the index's rows")
    blocker = faiss_index.update_blocker(old)
    if blocker:
        return rebuild(f"{blocker} ({plan.kind})")
    hashes = np.empty(n, dtype=np.int64)
    for start in range(0, n, faiss_index.CHUNK_ROWS):
        stop = min(n, start + faiss_index.CHUNK_ROWS)
        hashes[start:stop] = faiss_index.row_hashes(vectors(start, stop))
    relabel, added = faiss_index.match_rows(old_rows.column("id").combine_chunks(),
                                            old_rows.column("vector_hash").to_numpy(), ids, hashes)
    lineage = {"trained_on": previous.get("trained_on"),
               "added_since_training": (previous.get("added_since_training") or 0) + len(added)}
    if lineage["trained_on"] and lineage["added_since_training"] > lineage["trained_on"]:
        return rebuild(f"{lineage['added_since_training']:,} rows were added since the IVF lists were trained "
                       f"on {lineage['trained_on']:,}: they need training on the current rows")
    counts = {"kept": int((relabel >= 0).sum()), "removed": int((relabel < 0).sum()), "added": len(added)}
    updated = faiss_index.update_in_place(old, relabel, added, vectors)
    if updated.ntotal != n:  # a bug, not an input problem
        raise RuntimeError(f"updated index holds {updated.ntotal} vectors, expected {n}")
    phases["build_s"] = time.monotonic() - started
    log.event("index", "updated_in_place", **counts, seconds=f"{phases['build_s']:.2f}")
    return updated, hashes, lineage, counts


def write_rows_file(path, row_table, hashes):
    """Row r of the index (faiss id r) is row r of the embeddings it was built from: its `id` (and over
    chunks `doc_id`, `chunk`, `char_start`, `char_end`), which search names hits by, and its vector hash, for
    the next --incremental run to match rows against. The index carries them itself (Parquet), because the
    embeddings may be replaced while the index stays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(row_table.append_column("vector_hash", pa.array(hashes, pa.int64())), path)


def one_line(exc):
    """An exception's message in one line: faiss's last `Error: ...` part, without its C++ location."""
    import re

    text = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    return text.rpartition("Error: ")[2] or text
