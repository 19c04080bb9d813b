"""Training a causal language model (`hfbatch train --task causal-lm`): fine-tune a local causal LM
(`--base-model`) or start one from scratch (`--from-config gpt2-tiny|gpt2-small|FILE.json` with a
`--tokenizer`), on a dataset's text packed into blocks.

Packing: every text is tokenized, followed by EOS (the tokenizer's [SEP] where it has no EOS), and the
stream is cut into blocks of `--block-size` tokens (the last, partial block is dropped). The rows are split
into training and held-out rows first, so no held-out text is trained on. transformers.Trainer trains, with
`DataCollatorForLanguageModeling(mlm=False)` making the batches; it evaluates the held-out perplexity after
every epoch, keeps the epoch with the lowest, checkpoints every `--save-steps` steps (a kill -9 resumes from
the newest complete checkpoint) and the job publishes the model with its tokenizer and a model card.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from . import log
from .errors import InputError
from .runner import Job

# gpt2-tiny: a few minutes of CPU training learns something; gpt2-small: GPT-2's own 124M shape.
PRESETS = {
    "gpt2-tiny": {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 512},
    "gpt2-small": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
}


def train_causal_lm(dataset, output, *, base_model=None, from_config=None, tokenizer=None, text_column="text",
                    block_size=128, epochs=3.0, lr=5e-4, batch_size=16, eval_fraction=0.1, seed=42, device="auto",
                    precision="auto", save_steps=100, trust_remote_code=False, force=False) -> dict:
    """The causal-LM training job: DATASET's text -> OUTPUT, a model directory for AutoModelForCausalLM (and
    `hfbatch generate`). Returns the summary --json prints (with the held-out perplexity)."""
    from .models import model_fingerprint, resolve_model_dir

    start = model_source(base_model, from_config, tokenizer)
    config = {"task": "causal-lm", "text_column": text_column, "block_size": block_size, "epochs": epochs, "lr": lr,
              "batch_size": batch_size, "eval_fraction": eval_fraction, "seed": seed, "device": device,
              "precision": precision}
    if base_model is not None:
        base_dir = resolve_model_dir(base_model, "--base-model")
        config.update(base_model=str(base_dir), base_model_fingerprint=model_fingerprint(base_dir))
        tokenizer_dir = base_dir
    else:
        tokenizer_dir = tokenizer_directory(tokenizer)
        config.update(from_config=start, tokenizer=str(tokenizer_dir),
                      tokenizer_fingerprint=model_fingerprint(tokenizer_dir))
    # save_steps changes where a killed run can resume, not the model: left out so it can change on resume.

    with Job("train", output, config=config, datasets=[dataset], force=force, reads=[tokenizer_dir]) as job:
        if job.up_to_date:
            return {**job.summary(), **job.manifest.get("eval", {})}
        return _train(job, dataset, config, tokenizer_dir, save_steps, trust_remote_code)


def model_source(base_model, from_config, tokenizer) -> dict | None:
    """Check the start options; the --from-config architecture (a preset's or a FILE's settings), or None."""
    if (base_model is None) == (from_config is None):
        raise InputError("--task causal-lm needs exactly one of --base-model DIR (fine-tune) and --from-config "
                         "gpt2-tiny|gpt2-small|FILE.json (start from scratch)")
    if base_model is not None:
        if tokenizer is not None:
            raise InputError("--tokenizer goes with --from-config; a --base-model brings its own tokenizer")
        return None
    if tokenizer is None:
        raise InputError("--from-config needs --tokenizer DIR (e.g. made by `hfbatch train-tokenizer`)")
    if from_config in PRESETS:
        return {"preset": from_config, **PRESETS[from_config]}
    path = Path(from_config)
    if not path.is_file():
        raise InputError(f"--from-config {from_config!r} is neither {' nor '.join(PRESETS)} nor a config file")
    from .models import read_json_object

    settings = read_json_object(path)
    if "model_type" not in settings:
        raise InputError(f"--from-config {path}: no \"model_type\" (e.g. \"gpt2\"); it says which architecture to "
                         f"build")
    return {"file": str(path.resolve()), **settings}


def tokenizer_directory(tokenizer) -> Path:
    path = Path(tokenizer)
    if not (path / "tokenizer.json").is_file():
        raise InputError(f"--tokenizer {path} holds no tokenizer.json; give a directory saved with "
                         f"save_pretrained() (e.g. by `hfbatch train-tokenizer`)")
    return path.resolve()


def pack(tokenizer, texts: list[str], block_size: int, separator: int):
    """Texts -> [blocks, block_size] token ids: each text followed by `separator`, concatenated, cut."""
    import numpy as np

    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    stream = np.fromiter((t for row in ids for t in (*row, separator)), dtype=np.int64)
    blocks = len(stream) // block_size
    return stream[:blocks * block_size].reshape(blocks, block_size)


def separator_token(tokenizer, where) -> int:
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if separator is None:
        raise InputError(f"{where}: the tokenizer has no EOS (or [SEP]) token to separate the packed texts; "
                         f"train one with an EOS, e.g. `hfbatch train-tokenizer` (bpe has <|endoftext|>)")
    return separator


def build_model(config: dict, tokenizer_dir: Path, tokenizer, separator: int, block_size: int, trust_remote_code):
    """The model to train: the base loaded, or a new one of the --from-config architecture."""
    if "base_model" in config:
        from .models import load_torch_model

        model = load_torch_model(Path(config["base_model"]), "AutoModelForCausalLM",
                                 trust_remote_code=trust_remote_code)
        return model, config["base_model"]
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in config["from_config"].items() if k not in ("preset", "file")}
    model_type = settings.pop("model_type")
    settings.update(vocab_size=len(tokenizer), bos_token_id=separator, eos_token_id=separator)
    try:
        architecture = AutoConfig.for_model(model_type, **settings)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"--from-config: cannot build a {model_type!r} config ({exc})")
    context = next((getattr(architecture, n) for n in ("n_positions", "max_position_embeddings")
                    if isinstance(getattr(architecture, n, None), int)), None)
    if context is not None and context < block_size:
        setattr(architecture, "n_positions" if hasattr(architecture, "n_positions") else "max_position_embeddings",
                block_size)
    model = AutoModelForCausalLM.from_config(architecture, trust_remote_code=trust_remote_code)
    return model, config["from_config"].get("preset") or config["from_config"].get("file")


def context_of(model) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(model.config, name, None)
        if isinstance(value, int):
            return value
    return None


def _train(job, dataset, config, tokenizer_dir, save_steps, trust_remote_code):
    import datasets
    import numpy as np
    from transformers import set_seed

    from .io import open_dataset, require_text_column
    from .models import choose_device, choose_precision, load_tokenizer

    text_column, block_size = config["text_column"], config["block_size"]
    source, _ = open_dataset(dataset)
    require_text_column(source, text_column, dataset)
    if len(source) < 2:
        raise InputError(f"{dataset}: {len(source)} row(s); training needs at least 2 (one held out)")
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    separator = separator_token(tokenizer, tokenizer_dir)
    order = np.random.default_rng(config["seed"]).permutation(len(source))
    n_eval = min(max(1, round(len(source) * config["eval_fraction"])), len(source) - 1)
    texts = source[text_column]
    eval_blocks = pack(tokenizer, [texts[i] for i in sorted(order[:n_eval])], block_size, separator)
    train_blocks = pack(tokenizer, [texts[i] for i in sorted(order[n_eval:])], block_size, separator)
    if len(train_blocks) == 0 or len(eval_blocks) == 0:
        raise InputError(f"{dataset}: too little text for one block of --block-size {block_size} tokens in both "
                         f"the training and the held-out rows; lower --block-size or --eval-fraction")

    device = choose_device(config["device"])
    precision = config["precision"]
    if precision == "auto":
        precision = "bf16" if choose_precision("auto", device) == "bf16" else "fp32"
    set_seed(config["seed"])  # a new model's initial weights
    model, started_from = build_model(config, tokenizer_dir, tokenizer, separator, block_size, trust_remote_code)
    context = context_of(model)
    if context is not None and block_size > context:
        raise InputError(f"--block-size {block_size} is more than {started_from} can take ({context} positions)")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise InputError(f"the tokenizer has {len(tokenizer)} tokens but {started_from} only "
                         f"{model.get_input_embeddings().weight.shape[0]} embeddings; give the model's own tokenizer")
    log.event("train", "start", task="causal-lm", train_blocks=len(train_blocks), eval_blocks=len(eval_blocks),
              block_size=block_size, parameters=model.num_parameters(), device=device, precision=precision)
    began = time.monotonic()
    train_set = datasets.Dataset.from_dict({"input_ids": train_blocks.tolist()})
    eval_set = datasets.Dataset.from_dict({"input_ids": eval_blocks.tolist()})
    trainer, resumed_from = fit(model, tokenizer_dir, train_set, eval_set, job.partial / "checkpoints", config,
                                device, precision, save_steps, trust_remote_code)
    train_seconds = time.monotonic() - began
    best = trainer.evaluate(eval_set)
    history = perplexity_history(trainer.state.log_history)
    metrics = {"eval": {"eval_loss": round(best["eval_loss"], 4), "perplexity": round(math.exp(best["eval_loss"]), 3)},
               "history": history, "train_blocks": len(train_blocks), "eval_blocks": len(eval_blocks),
               "train_rows": len(source) - n_eval, "eval_rows": n_eval, "block_size": block_size,
               "train_seconds": round(train_seconds, 1), "resumed_from_step": resumed_from}
    model = trainer.model
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = separator
    tokenizer.model_max_length = context or block_size
    card = model_card(name=job.output.name, started_from=started_from, fine_tuned="base_model" in config,
                      architecture=type(model).__name__, parameters=model.num_parameters(), source=job.inputs[0],
                      text_column=text_column, tokenizer_dir=tokenizer_dir, config=config, device=device,
                      precision=precision, metrics=metrics)

    assembly = job.publisher.assemble_files(rows=len(source), counts={
        "train_rows": metrics["train_rows"], "eval_rows": n_eval, "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks)})
    model.save_pretrained(str(assembly.dir))  # safetensors, with generation_config.json
    tokenizer.save_pretrained(str(assembly.dir))
    (assembly.dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (assembly.dir / "README.md").write_text(card)
    job.publish(assembly, extra={"task": "causal-lm", "eval": metrics["eval"], "history": history, "device": device,
                                 "precision": precision, "source_dataset": job.inputs[0]["path"]})
    log.event("train", "done", perplexity=metrics["eval"]["perplexity"], minutes=round(train_seconds / 60, 1))
    return {**job.summary(), **metrics["eval"]}


def fit(model, tokenizer_dir, train_set, eval_set, work_dir: Path, config, device, precision, save_steps,
        trust_remote_code):
    """transformers.Trainer over the blocks; returns (the Trainer holding the best model by held-out loss, the
    step it resumed from)."""
    from transformers import Trainer, TrainingArguments

    from .models import load_tokenizer
    from .training import events_callback, train_resuming

    args = TrainingArguments(
        output_dir=str(work_dir), num_train_epochs=config["epochs"], learning_rate=config["lr"],
        per_device_train_batch_size=config["batch_size"], per_device_eval_batch_size=config["batch_size"],
        optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0.05, weight_decay=0.01,
        seed=config["seed"], data_seed=config["seed"], eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        save_total_limit=2, use_cpu=device == "cpu", bf16=precision == "bf16", logging_strategy="epoch",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    padded = load_tokenizer(tokenizer_dir, trust_remote_code)  # the collator's copy: the saved one is untouched
    if padded.pad_token is None:
        padded.pad_token = padded.eos_token or padded.sep_token  # blocks are full: nothing is ever padded
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=packed_blocks_collator(padded),
                      callbacks=[events_callback(save_steps, perplexity_scores)])
    return train_resuming(trainer, work_dir)


def packed_blocks_collator(tokenizer):
    """DataCollatorForLanguageModeling(mlm=False) for packed blocks. Its labels drop every pad token, and with
    EOS as the pad token (GPT-2 has no other) that would drop the EOS separators, so the model would never
    learn to end a text; the blocks hold no padding, so the labels are all their tokens."""
    from transformers import DataCollatorForLanguageModeling

    class PackedBlocks(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["labels"] = batch["input_ids"].clone()
            return batch

    return PackedBlocks(tokenizer, mlm=False)


def perplexity_scores(metrics: dict) -> dict:
    """The `evaluated` log line's figures for a causal LM: held-out loss and perplexity."""
    loss = metrics.get("eval_loss", float("nan"))
    return {"eval_loss": round(loss, 4), "perplexity": round(math.exp(loss), 3) if loss == loss else None}


