"""Generated tokens per second of `hfbatch generate` against two peers, in one run, on the same model and prompts:

  - transformers.pipeline("text-generation") called one prompt at a time (the reference for the text);
  - a plain model.generate over batches of 32 prompts in their given (unsorted) order, left-padded;
  - hfbatch generate (the library call behind the command, model load and publishing included), with finished
    rows leaving the batch, and again with static batches (HFBATCH_GENERATE_COMPACT=0) to measure that waste.

All greedy, so the texts can be compared: hfbatch's must equal the one-at-a-time pipeline's on every row.

    python bench/generate_vs_pipeline.py --model out/generate/gpt2 --prompts out/generate/heldout-ds

The prompts are the first words of the first --rows texts of an hfbatch dataset (default 500 rows, 7 words).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def prompts_of(dataset: str, rows: int, words: int) -> list[str]:
    import datasets

    texts = list(datasets.load_from_disk(dataset)["text"])[:rows]
    return [" ".join(t.split()[:words]) for t in texts]


def run_pipeline(model_dir, prompts, max_new_tokens, device):
    import torch
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model_dir, device=device, dtype=torch.float32)
    tokenizer = pipe.tokenizer
    texts, tokens = [], 0
    started = time.perf_counter()
    for prompt in prompts:
        prompt_len = len(tokenizer(prompt)["input_ids"])
        out = pipe(prompt, max_new_tokens=max_new_tokens, do_sample=False, return_tensors=True,
                   pad_token_id=tokenizer.eos_token_id)[0]["generated_token_ids"]
        new = list(out)[prompt_len:]
        tokens += len(new)
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts, tokens, time.perf_counter() - started


def run_naive_batches(model_dir, prompts, max_new_tokens, device, batch_size=32):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(device)
    eos = tokenizer.eos_token_id
    texts, tokens = [], 0
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            new = row[:row.index(eos) + 1] if eos in row else row  # what was generated before the row ended
            tokens += len(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts, tokens, time.perf_counter() - started


def run_hfbatch(model_dir, prompts, max_new_tokens, device, batch_size, work: Path, compact: bool):
    import datasets

    import hfbatch.generation as generation
    from hfbatch.ingestion import ingest

    source = work / "prompts.jsonl"
    if not source.exists():
        source.write_text("".join(json.dumps({"id": i, "text": p}) + "\n" for i, p in enumerate(prompts)))
        ingest([str(source)], output=str(work / "prompts-ds"))
    os.environ["HFBATCH_GENERATE_COMPACT"] = "1" if compact else "0"
    out = work / ("out-compact" if compact else "out-static")
    started = time.perf_counter()
    summary = generation.generate(str(work / "prompts-ds"), str(out), model=model_dir, max_new_tokens=max_new_tokens,
                                  device=device, precision="fp32", batch_size=batch_size)
    seconds = time.perf_counter() - started
    rows = datasets.load_from_disk(str(out))
    return rows["generation"], summary["generated_tokens"], seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="an hfbatch dataset with a text column")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--words", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="hfbatch's --batch-size")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prompts = prompts_of(args.prompts, args.rows, args.words)
    results = {}
    with tempfile.TemporaryDirectory(prefix="hfbatch-genbench-") as tmp:
        work = Path(tmp)
        for name, run in [
            ("hfbatch generate", lambda: run_hfbatch(args.model, prompts, args.max_new_tokens, args.device,
                                                     args.batch_size, work, compact=True)),
            ("hfbatch generate, static batches", lambda: run_hfbatch(args.model, prompts, args.max_new_tokens,
                                                                     args.device, args.batch_size, work,
                                                                     compact=False)),
            ("pipeline, one prompt at a time", lambda: run_pipeline(args.model, prompts, args.max_new_tokens,
                                                                    args.device)),
            ("model.generate, batches of 32 unsorted", lambda: run_naive_batches(args.model, prompts,
                                                                                 args.max_new_tokens, args.device)),
        ]:
            texts, tokens, seconds, *extra = run()
            results[name] = {"texts": list(texts), "tokens": tokens, "seconds": seconds,
                             "summary": extra[0] if extra else None}
            print(f"{name:42s} {tokens:7d} tokens in {seconds:7.1f} s = {tokens / seconds:8.1f} tokens/s", flush=True)
    reference = results["pipeline, one prompt at a time"]
    base = reference["tokens"] / reference["seconds"]
    print(f"\n{len(prompts)} prompts, greedy, max {args.max_new_tokens} new tokens, device {args.device}, "
          f"model {args.model}")
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r["texts"], reference["texts"]))
        print(f"{name:42s} {r['tokens'] / r['seconds'] / base:5.2f}x the pipeline; text equal to it on "
              f"{same}/{len(prompts)} rows")
    static = results["hfbatch generate, static batches"]["summary"]
    print(f"static-batch waste (share of decode row-steps spent on finished rows): {static['static_batch_waste']:.1%}")
    print(json.dumps({name: {k: v for k, v in r.items() if k != "texts"} for name, r in results.items()},
                     default=str))


if __name__ == "__main__":
    main()
