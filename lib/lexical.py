"""The lexical (BM25) part of an index: a tantivy inverted index in INDEX_DIR/lexical, one document per index row.

Why tantivy (measured in bench/lexical_engines.py, against bm25s): its writer works within a fixed heap
(spilling segments to disk and merging them), so building it needs the same memory at 10M documents as at 10k;
searching memory-maps the segments, so a search process holds only the pages its queries touch. bm25s keeps
every document's token ids in Python lists while it builds (several GB at 10M documents).

Document number r of this index is row r of the index's rows.parquet (a document, or over chunks one chunk):
each document stores `row` as a fast field, so hits are index positions like the dense part's.

Text is analysed as: split on non-alphanumerics, drop tokens over 40 characters, lowercase, drop the language's
stop words (where tantivy has a list) and stem (Snowball). Queries go through the same analyser and become an
OR of their terms, never tantivy's query syntax: a user's `c++` or `AND` is text.

    build_lexical(directory, batches, language=..., heap_bytes=...) -> manifest record (dict)
    LexicalIndex(directory, record).search(texts, k, allowed=None) -> (scores, positions)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from hfbatch.errors import InputError

LEXICAL_DIR = "lexical"
ENGINE = "tantivy"
ANALYZER = "hfbatch"                 # the name the analyser is registered under, in each process
DEFAULT_LANGUAGE = "english"
STEMMER_LANGUAGES = ("arabic", "danish", "dutch", "english", "finnish", "french", "german", "greek",
                     "hungarian", "italian", "norwegian", "portuguese", "romanian", "russian", "spanish",
                     "swedish", "tamil", "turkish")
STOP_WORD_LANGUAGES = ("danish", "dutch", "english", "finnish", "french", "german", "hungarian", "italian",
                       "norwegian", "portuguese", "russian", "spanish", "swedish")
LANGUAGES = (*STEMMER_LANGUAGES, "none")  # none: lowercase words only, no stemming or stop words
MAX_TOKEN_CHARS = 40
MIN_HEAP_PER_THREAD = 15_000_000     # tantivy refuses under 15 MB per writer thread
DEFAULT_HEAP = 256 * 2**20
FETCH_WIDEN = 4                       # filtered search: fetch this many times more hits while too few pass


def analyzer_record(language: str) -> dict:
    """What the manifest records about tokenisation (and what search rebuilds the analyser from)."""
    if language not in LANGUAGES:
        raise InputError(f"--language {language!r}: expected one of {', '.join(LANGUAGES)}")
    stemmed = language != "none"
    return {"tokenizer": "simple", "lowercase": True, "max_token_chars": MAX_TOKEN_CHARS,
            "stop_words": language if language in STOP_WORD_LANGUAGES else None,
            "stemmer": language if stemmed else None, "language": language}


def make_analyzer(settings: dict):
    import tantivy

    builder = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(
        tantivy.Filter.remove_long(settings["max_token_chars"])).filter(tantivy.Filter.lowercase())
    if settings.get("stop_words"):
        builder = builder.filter(tantivy.Filter.stopword(settings["stop_words"]))
    if settings.get("stemmer"):
        builder = builder.filter(tantivy.Filter.stemmer(settings["stemmer"]))
    return builder.build()


def _schema():
    import tantivy

    builder = tantivy.SchemaBuilder()
    builder.add_text_field("text", stored=False, tokenizer_name=ANALYZER, index_option="freq")
    builder.add_integer_field("row", stored=False, indexed=False, fast=True)
    return builder.build()


def _open(directory: Path, settings: dict, create: bool = False):
    import tantivy

    if create:
        directory.mkdir(parents=True, exist_ok=False)
        index = tantivy.Index(_schema(), path=str(directory), reuse=False)
    else:
        index = tantivy.Index.open(str(directory))
    index.register_tokenizer(ANALYZER, make_analyzer(settings))
    return index


def build_lexical(directory: Path, batches: Iterable[list[str | None]], *, language: str = DEFAULT_LANGUAGE,
                  heap_bytes: int = DEFAULT_HEAP, threads: int = 1) -> dict:
    """Index the texts of `batches` (lists of texts, index rows in order; None indexes nothing) in a new
    `directory`, one committed tantivy index merged by its own policy. The writer buffers at most
    `heap_bytes` (floored at tantivy's minimum) before it writes a segment, so memory does not grow with the
    corpus. Returns the manifest record."""
    import tantivy

    settings = analyzer_record(language)
    heap = max(int(heap_bytes), MIN_HEAP_PER_THREAD * threads)
    index = _open(directory, settings, create=True)
    writer = index.writer(heap_size=heap, num_threads=threads)
    row = 0
    for batch in batches:
        for text in batch:
            writer.add_document(tantivy.Document(text=text or "", row=row))
            row += 1
    writer.commit()
    writer.wait_merging_threads()
    return {"engine": ENGINE, "engine_version": engine_version(), "directory": LEXICAL_DIR, "docs": row,
            "writer_heap_bytes": heap, "scoring": "BM25 (k1 1.2, b 0.75)", **settings}


def engine_version() -> str:
    from importlib.metadata import version

    return version("tantivy")


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


class LexicalIndex:
    """The lexical part opened for queries (memory-mapped by tantivy). Positions are index rows."""

    def __init__(self, directory: Path, record: dict):
        self.directory = Path(directory)
        if not (self.directory / "meta.json").is_file():
            raise InputError(f"{self.directory} is missing or not a tantivy index")
        try:
            self.index = _open(self.directory, record)
            self.searcher = self.index.searcher()
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.directory} is not a readable tantivy index ({exc})")
        self.count = self.searcher.num_docs
        if record.get("docs") is not None and self.count != record["docs"]:
            raise InputError(f"{self.directory} holds {self.count:,} documents, its manifest says "
                             f"{record['docs']:,}")
        self.analyzer = make_analyzer(record)

    def query_terms(self, text: str) -> list[str]:
        return list(dict.fromkeys(self.analyzer.analyze(text)))  # unique, in order

    def _query(self, terms):
        import tantivy

        schema = self.index.schema
        return tantivy.Query.boolean_query(
            [(tantivy.Occur.Should, tantivy.Query.term_query(schema, "text", term)) for term in terms])

    def search_one(self, text: str, k: int, allowed: np.ndarray | None = None) -> tuple[list[float], list[int]]:
        """(scores, positions) of the k best rows for one query, best first; with `allowed` (a bool mask over
        rows) only rows it lets through, fetching FETCH_WIDEN times more until k pass or none are left."""
        terms = self.query_terms(text)
        if not terms or k <= 0:
            return [], []
        query = self._query(terms)
        fetch = k if allowed is None else k * FETCH_WIDEN
        while True:
            result = self.searcher.search(query, limit=min(fetch, self.count), count=False)
            hits = result.hits
            rows = self.searcher.fast_field_values("row", [address for _, address in hits]) if hits else []
            scores = [float(score) for score, _ in hits]
            if allowed is not None:
                keep = [i for i, r in enumerate(rows) if allowed[r]]
                scores, rows = [scores[i] for i in keep], [rows[i] for i in keep]
            if allowed is None or len(rows) >= k or len(hits) < fetch or fetch >= self.count:
                return scores[:k], [int(r) for r in rows[:k]]
            fetch *= FETCH_WIDEN

    def search(self, texts, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32, positions int64) [len(texts), k], best first; position -1 and score -inf where a
        query matches fewer than k rows (a row matches when it shares a term with the query)."""
        scores = np.full((len(texts), k), -np.inf, dtype=np.float32)
        positions = np.full((len(texts), k), -1, dtype=np.int64)
        for i, text in enumerate(texts):
            found_scores, found_rows = self.search_one(text, k, allowed)
            scores[i, :len(found_rows)] = found_scores
            positions[i, :len(found_rows)] = found_rows
        return scores, positions


# ---- building it for `hfbatch index` ---------------------------------------------------------------------

TEXT_BATCH = 10_000  # rows whose text is held at once while the lexical part is built


def writer_heap(budget_bytes: int | None) -> int:
    """The tantivy writer's heap: an eighth of the index job's memory budget, at most DEFAULT_HEAP (more only
    makes fewer, larger segments to merge), at least tantivy's minimum."""
    if not budget_bytes:
        return DEFAULT_HEAP
    return max(MIN_HEAP_PER_THREAD, min(DEFAULT_HEAP, int(budget_bytes) // 8))


def indexed_source(record: dict) -> tuple[str | None, str]:
    """(the source dataset's path, '') when the text of the rows being indexed is at hand: the dataset the
    embeddings were made from, still the version they were made from; else (None, why not)."""
    from hfbatch.indexing import SOURCE_KEY
    from hfbatch.retrieval import current_manifest_hash

    path = record.get("source_dataset")
    if not path:
        return None, "the embeddings record no source dataset (no text to index)"
    current = current_manifest_hash(path)
    if current is None:
        return None, f"the source dataset {path} no longer exists"
    if record.get(SOURCE_KEY) is None or current != record[SOURCE_KEY]:
        return None, f"the source dataset {path} changed since the embeddings were made"
    return path, ""


def row_text_batches(source_path, text_column: str, row_table, chunked: bool, batch: int = TEXT_BATCH):
    """The text of every index row, in row order, `batch` rows at a time: the source row of the same id (over
    chunks, the document's text cut to the chunk's [char_start, char_end)). A row whose id the dataset lacks
    gets None (nothing indexed)."""
    import pyarrow.compute as pc

    from hfbatch.io import open_dataset

    source, _ = open_dataset(source_path, "source dataset")
    if text_column not in source.column_names:
        raise InputError(f"source dataset {source_path} has no text column {text_column!r}; available: "
                         f"{', '.join(source.column_names)}")
    texts = source.data.column(text_column)
    ids = row_table.column("doc_id" if chunked else "id")
    same = not chunked and "id" in source.column_names and len(source) == len(ids) and \
        source.data.column("id").equals(ids)
    source_ids = None if same else source.data.column("id").combine_chunks()
    for start in range(0, len(ids), batch):
        stop = min(len(ids), start + batch)
        if same:
            part = texts.slice(start, stop - start).to_pylist()
        else:
            rows = pc.index_in(ids.slice(start, stop - start), value_set=source_ids)
            part = texts.take(rows.fill_null(0)).to_pylist()
            part = [text if ok else None for text, ok in zip(part, rows.is_valid().to_pylist())]
        if chunked:
            spans = zip(row_table.column("char_start").slice(start, stop - start).to_pylist(),
                        row_table.column("char_end").slice(start, stop - start).to_pylist())
            part = [text and text[a:b] for text, (a, b) in zip(part, spans)]
        yield part


def add_lexical_part(tmp: Path, source_path, text_column, row_table, chunked, *, language, budget_bytes) -> dict:
    """Build the lexical part into the job's temporary directory (published with the rest); its record."""
    import time

    started = time.monotonic()
    record = build_lexical(tmp / LEXICAL_DIR, row_text_batches(source_path, text_column, row_table, chunked),
                           language=language, heap_bytes=writer_heap(budget_bytes))
    record.update(source_dataset=str(source_path), text_column=text_column,
                  build_s=round(time.monotonic() - started, 3), bytes=directory_bytes(tmp / LEXICAL_DIR))
    return record


def make_lexical_index(path: Path, output, *, language: str = DEFAULT_LANGUAGE, text_column: str | None = None,
                       memory_budget=None, budget_bytes: int | None = None, force: bool = False,
                       incremental: bool = False) -> dict:
    """`hfbatch index --kind lexical`: an index with only the lexical part, over a dataset (any hfbatch dataset
    with `id` and a text column: no embeddings needed) or over an embeddings output's rows (chunks too), whose
    text comes from their source dataset. --incremental rebuilds it (BM25 statistics depend on every row)."""
    from hfbatch.indexing import CHUNK_COLUMNS, EMBEDDINGS_KEY, ROWS_FILE, SOURCE_KEY, source_manifest_hash
    from hfbatch.io import open_dataset, require_column
    from hfbatch.runner import Job

    analyzer_record(language)  # a bad --language is refused before anything is written
    dataset, manifest = open_dataset(path, "input")
    from_embeddings = manifest.get("job") == "embed"
    require_column(dataset, "id", path, option="hfbatch ingest")  # hits are named by id
    if not from_embeddings:
        require_column(dataset, text_column or "text", path, option="--text-column")
    elif text_column:
        raise InputError(f"--text-column: {path} is an embed output, whose text column is its own")
    chunked = from_embeddings and bool(manifest.get("chunking"))
    row_table = dataset.data.table.select([c for c in ("id", *CHUNK_COLUMNS) if c in dataset.column_names])
    del dataset
    config = {"kind": "lexical", "memory_budget": memory_budget, "language": language, "text_column": text_column}
    with Job("index", output, config=config, datasets=[path], force=force, incremental=incremental) as job:
        if job.up_to_date:
            return job.summary()
        input_hash = job.inputs[0]["manifest_sha256"]
        if from_embeddings:
            record = {"embeddings": str(path), EMBEDDINGS_KEY: input_hash,
                      "source_dataset": manifest.get("source_dataset"),
                      SOURCE_KEY: source_manifest_hash(manifest), "chunking": manifest.get("chunking"),
                      "text_column": text_column or manifest.get("text_column") or "text"}
            source_path, why = indexed_source(record)
            if source_path is None:
                raise InputError(f"{path}: cannot build a lexical index: {why}; re-run hfbatch embed")
        else:
            record = {"embeddings": None, "source_dataset": str(path), SOURCE_KEY: input_hash, "chunking": None,
                      "text_column": text_column or "text"}
            source_path = str(path)
        n = row_table.num_rows
        if n == 0:
            raise InputError(f"{path}: no rows to index")
        extra = {"kind": "lexical", "factory": None, "model": None, "count": n, "dim": None, **record}

        import pyarrow.parquet as pq

        assembly = job.publisher.assemble_files(rows=n)
        pq.write_table(row_table, assembly.dir / ROWS_FILE)
        extra["lexical"] = add_lexical_part(assembly.dir, source_path, record["text_column"], row_table, chunked,
                                            language=language, budget_bytes=budget_bytes)
        job.publish(assembly, extra=extra)
        return {**job.summary(), "lexical_docs": n}
