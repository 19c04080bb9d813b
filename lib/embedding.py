"""Texts in, vectors out: tokenizer + encoder + token-budget batching, shared by embed, search and classify."""

from __future__ import annotations

from dataclasses import dataclass

from .batching import DEFAULT_BATCH_TOKENS


class TextEmbedder:
    """Tokenizer + encoder + token-budget batching: texts in, embeddings out (also used by search).

    With task="classify" the same machinery returns the model's logits ([rows, num_labels]) instead.
    """

    def __init__(self, model_dir, *, task="embed", backend="auto", device="auto", precision="auto",
                 max_length=None, batch_tokens=DEFAULT_BATCH_TOKENS, trust_remote_code=False):
        from .models import effective_max_length, load_config, load_tokenizer, make_encoder

        self.tokenizer = load_tokenizer(model_dir, trust_remote_code)
        self.encoder, self.settings = make_encoder(model_dir, task=task, backend=backend, device=device,
                                                   precision=precision, trust_remote_code=trust_remote_code)
        config = load_config(model_dir, trust_remote_code)
        self.config = config
        self.max_length = effective_max_length(model_dir, self.tokenizer, config, max_length)
        self.batch_tokens = batch_tokens
        self.dim = config.num_labels if task == "classify" else config.hidden_size

    def tokenize(self, texts, pairs=None):
        """Unpadded ids; `pairs` (second texts) make BERT-style pairs with their token_type_ids."""
        from .batching import tokenize

        return tokenize(self.tokenizer, list(texts), self.max_length, None if pairs is None else list(pairs))

    def run(self, tokenized, on_batch=None, parts=None):
        """Model outputs of `tokenized`, in its order; `parts` (hfbatch.parts.ShardParts) keeps a shard's
        progress across kills."""
        import numpy as np

        from .batching import run_batches

        if len(tokenized) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return run_batches(self.encoder, tokenized, self.tokenizer.pad_token_id or 0, self.batch_tokens,
                           on_batch, parts)

    def __call__(self, texts):
        return self.run(self.tokenize(texts))


@dataclass(frozen=True)
class ModelRun:
    """The options of a job that runs a model over a dataset's shards (embed, classify): picklable, so
    --devices worker processes get them and build the same TextEmbedder on their own device."""

    dataset: str
    text_column: str
    model_dir: str
    device: str
    precision: str
    backend: str
    max_length: int | None
    batch_tokens: int
    trust_remote_code: bool
    shard_rows: int

    def embedder(self, task: str = "embed", device: str | None = None) -> TextEmbedder:
        """The model on `device` (default: the job's --device)."""
        from pathlib import Path

        return TextEmbedder(Path(self.model_dir), task=task, backend=self.backend, device=device or self.device,
                            precision=self.precision, max_length=self.max_length, batch_tokens=self.batch_tokens,
                            trust_remote_code=self.trust_remote_code)


def embeddings_features(id_feature, dim):
    import datasets

    return datasets.Features({"id": id_feature,
                              "embedding": datasets.Sequence(datasets.Value("float32"), length=dim)})


def embeddings_table(ids, vectors, dim, text_hashes=None):
    import pyarrow as pa

    flat = pa.array(vectors.reshape(-1).astype("float32", copy=False), pa.float32())
    columns = {"id": pa.array(ids), "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
    if text_hashes is not None:
        columns["text_hash"] = pa.array(text_hashes, pa.int64())
    return pa.table(columns)


ST_CONFIG = "config_sentence_transformers.json"
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")  # sentence-transformers' similarity_fn_name values


def read_similarity(model_dir) -> str:
    """The similarity function the model's sentence-transformers config names (`similarity_fn_name`), or
    "cosine", sentence-transformers' own default, where the config has none."""
    import json
    from pathlib import Path

    from .errors import InputError

    path = Path(model_dir) / ST_CONFIG
    if not path.is_file():
        return "cosine"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})")
    name = config.get("similarity_fn_name") if isinstance(config, dict) else None
    name = {"dot_product": "dot"}.get(name, name)
    if name is not None and name not in SIMILARITIES:
        raise InputError(f"{path}: similarity_fn_name {name!r} is not one of {', '.join(SIMILARITIES)}")
    return name or "cosine"
