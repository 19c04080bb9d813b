"""The train job (`hfbatch train`): a labelled dataset -> a fine-tuned sequence classifier, with
transformers.Trainer: a stratified split, accuracy and macro-F1, checkpoints that survive kill -9, and the
model card that goes with the published model.

`train` holds the lock, the work directory and publication (runner.Job); the rest is the training. It
imports transformers (and so torch) only once it knows there is work to do: a no-op re-run does not.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import log
from .errors import InputError

CHECKPOINT_PREFIX = "checkpoint-"
BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "bf16")


def train(dataset, output, *, label_column: str | None = None, text_column: str = "text", base_model=None,
          epochs: float = 3, lr: float = 5e-5, batch_size: int = 16, eval_fraction: float = 0.1, seed: int = 42,
          max_length: int = 128, device: str = "auto", precision: str = "auto", save_steps: int = 100,
          trust_remote_code: bool = False, force: bool = False, task: str = "classification", from_config=None,
          tokenizer=None, block_size: int = 128) -> dict:
    """`hfbatch train`: fine-tune a text classifier on `dataset` (an `hfbatch ingest` output) and publish it
    at `output` (a transformers model directory with metrics.json and a model card README.md). The options
    are the command's; returns its summary (the job's, plus the held-out accuracy and macro-F1). With
    task="causal-lm", hfbatch.causal_lm trains a language model instead (from_config, tokenizer, block_size)."""
    from .models import model_fingerprint, resolve_model_dir
    from .runner import Job

    check_options(epochs=epochs, lr=lr, batch_size=batch_size, eval_fraction=eval_fraction, max_length=max_length,
                  save_steps=save_steps, device=device, precision=precision)
    if task == "causal-lm":
        from .causal_lm import train_causal_lm

        return train_causal_lm(dataset, output, base_model=base_model, from_config=from_config, tokenizer=tokenizer,
                               text_column=text_column, block_size=block_size, epochs=epochs, lr=lr,
                               batch_size=batch_size, eval_fraction=eval_fraction, seed=seed, device=device,
                               precision=precision, save_steps=save_steps, trust_remote_code=trust_remote_code,
                               force=force)
    if task != "classification" or label_column is None or from_config or tokenizer:
        raise InputError("--task classification needs --label-column, and takes no --from-config or --tokenizer "
                         "(those are for --task causal-lm)" if task == "classification" else
                         f"--task {task!r}: choose classification or causal-lm")
    base_dir = resolve_model_dir(base_model, "--base-model")
    config = {"base_model": str(base_dir), "base_model_fingerprint": model_fingerprint(base_dir),
              "text_column": text_column, "label_column": label_column, "epochs": epochs, "lr": lr,
              "batch_size": batch_size, "eval_fraction": eval_fraction, "seed": seed, "max_length": max_length,
              "device": device, "precision": precision}
    # save_steps changes where a killed run can resume, not the model: left out so it can change on resume.
    with Job("train", output, config=config, datasets=[dataset], force=force, reads=[base_dir]) as job:
        if job.up_to_date:  # decided from manifests alone: a no-op re-run never imports torch
            return {**job.summary(), **job.manifest.get("eval", {})}
        return _train(job, dataset, base_dir, base_model is None, config, save_steps, trust_remote_code)


def check_options(*, epochs, lr, batch_size, eval_fraction, max_length, save_steps, device, precision) -> None:
    """What Click checks for the command, checked for Python callers too."""
    for option, value, choices in (("--device", device, DEVICE_CHOICES), ("--precision", precision,
                                                                          PRECISION_CHOICES)):
        if value not in choices:
            raise InputError(f"{option} {value!r}: choose one of {', '.join(choices)}")
    for option, value, fewest in (("--batch-size", batch_size, 1), ("--max-length", max_length, 8),
                                  ("--save-steps", save_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < fewest:
            raise InputError(f"{option} {value!r}: give an integer of at least {fewest}")
    for option, value in (("--epochs", epochs), ("--lr", lr), ("--eval-fraction", eval_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InputError(f"{option} {value!r}: give a number above 0")
    if not eval_fraction < 1:
        raise InputError(f"--eval-fraction {eval_fraction!r}: give a share below 1")


def _train(job, dataset, base_dir, bundled, config, save_steps, trust_remote_code):
    import datasets
    from transformers import set_seed

    from .batching import tokenize
    from .models import choose_device, choose_precision, load_tokenizer, load_torch_model

    texts, names, label_ids, unlabelled = labelled_set(dataset, config["text_column"], config["label_column"])
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
                             label2id={name: i for i, name in enumerate(names)},
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
    metrics = {**evaluation(predicted, prediction.label_ids, names, epoch_history(trainer.state.log_history)),
               "train_rows": len(train_rows), "eval_rows": len(eval_rows), "unlabelled_rows": unlabelled,
               "truncated_rows": tokenized.truncated, "train_seconds": round(train_seconds, 1),
               "resumed_from_step": resumed_from}
    model = trainer.model
    tokenizer.model_max_length = config["max_length"]  # what classify and pipelines will cut at
    card = model_card(
        name=job.output.name, base_model=BUNDLED_NAME if bundled else str(base_dir),
        architecture=type(model).__name__, parameters=model.num_parameters(), text_column=config["text_column"],
        label_column=config["label_column"], source=job.inputs[0], labels=names,
        train_counts=np.bincount(label_ids[train_rows], minlength=len(names)).tolist(),
        eval_counts=np.bincount(label_ids[eval_rows], minlength=len(names)).tolist(),
        unlabelled=unlabelled, truncated=tokenized.truncated, settings=settings, metrics=metrics)

    assembly = job.publisher.assemble_files(rows=len(train_rows), counts={
        "train_rows": len(train_rows), "eval_rows": len(eval_rows), "unlabelled": unlabelled,
        "truncated": tokenized.truncated})
    model.save_pretrained(str(assembly.dir))  # safetensors
    tokenizer.save_pretrained(str(assembly.dir))
    (assembly.dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (assembly.dir / "README.md").write_text(card)
    job.publish(assembly, extra={
        "labels": names, "eval": metrics["eval"], "best_epoch": metrics["best_epoch"], "device": device,
        "precision": precision, "source_dataset": job.inputs[0]["path"]})
    log.event("train", "done", accuracy=metrics["eval"]["accuracy"], macro_f1=metrics["eval"]["macro_f1"],
              minutes=round(train_seconds / 60, 1))
    return {**job.summary(), **metrics["eval"]}


def labelled_set(dataset, text_column: str, label_column: str):
    """(texts, label names sorted, each row's label id, rows left out for having no label) of `dataset`;
    refused (one line) when a label has a single row or there are fewer than two labels."""
    from .io import open_dataset, require_column, require_text_column

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
    return texts, names, np.array([label2id[name] for name in labels]), unlabelled


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


def evaluation(predicted: np.ndarray, expected: np.ndarray, names: list[str], history: list[dict]) -> dict:
    """The published model's scores on the held-out rows (overall and per label), its epoch and the
    per-epoch history."""
    scores = per_label_scores(predicted, expected, len(names))
    best = classification_metrics(predicted, expected, len(names))
    return {
        "eval": {k: round(v, 4) for k, v in best.items()},
        "best_epoch": next((row["epoch"] for row in history if abs(row["macro_f1"] - best["macro_f1"]) < 1e-9),
                           history[-1]["epoch"] if history else None),
        "history": history,
        "per_label": {name: {"precision": round(float(scores["precision"][i]), 4),
                             "recall": round(float(scores["recall"][i]), 4),
                             "f1": round(float(scores["f1"][i]), 4), "support": int(scores["support"][i])}
                      for i, name in enumerate(names)},
    }


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows): `fraction` of each label's rows, at least one, go to eval; every label keeps
    at least one training row. Deterministic for a seed; both index arrays sorted."""
    rng = np.random.default_rng(seed)
    train, evals = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_eval = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
        evals.append(rows[:n_eval])
        train.append(rows[n_eval:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(evals))


def per_label_scores(predictions: np.ndarray, labels: np.ndarray, n_labels: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per label id (0 where a label is never predicted or present)."""
    confusion = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    hits = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(hits), where=total > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean over the labels present in `labels`)."""
    scores = per_label_scores(predictions, labels, n_labels)
    present = scores["support"] > 0
    return {"accuracy": float((predictions == labels).mean()),
            "macro_f1": float(scores["f1"][present].mean())}


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint a killed run left complete. Trainer writes trainer_state.json last, so a
    checkpoint without a readable one was cut mid-save: it is removed (the caller holds the output lock)."""
    if not directory.exists():
        return None
    checkpoints = sorted((p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):]
                          .isdigit()), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), reverse=True)
    for checkpoint in checkpoints:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            return checkpoint
        except (OSError, ValueError):
            log.warn("train", "discarding_incomplete_checkpoint", checkpoint=checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


@dataclass
class Settings:
    epochs: float
    lr: float
    batch_size: int
    seed: int
    max_length: int
    device: str
    precision: str  # "fp32" or "bf16" (mixed precision: bf16 autocast over fp32 weights)
    save_steps: int
    warmup: float = 0.1
    weight_decay: float = 0.01
    extra: dict = field(default_factory=dict)


def fine_tune(model, tokenizer, train_set, eval_set, work_dir: Path, settings: Settings):
    """Train with transformers.Trainer; returns (the Trainer, holding the best model by eval macro-F1,
    the step it resumed from, 0 for a fresh start).

    Evaluates and saves at every epoch end (the candidates for the best model) and saves every
    `save_steps` steps in between, so a killed run loses at most `save_steps` steps; it resumes from the
    newest complete checkpoint in `work_dir`.
    """
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    n_labels = model.config.num_labels

    def compute_metrics(prediction):
        return classification_metrics(np.argmax(prediction.predictions, axis=-1), prediction.label_ids, n_labels)

    args = TrainingArguments(
        output_dir=str(work_dir), num_train_epochs=settings.epochs, learning_rate=settings.lr,
        per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=2 * settings.batch_size,
        optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=settings.warmup,
        weight_decay=settings.weight_decay, seed=settings.seed, data_seed=settings.seed,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="macro_f1", greater_is_better=True,
        save_total_limit=2,  # the best and the newest: enough to resume and to finish
        # Batches of similar lengths: dynamic padding then pads little, which is most of CPU training time.
        train_sampling_strategy="group_by_length",
        use_cpu=settings.device == "cpu", bf16=settings.precision == "bf16",
        logging_strategy="epoch", report_to="none", disable_tqdm=True,  # train loss = the epoch mean
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=compute_metrics, callbacks=[events_callback(settings.save_steps)])
    return train_resuming(trainer, work_dir)


def train_resuming(trainer, work_dir: Path):
    """Run `trainer`, resuming from the last complete checkpoint in `work_dir` (a killed run's): (trainer, the
    step it resumed from, or 0)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints dicts on stdout, where --json goes
    checkpoint = last_complete_checkpoint(work_dir)
    if checkpoint is not None:
        log.event("train", "resuming", checkpoint=checkpoint.name)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer, int(checkpoint.name[len(CHECKPOINT_PREFIX):]) if checkpoint else 0


def classifier_scores(metrics: dict) -> dict:
    """The `evaluated` log line's figures for a classifier."""
    nan = float("nan")
    return {"accuracy": round(metrics.get("eval_accuracy", nan), 4),
            "macro_f1": round(metrics.get("eval_macro_f1", nan), 4),
            "eval_loss": round(metrics.get("eval_loss", nan), 4)}


def events_callback(save_steps: int, scores=classifier_scores):
    """Our log lines and progress instead of Trainer's prints, and the between-epoch saves (a class made here:
    its base, TrainerCallback, imports transformers). `scores(metrics)` gives the figures of each `evaluated`
    line."""
    from transformers import TrainerCallback

    class Events(TrainerCallback):
        def __init__(self):
            self.progress = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = log.Progress("train", state.max_steps, unit="steps")
            self.progress.update(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self.progress.update(1)
            if save_steps and state.global_step % save_steps == 0:
                control.should_save = True  # a resume point; only epoch-end checkpoints compete for "best"
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            log.event("train", "evaluated", epoch=round(state.epoch or 0, 2), step=state.global_step,
                      **scores(metrics or {}))

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()

    return Events()


def epoch_history(log_history: list[dict]) -> list[dict]:
    """One row per evaluation: epoch, step, the epoch's mean training loss (logged just before the
    evaluation) and the eval metrics."""
    rows, train_loss = [], None
    for entry in log_history:
        if "loss" in entry:
            train_loss = entry["loss"]
        if "eval_accuracy" in entry:
            rows.append({"epoch": round(entry["epoch"], 2), "step": entry["step"], "train_loss": train_loss,
                         "eval_loss": entry.get("eval_loss"), "accuracy": entry["eval_accuracy"],
                         "macro_f1": entry["eval_macro_f1"]})
    return rows


# ---- the model card ------------------------------------------------------------------------------------

def model_card(*, name: str, base_model: str, architecture: str, parameters: int, text_column: str,
               label_column: str, source: dict, labels: list[str], train_counts: list[int],
               eval_counts: list[int], unlabelled: int, truncated: int, settings: Settings, metrics: dict) -> str:
    """README.md for the model directory: what it is, what it is for and not, how it was made and how well
    it does, in the Hugging Face model-card layout (YAML metadata, then sections)."""
    best = metrics["eval"]
    n_train, n_eval = sum(train_counts), sum(eval_counts)
    label_list = ", ".join(f"`{label}`" for label in labels)
    distribution = "\n".join(f"| {label} | {t} | {e} | {100 * (t + e) / (n_train + n_eval):.1f}% |"
                             for label, t, e in zip(labels, train_counts, eval_counts))
    history = "\n".join(
        f"| {row['epoch']:g} | {row['step']} | {_num(row['train_loss'])} | {_num(row['eval_loss'])} "
        f"| {row['accuracy']:.4f} | {row['macro_f1']:.4f} |" for row in metrics["history"])
    per_label = "\n".join(
        f"| {label} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |"
        for label, s in metrics["per_label"].items())
    weakest = min(metrics["per_label"].items(), key=lambda item: item[1]["f1"])
    precision_note = ("bf16 mixed precision (autocast; the weights stay and are saved in fp32)"
                      if settings.precision == "bf16" else "fp32")
    resumed = f" (resumed from step {metrics['resumed_from_step']})" if metrics["resumed_from_step"] else ""
    return f"""---
library_name: transformers
pipeline_tag: text-classification
base_model: {base_model}
tags:
- text-classification
- hfbatch
metrics:
- accuracy
- f1
---

# {name}

A {architecture} text classifier ({parameters / 1e6:.1f}M parameters) fine-tuned from `{base_model}` by
`hfbatch train`. It reads the `{text_column}` of a row and predicts its `{label_column}`, one of
{len(labels)} labels: {label_list}.

On a held-out {n_eval}-row split of its training data it reaches **accuracy {best['accuracy']:.4f}** and
**macro-F1 {best['macro_f1']:.4f}** (best epoch: {metrics['best_epoch']:g}).

## Intended uses

- Labelling texts like the training data with one of the {len(labels)} labels above, in bulk:
  `hfbatch classify DATASET -o OUT --model {name}` (add `--top-k 3` for the runners-up), or
  `transformers.pipeline("text-classification", model="{name}")`.
- A starting point for further fine-tuning on more or newer data of the same kind.

## Limitations

- Every input gets one of the {len(labels)} labels: there is no "none of these". Texts about something
  else are still forced into the closest label, often with a high score.
- Scores are softmax probabilities of an uncalibrated model: use them to rank, not as true probabilities.
- Inputs are cut at {settings.max_length} tokens ({truncated} of the {n_train + n_eval} training rows were);
  what a long text says after that is not seen.
- It learned from {n_train} rows of one source. The evaluation below is on rows of the same source,
  so expect lower quality on text from elsewhere, and on labels that were rare in training.
  The weakest label on the held-out split is `{weakest[0]}` (F1 {weakest[1]['f1']:.3f}).
- It inherits the language coverage and the biases of `{base_model}` and of its training data.

## Training data

- Source: `{source['path']}` (an hfbatch dataset; manifest sha256 `{source.get('manifest_sha256', '?')}`),
  text column `{text_column}`, label column `{label_column}`.
- Rows: {n_train} for training, {n_eval} held out for evaluation (a stratified split: each label keeps
  its share), {unlabelled} left out for having no label.

| label | train | eval | share |
|---|---|---|---|
{distribution}

## Training procedure

Fine-tuned with `transformers.Trainer`: a new classification head on `{base_model}`, all weights trained.

| hyper-parameter | value |
|---|---|
| epochs | {settings.epochs:g} |
| learning rate | {settings.lr:g}, linear decay after {settings.warmup:.0%} warm-up |
| optimizer | AdamW (weight decay {settings.weight_decay:g}) |
| batch size | {settings.batch_size} (length-grouped batches, dynamic padding with DataCollatorWithPadding) |
| max length | {settings.max_length} tokens |
| precision | {precision_note} |
| device | {settings.device} |
| seed | {settings.seed} (also of the train/eval split) |
| model selection | evaluated every epoch; the checkpoint with the best eval macro-F1 is kept |

Training took {metrics['train_seconds'] / 60:.1f} minutes{resumed}.

## Evaluation results

On the held-out split ({n_eval} rows), after each epoch:

| epoch | step | train loss | eval loss | accuracy | macro-F1 |
|---|---|---|---|---|---|
{history}

Per label, for the published (best) model:

| label | precision | recall | F1 | support |
|---|---|---|---|---|
{per_label}

`metrics.json` holds these figures; `manifest.json` the exact inputs, options and package versions.
"""


def _num(value) -> str:
    return "–" if value is None else f"{value:.4f}"
