"""`--batch-tokens auto`: the token budget measured on this machine, once per model graph, and remembered.

Which budget is fastest depends on the CPU's caches and matrix unit, not on the model alone. On the 2-core
AVX512-BF16 EPYC, 1,024 to 4,096 tokens run alike and 2,048 is best (270 docs/s against 256 at 1,024 and 227
at 512). On one 2-core AMX Xeon, a chain of the encoder's FullyConnected layers ran 2.3x faster at 512
tokens than at 2,048: there the activations of a 512-token batch stay in the 2 MiB L2, and AMX is fast enough
for that to count (on another, the whole model ran best at 2,048: 424 docs/s against 412 at 1,024 and 372 at
512). So no one constant suits every CPU, and the budget is measured where it runs.

The same goes for the width a batch is padded to. On that second AMX Xeon, bf16 runs 15-20% faster a token
at widths of 16k than at 16k + 4 to 16k + 12 (the fused attention and the tiles work in blocks of 16), so
padding each batch up to a multiple of 16 makes real text 7% faster; in fp32 it only adds tokens (4%
slower). `tuned_pad_multiple` measures the same rows unpadded and padded, once, and remembers the choice
beside the budget.

The probe runs rows of synthetic token ids the way a job runs them (sorted, padded, every stream in flight:
hfbatch.batching.run_batches) at each candidate budget, two rounds interleaved, and keeps each candidate's
fastest round. The rows have one length, so each budget makes batches of one size and a whole number of
them on every stream: with rows of mixed lengths, 8,000 tokens make so few 2,048-token batches that the
last one, running alone on one core, made 2,048 look 18% slower on the EPYC than it runs on real text.
The default stays unless another candidate beats it by more than `MARGIN`: on a shared VM budgets a few
percent apart swap places from run to run, and on real text a small budget also pays for its 2-4x more
batches. The result goes beside the model's IR in the OpenVINO cache (`batch-tokens.json`), one entry per
CPU, matrix features, threads, streams and precision, so later runs (and a resumed one, which must batch
alike) read it instead of measuring.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import log as hfbatch_log
from .batching import DEFAULT_BATCH_TOKENS, Tokenized
from .errors import InputError

log = logging.getLogger(__name__)

CANDIDATES = (512, 1024, DEFAULT_BATCH_TOKENS)
MARGIN = 0.10  # another budget must be this much faster than the default to replace it
PROBE_LENGTH = 128  # twice the probe rows' median length (Debian descriptions': 70 tokens)
PROBE_TOKENS = 8192  # tokens a round, the same rows at every candidate
ROUNDS = 2
TUNING_FILE = "batch-tokens.json"
PAD_MULTIPLE = 16  # on the AMX Xeon a width of 16k runs 15-20% faster a token than 16k + 8: AMX tiles are
# 16 rows, and so is an AVX-512 register of f32. Whether padding up to it pays is measured, as the budget is
PAD_PROBE_LENGTH = 120  # 16k + 8: halfway, where that Xeon runs slowest a token
PAD_MARGIN = 0.03  # padded must be this much faster than unpadded (it already pays for 6.7% more tokens)
PAD_ROUNDS = 3
TUNE_MIN_ROWS = 5000  # a job over fewer rows uses a remembered budget or the default. The budget's probe runs
# about 49,000 tokens (3 budgets x 2 rounds x 8,192) and the padding's about 47,000 more (2 widths x 3 rounds x
# 2 batches a stream of 16 rows of 120-128 tokens, on 2 streams): together as many as ~1,000 rows of ~100
# tokens, for any model (its cost and the job's both scale with the model's FLOPs a token): at most a fifth of
# the first job's work, once


def parse_batch_tokens(value) -> int | str:
    """`"auto"` or a budget of at least 16 tokens (what --batch-tokens and the Python API take)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        budget = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        budget = None
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 16:
        raise InputError(f"--batch-tokens must be 'auto' or a whole number of at least 16 tokens, not {value!r}")
    return int(budget)


