"""hfbatch search: queries -> ranked hits from an index, as JSON Lines on stdout or a dataset (-o).

An index answers from what was indexed: hit ids (and chunk spans) come from the index directory itself
(rows.parquet), and text from the source dataset only while that dataset is still the version that was
indexed (by its manifest hash); otherwise hits come without text and one warning line says what to re-run.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import NamedTuple

import click

from hfbatch import log
from hfbatch.cli import force_option, model_option, query_device_options, trust_remote_code_option
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
@query_device_options
@force_option
def search(index_dir, queries, queries_file, k, filters, output, out_format, show_span, nprobe, ef, model,
           trust_remote_code, device, precision, force):
    """Search INDEX_DIR (an `hfbatch index` output) for QUERIES.

    Prints one JSON object per hit: {"query", "rank", "id", "score", "text"}, or with -o writes them as a
    dataset. The queries are embedded with the index's own model unless --model is given, on --device in
    --precision (chosen here, not inherited from the embeddings: an index embedded on a GPU in fp16 is
    searched on a CPU host in fp32). `score` is the model's similarity: cosine, dot product, or minus the
    euclidean distance, as the index manifest's `similarity` says.

    Ids come from the index itself. `text` is looked up (by id) in the source dataset only while it is the
    version that was indexed; if it changed since, hits come without text and a warning says what to re-run.

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
    # opened first: a damaged index is refused before anything is written
    searcher = Searcher(index_dir, model=model, trust_remote_code=trust_remote_code, nprobe=nprobe, ef=ef,
                        filters=filters, device=device, precision=precision)
    if output is None:
        searcher.warn_if_outdated()
        scores, positions = searcher.search(texts, k)
        print_hits(texts, searcher.hits(texts, scores, positions), out_format, show_span)
        return

    from hfbatch.runner import Job

    config = {"queries": list(queries), "k": k, "filters": filters, "nprobe": nprobe, "ef": ef,
              "model": model}
    if show_span:
        config["show_span"] = True
    if precision != "auto":  # only when given: outputs made before the option keep their config
        config["precision"] = precision
    with Job("search", output, config=config, files=[queries_file] if queries_file else [],
             datasets=[index_dir], force=force) as job:
        if job.up_to_date:
            return
        searcher.warn_if_outdated()
        scores, positions = searcher.search(texts, k)
        table, features = hits_table(searcher, searcher.hits(texts, scores, positions), show_span)
        job.write_shard(0, table, queries=len(texts))
        job.publish_dataset(1, features, extra={"k": k, "filters": filters, "index": str(Path(index_dir).resolve()),
                                                "filtered_rows": searcher.allowed_count,
                                                "text_from_source": searcher.rows.source is not None})


class Hit(NamedTuple):
    query_index: int
    query: str
    rank: int
    score: float
    id: object
    text: str | None
    span: Span | None  # over chunks: which chunk of the document scored best


def print_hits(texts, hits, out_format, show_span=False):
    for query, query_hits in zip(texts, hits):
        if out_format == "text":
            click.echo(f"\n{query}")
        for hit in query_hits:
            span = hit.span
            if out_format == "text":
                where = f"  #{span.chunk} [{span.start}:{span.end}]" if span else ""
                snippet = " ".join((span.text_of(hit.text) if span else hit.text or "").split())
                click.echo(f"  {hit.rank:>2}. {hit.score:.3f}  [{hit.id}]{where}  {snippet[:100]}")
                continue
            record = {"query": query, "rank": hit.rank, "id": hit.id, "score": round(hit.score, 6), "text": hit.text}
            if span:
                record.update(chunk=span.chunk, span=[span.start, span.end])
                if show_span:
                    record["span_text"] = span.text_of(hit.text)
            click.echo(json.dumps(record, ensure_ascii=False))


def valid_hits(row_scores, row_positions):
    return [(float(s), int(p)) for s, p in zip(row_scores, row_positions) if p >= 0]


def hits_table(searcher, hits, show_span=False):
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
    for hit in (hit for query_hits in hits for hit in query_hits):
        values = [hit.query_index, hit.query, hit.rank, hit.id, hit.score, hit.text]
        if chunked:
            span = hit.span
            values += [span.chunk, span.start, span.end] + ([span.text_of(hit.text)] if show_span else [])
        for name, value in zip(columns, values):
            columns[name].append(value)
    features = datasets.Features(schema)
    return pa.table(columns, schema=features.arrow_schema), features


