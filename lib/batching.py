"""Token-budget batches: sort rows by length, fill each batch up to a token budget (padding included),
run the model, restore the input order. One copy of this serves embed, classify and search.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from .parts import ShardParts

DEFAULT_BATCH_TOKENS = 2048  # fastest measured for OpenVINO on 2 cores (when its backend was written)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Tokenized:
    """Unpadded token ids of a list of texts (what `tokenize` or a tokenized dataset holds)."""

    input_ids: list
    token_type_ids: list | None
    truncated: int  # rows longer than max_length, cut

    def __len__(self):
        return len(self.input_ids)


def tokenize(tokenizer, texts: list[str], max_length: int, pairs: list[str] | None = None) -> Tokenized:
    """Fast-tokenizer batch call without padding; counts the rows that truncation cut."""
    if not texts:
        return Tokenized([], None, 0)
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False, return_overflowing_tokens=False,
                        return_length=False)
    ids = encoded["input_ids"]
    flags = encoded.get("truncated")  # hfbatch.model_files.TokenizerFile says which rows it cut
    truncated = sum(flags if flags is not None else truncation_flags(tokenizer, texts, pairs, ids, max_length))
    return Tokenized(ids, encoded.get("token_type_ids"), truncated)


def truncation_flags(tokenizer, texts, pairs, ids, max_length: int) -> list[bool]:
    """Which rows truncation cut: a cut row fills max_length exactly, so only those few are re-tokenized."""
    flags = [False] * len(ids)
    full = [i for i, row in enumerate(ids) if len(row) >= max_length]
    if full:
        lengths = tokenizer([texts[i] for i in full], [pairs[i] for i in full] if pairs else None,
                            truncation=False, padding=False, return_attention_mask=False,
                            return_token_type_ids=False, verbose=False)["input_ids"]
        for i, row in zip(full, lengths):
            flags[i] = len(row) > max_length
    return flags


def warn_truncated(job, max_length: int) -> None:
    """After publishing: say how many rows `job`'s tokenizing cut at max_length, if any."""
    from . import log

    truncated = job.manifest["counts"].get("truncated", 0)
    if truncated:
        log.warn(job.name, "truncated", rows=truncated, max_length=max_length,
                 hint="raise --max-length if the model allows it")


def padded_width(longest: int, multiple: int = 1, max_width: int | None = None) -> int:
    """The width a batch whose longest row is `longest` is padded to: the next multiple of `multiple`, but
    never past `max_width` (the model's max_length: positions beyond it have no embedding) nor below
    `longest`."""
    if multiple <= 1:
        return longest
    width = -(-longest // multiple) * multiple
    return max(longest, width if max_width is None else min(width, max_width))


def budget_batches(lengths: np.ndarray, batch_tokens: int, width: Callable[[int], int] = lambda n: n
                   ) -> list[np.ndarray]:
    """Row indices grouped longest-first so that rows × padded width ≤ batch_tokens (at least one row);
    `width(longest)` is the width the batch is padded to (hfbatch.batching.padded_width)."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(width(int(lengths[order[start]])), 1)
        rows = max(1, batch_tokens // longest)
        batches.append(order[start:start + rows])
        start += rows
    return batches


def pad(tokenized: Tokenized, rows: np.ndarray, pad_id: int, width: Callable[[int], int] = lambda n: n
        ) -> dict[str, np.ndarray]:
    seqs = [tokenized.input_ids[i] for i in rows]
    width = width(max(len(s) for s in seqs))
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, seq in enumerate(seqs):
        input_ids[r, :len(seq)] = seq
        attention_mask[r, :len(seq)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if tokenized.token_type_ids is not None:
        token_type_ids = np.zeros((len(seqs), width), dtype=np.int64)
        for r, i in enumerate(rows):
            types = tokenized.token_type_ids[i]
            token_type_ids[r, :len(types)] = types
        batch["token_type_ids"] = token_type_ids
    return batch


def run_batches(forward: Callable[[dict[str, np.ndarray]], np.ndarray], tokenized: Tokenized, pad_id: int,
                batch_tokens: int = DEFAULT_BATCH_TOKENS, on_batch: Callable[[int], None] | None = None,
                parts: ShardParts | None = None, pad_multiple: int = 1, max_width: int | None = None
                ) -> np.ndarray:
    """`forward(batch) -> [rows, dim]` over length-sorted budget batches; the result is in input order.
    Each batch is padded to a multiple of `pad_multiple` tokens, up to `max_width` (hfbatch.batch_tuning says
    where that pays: on the AMX Xeon a width of 16k runs 15-20% faster a token than 16k + 8).

    With `parts` (a shard's hfbatch.parts.ShardParts) the batches an earlier, killed attempt committed are
    taken from its parts instead of computed, and finished batches are committed every few seconds."""
    if len(tokenized) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = np.fromiter((len(s) for s in tokenized.input_ids), dtype=np.int64, count=len(tokenized))
    width = functools.partial(padded_width, multiple=pad_multiple, max_width=max_width)
    batches = budget_batches(lengths, batch_tokens, width)
    out = None
    resumed = None
    if parts is not None:
        from .parts import plan_key

        resumed = parts.start(batches, lambda: plan_key(batches, tokenized.input_ids, tokenized.token_type_ids,
                                                          pad_multiple))
    if resumed is not None:
        rows, values = resumed
        out = np.empty((len(tokenized),) + values.shape[1:], dtype=np.float32)
        out[rows] = values
        if on_batch is not None:
            on_batch(len(rows))
    todo = [(b, rows) for b, rows in enumerate(batches) if parts is None or b not in parts.done_batches]
    padded = (pad(tokenized, rows, pad_id, width) for _, rows in todo)
    # an encoder with `map` (OpenVINO) keeps several batches in flight; results come in order either way
    results = forward.map(padded) if hasattr(forward, "map") else map(forward, padded)
    try:
        for (b, rows), result in zip(todo, results):
            if out is None:
                out = np.empty((len(tokenized),) + result.shape[1:], dtype=np.float32)
            out[rows] = result
            if parts is not None:
                parts.add(b, out[rows])  # what the result holds (float32), so a resumed row is the same bits
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        if hasattr(results, "close"):  # a failed commit: the batches in flight finish, the encoder is free
            results.close()
    return out


def prefetch(work: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
    """Yield `(item, work(item))` in order, computing the next item's work in a thread meanwhile.

    Jobs tokenize the next shard this way while the model runs on the current one (the fast tokenizer
    releases the GIL), so the model never waits for tokens. `items` may be lazy (a worker's shard queue):
    the next item is taken only when its work is started.
    """
    items = iter(items)
    with ThreadPoolExecutor(max_workers=1) as pool:
        def start():
            for item in items:
                return item, pool.submit(work, item)
            return None

        ahead = start()
        while ahead is not None:
            item, future = ahead
            result = future.result()
            ahead = start()
            yield item, result
