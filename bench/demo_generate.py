"""The data and the scores of `make demo-generate` (train a tokenizer and a small GPT-2 on Debian package
descriptions, then generate descriptions for held-out packages).

    python bench/demo_generate.py prepare --corpus debian-descriptions.jsonl.gz -o out/gen --train-rows 8000
    python bench/demo_generate.py show out/gen/replies
    python bench/demo_generate.py perplexity out/gen/heldout-ds --model out/gen/gpt2

`prepare` writes train.jsonl (the texts to train the model on: "package: description"), tokenizer.jsonl
(every row but the held-out ones, for the tokenizer), heldout.jsonl (rows never trained on, for perplexity)
and prompts.jsonl (20 held-out packages: "package: " and the first words of the description, the
synopsis-like opening the model continues). Rows are picked by a seeded shuffle.
`perplexity` scores the model on the held-out texts, packed as in training, beside a unigram model of the
same tokenizer's tokens counted on train.jsonl (add-one smoothing): what a model that learned only token
frequencies would reach.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
from collections import Counter
from pathlib import Path

PROMPT_WORDS = 6


def demo_text(row: dict) -> str:
    return f"{row['package']}: {' '.join(row['text'].split())}"


def prepare(args) -> None:
    with gzip.open(args.corpus, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    random.Random(args.seed).shuffle(rows)
    train, heldout = rows[:args.train_rows], rows[args.train_rows:args.train_rows + args.heldout_rows]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "train.jsonl", [{"id": r["id"], "text": demo_text(r)} for r in train])
    tokenizer_rows = rows[:args.train_rows] + rows[args.train_rows + args.heldout_rows:]  # all but the held-out
    write(out / "tokenizer.jsonl", [{"id": r["id"], "text": demo_text(r)} for r in tokenizer_rows])
    write(out / "heldout.jsonl", [{"id": r["id"], "text": demo_text(r)} for r in heldout])
    prompts = [{"id": r["id"], "text": " ".join(demo_text(r).split()[:PROMPT_WORDS + 1])} for r in heldout[:20]]
    write(out / "prompts.jsonl", prompts)
    print(f"demo-generate: {len(train)} training rows, {len(heldout)} held-out rows, {len(prompts)} prompts in {out}")


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def show(args) -> None:
    import datasets

    for row in datasets.load_from_disk(args.replies):
        print(f"\n{row['prompt']} → {row['generation']!r}  [{row['finish_reason']}]")


def perplexity(args) -> None:
    import datasets
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfbatch.causal_lm import pack

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    block = args.block_size
    eos = tokenizer.eos_token_id
    heldout = list(datasets.load_from_disk(args.heldout)["text"])
    blocks = torch.tensor(pack(tokenizer, heldout, block, eos))
    losses = []
    with torch.inference_mode():
        for start in range(0, len(blocks), 32):
            batch = blocks[start:start + 32]
            losses.append(model(input_ids=batch, labels=batch).loss.item() * len(batch))
    model_ppl = math.exp(sum(losses) / len(blocks))

    train_texts = [json.loads(line)["text"] for line in Path(args.train_jsonl).read_text().splitlines()]
    counts = Counter(t for row in tokenizer(train_texts, add_special_tokens=False)["input_ids"] for t in row)
    counts[eos] += len(train_texts)
    total, vocab = sum(counts.values()), len(tokenizer)
    log_p = np.log(np.array([counts.get(i, 0) + 1 for i in range(vocab)], dtype=np.float64) / (total + vocab))
    # the same tokens as the model is scored on (a block's first token has no context for the model: skipped)
    targets = blocks[:, 1:].reshape(-1).numpy()
    unigram_ppl = math.exp(-log_p[targets].mean())
    print(f"\nheld-out perplexity ({len(heldout)} rows, {targets.size} tokens): model {model_ppl:.1f}, "
          f"unigram baseline (same tokenizer) {unigram_ppl:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--corpus", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--train-rows", type=int, default=8000)
    p.add_argument("--heldout-rows", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p = commands.add_parser("show")
    p.add_argument("replies")
    p = commands.add_parser("perplexity")
    p.add_argument("heldout")
    p.add_argument("--model", required=True)
    p.add_argument("--train-jsonl", required=True)
    p.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    {"prepare": prepare, "show": show, "perplexity": perplexity}[args.command](args)


if __name__ == "__main__":
    main()
