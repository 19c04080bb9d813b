"""hfbatch index: an embeddings dataset -> a FAISS index directory with a manifest."""

from __future__ import annotations

import click

from hfbatch import log
from hfbatch.cli import force_option, json_summary, output_option
from hfbatch.errors import InputError
from hfbatch.runner import Job

INDEX_FILE = "index.faiss"


@click.command()
@click.argument("embeddings", type=click.Path(exists=True, file_okay=False))
@output_option
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "hnsw", "ivfpq"]), default="auto",
              show_default=True, help="Index type; auto chooses from the number of vectors.")
@force_option
@json_summary("index")
def index(embeddings, output, kind, force):
    """Build a FAISS index over EMBEDDINGS (an `hfbatch embed` output) in OUTPUT.

    \b
    Example:
        hfbatch index out/embeddings -o out/index --kind auto
    """
    from hfbatch.index import build_index, choose_index, plan_for_kind, save_index
    from hfbatch.io import open_dataset, require_column

    config = {"kind": kind}
    with Job("index", output, config=config, datasets=[embeddings], force=force) as job:
        if job.up_to_date:
            return job.summary()
        dataset, emb_manifest = open_dataset(embeddings, "embeddings")
        require_column(dataset, "embedding", embeddings, option="hfbatch embed")
        n, dim = len(dataset), int(emb_manifest.get("dim") or dataset.features["embedding"].length)
        if n == 0:
            raise InputError(f"{embeddings}: no vectors to index")
        plan = choose_index(n, dim) if kind == "auto" else plan_for_kind(kind, n, dim)
        log.event("index", "plan", kind=plan.kind, factory=plan.factory, vectors=n, dim=dim)
        read_chunk = vector_reader(dataset, dim)
        with log.Progress("index", n, unit="vectors") as progress:
            built = build_index(plan, n, dim, read_chunk, progress=progress.update)

        def fill(tmp):
            save_index(built, tmp / INDEX_FILE)

        job.publish_files(fill, rows=n, extra={
            "kind": plan.kind, "factory": plan.factory, "metric": plan.metric, "params": plan.params,
            "dim": dim, "count": n, "embeddings": str(job.inputs[0]["path"]),
            "source_dataset": emb_manifest.get("source_dataset"), "text_column": emb_manifest.get("text_column"),
            "model": emb_manifest.get("model"), "embedding_settings": {
                k: emb_manifest.get(k) for k in ("precision", "backend", "device", "pooling", "max_length")}})
        return job.summary()


def vector_reader(dataset, dim):
    """read_chunk(start, stop) -> float32 [rows, dim], straight from the memory-mapped Arrow column."""
    import numpy as np

    column = dataset.data.table.column("embedding")

    def read_chunk(start, stop):
        part = column.slice(start, stop - start).combine_chunks()
        return np.asarray(part.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)

    return read_chunk
