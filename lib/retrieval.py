"""Search and evaluate an index (the library under `hfbatch search` and `hfbatch evaluate`).

An index answers from what was indexed: hit ids (and chunk spans) come from the index directory itself
(rows.parquet), and text from the source dataset only while that dataset is still the version that was
indexed (by its manifest hash); otherwise hits come without text and one warning line says what to re-run.

An index built from vectors made outside hfbatch (hfbatch.vectors) has no model and no text: it is searched
with query vectors (a .npy file, one row per query), and its hits have ids and scores.

    search(index_dir, queries, k=...)   -> hit dicts (search's JSON lines), or with output= a summary dict
    evaluate(index_dir, queries_file)   -> recall / MRR / nDCG summary dict
    Searcher                            -> the index opened for queries (both use it)

Modes (an index built with its lexical part has both; `hybrid` is then the default):
  dense    the FAISS index: the model's similarity between query and row vectors
  lexical  the BM25 index (hfbatch.lexical) over the rows' text
  hybrid   both, fused: each part returns its FUSION_DEPTH best rows, and every row either returned gets
           (1 - w) * dense similarity + w * BM25 / the query's best BM25, w = --lexical-weight
           (DEFAULT_LEXICAL_WEIGHT). A row only one part returned takes, for the other part, the lowest
           score that part returned (the most it can have) where that part's list was full, else 0 (lexical:
           it shares no term with the query). Hits carry `dense_score` and `lexical_score` (null: that part
           did not return the row).
Filters and chunked indexes work the same in every mode: the parts search rows (chunks), and documents are
ranked by their best row.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import NamedTuple

from hfbatch import log
from hfbatch.errors import InputError

MAX_WIDEN_ROUNDS = 8      # filtered search: how often nprobe / efSearch / k_factor are doubled for short lists
CHUNKS_PER_DOCUMENT = 4   # chunked index: chunks fetched per document wanted, times 4 again while too few documents
MODES = ("hybrid", "dense", "lexical")
# chosen on the dev half of bench/debian_retrieval.py's proxy task (MiniLM, 10,000 Debian descriptions)
DEFAULT_LEXICAL_WEIGHT = 0.2
FUSION_DEPTH = 100        # hybrid: rows each part returns per query before fusion


class SearchHits(list):
    """The hit dicts of all queries, best first per query, in query order. `.queries` names every query as
    the hits' `query` field does, and `.by_query` holds each one's hits (a query may have none)."""

    def __init__(self, queries, by_query):
        super().__init__(hit for query_hits in by_query for hit in query_hits)
        self.queries, self.by_query = list(queries), by_query


def search(index_dir, queries=(), *, queries_file=None, query_vectors=None, query_ids=None, k: int = 10,
           filters: dict | None = None, output=None, show_span: bool = False, nprobe: int | None = None,
           ef: int | None = None, model=None, trust_remote_code: bool = False, device: str = "auto",
           precision: str = "auto", force: bool = False, mode: str | None = None,
           lexical_weight: float | None = None):
    """`hfbatch search`: the k best hits of each query in `index_dir`.

    Queries are texts (`queries`, and `queries_file`: see read_query_records), embedded with the index's model
    (or `model`), or vectors: `query_vectors`, a .npy file with one row per query, named by their row number
    or by `query_ids` (a file as `hfbatch index --ids` takes). An index of vectors made elsewhere has no model
    and takes only query vectors. `filters`: {column: [values] or value} (see parse_filters). `mode`: hybrid,
    dense or lexical (default: hybrid where the index has both parts); `lexical_weight`: hybrid's w (module doc).

    Returns the hits as dicts, one per hit, as `hfbatch search` prints them (SearchHits: a list, with
    `.queries`); with `output`, writes them as a dataset instead (with a manifest, atomically) and returns
    the job's summary dict."""
    queries = [queries] if isinstance(queries, str) else list(queries)  # one query, not its characters
    filters = {column: [values] if isinstance(values, str) else list(values) for column, values in
               (filters or {}).items()}  # (Python callers may give one value as it is)
    texts = queries + (read_queries(Path(queries_file)) if queries_file else [])
    if query_vectors is not None and texts:
        raise InputError("give text queries or --query-vectors, not both")
    if query_vectors is None and not texts:
        raise InputError("give at least one QUERY, --queries FILE or --query-vectors FILE.npy")
    if query_ids is not None and query_vectors is None:
        raise InputError("--query-ids names the rows of --query-vectors; give --query-vectors too")
    # opened first: a damaged index is refused before anything is written
    searcher = Searcher(index_dir, model=model, trust_remote_code=trust_remote_code, nprobe=nprobe, ef=ef,
                        filters=filters, device=device, precision=precision, mode=mode,
                        lexical_weight=lexical_weight, vector_queries=query_vectors is not None)
    if query_vectors is None:
        if searcher.mode != "lexical":
            searcher.require_model()
        labels, vectors = texts, None
    else:
        vectors, labels = searcher.read_query_vectors(query_vectors, query_ids)

    def run():
        searcher.warn_if_outdated()
        if vectors is None:
            scores, positions = searcher.search(texts, k)
        else:
            scores, positions = searcher.search_embedded(vectors, k)
        log_search_memory(len(labels))
        return searcher.hits(labels, scores, positions)

    if output is None:
        return SearchHits(labels, [[hit_record(hit, show_span) for hit in query_hits] for query_hits in run()])

    from hfbatch.runner import Job

    config = {"queries": list(queries), "k": k, "filters": filters or {}, "nprobe": nprobe, "ef": ef,
              "model": model}
    if show_span:
        config["show_span"] = True
    if precision != "auto":  # only when given: outputs made before the option keep their config
        config["precision"] = precision
    if mode is not None or lexical_weight is not None:
        config.update(mode=mode, lexical_weight=lexical_weight)
    files = [path for path in (queries_file, query_vectors, query_ids) if path]
    reads = [p for p in (searcher.rows.source_path, searcher.rows.embeddings_path) if p]
    with Job("search", output, config=config, files=files, datasets=[index_dir], force=force,
             reads=reads) as job:
        if job.up_to_date:
            return job.summary()
        table, features = hits_table(searcher, run(), show_span)
        job.shards.write_shard(0, table, queries=len(labels))
        job.publish_dataset(1, features, extra={"k": k, "filters": filters or {}, "mode": searcher.mode,
                                                "index": str(Path(index_dir).resolve()),
                                                "filtered_rows": searcher.allowed_count,
                                                "text_from_source": searcher.rows.source is not None})
        return job.summary()


