"""hfbatch search: queries -> ranked hits from an index, as JSON Lines on stdout or a dataset (-o)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import NamedTuple

import click

from hfbatch import log
from hfbatch.cli import force_option, model_option, trust_remote_code_option
from hfbatch.errors import InputError

MAX_WIDEN_ROUNDS = 8      # filtered search: how often nprobe / efSearch / k_factor are doubled for short lists
CHUNKS_PER_DOCUMENT = 4   # chunked index: chunks fetched per document wanted, times 4 again while too few documents


def parse_filter(ctx, param, values):
    """`--filter COLUMN=VALUE` (repeatable) -> {column: [values]}: values of one column are OR-ed,
    different columns AND-ed."""
    filters: dict[str, list[str]] = {}
    for value in values:
        column, sep, wanted = value.partition("=")
        if not sep or not column.strip():
            raise click.BadParameter(f"{value!r}: expected COLUMN=VALUE, e.g. section=games", param=param)
        filters.setdefault(column.strip(), []).append(wanted)
    return filters


@click.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", nargs=-1)
@click.option("--queries", "queries_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File of queries: JSON Lines with a `query` or `text` field (.jsonl), CSV with a `query` "
                   "column (.csv), else one query per line. All are searched in one batch.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Hits per query.")
@click.option("--filter", "filters", multiple=True, callback=parse_filter, metavar="COLUMN=VALUE",
              help="Only rows of the source dataset whose COLUMN equals VALUE (repeatable: values of one column "
                   "are OR-ed, different columns AND-ed). Applied inside the index search, so k hits still come "
                   "back when at least k rows match.")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), default=None,
              help="Write the hits as a dataset (query_index, query, rank, id, score, text) with a manifest, "
                   "published atomically, instead of printing them.")
@click.option("--format", "out_format", type=click.Choice(["jsonl", "text"]), default="jsonl", show_default=True,
              help="jsonl: one object per hit (for tools); text: a ranked list for people.")
@click.option("--show-span", is_flag=True,
              help="Index over chunks (embed --chunk-tokens): add the best chunk's text (`span_text`) to each "
                   "hit. The text format always shows it.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="Override the tuned nprobe (IVF).")
@click.option("--ef", type=click.IntRange(min=1), default=None, help="Override the tuned efSearch (HNSW).")
@model_option
@trust_remote_code_option
@force_option
def search(index_dir, queries, queries_file, k, filters, output, out_format, show_span, nprobe, ef, model,
           trust_remote_code, force):
    """Search INDEX_DIR (an `hfbatch index` output) for QUERIES.

    Prints one JSON object per hit: {"query", "rank", "id", "score", "text"}, or with -o writes them as a
    dataset. The queries are embedded with the index's own model unless --model is given.

    Over an index of chunks (`hfbatch embed --chunk-tokens`), hits are documents: `id` is the document's id,
    `score` its best chunk's, and `chunk` and `span` ([start, end) in characters of `text`) say which chunk.

    \b
    Example:
        hfbatch search out/index "python web framework" "3d game" -k 5
        hfbatch search out/index --queries q.jsonl --filter section=games -o out/hits
    """
    texts = list(queries) + (read_queries(Path(queries_file)) if queries_file else [])
    if not texts:
        raise click.UsageError("give at least one QUERY or --queries FILE")
    if output is None:
        searcher = Searcher(index_dir, model=model, trust_remote_code=trust_remote_code, nprobe=nprobe, ef=ef,
                            filters=filters)
        scores, positions = searcher.search(texts, k)
        print_hits(searcher, texts, scores, positions, out_format, show_span)
        return

    from hfbatch.runner import Job

    config = {"queries": list(queries), "k": k, "filters": filters, "nprobe": nprobe, "ef": ef,
              "model": model}
    if show_span:
        config["show_span"] = True
    with Job("search", output, config=config, files=[queries_file] if queries_file else [],
             datasets=[index_dir], force=force) as job:
        if job.up_to_date:
            return
        searcher = Searcher(index_dir, model=model, trust_remote_code=trust_remote_code, nprobe=nprobe, ef=ef,
                            filters=filters)
        scores, positions = searcher.search(texts, k)
        table, features = hits_table(searcher, texts, scores, positions, show_span)
        job.write_shard(0, table, queries=len(texts))
        job.publish_dataset(1, features, extra={"k": k, "filters": filters, "index": str(Path(index_dir).resolve()),
                                                "filtered_rows": searcher.allowed_count})


def print_hits(searcher, texts, scores, positions, out_format, show_span=False):
    chunked = searcher.rows.chunked
    for query, row_scores, row_positions in zip(texts, scores, positions):
        if out_format == "text":
            click.echo(f"\n{query}")
        for rank, (score, position) in enumerate(valid_hits(row_scores, row_positions), start=1):
            row_id, text = searcher.rows.get(position)
            span = searcher.rows.span(position) if chunked else None
            if out_format == "text":
                where = f"  #{span.chunk} [{span.start}:{span.end}]" if span else ""
                snippet = " ".join((span.text_of(text) if span else text or "").split())
                click.echo(f"  {rank:>2}. {score:.3f}  [{row_id}]{where}  {snippet[:100]}")
                continue
            hit = {"query": query, "rank": rank, "id": row_id, "score": round(score, 6), "text": text}
            if span:
                hit.update(chunk=span.chunk, span=[span.start, span.end])
                if show_span:
                    hit["span_text"] = span.text_of(text)
            click.echo(json.dumps(hit, ensure_ascii=False))


def valid_hits(row_scores, row_positions):
    return [(float(s), int(p)) for s, p in zip(row_scores, row_positions) if p >= 0]


def hits_table(searcher, texts, scores, positions, show_span=False):
    """The hits as an Arrow table; over chunks also `chunk`, `char_start`, `char_end` (and `span_text`)."""
    import datasets
    import pyarrow as pa

    chunked = searcher.rows.chunked
    schema = {"query_index": datasets.Value("int32"), "query": datasets.Value("string"),
              "rank": datasets.Value("int32"), "id": searcher.rows.id_feature,
              "score": datasets.Value("float32"), "text": datasets.Value("string")}
    if chunked:
        schema.update(chunk=datasets.Value("int32"), char_start=datasets.Value("int32"),
                      char_end=datasets.Value("int32"))
        if show_span:
            schema["span_text"] = datasets.Value("string")
    columns = {name: [] for name in schema}
    for qi, (query, row_scores, row_positions) in enumerate(zip(texts, scores, positions)):
        for rank, (score, position) in enumerate(valid_hits(row_scores, row_positions), start=1):
            row_id, text = searcher.rows.get(position)
            values = [qi, query, rank, row_id, score, text]
            if chunked:
                span = searcher.rows.span(position)
                values += [span.chunk, span.start, span.end] + ([span.text_of(text)] if show_span else [])
            for name, value in zip(columns, values):
                columns[name].append(value)
    features = datasets.Features(schema)
    return pa.table(columns, schema=features.arrow_schema), features


# ---- queries ----------------------------------------------------------------------------------------------

def read_queries(path: Path) -> list[str]:
    return [record["query"] for record in read_query_records(path)]


def read_query_records(path: Path) -> list[dict]:
    """Query records from a file, each with at least "query": JSON Lines objects (with `query` or `text`, other
    fields kept), CSV rows (a `query` column), or plain text lines."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if "query" not in (reader.fieldnames or []):
                raise InputError(f"{path}: a CSV query file needs a `query` column; it has: "
                                 f"{', '.join(reader.fieldnames or []) or 'no header'}")
            return [dict(row) for row in reader if (row.get("query") or "").strip()]
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix not in (".jsonl", ".json", ".ndjson"):
        return [{"query": line} for line in lines]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc})")
        text = obj.get("query", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise InputError(f"{path}:{number}: expected an object with a `query` or `text` string")
        records.append({**obj, "query": text, "line": number})
    return records


# ---- the searcher -----------------------------------------------------------------------------------------

class Searcher:
    """An index opened for queries: its model, tuned search parameters, row lookup and optional filter.
    Used by `search` and `evaluate`."""

    def __init__(self, index_dir, *, model=None, trust_remote_code=False, nprobe=None, ef=None, filters=None):
        from hfbatch.embedding import TextEmbedder
        from hfbatch.index import apply_search_params, load_index
        from hfbatch.models import resolve_model_dir
        from hfbatch.runner import require_complete

        self.index_dir = Path(index_dir)
        manifest = require_complete(self.index_dir, "index")
        if manifest.get("job") != "index":
            raise InputError(f"{index_dir} is an `hfbatch {manifest.get('job')}` output, not an index")
        self.manifest = manifest
        self.rows = RowLookup(manifest)
        self.allowed = None            # int64 index positions the filter lets through, sorted
        self.allowed_count = None
        if filters:
            self.allowed = allowed_positions(self.rows, filters)
            self.allowed_count = len(self.allowed)
            log.event("search", "filter", filters=json.dumps(filters), rows=self.allowed_count)
        model_dir = resolve_model_dir(model or manifest["model"])
        settings = manifest.get("embedding_settings") or {}
        self.embedder = TextEmbedder(model_dir, precision=settings.get("precision") or "auto",
                                     max_length=settings.get("max_length"), trust_remote_code=trust_remote_code)
        if self.embedder.dim != manifest["dim"]:
            raise InputError(f"--model {model_dir} makes {self.embedder.dim}-d vectors but the index holds "
                             f"{manifest['dim']}-d ones")
        self.index = load_index(self.index_dir / "index.faiss", mmap=True)
        overrides = {key: value for key, value in (("nprobe", nprobe), ("efSearch", ef)) if value is not None}
        apply_search_params(self.index, {**(manifest.get("params") or {}), **overrides})

    def embed(self, texts):
        import numpy as np

        return np.ascontiguousarray(self.embedder(list(texts)), dtype=np.float32)

    def search(self, texts, k):
        """(scores, positions) [len(texts), k'] for all texts in one batched search; position -1 = no hit.
        Over a chunked index, the k best documents, each at the position of its best chunk."""
        return self.search_vectors(self.embed(texts), k)

    def search_vectors(self, vectors, k):
        if self.rows.chunked:
            limit = self.index.ntotal if self.allowed is None else len(self.allowed)
            return best_chunk_per_document(self.search_rows, vectors, k, self.rows.doc_codes(), limit)
        return self.search_rows(vectors, k)

    def search_rows(self, vectors, k):
        """The k best index rows (chunks, over a chunked index)."""
        k = min(k, self.index.ntotal)
        if self.allowed is None:
            return self.index.search(vectors, k)
        reader = None
        if self.manifest.get("embeddings") and Path(self.manifest["embeddings"]).exists():
            from hfbatch.index import ArrowVectors

            reader = lambda: ArrowVectors(self.manifest["embeddings"])  # opened only if needed
        return filtered_search(self.index, vectors, k, self.allowed, exact_reader=reader)


# ---- documents from chunks --------------------------------------------------------------------------------

def best_chunk_per_document(search_rows, vectors, k, doc_codes, limit):
    """The k best documents of an index over chunks: `search_rows(vectors, n)` fetches the n best chunks
    (CHUNKS_PER_DOCUMENT × k to start with), each document keeps its best chunk, and queries whose chunks
    came from fewer than k documents are searched again with 4× as many, until `limit` (all the rows that
    can be found). `doc_codes[position]` numbers the document of each row.

    Returns (scores, positions) [queries, min(k, documents)], best first, positions at the best chunks.
    """
    import numpy as np

    k = min(k, int(doc_codes.max()) + 1 if len(doc_codes) else 0)
    scores = np.full((len(vectors), k), -np.inf, dtype=np.float32)
    positions = np.full((len(vectors), k), -1, dtype=np.int64)
    todo = np.arange(len(vectors))
    fetch = min(limit, k * CHUNKS_PER_DOCUMENT)
    while len(todo) and k:
        chunk_scores, chunk_positions = search_rows(np.ascontiguousarray(vectors[todo]), fetch)
        short = []
        for query, row_scores, row_positions in zip(todo, chunk_scores, chunk_positions):
            found = first_hit_per_document(row_scores, row_positions, doc_codes, k)
            scores[query, :len(found)] = [s for s, _ in found]
            positions[query, :len(found)] = [p for _, p in found]
            if len(found) < k and (row_positions >= 0).sum() >= fetch:  # more chunks exist: fetch further
                short.append(query)
        if fetch >= limit:
            break
        todo = np.array(short, dtype=np.int64)
        fetch = min(limit, fetch * 4)
    return scores, positions


def first_hit_per_document(row_scores, row_positions, doc_codes, k):
    """[(score, position)] of the first (best: hits come best first) chunk of each document, up to k."""
    seen, found = set(), []
    for score, position in zip(row_scores, row_positions):
        if position < 0:
            continue
        doc = doc_codes[position]
        if doc not in seen:
            seen.add(doc)
            found.append((float(score), int(position)))
            if len(found) == k:
                break
    return found


# ---- filtering --------------------------------------------------------------------------------------------

def allowed_positions(rows: RowLookup, filters: dict[str, list[str]]):
    """Index positions whose source-dataset row matches every filter column (one of its values)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    source = rows.source
    if source is None:
        where = rows.source_path or "(none recorded)"
        raise InputError(f"--filter needs the index's source dataset, which is not available: {where}")
    mask = None
    for column, values in filters.items():
        if column not in source.column_names:
            raise InputError(f"--filter {column}=...: the source dataset {rows.source_path} has no column "
                             f"{column!r}; available: {', '.join(source.column_names)}")
        data = source.data.column(column)
        try:
            as_text = pc.cast(data, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(f"--filter {column}=...: column {column!r} is {data.type}; only columns of "
                             f"strings, numbers or booleans can be filtered on")
        match = pc.fill_null(pc.is_in(as_text, value_set=pa.array(values, pa.string())), False)
        match = np.asarray(match.to_numpy(zero_copy_only=False), dtype=bool)
        mask = match if mask is None else mask & match
    source_rows = np.flatnonzero(mask)
    if rows.chunked:  # every chunk of a matching document
        ids = source.data.column("id").take(pa.array(source_rows))
        return np.flatnonzero(pc.is_in(rows.embeddings.data.column("doc_id"), value_set=ids)
                              .to_numpy(zero_copy_only=False)).astype(np.int64)
    if rows.same_order():
        return source_rows.astype(np.int64)
    position_of = rows.position_by_id()
    ids = source.data.column("id").take(pa.array(source_rows)).to_pylist()
    return np.sort(np.array([position_of[i] for i in ids if i in position_of], dtype=np.int64))


def _search_params(index, sel, widen: int):
    """faiss SearchParameters carrying `sel`, with the index's current nprobe / efSearch / k_factor (times
    `widen`, capped). Returns (params, can_widen_further)."""
    import faiss

    idx = faiss.downcast_index(index)
    if isinstance(idx, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        base, more = _search_params(idx.base_index, sel, widen)
        k_factor = min(float(idx.k_factor) * widen, 256.0)
        return faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=base), \
            more or k_factor < 256.0
    if isinstance(idx, faiss.IndexPreTransform):
        inner, more = _search_params(idx.index, sel, widen)
        return faiss.SearchParametersPreTransform(index_params=inner), more
    if isinstance(idx, faiss.IndexHNSW):
        ef = min(idx.hnsw.efSearch * widen, max(idx.ntotal, 16))
        return faiss.SearchParametersHNSW(sel=sel, efSearch=int(ef)), ef < idx.ntotal
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        nprobe = min(ivf.nprobe * widen, ivf.nlist)
        return faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe)), nprobe < ivf.nlist
    return faiss.SearchParameters(sel=sel), False


def filtered_search(index, vectors, k, allowed, exact_reader=None):
    """Search only the positions in `allowed` (sorted int64), inside faiss (an IDSelector), so the k best
    allowed rows come back rather than the allowed part of the k best.

    An approximate index may find fewer than k allowed rows in the lists or graph it visits (a selective
    filter); those queries are searched again with nprobe / efSearch / k_factor doubled, up to
    MAX_WIDEN_ROUNDS times, and any still short are answered exactly from the embeddings (`exact_reader()`,
    an ArrowVectors-like read_chunk) restricted to the allowed rows.
    """
    import faiss
    import numpy as np

    n = index.ntotal
    allowed = np.ascontiguousarray(allowed, dtype=np.int64)
    want = min(k, len(allowed))
    scores = np.full((len(vectors), k), -np.inf, dtype=np.float32)
    positions = np.full((len(vectors), k), -1, dtype=np.int64)
    if want == 0 or len(vectors) == 0:
        return scores, positions
    # a bitmap (n/8 bytes) is O(1) per test; IDSelectorBatch hashes, fine for small sets
    mask = np.zeros(n, dtype=bool)
    mask[allowed] = True
    bitmap = np.packbits(mask, bitorder="little")          # bit i % 8 of byte i // 8, as faiss reads it
    sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    todo = np.arange(len(vectors))
    widen = 1
    for _ in range(MAX_WIDEN_ROUNDS + 1):
        params, more = _search_params(index, sel, widen)
        D, I = index.search(np.ascontiguousarray(vectors[todo]), k, params=params)
        scores[todo], positions[todo] = D, I
        short = (I >= 0).sum(axis=1) < want
        todo = todo[short]
        if not len(todo) or not more:
            break
        widen *= 2
    del sel, bitmap  # the selector points into bitmap: both live until here
    if len(todo) and exact_reader is not None:
        log.event("search", "filter_exact", queries=len(todo), rows=len(allowed))
        D, I = exact_subset(exact_reader(), n, allowed, vectors[todo], k)
        scores[todo], positions[todo] = D, I
    return scores, positions


def exact_subset(read_chunk, n, allowed, queries, k, chunk_rows=65_536):
    """Brute-force top-k by inner product over the allowed positions only."""
    import faiss
    import numpy as np

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        lo, hi = np.searchsorted(allowed, [start, stop])
        if lo == hi:
            continue
        rows = allowed[lo:hi] - start
        chunk = np.ascontiguousarray(read_chunk(start, stop)[rows], dtype=np.float32)
        D, I = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(D, np.where(I >= 0, rows[np.maximum(I, 0)] + start, -1))
    heap.finalize()
    return heap.D, heap.I


class Span(NamedTuple):
    """Which chunk of its document an index row is, and the characters [start, end) of the text it covers."""

    chunk: int
    start: int
    end: int

    def text_of(self, text):
        return None if text is None else text[self.start:self.end]


class RowLookup:
    """Index position -> (id, text). Embeddings keep the dataset's row order, so a position is a row of both;
    checked per hit, with an id map as the fallback if the two ever disagree.

    Over chunks (embeddings with a `doc_id` column), a position is one chunk: the id and text given are its
    document's, and `span` says which part of the text the chunk is."""

    def __init__(self, manifest):
        from hfbatch.io import open_dataset

        self.embeddings, _ = open_dataset(manifest["embeddings"], "embeddings")
        self.chunked = "doc_id" in self.embeddings.column_names
        self.id_column = "doc_id" if self.chunked else "id"
        self.id_feature = self.embeddings.features[self.id_column]
        self.text_column = manifest.get("text_column") or "text"
        self.source = None
        self.source_path = manifest.get("source_dataset")
        if self.source_path and Path(self.source_path).exists():
            self.source, _ = open_dataset(self.source_path)
        self._by_id = None
        self._ids = None
        self._same = None
        self._doc_codes = None

    def ids(self, positions):
        """Ids of many positions at once (evaluate): one column read instead of a row read per hit.
        Over chunks, the documents' ids."""
        if self._ids is None:
            self._ids = self.embeddings.data.column(self.id_column).to_pylist()
        return [self._ids[p] if p >= 0 else None for p in positions]

    def doc_codes(self):
        """Over chunks: int64 [rows], the same number for the chunks of one document."""
        import numpy as np
        import pyarrow.compute as pc

        if self._doc_codes is None:
            encoded = pc.dictionary_encode(self.embeddings.data.column("doc_id")).combine_chunks()
            self._doc_codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        return self._doc_codes

    def span(self, position) -> Span:
        return Span(*(self._value(name, position) for name in ("chunk", "char_start", "char_end")))

    def _value(self, column, position):
        """One cell, without reading the row's embedding."""
        return self.embeddings.data.column(column)[position].as_py()

    def same_order(self) -> bool:
        """The source dataset's rows are the embeddings' rows, in order (the usual case; never over chunks)."""
        if self._same is None:
            self._same = self.source is not None and not self.chunked and \
                len(self.source) == len(self.embeddings) and \
                "id" in self.source.column_names and \
                self.source.data.column("id").equals(self.embeddings.data.column("id"))
        return self._same

    def position_by_id(self) -> dict:
        return {value: i for i, value in enumerate(self.embeddings.data.column("id").to_pylist())}

    def get(self, position):
        row_id = self._value(self.id_column, position)
        if self.source is None:
            return row_id, None
        row = self.source[position] if position < len(self.source) and not self.chunked else None
        if row is None or row["id"] != row_id:
            if self._by_id is None:
                self._by_id = {value: i for i, value in enumerate(self.source["id"])}
            row = self.source[self._by_id[row_id]] if row_id in self._by_id else {self.text_column: None}
        return row_id, row.get(self.text_column)