# ---- queries ----------------------------------------------------------------------------------------------

def read_queries(path: Path) -> list[str]:
    return [record["query"] for record in read_query_records(path)]


def read_query_records(path: Path) -> list[dict]:
    """Query records from a file, each with at least "query": JSON Lines objects (with `query` or `text`, other
    fields kept), CSV rows (a `query` column), or plain text lines. The file must be UTF-8."""
    try:
        return _query_records(path)
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1 if isinstance(exc.object, bytes) else None
        where = f"{path}:{line}" if line else str(path)
        raise InputError(f"{where}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                         f"save the queries file as UTF-8")


def _query_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    data = path.read_bytes().decode("utf-8-sig")  # whole, so that an encoding error names its offset; BOM dropped
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(data, newline=""))
        if "query" not in (reader.fieldnames or []):
            raise InputError(f"{path}: a CSV query file needs a `query` column; it has: "
                             f"{', '.join(reader.fieldnames or []) or 'no header'}")
        return [dict(row) for row in reader if (row.get("query") or "").strip()]
    lines = [line for line in data.splitlines() if line.strip()]
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
    """An index opened for queries: the index, its rows, tuned search parameters, the query encoder (loaded on
    first use) and an optional filter. Used by `search` and `evaluate`."""

    def __init__(self, index_dir, *, model=None, trust_remote_code=False, nprobe=None, ef=None, filters=None,
                 device="auto", precision="auto"):
        from hfbatch.index import apply_search_params, search_param_grid
        from hfbatch.runner import require_complete

        self.index_dir = Path(index_dir)
        manifest = require_complete(self.index_dir, "index")
        if manifest.get("job") != "index":
            raise InputError(f"{index_dir} is an `hfbatch {manifest.get('job')}` output, not an index")
        self.manifest = manifest
        self.similarity = manifest.get("similarity") or "cosine"  # what indexes assumed before it was recorded
        self.metric = manifest.get("metric") or "ip"
        self.index = open_index_file(self.index_dir, manifest)
        self.rows = IndexRows(self.index_dir, manifest, self.index.ntotal)
        self.allowed = None            # int64 index positions the filter lets through, sorted
        self.allowed_count = None
        if filters:
            self.allowed = allowed_positions(self.rows, filters)
            self.allowed_count = len(self.allowed)
            log.event("search", "filter", filters=json.dumps(filters), rows=self.allowed_count)
        self._encoder_options = dict(model=model, trust_remote_code=trust_remote_code, device=device,
                                     precision=precision)
        self._embedder = None
        overrides = {key: value for key, value in (("nprobe", nprobe), ("efSearch", ef)) if value is not None}
        knobs = search_param_grid(self.index)
        for key, option in (("nprobe", "--nprobe"), ("efSearch", "--ef")):
            if key in overrides and key not in knobs:
                raise InputError(f"{option}: {index_dir} is a {manifest.get('kind')} index "
                                 f"({manifest.get('factory')}), which has no {key}; {option} applies to "
                                 f"{'IVF' if key == 'nprobe' else 'HNSW'} indexes")
        apply_search_params(self.index, {**(manifest.get("params") or {}), **overrides})

    @property
    def embedder(self):
        """The query encoder: the index's model (or --model) on its own device and precision."""
        if self._embedder is None:
            self._embedder = query_embedder(self.manifest, **self._encoder_options)
        return self._embedder

    def warn_if_outdated(self):
        """One warning line on stderr when the dataset or embeddings changed since the index was built."""
        problem = self.rows.outdated()
        if problem:
            log.warn("search", problem[0], reason=problem[1], rerun=problem[2])

    def embed(self, texts):
        import numpy as np

        from hfbatch.index import normalize_rows

        vectors = np.ascontiguousarray(self.embedder(list(texts)), dtype=np.float32)
        return normalize_rows(vectors) if self.similarity == "cosine" else vectors

    def search(self, texts, k):
        """(scores, positions) [len(texts), k'] for all texts in one batched search; position -1 = no hit.
        Scores are the model's similarity (larger is closer). Over a chunked index, the k best documents,
        each at the position of its best chunk."""
        import numpy as np

        scores, positions = self.search_vectors(self.embed(texts), k)
        if self.metric == "l2":  # faiss gives squared distances; sentence-transformers' similarity is -distance
            scores = -np.sqrt(np.maximum(scores, 0))
        return scores, positions

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
        return filtered_search(self.index, vectors, k, self.allowed, exact_reader=self.rows.vector_reader(
            unit=self.similarity == "cosine"), metric=self.metric)

    def hits(self, texts, scores, positions) -> list[list[Hit]]:
        """The hits of each query, named from the index's rows: ids and spans looked up for all at once."""
        found = [valid_hits(row_scores, row_positions) for row_scores, row_positions in zip(scores, positions)]
        flat = [position for query_hits in found for _, position in query_hits]
        ids, row_texts = self.rows.ids(flat), self.rows.texts(flat)
        spans = self.rows.spans(flat) if self.rows.chunked else [None] * len(flat)
        hits, at = [], 0
        for qi, (query, query_hits) in enumerate(zip(texts, found)):
            hits.append([Hit(qi, query, rank, score, ids[at + rank - 1], row_texts[at + rank - 1], spans[at + rank - 1])
                         for rank, (score, _) in enumerate(query_hits, start=1)])
            at += len(query_hits)
        return hits