def perplexity_history(log_history: list[dict]) -> list[dict]:
    """One row per epoch-end evaluation: epoch, step, the epoch's mean training loss, held-out loss and
    perplexity."""
    rows, train_loss = [], None
    for entry in log_history:
        if "loss" in entry:
            train_loss = entry["loss"]
        if "eval_loss" in entry and "epoch" in entry:
            rows.append({"epoch": round(entry["epoch"], 2), "step": entry["step"], "train_loss": train_loss,
                         "eval_loss": round(entry["eval_loss"], 4),
                         "perplexity": round(math.exp(entry["eval_loss"]), 3)})
    seen, unique = set(), []
    for row in rows:  # the final evaluate() repeats the best epoch's step
        if row["step"] not in seen:
            seen.add(row["step"])
            unique.append(row)
    return unique


def model_card(*, name, started_from, fine_tuned, architecture, parameters, source, text_column, tokenizer_dir,
               config, device, precision, metrics) -> str:
    """README.md for the model directory, in the Hugging Face model-card layout."""
    best = metrics["eval"]
    history = "\n".join(f"| {r['epoch']:g} | {r['step']} | {_num(r['train_loss'])} | {r['eval_loss']:.4f} "
                        f"| {r['perplexity']:.2f} |" for r in metrics["history"])
    how = f"fine-tuned from `{started_from}`" if fine_tuned else \
        f"trained from scratch (architecture `{started_from}`, tokenizer `{tokenizer_dir}`)"
    resumed = f" (resumed from step {metrics['resumed_from_step']})" if metrics["resumed_from_step"] else ""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- text-generation
