"""hfbatch train: a labelled dataset -> a fine-tuned text classifier directory with a model card."""

from __future__ import annotations

import json
import time
from collections import Counter

import click

from hfbatch import log
from hfbatch.cli import force_option, json_summary, output_option, text_column_option, trust_remote_code_option
from hfbatch.errors import InputError
from hfbatch.runner import Job

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@output_option
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
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=3, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-5, show_default=True,
              help="Peak learning rate (AdamW, linear warm-up and decay).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--eval-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Share of each label's rows held out to evaluate every epoch.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the split, the head and the order.")
@click.option("--max-length", type=click.IntRange(min=8), default=128, show_default=True,
              help="Tokens per text; longer texts are cut (and counted in the card).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto = CUDA when available, else CPU.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto = bf16 mixed precision where the hardware has it (AVX512-BF16/AMX CPUs, recent "
                   "CUDA), else fp32. The weights are kept and saved in fp32 either way.")
@click.option("--save-steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Also checkpoint every N steps between epochs: a killed run redoes at most N steps.")
@trust_remote_code_option
@force_option
@json_summary("train")
def train(dataset, output, task, label_column, text_column, base_model, from_config, tokenizer, block_size, epochs,
          lr, batch_size, eval_fraction, seed, max_length, device, precision, save_steps, trust_remote_code, force):
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
    if task == "causal-lm":
        from hfbatch.causal_lm import train_causal_lm

        return train_causal_lm(dataset, output, base_model=base_model, from_config=from_config, tokenizer=tokenizer,
                               text_column=text_column, block_size=block_size, epochs=epochs, lr=lr,
                               batch_size=batch_size, eval_fraction=eval_fraction, seed=seed, device=device,
                               precision=precision, save_steps=save_steps, trust_remote_code=trust_remote_code,
                               force=force)
    if label_column is None or from_config or tokenizer:
        raise InputError("--task classification needs --label-column, and takes no --from-config or --tokenizer "
                         "(those are for --task causal-lm)")
    from hfbatch.models import model_fingerprint, resolve_model_dir

    base_dir = resolve_model_dir(base_model, "--base-model")
    config = {"base_model": str(base_dir), "base_model_fingerprint": model_fingerprint(base_dir),
              "text_column": text_column, "label_column": label_column, "epochs": epochs, "lr": lr,
              "batch_size": batch_size, "eval_fraction": eval_fraction, "seed": seed, "max_length": max_length,
              "device": device, "precision": precision}
    # save_steps changes where a killed run can resume, not the model: left out so it can change on resume.

    with Job("train", output, config=config, datasets=[dataset], force=force) as job:
        if job.up_to_date:  # decided from manifests alone: a no-op re-run never imports torch
            return {**job.summary(), **job.manifest.get("eval", {})}
        return _train(job, dataset, base_dir, base_model is None, config, save_steps, trust_remote_code)