def query_precision(precision, device):
    """auto: fp32 on CPU (a batch of queries costs little and fp32 is exact), else the device's own auto
    choice (bf16 on CUDA, fp16 on older CUDA): either way within the model's tolerance of the index's vectors,
    whatever precision embedded those."""
    from hfbatch.models import choose_precision

    if precision == "auto" and device == "cpu":
        return "fp32"
    return choose_precision(precision, device)


def query_embedder(manifest, *, model, trust_remote_code, device, precision):
    from hfbatch.embedding import TextEmbedder
    from hfbatch.models import choose_device, resolve_model_dir

    model_dir = resolve_model_dir(model or manifest["model"])
    device = choose_device(device)
    settings = manifest.get("embedding_settings") or {}  # max_length is the model's, not the hardware's
    embedder = TextEmbedder(model_dir, device=device, precision=query_precision(precision, device),
                            max_length=settings.get("max_length"), trust_remote_code=trust_remote_code)
    if embedder.dim != manifest.get("dim"):
        raise InputError(f"--model {model_dir} makes {embedder.dim}-d vectors but the index holds "
                         f"{manifest['dim']}-d ones")
    return embedder


def open_index_file(index_dir: Path, manifest):
    """index.faiss, memory-mapped; missing or unreadable is a clear error naming the file."""
    from hfbatch.index import load_index
    from hfbatch.jobs.index import INDEX_FILE, one_line

    path = index_dir / INDEX_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing; {rebuild_hint(index_dir, manifest)}")
    try:
        index = load_index(path, mmap=True)
    except RuntimeError as exc:  # faiss: bad magic, truncated, ...
        raise InputError(f"{path} is not a readable FAISS index ({one_line(exc)}); "
                         f"{rebuild_hint(index_dir, manifest)}")
    if manifest.get("count") is not None and index.ntotal != manifest["count"]:
        raise InputError(f"{path} holds {index.ntotal:,} vectors, its manifest says {manifest['count']:,}; "
                         f"{rebuild_hint(index_dir, manifest)}")
    return index


def rebuild_hint(index_dir, manifest):
    return f"rebuild it: hfbatch index {manifest.get('embeddings') or 'EMBEDDINGS'} -o {index_dir} --force"


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

def allowed_positions(rows: IndexRows, filters: dict[str, list[str]]):
    """Index positions whose source-dataset row matches every filter column (one of its values). Needs the
    dataset that was indexed: another version's values would filter other rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    source = rows.source
    if source is None:
        raise InputError(f"--filter needs the dataset the index was built from: {rows.source_problem}; "
                         f"{rows.outdated()[2] if rows.outdated() else ''}".rstrip("; "))
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
    if rows.same_order():
        return source_rows.astype(np.int64)
    ids = source.data.column("id").take(pa.array(source_rows))  # every chunk of a matching document, over chunks
    return np.flatnonzero(pc.is_in(rows.table.column(rows.id_column), value_set=ids)
                          .to_numpy(zero_copy_only=False)).astype(np.int64)


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


def filtered_search(index, vectors, k, allowed, exact_reader=None, metric="ip"):
    """Search only the positions in `allowed` (sorted int64), inside faiss (an IDSelector), so the k best
    allowed rows come back rather than the allowed part of the k best.

    An approximate index may find fewer than k allowed rows in the lists or graph it visits (a selective
    filter); those queries are searched again with nprobe / efSearch / k_factor doubled, up to
    MAX_WIDEN_ROUNDS times, and any still short are answered exactly from the embeddings (`exact_reader()`,
    an ArrowVectors-like read_chunk, or None where the indexed vectors are no longer at hand) restricted to the
    allowed rows.
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
        D, I = exact_subset(exact_reader(), n, allowed, vectors[todo], k, metric=metric)
        scores[todo], positions[todo] = D, I
    return scores, positions