- causal-lm
- hfbatch
metrics:
- perplexity
---

# {name}

A {architecture} causal language model ({parameters / 1e6:.1f}M parameters) {how} by
`hfbatch train --task causal-lm`, on the `{text_column}` column of `{source['path']}`.

On held-out rows of its training data ({metrics['eval_rows']} rows, {metrics['eval_blocks']} blocks) it reaches
a **perplexity of {best['perplexity']:.2f}** (loss {best['eval_loss']:.4f} per token).

## Intended uses

- Continuing or generating text like its training data, in bulk: `hfbatch generate DATASET -o OUT --model {name}`,
  or `transformers.pipeline("text-generation", model="{name}")`.
- A starting point for further training on more text of the same kind.

## Limitations

- It knows only what {metrics['train_rows']} rows of one source taught it: expect fluent-looking text that is
  often wrong, and worse text on other subjects or styles.
- It reproduces the biases and errors of its training data, and may repeat passages of it.
- It sees at most {config['block_size']} tokens of context as trained (blocks of that size).

## Training data and procedure

- Source: `{source['path']}` (manifest sha256 `{source.get('manifest_sha256', '?')}`), column `{text_column}`:
  {metrics['train_rows']} rows for training, {metrics['eval_rows']} held out (a seeded random split by row).
- Each text is followed by EOS; the stream is cut into blocks of {config['block_size']} tokens
  ({metrics['train_blocks']} training blocks). Batches: DataCollatorForLanguageModeling(mlm=False).

| hyper-parameter | value |
|---|---|
| epochs | {config['epochs']:g} |
| learning rate | {config['lr']:g}, linear decay after 5% warm-up |
| optimizer | AdamW (weight decay 0.01) |
| batch size | {config['batch_size']} blocks |
| precision | {precision} |
| device | {device} |
| seed | {config['seed']} (also of the split) |
| model selection | evaluated every epoch; the lowest held-out loss is kept |

Training took {metrics['train_seconds'] / 60:.1f} minutes{resumed}.

## Evaluation results

| epoch | step | train loss | held-out loss | perplexity |
|---|---|---|---|---|
{history}

`metrics.json` holds these figures; `manifest.json` the exact inputs, options and package versions.
"""


def _num(value) -> str:
    return "–" if value is None else f"{value:.4f}"
