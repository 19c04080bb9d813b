"""hfbatch search: queries -> ranked hits from an index, as JSON Lines on stdout."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hfbatch.cli import model_option, trust_remote_code_option
from hfbatch.errors import InputError


@click.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", nargs=-1)
@click.option("--queries", "queries_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File of queries: one per line (.txt), or JSON Lines with a `query` or `text` field.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Hits per query.")
@click.option("--format", "out_format", type=click.Choice(["jsonl", "text"]), default="jsonl", show_default=True,
              help="jsonl: one object per hit (for tools); text: a ranked list for people.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="Override the tuned nprobe (IVF).")
@click.option("--ef", type=click.IntRange(min=1), default=None, help="Override the tuned efSearch (HNSW).")
@model_option
@trust_remote_code_option
def search(index_dir, queries, queries_file, k, out_format, nprobe, ef, model, trust_remote_code):
    """Search INDEX_DIR (an `hfbatch index` output) for QUERIES.

    Prints one JSON object per hit: {"query", "rank", "id", "score", "text"}. The queries are embedded
    with the index's own model unless --model is given.

    \b
    Example:
        hfbatch search out/index "python web framework" "3d game" -k 5
    """
    import numpy as np

    from hfbatch.embedding import TextEmbedder
    from hfbatch.index import apply_search_params, load_index
    from hfbatch.io import open_dataset
    from hfbatch.models import resolve_model_dir
    from hfbatch.runner import require_complete

    texts = list(queries) + (read_queries(Path(queries_file)) if queries_file else [])
    if not texts:
        raise click.UsageError("give at least one QUERY or --queries FILE")
    manifest = require_complete(Path(index_dir), "index")
    if manifest.get("job") != "index":
        raise InputError(f"{index_dir} is an `hfbatch {manifest.get('job')}` output, not an index")
    model_dir = resolve_model_dir(model or manifest["model"])
    settings = manifest.get("embedding_settings") or {}
    embedder = TextEmbedder(model_dir, precision=settings.get("precision") or "auto",
                            max_length=settings.get("max_length"), trust_remote_code=trust_remote_code)
    if embedder.dim != manifest["dim"]:
        raise InputError(f"--model {model_dir} makes {embedder.dim}-d vectors but the index holds "
                         f"{manifest['dim']}-d ones")
    index = load_index(Path(index_dir) / "index.faiss", mmap=True)
    overrides = {key: value for key, value in (("nprobe", nprobe), ("efSearch", ef)) if value is not None}
    apply_search_params(index, {**(manifest.get("params") or {}), **overrides})
    vectors = np.ascontiguousarray(embedder(texts), dtype=np.float32)
    scores, positions = index.search(vectors, min(k, index.ntotal))
    rows = RowLookup(manifest)
    for query, row_scores, row_positions in zip(texts, scores, positions):
        hits = [(float(s), int(p)) for s, p in zip(row_scores, row_positions) if p >= 0]
        if out_format == "text":
            click.echo(f"\n{query}")
        for rank, (score, position) in enumerate(hits, start=1):
            row_id, text = rows.get(position)
            if out_format == "text":
                snippet = " ".join((text or "").split())
                click.echo(f"  {rank:>2}. {score:.3f}  [{row_id}]  {snippet[:100]}")
            else:
                click.echo(json.dumps({"query": query, "rank": rank, "id": row_id, "score": round(score, 6),
                                       "text": text}, ensure_ascii=False))


def read_queries(path: Path) -> list[str]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        return lines
    queries = []
    for number, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc})")
        text = obj.get("query", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise InputError(f"{path}:{number}: expected an object with a `query` or `text` string")
        queries.append(text)
    return queries


class RowLookup:
    """Index position -> (id, text). Embeddings keep the dataset's row order, so a position is a row of both;
    checked per hit, with an id map as the fallback if the two ever disagree."""

    def __init__(self, manifest):
        from hfbatch.io import open_dataset

        self.embeddings, _ = open_dataset(manifest["embeddings"], "embeddings")
        self.text_column = manifest.get("text_column") or "text"
        self.source = None
        if manifest.get("source_dataset") and Path(manifest["source_dataset"]).exists():
            self.source, _ = open_dataset(manifest["source_dataset"])
        self._by_id = None

    def get(self, position):
        row_id = self.embeddings[position]["id"]
        if self.source is None:
            return row_id, None
        row = self.source[position] if position < len(self.source) else None
        if row is None or row["id"] != row_id:
            if self._by_id is None:
                self._by_id = {value: i for i, value in enumerate(self.source["id"])}
            row = self.source[self._by_id[row_id]] if row_id in self._by_id else {self.text_column: None}
        return row_id, row.get(self.text_column)