def exact_subset(read_chunk, n, allowed, queries, k, chunk_rows=65_536, metric="ip"):
    """Brute-force top-k by `metric` (ip or l2, as hfbatch.index) over the allowed positions only."""
    import faiss
    import numpy as np

    from hfbatch.index import faiss_metric

    heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        lo, hi = np.searchsorted(allowed, [start, stop])
        if lo == hi:
            continue
        rows = allowed[lo:hi] - start
        chunk = np.ascontiguousarray(read_chunk(start, stop)[rows], dtype=np.float32)
        D, I = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss_metric(metric))
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


class IndexRows:
    """Index position -> id, span (over chunks) and text, from what was indexed.

    The ids and spans are the index's own (rows.parquet, written beside index.faiss). Text comes from the
    source dataset, looked up by id, and only while that dataset is the version that was indexed (its manifest
    hash is the one recorded): a re-ingested dataset may hold other rows, or the same ids with other text.
    Over chunks (embed --chunk-tokens), a position is one chunk; the id and text given are its document's."""

    def __init__(self, index_dir: Path, manifest: dict, count: int):
        from hfbatch.jobs.index import CHUNK_COLUMNS, EMBEDDINGS_KEY, ROWS_FILE

        self.index_dir, self.manifest = index_dir, manifest
        self.chunked = bool(manifest.get("chunking"))
        path = index_dir / ROWS_FILE
        self.table = read_rows_file(path, ("id", *CHUNK_COLUMNS) if self.chunked else ("id",),
                                    rebuild_hint(index_dir, manifest))
        if self.table.num_rows != count:
            raise InputError(f"{path} describes {self.table.num_rows:,} rows, the index holds {count:,} vectors; "
                             f"{rebuild_hint(index_dir, manifest)}")
        self.id_column = "doc_id" if self.chunked else "id"
        self.id_feature = _feature(self.table, self.id_column)
        self.text_column = manifest.get("text_column") or "text"
        self.source_path = manifest.get("source_dataset")
        self.embeddings_path = manifest.get("embeddings")
        self.embeddings_hash = manifest.get(EMBEDDINGS_KEY) or next(
            (i.get("manifest_sha256") for i in manifest.get("inputs", []) if i.get("path") == self.embeddings_path),
            None)
        self.embeddings_changed = self.embeddings_hash is None or \
            current_manifest_hash(self.embeddings_path) != self.embeddings_hash
        self.source, self.source_problem = self._indexed_source()
        self._same = None
        self._doc_codes = None
        self._source_ids = None

    def _indexed_source(self):
        """(the source dataset, None) while it is the indexed version, else (None, what is wrong with it)."""
        from hfbatch.io import open_dataset
        from hfbatch.jobs.index import SOURCE_KEY, source_manifest_hash
        from hfbatch.runner import read_manifest

        if not self.source_path:
            return None, "the index records no source dataset"
        recorded = self.manifest.get(SOURCE_KEY)
        if recorded is None and not self.embeddings_changed:  # an index made before it was recorded
            recorded = source_manifest_hash(read_manifest(Path(self.embeddings_path)) or {})
        current = current_manifest_hash(self.source_path)
        if current is None:
            return None, f"the dataset {self.source_path} no longer exists"
        if recorded is None:
            return None, f"the index does not record which version of {self.source_path} it was built from"
        if current != recorded:
            return None, f"the dataset {self.source_path} changed since {self.index_dir} was built"
        source, _ = open_dataset(self.source_path)
        return source, None

    def outdated(self):
        """(warning name, reason, what to re-run) when what the index was built from changed; else None."""
        emb, index_dir = self.embeddings_path or "EMBEDDINGS", self.index_dir
        index_cmd = f"hfbatch index {emb} -o {index_dir}{index_options(self.manifest)} --incremental"
        if self.source is None:
            embed_cmd = f"hfbatch embed {self.source_path} -o {emb} {'--force' if self.chunked else '--incremental'}"
            fix = f"{embed_cmd} (with its options), then {index_cmd}" if self.source_path else \
                f"hfbatch index {emb} -o {index_dir} --force"
            return "text_withheld", f"{self.source_problem}: hits have ids and scores but no text", fix
        if self.embeddings_changed:
            return "index_outdated", (f"the embeddings {emb} changed since {index_dir} was built: hits are the "
                                      f"indexed rows"), index_cmd
        return None

    def ids(self, positions):
        """Ids of many positions at once (over chunks, the documents' ids)."""
        return self.table.column(self.id_column).take(_take(positions)).to_pylist()

    def all_ids(self):
        return self.table.column(self.id_column).to_pylist()

    def spans(self, positions) -> list[Span]:
        columns = [self.table.column(name).take(_take(positions)).to_pylist()
                   for name in ("chunk", "char_start", "char_end")]
        return [Span(*values) for values in zip(*columns)]

    def texts(self, positions) -> list:
        """The source dataset's text of each position's row (found by id), or None: no indexed source, or
        no row with that id."""
        import pyarrow.compute as pc

        source = self.source
        if source is None or self.text_column not in source.column_names or not len(positions):
            return [None] * len(positions)
        if self.same_order():
            rows = _take(positions)
        else:
            if self._source_ids is None:
                self._source_ids = source.data.column("id").combine_chunks()
            rows = pc.index_in(self.table.column(self.id_column).take(_take(positions)), value_set=self._source_ids)
        found = rows.is_valid()
        texts = source.data.column(self.text_column).take(rows.fill_null(0)).to_pylist()
        return [text if ok else None for text, ok in zip(texts, found.to_pylist())]

    def doc_codes(self):
        """Over chunks: int64 [rows], the same number for the chunks of one document."""
        import numpy as np
        import pyarrow.compute as pc

        if self._doc_codes is None:
            encoded = pc.dictionary_encode(self.table.column("doc_id")).combine_chunks()
            self._doc_codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        return self._doc_codes

    def same_order(self) -> bool:
        """The indexed rows are the source dataset's rows, in order (the usual case; never over chunks)."""
        if self._same is None:
            source = self.source
            self._same = source is not None and not self.chunked and "id" in source.column_names and \
                len(source) == self.table.num_rows and \
                source.data.column("id").equals(self.table.column("id"))
        return self._same

    def vector_reader(self, unit: bool):
        """A callable opening the indexed vectors (for exact search), or None where the embeddings changed
        since indexing: their rows are no longer the index's."""
        if self.embeddings_changed:
            return None

        def open_vectors():
            from hfbatch.index import ArrowVectors, UnitRows

            vectors = ArrowVectors(self.embeddings_path)
            return UnitRows(vectors) if unit else vectors

        return open_vectors