def _train(job, dataset, base_dir, bundled, config, save_steps, trust_remote_code):
    import datasets
    import numpy as np
    from transformers import set_seed

    from hfbatch.batching import tokenize
    from hfbatch.io import open_dataset, require_column, require_text_column
    from hfbatch.models import choose_device, choose_precision, load_tokenizer, load_torch_model
    from hfbatch.training import (
        Settings,
        classification_metrics,
        epoch_history,
        fine_tune,
        model_card,
        per_label_scores,
        stratified_split,
    )

    text_column, label_column = config["text_column"], config["label_column"]
    source, _ = open_dataset(dataset)
    require_text_column(source, text_column, dataset)
    require_column(source, label_column, dataset, option="--label-column")
    texts, labels, unlabelled = labelled_rows(source, text_column, label_column)
    counts = Counter(labels)
    names = sorted(counts)
    if len(names) < 2:
        raise InputError(f"{dataset}: column {label_column!r} holds {len(names)} distinct label(s); a classifier "
                         f"needs at least 2")
    rare = [name for name in names if counts[name] < 2]
    if rare:
        raise InputError(f"{dataset}: label(s) {', '.join(map(repr, rare[:10]))} have a single row; each label "
                         f"needs at least 2 (one to train on, one to evaluate)")
    label2id = {name: i for i, name in enumerate(names)}
    label_ids = np.array([label2id[name] for name in labels])
    train_rows, eval_rows = stratified_split(label_ids, config["eval_fraction"], config["seed"])

    device = choose_device(config["device"])
    precision = config["precision"]
    if precision == "auto":  # mixed precision only where the hardware does bf16 natively
        precision = "bf16" if choose_precision("auto", device) == "bf16" else "fp32"
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    tokenized = tokenize(tokenizer, texts, config["max_length"])

    def split(rows):
        columns = {"input_ids": [tokenized.input_ids[i] for i in rows], "labels": label_ids[rows].tolist()}
        if tokenized.token_type_ids is not None:
            columns["token_type_ids"] = [tokenized.token_type_ids[i] for i in rows]
        return datasets.Dataset.from_dict(columns)  # in memory: nothing is written beside the input

    set_seed(config["seed"])  # the new head's initial weights
    model = load_torch_model(base_dir, "AutoModelForSequenceClassification", trust_remote_code=trust_remote_code,
                             num_labels=len(names), id2label=dict(enumerate(names)),
                             label2id=label2id,
                             problem_type="single_label_classification", ignore_mismatched_sizes=True)
    if config["max_length"] > model.config.max_position_embeddings:
        raise InputError(f"--max-length {config['max_length']} is more than {base_dir} can take "
                         f"({model.config.max_position_embeddings} positions)")
    settings = Settings(epochs=config["epochs"], lr=config["lr"], batch_size=config["batch_size"],
                        seed=config["seed"], max_length=config["max_length"], device=device,
                        precision=precision, save_steps=save_steps)
    log.event("train", "start", train_rows=len(train_rows), eval_rows=len(eval_rows), labels=len(names),
              device=device, precision=precision)
    started = time.monotonic()
    eval_set = split(eval_rows)
    trainer, resumed_from = fine_tune(model, tokenizer, split(train_rows), eval_set,
                                      job.partial / "checkpoints", settings)
    train_seconds = time.monotonic() - started

    prediction = trainer.predict(eval_set)  # the best model, on the held-out rows
    predicted = np.argmax(prediction.predictions, axis=-1)
    scores = per_label_scores(predicted, prediction.label_ids, len(names))
    history = epoch_history(trainer.state.log_history)
    best = classification_metrics(predicted, prediction.label_ids, len(names))
    metrics = {
        "eval": {k: round(v, 4) for k, v in best.items()},
        "best_epoch": next((row["epoch"] for row in history if abs(row["macro_f1"] - best["macro_f1"]) < 1e-9),
                           history[-1]["epoch"] if history else None),
        "history": history,
        "per_label": {name: {"precision": round(float(scores["precision"][i]), 4),
                             "recall": round(float(scores["recall"][i]), 4),
                             "f1": round(float(scores["f1"][i]), 4), "support": int(scores["support"][i])}
                      for i, name in enumerate(names)},
        "train_rows": len(train_rows), "eval_rows": len(eval_rows), "unlabelled_rows": unlabelled,
        "truncated_rows": tokenized.truncated, "train_seconds": round(train_seconds, 1),
        "resumed_from_step": resumed_from,
    }
    model = trainer.model
    tokenizer.model_max_length = config["max_length"]  # what classify and pipelines will cut at
    card = model_card(
        name=job.output.name, base_model=BUNDLED_NAME if bundled else str(base_dir),
        architecture=type(model).__name__, parameters=model.num_parameters(), text_column=text_column,
        label_column=label_column, source=job.inputs[0], labels=names,
        train_counts=np.bincount(label_ids[train_rows], minlength=len(names)).tolist(),
        eval_counts=np.bincount(label_ids[eval_rows], minlength=len(names)).tolist(),
        unlabelled=unlabelled, truncated=tokenized.truncated, settings=settings, metrics=metrics)

    def fill(tmp):
        model.save_pretrained(str(tmp))  # safetensors
        tokenizer.save_pretrained(str(tmp))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "README.md").write_text(card)

    job.publish_files(fill, rows=len(train_rows), counts={
        "train_rows": len(train_rows), "eval_rows": len(eval_rows), "unlabelled": unlabelled,
        "truncated": tokenized.truncated}, extra={
        "labels": names, "eval": metrics["eval"], "best_epoch": metrics["best_epoch"], "device": device,
        "precision": precision, "source_dataset": job.inputs[0]["path"]})
    log.event("train", "done", accuracy=metrics["eval"]["accuracy"], macro_f1=metrics["eval"]["macro_f1"],
              minutes=round(train_seconds / 60, 1))
    return {**job.summary(), **metrics["eval"]}


def labelled_rows(source, text_column, label_column):
    """(texts, labels as strings, rows left out): rows without a label are skipped, not guessed."""
    texts, labels, unlabelled = [], [], 0
    for text, label in zip(source[text_column], source[label_column]):
        if label is None or str(label).strip() == "":
            unlabelled += 1
            continue
        texts.append(text)
        labels.append(str(label))
    if unlabelled:
        log.warn("train", "unlabelled_rows_skipped", rows=unlabelled, column=label_column)
    return texts, labels, unlabelled
