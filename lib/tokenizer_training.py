"""The train-tokenizer job (`hfbatch train-tokenizer`): a dataset's text -> a tokenizer directory that
`AutoTokenizer.from_pretrained` loads, with a fertility report against a reference tokenizer.

From a base fast tokenizer, `train_new_from_iterator` learns a new vocabulary and keeps the base's normaliser,
pre-tokeniser, post-processor and special tokens. Without one, `new_tokenizer` builds one with the `tokenizers`
library, with the usual defaults of its algorithm: byte-level BPE (GPT-2's layout: no unknown tokens, EOS
`<|endoftext|>`), BERT-style WordPiece (lower-cased, [CLS] ... [SEP]) or SentencePiece-style Unigram (NFKC,
metaspace).

The texts are streamed from the memory-mapped dataset in slices (`text_batches`), so memory stays flat in the
corpus size; a sample of about HELDOUT_ROWS rows (every k-th row, at most 5%) is held out of training and scores the new
tokenizer and the reference: tokens per whitespace-separated word, and the share of unknown tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import log
from .errors import InputError
from .runner import Job

ALGORITHMS = ("bpe", "wordpiece", "unigram")
DEFAULT_VOCAB_SIZE = 16_000
HELDOUT_ROWS = 1000
BATCH_ROWS = 10_000
BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"

# name -> (special tokens in id order, the roles PreTrainedTokenizerFast gives them)
DEFAULT_SPECIALS = {
    "bpe": (["<|endoftext|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}),
    "wordpiece": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                  {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                   "mask_token": "[MASK]"}),
    "unigram": (["<pad>", "<unk>", "<s>", "</s>"],
                {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}),
}


def train_tokenizer(dataset, output, *, base=None, vocab_size=None, algorithm=None, text_column="text",
                    min_frequency=2, special_tokens=None, force=False) -> dict:
    """The train-tokenizer job: DATASET's text column -> OUTPUT, a tokenizer directory. Takes the command's
    options (`special_tokens` a list, None for the algorithm's own) and returns the summary --json prints."""
    from .models import model_fingerprint

    if algorithm is not None and algorithm not in ALGORITHMS:
        raise InputError(f"--algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    base_dir = check_base(base)
    config = {"base": str(base_dir) if base_dir else None, "vocab_size": vocab_size, "algorithm": algorithm,
              "text_column": text_column, "min_frequency": min_frequency,
              "special_tokens": list(special_tokens) if special_tokens else None}
    if base_dir is not None and (base_dir / "config.json").exists():
        config["base_fingerprint"] = model_fingerprint(base_dir)

    with Job("train-tokenizer", output, config=config, datasets=[dataset], force=force,
             reads=[base_dir] if base_dir else []) as job:
        if job.up_to_date:
            return {**job.summary(), **job.manifest.get("fertility", {})}
        from .io import open_dataset, require_text_column
        from .models import default_model_dir, load_tokenizer

        source, _ = open_dataset(dataset)
        require_text_column(source, text_column, dataset)
        texts = source.data.column(text_column)
        stride = held_out_stride(len(texts))
        if base_dir is not None:
            reference = load_tokenizer(base_dir)
            tokenizer = retrain(reference, texts, stride, vocab_size, algorithm, min_frequency, special_tokens)
            reference_name = str(base_dir)
        else:
            algorithm = algorithm or "bpe"
            tokenizer = new_tokenizer(algorithm, texts, stride, vocab_size or DEFAULT_VOCAB_SIZE, min_frequency,
                                      special_tokens)
            reference, reference_name = load_tokenizer(default_model_dir()), BUNDLED_NAME
        heldout = heldout_texts(texts, stride)
        fertility = {"heldout_rows": len(heldout), "words": sum(len(t.split()) for t in heldout),
                     **scores(tokenizer, heldout),
                     "reference": {"tokenizer": reference_name, **scores(reference, heldout)}}
        vocab = len(tokenizer)
        if vocab_size and vocab < vocab_size:
            log.warn("train-tokenizer", "vocabulary_smaller_than_asked", vocab_size=vocab, asked=vocab_size,
                     hint="the corpus has fewer distinct pieces than that")
        assembly = job.publisher.assemble_files(rows=len(texts), counts={
            "training_rows": len(texts) - len(heldout) if stride else len(texts), "heldout_rows": len(heldout)})
        tokenizer.save_pretrained(str(assembly.dir))
        job.publish(assembly, extra={"vocab_size": vocab, "algorithm": algorithm or model_algorithm(tokenizer),
                                     "base": str(base_dir) if base_dir else None, "fertility": fertility,
                                     "source_dataset": str(job.inputs[0]["path"])})
        log.event("train-tokenizer", "fertility", tokens_per_word=fertility["tokens_per_word"],
                  reference_tokens_per_word=fertility["reference"]["tokens_per_word"],
                  unknown_share=fertility["unknown_share"])
        return {**job.summary(), "vocab_size": vocab, "tokens_per_word": fertility["tokens_per_word"],
                "unknown_share": fertility["unknown_share"],
                "reference_tokens_per_word": fertility["reference"]["tokens_per_word"],
                "reference_unknown_share": fertility["reference"]["unknown_share"]}


def check_base(base):
    """The --base directory: it must hold a fast tokenizer (tokenizer.json); a model is not needed."""
    if base is None:
        return None
    from pathlib import Path

    path = Path(base)
    if not path.is_dir():
        raise InputError(f"--base {path} is not a directory; give a directory saved with save_pretrained() "
                         f"that holds tokenizer.json")
    if not (path / "tokenizer.json").exists():
        raise InputError(f"--base {path} has no tokenizer.json: retraining needs a fast tokenizer")
    return path.resolve()


def held_out_stride(rows: int) -> int:
    """Every stride-th row is held out: about HELDOUT_ROWS rows, never more than 5%; 0 (none: the scores are
    on the training rows) below 40 rows."""
    return max(20, rows // HELDOUT_ROWS) if rows >= 40 else 0


def text_batches(texts, stride: int, batch_rows: int = BATCH_ROWS) -> Iterator[list[str]]:
    """The training texts (all rows but the held-out ones) in slices of the memory-mapped column."""
    for start in range(0, len(texts), batch_rows):
        batch = texts.slice(start, batch_rows).to_pylist()
        if stride:
            offset = (-start) % stride  # the held-out rows are the multiples of stride
            batch = [t for k, t in enumerate(batch) if (k - offset) % stride]
        yield batch


def heldout_texts(texts, stride: int) -> list[str]:
    """Every stride-th row (all rows when the dataset is too small to hold any out)."""
    import pyarrow.compute as pc

    if not stride:
        return texts.to_pylist()
    return pc.take(texts, list(range(0, len(texts), stride))).to_pylist()


def new_tokenizer(algorithm, texts, stride, vocab_size, min_frequency, special_tokens):
    """A tokenizer built from scratch with the `tokenizers` library, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, roles = DEFAULT_SPECIALS[algorithm]
    if special_tokens:  # the user's list: the algorithm's roles go to the names it still holds
        specials = list(dict.fromkeys(special_tokens))
        roles = {role: name for role, name in roles.items() if name in specials}
    if algorithm == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif algorithm == "wordpiece":
        unk = roles.get("unk_token", "[UNK]")
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        # (Unigram has no min_frequency: it prunes a large seed vocabulary by likelihood instead)
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                          unk_token=roles.get("unk_token"), show_progress=False)
    tok.train_from_iterator(text_batches(texts, stride), trainer=trainer, length=len(texts))
    if algorithm == "wordpiece" and {"cls_token", "sep_token"} <= roles.keys():
        cls, sep = roles["cls_token"], roles["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    extra = [t for t in specials if t not in roles.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles,
                                   **({"additional_special_tokens": extra} if extra else {}))


def retrain(base, texts, stride, vocab_size, algorithm, min_frequency, special_tokens):
    """The base's pipeline with a vocabulary learned from the texts (transformers' train_new_from_iterator)."""
    have = model_algorithm(base)
    if algorithm is not None and algorithm != have:
        raise InputError(f"--algorithm {algorithm}: the --base tokenizer is {have}; retraining keeps its "
                         f"algorithm (drop --algorithm, or drop --base to build a {algorithm} tokenizer)")
    kwargs = {} if have == "unigram" else {"min_frequency": min_frequency}
    return base.train_new_from_iterator(text_batches(texts, stride), vocab_size or len(base), length=len(texts),
                                        new_special_tokens=list(special_tokens) if special_tokens else None,
                                        **kwargs)


def model_algorithm(tokenizer) -> str:
    import json

    kind = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    return {"BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram"}.get(kind, kind.lower())


def scores(tokenizer, texts: list[str]) -> dict:
    """Tokens per whitespace-separated word and the share of unknown tokens, on `texts`."""
    if not texts:
        return {"tokens_per_word": None, "unknown_share": None}
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokens = sum(len(row) for row in ids)
    words = sum(len(t.split()) for t in texts)
    unk = tokenizer.unk_token_id
    unknown = 0 if unk is None else sum(row.count(unk) for row in ids)
    return {"tokens_per_word": round(tokens / max(words, 1), 4), "unknown_share": round(unknown / max(tokens, 1), 6)}