def index_options(manifest) -> str:
    """The options the index was built with, as command-line text (an --incremental re-run must repeat them)."""
    import shlex

    config = manifest.get("config") or {}
    given = [("--kind", config.get("kind"), "auto"), ("--factory", config.get("factory"), None),
             ("--memory-budget", config.get("memory_budget"), None),
             ("--target-recall", config.get("target_recall"), 0.95)]
    return "".join(f" {option} {shlex.quote(str(value))}" for option, value, default in given
                   if value is not None and value != default)


def read_rows_file(path: Path, columns, hint):
    """rows.parquet's `columns`: missing, unreadable or lacking a column is a clear error naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hfbatch.jobs.index import one_line

    if not path.is_file():
        raise InputError(f"{path} is missing: the index cannot name its hits; {hint}")
    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(f"{path} lacks the column(s) {', '.join(missing)} (made by an older hfbatch); {hint}")
        return pq.read_table(path, columns=list(columns))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path} is not a readable Parquet file ({one_line(exc)}); {hint}")


def current_manifest_hash(path) -> str | None:
    """The manifest hash of the hfbatch output at path, as jobs record their inputs; None if there is none."""
    from hfbatch.runner import MANIFEST, sha256_file

    if not path:
        return None
    try:
        return sha256_file(Path(path) / MANIFEST)[:16]
    except OSError:
        return None


def _take(positions):
    import pyarrow as pa

    return pa.array(positions, pa.int64())


def _feature(table, column):
    import datasets
    import pyarrow as pa

    return datasets.Features.from_arrow_schema(pa.schema([table.schema.field(column)]))[column]
