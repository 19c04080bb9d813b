"""Long documents as overlapping token windows (`hfbatch embed --chunk-tokens N --chunk-overlap M`).

The fast tokenizer cuts each text into windows of at most N content tokens, consecutive windows sharing
M tokens, the way transformers' question-answering pipelines do (`return_overflowing_tokens` + `stride`).
Each window keeps its special tokens, so its embedding is exactly the model's embedding of that token
window, and its offset mapping gives the character span of the original text it covers. Nothing is cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from .batching import Tokenized
from .errors import InputError


@dataclass
class Chunks:
    """The windows of a list of texts, in text order: window w belongs to text `row[w]`."""

    tokenized: Tokenized  # the windows' ids, special tokens included: what the model runs on
    row: list[int]        # index of the source text
    chunk: list[int]      # 0, 1, ... within its text
    char_start: list[int]  # span [char_start, char_end) of the source text the window covers
    char_end: list[int]

    def __len__(self):
        return len(self.row)


def content_token_limit(tokenizer, max_length: int) -> int:
    """The most content tokens one window can hold: the model's limit less its special tokens."""
    return max_length - tokenizer.num_special_tokens_to_add(pair=False)


def check_chunk_options(chunk_tokens: int, chunk_overlap: int, limit: int | None = None) -> None:
    """Refuse windows that cannot be made: overlap ≥ size (no progress), or larger than the model allows."""
    if chunk_overlap >= chunk_tokens:
        raise InputError(f"--chunk-overlap {chunk_overlap} must be smaller than --chunk-tokens {chunk_tokens}")
    if limit is not None and chunk_tokens > limit:
        raise InputError(f"--chunk-tokens {chunk_tokens} is more than the model takes: at most {limit} content "
                         f"tokens per window (its max length less the special tokens)")


def chunk_texts(tokenizer, texts: list[str], chunk_tokens: int, chunk_overlap: int) -> Chunks:
    """Overlapping windows of ≤ chunk_tokens content tokens (sharing chunk_overlap tokens) over every text.

    A text of at most chunk_tokens tokens is one window; an empty text is one window of special tokens only
    (span [0, 0)), so every text keeps at least one row.
    """
    texts = list(texts)
    if not texts:
        return Chunks(Tokenized([], None, 0), [], [], [], [])
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    encoded = tokenizer(texts, truncation=True, max_length=chunk_tokens + specials, stride=chunk_overlap,
                        return_overflowing_tokens=True, return_offsets_mapping=True, padding=False,
                        return_attention_mask=False)
    rows = list(encoded["overflow_to_sample_mapping"])
    chunk_numbers, starts, ends = [], [], []
    previous_row = None
    for w, row in enumerate(rows):
        chunk_numbers.append(chunk_numbers[-1] + 1 if row == previous_row else 0)
        previous_row = row
        start, end = content_span(encoded["offset_mapping"][w], encoded.sequence_ids(w))
        starts.append(start)
        ends.append(end)
    tokenized = Tokenized(encoded["input_ids"], encoded.get("token_type_ids"), truncated=0)
    return Chunks(tokenized, rows, chunk_numbers, starts, ends)


def content_span(offsets, sequence_ids) -> tuple[int, int]:
    """[start, end) in characters of a window's content tokens (special tokens have no sequence id)."""
    content = [span for span, seq in zip(offsets, sequence_ids) if seq is not None]
    if not content:
        return 0, 0
    return content[0][0], content[-1][1]


def chunk_id(doc_id, chunk: int) -> str:
    """A chunk row's id: always a string, whatever the type of the documents' ids."""
    return f"{doc_id}#{chunk}"


def chunk_features(doc_id_feature: dict, dim):
    """datasets.Features (chunks_table casts to their Arrow schema); the documents' id feature in
    `to_dict()` form, as hfbatch.dataset.SavedDataset gives it."""
    import datasets

    doc_id_feature = datasets.Features.from_dict({"doc_id": doc_id_feature})["doc_id"]
    return datasets.Features({
        "id": datasets.Value("string"), "doc_id": doc_id_feature, "chunk": datasets.Value("int32"),
        "char_start": datasets.Value("int32"), "char_end": datasets.Value("int32"),
        "embedding": datasets.Sequence(datasets.Value("float32"), length=dim)})


def chunks_table(doc_ids, chunks: Chunks, vectors, features):
    """One row per window of texts with ids `doc_ids`, in the schema of `chunk_features`."""
    import pyarrow as pa

    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    chunk_doc_ids = [doc_ids[r] for r in chunks.row]
    flat = pa.array(vectors.reshape(-1).astype("float32", copy=False), pa.float32())
    columns = {"id": [chunk_id(d, c) for d, c in zip(chunk_doc_ids, chunks.chunk)], "doc_id": chunk_doc_ids,
               "chunk": chunks.chunk, "char_start": chunks.char_start, "char_end": chunks.char_end,
               "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
    return pa.table(columns, schema=features.arrow_schema)


def model_content_limit(model_dir, max_length: int | None, trust_remote_code: bool = False) -> int:
    """content_token_limit for a model directory, from its tokenizer and config alone (no weights loaded),
    so a bad --chunk-tokens is refused before the encoder is built."""
    from .models import load_tokenization

    tokenizer, _, limit = load_tokenization(model_dir, max_length, trust_remote_code)
    return content_token_limit(tokenizer, limit)
