"""hfbatch train: a labelled dataset -> a fine-tuned text classifier directory with a model card.
The work is hfbatch.training.train."""

from __future__ import annotations

import click

from hfbatch.cli import (
    Number,
    dataset_command,
    device_option,
    force_option,
    json_summary,
    text_column_option,
    trust_remote_code_option,
)


@dataset_command
@click.option("--task", type=click.Choice(["classification", "causal-lm"]), default="classification",
              show_default=True, help="classification: a text classifier; causal-lm: a language model for "
                                      "`hfbatch generate` (hfbatch.causal_lm).")
@click.option("--label-column", default=None, help="Column holding each row's label (text or integer); "
                                                   "classification needs it.")
@text_column_option
@click.option("--base-model", default=None, metavar="DIR",
              help="Local model directory to start from; classification puts a new head on it (default: the "
                   "bundled all-MiniLM-L6-v2); causal-lm fine-tunes it.")
@click.option("--from-config", default=None, metavar="NAME|FILE",
              help="causal-lm from scratch: gpt2-tiny, gpt2-small or a config.json (with model_type); needs "
                   "--tokenizer.")
@click.option("--tokenizer", default=None, metavar="DIR",
              help="causal-lm with --from-config: the tokenizer (e.g. made by `hfbatch train-tokenizer`).")
@click.option("--block-size", type=click.IntRange(min=2), default=128, show_default=True,
              help="causal-lm: tokens per training block (texts packed, separated by EOS).")
@click.option("--epochs", type=Number(min=0, min_open=True), default=3, show_default=True)
@click.option("--lr", type=Number(min=0, min_open=True), default=5e-5, show_default=True,
              help="Peak learning rate (AdamW, linear warm-up and decay).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--eval-fraction", type=Number(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Share of each label's rows held out to evaluate every epoch.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the split, the head and the order.")
@click.option("--max-length", type=click.IntRange(min=8), default=128, show_default=True,
              help="Tokens per text; longer texts are cut (and counted in the card).")
@device_option
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto = bf16 mixed precision where the hardware has it (AVX512-BF16/AMX CPUs, recent "
                   "CUDA), else fp32. The weights are kept and saved in fp32 either way.")
@click.option("--save-steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Also checkpoint every N steps between epochs: a killed run redoes at most N steps.")
@trust_remote_code_option
@force_option
@json_summary("train")
def train(dataset, output, **options):
    """Fine-tune a text classifier on DATASET (an `hfbatch ingest` output) and publish it at OUTPUT; with
    --task causal-lm, train a causal language model on DATASET's text instead.

    OUTPUT is a complete transformers model directory (config with the labels, safetensors weights,
    tokenizer) with metrics.json and a model card README.md; `hfbatch classify --model OUTPUT` uses it.
    Checkpoints live in .OUTPUT.hfbatch-partial/ while training: a killed run resumes from the newest one.

    \b
    Example:
        hfbatch train out/labelled -o out/section-model --label-column section --epochs 2
        hfbatch train out/texts -o out/gpt2 --task causal-lm --from-config gpt2-tiny --tokenizer out/tok
    """
    from hfbatch.training import train as run_train

    return run_train(dataset, output, **options)  # the options are the function's keyword arguments