def log_search_memory(queries: int) -> None:
    """Search's peak resident memory, logged: the index is memory-mapped, so this is what one search costs
    beyond the page cache it shares with others."""
    import resource

    log.event("search", "memory", queries=queries,
              peak_rss_mb=f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


def parse_filters(values) -> dict[str, list[str]]:
    """`--filter COLUMN=VALUE` (repeatable) -> {column: [values]}: values of one column are OR-ed,
    different columns AND-ed."""
    filters: dict[str, list[str]] = {}
    for value in values:
        column, sep, wanted = value.partition("=")
        if not sep or not column.strip():
            raise InputError(f"--filter {value!r}: expected COLUMN=VALUE, e.g. section=games")
        filters.setdefault(column.strip(), []).append(wanted)
    return filters


class Hit(NamedTuple):
    query_index: int
    query: object     # the text, or a query vector's row number or id
    rank: int
    score: float
    id: object
    text: str | None
    span: Span | None  # over chunks: which chunk of the document scored best
    parts: tuple | None = None  # lexical and hybrid modes: (dense score, lexical score), None where not found


def hit_record(hit: Hit, show_span: bool = False) -> dict:
    """A hit as `hfbatch search` prints it: query, rank, id, score, text; in lexical and hybrid mode also
    dense_score and lexical_score (null: that part did not return it); over chunks also chunk and span (and
    with show_span the span's text)."""
    record = {"query": hit.query, "rank": hit.rank, "id": hit.id, "score": round(hit.score, 6), "text": hit.text}
    if hit.parts is not None:
        record.update(dense_score=_rounded(hit.parts[0]), lexical_score=_rounded(hit.parts[1]))
    if hit.span:
        record.update(chunk=hit.span.chunk, span=[hit.span.start, hit.span.end])
        if show_span:
            record["span_text"] = hit.span.text_of(hit.text)
    return record


def _rounded(score):
    return None if score is None else round(score, 6)


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
    with_parts = searcher.mode != "dense"
    if with_parts:
        schema.update(dense_score=datasets.Value("float32"), lexical_score=datasets.Value("float32"))
    if chunked:
        schema.update(chunk=datasets.Value("int32"), char_start=datasets.Value("int32"),
                      char_end=datasets.Value("int32"))
        if show_span:
            schema["span_text"] = datasets.Value("string")
    columns = {name: [] for name in schema}
    for hit in (hit for query_hits in hits for hit in query_hits):
        values = [hit.query_index, str(hit.query), hit.rank, hit.id, hit.score, hit.text]
        if with_parts:
            values += list(hit.parts)
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


def read_query_records(path: Path, vector_rows: int | None = None) -> list[dict]:
    """Query records from a file, each with at least "query": JSON Lines objects (with `query` or `text`, other
    fields kept), CSV rows (a `query` column), or plain text lines. The file must be UTF-8.

    With `vector_rows` (the number of query vectors given beside it), a JSON Lines `query` is instead the row
    number of a query vector, 0 <= query < vector_rows."""
    try:
        return _query_records(path, vector_rows)
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1 if isinstance(exc.object, bytes) else None
        where = f"{path}:{line}" if line else str(path)
        raise InputError(f"{where}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                         f"save the queries file as UTF-8")


def _query_records(path: Path, vector_rows: int | None = None) -> list[dict]:
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
        if vector_rows is not None:
            if not isinstance(text, int) or isinstance(text, bool) or not 0 <= text < vector_rows:
                raise InputError(f"{path}:{number}: `query` must be the row number of a query vector "
                                 f"(0 to {vector_rows - 1}, from --query-vectors); got {text!r}")
        elif not isinstance(text, str):
            raise InputError(f"{path}:{number}: expected an object with a `query` or `text` string")
        records.append({**obj, "query": text, "line": number})
    return records


# ---- the searcher -----------------------------------------------------------------------------------------

class Searcher:
    """An index opened for queries: its dense (FAISS) and lexical parts, its rows, tuned search parameters, the
    query encoder (loaded on first use), an optional filter and the mode (see the module doc). Used by
    `search` and `evaluate`."""

    def __init__(self, index_dir, *, model=None, trust_remote_code=False, nprobe=None, ef=None, filters=None,
                 device="auto", precision="auto", mode=None, lexical_weight=None, vector_queries=False):
        from hfbatch.runner import require_complete

        self.index_dir = Path(index_dir)
        manifest = require_complete(self.index_dir, "index")
        if manifest.get("job") != "index":
            raise InputError(f"{index_dir} is an `hfbatch {manifest.get('job')}` output, not an index")
        self.manifest = manifest
        self.similarity = manifest.get("similarity") or "cosine"  # what indexes assumed before it was recorded
        self.metric = manifest.get("metric") or "ip"
        self.index = None if manifest.get("kind") == "lexical" else open_index_file(self.index_dir, manifest)
        self.lexical = open_lexical(self.index_dir, manifest) if manifest.get("lexical") else None
        self.count = self.index.ntotal if self.index is not None else self.lexical.count
        self.mode = choose_mode(mode, self, vector_queries)
        self.lexical_weight = DEFAULT_LEXICAL_WEIGHT if lexical_weight is None else float(lexical_weight)
        if not 0.0 <= self.lexical_weight <= 1.0:
            raise InputError(f"--lexical-weight {lexical_weight}: expected a number from 0 to 1")
        self.rows = IndexRows(self.index_dir, manifest, self.count)
        self.allowed = None            # int64 index positions the filter lets through, sorted
        self.allowed_count = None
        self._allowed_mask = None
        if filters:
            self.allowed = allowed_positions(self.rows, filters)
            self.allowed_count = len(self.allowed)
            log.event("search", "filter", filters=json.dumps(filters), rows=self.allowed_count)
        self._encoder_options = dict(model=model, trust_remote_code=trust_remote_code, device=device,
                                     precision=precision)
        self._embedder = None
        self._parts = {}  # (query number, position) -> (dense score, lexical score) of the last search
        self._tune(nprobe, ef)

    def _tune(self, nprobe, ef):
        from hfbatch.indexing import apply_search_params, search_param_grid

        overrides = {key: value for key, value in (("nprobe", nprobe), ("efSearch", ef)) if value is not None}
        knobs = search_param_grid(self.index) if self.index is not None else {}
        for key, option in (("nprobe", "--nprobe"), ("efSearch", "--ef")):
            if key in overrides and key not in knobs:
                raise InputError(f"{option}: {self.index_dir} is a {self.manifest.get('kind')} index "
                                 f"({self.manifest.get('factory')}), which has no {key}; {option} applies to "
                                 f"{'IVF' if key == 'nprobe' else 'HNSW'} indexes")
        if self.index is not None:
            apply_search_params(self.index, {**(self.manifest.get("params") or {}), **overrides})

    @property
    def embedder(self):
        """The query encoder: the index's model (or --model) on its own device and precision."""
        if self._embedder is None:
            self.require_model()
            self._embedder = query_embedder(self.manifest, **self._encoder_options)
        return self._embedder

    def require_model(self):
        """Text queries need a model: the index's, or --model; vectors made elsewhere have none."""
        if not self.manifest.get("model") and not self._encoder_options["model"]:
            raise InputError(f"{self.index_dir} was built from vectors made outside hfbatch ("
                             f"{self.manifest.get('vectors') or 'no model recorded'}): text queries cannot be "
                             f"embedded; give the query vectors with --query-vectors FILE.npy (or --model DIR, "
                             f"the model that made the vectors)")

    def read_query_vectors(self, path, ids_file=None):
        """(float32 vectors [queries, dim], their names: row numbers, or the ids in `ids_file`)."""
        from hfbatch.vectors import check_ids, read_ids, read_query_vectors

        if self.index is None:
            raise InputError(f"--query-vectors: {self.index_dir} is a lexical index (no vectors); give text "
                             f"queries")
        vectors = read_query_vectors(path, self.index.d)
        if ids_file is None:
            return vectors, list(range(len(vectors)))
        ids = read_ids(Path(ids_file), option="--query-ids")
        check_ids(ids, len(vectors), ids_file, "--query-ids")
        return vectors, ids.to_pylist()

    def warn_if_outdated(self):
        """One warning line on stderr when the dataset or embeddings changed since the index was built."""
        problem = self.rows.outdated()
        if problem:
            log.warn("search", problem[0], reason=problem[1], rerun=problem[2])

    def embed(self, texts):
        import numpy as np

        from hfbatch.indexing import normalize_rows

        vectors = np.ascontiguousarray(self.embedder(list(texts)), dtype=np.float32)
        return normalize_rows(vectors) if self.similarity == "cosine" else vectors

    def search(self, texts, k, vectors=None):
        """(scores, positions) [len(texts), k'] for all texts in one batched search, in self.mode; position -1
        = no hit. Scores: the model's similarity (dense), BM25 (lexical), the fused score (hybrid); larger is
        closer. Over a chunked index, the k best documents, each at the position of its best chunk. `vectors`:
        the texts already embedded (evaluate embeds once for several modes)."""
        import numpy as np

        texts = list(texts)
        if self.mode != "lexical" and vectors is None:
            vectors = self.embed(texts)
        if self.mode == "dense":
            return self.search_embedded(vectors, k)
        if vectors is not None and self.similarity == "cosine":
            from hfbatch.indexing import normalize_rows

            vectors = normalize_rows(vectors)
        text_array = np.empty(len(texts), dtype=object)
        text_array[:] = texts
        self._parts = {}
        queries = np.arange(len(texts))
        if self.mode == "lexical":
            rows = lambda which, n: self._record_parts(which, *self.lexical_rows(text_array[which], n), lexical=True)
        else:
            rows = lambda which, n: self.hybrid_rows(which, vectors[which], text_array[which], n)
        return self._documents(rows, queries, k)

    def search_embedded(self, vectors, k):
        """Dense search for query vectors already embedded (unit-length first, for a cosine index)."""
        import numpy as np

        from hfbatch.indexing import normalize_rows

        if self.similarity == "cosine":
            vectors = normalize_rows(vectors)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return self._documents(self.dense_rows, vectors, k)

    def _documents(self, search_rows, queries, k):
        """Over chunks, the k best documents at their best rows (best_chunk_per_document); else the k best rows."""
        if self.rows.chunked:
            limit = self.count if self.allowed is None else len(self.allowed)
            return best_chunk_per_document(search_rows, queries, k, self.rows.doc_codes(), limit)
        return search_rows(queries, min(k, self.count))

    def dense_rows(self, vectors, k):
        """The k best index rows (chunks, over a chunked index) by the model's similarity."""
        import numpy as np

        k = min(k, self.index.ntotal)
        if self.allowed is None:
            from hfbatch.indexing import search_batched

            scores, positions = search_batched(self.index, vectors, k)
        else:
            reader = self.rows.vector_reader(unit=self.similarity == "cosine")
            scores, positions = filtered_search(self.index, vectors, k, self.allowed, exact_reader=reader,
                                                metric=self.metric)
        if self.metric == "l2":  # faiss gives squared distances; sentence-transformers' similarity is -distance
            scores = np.where(positions >= 0, -np.sqrt(np.maximum(scores, 0)), -np.inf)
        return scores, positions

    def lexical_rows(self, texts, k):
        """The k best index rows by BM25, only allowed ones under a filter."""
        import numpy as np

        if self.allowed is not None and self._allowed_mask is None:
            self._allowed_mask = np.zeros(self.count, dtype=bool)
            self._allowed_mask[self.allowed] = True
        return self.lexical.search(list(texts), min(k, self.count), allowed=self._allowed_mask)

    def hybrid_rows(self, which, vectors, texts, k):
        """The k best rows by the fused score (module doc): both parts' FUSION_DEPTH best, fused per query."""
        import numpy as np

        depth = min(max(k, FUSION_DEPTH), self.count)
        dense_scores, dense_positions = self.dense_rows(np.ascontiguousarray(vectors), depth)
        lexical_scores, lexical_positions = self.lexical_rows(texts, depth)
        scores = np.full((len(which), k), -np.inf, dtype=np.float32)
        positions = np.full((len(which), k), -1, dtype=np.int64)
        for row, query in enumerate(which):
            fused = fuse(dense_scores[row], dense_positions[row], lexical_scores[row], lexical_positions[row],
                         self.lexical_weight, depth)
            for rank, (score, position, dense, lexical) in enumerate(fused[:k]):
                scores[row, rank], positions[row, rank] = score, position
                self._parts[(int(query), position)] = (dense, lexical)
        return scores, positions

    def _record_parts(self, which, scores, positions, lexical):
        for query, row_scores, row_positions in zip(which, scores, positions):
            for score, position in valid_hits(row_scores, row_positions):
                self._parts[(int(query), position)] = (None, score) if lexical else (score, None)
        return scores, positions

    def hits(self, texts, scores, positions) -> list[list[Hit]]:
        """The hits of each query, named from the index's rows: ids and spans looked up for all at once."""
        found = [valid_hits(row_scores, row_positions) for row_scores, row_positions in zip(scores, positions)]
        flat = [position for query_hits in found for _, position in query_hits]
        ids, row_texts = self.rows.ids(flat), self.rows.texts(flat)
        spans = self.rows.spans(flat) if self.rows.chunked else [None] * len(flat)
        with_parts = self.mode != "dense"
        hits, at = [], 0
        for qi, (query, query_hits) in enumerate(zip(texts, found)):
            hits.append([Hit(qi, query, rank, score, ids[at + rank - 1], row_texts[at + rank - 1],
                             spans[at + rank - 1], self._parts.get((qi, position), (None, None)) if with_parts
                             else None)
                         for rank, (score, position) in enumerate(query_hits, start=1)])
            at += len(query_hits)
        return hits


def fuse(dense_scores, dense_positions, lexical_scores, lexical_positions, weight, depth):
    """[(fused score, position, dense score or None, lexical score or None)] best first, for one query: the
    union of both parts' rows, scored (1 - weight) * dense + weight * lexical / the best lexical score. A part
    that did not return a row lends it its lowest returned score where it returned `depth` rows (the row
    may be just below them), else the floor: 0 for BM25 (no shared term), the lowest dense score for dense
    (a filter left fewer rows)."""
    dense = dict((p, s) for s, p in valid_hits(dense_scores, dense_positions))
    lexical = dict((p, s) for s, p in valid_hits(lexical_scores, lexical_positions))
    best = max(lexical.values(), default=0.0) or 1.0
    dense_floor = min(dense.values(), default=0.0)
    lexical_floor = min(lexical.values()) if len(lexical) >= depth else 0.0
    fused = []
    for position in dense.keys() | lexical.keys():
        d, l = dense.get(position), lexical.get(position)
        score = (1 - weight) * (dense_floor if d is None else d) + weight * (lexical_floor if l is None else l) / best
        fused.append((score, position, d, l))
    fused.sort(key=lambda hit: (-hit[0], hit[1]))  # ties by position: the same order every time
    return fused


def choose_mode(mode, searcher, vector_queries=False) -> str:
    """The mode asked for, where the index has the parts it needs; by default hybrid where it has both (dense
    for query vectors: they have no text)."""
    parts = [name for name, there in (("dense", searcher.index is not None), ("lexical", searcher.lexical))
             if there]
    if mode is None:
        return "hybrid" if len(parts) == 2 and not vector_queries else parts[0]
    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if vector_queries and mode != "dense":
        raise InputError(f"--mode {mode}: query vectors have no text, so they search the dense part only")
    missing = [part for part in (("dense", "lexical") if mode == "hybrid" else (mode,)) if part not in parts]
    if missing == ["dense"]:
        raise InputError(f"--mode {mode}: {searcher.index_dir} has no dense part (it is an `hfbatch index --kind "
                         f"lexical` index); use --mode lexical")
    if missing:
        raise InputError(f"--mode {mode}: {searcher.index_dir} has no lexical part (built with --no-lexical, "
                         f"from vectors made elsewhere, without its source text, or by an older hfbatch); use "
                         f"--mode dense, or {rebuild_hint(searcher.index_dir, searcher.manifest)}")
    return mode


def open_lexical(index_dir: Path, manifest):
    """The lexical part, memory-mapped; missing or unreadable is a clear error naming it."""
    from hfbatch.lexical import LEXICAL_DIR, LexicalIndex

    record = manifest["lexical"]
    directory = index_dir / record.get("directory", LEXICAL_DIR)
    try:
        return LexicalIndex(directory, record)
    except InputError as exc:
        raise InputError(f"{exc}; {rebuild_hint(index_dir, manifest)}")


def query_precision(precision, device):
    """auto: fp32 on CPU (a batch of queries costs little and fp32 is exact), else the device's own auto
    choice (bf16 on CUDA, fp16 on older CUDA): either way within the model's tolerance of the index's vectors,
    whatever precision embedded those."""
    from hfbatch.models import choose_precision

    if precision == "auto" and device == "cpu":
        return "fp32"
    return choose_precision(precision, device)


def query_embedder(manifest, *, model, trust_remote_code, device, precision):
    from hfbatch.embedding import EncoderRun
    from hfbatch.models import choose_device, resolve_model_dir

    model_dir = resolve_model_dir(model or manifest["model"])
    device = choose_device(device)
    settings = manifest.get("embedding_settings") or {}  # max_length is the model's, not the hardware's
    embedder = EncoderRun(model_dir, device=device, precision=query_precision(precision, device),
                            max_length=settings.get("max_length"), trust_remote_code=trust_remote_code,
                            tune=False)  # queries are too few to pay for measuring a batch budget
    if embedder.dim != manifest.get("dim"):
        raise InputError(f"--model {model_dir} makes {embedder.dim}-d vectors but the index holds "
                         f"{manifest['dim']}-d ones")
    return embedder


def open_index_file(index_dir: Path, manifest):
    """index.faiss, memory-mapped where that saves memory; missing or unreadable is a clear error naming the
    file."""
    from hfbatch.indexing import INDEX_FILE, load_index, maps_in_place, one_line

    path = index_dir / INDEX_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing; {rebuild_hint(index_dir, manifest)}")
    try:
        index = load_index(path, mmap=maps_in_place(manifest.get("factory")))
    except RuntimeError as exc:  # faiss: bad magic, truncated, ...
        raise InputError(f"{path} is not a readable FAISS index ({one_line(exc)}); "
                         f"{rebuild_hint(index_dir, manifest)}")
    if manifest.get("count") is not None and index.ntotal != manifest["count"]:
        raise InputError(f"{path} holds {index.ntotal:,} vectors, its manifest says {manifest['count']:,}; "
                         f"{rebuild_hint(index_dir, manifest)}")
    from hfbatch.index_rerank import attach

    return attach(index, index_dir, manifest)  # an `,RDisk` index re-ranks from the vectors it was built from


def rebuild_hint(index_dir, manifest):
    source = manifest.get("embeddings") or manifest.get("vectors") or "EMBEDDINGS"
    return f"rebuild it: hfbatch index {source} -o {index_dir} --force"


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
        data = rows.source_column(column)
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
    ids = rows.source_column("id").take(pa.array(source_rows))  # every chunk of a matching document, over chunks
    return np.flatnonzero(pc.is_in(rows.table.column(rows.id_column), value_set=ids)
                          .to_numpy(zero_copy_only=False)).astype(np.int64)


def filtered_search(index, vectors, k, allowed, exact_reader=None, metric="ip"):
    """Search only the positions in `allowed` (sorted int64), inside faiss (an IDSelector), so the k best
    allowed rows come back rather than the allowed part of the k best.

    An approximate index may find fewer than k allowed rows in the lists or graph it visits (a selective
    filter); those queries are searched again with nprobe / efSearch / k_factor doubled, up to
    MAX_WIDEN_ROUNDS times, and any still short are answered exactly from the embeddings (`exact_reader()`,
    an ArrowVectors-like read_chunk, or None where the indexed vectors are no longer at hand) restricted to the
    allowed rows.
    """
    import numpy as np

    from hfbatch.faiss_runtime import faiss
    from hfbatch.indexing import exact_neighbors, search_params_with_selector

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
        params, more = search_params_with_selector(index, sel, widen)
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
        D, I = exact_neighbors(exact_reader(), n, vectors[todo], k, metric=metric, allowed=allowed)
        scores[todo], positions[todo] = D, I
    return scores, positions


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
        from hfbatch.indexing import CHUNK_COLUMNS, EMBEDDINGS_KEY, ROWS_FILE

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
        # index --kind lexical over a dataset: no embeddings to fall behind
        self.text_only = manifest.get("kind") == "lexical" and not self.embeddings_path
        self.embeddings_changed = not self.text_only and self.embeddings_hash is None or \
            current_manifest_hash(self.embeddings_path) != self.embeddings_hash
        self.foreign = manifest.get("vectors")  # made elsewhere: no model, no source dataset, no text
        self.source_manifest = {}
        self.source, self.source_problem = self._indexed_source()
        self._same = None
        self._doc_codes = None
        self._source_ids = None

    def _indexed_source(self):
        """(the source dataset, None) while it is the indexed version, else (None, what is wrong with it)."""
        from hfbatch.indexing import SOURCE_KEY, source_manifest_hash
        from hfbatch.io import open_dataset
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
        # validated where it is read: a filter's column whole, hits' text row by row (not all of it per search)
        source, self.source_manifest = open_dataset(self.source_path, validate=False)
        return source, None

    def source_column(self, name: str, rows=None):
        """A column of the source dataset, validated (offsets in bounds, UTF-8) before it is read: whole, or
        only `rows` (numpy positions). A damaged data file is one line naming it, not a crash."""
        import numpy as np
        import pyarrow as pa

        from hfbatch.io import damaged

        column = self.source.data.column(name)
        try:
            if rows is None:
                column.validate(full=True)
            else:
                for row in np.unique(rows):
                    column.slice(int(row), 1).validate(full=True)
        except pa.ArrowException as exc:
            raise damaged("dataset", self.source_path, self.source_manifest.get("job"), exc)
        return column

    def outdated(self):
        """(warning name, reason, what to re-run) when what the index was built from changed; else None."""
        emb, index_dir = self.embeddings_path or self.foreign or "EMBEDDINGS", self.index_dir
        index_cmd = f"hfbatch index {emb} -o {index_dir}{index_options(self.manifest)} --incremental"
        if self.foreign:  # hits never have text; the vectors' files are checked by size and mtime (cheap)
            changed = [i["path"] for i in self.manifest.get("inputs", []) if i.get("kind") == "file"
                       and _file_changed(i)]
            return ("index_outdated", f"{changed[0]} changed since {index_dir} was built: hits are the indexed "
                                      f"rows", index_cmd) if changed else None
        if self.source is None and self.text_only:
            return ("text_withheld", f"{self.source_problem}: hits have ids and scores but no text",
                    f"hfbatch index {self.source_path} -o {index_dir}{index_options(self.manifest)} --incremental")
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
        import numpy as np
        import pyarrow.compute as pc

        source = self.source
        if source is None or self.text_column not in source.column_names or not len(positions):
            return [None] * len(positions)
        if self.same_order():
            rows = _take(positions)
        else:
            if self._source_ids is None:
                self._source_ids = self.source_column("id").combine_chunks()
            rows = pc.index_in(self.table.column(self.id_column).take(_take(positions)), value_set=self._source_ids)
        found = rows.is_valid()
        rows = np.asarray(rows.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        texts = take_by_chunk(self.source_column(self.text_column, rows), rows)
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
            from hfbatch.indexing import ArrowVectors, UnitRows

            vectors = ArrowVectors(self.embeddings_path)
            return UnitRows(vectors) if unit else vectors

        return open_vectors


def index_options(manifest) -> str:
    """The options the index was built with, as command-line text (an --incremental re-run must repeat them)."""
    import shlex

    config = manifest.get("config") or {}
    vectors = config.get("vectors") or {}
    ids = [i["path"] for i in manifest.get("inputs", []) if i.get("kind") == "file"][1:2] \
        if vectors.get("format") == "npy" else []
    given = [("--kind", config.get("kind"), "auto"), ("--factory", config.get("factory"), None),
             ("--memory-budget", config.get("memory_budget"), None),
             ("--target-recall", config.get("target_recall"), 0.95),
             ("--vector-column", vectors.get("vector_column"), None), ("--id-column", vectors.get("id_column"), None),
             ("--ids", ids[0] if ids else None, None), ("--metric", vectors.get("metric"), "cosine"),
             ("--language", config.get("language"), "english"), ("--text-column", config.get("text_column"), None)]
    return "".join(f" {option} {shlex.quote(str(value))}" for option, value, default in given
                   if value is not None and value != default) + (" --no-lexical" if config.get("lexical") is False
                                                                  else "")


def read_rows_file(path: Path, columns, hint):
    """rows.parquet's `columns`: missing, unreadable or lacking a column is a clear error naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hfbatch.indexing import one_line

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


def _file_changed(record: dict) -> bool:
    try:
        stat = Path(record["path"]).stat()
    except OSError:
        return True
    return (stat.st_size, stat.st_mtime_ns) != (record.get("size"), record.get("mtime_ns"))


def current_manifest_hash(path) -> str | None:
    """The manifest hash of the hfbatch output at path, as jobs record their inputs; None if there is none."""
    from hfbatch.runner import MANIFEST, sha256_file

    if not path:
        return None
    try:
        return sha256_file(Path(path) / MANIFEST)[:16]
    except OSError:
        return None


def take_by_chunk(column, rows) -> list:
    """column.take(rows).to_pylist() for a ChunkedArray, taken chunk by chunk: Arrow's take over a chunked
    string column first concatenates every chunk, copying a whole memory-mapped text column into memory
    (measured: +700 MB to name 2,000 hits in 1M Debian descriptions)."""
    import numpy as np
    import pyarrow as pa

    rows = np.asarray(rows, dtype=np.int64)
    bounds = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
    chunk_of = np.searchsorted(bounds, rows, side="right") - 1
    out = [None] * len(rows)
    for chunk in np.unique(chunk_of):
        picked = np.flatnonzero(chunk_of == chunk)
        values = column.chunks[chunk].take(pa.array(rows[picked] - bounds[chunk])).to_pylist()
        for at, value in zip(picked, values):
            out[at] = value
    return out


def _take(positions):
    import pyarrow as pa

    return pa.array(positions, pa.int64())


def _feature(table, column):
    import datasets
    import pyarrow as pa

    return datasets.Features.from_arrow_schema(pa.schema([table.schema.field(column)]))[column]


# ---- evaluate ---------------------------------------------------------------------------------------------

def evaluate(index_dir, queries_file, *, query_vectors=None, k: int = 100, nprobe: int | None = None,
             ef: int | None = None, model=None, trust_remote_code: bool = False, device: str = "auto",
             precision: str = "auto", mode: str | None = None, modes=None,
             lexical_weight: float | None = None) -> dict:
    """`hfbatch evaluate`: recall@1/10/100, MRR@10 and nDCG@10 (binary relevance) of `index_dir` on the queries
    of `queries_file` (JSON Lines {"query": "...", "relevant": [id, ...]}), embedded and searched in one batch.

    With `query_vectors` (a .npy file, one row per query), each line's `query` is the row number of its vector
    instead: how an index of vectors made elsewhere (no model) is evaluated. Ids are compared as text. Metrics
    with a cutoff above k are left out. `mode` as search takes it (default hybrid where the index has both
    parts); `modes` (a list) measures each, the queries embedded once, and returns one summary per mode under
    "modes". Returns the summary dict that --json prints."""
    path = Path(queries_file)
    if modes and mode:
        raise InputError("give --mode or --modes, not both")
    for name in modes or ():
        if name not in MODES:
            raise InputError(f"--modes {','.join(modes)}: {name!r} is not one of {', '.join(MODES)}")
    options = dict(nprobe=nprobe, ef=ef, lexical_weight=lexical_weight, vector_queries=query_vectors is not None)
    searcher, vectors = None, None
    if query_vectors is not None:  # the index first: the vectors' dimension is checked against it
        searcher = Searcher(index_dir, mode=mode or (modes or [None])[0], **options)
        vectors, _ = searcher.read_query_vectors(query_vectors)
    records = read_query_records(path, vector_rows=None if vectors is None else len(vectors))
    if not records:
        raise InputError(f"{path}: no queries")
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise InputError(f"{path}: evaluate needs JSON Lines with a `relevant` list per query")
    relevant = []
    for record in records:
        ids = record.get("relevant")
        if not isinstance(ids, list) or not ids:
            raise InputError(f"{path}:{record['line']}: expected a non-empty `relevant` list of ids")
        relevant.append({str(i) for i in ids})

    searcher = searcher or Searcher(index_dir, model=model, trust_remote_code=trust_remote_code, device=device,
                                    precision=precision, mode=mode or (modes or [None])[0], **options)
    for name in modes or ():  # every mode is checked before the first is measured
        choose_mode(name, searcher, query_vectors is not None)
    known = {str(i) for i in searcher.rows.all_ids()}
    unknown = sum(len(ids - known) for ids in relevant)
    if unknown:
        log.warn("evaluate", "unknown_relevant_ids", count=unknown,
                 hint="relevant ids that are not in the index count as misses")
    head = {"index": str(Path(index_dir)), "k": k, "unknown_relevant": unknown,
            "chunked": searcher.rows.chunked}  # ids ranked are documents, each at its best chunk
    texts = [r["query"] for r in records]
    if vectors is not None:
        vectors = vectors[texts]
    elif any(name != "lexical" for name in (modes or [searcher.mode])):
        started = time.monotonic()
        vectors = searcher.embed(texts)  # once for every mode
        head["embed_s"] = round(time.monotonic() - started, 3)
    results = []
    for name in modes or [searcher.mode]:
        searcher.mode = name
        started = time.monotonic()
        if query_vectors is not None:
            _, positions = searcher.search_embedded(vectors, k)
        else:
            _, positions = searcher.search(texts, k, vectors=vectors)
        results.append({"mode": name, "search_s": round(time.monotonic() - started, 3),
                        **ranked_metrics(searcher, positions, relevant, k)})
    if modes:
        return {**head, "queries": len(records), "lexical_weight": searcher.lexical_weight, "modes": results}
    return {**head, "embed_and_search_s": round(head.pop("embed_s", 0) + results[0].pop("search_s"), 3),
            "lexical_weight": searcher.lexical_weight, **results[0]}


def ranked_metrics(searcher, positions, relevant, k) -> dict:
    """The standard metrics (metrics.STANDARD with a cutoff <= k) of ranked index positions against the
    relevant ids of each query."""
    from hfbatch import metrics

    ranked = [[str(i) for i in searcher.rows.ids([p for p in row if p >= 0])] for row in positions]
    chosen = {name: spec for name, spec in metrics.STANDARD.items() if spec[1] <= k}
    scores = metrics.evaluate(zip(ranked, relevant), chosen)
    return {name: round(value, 4) if isinstance(value, float) else value for name, value in scores.items()}
