"""Progress inside a shard: the finished batches of a model job, committed about every second, so a kill
loses seconds of model work rather than a shard, without making an output of many small files.

A shard's batches (length-sorted token-budget batches, hfbatch.batching) are a function of its rows, so a
re-run makes the same batches. While a shard is computed, the batches finished since the last commit are
written as a part once about a second of model work has passed (`ShardParts.interval`: longer where a
commit is slow, so commits never cost more than about 2% of the model time, and never above 30 s):

    .OUT.hfbatch-partial/shards/00003.parts/00002.arrow   the batches' rows (positions in the shard's model input)
                                                 and the model's float32 output for them
    .OUT.hfbatch-partial/shards/00003.parts/00002.json    its record: the plan it belongs to, its batches and rows

data first (fsynced, renamed), then the record (fsynced, renamed): a part without its record is ignored.
A re-run loads the shard's recorded parts of the same plan, skips their batches and computes the others with
exactly the same shapes, so the finished shard is bit-identical to one computed without a kill. The parts go
once the shard's own completion record is written (`ShardDir.finish_shard`).

The one-process path and every --devices worker commit through this one class, on the same directories.

Hidden knobs (environment; they change when progress is saved, never the rows, and are in no config):
    HFBATCH_PART_SECONDS=S       commit after S seconds of model work instead (0 = after every batch;
                                 inf = never, the shard-only behaviour)
    HFBATCH_TEST_KILL=POINT:K    tests only: SIGKILL this process at its K-th part commit, after the part's
                                 record (POINT `part`) or between its data and its record (`part-data`)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from . import log
from .errors import InputError

# A kill loses about PART_SECONDS of model work (plus one batch) where shards take longer; where a commit is
# slow (a network filesystem's fsync), parts are spaced so that committing costs at most PART_OVERHEAD of the
# model time, up to PART_SECONDS_MAX (the bound on what a kill may lose).
PART_SECONDS = 1.0
PART_OVERHEAD = 0.02
PART_SECONDS_MAX = 30.0
_commits_in_this_process = 0


def part_seconds() -> float | None:
    """HFBATCH_PART_SECONDS, a fixed interval between commits; None (adaptive) when it is not set."""
    value = os.environ.get("HFBATCH_PART_SECONDS")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # also refuses nan
        raise InputError(f"HFBATCH_PART_SECONDS={value!r} is not a number of seconds (>= 0, or inf); "
                         f"unset it or fix it")
    return seconds


def plan_key(batches: list, input_ids, token_type_ids=None, pad_multiple: int = 1) -> str:
    """What a part's values depend on besides the job's fingerprint: the batches (which rows, in which
    order and grouping), the widths they are padded to and the token ids the model sees. A part of another
    plan is never used."""
    import numpy as np

    digest = hashlib.sha256()
    if pad_multiple != 1:  # (left out at 1, so plans made before padding was tunable keep their keys)
        digest.update(f"pad_multiple={pad_multiple}".encode())
    digest.update(np.asarray([len(b) for b in batches], dtype=np.int64).tobytes())
    for rows in batches:
        digest.update(np.asarray(rows, dtype=np.int64).tobytes())
    for sequences in (input_ids, token_type_ids):
        if sequences is None:
            continue
        digest.update(np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences)).tobytes())
        digest.update(np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


class ShardParts:
    """The parts of one shard being computed. `start` loads what earlier (killed) attempts committed; the
    batch loop then calls `add` after each batch it computes, and a part is committed when one is due."""

    def __init__(self, directory: Path, shard: int, job: str = "hfbatch", every_s: float | None = None):
        self.directory = Path(directory)
        self.shard = shard
        self.job = job
        self.every_s = part_seconds() if every_s is None else every_s  # None: adaptive (`interval`)
        self._commit_s = 0.0  # how long the last commit took
        self.rows_resumed = 0  # rows taken from committed parts (computed by an earlier attempt)
        self.rows_computed = 0  # rows the model computed here
        self.done_batches: set[int] = set()
        self._batches: list = []
        self._key: Callable[[], str] | str | None = None
        self._uncommitted: list[tuple[int, object]] = []  # (batch, values) since the last commit
        self._next_part = 1
        self._since = time.monotonic()
        self.before_commit: Callable[[], None] | None = None  # the executor: the shard before is recorded first

    # -- resuming --
    def start(self, batches: list, key: Callable[[], str]):
        """Begin the shard's batch loop over `batches` (arrays of row positions); `key()` is its plan key
        (computed only when a part is read or written). Returns the committed (rows, values) to reuse, or
        None; their batches are in `done_batches`."""
        import numpy as np

        self._batches, self._key = batches, key
        self._since = time.monotonic()
        if not self.directory.is_dir():
            return None
        found = self._load()
        if not found:
            return None
        rows = np.concatenate([r for r, _ in found])
        values = np.concatenate([v for _, v in found])
        self.rows_resumed = len(rows)
        log.event(self.job, "resuming_shard", shard=self.shard, rows=len(rows), batches=len(self.done_batches),
                  of_batches=len(batches))
        return rows, values

    def _plan(self) -> str:
        if callable(self._key):
            self._key = self._key()
        return self._key

    def _load(self) -> list:
        """The valid parts in commit order, as (rows, values); anything else in the directory (a killed
        commit's temp file or unrecorded data, a part of another plan, a batch already held) is removed."""
        import numpy as np
        import pyarrow as pa

        from .dataset import numpy_array

        for stale in self.directory.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)  # a commit killed half-way; only this process works on this shard
        found, keep = [], set()
        for record_path in sorted(self.directory.glob("*.json"), key=lambda p: _part_number(p) or 0):
            number = _part_number(record_path)
            data_path = record_path.with_suffix(".arrow")
            try:
                record = json.loads(record_path.read_text())
                batches = [int(b) for b in record["batches"]]
                if record.get("plan") != self._plan() or not batches or len(set(batches)) < len(batches) or \
                        any(not 0 <= b < len(self._batches) or b in self.done_batches for b in batches):
                    raise ValueError("not of this plan, or holds batches already resumed")
                with pa.OSFile(str(data_path)) as source:  # read into memory: the part goes soon
                    table = pa.ipc.open_file(source).read_all()
                rows = numpy_array(table.column("row"))
                expected = np.concatenate([np.asarray(self._batches[b]) for b in batches])
                if not np.array_equal(rows, expected):
                    raise ValueError("its rows are not its batches' rows")
                flat = numpy_array(table.column("value"))
                values = np.asarray(flat, dtype=np.float32).reshape([len(rows), *record["shape"]]).copy()
            except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
                log.event(self.job, "discarding_part", shard=self.shard, part=record_path.name,
                          reason=f"{type(exc).__name__}: {exc}")
                continue
            self.done_batches.update(batches)
            found.append((rows, values))
            keep.add(number)
        for path in self.directory.iterdir():  # unrecorded or discarded parts
            if _part_number(path) not in keep:
                path.unlink(missing_ok=True)
        self._next_part = max(keep, default=0) + 1
        return found

    # -- committing --
    def add(self, batch: int, values) -> None:
        """Batch `batch` was computed (values: the model's output for its rows, as stored in the result)."""
        self.rows_computed += len(values)
        self._uncommitted.append((batch, values))
        remaining = len(self._batches) - len(self.done_batches) - len(self._uncommitted)
        if remaining > 0 and time.monotonic() - self._since >= self.interval():
            self.commit()

    def interval(self) -> float:
        """Seconds of model work between two commits."""
        if self.every_s is not None:
            return self.every_s
        return min(PART_SECONDS_MAX, max(PART_SECONDS, self._commit_s / PART_OVERHEAD))

    def commit(self) -> None:
        """The uncommitted batches as the next part: data (fsynced), then its record (fsynced)."""
        import numpy as np
        import pyarrow as pa

        from .dataset import arrow_array
        from .runner import fsync_dir, write_json_atomic

        if self.before_commit is not None:
            self.before_commit()
        started = time.monotonic()
        batches = [b for b, _ in self._uncommitted]
        rows = np.concatenate([np.asarray(self._batches[b], dtype=np.int64) for b in batches])
        values = np.concatenate([np.asarray(v, dtype=np.float32) for _, v in self._uncommitted])
        shape = list(values.shape[1:])
        flat = arrow_array(values)
        table = pa.table({"row": arrow_array(rows),
                          "value": pa.FixedSizeListArray.from_arrays(flat, max(1, math.prod(shape)))})
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{self._next_part:05d}"
        data_path = self.directory / f"{name}.arrow"
        tmp = self.directory / f".{name}.arrow.tmp-{os.getpid()}"
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, data_path)
        fsync_dir(self.directory)
        _test_kill("part-data")
        write_json_atomic(self.directory / f"{name}.json",
                          {"shard": self.shard, "part": self._next_part, "plan": self._plan(), "batches": batches,
                           "rows": len(rows), "shape": shape})
        self.done_batches.update(batches)
        self._uncommitted.clear()
        self._next_part += 1
        self._since = time.monotonic()
        self._commit_s = self._since - started
        _test_kill("part")


def _part_number(path: Path) -> int | None:
    stem = path.name.split(".", 1)[0]
    return int(stem) if stem.isdigit() else None


def _test_kill(point: str) -> None:
    """The tests' deterministic kill -9 (HFBATCH_TEST_KILL=POINT:K): at the K-th part commit of this process."""
    global _commits_in_this_process
    wanted = os.environ.get("HFBATCH_TEST_KILL")
    if not wanted:
        return
    kill_point, _, k = wanted.partition(":")
    if point == "part":
        _commits_in_this_process += 1
        count = _commits_in_this_process
    else:
        count = _commits_in_this_process + 1  # the commit in progress
    if kill_point == point and k.isdigit() and count == int(k):
        os.kill(os.getpid(), signal.SIGKILL)
