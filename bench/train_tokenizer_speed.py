"""The whole `hfbatch train-tokenizer` process (16k byte-level BPE, streamed from the dataset) against what the
`tokenizers` library alone needs on the same texts held in memory (`ByteLevelBPETokenizer().train_from_iterator`),
in one run, alternating, so a shared machine's load falls on both alike.

    python bench/train_tokenizer_speed.py out/debian-dataset [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def in_memory(dataset: str, vocab_size: int) -> float:
    import datasets
    from tokenizers import ByteLevelBPETokenizer

    texts = list(datasets.load_from_disk(dataset)["text"])  # read before the clock starts
    started = time.perf_counter()
    ByteLevelBPETokenizer().train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                                special_tokens=["<|endoftext|>"], show_progress=False)
    return time.perf_counter() - started


def hfbatch_process(dataset: str, vocab_size: int, out: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from hfbatch.cli import main; main()", "train-tokenizer", dataset,
                           "-o", str(out), "--vocab-size", str(vocab_size), "--force", "--json"],
                          capture_output=True, text=True, check=True)
    return time.perf_counter() - started, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="an hfbatch dataset with a text column (e.g. the ingested Debian corpus)")
    parser.add_argument("--vocab-size", type=int, default=16_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hfbatch-tokbench-") as tmp:
        for attempt in range(args.repeat):
            library = in_memory(args.dataset, args.vocab_size)
            whole, summary = hfbatch_process(args.dataset, args.vocab_size, Path(tmp) / "tok")
            print(f"run {attempt + 1}: tokenizers in memory {library:.1f} s; hfbatch train-tokenizer process "
                  f"{whole:.1f} s (imports, streaming, held-out scoring, publishing included) = "
                  f"{whole / library:.2f}x; tokens/word {summary['tokens_per_word']} vs MiniLM "
                  f"{summary['reference_tokens_per_word']}", flush=True)


if __name__ == "__main__":
    main()