def machine_key(engine) -> str:
    """What the best budget depends on besides the graph: the CPU, its matrix features, the threads and
    streams the model was compiled with, and the precision in force."""
    from .models import cpu_flags
    from .openvino_backend import get_core

    try:
        cpu = str(get_core().get_property("CPU", "FULL_DEVICE_NAME"))
    except Exception:  # pragma: no cover - depends on the OpenVINO build
        cpu = "cpu"
    features = ",".join(sorted(cpu_flags() & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"}))
    return f"{cpu}|{features}|threads={engine.num_threads}|streams={engine.streams}|{engine.precision}"


def probe_rows(vocab_size: int, max_length: int, tokens: int = PROBE_TOKENS) -> Tokenized:
    """`tokens` worth of rows of `PROBE_LENGTH` token ids (or max_length where that is shorter), from a fixed
    seed, above the first quarter of the vocabulary where the special tokens sit. Rows of one length make
    batches of one size at each budget, a whole number of them on every stream, so no budget is favoured
    by a last batch running alone."""
    length = min(PROBE_LENGTH, max_length)
    ids = np.random.default_rng(0).integers(vocab_size // 4, vocab_size, size=(max(1, tokens // length), length))
    return Tokenized(ids.tolist(), None, 0)


def measure(run_at: Callable[[int], object], candidates=CANDIDATES, rounds: int = ROUNDS,
            clock: Callable[[], float] = time.perf_counter) -> dict[int, float]:
    """Seconds of `run_at(budget)` (the probe's rows, run as a job runs them) at each candidate budget:
    each one's fastest of `rounds` interleaved rounds, as a neighbour only ever slows a round down and the
    first round also pays for the shapes the model sees first."""
    seconds = {b: float("inf") for b in candidates}
    for r in range(rounds):
        for budget in candidates[r % len(candidates):] + candidates[:r % len(candidates)]:
            start = clock()
            run_at(budget)
            seconds[budget] = min(seconds[budget], clock() - start)
    return seconds


def choose(seconds: dict[int, float], default: int = DEFAULT_BATCH_TOKENS, margin: float = MARGIN) -> int:
    """The fastest budget if it beats `default` by more than `margin`, else `default`."""
    best = min(seconds, key=seconds.get)
    if default in seconds and seconds[best] * (1 + margin) >= seconds[default]:
        return default
    return best


def tuned_batch_tokens(engine, run_at: Callable[[int], object], measure_fn: Callable | None = None,
                       measure_now: bool = True) -> int:
    """The budget for this engine's graph on this machine: remembered in the IR's cache entry, or measured
    now and remembered there (with `measure_now` False: the default, for work too small to pay for it)."""
    def probe():
        seconds = (measure_fn or measure)(run_at)
        return choose(seconds), seconds

    return _remembered(engine, "batch_tokens", "probe_seconds", DEFAULT_BATCH_TOKENS, probe, measure_now)


def pad_probe_length(max_length: int) -> int | None:
    """The pad probe's row length: `PAD_MULTIPLE // 2` tokens short of a multiple of `PAD_MULTIPLE` (120, or
    less where max_length is under 128); None where max_length leaves no such width."""
    length = min(PAD_PROBE_LENGTH, max_length // PAD_MULTIPLE * PAD_MULTIPLE - PAD_MULTIPLE // 2)
    return length if length >= PAD_MULTIPLE // 2 else None


def pad_probe_batches(vocab_size: int, length: int, batch_tokens: int, streams: int
                      ) -> tuple[Tokenized, list[np.ndarray]]:
    """The pad probe's rows and batches: two batches per stream (so none runs alone), each of as many rows of
    `length` synthetic ids (fixed seed, above the first quarter of the vocabulary) as the budget holds at the
    padded width. The same rows run unpadded and padded: whether padding pays is a question about the same
    rows."""
    from .batching import padded_width

    rows = max(1, batch_tokens // padded_width(length, PAD_MULTIPLE))
    batches = 2 * max(1, streams)
    ids = np.random.default_rng(1).integers(vocab_size // 4, vocab_size, size=(rows * batches, length))
    return Tokenized(ids.tolist(), None, 0), np.split(np.arange(rows * batches), batches)


def choose_pad(seconds: dict[int, float], margin: float = PAD_MARGIN) -> int:
    """`PAD_MULTIPLE` if the probe rows padded to it ran more than `margin` faster than unpadded, else 1."""
    return PAD_MULTIPLE if seconds[PAD_MULTIPLE] * (1 + margin) < seconds[1] else 1


def tuned_pad_multiple(engine, run_with: Callable[[int], object], measure_fn: Callable | None = None,
                       measure_now: bool = True) -> int:
    """The multiple of tokens batches are padded to for this engine's graph on this machine: remembered
    beside its budget, or measured now by `run_with(multiple)` (the pad probe's rows, run at 1 and at
    `PAD_MULTIPLE`) and remembered. 1 (no padding beyond the longest row) where nothing is remembered and
    nothing may be measured."""
    def probe():
        seconds = (measure_fn or measure)(run_with, candidates=(1, PAD_MULTIPLE), rounds=PAD_ROUNDS)
        return choose_pad(seconds), seconds

    return _remembered(engine, "pad_multiple", "pad_probe_seconds", 1, probe, measure_now)


def _remembered(engine, field: str, seconds_field: str, default: int,
                probe: Callable[[], tuple[int, dict[int, float]]], measure_now: bool) -> int:
    """`field` of this engine's entry in its tuning file; else, with `measure_now`, the choice `probe()`
    returns, merged into the entry with its seconds per candidate (as `seconds_field`) and remembered; else
    `default`."""
    from filelock import FileLock, Timeout

    path = Path(engine.ir_path).parent / TUNING_FILE
    key = machine_key(engine)
    known = _known(path, key, field)
    if known is not None:
        return known
    if not measure_now:
        return default
    # one process measures while the others (--devices workers on the same CPU) wait, rather than all of
    # them measuring at once, each slowed by the others
    try:
        lock = FileLock(str(path) + ".lock", timeout=600)
        lock.acquire()
    except (OSError, Timeout):  # a cache this process may not write (shared, read-only): measure nothing
        return default
    try:
        known = _known(path, key, field)
        if known is not None:
            return known
        started = time.perf_counter()
        chosen, seconds = probe()
        entries = _read(path)
        # (unrounded: the choice can be checked against what is kept)
        entries[key] = {**entries.get(key, {}), field: chosen, seconds_field: {str(c): s for c, s in seconds.items()},
                        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write(path, entries)
    finally:
        lock.release()
    hfbatch_log.event(field, "measured", chosen=chosen, seconds_per_candidate=json.dumps(
        {str(c): round(s, 3) for c, s in seconds.items()}, separators=(",", ":")),
        probe_s=round(time.perf_counter() - started, 1), remembered_in=str(path))
    return chosen


def _read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict) and _valid("batch_tokens", v.get("batch_tokens"))}


def _valid(field: str, value) -> bool:
    """A remembered value that can be used: a budget of at least 16 tokens, a pad multiple of 1 or
    `PAD_MULTIPLE` (anything else is measured again)."""
    if type(value) is not int:  # (not a bool, a float or a string)
        return False
    return value >= 16 if field == "batch_tokens" else value in (1, PAD_MULTIPLE)


def _known(path: Path, key: str, field: str) -> int | None:
    value = _read(path).get(key, {}).get(field)
    return value if _valid(field, value) else None


def _write(path: Path, entries: dict) -> None:
    """Atomically (hfbatch.runner.write_json_atomic: temp file, fsync, rename; the caller holds the lock, so
    one writer at a time); best effort, as a lost file only means measuring again."""
    from .runner import write_json_atomic

    try:
        write_json_atomic(path, entries)
    except OSError:
        log.debug("could not save %s", path, exc_info=True)
