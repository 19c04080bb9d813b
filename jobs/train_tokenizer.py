"""hfbatch train-tokenizer: a dataset's text -> a tokenizer directory, with a fertility report.

The command declares the options and hands them to the library function
`hfbatch.tokenizer_training.train_tokenizer`, which is the job (streaming, training, scoring, publishing).
"""

from __future__ import annotations

import click

from hfbatch.cli import force_option, json_summary, output_option, text_column_option
from hfbatch.tokenizer_training import ALGORITHMS, DEFAULT_VOCAB_SIZE
from hfbatch.tokenizer_training import train_tokenizer as run_train_tokenizer


@click.command("train-tokenizer")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@output_option
@click.option("--base", default=None, metavar="DIR",
              help="A fast tokenizer to retrain (train_new_from_iterator): its normaliser, pre-tokeniser, "
                   "post-processor and special tokens are kept, the vocabulary is learned anew.")
@click.option("--vocab-size", type=click.IntRange(min=10), default=None,
              help=f"Vocabulary size, special tokens included (default: {DEFAULT_VOCAB_SIZE}, or the --base "
                   f"tokenizer's).")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default=None,
              help="Without --base: bpe (byte-level, as GPT-2; the default), wordpiece (as BERT) or unigram "
                   "(as SentencePiece). With --base: the base's own.")
@text_column_option
@click.option("--min-frequency", type=click.IntRange(min=1), default=2, show_default=True,
              help="A merge or piece must occur this often (bpe, wordpiece).")
@click.option("--special-tokens", default=None, metavar="LIST",
              help="Comma-separated special tokens (default: the algorithm's own, e.g. <|endoftext|> for bpe, "
                   "[PAD],[UNK],[CLS],[SEP],[MASK] for wordpiece); with --base, added to the base's.")
@force_option
@json_summary("train-tokenizer")
def train_tokenizer(dataset, output, base, vocab_size, algorithm, text_column, min_frequency, special_tokens,
                    force):
    """Train a tokenizer on the TEXT_COLUMN of DATASET (an `hfbatch ingest` output) and publish it at OUTPUT.

    OUTPUT loads with `AutoTokenizer.from_pretrained`. About 1,000 rows (every k-th) are held out of
    training; the manifest and --json give tokens per word and the share of unknown tokens on them, for
    the new tokenizer and for the reference (the --base tokenizer, else the bundled MiniLM tokenizer).

    \b
    Example:
        hfbatch train-tokenizer out/dataset -o out/tokenizer --vocab-size 16000
    """
    specials = [t.strip() for t in special_tokens.split(",") if t.strip()] if special_tokens else None
    return run_train_tokenizer(dataset, output, base=base, vocab_size=vocab_size, algorithm=algorithm,
                               text_column=text_column, min_frequency=min_frequency, special_tokens=specials,
                               force=force)
